"""ADM's noise-aware classifier (Dhariwal & Nichol 2021, `EncoderUNetModel`), Flax Linen.

The encoder half of the UNet (same blocks and parameter names, built by
`layers.encoder_half`), conditioned on the time input only, followed by a pooling head:
- "attention" (ADM's classifier): GroupNorm, SiLU, then CLIP-style attention pooling: the
  spatial mean token is prepended to the H*W tokens, a learned positional embedding
  [H*W + 1, C] is added (ADM stores it transposed, [C, H*W + 1]), multi-head attention with
  num_head_channels per head (q/k/v split in ADM's "new" order) and a projection to
  num_classes; the mean token's output is the logits.
- "adaptive": GroupNorm, SiLU, global average pool, zero-initialised 1x1 projection.
Classifier guidance differentiates log_softmax(logits)[y] w.r.t. x at the matching time t.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffjax.models import layers

Array = jax.Array

POOLS = ("attention", "adaptive")
CLASSIFIER_POOLS = POOLS  # the named choices of `EncoderClassifier.pool`, for configlib


class AttentionPool2d(layers.ReadsParams):
    """[B, H, W, C] -> [B, out_features]: attention pooling onto the mean token (CLIP/ADM)."""

    num_head_channels: int
    out_features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, h, w, c = x.shape
        heads = layers.attention_heads(c, 1, self.num_head_channels)
        tokens = x.reshape(b, h * w, c)
        tokens = jnp.concatenate([tokens.mean(axis=1, keepdims=True), tokens], axis=1)
        pos = self.param("positional_embedding", nn.initializers.normal(c ** -0.5),
                         (h * w + 1, c), self.param_dtype)
        tokens = tokens + pos.astype(tokens.dtype)[None]
        dense = functools.partial(layers.Dense, dtype=self.dtype, param_dtype=self.param_dtype,
                                  kernel_init=layers.torch_default_init)
        qkv = dense(3 * c, name="qkv_proj")(tokens)
        q, k, v = layers.split_qkv(qkv, heads, new_order=True)
        a = jax.nn.dot_product_attention(q[:, :1], k, v).reshape(b, 1, c)
        return dense(self.out_features, name="c_proj")(a)[:, 0]


class EncoderClassifier(nn.Module):
    """Noise-aware classifier: (x [B,H,W,C], t [B]) -> logits [B, num_classes] float32.

    Option names as ADM (`classifier_width` = model_channels, `classifier_depth` =
    num_res_blocks, `classifier_pool` = pool); attention_resolutions are pixel resolutions.
    """

    num_classes: int
    model_channels: int
    num_res_blocks: int
    channel_mult: tuple[int, ...]
    attention_resolutions: tuple[int, ...]
    num_heads: int = 1
    num_head_channels: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    conv_resample: bool = True
    use_new_attention_order: bool = False
    pool: str = "attention"
    dropout: float = 0.0
    norm_groups: int = 32
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False
    remat_policy: str = "block"
    attention_impl: str = "auto"
    cpu_fast_conv: str = "auto"

    def _validate(self, x: Array, t: Array) -> None:
        if self.pool not in POOLS:
            raise ValueError(f"EncoderClassifier pool={self.pool!r} is invalid; use one of {POOLS}")
        if self.pool == "attention" and self.num_head_channels == -1:
            raise ValueError("EncoderClassifier pool='attention' needs num_head_channels > 0")
        if x.ndim != 4:
            raise ValueError(f"EncoderClassifier expects x of shape [B, H, W, C], got {x.shape}")
        factor = 2 ** (len(self.channel_mult) - 1)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(f"EncoderClassifier: image size {x.shape[1]}x{x.shape[2]} must be "
                             f"divisible by 2**(len(channel_mult)-1) = {factor}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"EncoderClassifier expects t of shape [B] = ({x.shape[0]},), "
                             f"got {t.shape}")

    @nn.compact
    def __call__(self, x: Array, t: Array, *, train: bool = False) -> Array:
        """x: [B, H, W, C] noisy images, t: [B] model time input -> [B, num_classes] logits."""
        self._validate(x, t)
        emb = layers.TimeEmbed(self.model_channels, self.dtype, self.param_dtype,
                               name="time_embed")(t)
        h, _ = layers.encoder_half(self, x.astype(self.dtype), emb, train=train)
        h = nn.silu(layers.group_norm(h.astype(jnp.float32), self.norm_groups, "out_norm",
                                      self.param_dtype))
        if self.pool == "attention":
            logits = AttentionPool2d(self.num_head_channels, self.num_classes, self.dtype,
                                     self.param_dtype, name="out_pool")(h)
        else:
            proj = layers.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                                kernel_init=nn.initializers.zeros, name="out_proj")
            logits = proj(h.mean(axis=(1, 2)))
        return logits.astype(jnp.float32)
