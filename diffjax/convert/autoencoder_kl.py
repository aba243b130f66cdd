"""Stable Diffusion VAE state dicts (diffusers or CompVis/LDM names) -> AutoencoderKL params.

    module = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2)
    params = load_checkpoint("vae-ft-mse-840000-ema-pruned.safetensors", module)
    mean, logvar = module.apply({"params": params}, x, method="encode")

Two naming schemes are read, told apart by the keys:

========================================  ===============================  =====================
diffusers                                 CompVis / LDM ``.ckpt``          diffjax
========================================  ===============================  =====================
``{en,de}coder.conv_in``, ``.conv_out``   same                             same
``encoder.down_blocks.I.resnets.J``       ``encoder.down.I.block.J``       ``down_I_res_J``
``...down_blocks.I.downsamplers.0.conv``  ``...down.I.downsample.conv``    ``down_I_downsample``
``decoder.up_blocks.I.resnets.J``         ``decoder.up.(n-1-I).block.J``   ``up_I_res_J``
``...up_blocks.I.upsamplers.0.conv``      ``...up.(n-1-I).upsample.conv``  ``up_I_upsample``
``*.mid_block.resnets.{0,1}``             ``*.mid.block_{1,2}``            ``mid_res_{0,1}``
``*.mid_block.attentions.0.group_norm``   ``*.mid.attn_1.norm``            ``mid_attn/norm``
``....to_q`` / ``to_k`` / ``to_v``        ``....q`` / ``k`` / ``v``        ``mid_attn/{q,k,v}``
``....to_out.0``                          ``....proj_out``                 ``mid_attn/proj_out``
``*.conv_norm_out``                       ``*.norm_out``                   ``norm_out``
ResBlock ``norm1, conv1, norm2, conv2``   same                             same
ResBlock ``conv_shortcut``                ``nin_shortcut``                 ``shortcut``
``quant_conv``, ``post_quant_conv``       same                             same
========================================  ===============================  =====================

(``n`` = number of levels; LDM numbers its decoder levels by resolution, diffusers in the
order they run.) Older diffusers files name the attention ``query``, ``key``, ``value``,
``proj_attn``; those are read too. Keys under ``first_stage_model.`` (a full SD ``.ckpt``)
or ``vae.`` are used, stripped, and everything outside that prefix (UNet, text encoder,
EMA) is ignored; otherwise ``loss.*`` (LPIPS, discriminator, logvar of the training loss)
and ``model_ema.*`` (LitEma's counters and shadow copies) are ignored. Every other tensor
must be used and every parameter filled.

Layouts: conv [O, I, kh, kw] -> HWIO; Linear [O, I] (diffusers' attention) and 1x1 conv
[O, I, 1, 1] (LDM's attention) -> Dense kernel [I, O]; GroupNorm ``weight`` -> ``scale``.
Arrays are cast to the parameter dtype. ``norm_num_groups`` changes no shape, so a wrong
value converts silently: transcribe it (32 for SD). The returned tree is the ``"params"``
collection. This module needs flax (it traces the module's abstract parameters).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from diffjax.convert import torch_file
from diffjax.convert.guided_diffusion import ConversionError, mismatch_error
from diffjax.models.autoencoder import AutoencoderKL

PREFIXES = ("first_stage_model.", "vae.")
IGNORED = ("loss.", "model_ema.")

_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_RES = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
        "shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_TOP = {"conv_in": "conv_in", "conv_out": "conv_out", "norm_out": "conv_norm_out"}
_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LDM_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v",
             "proj_out": "to_out.0"}
_LDM_KEY = re.compile(r"^(encoder|decoder)\.(down|up|mid|norm_out)\.")
_DIFFUSERS_KEY = re.compile(
    r"^(encoder|decoder)\.(down_blocks|up_blocks|mid_block|conv_norm_out)\.")


# ----------------------------------------------------------------------------- names


def _module_name(path: tuple[str, ...]) -> str:
    """diffusers' module name of a diffjax module path (without the leaf)."""
    top, rest = path[0], path[1:]
    if top in ("quant_conv", "post_quant_conv"):
        return top
    part, sub = rest[0], rest[1:]
    if part in _TOP:
        return f"{top}.{_TOP[part]}"
    if part.startswith("mid_res_"):
        base = f"{top}.mid_block.resnets.{part[-1]}"
    elif part == "mid_attn":
        return f"{top}.mid_block.attentions.0.{_ATTN[sub[0]]}"
    else:
        kind, i, what = part.split("_", 2)  # down_I_res_J, down_I_downsample, up_I_upsample
        block = f"{top}.{kind}_blocks.{i}"
        if what in ("downsample", "upsample"):
            return f"{block}.{what}rs.0.conv"
        base = f"{block}.resnets.{what.split('_')[1]}"
    return f"{base}.{_RES[sub[0]]}"


