"""Captions for Fashion-MNIST from the label and two measured attributes; prompt-following scores.

Text-to-image on Fashion-MNIST (issue 13) needs captions that say more than the class, and a
way to check that generated samples do what their prompt asks. Pure NumPy (no jax).

Caption: "a {brightness word} {size word} {class word}", e.g. "a dark small sneaker"; each
attribute word is kept with probability `keep_prob` (default 0.75), decided by a hash of
(seed, example index, attribute), so an example always gets the same caption whatever batch it
is in: "a bright dress", "a boot" are captions too.

Attributes (measured on the image, `measure`):
  brightness  ("dark", "bright")   mean intensity (0..1) of the foreground pixels
  size        ("small", "large")   fraction of the frame's pixels that are foreground
Foreground: a pixel whose value on the 0..255 scale is > FOREGROUND_THRESHOLD = 25 (~10% of the
maximum 255; Fashion-MNIST backgrounds are exactly 0). The threshold is fixed, not relative to
the image's own maximum, so it applies unchanged to generated samples (floats in [-1, 1],
converted with (x + 1) * 127.5 and clipped to 0..255), whose slight noise around the black
background stays under it. An image with no foreground pixel has brightness 0 and size 0.

Binary values: an attribute is 1 (the high word) where its value is >= the median of that
attribute WITHIN THE EXAMPLE'S CLASS on the train split (`AttributeThresholds`). Global
thresholds would make "large" nearly synonymous with "pullover / coat / shirt" and "small"
with "sandal / sneaker / trousers" (figures below), so a model could get the attribute right from the class word alone. With
within-class medians each attribute is 50/50 inside every class, so the class predicts nothing
about it: the model has to read the attribute word.

Measured on the Fashion-MNIST train split (60000 images, threshold 25/255; no image is empty):

  class        brightness median   size median
  t-shirt           0.6392            0.5434
  trousers          0.6953            0.3176
  pullover          0.6559            0.6110
  dress             0.6878            0.3903
  coat              0.7244            0.5746
  sandal            0.5168            0.2449
  shirt             0.5808            0.5906
  sneaker           0.5850            0.2832
  bag               0.6869            0.5370
  boot              0.7024            0.4298

  Fraction with the high word, per class: brightness 0.500 in every class, size 0.500-0.515
  (size is an integer pixel count, so some images tie with the median and go high).
  A global median instead would give "large" to 1% of sneakers but 96% of pullovers (size) and
  "bright" to 16% of sandals but 69% of boots (brightness).
  Separation (mean over classes of each half's mean): brightness dark 0.502 vs bright 0.742
  (within-class std 0.147); size small 0.389 vs large 0.514 (within-class std 0.082).
  The two attributes are not the same thing: their within-class correlation (values centred
  on their class mean, pooled) is +0.16 (per class -0.06 .. +0.24), and the binary values
  agree in 53.8% of the images (50% if independent).

`score` checks generated samples against their prompts: the class with a classifier's
predictions (chance 0.1), brightness and size by `measure` against the threshold of the
PROMPTED class (chance 0.5 each with the balanced `default_prompts`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

# One lowercase word per Fashion-MNIST class, in label order (idx.FASHION_MNIST_CLASSES).
CLASS_WORDS: tuple[str, ...] = (
    "t-shirt", "trousers", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "boot",
)

# Foreground: value on the 0..255 scale strictly above this (~10% of 255).
FOREGROUND_THRESHOLD = 25.0


@dataclasses.dataclass(frozen=True)
class Attribute:
    """A binary attribute: `low` is the word for value 0, `high` for value 1."""
    name: str
    low: str
    high: str

    @property
    def words(self) -> tuple[str, str]:
        return (self.low, self.high)


# In caption order.
ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("brightness", "dark", "bright"),
    Attribute("size", "small", "large"),
)
ATTRIBUTE_NAMES: tuple[str, ...] = tuple(a.name for a in ATTRIBUTES)

_IGNORED_WORDS = ("a", "an")
_MEASURE_CHUNK = 4096


def _to_0_255(images: np.ndarray) -> np.ndarray:
    """uint8 / integer images as they are; float images in [-1, 1] -> (x + 1) * 127.5, clipped."""
    if np.issubdtype(images.dtype, np.floating):
        return np.clip((images.astype(np.float64) + 1.0) * 127.5, 0.0, 255.0)
    if np.issubdtype(images.dtype, np.integer) or images.dtype == np.bool_:
        return images.astype(np.float64)
    raise TypeError(f"images must be uint8 (0..255) or float in [-1, 1], got dtype {images.dtype}")


def measure(images: np.ndarray) -> dict[str, np.ndarray]:
    """Measures brightness and size of each image.

    images: uint8 [N, H, W, C] (0..255, 0 = black background) or float [N, H, W, C] in [-1, 1]
    (model range). Foreground = pixel > FOREGROUND_THRESHOLD on the 0..255 scale (all channels
    together). Returns {"brightness": [N] float64 mean foreground intensity in 0..1,
    "size": [N] float64 foreground fraction of the frame}; 0 and 0 where there is no foreground.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}")
    n = images.shape[0]
    pixels = int(np.prod(images.shape[1:]))
    brightness = np.zeros(n, np.float64)
    size = np.zeros(n, np.float64)
    for start in range(0, n, _MEASURE_CHUNK):
        chunk = _to_0_255(images[start:start + _MEASURE_CHUNK]).reshape(-1, pixels)
        foreground = chunk > FOREGROUND_THRESHOLD
        count = foreground.sum(axis=1)
        total = np.where(foreground, chunk, 0.0).sum(axis=1)
        end = start + chunk.shape[0]
        brightness[start:end] = np.where(count > 0, total / np.maximum(count, 1) / 255.0, 0.0)
        size[start:end] = count / pixels
    return {"brightness": brightness, "size": size}


