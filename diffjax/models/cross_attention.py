"""Context conditioning of the ADM UNet (Flax Linen, NHWC): Stable Diffusion's transformer
blocks and the pooled context embedding.

A context is a sequence of vectors per example, ``context: [B, L, D]`` (e.g. a text
encoder's token outputs), with ``context_mask: [B, L]`` (bool, False = padding: that key is
excluded from every attention over the context). Two ways to attend to it, chosen by the
UNet's ``use_spatial_transformer`` (option names of CompVis/LDM's ``openaimodel.py``):

- GLIDE's (False): ADM's :class:`diffjax.models.layers.AttentionBlock` with ``encoder_kv``,
  the context projected to keys and values placed beside the image tokens' own.
- LDM / Stable Diffusion's (True): :class:`SpatialTransformer` in place of each attention
  block: GroupNorm (eps 1e-6), ``proj_in``, ``transformer_depth`` x
  :class:`BasicTransformerBlock` (LayerNorm + self-attention, LayerNorm + cross-attention
  to the context, LayerNorm + GEGLU feed-forward, each residual), ``proj_out``
  (zero-initialised, as LDM), added to the input.

``use_linear_in_transformer`` (SD 2's Linear ``proj_in`` / ``proj_out``; SD 1's are 1x1
convs) changes neither the function nor the parameters here: on NHWC tokens a 1x1 conv is a
Dense. It records which layout a checkpoint stores, and the converter checks it.

:func:`pool_context` is the other route (GLIDE's ``transformer_proj`` of the last token,
Imagen's mean-pooled text embedding): one vector per example, projected and added to the
timestep embedding (``context_pool``).

Dimension letters as :mod:`diffjax.models.layers`; N heads, d channels per head, S context
length (= L).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffjax.models import layers

Array = jax.Array
Dtype = Any

# How context_pool reduces the context to one vector: "none" (not pooled), "last" (the last
# token, GLIDE's xf_out[:, -1], whatever the mask), "mean" (mean over unmasked tokens).
CONTEXT_POOLS = ("none", "last", "mean")
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default (LDM, diffusers)
TRANSFORMER_NORM_EPS = 1e-6  # the SpatialTransformer's GroupNorm (LDM's Normalize)


def layer_norm(x: Array, name: str, param_dtype: Dtype) -> Array:
    """LayerNorm (eps 1e-5, two-pass variance) in float32, cast back to x.dtype; creates the
    submodule ``name`` (must be called inside a compact method)."""
    norm = layers.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=jnp.float32, param_dtype=param_dtype,
                            use_fast_variance=False, name=name)
    return norm(x.astype(jnp.float32)).astype(x.dtype)


class CrossAttention(nn.Module):
    """Multi-head attention of tokens x to a context (to x itself when context is None):
    q, k, v projections without bias (``to_q``, ``to_k``, ``to_v``), ``to_out`` with bias.

    x: [B, T, C], context: [B, S, D] | None, mask: [B, S] bool | None -> [B, T, C].
    """

    heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    zero_out: bool = False

    @nn.compact
    def __call__(self, x: Array, context: Array | None = None,
                 mask: Array | None = None) -> Array:
        b, t, c = x.shape
        src = x if context is None else context.astype(self.dtype)
        dense = functools.partial(layers.Dense, c, use_bias=False, dtype=self.dtype,
                                  param_dtype=self.param_dtype,
                                  kernel_init=layers.torch_default_init)
        q = dense(name="to_q")(x).reshape(b, t, self.heads, c // self.heads)
        k = dense(name="to_k")(src).reshape(b, src.shape[1], self.heads, c // self.heads)
        v = dense(name="to_v")(src).reshape(b, src.shape[1], self.heads, c // self.heads)
        a = layers.multihead_attention(q, k, v, self.attention_impl, mask).reshape(b, t, c)
        return layers.Dense(c, dtype=self.dtype, param_dtype=self.param_dtype,
                            kernel_init=layers.torch_default_init, name="to_out")(a)


class BasicTransformerBlock(nn.Module):
    """LDM's BasicTransformerBlock (diffusers' with norm_type "layer_norm"):

    h = h + attn1(LN1(h));  h = h + attn2(LN2(h), context);  h = h + ff(LN3(h)),
    ff(u) = ff_out(a * GELU(g)), [a | g] = ff_geglu(u) (GEGLU, inner width 4C, exact GELU).

    x: [B, T, C], context: [B, S, D], mask: [B, S] -> [B, T, C].
    """

    heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array, context: Array, mask: Array | None = None) -> Array:
        c = x.shape[-1]
        attn = functools.partial(CrossAttention, self.heads, self.dtype, self.param_dtype,
                                 self.attention_impl)
        dense = functools.partial(layers.Dense, dtype=self.dtype, param_dtype=self.param_dtype,
                                  kernel_init=layers.torch_default_init)
        x = x + attn(name="attn1")(layer_norm(x, "norm1", self.param_dtype))
        x = x + attn(name="attn2")(layer_norm(x, "norm2", self.param_dtype), context, mask)
        a, g = jnp.split(dense(8 * c, name="ff_geglu")(layer_norm(x, "norm3", self.param_dtype)),
                         2, axis=-1)
        return x + dense(c, name="ff_out")(a * nn.gelu(g, approximate=False))


class SpatialTransformer(nn.Module):
    """LDM's SpatialTransformer (diffusers' Transformer2DModel on continuous inputs):

    out = x + proj_out(blocks(proj_in(GN(x)))), GN with eps 1e-6; heads by ADM's rule
    (``num_heads`` or ``num_head_channels``), d = C / heads; proj_out zero-initialised.

    x: [B, H, W, C], context: [B, S, D], context_mask: [B, S] bool | None -> [B, H, W, C].
    """

    num_heads: int = 1
    num_head_channels: int = -1
    depth: int = 1
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array, context: Array, context_mask: Array | None = None) -> Array:
        b, hh, ww, c = x.shape
        heads = layers.attention_heads(c, self.num_heads, self.num_head_channels)
        dense = functools.partial(layers.Dense, c, dtype=self.dtype, param_dtype=self.param_dtype,
                                  kernel_init=layers.torch_default_init)
        h = layers.group_norm(x, self.norm_groups, "norm", self.param_dtype,
                              eps=TRANSFORMER_NORM_EPS, fast_variance=False)
        h = dense(name="proj_in")(h.reshape(b, hh * ww, c))
        for i in range(self.depth):
            h = BasicTransformerBlock(heads, self.dtype, self.param_dtype, self.attention_impl,
                                      name=f"transformer_blocks_{i}")(h, context, context_mask)
        h = dense(kernel_init=nn.initializers.zeros, name="proj_out")(h)
        return x.astype(h.dtype) + h.reshape(b, hh, ww, c)


def spatial_transformer(m: Any, num_heads: int, depth: int, name: str) -> nn.Module:
    """A :class:`SpatialTransformer` with m's ADM options (``layers.ADMOptions``), remat as
    m.remat / m.remat_policy; call as blk(x, context, context_mask)."""
    cls = layers.remat(SpatialTransformer, m.remat, m.remat_policy)
    return cls(num_heads=num_heads, num_head_channels=m.num_head_channels, depth=depth,
               norm_groups=m.norm_groups, dtype=m.dtype, param_dtype=m.param_dtype,
               attention_impl=m.attention_impl, name=name)


def pool_context(context: Array, context_mask: Array | None, pool: str) -> Array:
    """One vector per example: context [B, L, D], mask [B, L] -> [B, D] float32.

    "last": the last token (GLIDE's ``xf_out[:, -1]``; the mask is not consulted);
    "mean": the mean over unmasked tokens (all tokens without a mask; 0 if all are masked).
    """
    context = context.astype(jnp.float32)
    if pool == "last":
        return context[:, -1]
    if pool != "mean":
        raise ValueError(f"context_pool={pool!r} is invalid; use one of {CONTEXT_POOLS}")
    if context_mask is None:
        return context.mean(axis=1)
    w = context_mask.astype(jnp.float32)[..., None]
    return (context * w).sum(axis=1) / jnp.maximum(w.sum(axis=1), 1.0)
