"""Captions from label + measured attributes, prompt parsing and prompt-following scores,
against hand-computed values and the real Fashion-MNIST IDX files."""

import json

import numpy as np
import pytest

from diffjax.data import captions as C

PIXELS = 28 * 28


def square(side, value, size=28, extra=()):
    """[28, 28, 1] uint8: black with a side x side square of `value` at the top left, plus
    single pixels (row, col, value) in `extra`."""
    image = np.zeros((size, size, 1), np.uint8)
    image[:side, :side] = value
    for row, col, v in extra:
        image[row, col] = v
    return image


def to_model_range(images):
    return images.astype(np.float64) / 127.5 - 1.0


def test_measure_hand_made_uint8_and_float():
    images = np.stack([
        square(4, 200),                                           # the brief's example
        square(2, 200, extra=[(20, 20, 25), (21, 21, 26)]),       # 25 is background, 26 not
        np.zeros((28, 28, 1), np.uint8),                          # no foreground
        square(28, 255),                                          # all foreground
    ])
    expected_size = [16 / PIXELS, 5 / PIXELS, 0.0, 1.0]
    expected_brightness = [200 / 255, (4 * 200 + 26) / 5 / 255, 0.0, 1.0]
    for batch in (images, to_model_range(images), to_model_range(images).astype(np.float32)):
        got = C.measure(batch)
        assert set(got) == {"brightness", "size"}
        assert got["size"].dtype == np.float64 and got["size"].shape == (4,)
        np.testing.assert_allclose(got["size"], expected_size, rtol=0, atol=1e-12)
        np.testing.assert_allclose(got["brightness"], expected_brightness, rtol=1e-6)


def test_measure_ignores_slight_noise_on_generated_samples():
    rng = np.random.default_rng(0)
    clean = to_model_range(np.stack([square(4, 200), square(10, 120)]))
    noisy = clean + rng.normal(0.0, 0.05, clean.shape)   # 0.05 * 127.5 ~ 6 grey levels
    got = C.measure(noisy)
    np.testing.assert_allclose(got["size"], [16 / PIXELS, 100 / PIXELS])
    np.testing.assert_allclose(got["brightness"], [200 / 255, 120 / 255], atol=0.01)
    # Out-of-range values are clipped to [-1, 1]: undershoot is background, overshoot is 255.
    overshoot = np.full((1, 28, 28, 1), -1.5)
    overshoot[0, :4, :4] = 1.2
    got = C.measure(overshoot)
    assert got["size"][0] == pytest.approx(16 / PIXELS) and got["brightness"][0] == 1.0


def _class_images():
    """Class 0: squares of side 1, 2, 3 (values 100, 150, 250); class 1: sides 2, 4 (values
    60, 200). Medians by hand: class 0 size 4/784 brightness 150/255; class 1 size
    (4 + 16) / 2 / 784, brightness (60 + 200) / 2 / 255."""
    images = np.stack([square(1, 100), square(4, 200), square(2, 150), square(2, 60),
                       square(3, 250)])
    labels = np.array([0, 1, 0, 1, 0])
    return images, labels


def test_thresholds_are_within_class_medians_and_json_round_trip():
    images, labels = _class_images()
    thresholds = C.thresholds_from(images, labels, num_classes=2)
    assert thresholds.size == pytest.approx((4 / PIXELS, 10 / PIXELS))
    assert thresholds.brightness == pytest.approx((150 / 255, 130 / 255))
    assert C.AttributeThresholds.from_dict(json.loads(json.dumps(thresholds.to_dict()))) \
        == thresholds
    # Random images: equal to np.median of the measured values within each class.
    rng = np.random.default_rng(1)
    images = (rng.random((60, 8, 8, 1)) < 0.4) * rng.integers(0, 256, (60, 8, 8, 1))
    labels = rng.integers(0, 3, 60)
    measured = C.measure(images.astype(np.uint8))
    thresholds = C.thresholds_from(images.astype(np.uint8), labels, 3)
    for name in ("brightness", "size"):
        assert getattr(thresholds, name) == pytest.approx(
            [np.median(measured[name][labels == c]) for c in range(3)])
    with pytest.raises(ValueError, match="class 3 has no examples"):
        C.thresholds_from(images.astype(np.uint8), labels, 4)


