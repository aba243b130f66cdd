"""Convert pytorch-fid's InceptionV3 weights to diffjax's Flax InceptionV3, and load them.

The FID weights cannot be downloaded by diffjax. Fetch pytorch-fid's published file
``pt_inception-2015-12-05-6726825d.pth`` (a port of TensorFlow's inception-2015-12-05 graph)
yourself, then convert it once (needs torch, only for this step):

    python -m diffjax.evaluation.convert_inception \\
        --torch pt_inception-2015-12-05-6726825d.pth --out inception_fid.npz

and pass ``inception_fid.npz`` to :func:`load_inception_params` (NumPy only). A ``.msgpack``
output (flax.serialization) is written instead when ``--out`` ends in ``.msgpack``.

Mapping (torch -> Flax, names of torchvision/pytorch-fid kept):
``<mod>.conv.weight`` [O, I, kh, kw] -> ``<mod>/kernel`` [kh, kw, I, O];
``<mod>.bn.{weight, bias, running_mean, running_var}`` -> ``<mod>/bn_{scale, bias, mean, var}``;
``fc.weight`` [1008, 2048] -> ``fc_kernel`` [2048, 1008]; ``fc.bias`` -> ``fc_bias``.
``num_batches_tracked`` entries are dropped.
"""

from __future__ import annotations

import argparse
import functools
import os
import zipfile
from typing import Any, Mapping

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.evaluation.inception import InceptionV3

_BN_NAMES = {"weight": "bn_scale", "bias": "bn_bias", "running_mean": "bn_mean",
             "running_var": "bn_var"}


@functools.cache
def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Flat ``{"Mixed_6d/branch1x1/kernel": shape}`` of the Flax InceptionV3's params."""
    shapes = jax.eval_shape(lambda: InceptionV3().init(
        jax.random.key(0), jnp.zeros((1, 75, 75, 3), jnp.float32))["params"])
    flat = flax.traverse_util.flatten_dict(shapes, sep="/")
    return {k: tuple(v.shape) for k, v in flat.items()}


def _flax_key(torch_key: str) -> str | None:
    """Flax flat key for a torch key; None for entries to drop."""
    parts = torch_key.split(".")
    if parts[-1] == "num_batches_tracked":
        return None
    if parts[0] == "fc" and len(parts) == 2:
        return "fc_kernel" if parts[1] == "weight" else "fc_bias"
    if len(parts) >= 3 and parts[-2] == "conv" and parts[-1] == "weight":
        return "/".join(parts[:-2] + ["kernel"])
    if len(parts) >= 3 and parts[-2] == "bn" and parts[-1] in _BN_NAMES:
        return "/".join(parts[:-2] + [_BN_NAMES[parts[-1]]])
    raise ValueError(f"unexpected key {torch_key!r} in the InceptionV3 state dict; expected "
                     "pytorch-fid's FID InceptionV3 (pt_inception-2015-12-05-*.pth)")


def convert_state_dict(state_dict: Mapping[str, Any]) -> dict:
    """pytorch-fid FID-InceptionV3 state dict -> nested Flax params of :class:`InceptionV3`.

    state_dict: name -> array (NumPy arrays or anything ``np.asarray`` accepts, e.g. CPU
    torch tensors). Returns the nested ``params`` dict (float32), checked key by key and
    shape by shape against the Flax module.
    """
    flat = {}
    for torch_key, value in state_dict.items():
        key = _flax_key(torch_key)
        if key is None:
            continue
        arr = np.asarray(value, dtype=np.float32)
        if key.endswith("/kernel"):
            arr = arr.transpose(2, 3, 1, 0)
        elif key == "fc_kernel":
            arr = arr.T
        flat[key] = np.ascontiguousarray(arr)
    return _check_and_nest(flat, "the converted state dict")


def _check_and_nest(flat: dict[str, np.ndarray], what: str) -> dict:
    expected = expected_shapes()
    missing = sorted(set(expected) - set(flat))
    extra = sorted(set(flat) - set(expected))
    if missing or extra:
        raise ValueError(f"{what} does not match the FID InceptionV3: missing {missing[:3]} "
                         f"({len(missing)} in all), unexpected {extra[:3]} ({len(extra)} in all)")
    for key, shape in expected.items():
        if tuple(flat[key].shape) != shape:
            raise ValueError(f"{what}: {key} has shape {tuple(flat[key].shape)}, expected {shape}")
    return flax.traverse_util.unflatten_dict(flat, sep="/")


def save_inception_params(params: dict, path: str) -> None:
    """Write params to ``path`` (.npz with flat "a/b/kernel" keys, or .msgpack)."""
    flat = flax.traverse_util.flatten_dict(jax.device_get(params), sep="/")
    flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
    if path.endswith(".msgpack"):
        data = flax.serialization.msgpack_serialize(flax.traverse_util.unflatten_dict(
            flat, sep="/"))
        with open(path, "wb") as f:
            f.write(data)
    else:
        with open(path, "wb") as f:
            np.savez(f, **flat)


def load_inception_params(path: str) -> dict:
    """Load converted FID-InceptionV3 params from a .npz or .msgpack file.

    Raises a one-line ValueError if the file is missing, unreadable or holds other keys or
    shapes than the Flax :class:`InceptionV3` expects.
    """
    hint = ("convert pytorch-fid's pt_inception-2015-12-05-6726825d.pth with "
            "`python -m diffjax.evaluation.convert_inception --torch FILE.pth --out FILE.npz`")
    if not os.path.isfile(path):
        raise ValueError(f"Inception weight file {path!r} not found; {hint}")
    try:
        if path.endswith(".msgpack"):
            with open(path, "rb") as f:
                nested = flax.serialization.msgpack_restore(f.read())
            if not isinstance(nested, dict):
                raise TypeError(type(nested).__name__)
            flat = flax.traverse_util.flatten_dict(nested, sep="/")
        else:
            with np.load(path, allow_pickle=False) as data:
                flat = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, TypeError, KeyError) as e:
        raise ValueError(f"Inception weight file {path!r} is corrupt or not a .npz/.msgpack "
                         f"({type(e).__name__}); {hint}") from None
    flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
    return _check_and_nest(flat, f"Inception weight file {path!r}")


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    """Read a PyTorch .pth state dict as NumPy arrays (imports torch, only here)."""
    try:
        import torch  # optional: PyTorch is only a reference, never a runtime dependency
    except ImportError:
        raise ValueError("converting a .pth file needs PyTorch: pip install torch") from None
    if not os.path.isfile(path):
        raise ValueError(f"PyTorch weight file {path!r} not found")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def main(argv: list[str] | None = None) -> None:
    """CLI: convert a pytorch-fid .pth file to a diffjax .npz/.msgpack weight file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch", required=True, help="pt_inception-2015-12-05-*.pth")
    parser.add_argument("--out", required=True, help="output .npz or .msgpack")
    args = parser.parse_args(argv)
    params = convert_state_dict(load_torch_state_dict(args.torch))
    save_inception_params(params, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
