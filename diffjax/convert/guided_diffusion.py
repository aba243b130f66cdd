"""guided-diffusion / improved-diffusion state dicts -> diffjax parameters.

OpenAI's ``UNetModel``, ``SuperResModel`` and ``EncoderUNetModel`` (openai/guided-diffusion's
``unet.py``; improved-diffusion's has the same names) map one to one onto
:class:`diffjax.models.unet.UNet` and :class:`diffjax.models.classifier.EncoderClassifier`:

=====================================  =========================================
guided-diffusion                       diffjax
=====================================  =========================================
``time_embed.{0,2}``                   ``time_embed/dense_{0,1}``
``label_emb.weight``                   ``label_emb/embedding``
``input_blocks.0.0``                   ``input_blocks_0_conv``
``input_blocks.K.0`` / ``.K.1``        ``input_blocks_K_res`` / ``input_blocks_K_attn``
``input_blocks.K.0`` (``.op``)         ``input_blocks_K_down`` (ResBlock or conv)
``middle_block.{0,1,2}``               ``middle_res_0``, ``middle_attn``, ``middle_res_1``
``output_blocks.K.{0, 1, 1|2}``        ``output_blocks_K_{res, attn, up}`` (Upsample ``.conv``)
``out.0`` / ``out.2``                  ``out_norm`` / ``out_conv`` (UNet)
``out.2.{positional_embedding,...}``   ``out_pool/...`` (classifier, attention pool)
``out.3``                              ``out_proj`` (classifier, adaptive pool)
ResBlock ``in_layers.{0,2}``           ``in_norm``, ``in_conv``
ResBlock ``emb_layers.1``              ``emb_proj``
ResBlock ``out_layers.{0,3}``          ``out_norm``, ``out_conv``
ResBlock ``skip_connection``           ``skip``
Attention ``norm``, ``qkv``,           ``norm``, ``qkv``, ``proj_out``
``proj_out``
=====================================  =========================================

Layouts: 2-D conv weights [O, I, kh, kw] -> HWIO [kh, kw, I, O]; Linear weights [O, I] and
the attention's 1-D convs (kernel size 1, [O, I, 1]) and the adaptive head's 1x1 conv
([O, I, 1, 1]) -> Dense kernels [I, O]; GroupNorm ``weight`` -> ``scale``; the attention
pool's positional embedding [C, L] -> [L, C]. Arrays are cast to the parameter dtype of
the config (fp16 checkpoints -> float32 or bfloat16).

The qkv projection needs no permutation: diffjax splits its output columns exactly as
guided-diffusion does for each order (``layers.split_qkv``: QKVAttention's [q | k | v] for
``use_new_attention_order=True``, QKVAttentionLegacy's per-head [q_h | k_h | v_h] for False).
But that also means the attention options (``num_heads``, ``num_head_channels``,
``num_heads_upsample``, ``use_new_attention_order``) leave every shape unchanged: a wrong
one converts without error and computes another function. Transcribe them from the
released model's flags.

SuperResModel is a UNetModel whose input conv takes 2 * in_channels (x and the upsampled
low-resolution image), which is diffjax's UNet with ``low_res``: the same mapping.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from diffjax.convert import torch_file


class ConversionError(torch_file.WeightFileError):
    """A state dict does not fit the config's model; one line names the first tensor."""


# diffjax submodule (last path part) -> guided-diffusion submodule, inside a ResBlock.
_RES = {"in_norm": "in_layers.0", "in_conv": "in_layers.2", "emb_proj": "emb_layers.1",
        "out_norm": "out_layers.0", "out_conv": "out_layers.3", "skip": "skip_connection"}
# Parameter leaf -> guided-diffusion tensor suffix.
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "embedding": "weight",
         "positional_embedding": "positional_embedding"}
_MIDDLE = {"middle_res_0": "middle_block.0", "middle_attn": "middle_block.1",
           "middle_res_1": "middle_block.2"}
