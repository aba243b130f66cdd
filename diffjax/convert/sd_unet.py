"""Stable Diffusion UNet state dicts (diffusers' ``UNet2DConditionModel`` names) -> the
context-conditioned :class:`diffjax.models.unet.UNet` (``use_spatial_transformer=True``).

    params = load_checkpoint("unet/diffusion_pytorch_model.safetensors", experiment)

========================================  =============================================
diffusers                                 diffjax
========================================  =============================================
``conv_in``                               ``input_blocks_0_conv``
``time_embedding.linear_{1,2}``           ``time_embed/dense_{0,1}``
``class_embedding``                       ``label_emb`` (``num_class_embeds``)
``down_blocks.I.resnets.J``               ``input_blocks_K_res`` (K counts ADM's blocks)
``down_blocks.I.attentions.J``            ``input_blocks_K_attn``
``down_blocks.I.downsamplers.0.conv``     ``input_blocks_K_down``
``mid_block.resnets.{0,1}``               ``middle_res_{0,1}``
``mid_block.attentions.0``                ``middle_attn``
``up_blocks.U.resnets.J`` / ``.attentions.J`` / ``.upsamplers.0.conv``
                                          ``output_blocks_K_{res,attn,up}`` (U = n-1-level)
``conv_norm_out`` / ``conv_out``          ``out_norm`` / ``out_conv``
ResnetBlock2D ``norm1, conv1,             ``in_norm, in_conv, emb_proj, out_norm,
time_emb_proj, norm2, conv2,              out_conv, skip``
conv_shortcut``
Transformer2DModel ``norm, proj_in,       ``norm, proj_in, proj_out``,
proj_out``, ``transformer_blocks.N``      ``transformer_blocks_N``
BasicTransformerBlock ``norm{1,2,3}``,    ``norm{1,2,3}``, ``attn{1,2}/{to_q,...,to_out}``,
``attn{1,2}.to_{q,k,v}``, ``.to_out.0``,  ``ff_geglu``, ``ff_out``
``ff.net.0.proj``, ``ff.net.2``
========================================  =============================================

CompVis/LDM's names (``v1-5-pruned-emaonly.safetensors``, ``v2-1_768-ema-pruned.ckpt``, a
Lightning ``.ckpt``'s ``state_dict``) are read too: tensors under ``model.diffusion_model.``
are the UNet, everything outside that prefix (``first_stage_model.*``: the VAE,
:mod:`diffjax.convert.autoencoder_kl`; ``cond_stage_model.*``: the text encoder;
``model_ema.*``: LitEma's copies; the noise table's buffers) is ignored; a bare LDM
``diffusion_model`` dict (``input_blocks.0.0.weight``, no prefix) is read as well. Its
names are guided-diffusion's (:mod:`diffjax.convert.guided_diffusion`: ``input_blocks.K.M``,
``middle_block.{0,1,2}``, ``output_blocks.K.M``, ``time_embed.{0,2}``, ``out.{0,2}``,
ResBlock ``in_layers`` / ``emb_layers`` / ``out_layers`` / ``skip_connection``, Downsample
``op``, Upsample ``conv``), with SpatialTransformer blocks at ``.1`` whose inner names are
diffusers' (``norm``, ``proj_in``, ``transformer_blocks.N.attn1.to_q``, ..., ``proj_out``).
A non-pruned ``.ckpt`` also holds LitEma's copy of the weights, under ``model_ema.`` with
the names' dots removed: ``key="model_ema"`` (``--key model_ema``) converts that copy, no key
the ``model.diffusion_model`` (non-EMA) weights; the ``-emaonly`` / ``-ema-pruned`` files
hold the EMA weights under ``model.diffusion_model.``.

Layouts: conv [O, I, kh, kw] -> HWIO; Linear [O, I] -> Dense [I, O]; the
transformer's ``proj_in`` / ``proj_out``: a 1x1 conv [O, I, 1, 1] (SD 1.x) or a Linear
(SD 2.x, ``use_linear_projection``) -> Dense [I, O], and the stored rank must be the one
``use_linear_in_transformer`` says; GroupNorm / LayerNorm ``weight`` -> ``scale``. Arrays
are cast to the parameter dtype. The head count, GroupNorm groups and transformer depth of
a checkpoint show in no shape but the last: transcribe them (SD 1.5: 8 heads, 32 groups).
Every tensor must be used and every parameter filled. This module needs flax (it traces the
module's abstract parameters).
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

from diffjax.convert import guided_diffusion, torch_file
from diffjax.convert.guided_diffusion import ConversionError, mismatch_error
from diffjax.models.unet import UNet

_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "embedding": "weight"}
_RES = {"in_norm": "norm1", "in_conv": "conv1", "emb_proj": "time_emb_proj",
        "out_norm": "norm2", "out_conv": "conv2", "skip": "conv_shortcut"}
_BLOCK = {"norm1": "norm1", "norm2": "norm2", "norm3": "norm3", "attn1": "attn1",
          "attn2": "attn2", "ff_geglu": "ff.net.0.proj", "ff_out": "ff.net.2"}
_TOP = {"input_blocks_0_conv": "conv_in", "out_norm": "conv_norm_out", "out_conv": "conv_out",
        "label_emb": "class_embedding", "middle_res_0": "mid_block.resnets.0",
        "middle_res_1": "mid_block.resnets.1", "middle_attn": "mid_block.attentions.0"}
_ADM_BLOCK = re.compile(r"^(input|output)_blocks_(\d+)_(res|attn|down|up)$")
LDM_PREFIX = "model.diffusion_model."  # the UNet's tensors in a CompVis/LDM checkpoint
# LitEma's copy of them in a non-pruned CompVis checkpoint: "model_ema.diffusion_model" + the
# LDM name without its dots (``key="model_ema"`` reads it)
EMA_KEY = "model_ema"
_EMA_PREFIX = "model_ema.diffusion_model"
_PROJ = re.compile(r"(attentions\.\d+|_blocks\.\d+\.1|middle_block\.1)\.proj_(in|out)\.weight$")


# ----------------------------------------------------------------------------- names


def _block_places(module: UNet) -> dict[tuple[str, int], tuple[int, int]]:
    """(``input``/``output``, ADM block index K) -> (diffusers block index, position J)."""
    n, places, k = len(module.channel_mult), {}, 1
    for level in range(n):
        for j in range(module.num_res_blocks):
            places["input", k] = (level, j)
            k += 1
        if level != n - 1:
            places["input", k] = (level, 0)
            k += 1
    k = 0
    for level in reversed(range(n)):
        for i in range(module.num_res_blocks + 1):
            places["output", k] = (n - 1 - level, i)
            k += 1
    return places


def _module_name(path: tuple[str, ...], places) -> str:
    """diffusers' module name of a diffjax module path (without the leaf)."""
    top, rest = path[0], path[1:]
    if top == "time_embed":
        return {"dense_0": "time_embedding.linear_1", "dense_1": "time_embedding.linear_2"}[
            rest[0]]
    match = _ADM_BLOCK.match(top)
    if top in _TOP:
        base = _TOP[top]
    elif match:
        kind, k, part = match.groups()
        i, j = places[kind, int(k)]
        blocks = "down_blocks" if kind == "input" else "up_blocks"
        if part in ("down", "up"):
            return f"{blocks}.{i}.{part}samplers.0.conv"
        base = f"{blocks}.{i}.{'resnets' if part == 'res' else 'attentions'}.{j}"
    else:
        raise ConversionError(
            f"diffjax parameter {'/'.join(path)} has no counterpart in diffusers' "
            "UNet2DConditionModel; set model.context_pool='none' and no noise-augmentation "
            "embedding (condition.aug_max=0)")
    if not rest:
        return base
    if rest[0] in _RES and (top.endswith("_res") or top.startswith("middle_res")):
        return f"{base}.{_RES[rest[0]]}"
    if rest[0] == "encoder_kv" or rest[0] == "qkv":
        raise ConversionError("diffusers' UNet2DConditionModel has SD's transformer blocks, "
                              "not GLIDE's attention: set model.use_spatial_transformer=True")
    if rest[0].startswith("transformer_blocks_"):
        name = f"{base}.transformer_blocks.{rest[0].rsplit('_', 1)[1]}.{_BLOCK[rest[1]]}"
        return f"{name}.{'to_out.0' if rest[2:] == ('to_out',) else '.'.join(rest[2:])}" \
            if rest[1].startswith("attn") else name
    return f"{base}.{rest[0]}"  # the transformer's norm / proj_in / proj_out


