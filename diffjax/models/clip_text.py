"""CLIP's text transformer (Radford et al. 2021), Stable Diffusion 1.x's text encoder, in Flax
Linen: the network of transformers' ``CLIPTextModel`` (``openai/clip-vit-large-patch14``'s
text tower in SD 1.x), with its parameter names, so released weights convert one to one
(:mod:`diffjax.convert.clip_text`).

tokens [B, L] int32 (CLIP's BPE ids: ``<|startoftext|>`` 49406 ... ``<|endoftext|>`` 49407,
then padding) -> one vector per token [B, L, width]: token embedding plus a learned
positional embedding, ``layers`` pre-LayerNorm blocks (causal self-attention: each token sees
itself and the tokens before it; an MLP of ``mlp_width`` with CLIP's quick GELU, x *
sigmoid(1.702 x)), each residual, and a final LayerNorm. SD 1.x conditions its UNet on that
output for all 77 tokens of the padded prompt, with no padding mask; ``skip_last_layers``
("CLIP skip") takes the output of an earlier block through the final LayerNorm instead, as
diffusers' ``clip_skip`` does.

Nothing here tokenizes: CLIP's BPE vocabulary is a file of the released model
(``tokenizer/vocab.json`` and ``merges.txt``), read by :class:`diffjax.text.CLIPTokenizer`.
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

ACTIVATIONS = ("quick_gelu", "gelu")


def quick_gelu(x: Array) -> Array:
    """CLIP's GELU approximation x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


class CLIPAttention(nn.Module):
    """Multi-head causal self-attention with biased q/k/v/out projections (``q_proj``,
    ``k_proj``, ``v_proj``, ``out_proj``): x [B, L, W], mask [B, L] bool | None (False = a
    padding key) -> [B, L, W]."""

    width: int
    heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array, mask: Array | None) -> Array:
        dense = functools.partial(layers.Dense, self.width, dtype=self.dtype,
                                  param_dtype=self.param_dtype,
                                  kernel_init=layers.torch_default_init)
        b, n, _ = x.shape
        d = self.width // self.heads
        q, k, v = (dense(name=f"{p}_proj")(x).reshape(b, n, self.heads, d) for p in "qkv")
        impl = layers.attention_implementation(self.attention_impl, q.dtype, d, num_queries=n)
        impl = "xla" if impl == "blocked" else impl  # blocked attention has no causal mask
        keys = None
        if mask is not None:
            keys = mask[:, None, None, :]
            if impl == "cudnn":  # its bias must span the query length
                keys = jnp.broadcast_to(keys, (b, 1, n, n))
        a = jax.nn.dot_product_attention(q, k, v, mask=keys, is_causal=True,
                                         implementation=impl)
        return dense(name="out_proj")(a.reshape(b, n, self.width))


class CLIPEncoderLayer(nn.Module):
    """x + self_attn(layer_norm1(x)), then x + fc2(act(fc1(layer_norm2(x))))."""

    width: int
    heads: int
    mlp_width: int
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array, mask: Array | None) -> Array:
        norm = functools.partial(layers.LayerNorm, epsilon=self.layer_norm_eps,
                                 dtype=jnp.float32, param_dtype=self.param_dtype,
                                 use_fast_variance=False)
        dense = functools.partial(layers.Dense, dtype=self.dtype, param_dtype=self.param_dtype,
                                  kernel_init=layers.torch_default_init)
        h = norm(name="layer_norm1")(x.astype(jnp.float32)).astype(x.dtype)
        x = x + CLIPAttention(self.width, self.heads, self.dtype, self.param_dtype,
                              self.attention_impl, name="self_attn")(h, mask).astype(x.dtype)
        h = norm(name="layer_norm2")(x.astype(jnp.float32)).astype(x.dtype)
        h = dense(self.mlp_width, name="fc1")(h)
        h = quick_gelu(h) if self.activation == "quick_gelu" else nn.gelu(h, approximate=False)
        return x + dense(self.width, name="fc2")(h).astype(x.dtype)


class CLIPTextModel(layers.ReadsParams):
    """tokens [B, L] int32, mask [B, L] bool or None (False = padding, excluded as a key;
    SD 1.x passes none) -> [B, L, width] float32, L <= context_length.

    Defaults: SD 1.x's text encoder (CLIP ViT-L/14: vocabulary 49408, 77 positions, width
    768, 12 layers of 12 heads, MLP 3072, quick GELU; 123,060,480 parameters). Parameters:
    ``token_embedding/embedding``, ``position_embedding`` [context_length, width],
    ``layers_{i}/{layer_norm1, self_attn/{q,k,v,out}_proj, layer_norm2, fc1, fc2}``,
    ``final_layer_norm``.
    """

    vocab_size: int = 49408
    context_length: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    def _validate(self, tokens: Array, mask: Array | None, skip_last_layers: int) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"CLIPTextModel: activation {self.activation!r} is unknown; use "
                             f"one of {ACTIVATIONS}")
        if self.heads < 1 or self.width % self.heads:
            raise ValueError(f"CLIPTextModel: width={self.width} is not divisible by "
                             f"heads={self.heads}")
        if tokens.ndim != 2:
            raise ValueError(f"CLIPTextModel expects tokens of shape [B, L], got {tokens.shape}")
        if tokens.shape[1] > self.context_length:
            raise ValueError(f"CLIPTextModel: {tokens.shape[1]} tokens per text exceed "
                             f"context_length={self.context_length}; truncate or pad the "
                             "prompt to it (SD: 77)")
        if mask is not None and mask.shape != tokens.shape:
            raise ValueError(f"CLIPTextModel expects mask of shape [B, L] = {tokens.shape}, "
                             f"got {mask.shape}")
        if not 0 <= skip_last_layers < self.layers:
            raise ValueError(f"CLIPTextModel: skip_last_layers={skip_last_layers} must be in "
                             f"[0, {self.layers})")

    @nn.compact
    def __call__(self, tokens: Array, mask: Array | None = None, *,
                 skip_last_layers: int = 0) -> Array:
        """skip_last_layers: the output of block ``layers - skip_last_layers`` (0: the last),
        through the final LayerNorm."""
        self._validate(tokens, mask, skip_last_layers)
        h = layers.Embed(self.vocab_size, self.width, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="token_embedding")(tokens)
        pos = self.param("position_embedding", nn.initializers.normal(0.01),
                         (self.context_length, self.width), self.param_dtype)
        h = h + pos[:tokens.shape[1]].astype(h.dtype)
        mask = None if mask is None else mask.astype(bool)
        block = functools.partial(CLIPEncoderLayer, self.width, self.heads, self.mlp_width,
                                  self.activation, self.layer_norm_eps, self.dtype,
                                  self.param_dtype, self.attention_impl)
        for i in range(self.layers - skip_last_layers):
            h = block(name=f"layers_{i}")(h, mask)
        if skip_last_layers and self.is_initializing():  # the skipped blocks' parameters
            for i in range(self.layers - skip_last_layers, self.layers):
                block(name=f"layers_{i}")(h, mask)
        norm = layers.LayerNorm(epsilon=self.layer_norm_eps, dtype=jnp.float32,
                                param_dtype=self.param_dtype, use_fast_variance=False,
                                name="final_layer_norm")
        return norm(h.astype(jnp.float32))
