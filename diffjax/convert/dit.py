"""DiT state dicts (facebookresearch/DiT or diffusers' DiTTransformer2DModel) -> diffjax params.

=============================================  ===========================================
facebookresearch/DiT (``DiT-XL-2-256x256.pt``)  diffjax :class:`diffjax.models.dit.DiT`
=============================================  ===========================================
``x_embedder.proj``                            ``x_embedder`` (conv OIHW -> HWIO)
``t_embedder.mlp.0`` / ``.mlp.2``              ``t_embedder_0`` / ``t_embedder_1``
``y_embedder.embedding_table``                 ``y_embedder/embedding``
``blocks.N.adaLN_modulation.1``                ``blocks_N/adaLN_modulation``
``blocks.N.attn.qkv`` / ``.attn.proj``         ``blocks_N/qkv`` / ``blocks_N/proj``
``blocks.N.mlp.fc1`` / ``.mlp.fc2``            ``blocks_N/fc1`` / ``blocks_N/fc2``
``final_layer.adaLN_modulation.1``             ``final_adaLN_modulation``
``final_layer.linear``                         ``final_linear``
``pos_embed`` [1, L, D]                        checked against the fixed table, not converted
=============================================  ===========================================

diffusers' names are first rewritten to DiT's: ``pos_embed.proj`` -> ``x_embedder.proj``;
``transformer_blocks.N.norm1.emb.timestep_embedder.linear_{1,2}`` -> ``t_embedder.mlp.{0,2}``
and ``...norm1.emb.class_embedder.embedding_table`` -> ``y_embedder.embedding_table`` (diffusers
keeps one copy per block of DiT's single embedder; every copy must equal block 0's, whose copy
diffusers also uses for the final layer); ``norm1.linear`` -> ``adaLN_modulation.1``;
``attn1.to_{q,k,v}`` concatenated on the output axis -> ``attn.qkv`` (DiT's qkv columns are
[q | k | v], each split into heads); ``attn1.to_out.0`` -> ``attn.proj``; ``ff.net.0.proj`` /
``ff.net.2`` -> ``mlp.fc1`` / ``mlp.fc2``; ``proj_out_1`` -> ``final_layer.adaLN_modulation.1``
(both chunk into [shift | scale]); ``proj_out_2`` -> ``final_layer.linear``.

Numerics: diffusers' DiT differs from the original in two places that no weight records:
its timestep sinusoid uses ``downscale_freq_shift=1`` (frequencies 10000^(-i/127) instead of
DiT's 10000^(-i/128)) and its block LayerNorms default to eps 1e-5 (DiT: 1e-6). diffjax
computes the original DiT, so a diffusers checkpoint converts to the function of the DiT
weights it was made from.

Layouts: Linear [O, I] -> Dense kernel [I, O]; the patch conv [D, C, p, p] -> [p, p, C, D].
``num_heads`` leaves every shape unchanged: a wrong one converts without error and computes
another function; take it from the model's name (``dit.dit_options("DiT-XL/2")``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from diffjax.convert import torch_file
from diffjax.convert.guided_diffusion import ConversionError, mismatch_error
from diffjax.models import dit as dit_model

_TOP = {"x_embedder.proj": ("x_embedder",), "t_embedder.mlp.0": ("t_embedder_0",),
        "t_embedder.mlp.2": ("t_embedder_1",), "y_embedder.embedding_table": ("y_embedder",),
        "final_layer.adaLN_modulation.1": ("final_adaLN_modulation",),
        "final_layer.linear": ("final_linear",)}
_BLOCK = {"adaLN_modulation.1": "adaLN_modulation", "attn.qkv": "qkv", "attn.proj": "proj",
          "mlp.fc1": "fc1", "mlp.fc2": "fc2"}
_LEAF = {"kernel": "weight", "bias": "bias", "embedding": "weight"}
# diffusers module (after ``transformer_blocks.N.``) -> DiT module (after ``blocks.N.``).
_DIFFUSERS_BLOCK = {"norm1.linear": "adaLN_modulation.1", "attn1.to_out.0": "attn.proj",
                    "ff.net.0.proj": "mlp.fc1", "ff.net.2": "mlp.fc2"}
# diffusers' per-block copies of the shared embedders -> DiT's single module.
_DIFFUSERS_SHARED = {"norm1.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
                     "norm1.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
                     "norm1.emb.class_embedder.embedding_table": "y_embedder.embedding_table"}
_DIFFUSERS_TOP = {"pos_embed.proj": "x_embedder.proj",
                  "proj_out_1": "final_layer.adaLN_modulation.1",
                  "proj_out_2": "final_layer.linear"}
_DIFFUSERS_NAME = re.compile(r"transformer_blocks\.(\d+)\.(.+)\.(weight|bias)$")
_BLOCK_NAME = re.compile(r"blocks\.(\d+)\.")


def is_diffusers(state_dict: Mapping[str, Any]) -> bool:
    """Whether the tensor names are diffusers' DiTTransformer2DModel's."""
    return any(k.startswith(("transformer_blocks.", "pos_embed.proj.")) for k in state_dict)


def _module_and_leaf(name: str) -> tuple[str, str]:
    module, _, leaf = name.rpartition(".")
    return module, leaf


def from_diffusers(state_dict: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray],
                                                                  dict[str, str]]:
    """diffusers' tensors under DiT's names, and DiT name -> the diffusers name(s) it came
    from (for error messages). Raises ConversionError if a block's embedder copy differs from
    block 0's or a block lacks one of to_q / to_k / to_v."""
    out: dict[str, np.ndarray] = {}
    source: dict[str, str] = {}
    qkv: dict[str, dict[str, np.ndarray]] = {}
    for name, array in state_dict.items():
        array = np.asarray(array)
        module, leaf = _module_and_leaf(name)
        match = _DIFFUSERS_NAME.match(name)
        if module in _DIFFUSERS_TOP:
            target = f"{_DIFFUSERS_TOP[module]}.{leaf}"
        elif match and match.group(2) in _DIFFUSERS_SHARED:
            target = f"{_DIFFUSERS_SHARED[match.group(2)]}.{leaf}"
            if target in out:
                if out[target].shape != array.shape or not np.array_equal(out[target], array):
                    raise ConversionError(
                        f"checkpoint tensor {name} differs from {source[target]}; diffjax's DiT "
                        "has one timestep/class embedder, so every block's copy must be equal")
                continue
        elif match and match.group(2) in ("attn1.to_q", "attn1.to_k", "attn1.to_v"):
            target = f"blocks.{match.group(1)}.attn.qkv.{leaf}"
            qkv.setdefault(target, {})[match.group(2)[-1]] = array
            source[target] = name.replace(match.group(2), "attn1.to_{q,k,v}")
            if len(qkv[target]) < 3:
                continue
            parts = qkv.pop(target)
            if len({p.shape for p in parts.values()}) != 1:
                raise ConversionError(f"checkpoint tensors {source[target]} have different "
                                      f"shapes {[p.shape for p in parts.values()]}")
            array = np.concatenate([parts["q"], parts["k"], parts["v"]], axis=0)
        elif match and match.group(2) in _DIFFUSERS_BLOCK:
            target = f"blocks.{match.group(1)}.{_DIFFUSERS_BLOCK[match.group(2)]}.{leaf}"
        else:
            target = name  # no DiT counterpart: reported by the conversion under its own name
        out[target] = array
        source.setdefault(target, name)
    for target, parts in qkv.items():
        lacking = sorted({"q", "k", "v"} - set(parts))
        raise ConversionError(f"checkpoint lacks {source[target]} part(s) "
                              f"{', '.join('to_' + p for p in lacking)} that the other ones need")
    return out, source