def diffusers_names(abstract_params: Any, module: UNet) -> dict[str, tuple[str, ...]]:
    """diffusers tensor name -> diffjax parameter path, for every parameter of the tree."""
    places = _block_places(module)
    return {f"{_module_name(path[:-1], places)}.{_LEAF[path[-1]]}": path
            for path in traverse_util.flatten_dict(abstract_params)}


def _transformer_part(rest: tuple[str, ...]) -> str:
    """The name inside a transformer block (diffusers' and LDM's alike) of diffjax's
    ``transformer_blocks_N/<module>[/<projection>]``."""
    name = f"transformer_blocks.{rest[0].rsplit('_', 1)[1]}.{_BLOCK[rest[1]]}"
    if rest[1].startswith("attn"):
        return f"{name}.{'to_out.0' if rest[2:] == ('to_out',) else '.'.join(rest[2:])}"
    return name


def ldm_names(abstract_params: Any, module: UNet) -> dict[str, tuple[str, ...]]:
    """CompVis/LDM tensor name (without :data:`LDM_PREFIX`) -> diffjax parameter path, for
    every parameter of the tree: guided-diffusion's names around SpatialTransformer blocks
    named inside as diffusers names them."""
    flat = traverse_util.flatten_dict(abstract_params)
    present = {path[0] for path in flat}
    out = {}
    for path in flat:
        top, rest = path[0], path[1:-1]
        if top in ("time_embed", "label_emb", "out_norm", "out_conv", "middle_res_0",
                   "middle_res_1", "middle_attn") or _ADM_BLOCK.match(top) or \
                top == "input_blocks_0_conv":
            if rest and rest[0].startswith("transformer_blocks_"):
                base = guided_diffusion.module_name((top,), present)
                name = f"{base}.{_transformer_part(rest)}"
            elif rest and rest[0] in ("encoder_kv", "qkv"):
                raise ConversionError(
                    "CompVis/LDM's UNet has SD's transformer blocks, not GLIDE's attention: "
                    "set model.use_spatial_transformer=True")
            else:
                name = guided_diffusion.module_name(path[:-1], present)
        else:
            raise ConversionError(
                f"diffjax parameter {'/'.join(path)} has no counterpart in CompVis/LDM's "
                "UNetModel; set model.context_pool='none' and no noise-augmentation embedding "
                "(condition.aug_max=0)")
        out[f"{name}.{_LEAF[path[-1]]}"] = path
    return out


