"""CLIP text encoder state dicts (transformers' ``CLIPTextModel``, Stable Diffusion 1.x's
``text_encoder``) -> :class:`diffjax.models.clip_text.CLIPTextModel`.

    module = clip_text.module_from_transformers_config(json.load(open("config.json")))
    params = clip_text.load_checkpoint("text_encoder/model.safetensors", module)

==============================================  ===================================
transformers                                    diffjax
==============================================  ===================================
``embeddings.token_embedding.weight``           ``token_embedding/embedding``
``embeddings.position_embedding.weight``        ``position_embedding``
``encoder.layers.I.layer_norm{1,2}``            ``layers_I/layer_norm{1,2}``
``encoder.layers.I.self_attn.{q,k,v,out}_proj`` ``layers_I/self_attn/{q,k,v,out}_proj``
``encoder.layers.I.mlp.fc{1,2}``                ``layers_I/fc{1,2}``
``final_layer_norm``                            ``final_layer_norm``
==============================================  ===================================

Names may carry transformers 4's ``text_model.`` prefix (SD 1.x's released
``text_encoder/``), and a whole CompVis/LDM SD 1.x checkpoint's text encoder is read from
under ``cond_stage_model.transformer.`` (everything else in it is ignored). The
``position_ids`` buffer some files hold is ignored. Linear weights [O, I] -> Dense kernels
[I, O]; LayerNorm ``weight`` -> ``scale``; arrays are cast to the parameter dtype. Every
other tensor must be used and every parameter filled.

SD 2.x's text encoder is OpenCLIP's ViT-H/14 text transformer (``hidden_act`` "gelu"), under
``cond_stage_model.model.`` in a CompVis/LDM SD 2.x checkpoint (or bare, as OpenCLIP saves
it): ``token_embedding``, ``positional_embedding``, ``transformer.resblocks.I.{ln_1,
attn.in_proj_{weight,bias} (q | k | v stacked), attn.out_proj, ln_2, mlp.c_fc,
mlp.c_proj}``, ``ln_final``; its pooled head (``text_projection``, ``logit_scale``) is not
used. SD 2.x conditions on the penultimate block's output through ``ln_final``: diffusers'
SD 2 ``text_encoder`` has 23 of the 24 blocks, and a checkpoint with exactly one block more
than the module converts without its last (a 24-layer module with ``skip_last_layers=1``
computes the same). Errors name OpenCLIP's tensors (``...in_proj_weight[k]``: its k third).
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
from diffjax.models.clip_text import ACTIVATIONS, CLIPTextModel

# Prefixes a CLIP text encoder's tensors carry: a whole SD 1.x checkpoint's (only the tensors
# under it are the encoder), then transformers 4's.
SD_PREFIX = "cond_stage_model.transformer."
_MODEL_PREFIX = "text_model."
_IGNORED = ("embeddings.position_ids",)
# SD 2.x: OpenCLIP's text transformer, whole in the checkpoint under this prefix.
OPENCLIP_PREFIX = "cond_stage_model.model."
_OPENCLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                 "embeddings.position_embedding.weight": "positional_embedding",
                 "final_layer_norm.weight": "ln_final.weight",
                 "final_layer_norm.bias": "ln_final.bias"}
_OPENCLIP_BLOCK = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
                   "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}
_OPENCLIP_UNUSED = ("text_projection", "logit_scale")  # the pooled, contrastive head
_BLOCK_NAME = re.compile(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_OPENCLIP_BLOCK_NAME = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+?)[._](weight|bias)$")
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "embedding": "weight"}


def transformers_names(abstract_params: Any) -> dict[str, tuple[str, ...]]:
    """transformers tensor name (without ``text_model.``) -> diffjax parameter path."""
    out = {}
    for path in traverse_util.flatten_dict(abstract_params):
        top = path[0]
        if top == "position_embedding":
            out["embeddings.position_embedding.weight"] = path
            continue
        if top == "token_embedding":
            name = "embeddings.token_embedding"
        elif top == "final_layer_norm":
            name = "final_layer_norm"
        elif top.startswith("layers_"):
            i, part = top.rsplit("_", 1)[1], path[1]
            inner = ({"self_attn": "self_attn", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}.get(part)
                     or part)
            name = f"encoder.layers.{i}.{inner}" + (f".{path[2]}" if part == "self_attn"
                                                    else "")
        else:
            raise ConversionError(f"diffjax parameter {'/'.join(path)} has no counterpart in "
                                  "transformers' CLIPTextModel")
        out[f"{name}.{_LEAF[path[-1]]}"] = path
    return out


def _hint(name: str) -> str:
    """The CLIPTextModel option that most likely explains a mismatch at ``name``."""
    if "token_embedding" in name:
        return "vocab_size (transformers' vocab_size) or width (hidden_size)"
    if "position_embedding" in name:
        return "context_length (max_position_embeddings) or width (hidden_size)"
    if ".fc1." in name or ".fc2." in name:
        return "mlp_width (intermediate_size) or width (hidden_size)"
    if name.startswith("encoder.layers."):
        return "layers (num_hidden_layers) or width (hidden_size)"
    return "width (hidden_size)"


def openclip_name(name: str) -> tuple[str, int | None]:
    """(OpenCLIP's tensor name, which third of it: 0 / 1 / 2 for q / k / v of ``in_proj``,
    else None) of transformers' tensor ``name`` (without ``text_model.``)."""
    if name in _OPENCLIP_TOP:
        return _OPENCLIP_TOP[name], None
    match = _BLOCK_NAME.match(name)
    if match is None:
        raise ConversionError(f"transformers tensor {name} has no counterpart in OpenCLIP")
    i, module, leaf = match.groups()
    base = f"transformer.resblocks.{i}"
    if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        return f"{base}.attn.in_proj_{leaf}", "qkv".index(module[len("self_attn.")])
    return f"{base}.{_OPENCLIP_BLOCK[module]}.{leaf}", None


