"""PyTorch weight files as NumPy arrays, read without torch and without running their code.

``load`` tells the formats apart by their first bytes, not by their names:

* ``torch.save`` files (``.pt``, ``.pth``, ``.bin``, ``.ckpt``) of torch >= 1.6: a zip whose
  records sit in one folder: ``data.pkl`` (a pickle of the saved object), ``data/<key>`` (one
  storage's raw bytes), ``byteorder`` ("little"/"big"; older files lack it: little) and
  ``version``. The pickle rebuilds each tensor with ``torch._utils._rebuild_tensor_v2(storage,
  offset, size, stride, requires_grad, hooks[, metadata])``, or ``_rebuild_tensor_v3(...,
  hooks, dtype)`` for dtypes without a storage class (uint16/32/64, float8); a storage is the
  persistent id ``('storage', torch.<X>Storage, key, location, numel)``. Offsets, sizes and
  strides count elements.
* ``.safetensors``: 8-byte little-endian header size, a JSON header, the raw bytes. The
  ``safetensors`` package validates the header (offsets, sizes, overlaps); the bytes are then
  mapped here with ml_dtypes, because the package's own NumPy reader is not complete:
  BF16 failed in 0.5.3, and 0.8.0 still fails on float8 (it looks for numpy.float8_e5m2).

Safety: unpickling calls whatever globals a file names. Here each global goes through an
allow-list (the tensor and parameter rebuilders, storage classes and dtypes as inert markers,
OrderedDict, set, frozenset, bytearray, complex, and ``_codecs.encode`` for latin-1 bytes);
any other raises UnsafeCheckpointError before it is called. The allowed callables are bound
methods and builtin types that build immutable tuples or plain containers, so the pickle's
BUILD opcode cannot reach their state or ours. Arrays are made after unpickling, from
checked layouts: a stride reaching past its storage is an error, never a read.
"""

from __future__ import annotations

import collections
import io
import json
import math
import os
import pickle
import zipfile
import zlib
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np
import safetensors


class WeightFileError(ValueError):
    """A weight file is missing, corrupt or of a format not read here; one line says which."""


class UnsafeCheckpointError(WeightFileError):
    """A torch pickle names a global outside the allow-list; nothing in it was run."""


# dtype name (numpy's, else ml_dtypes') -> np.dtype; torch names its dtypes the same way.
_DTYPES = {name: np.dtype(getattr(ml_dtypes, name, name)) for name in (
    "float64 float32 float16 bfloat16 int64 int32 int16 int8 uint64 uint32 uint16 uint8 bool "
    "complex64 complex128 float8_e4m3fn float8_e5m2 float8_e4m3fnuz float8_e5m2fnuz").split()}
_TORCH_DTYPES = {f"torch.{name}": dtype for name, dtype in _DTYPES.items()}
_STORAGES = {f"torch.{kind}Storage": _DTYPES[name] for kind, name in {
    "Double": "float64", "Float": "float32", "Half": "float16", "BFloat16": "bfloat16",
    "Long": "int64", "Int": "int32", "Short": "int16", "Char": "int8", "Byte": "uint8",
    "Bool": "bool", "ComplexFloat": "complex64", "ComplexDouble": "complex128",
    "Untyped": "uint8", "storage.Untyped": "uint8"}.items()}
_SAFETENSORS = {code: _DTYPES[name] for code, name in {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
    "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32",
    "U16": "uint16", "U8": "uint8", "BOOL": "bool", "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz"}.items()}
_SCALARS = (str, bytes, bytearray, int, float, complex, bool, type(None))
_LEGACY_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[:-1]  # torch < 1.6


class _Name(str):
    """A torch storage class or dtype named by the pickle: a marker, never called."""

    __slots__ = ()


