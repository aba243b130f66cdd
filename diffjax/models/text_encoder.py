"""GLIDE's text transformer, trained jointly with the denoiser (Flax Linen; issue 13).

:class:`TextEncoder` maps tokens [B, L] (0 = padding, :mod:`diffjax.text`) to one vector
per token, [B, L, W]: token embedding plus a learned positional embedding, ``layers``
pre-LayerNorm transformer blocks (non-causal self-attention whose keys exclude padding,
then an MLP of 4W with GELU, each residual) and a final LayerNorm. As GLIDE's ``xf``
(``Transformer`` with ``xf_padding``); qkv columns per head [q_h | k_h | v_h] as its
``QKVMultiheadAttention``.

:class:`TextConditioned` joins it to a context-conditioned denoiser (a
:class:`diffjax.models.unet.UNet` with ``context_dim = W``): the encoder's outputs are the
denoiser's ``context`` and the padding its ``context_mask``. A caption row of all -1 is the
null caption of classifier-free guidance: its context is a learned null sequence
(``null_context``, every entry attended), so dropping captions in training and guiding at
sampling time need no special token.

Dimension letters as :mod:`diffjax.models.layers`; L tokens per text (<= context_length),
W width, N heads, d = W / N channels per head.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffjax.models import layers
from diffjax.models.cross_attention import layer_norm

Array = jax.Array
Dtype = Any


class TextBlock(nn.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x)): x [B, L, W], mask [B, L] bool -> [B, L, W]."""

    width: int
    heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array, mask: Array) -> Array:
        dense = functools.partial(layers.Dense, dtype=self.dtype, param_dtype=self.param_dtype,
                                  kernel_init=layers.torch_default_init)
        b, n, w = x.shape
        h = layer_norm(x, "ln_1", self.param_dtype)
        q, k, v = layers.split_qkv(dense(3 * w, name="c_qkv")(h), self.heads, False)
        a = layers.multihead_attention(q, k, v, self.attention_impl, mask)
        x = x + dense(w, name="c_proj")(a.reshape(b, n, w)).astype(x.dtype)
        h = layer_norm(x, "ln_2", self.param_dtype)
        h = nn.gelu(dense(4 * w, name="mlp_fc")(h), approximate=False)
        return x + dense(w, name="mlp_proj")(h).astype(x.dtype)


class TextEncoder(layers.ReadsParams):
    """tokens [B, L] int32 (0 = padding), mask [B, L] bool (False = padding, excluded as a
    key) -> [B, L, width] float32; L <= context_length.

    A row whose mask is all False attends uniformly (finite, meaningless); callers give
    such rows a mask of all True (see :class:`TextConditioned`).
    """

    vocab_size: int
    context_length: int
    width: int
    layers: int
    heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    def _validate(self, tokens: Array, mask: Array) -> None:
        if tokens.ndim != 2:
            raise ValueError(f"TextEncoder expects tokens of shape [B, L], got {tokens.shape}")
        if mask.shape != tokens.shape:
            raise ValueError(f"TextEncoder expects mask of shape [B, L] = {tokens.shape}, got "
                             f"{mask.shape}")
        if tokens.shape[1] > self.context_length:
            raise ValueError(f"TextEncoder: {tokens.shape[1]} tokens per text exceed "
                             f"context_length={self.context_length}; encode with the "
                             "tokenizer the model was trained with")
        if self.heads < 1 or self.width % self.heads:
            raise ValueError(f"TextEncoder: width={self.width} is not divisible by "
                             f"heads={self.heads}")

    @nn.compact
    def __call__(self, tokens: Array, mask: Array) -> Array:
        self._validate(tokens, mask)
        h = layers.Embed(self.vocab_size, self.width, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="token_embedding")(tokens)
        pos = self.param("positional_embedding", nn.initializers.normal(0.01),
                         (self.context_length, self.width), self.param_dtype)
        h = h + pos[:tokens.shape[1]].astype(h.dtype)
        mask = mask.astype(bool)
        for i in range(self.layers):
            h = TextBlock(self.width, self.heads, self.dtype, self.param_dtype,
                          self.attention_impl, name=f"block_{i}")(h, mask)
        return layer_norm(h.astype(jnp.float32), "final_ln", self.param_dtype)