def _lit_ema_part(state_dict: Mapping[str, np.ndarray], names: Mapping[str, Any]
                  ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(LitEma's copy of the UNet under LDM's names ``names``, each name as the file shows
    it); a copy's tensor of no such name keeps its own (its error names it)."""
    flat = {_EMA_PREFIX + name.replace(".", ""): name for name in names}
    if len(flat) < len(names):
        raise ConversionError("LitEma's dot-less names of this UNet's tensors are ambiguous; "
                              "convert the model.diffusion_model.* weights (no key)")
    found = {k: v for k, v in state_dict.items() if k.startswith(_EMA_PREFIX)}
    if not found:
        raise ConversionError(f"the checkpoint holds no LitEma copy ({_EMA_PREFIX}*): a "
                              "pruned file's model.diffusion_model.* are its weights; drop "
                              f"key={EMA_KEY!r}")
    shown = {flat.get(k, k): k for k in found}
    shown.update({name: key for key, name in flat.items()})
    return {flat.get(k, k): v for k, v in found.items()}, shown


def _ldm_part(state_dict: Mapping[str, np.ndarray]
              ) -> tuple[dict[str, np.ndarray], str] | None:
    """(the UNet's tensors of a CompVis/LDM state dict with the prefix stripped, the prefix:
    :data:`LDM_PREFIX` for a whole SD checkpoint, whose other parts are left out, or "" for
    a bare LDM UNet dict), or None for a dict in diffusers' names."""
    if any(name.startswith(LDM_PREFIX) for name in state_dict):
        return {name[len(LDM_PREFIX):]: array for name, array in state_dict.items()
                if name.startswith(LDM_PREFIX)}, LDM_PREFIX
    if "input_blocks.0.0.weight" in state_dict or "time_embed.0.weight" in state_dict:
        return dict(state_dict), ""
    return None


# ----------------------------------------------------------------------------- errors


def _proj(name: str) -> bool:
    """Is ``name`` a transformer's proj_in / proj_out weight (diffusers' or LDM's names)?"""
    return bool(_PROJ.search(name))


def _torch_shape(name: str, shape: tuple[int, ...], module: UNet,
                 torch_ndim: int) -> tuple[int, ...]:
    """The shape a diffusers (or LDM) checkpoint stores for a diffjax parameter of
    ``shape``."""
    if len(shape) == 4:
        kh, kw, i, o = shape
        return (o, i, kh, kw)
    if len(shape) == 2 and not name.endswith(("class_embedding.weight", "label_emb.weight")):
        if _proj(name):
            return (shape[1], shape[0]) + (() if module.use_linear_in_transformer else (1, 1))
        return (shape[1], shape[0]) + (1,) * max(0, torch_ndim - 2)
    return tuple(shape)


def _hint(name: str, got: tuple | None, want: tuple | None) -> str:
    """The config option that most likely explains a mismatch at ``name`` (diffusers' or
    LDM's, without :data:`LDM_PREFIX`)."""
    both = got is not None and want is not None
    if _proj(name) and both and len(got) != len(want):
        return "model.use_linear_in_transformer (SD 2.x's use_linear_projection)"
    if name.startswith(("class_embedding", "label_emb")):
        return "model.class_cond and data.num_classes (diffusers' num_class_embeds)"
    if name.startswith(("conv_in", "conv_out", "input_blocks.0.0.", "out.2.")):
        return "data.channels (the latent channels) or model.model_channels"
    if ".attn2.to_k." in name or ".attn2.to_v." in name:
        return "model.context_dim (diffusers' cross_attention_dim)"
    if ".transformer_blocks." in name and not both:
        return "model.transformer_depth (diffusers' transformer_layers_per_block)"
    ldm_attention = re.match(r"(input_blocks\.\d+\.1|output_blocks\.\d+\.1|middle_block\.1)"
                             r"\.(norm|proj_in|proj_out)\.", name)
    if (".attentions." in name or ldm_attention) and not both:
        return ("model.attention_resolutions (latent resolutions of the CrossAttn blocks) or "
                "model.use_spatial_transformer")
    if name.startswith(("time_embedding", "time_embed.")):
        return "model.model_channels"
    return "model.model_channels, channel_mult or num_res_blocks"


def _mismatch(name: str, got, want, prefix: str = "",
              shown: Mapping[str, str] | None = None) -> ConversionError:
    shown_name = (shown or {}).get(name, prefix + name)
    return mismatch_error(shown_name, got, want, _hint(name, got, want))


# ----------------------------------------------------------------------------- conversion


def abstract_params(module: UNet, image_shape: tuple[int, int, int]) -> dict:
    """``module``'s parameters for inputs [1, *image_shape] as ShapeDtypeStructs (nothing
    allocated); the image size decides where attention sits (attention_resolutions)."""
    b = (1,)
    x = jax.ShapeDtypeStruct(b + tuple(image_shape), jnp.float32)
    t = jax.ShapeDtypeStruct(b, jnp.float32)
    y = None if module.num_classes is None else jax.ShapeDtypeStruct(b, jnp.int32)
    ctx = jax.ShapeDtypeStruct((1, 1, module.context_dim), jnp.float32)
    return jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a[:3], context=a[3]),
                          x, t, y, ctx)["params"]