def torch_names(abstract_params: Mapping) -> dict[str, tuple[str, ...]]:
    """DiT (facebookresearch) tensor name -> diffjax parameter path, for every parameter."""
    out = {}
    inverse_top = {v[0]: k for k, v in _TOP.items()}
    inverse_block = {v: k for k, v in _BLOCK.items()}
    for top, sub in abstract_params.items():
        if top in inverse_top:
            for leaf in sub:
                out[f"{inverse_top[top]}.{_LEAF[leaf]}"] = (top, leaf)
            continue
        index = top.removeprefix("blocks_")
        for module, leaves in sub.items():
            for leaf in leaves:
                out[f"blocks.{index}.{inverse_block[module]}.{_LEAF[leaf]}"] = (top, module, leaf)
    return out


def _to_diffjax(array: np.ndarray, path: tuple[str, ...], ndim: int) -> np.ndarray | None:
    """The tensor in diffjax's layout for the parameter at ``path`` of rank ``ndim``, or None
    when its rank cannot be that parameter's."""
    if array.ndim != ndim:
        return None
    if ndim == 4:  # patch conv [D, C, p, p] -> [p, p, C, D]
        return array.transpose(2, 3, 1, 0)
    if ndim == 2 and path[-1] == "kernel":  # Linear [O, I] -> [I, O]
        return array.T
    return array


def _torch_shape(shape: tuple[int, ...], path: tuple[str, ...]) -> tuple[int, ...]:
    """The shape DiT stores for a diffjax parameter of ``shape``."""
    if len(shape) == 4:
        kh, kw, i, o = shape
        return (o, i, kh, kw)
    if len(shape) == 2 and path[-1] == "kernel":
        return (shape[1], shape[0])
    return tuple(shape)