def diffusers_names(abstract_params: Any) -> dict[str, tuple[str, ...]]:
    """diffusers tensor name -> diffjax parameter path, for every parameter of the tree."""
    return {f"{_module_name(path[:-1])}.{_LEAF[path[-1]]}": path
            for path in traverse_util.flatten_dict(abstract_params)}


def ldm_to_diffusers(name: str, num_up: int) -> str:
    """A CompVis/LDM VAE tensor name -> diffusers' (``num_up``: the decoder's level count)."""
    def up(m: re.Match) -> str:
        return f"decoder.up_blocks.{num_up - 1 - int(m.group(1))}."

    name = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", name)
    name = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.",
                  name)
    name = re.sub(r"^decoder\.up\.(\d+)\.block\.", lambda m: up(m) + "resnets.", name)
    name = re.sub(r"^decoder\.up\.(\d+)\.upsample\.", lambda m: up(m) + "upsamplers.0.", name)
    name = re.sub(r"\.mid\.block_([12])\.", lambda m: f".mid_block.resnets.{int(m.group(1)) - 1}.",
                  name)
    name = re.sub(r"\.mid\.attn_1\.(\w+)\.",
                  lambda m: f".mid_block.attentions.0.{_LDM_ATTN.get(m.group(1), m.group(1))}.",
                  name)
    name = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", name)
    return name.replace(".nin_shortcut.", ".conv_shortcut.")


def diffusers_to_ldm(name: str, num_up: int) -> str:
    """The inverse of :func:`ldm_to_diffusers` (for naming tensors in CompVis's scheme)."""
    def up(m: re.Match) -> str:
        return f"decoder.up.{num_up - 1 - int(m.group(1))}."

    inverse_attn = {v: k for k, v in _LDM_ATTN.items()}
    name = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", name)
    name = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.",
                  r"encoder.down.\1.downsample.", name)
    name = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: up(m) + "block.", name)
    name = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: up(m) + "upsample.",
                  name)
    name = re.sub(r"\.mid_block\.resnets\.([01])\.", lambda m: f".mid.block_{int(m.group(1)) + 1}.",
                  name)
    name = re.sub(r"\.mid_block\.attentions\.0\.(\w+(?:\.0)?)\.",
                  lambda m: f".mid.attn_1.{inverse_attn.get(m.group(1), m.group(1))}.", name)
    name = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", name)
    return name.replace(".conv_shortcut.", ".nin_shortcut.")


def canonical_names(keys) -> tuple[str, dict[str, str]]:
    """(format, {diffusers name: checkpoint name}) of the tensors a VAE state dict uses.

    format is "ldm" or "diffusers"; prefixed and ignored keys are resolved as the module
    docstring says. Raises ConversionError when the keys are not an AutoencoderKL's.
    """
    keys = list(keys)
    prefix = next((p for p in PREFIXES if any(k.startswith(p) for k in keys)), "")
    if prefix:
        used = {k[len(prefix):]: k for k in keys if k.startswith(prefix)}
    else:
        used = {k: k for k in keys if not k.startswith(IGNORED)}
    ldm = any(_LDM_KEY.match(k) for k in used)
    if ldm == any(_DIFFUSERS_KEY.match(k) for k in used):
        what = "mixes CompVis and diffusers names" if ldm else "has no encoder.down*/mid* keys"
        raise ConversionError(f"state dict is not an AutoencoderKL's ({what}; first keys: "
                              f"{', '.join(keys[:3])})")
    if not ldm:
        out = {}
        for k, original in used.items():
            m = re.match(r"^(.*\.mid_block\.attentions\.0\.)(query|key|value|proj_attn)\.(.*)$", k)
            out[f"{m[1]}{_LEGACY_ATTN[m[2]]}.{m[3]}" if m else k] = original
        return "diffusers", out
    ups = [int(m[1]) for k in used if (m := re.match(r"^decoder\.up\.(\d+)\.", k))]
    num_up = max(ups, default=-1) + 1
    return "ldm", {ldm_to_diffusers(k, num_up): original for k, original in used.items()}