def convert(state_dict: Mapping[str, np.ndarray], abstract: Any, module: UNet,
            ema: bool = False) -> dict:
    """An SD UNet state dict -> ``module``'s ``"params"`` tree (NumPy arrays in the dtypes of
    ``abstract``, its abstract parameters): diffusers' UNet2DConditionModel names, or
    CompVis/LDM's (a whole SD checkpoint's ``model.diffusion_model.*``; see the module
    docstring). ema: read LitEma's copy (``model_ema.*``) of a non-pruned CompVis checkpoint.

    Raises:
      ConversionError: one line naming the first tensor (in the checkpoint's order) that does
        not fit, both shapes (checkpoint layout) and the option that likely fixes it.
    """
    if not module.context_dim or not module.use_spatial_transformer:
        raise ConversionError("SD's UNet (diffusers' UNet2DConditionModel, CompVis/LDM's "
                              "UNetModel) is context-conditioned: set model.context_dim > 0 "
                              "and model.use_spatial_transformer=True")
    flat = traverse_util.flatten_dict(abstract)
    ldm, prefix, shown = _ldm_part(state_dict), "", {}  # errors name tensors as the file does
    if ema:
        names = ldm_names(abstract, module)
        state_dict, shown = _lit_ema_part(state_dict, names)
    elif ldm is None:
        names = diffusers_names(abstract, module)
    else:
        (state_dict, prefix), names = ldm, ldm_names(abstract, module)
    out = {}
    for name, array in state_dict.items():
        array = np.asarray(array)
        if name not in names:
            raise _mismatch(name, tuple(array.shape), None, prefix, shown)
        path = names[name]
        target = flat[path]
        want = _torch_shape(name, tuple(target.shape), module, array.ndim)
        value = (array if path[-1] == "embedding"
                 else torch_file.flax_layout(array, len(target.shape)))
        if value is None or value.shape != tuple(target.shape) or (
                _proj(name) and array.ndim != len(want)):
            raise _mismatch(name, tuple(array.shape), want, prefix, shown)
        out[path] = np.ascontiguousarray(value.astype(target.dtype))
    for name, path in names.items():
        if path not in out:
            raise _mismatch(name, None, _torch_shape(name, tuple(flat[path].shape), module, 0),
                            prefix, shown)
    return traverse_util.unflatten_dict(out)