def _from_openclip(tensors: Mapping[str, np.ndarray], prefix: str, layers: int
                   ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(OpenCLIP's tensors under transformers' names, each name as the file shows it).

    ``in_proj`` [3W, ...] splits into q / k / v; the pooled head is left out, and so is the
    last block when the file has exactly one more than ``layers`` (SD 2.x conditions on the
    penultimate block, so diffusers' SD 2 text encoder keeps 23 of OpenCLIP's 24)."""
    inverse = {v: k for k, v in _OPENCLIP_TOP.items()}
    inverse_block = {v: k for k, v in _OPENCLIP_BLOCK.items()}
    blocks = {int(m.group(1)) for m in map(_OPENCLIP_BLOCK_NAME.match, tensors) if m}
    skipped = max(blocks) if blocks and max(blocks) == layers else None
    out, shown = {}, {}
    for key, array in tensors.items():
        match = _OPENCLIP_BLOCK_NAME.match(key)
        if key in _OPENCLIP_UNUSED or (match and int(match.group(1)) == skipped):
            continue
        if key in inverse:
            out[inverse[key]], shown[inverse[key]] = array, prefix + key
            continue
        if match is None or (match.group(2) != "attn.in_proj"
                             and match.group(2) not in inverse_block):
            out[key], shown[key] = array, prefix + key  # no place: named in the error
            continue
        i, module, leaf = match.groups()
        if module == "attn.in_proj":
            array = np.asarray(array)
            third = array.shape[0] // 3
            for j, part in enumerate("qkv"):
                name = f"encoder.layers.{i}.self_attn.{part}_proj.{leaf}"
                out[name] = array[j * third:(j + 1) * third]
                shown[name] = f"{prefix}{key}[{part}]"
        else:
            name = f"encoder.layers.{i}.{inverse_block[module]}.{leaf}"
            out[name], shown[name] = array, prefix + key
    return out, shown


def _is_openclip(state_dict: Mapping[str, np.ndarray]) -> bool:
    return any(k.startswith(OPENCLIP_PREFIX) for k in state_dict) or \
        "positional_embedding" in state_dict


def _encoder_part(state_dict: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
    """(the encoder's tensors with their prefix stripped, the prefix as shown in errors)."""
    prefix = ""
    if any(k.startswith(SD_PREFIX) for k in state_dict):
        prefix = SD_PREFIX
        state_dict = {k[len(SD_PREFIX):]: v for k, v in state_dict.items()
                      if k.startswith(SD_PREFIX)}
    if any(k.startswith(_MODEL_PREFIX) for k in state_dict):
        prefix += _MODEL_PREFIX
        state_dict = {k[len(_MODEL_PREFIX):] if k.startswith(_MODEL_PREFIX) else k: v
                      for k, v in state_dict.items()}
    return {k: v for k, v in state_dict.items() if k not in _IGNORED}, prefix


def _torch_shape(shape: tuple[int, ...], path: tuple[str, ...]) -> tuple[int, ...]:
    if path[-1] == "kernel":
        return (shape[1], shape[0])
    return tuple(shape)


def convert(state_dict: Mapping[str, np.ndarray], abstract: Any) -> dict:
    """A CLIPTextModel state dict -> the ``"params"`` tree of ``abstract`` (the module's
    abstract parameters, :func:`abstract_params`), NumPy arrays in its dtypes.

    Raises:
      ConversionError: one line naming the first tensor (in the checkpoint's order, as the
        file names it) that does not fit, both shapes and the option that likely fixes it.
    """
    names = transformers_names(abstract)
    flat = traverse_util.flatten_dict(abstract)
    if _is_openclip(state_dict):
        prefix = OPENCLIP_PREFIX if any(k.startswith(OPENCLIP_PREFIX) for k in state_dict) \
            else ""
        tensors = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        layers = 1 + max((int(p[0].rsplit("_", 1)[1]) for p in flat
                          if p[0].startswith("layers_")), default=-1)
        tensors, shown = _from_openclip(tensors, prefix, layers)

        def show(name: str) -> str:
            if name in shown:
                return shown[name]
            key, third = openclip_name(name)
            return prefix + key + ("" if third is None else f"[{'qkv'[third]}]")
    else:
        tensors, prefix = _encoder_part(state_dict)

        def show(name: str) -> str:
            return prefix + name
    model = "the CLIPTextModel"
    out = {}
    for name, array in tensors.items():
        array = np.asarray(array)
        if name not in names:
            raise mismatch_error(show(name), tuple(array.shape), None, _hint(name), model)
        path = names[name]
        target = flat[path]
        value = array.T if path[-1] == "kernel" and array.ndim == 2 else array
        if value.shape != tuple(target.shape):
            raise mismatch_error(show(name), tuple(array.shape),
                                 _torch_shape(tuple(target.shape), path), _hint(name), model)
        out[path] = np.ascontiguousarray(value.astype(target.dtype))
    for name, path in names.items():
        if path not in out:
            raise mismatch_error(show(name), None, _torch_shape(tuple(flat[path].shape), path),
                                 _hint(name), model)
    return traverse_util.unflatten_dict(out)


def abstract_params(module: CLIPTextModel) -> dict:
    """``module``'s parameters as ShapeDtypeStructs (nothing allocated)."""
    tokens = jax.ShapeDtypeStruct((1, module.context_length), jnp.int32)
    return jax.eval_shape(lambda t: module.init(jax.random.key(0), t), tokens)["params"]


def load_checkpoint(path: str | os.PathLike, module: CLIPTextModel,
                    key: str | None = None) -> dict:
    """``module``'s params from a CLIP text encoder weight file (``.safetensors``, or
    ``.bin`` / ``.pt`` / ``.ckpt`` read without torch; a whole SD 1.x checkpoint gives its
    ``cond_stage_model``); key: the file's entry holding the state dict if it holds several.

    Raises:
      WeightFileError: a missing, corrupt or unsafe file; ConversionError (a subclass): a
        state dict of another architecture (one line: the first mismatching tensor).
    """
    return convert(torch_file.load_state_dict(path, key), abstract_params(module))


def module_from_transformers_config(config: Mapping[str, Any], **options: Any
                                    ) -> CLIPTextModel:
    """The CLIPTextModel of a transformers ``CLIPTextConfig`` (``text_encoder/config.json``
    as a dict; a full ``CLIPConfig``'s ``text_config`` is taken from it); options: dtype,
    param_dtype, attention_impl. Raises ConversionError (one line) for an activation other
    than quick_gelu / gelu."""
    config = config.get("text_config", config)
    act = config.get("hidden_act", "quick_gelu")
    if act not in ACTIVATIONS:
        raise ConversionError(f"CLIP text config has hidden_act={act!r}; diffjax builds "
                              f"{' / '.join(ACTIVATIONS)}")
    return CLIPTextModel(vocab_size=int(config.get("vocab_size", 49408)),
                         context_length=int(config.get("max_position_embeddings", 77)),
                         width=int(config.get("hidden_size", 512)),
                         layers=int(config.get("num_hidden_layers", 12)),
                         heads=int(config.get("num_attention_heads", 8)),
                         mlp_width=int(config.get("intermediate_size", 2048)),
                         activation=act, layer_norm_eps=float(config.get("layer_norm_eps", 1e-5)),
                         **options)