def test_attribute_values_split_at_the_class_median():
    thresholds = C.AttributeThresholds(brightness=(0.5, 0.2), size=(0.1, 0.3))
    measured = {"brightness": np.array([0.5, 0.49, 0.3, 0.1]),
                "size": np.array([0.2, 0.05, 0.3, 0.29])}
    values = C.attribute_values(measured, np.array([0, 0, 1, 1]), thresholds)
    np.testing.assert_array_equal(values["brightness"], [1, 0, 1, 0])   # >= median -> 1
    np.testing.assert_array_equal(values["size"], [1, 0, 1, 0])


def test_caption_words():
    assert C.CLASS_WORDS == ("t-shirt", "trousers", "pullover", "dress", "coat", "sandal",
                             "shirt", "sneaker", "bag", "boot")
    both = {"brightness": True, "size": True}
    assert C.caption(7, {"brightness": 0, "size": 0}, both) == "a dark small sneaker"
    assert C.caption(0, {"brightness": 1, "size": 1}, both) == "a bright large t-shirt"
    assert C.caption(3, {"brightness": 1, "size": 0},
                     {"brightness": True, "size": False}) == "a bright dress"
    assert C.caption(1, {"brightness": 0, "size": 1},
                     {"brightness": False, "size": True}) == "a large trousers"
    assert C.caption(9, {"brightness": 1, "size": 1},
                     {"brightness": False, "size": False}) == "a boot"


def test_captions_for_reads_the_images():
    images, labels = _class_images()
    thresholds = C.thresholds_from(images, labels, num_classes=2)
    got = C.captions_for(images, labels, np.arange(5), thresholds, keep_prob=1.0)
    # sizes / brightnesses vs medians: see _class_images.
    assert got == ["a dark small t-shirt", "a bright large trousers", "a bright large t-shirt",
                   "a dark small trousers", "a bright large t-shirt"]


def test_captions_deterministic_per_index_whatever_the_batch():
    rng = np.random.default_rng(2)
    n = 400
    images = np.stack([square(int(s), int(v)) for s, v in
                       zip(rng.integers(1, 20, n), rng.integers(30, 256, n))])
    labels = rng.integers(0, 10, n)
    thresholds = C.thresholds_from(images, labels, 10)
    indices = np.arange(1000, 1000 + n)
    whole = C.captions_for(images, labels, indices, thresholds, seed=3)
    assert whole == C.captions_for(images, labels, indices, thresholds, seed=3)
    order = rng.permutation(n)[:37]
    part = C.captions_for(images[order], labels[order], indices[order], thresholds, seed=3)
    assert part == [whole[i] for i in order]
    assert whole != C.captions_for(images, labels, indices, thresholds, seed=4)
    # Word counts: 2 ("a" + class) + kept attributes; each kept with probability 0.75.
    keep = C.keep_mask(np.arange(20000), seed=0, keep_prob=0.75)
    for name in ("brightness", "size"):
        assert 0.73 < keep[name].mean() < 0.77
    assert 0.54 < (keep["brightness"] & keep["size"]).mean() < 0.585   # independent: 0.5625
    assert {len(c.split()) for c in C.captions_for(images, labels, indices, thresholds,
                                                   keep_prob=1.0)} == {4}
    assert C.captions_for(images, labels, indices, thresholds, keep_prob=0.0) == \
        [f"a {C.CLASS_WORDS[label]}" for label in labels]


def test_parse_prompt_round_trips_captions():
    for label in range(10):
        for b in (0, 1):
            for s in (0, 1):
                for keep_b in (False, True):
                    for keep_s in (False, True):
                        text = C.caption(label, {"brightness": b, "size": s},
                                         {"brightness": keep_b, "size": keep_s})
                        assert C.parse_prompt(text) == {
                            "label": label, "brightness": b if keep_b else None,
                            "size": s if keep_s else None}
    assert C.parse_prompt("A  Bright BOOT") == {"label": 9, "brightness": 1, "size": None}
    assert C.parse_prompt("an large bag") == {"label": 8, "brightness": None, "size": 1}


def test_parse_prompt_errors():
    with pytest.raises(ValueError, match=r"unknown word 'red'.*known words:.*sneaker"):
        C.parse_prompt("a red sneaker")
    with pytest.raises(ValueError, match="names no class"):
        C.parse_prompt("a dark small")
    with pytest.raises(ValueError, match="more than one word"):
        C.parse_prompt("a dark bright coat")
    with pytest.raises(ValueError, match="unknown word 'boot'"):
        C.parse_prompt("a boot", num_classes=9)