@dataclasses.dataclass(frozen=True)
class AttributeThresholds:
    """Per-class medians (train split) of each attribute; value >= median -> high word."""
    brightness: tuple[float, ...]
    size: tuple[float, ...]

    def __post_init__(self):
        object.__setattr__(self, "brightness", tuple(float(v) for v in self.brightness))
        object.__setattr__(self, "size", tuple(float(v) for v in self.size))
        if len(self.brightness) != len(self.size):
            raise ValueError(f"AttributeThresholds: {len(self.brightness)} brightness medians "
                             f"but {len(self.size)} size medians; need one per class for both")

    @property
    def num_classes(self) -> int:
        return len(self.brightness)

    def for_attribute(self, name: str) -> np.ndarray:
        """[num_classes] float64 medians of the named attribute."""
        if name not in ATTRIBUTE_NAMES:
            raise ValueError(f"unknown attribute {name!r}; known: {', '.join(ATTRIBUTE_NAMES)}")
        return np.asarray(getattr(self, name), np.float64)

    def to_dict(self) -> dict[str, list[float]]:
        return {name: list(getattr(self, name)) for name in ATTRIBUTE_NAMES}

    @classmethod
    def from_dict(cls, d: Mapping[str, Sequence[float]]) -> "AttributeThresholds":
        missing = [name for name in ATTRIBUTE_NAMES if name not in d]
        extra = sorted(set(d) - set(ATTRIBUTE_NAMES))
        if missing or extra:
            raise ValueError(f"AttributeThresholds.from_dict: keys must be "
                             f"{', '.join(ATTRIBUTE_NAMES)} (missing {missing}, unknown {extra})")
        return cls(**{name: tuple(d[name]) for name in ATTRIBUTE_NAMES})


