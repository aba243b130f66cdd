"""Sweep files: a base config, fixed overrides and axes expanded into named runs.

A sweep file is a Python module beside the experiments with a ``get_sweep() -> Sweep``:

    from launch.spec import Sweep, axis, product, zip_

    def get_sweep() -> Sweep:
        return Sweep(
            config="experiments/fashion_mnist.py",
            mode="eval",
            checkpoint="runs/fashion_mnist",
            axes=product(axis("sampler.name", ["ddim", "dpmpp_2m"]),
                         axis("guidance.scale", [0.0, 3.0])),
        )

``product`` is the Cartesian product (the first axis varies slowest, as in
``itertools.product``); ``zip_`` pairs axes of equal length element by element (e.g. a
sampler with its own step count). Both nest. Every run is one assignment
``{config key: value}``; its name is built from short labels and formatted values,
``sampler-ddim_scale-3``, made filesystem- and GCS-safe, short and unique.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import itertools
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

MODES = ("train", "sample", "eval", "summary")
GENERIC_NAMES = ("name", "type")
MAX_NAME_LEN = 96
_UNSAFE = re.compile(r"[^A-Za-z0-9.+=-]+")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


@dataclasses.dataclass(frozen=True)
class Axes:
    """An ordered list of assignments; each point is a tuple of (key, value) pairs.

    Attributes:
      keys: config keys assigned by every point, in order.
      points: one tuple of (key, value) pairs per run, in ``keys`` order.
      labels: short name used in run names, per key.
    """

    keys: tuple[str, ...]
    points: tuple[tuple[tuple[str, Any], ...], ...]
    labels: Mapping[str, str]

    def __len__(self) -> int:
        return len(self.points)


def axis(key: str, values: Sequence[Any], *, label: str | None = None) -> Axes:
    """One swept config field, e.g. ``axis("guidance.scale", [0.0, 1.5, 3.0])``.

    Args:
      key: dotted ConfigDict path, passed as ``--config.<key>=<value>``.
      values: non-empty sequence of distinct values (str, int, float, bool, None or tuples).
      label: short name in run names; defaults to the shortest unique suffix of ``key``.
    """
    if not isinstance(key, str) or not _KEY.match(key):
        raise ValueError(f"axis key {key!r} is not a dotted config path like 'sampler.name'")
    if isinstance(values, str):
        raise ValueError(f"axis {key!r} takes a list of values, got the string {values!r}")
    values = list(values)
    if not values:
        raise ValueError(f"axis {key!r} needs a non-empty list of values")
    if len({json.dumps(v, sort_keys=True, default=str) for v in values}) != len(values):
        raise ValueError(f"axis {key!r} has repeated values {values}; list each value once")
    if label is not None and not re.fullmatch(r"[A-Za-z0-9.+-]+", label):
        raise ValueError(f"axis label {label!r} may only use letters, digits and . + -")
    labels = {key: label} if label else {}
    return Axes(keys=(key,), points=tuple(((key, v),) for v in values), labels=labels)


def _merge_keys(parts: Sequence[Axes], combinator: str) -> tuple[tuple[str, ...], dict]:
    if not parts:
        raise ValueError(f"{combinator}() needs at least one axis")
    keys: list[str] = []
    labels: dict[str, str] = {}
    for part in parts:
        if not isinstance(part, Axes):
            raise ValueError(f"{combinator}() takes axis(...), product(...) or zip_(...), "
                             f"got {type(part).__name__}")
        for k in part.keys:
            if k in keys:
                raise ValueError(f"config key {k!r} is swept twice; list it in one axis only")
            keys.append(k)
        labels.update(part.labels)
    return tuple(keys), labels


def product(*parts: Axes) -> Axes:
    """Cartesian product of axes; the first one varies slowest."""
    keys, labels = _merge_keys(parts, "product")
    points = tuple(
        tuple(kv for point in combo for kv in point)
        for combo in itertools.product(*(p.points for p in parts))
    )
    return Axes(keys=keys, points=points, labels=labels)


def zip_(*parts: Axes) -> Axes:
    """Element-wise pairing of axes of equal length (e.g. sampler name with its step count)."""
    keys, labels = _merge_keys(parts, "zip_")
    lengths = [len(p) for p in parts]
    if len(set(lengths)) != 1:
        raise ValueError(f"zip_() needs axes of equal length, got lengths {lengths} "
                         f"for keys {[p.keys for p in parts]}")
    points = tuple(tuple(kv for point in combo for kv in point)
                   for combo in zip(*(p.points for p in parts)))
    return Axes(keys=keys, points=points, labels=labels)


@dataclasses.dataclass(frozen=True)
class Sweep:
    """What a sweep file returns.

    Attributes:
      config: experiment config path relative to the repo root, optionally ``path.py:variant``.
      axes: ``axis``/``product``/``zip_`` tree of swept config fields.
      mode: a ``diffjax.main`` mode or a tuple of modes run in order in each run's workdir
        (e.g. ``("train", "eval")``); a run is finished when all of them exit with 0.
      checkpoint: for sample/eval modes, a trained run's workdir (or checkpoint dir) read by
        every run, so an eval-only sweep reuses one trained model; not passed to train.
      overrides: config fields fixed for every run, ``{"eval.num_samples": 10000}``.
      name: the sweep's name (defaults to the sweep file's stem).
    """

    config: str
    axes: Axes
    mode: str | tuple[str, ...] = "train"
    checkpoint: str | None = None
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    name: str = ""

    def __post_init__(self):
        if not isinstance(self.axes, Axes):
            raise ValueError("Sweep.axes must be built with axis(), product() or zip_()")
        for m in self.modes:
            if m not in MODES:
                raise ValueError(f"Sweep mode {m!r} is not one of {MODES}")
        for k in self.overrides:
            if not _KEY.match(k):
                raise ValueError(f"override key {k!r} is not a dotted config path")
            if k in self.axes.keys:
                raise ValueError(f"{k!r} is both a fixed override and a swept axis; keep one")

    @property
    def modes(self) -> tuple[str, ...]:
        return (self.mode,) if isinstance(self.mode, str) else tuple(self.mode)


@dataclasses.dataclass(frozen=True)
class Run:
    """One expanded run: its unique name and the config values it sets.

    Attributes:
      name: filesystem-safe unique name, also the run's workdir under the sweep root.
      assignment: swept {config key: value}, in axis order.
      labels: {config key: short label} used in the name and in plots.
    """

    name: str
    assignment: Mapping[str, Any]
    labels: Mapping[str, str]


def format_value(value: Any) -> str:
    """Short, stable text of an axis value for run names (3.0 -> '3', 1e-4 -> '0.0001')."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isfinite(value) and value == int(value) and abs(value) < 1e15:
            return str(int(value))
        return format(value, "g")
    if isinstance(value, (tuple, list)):
        return "x".join(format_value(v) for v in value)
    if value is None:
        return "none"
    return str(value)