# ----------------------------------------------------------------------------- errors


def _torch_shape(shape: tuple[int, ...], torch_ndim: int) -> tuple[int, ...]:
    """The shape a checkpoint stores for a diffjax parameter of ``shape``."""
    if len(shape) == 4:
        kh, kw, i, o = shape
        return (o, i, kh, kw)
    if len(shape) == 2:
        return (shape[1], shape[0]) + (1,) * max(0, torch_ndim - 2)
    return tuple(shape)


def _hint(name: str, got: tuple | None, want: tuple | None, model_names, ckpt_names) -> str:
    """The AutoencoderKL option that most likely explains a mismatch at diffusers ``name``
    (got: the checkpoint's shape, None if it lacks the tensor; want: the model's, None if the
    model has no such tensor)."""
    shapes_differ = got is not None and want is not None
    if name.startswith("encoder.conv_in.") and shapes_differ:
        return "in_channels or block_out_channels[0]"
    if name.startswith("decoder.conv_out.") and shapes_differ:
        return "out_channels or block_out_channels[0]"
    if re.match(r"(quant_conv|post_quant_conv|encoder\.conv_out|decoder\.conv_in)\.", name):
        if not shapes_differ and name.startswith(("quant_conv.", "post_quant_conv.")):
            return "the checkpoint's use_quant_conv / use_post_quant_conv (diffjax always has both)"
        return "latent_channels (or block_out_channels)"
    if ".mid_block.attentions." in name and got is None:
        return ("the checkpoint's mid_block_add_attention (diffjax always has the mid-block "
                "attention)")
    if re.search(r"_blocks\.\d+\.attentions\.", name):
        return ("the checkpoint's block types (diffjax builds DownEncoderBlock2D / "
                "UpDecoderBlock2D, without attention)")
    block = re.match(r"^((?:encoder\.down|decoder\.up)_blocks\.\d+)\.resnets\.\d+\.", name)
    if block and not shapes_differ and ".conv_shortcut." not in name:
        def inside(names) -> bool:
            return any(n.startswith(block[1] + ".") for n in names)
        if inside(model_names) and inside(ckpt_names):
            return "layers_per_block"
    return "block_out_channels (channels per level, and their number)"


def _mismatch(name: str, original: str, got, want, model_names, ckpt_names) -> ConversionError:
    return mismatch_error(original, got, want, _hint(name, got, want, model_names, ckpt_names),
                          model="the model")


# ----------------------------------------------------------------------------- conversion


def abstract_params(module: AutoencoderKL) -> dict:
    """The module's parameter tree as ShapeDtypeStructs (``jax.eval_shape``; nothing allocated)."""
    f = 2 ** (len(module.block_out_channels) - 1)
    x = jax.ShapeDtypeStruct((1, f, f, module.in_channels), jnp.float32)
    return jax.eval_shape(lambda x_: module.init(jax.random.key(0), x_), x)["params"]


_RANK = {"encoder": 0, "quant_conv": 1, "post_quant_conv": 2, "decoder": 3, "conv_in": 0,
         "down_blocks": 1, "mid_block": 2, "up_blocks": 3, "conv_norm_out": 4, "conv_out": 5,
         "norm1": 0, "conv1": 1, "norm2": 2, "conv2": 3, "conv_shortcut": 4, "group_norm": 0,
         "to_q": 1, "to_k": 2, "to_v": 3, "to_out": 4, "weight": 0, "bias": 1}


