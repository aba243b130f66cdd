"""diffjax.convert.torch_file: torch.save zips and safetensors read without torch, safely.

The .pt files here are written by hand: a zip laid out as torch.save lays it out, whose
data.pkl comes from a small protocol-2 emitter producing the opcodes and globals torch emits
(GLOBAL torch._utils._rebuild_tensor_v2, a BINPERSID storage id, REDUCE, ...). The last tests
compare with real torch.save where torch is installed (the `reference` extra).
"""

from __future__ import annotations

import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from diffjax.convert import torch_file
from diffjax.convert.torch_file import UnsafeCheckpointError, WeightFileError

# ------------------------------------------------------------------------------------------
# A protocol-2 pickle emitter speaking torch's dialect.
# ------------------------------------------------------------------------------------------


class Global:
    """GLOBAL 'module name' in the pickle."""

    def __init__(self, full: str):
        self.module, self.name = full.rsplit(".", 1)


class Reduce:
    """func(*args) in the pickle (func a Global), then BUILD state if given."""

    def __init__(self, func, args, state=None):
        self.func, self.args, self.state = func, tuple(args), state


class Storage:
    """A storage: the persistent id ('storage', torch.<kind>, key, 'cpu', numel)."""

    def __init__(self, kind: str, key: str, data: np.ndarray):
        self.kind, self.key, self.data = kind, key, np.ascontiguousarray(data)


class Tensor:
    """_rebuild_tensor_v2 (or v3 with dtype) of a storage through offset, shape, stride."""

    def __init__(self, storage, offset, shape, stride, dtype=None, metadata=None):
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride
        self.dtype, self.metadata = dtype, metadata

    def reduce(self) -> Reduce:
        hooks = Reduce(Global("collections.OrderedDict"), ())
        args = [self.storage, self.offset, tuple(self.shape), tuple(self.stride), False, hooks]
        if self.dtype is not None:
            return Reduce(Global("torch._utils._rebuild_tensor_v3"),
                          args + [Global(f"torch.{self.dtype}")])
        return Reduce(Global("torch._utils._rebuild_tensor_v2"),
                      args + ([self.metadata] if self.metadata else []))


def _emit(obj, out: bytearray, memo: dict | None = None) -> None:
    """Appends obj's opcodes; a Tensor seen before is fetched from the memo, as pickle does."""
    memo = {} if memo is None else memo
    if isinstance(obj, Tensor):
        if id(obj) in memo:
            out += pickle.BINGET + bytes([memo[id(obj)]])
        else:
            _emit(obj.reduce(), out, memo)
            memo[id(obj)] = len(memo)
            out += pickle.BINPUT + bytes([memo[id(obj)]])
        return
    if isinstance(obj, Storage):
        pid = ("storage", Global(f"torch.{obj.kind}"), obj.key, "cpu",
               obj.data.size if obj.kind != "storage.UntypedStorage" else obj.data.nbytes)
        _emit(pid, out, memo)
        out += pickle.BINPERSID
    elif isinstance(obj, Global):
        out += pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode()
    elif isinstance(obj, Reduce):
        _emit(obj.func, out, memo)
        _emit(obj.args, out, memo)
        out += pickle.REDUCE
        if obj.state is not None:
            _emit(obj.state, out, memo)
            out += pickle.BUILD
    elif isinstance(obj, dict):
        out += pickle.EMPTY_DICT
        if obj:
            out += pickle.MARK
            for k, v in obj.items():
                _emit(k, out, memo)
                _emit(v, out, memo)
            out += pickle.SETITEMS
    elif isinstance(obj, list):
        out += pickle.EMPTY_LIST + pickle.MARK
        for v in obj:
            _emit(v, out, memo)
        out += pickle.APPENDS
    elif isinstance(obj, tuple):
        out += pickle.MARK
        for v in obj:
            _emit(v, out, memo)
        out += pickle.TUPLE
    elif obj is True or obj is False or obj is None:
        out += {True: pickle.NEWTRUE, False: pickle.NEWFALSE, None: pickle.NONE}[obj]
    elif isinstance(obj, int):
        out += pickle.BININT + struct.pack("<i", obj)
    elif isinstance(obj, float):
        out += pickle.BINFLOAT + struct.pack(">d", obj)
    elif isinstance(obj, str):
        data = obj.encode()
        out += pickle.BINUNICODE + struct.pack("<I", len(data)) + data
    elif isinstance(obj, bytes):  # how protocol 2 writes bytes
        _emit(Reduce(Global("_codecs.encode"), (obj.decode("latin1"), "latin1")), out, memo)
    else:
        raise TypeError(type(obj))