def thresholds_from(images: np.ndarray, labels: np.ndarray, num_classes: int
                    ) -> AttributeThresholds:
    """Median of each attribute within each class (use the train split)."""
    labels = np.asarray(labels).reshape(-1)
    measured = measure(images)
    if labels.shape[0] != measured["size"].shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {measured['size'].shape[0]} images")
    medians: dict[str, list[float]] = {name: [] for name in ATTRIBUTE_NAMES}
    for c in range(num_classes):
        in_class = labels == c
        if not in_class.any():
            raise ValueError(f"thresholds_from: class {c} has no examples; every class needs some")
        for name in ATTRIBUTE_NAMES:
            medians[name].append(float(np.median(measured[name][in_class])))
    return AttributeThresholds(**{name: tuple(v) for name, v in medians.items()})


def _check_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        raise ValueError(f"label {int(labels[bad][0])} out of range for {num_classes} classes")
    return labels


def attribute_values(measured: Mapping[str, np.ndarray], labels: np.ndarray,
                     thresholds: AttributeThresholds) -> dict[str, np.ndarray]:
    """[N] int64 per attribute: 1 (high word) where the value >= the median of its class."""
    labels = _check_labels(labels, thresholds.num_classes)
    return {name: (np.asarray(measured[name], np.float64)
                   >= thresholds.for_attribute(name)[labels]).astype(np.int64)
            for name in ATTRIBUTE_NAMES}


def caption(label: int, attrs: Mapping[str, int], keep: Mapping[str, bool]) -> str:
    """"a {brightness word} {size word} {class word}", omitting attribute words whose keep is
    False (a missing key counts as False), e.g. "a dark small sneaker", "a bright dress"."""
    label = int(label)
    if not 0 <= label < len(CLASS_WORDS):
        raise ValueError(f"label {label} out of range for {len(CLASS_WORDS)} classes")
    words = ["a"]
    for attribute in ATTRIBUTES:
        if keep.get(attribute.name, False):
            words.append(attribute.words[int(attrs[attribute.name])])
    words.append(CLASS_WORDS[label])
    return " ".join(words)


def _uniform_hash(seed: int, indices: np.ndarray, attribute: int) -> np.ndarray:
    """Deterministic uniforms in [0, 1) from (seed, index, attribute): splitmix64 finaliser."""
    with np.errstate(over="ignore"):
        x = (np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15)
             + indices.astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
             + np.uint64(attribute + 1) * np.uint64(0x94D049BB133111EB))
        for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
            x = (x ^ (x >> np.uint64(shift))) * np.uint64(mult)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def keep_mask(indices: np.ndarray, seed: int = 0, keep_prob: float = 0.75
              ) -> dict[str, np.ndarray]:
    """[N] bool per attribute: whether example `indices[i]`'s caption keeps that word."""
    indices = np.asarray(indices).reshape(-1).astype(np.int64)
    return {a.name: _uniform_hash(int(seed), indices, k) < keep_prob
            for k, a in enumerate(ATTRIBUTES)}


def captions_for(images: np.ndarray, labels: np.ndarray, indices: np.ndarray,
                 thresholds: AttributeThresholds, seed: int = 0, keep_prob: float = 0.75
                 ) -> list[str]:
    """Captions of a batch: images uint8 [N, H, W, C], labels [N], indices [N] = the examples'
    indices in the dataset (they, with seed, decide which attribute words are kept)."""
    labels = np.asarray(labels).reshape(-1)
    indices = np.asarray(indices).reshape(-1)
    if not (len(labels) == len(indices) == len(images)):
        raise ValueError(f"captions_for: {len(images)} images, {len(labels)} labels, "
                         f"{len(indices)} indices; need the same number of each")
    values = attribute_values(measure(images), labels, thresholds)
    keep = keep_mask(indices, seed, keep_prob)
    return [caption(int(labels[i]),
                    {name: int(values[name][i]) for name in ATTRIBUTE_NAMES},
                    {name: bool(keep[name][i]) for name in ATTRIBUTE_NAMES})
            for i in range(len(labels))]


