"""The grain pipeline: format, determinism, resume, sharding, flips, padding, errors."""

import json

import numpy as np
import pytest

from diffjax.data import pipeline


def _train(idx_dir, **overrides):
    kwargs = dict(source="idx", split="train", data_dir=idx_dir, image_size=None,
                  global_batch_size=6, seed=3, random_flip=False, process_index=0,
                  process_count=1)
    kwargs.update(overrides)
    return pipeline.make_train_iterator(**kwargs)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_batch_format_and_values(idx_dir, tools):
    batch = next(_train(idx_dir))
    assert batch["image"].dtype == np.float32 and batch["image"].shape == (6, 4, 5, 1)
    assert batch["label"].dtype == np.int32 and batch["label"].shape == (6,)
    ids, flipped = tools.decode_ids(batch["image"])
    assert not flipped.any()
    reference = tools.coded_images(24)[ids].astype(np.float64)[..., None] / 127.5 - 1.0
    np.testing.assert_allclose(batch["image"], reference, rtol=0, atol=2 * np.finfo(np.float32).eps)
    np.testing.assert_array_equal(batch["label"], ids % 7)


def test_epochs_are_seeded_permutations(idx_dir, tools):
    it = _train(idx_dir, seed=11)
    epochs = []
    for _ in range(3):  # 24 examples = 4 batches of 6 per epoch
        ids = np.concatenate([tools.decode_ids(b["image"])[0] for b in _take(it, 4)])
        np.testing.assert_array_equal(np.sort(ids), np.arange(24))
        epochs.append(ids)
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch
    assert not np.array_equal(epochs[0], np.arange(24))
    other_seed = np.concatenate([tools.decode_ids(b["image"])[0]
                                 for b in _take(_train(idx_dir, seed=12), 4)])
    assert not np.array_equal(other_seed, epochs[0])


def test_deterministic_and_resumes_at_the_next_batch(idx_dir):
    options = dict(seed=5, random_flip=True, global_batch_size=5)  # batches straddle epochs
    reference = _take(_train(idx_dir, **options), 12)
    _assert_same(_take(_train(idx_dir, **options), 12), reference)
    for stop in (0, 3, 7):
        it = _train(idx_dir, **options)
        _take(it, stop)
        state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
        _take(it, 2)  # the interrupted run goes on a little before dying
        resumed = _train(idx_dir, **options)
        resumed.set_state(state)
        _assert_same(_take(resumed, 12 - stop), reference[stop:])


def test_processes_split_every_global_batch(idx_dir, tools):
    options = dict(seed=9, random_flip=True, global_batch_size=6)
    single = _take(_train(idx_dir, **options), 8)
    parts = [_take(_train(idx_dir, process_index=i, process_count=3, **options), 8)
             for i in range(3)]
    for step, whole in enumerate(single):
        local = [parts[i][step] for i in range(3)]
        assert all(b["image"].shape[0] == 2 for b in local)
        for key in whole:
            np.testing.assert_array_equal(np.concatenate([b[key] for b in local]), whole[key])
    seen = [np.concatenate([tools.decode_ids(b["image"])[0] for b in parts[i][:4]])
            for i in range(3)]
    assert all(len(set(s)) == 8 for s in seen)  # one epoch: disjoint ...
    assert set().union(*map(set, seen)) == set(range(24))  # ... and complete


def test_eval_pass_is_sharded_disjoint_and_complete(idx_dir, tools):
    seen = []
    for i in range(4):
        it = pipeline.make_eval_iterator(source="idx", split="test", data_dir=idx_dir,
                                         image_size=None, global_batch_size=8, process_index=i,
                                         process_count=4)
        batches = list(it)
        assert len(batches) == 2  # 10 examples -> 2 global batches, the second padded
        assert all(b["image"].shape == (2, 4, 5, 1) for b in batches)
        for b in batches:
            ids = tools.decode_ids(b["image"])[0]
            seen.extend(ids[b["mask"]].tolist())
            assert np.all(b["image"][~b["mask"]] == -1) and np.all(b["label"][~b["mask"]] == 0)
            np.testing.assert_array_equal(b["label"][b["mask"]], ids[b["mask"]] % 7)
    assert sorted(seen) == list(range(10))


def test_random_flip_mirrors_about_half(idx_dir, tools):
    batches = _take(_train(idx_dir, random_flip=True, global_batch_size=24), 10)
    images = np.concatenate([b["image"] for b in batches])
    ids, flipped = tools.decode_ids(images)
    originals = tools.coded_images(24)[ids].astype(np.float64)[..., None] / 127.5 - 1
    expected = np.where(flipped[:, None, None, None], originals[:, :, ::-1], originals)
    np.testing.assert_allclose(images, expected, rtol=0, atol=2 * np.finfo(np.float32).eps)
    # 240 fair coin flips: |fraction - 1/2| < 5 standard errors (0.16).
    assert abs(flipped.mean() - 0.5) < 5 * np.sqrt(0.25 / flipped.size)


def test_finite_epochs_end_and_remainder_is_padded(idx_dir, tools):
    kept = list(_train(idx_dir, num_epochs=1, global_batch_size=10))
    assert len(kept) == 2 and "mask" not in kept[0]
    padded = list(_train(idx_dir, num_epochs=1, global_batch_size=10, drop_remainder=False))
    assert len(padded) == 3 and padded[2]["mask"].sum() == 4 and padded[0]["mask"].all()
    ids = np.concatenate([tools.decode_ids(b["image"])[0][b["mask"]] for b in padded])
    np.testing.assert_array_equal(np.sort(ids), np.arange(24))


def test_dataset_info_is_cheap_and_matches(idx_dir):
    assert pipeline.dataset_info("idx", split="train", data_dir=idx_dir) == (24, (4, 5, 1), 7)
    assert pipeline.dataset_info("idx", split="test", data_dir=idx_dir, image_size=6,
                                 resize="pad") == (10, (6, 6, 1), 7)


def test_bad_arguments_give_one_line_errors(idx_dir):
    cases = [
        (dict(global_batch_size=7, process_count=2), "multiple of process_count=2"),
        (dict(source="mnist"), "valid: fashion_mnist_idx, idx, folder, tfds:<name>"),
        (dict(source="tfds"), "unknown data source"),
        (dict(image_size=8), "4x5 but image_size=8"),
        (dict(num_epochs=1, global_batch_size=30), "no full batch"),
        (dict(process_index=2, process_count=2), "process_index=2"),
        (dict(colour=True), "does not take option"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message) as e:
            _train(idx_dir, **overrides)
        assert "\n" not in str(e.value)


def test_worker_processes_give_the_same_batches_and_resume(idx_dir):
    options = dict(seed=2, random_flip=True, global_batch_size=4)
    reference = _take(_train(idx_dir, **options), 7)
    it = _train(idx_dir, num_workers=2, **options)
    got = [{k: np.array(v) for k, v in b.items()} for b in _take(it, 3)]
    state = json.loads(json.dumps(it.get_state()))
    it.close()
    resumed = _train(idx_dir, num_workers=2, **options)
    resumed.set_state(state)
    got += [{k: np.array(v) for k, v in b.items()} for b in _take(resumed, 4)]
    resumed.close()
    _assert_same(got, reference)