# Immutable, so a pickle's BUILD cannot change them. kind: a key of _STORAGES; key: the
# record data/<key>; numel: in elements of kind. dtype: v3's dtype _Name, None for the
# storage's; metadata: None or {"conj": bool, "neg": bool}. Checked when made into arrays.
_Storage = NamedTuple("_Storage", [("kind", str), ("key", str), ("numel", int)])
_Tensor = NamedTuple("_Tensor", [(field, Any) for field in (
    "storage", "offset", "shape", "stride", "dtype", "metadata")])


class _Unpickler(pickle.Unpickler):
    """data.pkl -> a tree of _Tensor, _Storage, _Name and plain containers; runs no code."""

    def __init__(self, data: bytes, source: str):
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self._source = source
        self._calls = {  # bound methods and builtin types: BUILD can set no attribute
            "torch._utils._rebuild_tensor_v2": self._rebuild_tensor_v2,
            "torch._utils._rebuild_tensor_v3": self._rebuild_tensor_v3,
            "torch._utils._rebuild_parameter": self._rebuild_parameter,
            "torch._utils._rebuild_parameter_with_state": self._rebuild_parameter,
            "collections.OrderedDict": collections.OrderedDict, "builtins.set": set,
            "builtins.frozenset": frozenset, "builtins.bytearray": bytearray,
            "builtins.complex": complex, "_codecs.encode": self._encode}

    def find_class(self, module: str, name: str) -> Any:
        module = "builtins" if module == "__builtin__" else module  # protocol 2's name for it
        full = f"{module}.{name}"
        if full in self._calls:
            return self._calls[full]
        if full in _STORAGES or full in _TORCH_DTYPES:
            return _Name(full)
        raise UnsafeCheckpointError(
            f"{self._source}: refused global {full!r}: only tensors, storages and plain "
            "containers are loaded (nothing in the file was run); if you trust the file, "
            "re-save just its tensors with torch: torch.save(ckpt['state_dict'], 'w.pt')")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _Name) and pid[1] in _STORAGES
                and type(pid[2]) is str and type(pid[4]) is int and pid[4] >= 0):
            raise WeightFileError(f"{self._source}: bad storage id {str(pid)[:80]!r}")
        return _Storage(str(pid[1]), pid[2], pid[4])

    def _rebuild_tensor_v2(self, storage, offset, size, stride, requires_grad, hooks,
                           metadata=None) -> _Tensor:
        return _Tensor(storage, offset, size, stride, None, metadata)

    def _rebuild_tensor_v3(self, storage, offset, size, stride, requires_grad, hooks, dtype,
                           metadata=None) -> _Tensor:
        return _Tensor(storage, offset, size, stride, dtype, metadata)

    def _rebuild_parameter(self, data, requires_grad, hooks, state=None) -> _Tensor:
        if not isinstance(data, _Tensor):
            raise WeightFileError(f"{self._source}: a parameter without a tensor")
        return data

    def _encode(self, text: Any, encoding: Any) -> bytes:
        """Protocol 2 writes bytes as ``_codecs.encode(text, 'latin1')``; no other codec."""
        if type(text) is not str or encoding not in ("latin1", "latin-1"):
            raise UnsafeCheckpointError(f"{self._source}: refused _codecs.encode({encoding!r})")
        return text.encode("latin1")


