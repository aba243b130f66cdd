"""The image-folder source on generated PNGs: class subfolders, flat, resizing, errors."""

import numpy as np
import pytest
from PIL import Image

from diffjax.data import pipeline, sources


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _rgb(height, width, value):
    """[H, W, 3] uint8 with a horizontal ramp starting at `value` (mirror-asymmetric)."""
    ramp = value + 10 * np.arange(width)
    return np.broadcast_to(np.stack([ramp, ramp // 2, 255 - ramp], -1)[None],
                           (height, width, 3)).astype(np.uint8)


@pytest.fixture
def class_folder(tmp_path):
    """Two classes ('cat' -> 0, 'dog' -> 1), 8x12 images and one nested 16x16 image."""
    root = tmp_path / "pets"
    _png(root / "dog" / "b.png", _rgb(8, 12, 40))
    _png(root / "dog" / "a.png", _rgb(8, 12, 30))
    _png(root / "cat" / "z.png", _rgb(8, 12, 10))
    block = np.kron(_rgb(8, 8, 60), np.ones((2, 2, 1), np.uint8))  # 2x2 blocks of equal pixels
    _png(root / "cat" / "more" / "big.png", block)
    return root


def test_class_subfolders_labels_and_exact_resizing(class_folder):
    src = sources.make_source("folder", split="train", data_dir=str(class_folder), image_size=8)
    assert len(src) == 4 and src.num_classes == 2 and src.image_shape == (8, 8, 3)
    assert src.class_names == ("cat", "dog")
    images, labels = src.read_batch(np.arange(4))
    # sorted order: cat/more/big.png, cat/z.png, dog/a.png, dog/b.png
    np.testing.assert_array_equal(labels, [0, 0, 1, 1])
    np.testing.assert_array_equal(images[0], _rgb(8, 8, 60))  # 16x16 box-halved exactly
    np.testing.assert_array_equal(images[1], _rgb(8, 12, 10)[:, 2:10])  # centre crop of width 12
    np.testing.assert_array_equal(images[3], _rgb(8, 12, 40)[:, 2:10])


def test_flat_folder_is_unconditional_and_pipeline_runs(tmp_path):
    for i in range(5):
        _png(tmp_path / f"img{i}.png", _rgb(10, 10, 20 * i))
    info = pipeline.dataset_info("folder", data_dir=str(tmp_path), image_size=6)
    assert info == (5, (6, 6, 3), 0)
    it = pipeline.make_train_iterator(
        source="folder", split="train", data_dir=str(tmp_path), image_size=6,
        global_batch_size=4, seed=0, random_flip=True, process_index=0, process_count=1)
    batches = [next(it) for _ in range(3)]
    for b in batches:
        assert b["image"].shape == (4, 6, 6, 3) and b["image"].dtype == np.float32
        assert b["image"].min() >= -1 and b["image"].max() <= 1
        np.testing.assert_array_equal(b["label"], np.zeros(4, np.int32))
    # cache=True keeps decoded images in memory and gives identical batches
    cached = pipeline.make_train_iterator(
        source="folder", split="train", data_dir=str(tmp_path), image_size=6, cache=True,
        global_batch_size=4, seed=0, random_flip=True, process_index=0, process_count=1)
    for b in batches:
        c = next(cached)
        np.testing.assert_array_equal(c["image"], b["image"])


def test_grayscale_folder(tmp_path):
    _png(tmp_path / "g.png", np.arange(16, dtype=np.uint8).reshape(4, 4) * 16)
    src = sources.make_source("folder", split="train", data_dir=str(tmp_path), image_size=4,
                              channels=1)
    images, _ = src.read_batch(np.array([0]))
    np.testing.assert_array_equal(images[0, :, :, 0], np.arange(16).reshape(4, 4) * 16)


def test_folder_errors(tmp_path, class_folder):
    (class_folder / "loose.png").write_bytes(b"")
    with pytest.raises(ValueError, match="both images and subfolders"):
        sources.make_source("folder", split="train", data_dir=str(class_folder), image_size=8)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images"):
        sources.make_source("folder", split="train", data_dir=str(empty), image_size=8)
    with pytest.raises(ValueError, match="is not a directory"):
        sources.make_source("folder", split="train", data_dir=str(tmp_path / "nope"),
                            image_size=8)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"not a png")
    src = sources.make_source("folder", split="train", data_dir=str(broken), image_size=8)
    with pytest.raises(ValueError, match="cannot read image"):
        src.read_batch(np.array([0]))
    with pytest.raises(ValueError, match="only split"):
        sources.make_source("folder", split="test", data_dir=str(broken), image_size=8)
    with pytest.raises(ValueError, match="needs a positive image_size"):
        sources.make_source("folder", split="train", data_dir=str(broken), image_size=None)
