"""app.train.train_iterator: the trainer's adapter from the DataSpec to make_train_iterator."""

import dataclasses

import numpy as np
import pytest

from diffjax.app.train import train_iterator
from diffjax.data import pipeline
from diffjax.specs import DataSpec


def _spec(idx_dir, **data):
    spec = DataSpec(source="idx", path=idx_dir, split="train", image_size=6, resize="pad",
                    channels=1, num_classes=7, batch_size=4, random_flip=False, num_workers=0)
    return dataclasses.replace(spec, **data)


def test_config_iterator_matches_the_direct_call(idx_dir):
    got = train_iterator(_spec(idx_dir), 0, process_index=1, process_count=2)
    want = pipeline.make_train_iterator(
        source="idx", split="train", data_dir=idx_dir, image_size=6, resize="pad",
        global_batch_size=4, seed=0, random_flip=False, process_index=1, process_count=2)
    for _ in range(3):
        a, b = next(got), next(want)
        assert a["image"].shape == (2, 6, 6, 1)
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def test_config_mismatches_are_reported(idx_dir):
    with pytest.raises(ValueError, match="data.channels=3 but idx images have 1"):
        train_iterator(_spec(idx_dir, channels=3), 0, 0, 1)
    with pytest.raises(ValueError, match="data.num_classes=10 but idx has 7"):
        train_iterator(_spec(idx_dir, num_classes=10), 0, 0, 1)
    unlabelled = train_iterator(_spec(idx_dir, num_classes=0), 0, 0, 1)
    assert next(unlabelled)["label"].shape == (4,)