def test_default_prompts_balanced():
    prompts = C.default_prompts()
    assert len(prompts) == 40 and prompts[0] == "a dark small t-shirt"
    assert prompts[:4] == ("a dark small t-shirt", "a dark large t-shirt",
                           "a bright small t-shirt", "a bright large t-shirt")
    targets = {tuple(C.parse_prompt(p).values()) for p in prompts}
    assert targets == {(c, b, s) for c in range(10) for b in (0, 1) for s in (0, 1)}


def test_score_exact_fractions_against_prompted_class():
    # Class 0 medians: brightness 0.5, size 50/784; class 1: 0.9, 10/784.
    thresholds = C.AttributeThresholds(brightness=(0.5, 0.9), size=(50 / PIXELS, 10 / PIXELS))
    samples = to_model_range(np.stack([
        square(6, 200),    # size 36/784, brightness 0.78
        square(8, 100),    # size 64/784, brightness 0.39
        square(6, 250),    # size 36/784, brightness 0.98
        square(2, 240),    # size 4/784,  brightness 0.94
        square(9, 255),    # size 81/784, brightness 1.0
    ]))
    prompts = ["a bright small t-shirt",   # class 0: bright yes, small yes
               "a dark small t-shirt",     # class 0: dark yes, small no (64 >= 50)
               "a dark large trousers",    # class 1: dark no (0.98 >= 0.9), large yes
               "a large t-shirt",          # class 0: large no
               "a trousers"]               # nothing but the class
    targets = [C.parse_prompt(p) for p in prompts]
    predicted = np.array([0, 1, 1, 1, 1])  # class right for 0, 2, 4
    got = C.score(samples, targets, predicted, thresholds)
    assert got == {"class_accuracy": pytest.approx(3 / 5), "class_n": 5,
                   "brightness_accuracy": pytest.approx(2 / 3), "brightness_n": 3,
                   "size_accuracy": pytest.approx(2 / 4), "size_n": 4}
    # Attributes are judged with the PROMPTED class's medians, not the predicted class's:
    # sample 0 (size 36/784, brightness 0.78) is small and bright for class 0 but large and
    # dark for class 1, whatever the classifier says.
    one = samples[:1]
    assert C.score(one, [C.parse_prompt("a bright small t-shirt")], np.array([1]),
                   thresholds) == {"class_accuracy": 0.0, "class_n": 1,
                                   "brightness_accuracy": 1.0, "brightness_n": 1,
                                   "size_accuracy": 1.0, "size_n": 1}
    assert C.score(one, [C.parse_prompt("a bright small trousers")], np.array([0]),
                   thresholds) == {"class_accuracy": 0.0, "class_n": 1,
                                   "brightness_accuracy": 0.0, "brightness_n": 1,
                                   "size_accuracy": 0.0, "size_n": 1}
    assert C.score(samples, targets, None, thresholds) == {
        "class_accuracy": None, "class_n": 0,
        "brightness_accuracy": pytest.approx(2 / 3), "brightness_n": 3,
        "size_accuracy": pytest.approx(2 / 4), "size_n": 4}
    only_class = C.score(samples[:1], [C.parse_prompt("a coat")], np.array([4]), thresholds)
    assert only_class["brightness_n"] == 0 and only_class["brightness_accuracy"] is None


def test_attributes_half_and_half_within_each_class_on_real_data():
    # The embedded default's data (launch/install.sh installs it): a missing copy fails here
    # rather than skipping the check of the figures in captions.py's docstring.
    from diffjax.data import sources
    source = sources.make_source("fashion_mnist_idx", split="train")
    images, labels = source.read_batch(np.arange(5000))
    thresholds = C.thresholds_from(images, labels, 10)
    values = C.attribute_values(C.measure(images), labels, thresholds)
    for name, value in values.items():
        for c in range(10):
            fraction = value[labels == c].mean()
            assert 0.45 <= fraction <= 0.55, (name, C.CLASS_WORDS[c], fraction)
    # The two attributes are different things: binary values agree about half the time.
    assert 0.4 < (values["brightness"] == values["size"]).mean() < 0.6
    # The whole train split reproduces the medians quoted in the module docstring.
    images, labels = source.read_batch(np.arange(len(source)))
    full = C.thresholds_from(images, labels, 10)
    assert full.brightness[5] == pytest.approx(0.5168, abs=5e-5)   # sandal
    assert full.size[2] == pytest.approx(0.6110, abs=5e-5)         # pullover
    for c, word in enumerate(C.CLASS_WORDS):
        line = next(l for l in C.__doc__.splitlines() if l.strip().startswith(word + " "))
        assert [float(x) for x in line.split()[1:]] == pytest.approx(
            [full.brightness[c], full.size[c]], abs=5e-5), word