# Modules outside the blocks: label table, output head (UNet), pooling heads (classifier).
_HEAD = {"label_emb": "label_emb", "out_norm": "out.0", "out_conv": "out.2", "out_pool": "out.2",
         "out_proj": "out.3"}
_BLOCK = re.compile(r"(input|output)_blocks_(\d+)_(conv|res|attn|down|up)$")


# ----------------------------------------------------------------------------- names


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """{'a': {'b': x}} -> {('a', 'b'): x} (a parameter tree of nested mappings)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def _block_index(module: str, present: set[str]) -> int:
    """Index of diffjax's ``{input,output}_blocks_K_<part>`` inside ADM's K-th
    TimestepEmbedSequential: [res, attn?, up|down]."""
    kind, k, part = _BLOCK.match(module).groups()
    if part in ("conv", "res", "down"):
        return 0
    if part == "attn":
        return 1
    return 1 + int(f"{kind}_blocks_{k}_attn" in present)  # up


def module_name(path: tuple[str, ...], present: set[str]) -> str:
    """guided-diffusion's module name of diffjax's module path (without the leaf); present:
    the tree's top-level module names (an upsampler follows its level's attention block when
    there is one). Also CompVis/LDM's names outside the transformer blocks
    (:func:`diffjax.convert.sd_unet.ldm_names`)."""
    top, rest = path[0], path[1:]
    if top == "time_embed":
        return {"dense_0": "time_embed.0", "dense_1": "time_embed.2"}[rest[0]]
    if top in _HEAD:
        return ".".join((_HEAD[top],) + rest)  # out_pool/{qkv_proj,c_proj}: out.2.<same>
    match = _BLOCK.match(top)
    if top in _MIDDLE:
        base = _MIDDLE[top]
    elif match:
        kind, k, _ = match.groups()
        base = f"{kind}_blocks.{k}.{_block_index(top, present)}"
    else:
        raise ConversionError(
            f"diffjax parameter {'/'.join(path)} has no guided-diffusion counterpart; "
            "set condition.aug_max=0 (guided-diffusion has no noise-augmentation embedding)")
    if not rest:
        return base
    if rest[0] in _RES and not top.endswith("_attn"):
        return f"{base}.{_RES[rest[0]]}"
    return f"{base}.{rest[0]}"  # Downsample op, Upsample conv; attention norm, qkv, proj_out


def torch_names(abstract_params: Any) -> dict[str, tuple[str, ...]]:
    """guided-diffusion tensor name -> diffjax parameter path, for every diffjax parameter.

    abstract_params: the model's parameter tree (arrays or ShapeDtypeStructs).
    """
    flat = _flatten(abstract_params)
    present = {path[0] for path in flat}
    out = {}
    for path in flat:
        leaf = path[-1]
        if leaf == "positional_embedding":
            name = module_name(path[:-1], present) + ".positional_embedding"
        else:
            name = f"{module_name(path[:-1], present)}.{_LEAF[leaf]}"
        out[name] = path
    return out


# ----------------------------------------------------------------------------- layouts


def _to_diffjax(array: np.ndarray, path: tuple[str, ...], ndim: int) -> np.ndarray | None:
    """The tensor in diffjax's layout for a parameter of rank ``ndim``, or None when its rank
    cannot be that parameter's."""
    leaf = path[-1]
    if leaf == "kernel" and ndim == 4:  # conv OIHW -> HWIO
        return array.transpose(2, 3, 1, 0) if array.ndim == 4 else None
    if leaf == "kernel" and ndim == 2:  # Linear [O, I], conv1d [O, I, 1], 1x1 conv [O, I, 1, 1]
        if array.ndim < 2 or any(d != 1 for d in array.shape[2:]):
            return None
        return array.reshape(array.shape[:2]).T
    if leaf == "positional_embedding":  # [C, L] -> [L, C]
        return array.T if array.ndim == 2 else None
    return array if array.ndim == ndim else None