def convert_state_dict(state_dict: Mapping[str, np.ndarray], module: UNet,
                       image_shape: tuple[int, int, int], param_dtype: Any = None) -> dict:
    """:func:`convert` for ``module`` on inputs of ``image_shape`` (H, W, C); param_dtype:
    the arrays' dtype (default ``module.param_dtype``)."""
    abstract = abstract_params(module, image_shape)
    if param_dtype is not None:
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, np.dtype(param_dtype)),
                                abstract)
    return convert(state_dict, abstract, module)


def load_checkpoint(path: str | os.PathLike, config: Any, key: str | None = None) -> dict:
    """The diffjax parameters of an SD UNet weight file (``.safetensors``, or ``.bin`` /
    ``.pt`` / ``.ckpt`` read without torch; diffusers' or CompVis/LDM's names) for
    ``config``: a resolved Experiment or its Task (anything with ``.task.abstract_params()``
    or ``.abstract_params()`` and ``.model``). key: the file's entry holding the state dict,
    or ``"model_ema"``: LitEma's copy of a non-pruned CompVis checkpoint (``--key model_ema``).

    Raises:
      WeightFileError: a missing, corrupt or unsafe file; ConversionError (a subclass): a
        state dict of another architecture (one line: the first mismatching tensor).
    """
    task = getattr(config, "task", config)
    ema = key == EMA_KEY
    return convert(torch_file.load_state_dict(path, None if ema else key),
                   task.abstract_params(), task.model, ema=ema)