def dumps(obj) -> bytes:
    out = bytearray(pickle.PROTO + b"\x02")
    _emit(obj, out)
    return bytes(out + pickle.STOP)


def _storages(obj, found: dict) -> dict:
    if isinstance(obj, Tensor):
        found[obj.storage.key] = obj.storage
    elif isinstance(obj, Storage):
        found[obj.key] = obj
    elif isinstance(obj, Reduce):
        _storages(obj.args, found)
    elif isinstance(obj, dict):
        for v in obj.values():
            _storages(v, found)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _storages(v, found)
    return found


def write_pt(path, obj=None, *, pkl: bytes | None = None, prefix="archive",
             byteorder: str | None = "little", skip=()) -> str:
    """A zip laid out as torch.save writes it: data.pkl, byteorder, data/<key>, version."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{prefix}/data.pkl", pkl if pkl is not None else dumps(obj))
        if byteorder is not None:
            zf.writestr(f"{prefix}/byteorder", byteorder)
        for key, s in _storages(obj, {}).items():
            if key not in skip:
                data = s.data.byteswap() if byteorder == "big" else s.data
                zf.writestr(f"{prefix}/data/{key}", data.tobytes())
        zf.writestr(f"{prefix}/version", "3\n")
    return str(path)


STORAGE_KINDS = {
    np.float16: "HalfStorage", ml_dtypes.bfloat16: "BFloat16Storage",
    np.float32: "FloatStorage", np.float64: "DoubleStorage", np.int8: "CharStorage",
    np.int16: "ShortStorage", np.int32: "IntStorage", np.int64: "LongStorage",
    np.uint8: "ByteStorage", np.bool_: "BoolStorage", np.complex64: "ComplexFloatStorage",
}


def tensor(array: np.ndarray, key: str) -> Tensor:
    """A whole, contiguous tensor of its own storage."""
    kind = STORAGE_KINDS[array.dtype.type]
    strides = tuple(s // array.itemsize for s in array.strides)
    return Tensor(Storage(kind, key, array.reshape(-1)), 0, array.shape, strides)


def _random(dtype, shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == np.bool_:
        return rng.random(shape) > 0.5
    if np.issubdtype(np.dtype(dtype), np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    if dtype == np.complex64:
        return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(dtype)
    return rng.normal(size=shape).astype(dtype)


def assert_one_line(error: pytest.ExceptionInfo, path) -> str:
    text = str(error.value)
    assert "\n" not in text and str(path) in text, text
    return text


# ------------------------------------------------------------------------------------------
# Round trips
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(STORAGE_KINDS), ids=lambda d: np.dtype(d).name)
def test_every_dtype_round_trips_exactly(tmp_path, dtype):
    want = _random(dtype, (3, 5))
    path = write_pt(tmp_path / "x.pt", {"w": tensor(want, "0")})
    got = torch_file.load_state_dict(path)["w"]
    assert got.dtype == np.dtype(dtype) and got.shape == (3, 5)
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))  # bit-exact


def test_views_with_offsets_and_strides_share_one_storage(tmp_path):
    base = np.arange(24, dtype=np.float32)
    s = Storage("FloatStorage", "0", base)
    obj = {
        "whole": Tensor(s, 0, (4, 6), (6, 1)),
        "rows": Tensor(s, 6, (2, 6), (6, 1)),  # contiguous, offset
        "block": Tensor(s, 7, (3, 2), (6, 2)),  # offset and non-contiguous strides
        "transposed": Tensor(s, 0, (6, 4), (1, 6)),
        "broadcast": Tensor(s, 5, (3, 4), (0, 1)),  # an expand()ed view
        "scalar": Tensor(s, 23, (), ()),
        "empty": Tensor(s, 0, (0, 6), (6, 1)),
    }
    path = write_pt(tmp_path / "views.pt", obj)
    with zipfile.ZipFile(path) as zf:
        assert [n for n in zf.namelist() if "/data/" in n] == ["archive/data/0"]
    got = torch_file.load_state_dict(path)
    grid = base.reshape(4, 6)
    np.testing.assert_array_equal(got["whole"], grid)
    np.testing.assert_array_equal(got["rows"], grid[1:3])
    np.testing.assert_array_equal(got["block"], grid[1:, 1::2][:, :2])
    np.testing.assert_array_equal(got["transposed"], grid.T)
    np.testing.assert_array_equal(got["broadcast"], np.broadcast_to(base[5:9], (3, 4)))
    assert got["scalar"].shape == () and got["scalar"] == 23
    assert got["empty"].shape == (0, 6)
    got["rows"][0, 0] = got["block"][0, 0] = -1  # partial views are copies
    assert got["whole"][1, 0] == 6 and got["whole"][1, 1] == 7


def test_a_tensor_pickled_twice_is_one_array(tmp_path):
    w = tensor(np.ones((2, 2), np.float32), "0")
    got = torch_file.load(write_pt(tmp_path / "tied.pt", {"emb": w, "head": w}))
    assert got["emb"] is got["head"]


def test_nested_checkpoint_comes_back_nested_and_state_dict_picks(tmp_path):
    model = {"conv.weight": tensor(_random(np.float32, (4, 3, 3, 3)), "0"),
             "conv.bias": tensor(_random(np.float32, (4,), 1), "1")}
    ema = {"conv.weight": tensor(_random(np.float32, (4, 3, 3, 3), 2), "2")}
    obj = {"model": model, "ema": ema, "epoch": 3, "lr": 1e-4, "name": "adm",
           "steps": [1, 2], "blob": b"\x00\xffraw", "flag": None,
           # protocol 2 names builtins __builtin__
           "tags": Reduce(Global("__builtin__.set"), ([1, "a"],)),
           "z": Reduce(Global("__builtin__.complex"), (1.0, 2.0)),
           "buf": Reduce(Global("__builtin__.bytearray"), ("ab", "latin-1"))}
    path = write_pt(tmp_path / "ckpt.pt", obj)
    got = torch_file.load(path)
    assert got["epoch"] == 3 and got["lr"] == 1e-4 and got["name"] == "adm"
    assert got["steps"] == [1, 2] and got["blob"] == b"\x00\xffraw" and got["flag"] is None
    assert got["tags"] == {1, "a"} and got["z"] == 1 + 2j and got["buf"] == bytearray(b"ab")
    assert isinstance(got["model"]["conv.bias"], np.ndarray)
    np.testing.assert_array_equal(got["ema"]["conv.weight"], ema["conv.weight"].storage.data
                                  .reshape(4, 3, 3, 3))
    assert set(torch_file.load_state_dict(path, key="model")) == {"conv.weight", "conv.bias"}
    with pytest.raises(WeightFileError) as e:
        torch_file.load_state_dict(path)
    assert "(model, ema)" in assert_one_line(e, path) and "key=" in str(e.value)
    with pytest.raises(WeightFileError) as e:
        torch_file.load_state_dict(path, key="opt")
    assert "'opt' does not exist" in assert_one_line(e, path)
    only = torch_file.state_dict({"state_dict": got["model"], "epoch": 3})
    assert set(only) == {"conv.weight", "conv.bias"}
    assert torch_file.flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {
        "a.b": 1, "a.c.d": 2, "e": 3}


def test_module_state_dict_with_metadata_and_parameters(tmp_path):
    """module.state_dict() is an OrderedDict with a _metadata attribute (set by BUILD);
    a pickled nn.Parameter is _rebuild_parameter(tensor, requires_grad, hooks)."""
    w = _random(np.float32, (2, 3))
    items = [("lin.weight", Reduce(Global("torch._utils._rebuild_parameter"),
                                   (tensor(w, "0"), True, {}))),
             ("lin.steps", tensor(np.array(7, np.int64), "1"))]
    sd = Reduce(Global("collections.OrderedDict"), ([list(kv) for kv in items],),
                state={"_metadata": {"": {"version": 1}}})
    got = torch_file.load_state_dict(write_pt(tmp_path / "sd.pt", sd))
    assert type(got) is dict and list(got) == ["lin.weight", "lin.steps"]
    np.testing.assert_array_equal(got["lin.weight"], w)
    assert got["lin.steps"].dtype == np.int64 and got["lin.steps"] == 7


def test_v3_tensors_of_new_dtypes_on_untyped_storage(tmp_path):
    u16 = np.arange(6, dtype=np.uint16) * 1000
    f8 = np.linspace(-2, 2, 8).astype(ml_dtypes.float8_e4m3fn)
    obj = {"u16": Tensor(Storage("storage.UntypedStorage", "0", u16), 1, (2, 2), (1, 2),
                         dtype="uint16"),
           "f8": Tensor(Storage("storage.UntypedStorage", "1", f8), 0, (8,), (1,),
                        dtype="float8_e4m3fn")}
    got = torch_file.load(write_pt(tmp_path / "v3.pt", obj))
    np.testing.assert_array_equal(got["u16"], u16[1:5].reshape(2, 2, order="F"))
    assert got["f8"].dtype == ml_dtypes.float8_e4m3fn
    np.testing.assert_array_equal(got["f8"].view(np.uint8), f8.view(np.uint8))


def test_conj_and_neg_bits_are_applied(tmp_path):
    c = _random(np.complex64, (3,))
    r = _random(np.float32, (3,))
    obj = {"c": Tensor(Storage("ComplexFloatStorage", "0", c), 0, (3,), (1,),
                       metadata={"conj": True}),
           "n": Tensor(Storage("FloatStorage", "1", r), 0, (3,), (1,), metadata={"neg": True})}
    got = torch_file.load(write_pt(tmp_path / "bits.pt", obj))
    np.testing.assert_array_equal(got["c"], np.conj(c))
    np.testing.assert_array_equal(got["n"], -r)


def test_big_endian_files_are_swapped(tmp_path):
    want = {"f": _random(np.float32, (2, 3)), "h": _random(np.float16, (4,), 1),
            "b": _random(ml_dtypes.bfloat16, (4,), 2), "i": _random(np.int64, (3,), 3)}
    path = write_pt(tmp_path / "big.pt", {k: tensor(v, str(i)) for i, (k, v)
                                          in enumerate(want.items())}, byteorder="big")
    got = torch_file.load_state_dict(path)
    for k, v in want.items():
        np.testing.assert_array_equal(got[k].view(np.uint8), v.view(np.uint8))


def test_any_archive_folder_name_and_no_byteorder_record(tmp_path):
    """torch < 2 names the folder after the file and writes no byteorder record."""
    want = _random(np.float32, (5,))
    path = write_pt(tmp_path / "w.pth", {"w": tensor(want, "0")}, prefix="w", byteorder=None)
    np.testing.assert_array_equal(torch_file.load_state_dict(path)["w"], want)


# ------------------------------------------------------------------------------------------
# Malicious pickles: refused, one line, nothing run
# ------------------------------------------------------------------------------------------


class _System:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Eval:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return (eval, (self.code,))


def _marker_command(marker):
    return f"touch {marker}"


@pytest.mark.parametrize("make", ["os.system", "builtins.eval", "subprocess", "in a tensor",
                                  "after tensors"])
def test_malicious_pickles_are_refused_and_run_nothing(tmp_path, make):
    marker = tmp_path / "pwned"
    evil = {
        "os.system": lambda: pickle.dumps({"w": _System(_marker_command(marker))}, protocol=2),
        "builtins.eval": lambda: pickle.dumps(
            _Eval(f"open({str(marker)!r}, 'w').close()"), protocol=2),
        "subprocess": lambda: dumps(Reduce(Global("subprocess.check_call"),
                                           (["touch", str(marker)],))),
        # the payload hides in a tensor's backward_hooks argument
        "in a tensor": lambda: dumps({"w": Reduce(
            Global("torch._utils._rebuild_tensor_v2"),
            (Storage("FloatStorage", "0", np.zeros(1, np.float32)), 0, (1,), (1,), False,
             Reduce(Global("posix.system"), (_marker_command(marker),))))}),
        "after tensors": lambda: dumps({"w": tensor(np.zeros(2, np.float32), "0"),
                                        "x": Reduce(Global("os.system"),
                                                    (_marker_command(marker),))}),
    }[make]()
    path = write_pt(tmp_path / "evil.pt", {"w": tensor(np.zeros(1, np.float32), "0")},
                    pkl=evil)
    with pytest.raises(UnsafeCheckpointError) as e:
        torch_file.load(path)
    text = assert_one_line(e, path)
    assert "refused global" in text and "nothing in the file was run" in text
    assert isinstance(e.value, ValueError)
    assert not marker.exists()


def test_refused_global_is_named(tmp_path):
    for full in ["posix.system", "builtins.eval", "builtins.getattr", "torch.nn.Module",
                 "torch._utils._rebuild_qtensor", "numpy.core.multiarray._reconstruct"]:
        path = write_pt(tmp_path / "g.pt", pkl=dumps(Reduce(Global(full), ())))
        with pytest.raises(UnsafeCheckpointError) as e:
            torch_file.load(path)
        assert f"refused global {full!r}" in assert_one_line(e, path)


def test_codecs_encode_runs_only_latin1(tmp_path):
    path = write_pt(tmp_path / "c.pt", pkl=dumps(Reduce(Global("_codecs.encode"),
                                                        ("eJzLSM3JyQcABiwCFQ==", "base64"))))
    with pytest.raises(UnsafeCheckpointError) as e:
        torch_file.load(path)
    assert "base64" in assert_one_line(e, path)


def test_build_cannot_reach_the_loader(tmp_path):
    """BUILD on a storage marker, a tensor or an allowed function fails as a corrupt file;
    the same loader then reads a good file as before."""
    attacks = [
        Reduce(Global("torch._utils._rebuild_tensor_v2"),
               (Storage("FloatStorage", "0", np.zeros(1, np.float32)), 0, (1,), (1,), False,
                {}), state=(None, {"offset": 10**9})),
        Reduce(Global("builtins.set"), ([],), state={"x": 1}),
    ]
    for i, attack in enumerate(attacks):
        path = write_pt(tmp_path / f"b{i}.pt", {"w": attack})
        with pytest.raises(WeightFileError) as e:
            torch_file.load(path)
        assert "corrupt data.pkl" in assert_one_line(e, path)
    # BUILD on an allowed function: setattr fails, a __dict__ entry changes nothing.
    head = pickle.PROTO + b"\x02" + pickle.GLOBAL + b"torch._utils\n_rebuild_tensor_v2\n"
    for state in [(None, {"__defaults__": (10**9,)}), {"__defaults__": (10**9,)}]:
        out = bytearray(head)
        _emit(state, out)
        path = write_pt(tmp_path / "m.pt", pkl=bytes(out + pickle.BUILD + pickle.STOP))
        with pytest.raises(WeightFileError):
            torch_file.load(path)
    assert torch_file._Unpickler._rebuild_tensor_v2.__defaults__ == (None,)
    good = write_pt(tmp_path / "good.pt", {"w": tensor(np.arange(3, dtype=np.float32), "0")})
    np.testing.assert_array_equal(torch_file.load(good)["w"], [0, 1, 2])


@pytest.mark.parametrize("offset,shape,stride,what", [
    (0, (3, 3), (3, 1), "reach past"),  # 9 items of 8
    (8, (1,), (1,), "reach past"),
    (0, (2, 2), (1, 7), "reach past"),
    (-1, (2,), (1,), "bad tensor layout"),
    (0, (2,), (-1,), "bad tensor layout"),
    (0, (2, 2), (1,), "bad tensor layout"),
    (0, ("2",), (1,), "bad tensor layout"),
])
def test_layouts_outside_the_storage_are_refused_not_read(tmp_path, offset, shape, stride,
                                                          what):
    s = Storage("FloatStorage", "0", np.zeros(8, np.float32))
    path = write_pt(tmp_path / "oob.pt", {"w": Tensor(s, offset, shape, stride)})
    with pytest.raises(WeightFileError) as e:
        torch_file.load(path)
    assert what in assert_one_line(e, path) and ": at w: " in str(e.value)


# ------------------------------------------------------------------------------------------
# Corrupt, truncated, missing, other formats: one line naming the file
# ------------------------------------------------------------------------------------------


def _flip(data: bytes, i: int) -> bytes:
    return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]


def _good(tmp_path, name="good.pt") -> str:
    return write_pt(tmp_path / name, {"w": tensor(_random(np.float32, (64,)), "0")})


def test_missing_file_and_directory(tmp_path):
    for path, what in [(tmp_path / "nope.pt", "no such file"),
                       (tmp_path, "a directory")]:
        with pytest.raises(WeightFileError) as e:
            torch_file.load(path)
        assert what in assert_one_line(e, path)


@pytest.mark.parametrize("damage,what", [
    (lambda b: b"", "(empty)"),
    (lambda b: b"hello, not a checkpoint" * 4, "neither a torch.save zip nor a safetensors"),
    (lambda b: b[: len(b) // 2], "corrupt or truncated"),
    (lambda b: b[:40], "corrupt or truncated"),
    (lambda b: _flip(b, b.find(_random(np.float32, (64,)).tobytes()) + 40),
     "corrupt or truncated"),  # a flipped storage byte fails the zip's CRC
])
def test_damaged_files(tmp_path, damage, what):
    path = tmp_path / "bad.pt"
    path.write_bytes(damage(open(_good(tmp_path), "rb").read()))
    with pytest.raises(WeightFileError) as e:
        torch_file.load(path)
    assert what in assert_one_line(e, path)


def test_truncated_pickle_and_missing_or_short_storage(tmp_path):
    obj = {"w": tensor(_random(np.float32, (8,)), "0")}
    cases = [
        (write_pt(tmp_path / "p.pt", obj, pkl=dumps(obj)[:-9]), "corrupt data.pkl"),
        (write_pt(tmp_path / "s.pt", obj, skip={"0"}), "missing storage record archive/data/0"),
    ]
    short = tmp_path / "short.pt"
    with zipfile.ZipFile(short, "w") as zf:
        zf.writestr("archive/data.pkl", dumps(obj))
        zf.writestr("archive/data/0", b"\0" * 12)
    cases.append((str(short), "holds 12 bytes, the pickle says 32"))
    for path, what in cases:
        with pytest.raises(WeightFileError) as e:
            torch_file.load(path)
        assert what in assert_one_line(e, path)


def test_unsupported_storage_dtype_and_other_zips(tmp_path):
    q = {"q": Tensor(Storage("QInt8Storage", "0", np.zeros(2, np.int8)), 0, (2,), (1,))}
    v3 = {"c": Tensor(Storage("storage.UntypedStorage", "0", np.zeros(3, np.uint8)), 0, (1,),
                      (1,), dtype="bfloat16")}
    script = tmp_path / "script.pt"
    with zipfile.ZipFile(script, "w") as zf:
        zf.writestr("m/code/__torch__.py", "")
        zf.writestr("m/constants.pkl", b"")
    plain = tmp_path / "plain.zip"
    with zipfile.ZipFile(plain, "w") as zf:
        zf.writestr("readme.txt", "hi")
    for path, what, error in [
        (write_pt(tmp_path / "q.pt", q), "refused global 'torch.QInt8Storage'",
         UnsafeCheckpointError),
        (write_pt(tmp_path / "v3.pt", v3), "storage bytes 3 are not bfloat16", WeightFileError),
        (str(script), "TorchScript archive", WeightFileError),
        (str(plain), "without data.pkl", WeightFileError),
    ]:
        with pytest.raises(error) as e:
            torch_file.load(path)
        assert what in assert_one_line(e, path)


def test_legacy_format_says_how_to_resave(tmp_path):
    path = tmp_path / "old.pt"
    path.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
                     + pickle.dumps(1001, protocol=2))
    with pytest.raises(WeightFileError) as e:
        torch_file.load(path)
    assert "torch < 1.6" in assert_one_line(e, path) and "re-save" in str(e.value)


# ------------------------------------------------------------------------------------------
# safetensors
# ------------------------------------------------------------------------------------------


def test_safetensors_round_trip_with_bfloat16(tmp_path):
    want = {"w": _random(np.float32, (3, 4)), "h": _random(np.float16, (5,), 1),
            "b": _random(ml_dtypes.bfloat16, (2, 3), 2), "i": _random(np.int64, (4,), 3),
            "f8": _random(np.float32, (4,), 4).astype(ml_dtypes.float8_e5m2)}
    path = tmp_path / "m.safetensors"
    safetensors.numpy.save_file(want, str(path))
    for got in (torch_file.load(path), torch_file.load_state_dict(path)):
        assert set(got) == set(want)
        for k, v in want.items():
            assert got[k].dtype == v.dtype and got[k].shape == v.shape
            np.testing.assert_array_equal(got[k].view(np.uint8), v.view(np.uint8))


def test_safetensors_written_by_hand_with_bfloat16(tmp_path):
    """The format itself: 8-byte little-endian header size, JSON header, raw bytes. Named
    .bin, so load() must go by the first bytes, not the name."""
    b = np.array([1.5, -2.0, 3.25], ml_dtypes.bfloat16)
    header = b'{"b":{"dtype":"BF16","shape":[3],"data_offsets":[0,6]}}'
    path = tmp_path / "weights.bin"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b.tobytes())
    got = torch_file.load(path)["b"]
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got.astype(np.float32), [1.5, -2.0, 3.25])


def test_corrupt_safetensors(tmp_path):
    path = tmp_path / "m.safetensors"
    safetensors.numpy.save_file({"w": np.ones((64,), np.float32)}, str(path))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(WeightFileError) as e:
        torch_file.load(path)
    assert "unreadable safetensors" in assert_one_line(e, path)


# ------------------------------------------------------------------------------------------
# Against real torch.save (the `reference` extra)
# ------------------------------------------------------------------------------------------


def test_against_real_torch_save(tmp_path):
    torch = pytest.importorskip("torch", reason="torch (the `reference` extra) not installed")
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    tensors = {
        "f32": base, "f64": base.double(), "f16": base.half(), "bf16": base.bfloat16(),
        "i8": torch.randint(-128, 127, (5,), dtype=torch.int8, generator=g),
        "i16": torch.randint(-2**15, 2**15 - 1, (5,), dtype=torch.int16, generator=g),
        "i32": torch.randint(-2**31, 2**31 - 1, (5,), dtype=torch.int32, generator=g),
        "i64": torch.randint(-2**62, 2**62, (5,), dtype=torch.int64, generator=g),
        "u8": torch.randint(0, 255, (5,), dtype=torch.uint8, generator=g),
        "bool": base > 0, "c64": torch.randn(3, dtype=torch.cfloat, generator=g),
        "u16": torch.arange(7).to(torch.uint16), "f8": base[0].to(torch.float8_e4m3fn),
        "view": base.t()[2:, 1:5], "offset": base[3:, 2], "expand": base[0, :1].expand(4, 3),
        "conj": torch.randn(3, dtype=torch.cfloat, generator=g).conj(),
        "neg": torch.randn(3, dtype=torch.cfloat, generator=g).conj().imag,  # a neg-bit view
        "param": torch.nn.Parameter(base[1].clone()), "scalar": torch.tensor(2.5),
    }
    assert tensors["conj"].is_conj() and tensors["neg"].is_neg()
    obj = {"model": net.state_dict(), "tensors": tensors, "epoch": 3, "name": "x",
           "blob": b"\x01\x02", "tied": [base, base], "tags": {"a", 2}, "z": 1 - 1j,
           "buf": bytearray(b"\x00x"), "frozen": frozenset({3}), "dtype": torch.float16}
    for protocol in (2, 4):
        path = tmp_path / f"ref{protocol}.pt"
        torch.save(obj, path, pickle_protocol=protocol)
        got = torch_file.load(path)
        assert got["epoch"] == 3 and got["name"] == "x" and got["blob"] == b"\x01\x02"
        assert got["tied"][0] is got["tied"][1]
        assert got["tags"] == {"a", 2} and got["z"] == 1 - 1j and got["buf"] == b"\x00x"
        assert got["frozen"] == frozenset({3}) and got["dtype"] == "torch.float16"
        for name, t in tensors.items():
            want = t.detach().resolve_conj().resolve_neg()
            view = torch.uint8 if want.dtype != torch.bool else torch.bool
            raw = want.contiguous().reshape(-1).view(view).numpy() if want.dim() else None
            assert got["tensors"][name].shape == tuple(want.shape), name
            if raw is not None:
                np.testing.assert_array_equal(got["tensors"][name].reshape(-1).view(raw.dtype),
                                              raw, err_msg=name)
        sd = torch_file.load_state_dict(path, key="model")
        assert list(sd) == list(net.state_dict())
        for k, v in net.state_dict().items():
            np.testing.assert_array_equal(sd[k], v.numpy(), err_msg=k)
    legacy = tmp_path / "legacy.pt"
    torch.save(obj, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(WeightFileError) as e:
        torch_file.load(legacy)
    assert "torch < 1.6" in assert_one_line(e, legacy)
    marker = tmp_path / "pwned"
    torch.save({"w": base, "x": _System(_marker_command(marker))}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError):
        torch_file.load(tmp_path / "evil.pt")
    assert not marker.exists()