class _Arrays:
    """Turns the unpickled tree into dicts, lists and np.ndarray leaves, reading storages."""

    def __init__(self, zf: zipfile.ZipFile, prefix: str, source: str, big_endian: bool):
        self._zf, self._prefix, self._source, self._big = zf, prefix, source, big_endian
        self._buffers: dict[str, np.ndarray] = {}
        self._done: dict[int, np.ndarray] = {}  # id(_Tensor) -> its array: ties stay tied

    def _error(self, where: str, what: str) -> WeightFileError:
        return WeightFileError(f"{self._source}: at {where or 'the top'}: {what}")

    def tree(self, obj: Any, where: str = "") -> Any:
        if isinstance(obj, _Tensor):
            if id(obj) not in self._done:
                self._done[id(obj)] = self._array(obj, where)
            return self._done[id(obj)]
        if isinstance(obj, _Storage):
            return self._array(_Tensor(obj, 0, (obj.numel,), (1,), None, None), where)
        if isinstance(obj, dict):
            return {self._scalar(k, where): self.tree(v, f"{where}/{k}".lstrip("/"))
                    for k, v in obj.items()}
        if type(obj) in (list, tuple):
            return type(obj)(self.tree(v, f"{where}[{i}]") for i, v in enumerate(obj))
        if type(obj) in (set, frozenset):
            return type(obj)(self._scalar(v, where) for v in obj)
        return self._scalar(obj, where)

    def _scalar(self, obj: Any, where: str) -> Any:
        if type(obj) in _SCALARS or isinstance(obj, _Name):
            return str(obj) if isinstance(obj, _Name) else obj
        raise self._error(where, f"unexpected {type(obj).__name__} in the pickle")

    def _array(self, t: _Tensor, where: str) -> np.ndarray:
        """[*t.shape] array: t's storage seen through its offset and strides, as t's dtype."""
        if not isinstance(t.storage, _Storage):
            raise self._error(where, "a tensor without a storage")
        if t.dtype is not None and not (isinstance(t.dtype, _Name) and t.dtype in _TORCH_DTYPES):
            raise self._error(where, f"unsupported tensor dtype {str(t.dtype)[:40]!r}")
        dtype = _STORAGES[t.storage.kind] if t.dtype is None else _TORCH_DTYPES[t.dtype]
        flat = self._storage(t.storage, where)
        if flat.nbytes % dtype.itemsize:
            raise self._error(where, f"storage bytes {flat.nbytes} are not {dtype} items")
        flat = flat.view(dtype)
        if not (_counts(t.shape) and _counts(t.stride) and len(t.shape) == len(t.stride)
                and type(t.offset) is int and t.offset >= 0):
            raise self._error(where, f"bad tensor layout (offset {t.offset!r}, size "
                              f"{str(t.shape)[:60]}, stride {str(t.stride)[:60]})")
        if math.prod(t.shape) and t.offset + sum(
                (d - 1) * s for d, s in zip(t.shape, t.stride)) >= flat.size:
            raise self._error(where, f"offset {t.offset} and strides {tuple(t.stride)} reach "
                              f"past the {flat.size} items of storage data/{t.storage.key}")
        arr = _strided(flat, t.offset, tuple(t.shape), tuple(t.stride))
        arr = arr.byteswap() if self._big else arr
        if t.metadata and (type(t.metadata) is not dict or set(t.metadata) - {"conj", "neg"}):
            raise self._error(where, f"unsupported tensor metadata {str(t.metadata)[:60]}")
        # torch saves a conjugate or negative view as its base plus a bit: apply the bit.
        arr = np.conj(arr) if t.metadata and t.metadata.get("conj") else arr
        return np.negative(arr) if t.metadata and t.metadata.get("neg") else arr

    def _storage(self, s: _Storage, where: str) -> np.ndarray:
        """[nbytes] uint8: record data/<key>, read once, its size checked against the pickle."""
        if s.key not in self._buffers:
            name = f"{self._prefix}data/{s.key}"
            try:
                info = self._zf.getinfo(name)
            except KeyError:
                raise self._error(where, f"missing storage record {name}") from None
            expected = s.numel * _STORAGES[s.kind].itemsize
            if info.file_size != expected:
                raise self._error(where, f"storage record {name} holds {info.file_size} bytes, "
                                  f"the pickle says {expected}")
            buf = np.empty(expected, np.uint8)
            with self._zf.open(info) as f:
                if f.readinto(memoryview(buf)) != expected:
                    raise self._error(where, f"storage record {name} is truncated")
            self._buffers[s.key] = buf
        return self._buffers[s.key]