def module_from_diffusers_config(config: Mapping[str, Any], **options: Any) -> UNet:
    """The UNet of a diffusers UNet2DConditionModel ``config.json`` (a dict); options:
    dtype, remat, ... Attention sits at the latent resolutions sample_size / 2**i of the
    ``CrossAttnDownBlock2D`` levels. Raises ConversionError (one line) for options diffjax
    does not build."""
    boc = tuple(int(c) for c in config.get("block_out_channels", (320, 640, 1280, 1280)))
    n = len(boc)
    downs = tuple(config.get("down_block_types", ("CrossAttnDownBlock2D",) * (n - 1)
                             + ("DownBlock2D",)))
    cross = tuple(d == "CrossAttnDownBlock2D" for d in downs)
    ups = tuple("CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(cross))
    unsupported = {"up_block_types": ups, "mid_block_type": "UNetMidBlock2DCrossAttn",
                   "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0,
                   "norm_eps": 1e-5, "class_embed_type": None, "addition_embed_type": None,
                   "time_embedding_type": "positional", "only_cross_attention": False,
                   "dual_cross_attention": False, "resnet_time_scale_shift": "default",
                   "encoder_hid_dim": None, "time_cond_proj_dim": None,
                   "conv_in_kernel": 3, "conv_out_kernel": 3, "center_input_sample": False}
    for name, want in unsupported.items():
        got = config.get(name, want)
        if (tuple(got) if isinstance(got, (list, tuple)) else got) != want:
            raise ConversionError(f"diffusers config has {name}={got!r}; diffjax's UNet "
                                  f"builds only {name}={want!r}")
    if set(downs) - {"CrossAttnDownBlock2D", "DownBlock2D"}:
        raise ConversionError(f"diffusers config has down_block_types={downs!r}; diffjax "
                              "builds CrossAttnDownBlock2D / DownBlock2D")
    # attention_head_dim is diffusers' legacy name of the head count (num_attention_heads).
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    heads = tuple(heads) if isinstance(heads, (list, tuple)) else (heads,) * n
    head_channels = {c // h for c, h, x in zip(boc, heads, cross) if x}
    kwargs: dict[str, Any] = {"num_heads": int(heads[0]), "num_head_channels": -1}
    if len(set(heads)) > 1:
        if len(head_channels) != 1:
            raise ConversionError(f"diffusers config's attention_head_dim={heads!r} gives "
                                  "neither one head count nor one head width")
        kwargs = {"num_heads": -1, "num_head_channels": head_channels.pop()}
    depth = config.get("transformer_layers_per_block", 1)
    if isinstance(depth, (list, tuple)):
        if len(set(depth)) != 1:
            raise ConversionError(f"diffusers config has transformer_layers_per_block={depth!r}"
                                  "; diffjax builds one depth for every level")
        depth = depth[0]
    size = int(config.get("sample_size", 64))
    return UNet(out_channels=int(config.get("out_channels", 4)), model_channels=boc[0],
                num_res_blocks=int(config.get("layers_per_block", 2)),
                channel_mult=tuple(c // boc[0] for c in boc),
                attention_resolutions=tuple(size // 2 ** i for i, x in enumerate(cross) if x),
                norm_groups=int(config.get("norm_num_groups", 32)),
                context_dim=int(config.get("cross_attention_dim", 768)),
                use_spatial_transformer=True, transformer_depth=int(depth),
                use_linear_in_transformer=bool(config.get("use_linear_projection", False)),
                num_classes=config.get("num_class_embeds"), **kwargs, **options)
