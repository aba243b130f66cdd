"""TFDS datasets through tfds.data_source under tfds.testing.mock_data (no TensorFlow).

Checked with tfds 4.9.10: mock_data patches DatasetBuilder.as_data_source, so tfds.data_source
returns a mocked ArrayRecord source of deterministic random examples without TensorFlow.
Its batched __getitems__ is broken (an unbound mock function), so the source reads record by
record, which also works on real data.
"""

import os
import sys
import tempfile

import numpy as np
import pytest
import tensorflow_datasets as tfds

from diffjax.data import pipeline, sources


def test_eval_pass_matches_the_data_source(tmp_path, monkeypatch):
    # tfds.data_source's own builder leaves an empty tmp*tfds directory: in tmp_path
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with tfds.testing.mock_data(num_examples=10):
        reference = tfds.data_source("cifar10", split="test")
        it = pipeline.make_eval_iterator(source="tfds:cifar10", split="test", image_size=32,
                                         global_batch_size=4, process_index=0, process_count=1)
        batches = list(it)
        expected = np.stack([reference[i]["image"] for i in range(10)]).astype(np.float64)
        expected_labels = np.array([reference[i]["label"] for i in range(10)])
    assert len(batches) == 3
    images = np.concatenate([b["image"][b["mask"]] for b in batches])
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    assert images.dtype == np.float32 and images.shape == (10, 32, 32, 3)
    np.testing.assert_allclose(images, expected / 127.5 - 1, rtol=0,
                               atol=2 * np.finfo(np.float32).eps)
    np.testing.assert_array_equal(labels, expected_labels)
    assert labels.dtype == np.int32 and 0 <= labels.min() and labels.max() < 10


def test_train_iterator_resumes_and_shapes():
    options = dict(source="tfds:fashion_mnist", split="train", image_size=32, resize="pad",
                   global_batch_size=4, seed=1, random_flip=True, process_index=0,
                   process_count=1)
    with tfds.testing.mock_data(num_examples=6):
        it = pipeline.make_train_iterator(**options)
        first = [next(it) for _ in range(2)]
        state = it.get_state()
        rest = [next(it) for _ in range(3)]
        resumed = pipeline.make_train_iterator(**options)
        resumed.set_state(state)
        for want in rest:
            got = next(resumed)
            np.testing.assert_array_equal(got["image"], want["image"])
            np.testing.assert_array_equal(got["label"], want["label"])
        info = pipeline.dataset_info("tfds:imagenet_resized/64x64", split="train")
    assert first[0]["image"].shape == (4, 32, 32, 1)
    assert np.all(first[0]["image"][:, :2] == -1)  # 28 -> 32 pads two black rows on top
    assert info == (6, (64, 64, 3), 1000)
    assert "tensorflow" not in sys.modules


def test_tfds_errors(tmp_path):
    with tfds.testing.mock_data(num_examples=2):
        with pytest.raises(ValueError, match="32x32 but image_size=64"):
            sources.make_source("tfds:cifar10", split="train", image_size=64)
        with pytest.raises(ValueError, match="no feature 'caption'"):
            sources.make_source("tfds:cifar10", split="train", image_key="caption")
    with pytest.raises(ValueError, match="unknown tfds dataset 'cifar_ten'; did you mean: cifar10"):
        sources.make_source("tfds:cifar_ten", split="train")
    with pytest.raises(ValueError, match="tfds build cifar10 .*--file_format=array_record") as e:
        sources.make_source("tfds:cifar10", split="train", data_dir=str(tmp_path))
    assert "\n" not in str(e.value) and "not prepared" in str(e.value)


def test_an_unprepared_dataset_leaves_no_temporary_directories(tmp_path, monkeypatch):
    """TFDS makes an empty tmp*tfds directory in the temporary folder for each builder of a
    dataset it does not find prepared and keeps it; opening the source removes those it
    made, and only those."""
    temp = tmp_path / "tmp"
    (temp / "tmpothertfds").mkdir(parents=True)  # another program's, empty: kept
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    with pytest.raises(ValueError, match="not prepared"):
        sources.make_source("tfds:cifar10", split="train", data_dir=str(tmp_path / "data"))
    assert os.listdir(temp) == ["tmpothertfds"]