def _counts(xs: Any) -> bool:
    """Whether xs is a tuple or list of non-negative ints (a size or a stride)."""
    return type(xs) in (tuple, list) and all(type(x) is int and x >= 0 for x in xs)


def _strided(flat: np.ndarray, offset: int, shape: tuple, stride: tuple) -> np.ndarray:
    """[*shape] array of flat[offset + sum(index * stride)]. It shares flat's memory only
    when it is all of flat in C order (a whole tensor); any other view is copied."""
    size = math.prod(shape)
    if size == 0:
        return np.zeros(shape, flat.dtype)
    c_order = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    if all(s == c or d == 1 for d, s, c in zip(shape, stride, c_order)):
        view = flat[offset:offset + size].reshape(shape)
        return view if size == flat.size else view.copy()
    steps = tuple(s * flat.itemsize for s in stride)
    return np.lib.stride_tricks.as_strided(flat[offset:], shape, steps, writeable=False).copy()


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"


def _unpickle(data: bytes, source: str) -> Any:
    try:
        return _Unpickler(data, source).load()
    except WeightFileError:
        raise
    except Exception as e:  # a corrupt pickle fails in many ways, all meaning the same
        raise WeightFileError(f"{source}: corrupt data.pkl ({_one_line(e)})") from e


def _read_torch_zip(path: str) -> Any:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
            if not pkls and any(n.endswith("/constants.pkl") for n in names):
                raise WeightFileError(f"{path}: a TorchScript archive (torch.jit.save), not a "
                                      "torch.save file; torch.save the model's state_dict()")
            if not pkls:
                raise WeightFileError(f"{path}: a zip without data.pkl, not a torch.save file")
            prefix = pkls[0][:-len("data.pkl")]  # "archive/", or the file's stem before 2.0
            obj = _unpickle(zf.read(pkls[0]), path)
            order = (zf.read(prefix + "byteorder").decode("ascii", "replace")
                     if prefix + "byteorder" in names else "little")
            if order not in ("little", "big"):
                raise WeightFileError(f"{path}: unknown byteorder record {order[:20]!r}")
            return _Arrays(zf, prefix, path, order == "big").tree(obj)
    except WeightFileError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError,
            RecursionError) as e:
        raise WeightFileError(f"{path}: corrupt or truncated torch.save zip ({_one_line(e)})"
                              ) from e


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    """{name: array}: safetensors checks the header against the file, NumPy maps the bytes."""
    try:
        with safetensors.safe_open(path, framework="numpy"):
            pass
        with open(path, "rb") as f:
            start = 8 + int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(start - 8))
        data = np.memmap(path, np.uint8, "r", offset=start) if os.path.getsize(path) > start \
            else np.zeros(0, np.uint8)
    except Exception as e:  # safetensors raises its own SafetensorError
        raise WeightFileError(f"{path}: unreadable safetensors file ({_one_line(e)})") from e
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in _SAFETENSORS:
            raise WeightFileError(f"{path}: tensor {name!r} has dtype {entry['dtype']!r}, "
                                  f"not one of {', '.join(_SAFETENSORS)}")
        begin, end = entry["data_offsets"]
        dtype = _SAFETENSORS[entry["dtype"]]
        out[name] = np.array(data[begin:end].view(dtype).reshape(entry["shape"]))
    return out