class TextConditioned(layers.ReadsParams):
    """A denoiser conditioned on captions through a jointly trained :class:`TextEncoder`.

    (x, t, y, ...) -> denoiser(x, t, None, context=..., context_mask=..., ...), with y:
    tokens [B, L] int32 (0 = padding; a row of all -1 = the null caption). Parameters:
    ``text_encoder``, ``null_context`` [context_length, width] and ``denoiser``.

    denoiser: a module taking ``context`` [B, L, width] and ``context_mask`` [B, L] (a UNet
    with ``context_dim = encoder.width``); it casts the float32 context to its own dtype.
    """

    denoiser: nn.Module
    encoder: TextEncoder

    @nn.compact
    def __call__(self, x: Array, t: Array, y: Array | None, *, train: bool = False,
                 **kwargs: Any) -> Array:
        """x: [B, H, W, C], t: [B], y: [B, L] int32 -> the denoiser's output."""
        if y is None or y.ndim != 2 or y.shape[0] != x.shape[0]:
            raise ValueError(f"TextConditioned expects captions y of shape [B, L] = "
                             f"({x.shape[0]}, L) int32, got "
                             f"{None if y is None else y.shape}")
        if not jnp.issubdtype(y.dtype, jnp.integer):
            raise ValueError(f"TextConditioned expects integer tokens y, got {y.dtype}")
        enc = self.encoder
        null_context = self.param("null_context", nn.initializers.normal(0.02),
                                  (enc.context_length, enc.width), enc.param_dtype)
        null = (y[:, 0] < 0)[:, None]  # [B, 1]
        tokens = jnp.maximum(y, 0)
        mask = (tokens > 0) | null  # null rows: every entry attended, nothing NaN
        encoded = enc.clone(parent=self, name="text_encoder")(tokens, mask)
        nulls = null_context[:y.shape[1]].astype(jnp.float32)[None]
        context = jnp.where(null[..., None], nulls, encoded)
        return self.denoiser(x, t, None, train=train, context=context, context_mask=mask,
                             **kwargs)


def pack_context(context: Array, mask: Array | None = None) -> Array:
    """Precomputed embeddings [B, L, D] and their mask [B, L] (bool; None = all valid) as the
    one conditioning array of :class:`EmbeddingConditioned`: [B, L, D + 1] float32, the mask
    in the last channel. A row of zeros (every entry masked) is the null condition."""
    context = jnp.asarray(context, jnp.float32)
    if mask is None:
        mask = jnp.ones(context.shape[:2], bool)
    return jnp.concatenate([context, jnp.asarray(mask, jnp.float32)[..., None]], axis=-1)


class EmbeddingConditioned(layers.ReadsParams):
    """A denoiser conditioned on precomputed embeddings stored with the data (a user's T5 or
    CLIP outputs, read by :class:`diffjax.data.text_source.EmbeddingSource`).

    (x, t, y, ...) -> denoiser(x, t, None, context=..., context_mask=..., ...), with y:
    [B, L, width + 1] float (:func:`pack_context`: the embeddings and, in the last channel,
    their mask). A row with every entry masked is the null condition of classifier-free
    guidance: its context is the learned ``null_context`` [context_length, width] (every entry
    attended). Parameters: ``null_context`` and ``denoiser``.
    """

    denoiser: nn.Module
    context_length: int
    width: int
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, t: Array, y: Array | None, *, train: bool = False,
                 **kwargs: Any) -> Array:
        """x: [B, H, W, C], t: [B], y: [B, L, width + 1] -> the denoiser's output."""
        if y is None or y.ndim != 3 or y.shape[0] != x.shape[0] or \
                y.shape[2] != self.width + 1 or y.shape[1] > self.context_length:
            raise ValueError(f"EmbeddingConditioned expects y of shape [B, L, width + 1] = "
                             f"({x.shape[0]}, <= {self.context_length}, {self.width + 1}), got "
                             f"{None if y is None else y.shape}")
        null_context = self.param("null_context", nn.initializers.normal(0.02),
                                  (self.context_length, self.width), self.param_dtype)
        y = y.astype(jnp.float32)
        mask = y[..., -1] > 0.5
        null = ~jnp.any(mask, axis=1, keepdims=True)  # [B, 1]
        nulls = null_context[:y.shape[1]].astype(jnp.float32)[None]
        context = jnp.where(null[..., None], nulls, y[..., :-1])
        return self.denoiser(x, t, None, train=train, context=context,
                             context_mask=mask | null, **kwargs)
