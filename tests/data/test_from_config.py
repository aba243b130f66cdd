"""configlib.build_train_iterator: the trainer's adapter from c.data.* to make_train_iterator."""

import ml_collections
import numpy as np
import pytest

from diffjax import configlib
from diffjax.data import pipeline


def _config(idx_dir, **data):
    c = ml_collections.ConfigDict()
    c.data = ml_collections.ConfigDict(dict(
        source="idx", path=idx_dir, split="train", image_size=6, resize="pad", channels=1,
        num_classes=7, batch_size=4, random_flip=False, num_workers=0))
    c.data.update(data)
    c.train = ml_collections.ConfigDict(dict(seed=0))
    return c


def test_config_iterator_matches_the_direct_call(idx_dir):
    got = configlib.build_train_iterator(_config(idx_dir), process_index=1, process_count=2)
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
        configlib.build_train_iterator(_config(idx_dir, channels=3), 0, 1)
    with pytest.raises(ValueError, match="data.num_classes=10 but idx has 7"):
        configlib.build_train_iterator(_config(idx_dir, num_classes=10), 0, 1)
    unlabelled = configlib.build_train_iterator(_config(idx_dir, num_classes=0), 0, 1)
    assert next(unlabelled)["label"].shape == (4,)