def load(path: str | os.PathLike) -> Any:
    """The object a weight file holds, with np.ndarray leaves for tensors and storages.

    A ``torch.save`` zip gives what was saved: dicts (OrderedDicts become dicts), lists,
    tuples, numbers, strings, bytes; a safetensors file gives ``{name: array}``. Raises
    WeightFileError (one line naming the file) for a missing, corrupt or unknown file, and
    UnsafeCheckpointError for a pickle naming anything but tensors and containers.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        what = "a directory" if os.path.isdir(path) else "no such file"
        raise WeightFileError(f"{path}: {what}, not a weight file")
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        raise WeightFileError(f"{path}: cannot be read ({_one_line(e)})") from e
    if head.startswith(b"PK\x03\x04"):
        return _read_torch_zip(path)
    if len(head) > 9 and head[8:9] == b"{":  # a safetensors header size, then JSON
        return _read_safetensors(path)
    if head.startswith(_LEGACY_MAGIC) or head[257:262] == b"ustar":
        raise WeightFileError(
            f"{path}: PyTorch's legacy format (torch < 1.6), not read here; re-save it with a "
            "recent torch: torch.save(torch.load(path, weights_only=True), 'new.pt')")
    raise WeightFileError(f"{path}: neither a torch.save zip nor a safetensors file "
                          f"({'empty' if not head else f'starts with {head[:8]!r}'})")


def flatten(tree: dict, sep: str = ".") -> dict[str, Any]:
    """{'a': {'b': x}, 'c': y} -> {'a.b': x, 'c': y}; lists, tuples and arrays are leaves."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update({f"{key}{sep}{k}": v for k, v in flatten(value, sep).items()})
        else:
            out[str(key)] = value
    return out


def _is_tensor_dict(obj: Any) -> bool:
    return (isinstance(obj, dict) and bool(obj)
            and all(isinstance(v, np.ndarray) for v in flatten(obj).values()))


def state_dict(obj: Any, key: str | None = None, source: str = "checkpoint"
               ) -> dict[str, np.ndarray]:
    """The tensor dict of a loaded checkpoint, flat: ``{'blocks.0.attn.qkv.weight': array}``.

    key: the top-level entry holding it (``"ema"`` of ``{"model": sd, "ema": sd, "epoch": 3}``).
    Without one: obj itself when each value is an array, else its only entry that is a dict
    of arrays; several such entries are an error that lists them. Nested dicts are joined
    with ".". source: the file, for error messages.
    """
    if not isinstance(obj, dict):
        raise WeightFileError(f"{source}: holds a {type(obj).__name__}, not a dict of tensors")
    entries = f"entries: {_names(obj)}"
    if key is not None:
        if not _is_tensor_dict(obj.get(key)):
            what = "is not a dict of tensors" if key in obj else "does not exist"
            raise WeightFileError(f"{source}: entry {key!r} {what} ({entries})")
        return flatten(obj[key])
    if obj and all(isinstance(v, np.ndarray) for v in obj.values()):
        return dict(obj)
    found = [k for k, v in obj.items() if _is_tensor_dict(v)]
    if len(found) == 1:
        return flatten(obj[found[0]])
    what = f"several dicts of tensors ({_names(found)})" if found else "no dict of tensors"
    raise WeightFileError(f"{source}: holds {what}; pick one with key= ({entries})")


def _names(keys) -> str:
    keys = [str(k) for k in keys]
    return ", ".join(keys[:12]) + (", ..." if len(keys) > 12 else "")


def flax_layout(array: np.ndarray, ndim: int) -> np.ndarray | None:
    """A PyTorch tensor in the layout of a Flax parameter of rank ``ndim``, None if impossible:
    a conv kernel [O, I, kh, kw] -> [kh, kw, I, O], a Linear weight [O, I] (or a 1x1 conv's
    [O, I, 1, 1]) -> [I, O], anything else unchanged when the ranks agree."""
    if ndim == 4:
        return array.transpose(2, 3, 1, 0) if array.ndim == 4 else None
    if ndim == 2:
        if array.ndim < 2 or any(d != 1 for d in array.shape[2:]):
            return None
        return array.reshape(array.shape[:2]).T
    return array if array.ndim == ndim else None


def load_state_dict(path: str | os.PathLike, key: str | None = None) -> dict[str, np.ndarray]:
    """``state_dict(load(path), key)``: a weight file's flat ``{name: array}``."""
    return state_dict(load(path), key, source=os.fspath(path))