def parse_prompt(prompt: str, num_classes: int = 10) -> dict[str, Any]:
    """The targets a prompt names: {"label": int, "brightness": 0/1/None, "size": 0/1/None}.

    Words are lowercased and split on whitespace; "a"/"an" are ignored. A prompt must name
    exactly one class; an unknown word, no class, or two words for one thing -> ValueError.
    """
    class_words = CLASS_WORDS[:num_classes]
    vocabulary: dict[str, tuple[str, int]] = {w: ("label", c) for c, w in enumerate(class_words)}
    for attribute in ATTRIBUTES:
        for value, word in enumerate(attribute.words):
            vocabulary[word] = (attribute.name, value)
    targets: dict[str, Any] = {"label": None, **{name: None for name in ATTRIBUTE_NAMES}}
    for word in prompt.lower().split():
        if word in _IGNORED_WORDS:
            continue
        if word not in vocabulary:
            raise ValueError(f"prompt {prompt!r}: unknown word {word!r}; known words: "
                             f"{', '.join(list(vocabulary) + list(_IGNORED_WORDS))}")
        key, value = vocabulary[word]
        if targets[key] is not None:
            raise ValueError(f"prompt {prompt!r}: more than one word for {key} ({word!r})")
        targets[key] = value
    if targets["label"] is None:
        raise ValueError(f"prompt {prompt!r} names no class; class words: "
                         f"{', '.join(class_words)}")
    return targets


def score(samples: np.ndarray, prompt_targets: Sequence[Mapping[str, Any]],
          predicted_labels: np.ndarray | None, thresholds: AttributeThresholds
          ) -> dict[str, float | int | None]:
    """How well samples follow their prompts.

    samples: float [N, H, W, C] in [-1, 1]; prompt_targets: N dicts from `parse_prompt`;
    predicted_labels: [N] a classifier's labels of the samples, or None (class not scored).
    Returns {"class_accuracy", "class_n", "brightness_accuracy", "brightness_n",
    "size_accuracy", "size_n"}: the fraction of the samples whose prompt names that thing that
    have the prompted value, and how many such samples (accuracy None where n is 0).
    Brightness and size are measured and compared with the median of the PROMPTED class.
    Chance: 0.1 for the class, 0.5 for each attribute.
    """
    samples = np.asarray(samples)
    n = samples.shape[0]
    if len(prompt_targets) != n:
        raise ValueError(f"score: {n} samples but {len(prompt_targets)} prompt targets")
    result: dict[str, float | int | None] = {}

    def put(key: str, hits: np.ndarray) -> None:
        result[f"{key}_accuracy"] = float(hits.mean()) if hits.size else None
        result[f"{key}_n"] = int(hits.size)

    labels = np.array([-1 if t.get("label") is None else int(t["label"])
                       for t in prompt_targets], np.int64)
    if predicted_labels is None:
        put("class", np.zeros(0, bool))
    else:
        predicted = np.asarray(predicted_labels).reshape(-1)
        if predicted.shape[0] != n:
            raise ValueError(f"score: {n} samples but {predicted.shape[0]} predicted labels")
        named = labels >= 0
        put("class", predicted[named] == labels[named])
    measured = measure(samples)
    for name in ATTRIBUTE_NAMES:
        wanted = np.array([-1 if t.get(name) is None else int(t[name])
                           for t in prompt_targets], np.int64)
        named = wanted >= 0
        if (named & (labels < 0)).any():
            raise ValueError(f"score: a prompt names {name} but no class; the {name} threshold "
                             "is the prompted class's median")
        got = attribute_values({k: v[named] for k, v in measured.items()}, labels[named],
                               thresholds)[name]
        put(name, got == wanted[named])
    return result


def default_prompts() -> tuple[str, ...]:
    """40 balanced prompts: every class x (dark, bright) x (small, large)."""
    brightness, size = ATTRIBUTES
    return tuple(f"a {b} {s} {c}" for c in CLASS_WORDS for b in brightness.words
                 for s in size.words)