def _torch_shape(shape: tuple[int, ...], path: tuple[str, ...], torch_ndim: int) -> tuple:
    """The shape guided-diffusion would store for a diffjax parameter of ``shape``."""
    leaf = path[-1]
    if leaf == "kernel" and len(shape) == 4:
        kh, kw, i, o = shape
        return (o, i, kh, kw)
    if leaf == "kernel" and len(shape) == 2:
        return (shape[1], shape[0]) + (1,) * max(0, torch_ndim - 2)
    if leaf == "positional_embedding":
        return tuple(reversed(shape))
    return tuple(shape)


# ----------------------------------------------------------------------------- hints


def _under(prefix: str, names) -> list[str]:
    return [n for n in names if n.startswith(prefix + ".")]


def _hint(name: str, got: tuple | None, want: tuple | None, config_names, ckpt_names) -> str:
    """The config option that most likely explains a mismatch at tensor ``name``
    (got: the checkpoint's shape or None if it lacks the tensor; want: the config's shape in
    guided-diffusion's layout, or None if the config has no such tensor)."""
    missing = got is None or want is None
    if name.startswith("label_emb"):
        if got is None:
            return "model.class_cond=False (the checkpoint is unconditional)"
        if want is None:
            return "model.class_cond=True (the checkpoint is class-conditional)"
        return ("data.num_classes, and guidance.label_dropout=0 (guided-diffusion's table has "
                "no null-label row)")
    if name == "out.2.weight" and not missing and len(got) == 4:
        return ("diffusion.variance_type ('learned_range' when the checkpoint has twice the "
                "image channels: learn_sigma) or data.channels")
    if name.startswith("input_blocks.0.0"):
        return ("data.channels, condition.type='superres' (SuperResModel's input conv takes "
                "2 x channels) or model.model_channels / channel_mult")
    if ".emb_layers." in name and not missing and got[0] in (2 * want[0], want[0] // 2):
        return "model.use_scale_shift_norm"
    if missing and re.match(r"(input|output)_blocks\.\d+\.\d+\.", name):
        module = ".".join(name.split(".")[:3])
        both = _under(module, config_names) + _under(module, ckpt_names) + [name]
        resample = any(re.search(r"\.(op|conv)\.", n) for n in both)
        resblock = any(".in_layers." in n for n in both)
        if resample and resblock:
            return "model.resblock_updown (or model.conv_resample)"
    if missing and re.search(r"^(in|out)put_blocks\..*\.(qkv|proj_out|norm)\.", name):
        return ("model.attention_resolutions (pixel resolutions here, not ADM's downsample "
                "rates) or num_res_blocks")
    if name.startswith("out.2.positional_embedding") and not missing:
        return "data.image_size or model.channel_mult (the attention pool's token count)"
    if name.startswith("out.") and missing:
        return "model.pool ('attention' stores out.2.positional_embedding, 'adaptive' out.3)"
    if name.startswith("time_embed"):
        return "model.model_channels"
    return "model.model_channels, channel_mult or num_res_blocks"


def mismatch_error(shown: str, got: tuple | None, want: tuple | None, hint: str,
                   model: str = "the config's model") -> ConversionError:
    """The one-line error of every converter: tensor ``shown`` is missing (got None), has no
    place (want None) or has another shape; ``hint``: the option(s) to check."""
    if got is None:
        what = f"checkpoint lacks tensor {shown} {want} that {model} needs"
    elif want is None:
        what = f"checkpoint tensor {shown} {got} has no place in {model}"
    else:
        what = f"checkpoint tensor {shown} has shape {got} but {model} needs {want}"
    return ConversionError(f"{what}; check {hint}")


def _mismatch(name: str, got: tuple | None, want: tuple | None, config_names,
              ckpt_names) -> ConversionError:
    return mismatch_error(name, got, want, _hint(name, got, want, config_names, ckpt_names))


# ----------------------------------------------------------------------------- conversion


def convert(state_dict: Mapping[str, np.ndarray], abstract_params: Any) -> dict:
    """guided-diffusion state dict -> diffjax parameters of ``abstract_params``' structure.

    state_dict: ``{name: array}`` (e.g. :func:`torch_file.load_state_dict`); abstract_params:
    the model's parameter tree (``task.abstract_params()``), whose dtypes the arrays take.
    Every tensor must be used and every parameter filled.

    Raises:
      ConversionError: one line naming the first tensor (in the checkpoint's order) that
        does not fit, both shapes, and the config option that likely fixes it.
    """
    names = torch_names(abstract_params)
    flat = _flatten(abstract_params)
    out = {}
    for name, array in state_dict.items():
        array = np.asarray(array)
        if name not in names:
            raise _mismatch(name, tuple(array.shape), None, names, state_dict)
        path = names[name]
        target = flat[path]
        value = _to_diffjax(array, path, len(target.shape))
        if value is None or value.shape != tuple(target.shape):
            raise _mismatch(name, tuple(array.shape),
                            _torch_shape(tuple(target.shape), path, array.ndim), names,
                            state_dict)
        out[path] = np.ascontiguousarray(value.astype(target.dtype))
    for name, path in names.items():
        if path not in out:
            raise _mismatch(name, None, _torch_shape(tuple(flat[path].shape), path, 0), names,
                            state_dict)
    return _unflatten(out)


def convert_unet(state_dict: Mapping[str, np.ndarray], abstract_params: Any) -> dict:
    """UNetModel / SuperResModel state dict -> :class:`diffjax.models.unet.UNet` params."""
    if "out.2.positional_embedding" in state_dict or "out.3.weight" in state_dict:
        raise ConversionError("checkpoint holds an EncoderUNetModel classifier (out.2."
                              "positional_embedding / out.3.weight), not a UNet; use a "
                              "model.name='classifier' config")
    return convert(state_dict, abstract_params)


def convert_classifier(state_dict: Mapping[str, np.ndarray], abstract_params: Any) -> dict:
    """EncoderUNetModel state dict (attention or adaptive pool) -> EncoderClassifier params."""
    if any(k.startswith("output_blocks.") for k in state_dict):
        raise ConversionError("checkpoint holds a UNet (output_blocks.*), not an "
                              "EncoderUNetModel classifier; use a model.name='unet' config")
    return convert(state_dict, abstract_params)


def convert_for(state_dict: Mapping[str, np.ndarray], abstract_params: Any) -> dict:
    """:func:`convert_unet` or :func:`convert_classifier`, whichever ``abstract_params``
    (a UNet's have ``out_conv``) calls for."""
    if "out_conv" in abstract_params:
        return convert_unet(state_dict, abstract_params)
    return convert_classifier(state_dict, abstract_params)


def load_checkpoint(path: str | os.PathLike, config: Any, key: str | None = None) -> dict:
    """The diffjax parameters of a guided-diffusion / improved-diffusion weight file.

    path: a ``.pt`` / ``.pth`` (read without torch, nothing in it executed) or
    ``.safetensors`` file; config: the resolved experiment of the matching config
    (``diffjax.experiment.load("experiments/imagenet64.py")``) or its task, i.e. anything
    with ``.task.abstract_params()`` or ``.abstract_params()``; key: the entry of the file
    that holds the state dict, if it holds several. Returns NumPy arrays in the config's
    parameter dtypes, ready for ``task.apply(params, ...)``.

    Raises:
      WeightFileError: a missing, corrupt or unsafe file; ConversionError (a subclass): a
        state dict of another architecture (one line: the first mismatching tensor).
    """
    task = getattr(config, "task", config)
    if not hasattr(task, "abstract_params"):
        raise TypeError("load_checkpoint(path, config): config must be an Experiment "
                        "(diffjax.experiment.load/build) or a Task")
    abstract = task.abstract_params()
    return convert_for(torch_file.load_state_dict(path, key), abstract)