def _hint(name: str, got: tuple | None, want: tuple | None, module: Any, depth: int) -> str:
    """The config option that most likely explains a mismatch at DiT tensor ``name``."""
    if _BLOCK_NAME.match(name) and (got is None or want is None):
        return f"depth (the checkpoint has {depth} blocks, the config {module.depth})"
    if name.startswith("y_embedder"):
        if got is None:
            return "num_classes=None (the checkpoint is unconditional)"
        if want is None:
            return "num_classes (the checkpoint is class-conditional)"
        if got[1:] == want[1:]:
            return ("num_classes and class_dropout_prob (the table has num_classes + 1 rows, "
                    "the null label, when class_dropout_prob > 0)")
    if name.startswith("x_embedder") and got and want and len(got) == len(want) == 4:
        if got[1] != want[1]:
            return "in_channels"
        if got[2:] != want[2:]:
            return "patch_size"
    if name.startswith("final_layer.linear") and got and want and got[1:] == want[1:]:
        return "learn_sigma, in_channels or patch_size (rows = patch_size**2 * out channels)"
    if name.endswith("mlp.fc1.weight") and got and want and got[1:] == want[1:]:
        return "mlp_ratio"
    if name == "pos_embed":
        return "input_size, patch_size or hidden_size (the position table is [1, L, D])"
    return "hidden_size"


def _mismatch(name: str, got: tuple | None, want: tuple | None, module: Any, depth: int,
              source: Mapping[str, str]) -> ConversionError:
    return mismatch_error(source.get(name, name), got, want,
                          _hint(name, got, want, module, depth))


def _check_pos_embed(array: np.ndarray, module: Any, depth: int, source) -> None:
    grid = module.input_size // module.patch_size
    want = dit_model.get_2d_sincos_pos_embed(module.hidden_size, grid)[None]
    if array.shape != want.shape:
        raise _mismatch("pos_embed", tuple(array.shape), want.shape, module, depth, source)
    error = float(np.abs(array.astype(np.float32) - want).max())
    if error > 2e-3:  # a float16 table rounds to <= 5e-4
        raise ConversionError(f"checkpoint tensor pos_embed differs from DiT's fixed sin-cos "
                              f"table by {error:.3g}; it is not a DiT position table")


def convert_state_dict(state_dict: Mapping[str, np.ndarray], module: dit_model.DiT,
                       param_dtype: Any = None) -> dict:
    """A DiT or diffusers DiTTransformer2DModel state dict -> diffjax params of ``module``.

    state_dict: ``{name: array}`` (e.g. :func:`torch_file.load_state_dict`); module: the
    :class:`DiT` whose parameter tree (``jax.eval_shape`` of its init) the result fills;
    param_dtype: the arrays' dtype (default: ``module.param_dtype``). Every tensor must be
    used and every parameter filled. Returns nested dicts of NumPy arrays.

    Raises:
      ConversionError: one line naming the first tensor (in the checkpoint's order) that
        does not fit, both shapes, and the config option that likely fixes it.
    """
    source: dict[str, str] = {}
    if is_diffusers(state_dict):
        state_dict, source = from_diffusers(state_dict)
    abstract = dit_model.abstract_params(module)
    dtype = np.dtype(param_dtype if param_dtype is not None else module.param_dtype)
    names = torch_names(abstract)
    flat = traverse_util.flatten_dict(abstract)
    depth = len({m.group(1) for m in map(_BLOCK_NAME.match, state_dict) if m})
    out = {}
    for name, array in state_dict.items():
        array = np.asarray(array)
        if name == "pos_embed":
            _check_pos_embed(array, module, depth, source)
            continue
        if name not in names:
            raise _mismatch(name, tuple(array.shape), None, module, depth, source)
        path = names[name]
        target = tuple(flat[path].shape)
        value = _to_diffjax(array, path, len(target))
        if value is None or value.shape != target:
            raise _mismatch(name, tuple(array.shape), _torch_shape(target, path), module, depth,
                            source)
        out[path] = np.ascontiguousarray(value.astype(dtype))
    for name, path in names.items():
        if path not in out:
            raise _mismatch(name, None, _torch_shape(tuple(flat[path].shape), path), module,
                            depth, source)
    return traverse_util.unflatten_dict(out)


def load_checkpoint(path: str | os.PathLike, module: dit_model.DiT, key: str | None = None
                    ) -> dict:
    """The diffjax parameters of a DiT weight file (``DiT-XL-2-256x256.pt``, a training
    checkpoint's entry ``key="ema"``, or a diffusers ``diffusion_pytorch_model.safetensors``).

    Read without torch (nothing in the file is executed); arrays come back in
    ``module.param_dtype``, ready for ``module.apply({"params": params}, x, t, y)``.

    Raises:
      WeightFileError: a missing, corrupt or unsafe file; ConversionError (a subclass): a
        state dict of another architecture (one line: the first mismatching tensor).
    """
    return convert_state_dict(torch_file.load_state_dict(path, key), module)
