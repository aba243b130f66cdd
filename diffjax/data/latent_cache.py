"""A latent cache: a dataset encoded once by an autoencoder, read back like any other source.

Layout of a cache directory (local path; written by ``--mode encode``)::

    cache.json                 identity (autoencoder digest and step, data, latent shape),
                               shard size, status "partial" | "complete"; when complete also
                               every shard's rows and SHA-256 and the latents' statistics
    shard-00000.npy            float32 [rows, 2, h, w, c]: posterior mean and std
    shard-00000.labels.npy     int32 [rows]
    shard-00000.json           the shard's rows, SHA-256 of its two files and its sums
                               (written last, by rename: its presence marks the shard done)

Rows are the source's examples in stored order, shard k holding [k * S, (k + 1) * S). Every
file is written under a temporary name and renamed, so a process killed at any moment leaves
complete shards and at most some temporary files; :func:`write` skips the shards already
done (after checking their hashes) and finishes the rest, giving the same bytes as an
uninterrupted run (encoding is deterministic: the posterior mean and std).

The statistics (float64 sums of z and z^2 over every element, z ~ q(z | x) in expectation:
E[z^2] = mean^2 + std^2) give the latents' std; ``1 / std`` is the measured scale factor
(Stable Diffusion's 0.18215 was measured this way on its VAE).

:class:`LatentCacheSource` opens a complete cache after checking it (identity, shapes, each
file's size and hash): every problem is one :class:`DataError` line saying how to fix it.
Its ``read_batch`` returns ``{"mean", "std", "label"}`` (``yields_arrays``), which the
pipeline passes through unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from diffjax.data.errors import DataError

META = "cache.json"
FORMAT = 1


def _shard_names(k: int) -> tuple[str, str, str]:
    base = f"shard-{k:05d}"
    return f"{base}.npy", f"{base}.labels.npy", f"{base}.json"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path: str, write: Callable[[Any], None]) -> None:
    """``write(file)`` into ``path`` via a temporary file, fsync and rename."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: str, obj: dict) -> None:
    _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1, sort_keys=True).encode()))


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{what} {path} cannot be read ({type(e).__name__}: {e}); delete the "
                        "cache directory and rerun --mode encode") from e


def _check_local(path: str) -> None:
    if "://" in path:
        raise DataError(f"data.latent.cache={path!r}: latent caches are read by memory map "
                        "and must be on a local (or mounted) file system")


