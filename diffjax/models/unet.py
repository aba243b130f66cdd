"""The ADM UNet of Dhariwal & Nichol (2021), Flax Linen, NHWC.

Option names are those of openai/guided-diffusion's `UNetModel`, so its configs transcribe
one to one, with one deliberate difference: `attention_resolutions` holds pixel resolutions
(e.g. (32, 16, 8) at 64x64), not ADM's downsample rates (ADM's `image_size // res`).

Architecture (per `channel_mult` level: `num_res_blocks` ResBlocks, each followed by
attention when the current height is in `attention_resolutions`, then a downsample; a middle
ResBlock-Attention-ResBlock; the mirrored decoder with `num_res_blocks + 1` ResBlocks per
level, each taking the concatenated skip of the matching encoder block; GroupNorm, SiLU and a
zero-initialised 3x3 conv to the output). With learn_sigma the output has 2*out_channels
channels: [mean output | variance interpolation v] as in iDDPM.

Notes:
- `use_new_attention_order` changes only how the qkv projection's columns are split into
  heads and q/k/v (ADM's QKVAttention vs QKVAttentionLegacy); parameter shapes and counts are
  the same, the function of given weights is not.
- `class_null_label=True` adds row `num_classes` to the label table: the null label used by
  classifier-free guidance (the trainer drops labels to it).
- `low_res` (super-resolution, ADM's SuperResModel) is resized to the input's H, W by
  bilinear interpolation with half-pixel centres (PyTorch's `align_corners=False`) and
  concatenated to x on channels, so the first conv sees C + C_low channels.
- `aug_embed=True` adds `aug_level` ([B] float, the noise level of the noise-conditioning
  augmentation of `low_res`, cascaded diffusion) to the conditioning: embedded by a second
  TimeEmbed ("aug_embed") added to the time embedding. Off by default (params unchanged).
- `norm_groups` (32 in ADM) exists so that tiny test models can have few channels.
- `cpu_fast_conv`: "on" computes conv weight gradients by shifted GEMMs on the CPU backend
  (never on TPU/GPU); "auto" follows `layers.CPU_FAST_CONV_AUTO` (False: XLA's native
  gradient, measured faster on the current development CPU); "off" is always native. See
  the `layers` module docstring.
- `remat`: every ResBlock and AttentionBlock is rematerialised (`nn.remat`); same params,
  same outputs and gradients, less activation memory. `remat_policy` "block" recomputes the
  whole block in the backward pass, "dots" keeps its convolution and matmul outputs
  (`layers.REMAT_POLICIES`).
- `attention_impl`: "auto" (cuDNN's fused flash attention on GPU in bf16/fp16; on CPU
  "blocked" from 512 tokens; else XLA's), "xla", "cudnn" or "blocked"
  (`layers.attention_implementation`, `layers.blocked_attention`); same params, same
  function.
- Context conditioning (`diffjax.models.cross_attention`; names of CompVis/LDM's UNetModel):
  `context_dim` > 0 makes the UNet take `context` [B, L, context_dim] and optionally
  `context_mask` [B, L] (bool, False = padding). Every attention block attends to it:
  `use_spatial_transformer=False` is GLIDE's form (the block's `encoder_kv` adds the
  context's keys and values to its own), True is LDM / Stable Diffusion's (a
  SpatialTransformer of `transformer_depth` blocks of self-attention, cross-attention and a
  GEGLU feed-forward; `use_linear_in_transformer`: SD 2's Linear proj_in/out, the same
  function here). `context_pool` "last" (GLIDE) or "mean" (Imagen) also adds a projection
  (`context_proj`) of the pooled context to the time embedding. With context_dim=0 (the
  default) nothing changes. SD 1.5's UNet is model_channels 320, channel_mult (1, 2, 4, 4),
  num_res_blocks 2, attention_resolutions (64, 32, 16) at a 64x64 latent, num_heads 8,
  context_dim 768, use_spatial_transformer (experiments/sd15_unet.py).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffjax.models import cross_attention, layers

Array = jax.Array


def upsample_low_res(low_res: Array, height: int, width: int) -> Array:
    """Bilinear resize with half-pixel centres, edges clamped (PyTorch `F.interpolate(...,
    mode="bilinear")` with align_corners=False, as ADM's SuperResModel).

    low_res: [B, h, w, C] -> [B, height, width, C].
    """
    shape = (low_res.shape[0], height, width, low_res.shape[3])
    return jax.image.resize(low_res, shape, "bilinear", antialias=False)


class UNet(nn.Module):
    """ADM UNet: (x [B,H,W,C], t [B], y [B] | None) -> [B, H, W, out_channels * (1 + learn_sigma)].

    `t` is the model's time input (e.g. the timestep index in [0, T), fed to the sinusoid).
    Dropout draws from the "dropout" RNG stream when train=True and dropout > 0. Labels must
    lie in [0, num_classes] (num_classes = the null label, if class_null_label): traced
    values cannot be checked, and out-of-range indices are clamped by the table lookup.
    """

    out_channels: int
    model_channels: int
    num_res_blocks: int
    channel_mult: tuple[int, ...]
    attention_resolutions: tuple[int, ...]
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    dropout: float = 0.0
    num_classes: int | None = None
    class_null_label: bool = False
    learn_sigma: bool = False
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    conv_resample: bool = True
    use_new_attention_order: bool = False
    norm_groups: int = 32
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False
    remat_policy: str = "block"
    attention_impl: str = "auto"
    cpu_fast_conv: str = "auto"
    aug_embed: bool = False
    context_dim: int = 0
    use_spatial_transformer: bool = False
    transformer_depth: int = 1
    use_linear_in_transformer: bool = False
    context_pool: str = "none"

    def _validate_context(self, x: Array, context: Array | None,
                          context_mask: Array | None) -> None:
        if (context is None) != (self.context_dim <= 0):
            raise ValueError("UNet: pass context [B, L, D] if and only if context_dim > 0 "
                             f"(context_dim={self.context_dim}, context given: "
                             f"{context is not None})")
        if context is None:
            if context_mask is not None:
                raise ValueError("UNet: context_mask given without a context")
            return
        if context.ndim != 3 or context.shape[0] != x.shape[0] or \
                context.shape[2] != self.context_dim:
            raise ValueError(f"UNet expects context of shape [B, L, context_dim] = "
                             f"({x.shape[0]}, L, {self.context_dim}), got {context.shape}")
        if context_mask is not None and context_mask.shape != context.shape[:2]:
            raise ValueError(f"UNet expects context_mask of shape [B, L] = "
                             f"{context.shape[:2]}, got {context_mask.shape}")
        if self.context_pool not in cross_attention.CONTEXT_POOLS:
            raise ValueError(f"context_pool={self.context_pool!r} is invalid; use one of "
                             f"{cross_attention.CONTEXT_POOLS}")
        if self.transformer_depth < 1:
            raise ValueError(f"transformer_depth={self.transformer_depth} must be >= 1")

    def _validate(self, x: Array, t: Array, y: Array | None, low_res: Array | None) -> None:
        if x.ndim != 4:
            raise ValueError(f"UNet expects x of shape [B, H, W, C], got {x.shape}")
        factor = 2 ** (len(self.channel_mult) - 1)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(f"UNet: image size {x.shape[1]}x{x.shape[2]} must be divisible by "
                             f"2**(len(channel_mult)-1) = {factor}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"UNet expects t of shape [B] = ({x.shape[0]},), got {t.shape}")
        if (y is None) != (self.num_classes is None):
            raise ValueError("UNet: pass labels y if and only if num_classes is set "
                             f"(num_classes={self.num_classes}, y given: {y is not None})")
        if y is not None and y.shape != (x.shape[0],):
            raise ValueError(f"UNet expects y of shape [B] = ({x.shape[0]},), got {y.shape}")
        if low_res is not None and (low_res.ndim != 4 or low_res.shape[0] != x.shape[0]):
            raise ValueError(f"UNet expects low_res of shape [B, h, w, C] with B={x.shape[0]}, "
                             f"got {low_res.shape}")

    @nn.compact
    def __call__(self, x: Array, t: Array, y: Array | None = None, *, train: bool = False,
                 low_res: Array | None = None, aug_level: Array | None = None,
                 context: Array | None = None, context_mask: Array | None = None) -> Array:
        """x: [B,H,W,C], t: [B] float, y: [B] int32, low_res: [B,h,w,C'], aug_level: [B]
        float (iff aug_embed), context: [B,L,context_dim] (iff context_dim > 0),
        context_mask: [B,L] bool (default: all tokens) -> [B,H,W,Cout] float32."""
        self._validate(x, t, y, low_res)
        self._validate_context(x, context, context_mask)
        if (aug_level is None) == self.aug_embed:
            raise ValueError("UNet: pass aug_level [B] if and only if aug_embed is set (aug_embed="
                             f"{self.aug_embed}, aug_level given: {aug_level is not None})")
        if low_res is not None:
            up = upsample_low_res(low_res, x.shape[1], x.shape[2])
            x = jnp.concatenate([x, up.astype(x.dtype)], axis=-1)
        emb = layers.TimeEmbed(self.model_channels, self.dtype, self.param_dtype,
                               name="time_embed")(t)
        if self.num_classes is not None:
            rows = self.num_classes + int(self.class_null_label)
            table = layers.Embed(rows, 4 * self.model_channels, dtype=self.dtype,
                                 param_dtype=self.param_dtype,
                                 embedding_init=nn.initializers.normal(1.0), name="label_emb")
            emb = emb + table(y)
        if self.aug_embed:
            emb = emb + layers.TimeEmbed(self.model_channels, self.dtype, self.param_dtype,
                                         name="aug_embed")(jnp.broadcast_to(aug_level, t.shape))
        if context is not None and self.context_pool != "none":
            pooled = cross_attention.pool_context(context, context_mask, self.context_pool)
            emb = emb + layers.Dense(4 * self.model_channels, dtype=self.dtype,
                                     param_dtype=self.param_dtype,
                                     kernel_init=layers.torch_default_init,
                                     name="context_proj")(pooled.astype(self.dtype))

        def attend(h_: Array, heads: int, name: str) -> Array:
            if context is not None and self.use_spatial_transformer:
                return cross_attention.spatial_transformer(
                    self, heads, self.transformer_depth, name)(h_, context, context_mask)
            return layers.attention_block(self, heads, name)(h_, context, context_mask)

        h, skips = layers.encoder_half(self, x.astype(self.dtype), emb, train=train,
                                       attend=attend)
        h = self._decoder_half(h, skips, emb, train, attend)
        h = nn.silu(layers.group_norm(h.astype(jnp.float32), self.norm_groups, "out_norm",
                                      self.param_dtype))
        cout = self.out_channels * (2 if self.learn_sigma else 1)
        out = layers.Conv(cout, 3, dtype=self.dtype, param_dtype=self.param_dtype,
                          kernel_init=nn.initializers.zeros, cpu_fast_conv=self.cpu_fast_conv,
                          name="out_conv")(h)
        return out.astype(jnp.float32)

    def _decoder_half(self, h: Array, skips: list[Array], emb: Array, train: bool,
                      attend) -> Array:
        """Output blocks: names output_blocks_{i}_{res,attn,up}. Consumes `skips`."""
        heads_up = self.num_heads if self.num_heads_upsample == -1 else self.num_heads_upsample
        k = 0
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = layers.res_block(self, int(mult * self.model_channels),
                                     f"output_blocks_{k}_res")(h, emb, train)
                if h.shape[1] in self.attention_resolutions:
                    h = attend(h, heads_up, f"output_blocks_{k}_attn")
                if level and i == self.num_res_blocks:
                    name = f"output_blocks_{k}_up"
                    if self.resblock_updown:
                        h = layers.res_block(self, h.shape[-1], name, up=True)(h, emb, train)
                    else:
                        h = layers.Upsample(self.conv_resample, h.shape[-1], dtype=self.dtype,
                                            param_dtype=self.param_dtype,
                                            cpu_fast_conv=self.cpu_fast_conv, name=name)(h)
                k += 1
        return h


MODELS = {"unet": UNet}


def count_params(module: nn.Module, input_shape: tuple[int, ...], *,
                 low_res_shape: tuple[int, ...] | None = None) -> int:
    """Number of parameters of a UNet or EncoderClassifier for inputs [B, H, W, C].

    Uses `jax.eval_shape` on `module.init`: nothing is allocated or computed. Labels are
    passed iff the module is a class-conditional UNet, a one-token context iff it has
    context_dim > 0 (the count does not depend on the context's length).
    """
    b = input_shape[0]
    args: list[Any] = [jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32),
                       jax.ShapeDtypeStruct((b,), jnp.float32)]
    kwargs: dict[str, Any] = {}
    if isinstance(module, UNet):
        args.append(None if module.num_classes is None else jax.ShapeDtypeStruct((b,), jnp.int32))
        if low_res_shape is not None:
            kwargs["low_res"] = jax.ShapeDtypeStruct(tuple(low_res_shape), jnp.float32)
        if module.context_dim > 0:
            kwargs["context"] = jax.ShapeDtypeStruct((b, 1, module.context_dim), jnp.float32)
    variables = jax.eval_shape(lambda *a, **kw: module.init(jax.random.key(0), *a, **kw),
                               *args, **kwargs)
    return layers.num_params(variables["params"])