def _order(name: str) -> tuple:
    """The order in which the model runs a diffusers tensor name (for the first missing one)."""
    return tuple((0, int(p), "") if p.isdigit() else (1, _RANK.get(p, 9), p)
                 for p in name.split("."))


def convert_state_dict(state_dict: Mapping[str, np.ndarray], module: AutoencoderKL,
                       param_dtype: Any = None) -> dict:
    """A diffusers or CompVis VAE state dict -> ``module``'s ``"params"`` tree (NumPy arrays).

    param_dtype: the arrays' dtype (default ``module.param_dtype``).

    Raises:
      ConversionError: one line naming the first tensor (in the checkpoint's order) that does
        not fit, both shapes (checkpoint layout) and the option that likely fixes it.
    """
    dtype = np.dtype(module.param_dtype if param_dtype is None else param_dtype)
    abstract = abstract_params(module)
    flat = traverse_util.flatten_dict(abstract)
    names = diffusers_names(abstract)
    fmt, used = canonical_names(state_dict.keys())
    out = {}
    for name, original in used.items():
        array = np.asarray(state_dict[original])
        if name not in names:
            raise _mismatch(name, original, tuple(array.shape), None, names, used)
        target = flat[names[name]]
        value = torch_file.flax_layout(array, len(target.shape))
        if value is None or value.shape != tuple(target.shape):
            raise _mismatch(name, original, tuple(array.shape),
                            _torch_shape(tuple(target.shape), array.ndim), names, used)
        out[names[name]] = np.ascontiguousarray(value.astype(dtype))
    for name, path in sorted(names.items(), key=lambda item: _order(item[0])):
        if path not in out:
            shown = name if fmt == "diffusers" else diffusers_to_ldm(
                name, len(module.block_out_channels))
            raise _mismatch(name, shown, None, _torch_shape(tuple(flat[path].shape), 0), names,
                            used)
    return traverse_util.unflatten_dict(out)


def module_from_diffusers_config(config: Mapping[str, Any], **options: Any) -> AutoencoderKL:
    """The AutoencoderKL of a diffusers ``config.json`` (a dict); options: dtype, remat, ...

    The latent scale (``config["scaling_factor"]``, 0.18215 for SD 1.x/2.x) is not part of
    the module: the caller keeps it. Raises ConversionError (one line) for options diffjax
    does not build: other block types or activations, no quant convs, no mid-block attention.
    """
    n = len(config.get("block_out_channels", (64,)))
    unsupported = {"down_block_types": ("DownEncoderBlock2D",) * n,
                   "up_block_types": ("UpDecoderBlock2D",) * n, "act_fn": "silu",
                   "use_quant_conv": True, "use_post_quant_conv": True,
                   "mid_block_add_attention": True}
    for name, want in unsupported.items():
        got = config.get(name, want)
        if (tuple(got) if isinstance(got, (list, tuple)) else got) != want:
            raise ConversionError(f"diffusers config has {name}={got!r}; diffjax's AutoencoderKL "
                                  f"builds only {name}={want!r}")
    fields = ("in_channels", "out_channels", "latent_channels", "layers_per_block",
              "norm_num_groups")
    kwargs = {k: int(config[k]) for k in fields if k in config}
    if "block_out_channels" in config:
        kwargs["block_out_channels"] = tuple(int(c) for c in config["block_out_channels"])
    return AutoencoderKL(**kwargs, **options)


def load_checkpoint(path: str | os.PathLike, module: AutoencoderKL,
                    key: str | None = None) -> dict:
    """``module``'s params from a VAE weight file (.safetensors, or .pt/.bin/.ckpt read
    without torch). key: the file's entry holding the state dict if it holds several
    (``"state_dict"`` for a Lightning .ckpt).

    Raises:
      WeightFileError: a missing, corrupt or unsafe file; ConversionError (a subclass): a
        state dict of another architecture (one line: the first mismatching tensor).
    """
    return convert_state_dict(torch_file.load_state_dict(path, key), module)