def num_shards(rows: int, shard_size: int) -> int:
    return -(-rows // shard_size)


def _check_identity(path: str, meta: dict, identity: dict) -> None:
    """DataError naming the first field where a cache's identity differs from ``identity``."""
    for key, want in identity.items():
        got = meta.get("identity", {}).get(key)
        if got != want:
            hint = {"autoencoder_digest": "was made by another autoencoder (or another "
                                          "checkpoint of it)",
                    "autoencoder_step": "was made by another checkpoint of the autoencoder",
                    "latent_shape": "holds latents of another shape"}.get(
                key, "was made from other data")
            raise DataError(
                f"latent cache {path} {hint}: {key} is {got!r} there, {want!r} here; point "
                "data.latent.cache at a new directory and run --mode encode (or delete it)")


def write(path: str, identity: dict, num_rows: int, shard_size: int,
          encode_rows: Callable[[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]],
          *, write_files: bool = True,
          progress: Callable[[Iterable[int], int], Iterable[int]] = lambda it, n: it) -> dict:
    """Encodes rows [0, num_rows) into the cache at ``path``; returns its complete meta.

    identity: what the cache depends on (JSON-able; compared with an existing cache's, any
    difference is a DataError before anything is written); encode_rows(start, stop) ->
    (mean, std [n, h, w, c] float32, labels [n] int32) of those rows; write_files: False on
    processes other than the writer (they still run ``encode_rows``: every process takes
    part in the mesh's programs); progress wraps the iteration over shard numbers.
    """
    _check_local(path)
    if shard_size < 1:
        raise DataError(f"data.latent.shard_size={shard_size} must be >= 1")
    meta_path = os.path.join(path, META)
    head = {"format": FORMAT, "identity": identity, "num_rows": num_rows,
            "shard_size": shard_size, "status": "partial"}
    if os.path.exists(meta_path):
        old = _read_json(meta_path, "latent cache metadata")
        _check_identity(path, old, identity)
        if (old.get("num_rows"), old.get("shard_size")) != (num_rows, shard_size):
            raise DataError(
                f"latent cache {path} has {old.get('num_rows')} rows in shards of "
                f"{old.get('shard_size')}, this run {num_rows} in shards of {shard_size}; use "
                "another data.latent.cache or the same data.latent.shard_size")
    elif write_files:
        os.makedirs(path, exist_ok=True)
        _write_json(meta_path, head)
    if write_files:  # what a killed run was writing
        for name in os.listdir(path):
            if ".tmp" in name:
                os.remove(os.path.join(path, name))
    shards = []
    for k in progress(range(num_shards(num_rows, shard_size)), num_shards(num_rows, shard_size)):
        start, stop = k * shard_size, min((k + 1) * shard_size, num_rows)
        done = _done_shard(path, k, stop - start) if write_files else None
        if done is None:
            done = _encode_shard(path, k, start, stop, encode_rows, write_files)
        shards.append(done)
    if not write_files:
        return {}
    total = sum(s["count"] for s in shards)
    mean = sum(s["sum"] for s in shards) / total
    var = max(sum(s["sumsq"] for s in shards) / total - mean**2, 0.0)
    meta = {**head, "status": "complete", "shards": shards, "latent_mean": mean,
            "latent_std": var**0.5,
            "measured_scale_factor": 1.0 / var**0.5 if var > 0 else 0.0}
    _write_json(meta_path, meta)
    return meta


def _done_shard(path: str, k: int, rows: int) -> dict | None:
    """The record of shard k if it is complete and intact, else None (it is redone)."""
    data, labels, record = (os.path.join(path, n) for n in _shard_names(k))
    if not os.path.exists(record):
        return None
    try:
        with open(record) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    ok = rec.get("rows") == rows and all(
        os.path.exists(p) and _sha256(p) == rec["sha256"][i]
        for i, p in enumerate((data, labels)))
    return rec if ok else None


def _encode_shard(path, k, start, stop, encode_rows, write_files) -> dict | None:
    mean, std, labels = encode_rows(start, stop)
    if not write_files:
        return None
    latents = np.stack([np.asarray(mean, np.float32), np.asarray(std, np.float32)], axis=1)
    labels = np.asarray(labels, np.int32)
    names = _shard_names(k)
    data_path, labels_path, record_path = (os.path.join(path, n) for n in names)
    _atomic_write(data_path, lambda f: np.save(f, latents))
    _atomic_write(labels_path, lambda f: np.save(f, labels))
    m64, s64 = latents[:, 0].astype(np.float64), latents[:, 1].astype(np.float64)
    rec = {"rows": stop - start, "files": list(names[:2]),
           "sha256": [_sha256(data_path), _sha256(labels_path)],
           "count": int(m64.size), "sum": float(m64.sum()),
           "sumsq": float(np.sum(m64**2 + s64**2))}
    _write_json(record_path, rec)
    return rec


def read_meta(path: str) -> dict:
    """The metadata of a cache (DataError when missing or unreadable; any status)."""
    _check_local(path)
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
        raise DataError(f"no latent cache at {path} ({META} missing); make it with "
                        "python -m diffjax.main --config CONFIG --mode encode")
    return _read_json(meta_path, "latent cache metadata")


class LatentCacheSource:
    """A complete latent cache as a random-access source of {"mean", "std", "label"}.

    identity: what the caller expects (see :func:`write`); latent_shape: (h, w, c) the model
    takes. Opening checks the metadata, every shard's header, size and SHA-256
    (``verify=True``); the shards are then memory-mapped on first read (per process, so the
    source pickles into grain workers without its maps)."""

    yields_arrays = True
    name = "latent_cache"

    def __init__(self, path: str, identity: dict, *, verify: bool = True):
        meta = read_meta(path)
        if meta.get("format") != FORMAT:
            raise DataError(f"latent cache {path} has format {meta.get('format')!r}, this "
                            f"diffjax reads {FORMAT}; re-encode it with --mode encode")
        _check_identity(path, meta, identity)
        if meta.get("status") != "complete":
            done = sum(os.path.exists(os.path.join(path, _shard_names(k)[2]))
                       for k in range(num_shards(meta["num_rows"], meta["shard_size"])))
            raise DataError(
                f"latent cache {path} is incomplete ({done} of "
                f"{num_shards(meta['num_rows'], meta['shard_size'])} shards): an encode was "
                "interrupted; rerun the same --mode encode command to finish it")
        self.path, self.meta = path, meta
        self.latent_shape = tuple(identity.get("latent_shape") or meta["identity"]["latent_shape"])
        self._rows = [int(s["rows"]) for s in meta["shards"]]
        self._starts = np.cumsum([0] + self._rows)
        if self._starts[-1] != meta["num_rows"]:
            raise DataError(f"latent cache {path} is corrupt: its shards hold "
                            f"{self._starts[-1]} rows, its metadata {meta['num_rows']}; "
                            "delete it and rerun --mode encode")
        for k, rec in enumerate(meta["shards"]):
            self._check_shard(k, rec, verify)
        self._maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _check_shard(self, k: int, rec: dict, verify: bool) -> None:
        data, labels, _ = (os.path.join(self.path, n) for n in _shard_names(k))
        shapes = ((rec["rows"], 2, *self.latent_shape), (rec["rows"],))
        for i, (p, shape, dtype) in enumerate(zip((data, labels), shapes,
                                                  (np.float32, np.int32))):
            fix = "delete it and rerun --mode encode to rebuild the shard"
            if not os.path.isfile(p):
                raise DataError(f"latent cache shard {p} is missing; {fix}")
            try:
                arr = np.load(p, mmap_mode="r")
            except (OSError, ValueError) as e:  # bad header, truncated past the header
                raise DataError(f"latent cache shard {p} is truncated or corrupt ({e}); "
                                f"{fix}") from e
            if arr.shape != shape or arr.dtype != dtype:
                raise DataError(f"latent cache shard {p} holds {arr.dtype}{list(arr.shape)}, "
                                f"expected {np.dtype(dtype)}{list(shape)}; {fix}")
            del arr
            if verify and _sha256(p) != rec["sha256"][i]:
                raise DataError(f"latent cache shard {p} is corrupt (SHA-256 differs from "
                                f"{META}); {fix}")

    def __getstate__(self):
        return {**self.__dict__, "_maps": {}}

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.latent_shape

    @property
    def num_classes(self) -> int:
        return int(self.meta["identity"].get("num_classes", 0))

    def _shard(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k not in self._maps:
            data, labels, _ = (os.path.join(self.path, n) for n in _shard_names(k))
            self._maps[k] = (np.load(data, mmap_mode="r"), np.load(labels, mmap_mode="r"))
        return self._maps[k]

    def read_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, np.int64)
        shards = np.searchsorted(self._starts, indices, side="right") - 1
        out = np.empty((len(indices), 2, *self.latent_shape), np.float32)
        labels = np.empty(len(indices), np.int32)
        for k in np.unique(shards):
            rows = shards == k
            lat, lab = self._shard(int(k))
            local = indices[rows] - self._starts[k]
            out[rows], labels[rows] = lat[local], lab[local]
        return {"mean": out[:, 0], "std": out[:, 1], "label": labels}