def override_text(value: Any) -> str:
    """The text after ``--config.key=`` that ml_collections parses back to ``value``."""
    if isinstance(value, str):
        return value
    if isinstance(value, (tuple, list)):
        return repr(tuple(value))
    return repr(value)


def default_labels(keys: Sequence[str]) -> dict[str, str]:
    """Short label per key: its shortest dotted suffix no other key shares, with a generic
    last part named by its section ('guidance.scale' -> 'scale', 'sampler.name' -> 'sampler')."""
    labels = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if all(not (o == suffix or o.endswith("." + suffix)) for o in keys if o != key):
                labels[key] = suffix
                break
        else:
            labels[key] = key
        if labels[key] in GENERIC_NAMES and len(parts) > 1:
            parent = parts[-2]
            if parent not in labels.values() and all(
                    o.split(".")[-1] != parent for o in keys if o != key):
                labels[key] = parent
    return labels


def _digest(assignment: Mapping[str, Any]) -> str:
    text = json.dumps(list(assignment.items()), sort_keys=False, default=repr)
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def _safe(text: str) -> str:
    return _UNSAFE.sub("_", text).strip("._") or "run"


def expand(sweep: Sweep) -> list[Run]:
    """Expands the axes into runs with readable, unique, filesystem-safe names.

    Names join ``label-value`` pairs with '_'. A name longer than MAX_NAME_LEN, or one that
    collides with another after sanitising, is cut and suffixed with 8 hex digits of a hash
    of its assignment, so names stay stable when the sweep grows.
    """
    labels = default_labels(sweep.axes.keys)
    labels.update(sweep.axes.labels)
    if len(set(labels.values())) != len(labels):
        raise ValueError(f"axis labels {labels} are not unique; pass label= to axis()")
    assignments = [dict(point) for point in sweep.axes.points]
    names = [_safe("_".join(f"{labels[k]}-{format_value(v)}" for k, v in a.items()))
             for a in assignments]
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    for i, (n, a) in enumerate(zip(names, assignments)):
        if counts[n] > 1 or len(n) > MAX_NAME_LEN:
            names[i] = f"{n[:MAX_NAME_LEN - 9]}-{_digest(a)}"
    if len(set(names)) != len(names):
        raise ValueError("run names are not unique even with hashes; check repeated points")
    return [Run(name=n, assignment=a, labels=labels) for n, a in zip(names, assignments)]


def load_sweep(path: str | Path) -> Sweep:
    """Imports a sweep file by path and returns its ``get_sweep()``, named after the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"sweep file {path} does not exist (give a path like "
                         "experiments/sweeps/fashion_mnist_samplers.py)")
    module_spec = importlib.util.spec_from_file_location(f"_sweep_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    get_sweep = getattr(module, "get_sweep", None)
    if not callable(get_sweep):
        raise ValueError(f"sweep file {path} must define get_sweep() -> launch.spec.Sweep")
    sweep = get_sweep()
    if not isinstance(sweep, Sweep):
        raise ValueError(f"{path}: get_sweep() returned {type(sweep).__name__}, not Sweep")
    if not sweep.name:
        sweep = dataclasses.replace(sweep, name=path.stem)
    return sweep
