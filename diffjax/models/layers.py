"""Building blocks of the ADM UNet and its noise-aware classifier (Flax Linen).

Dimension letters: B batch, H/W height/width, C channels, L = H*W tokens, E embedding width.
Layout is NHWC throughout; kernels are HWIO (`[kh, kw, C_in, C_out]`), as `flax.linen.Conv`.

Blocks follow Dhariwal & Nichol (2021, "ADM", openai/guided-diffusion) so that its configs
transcribe one to one: `ResBlock` (GroupNorm, SiLU, conv, timestep conditioning additive or
scale-shift/FiLM, dropout, zero-initialised last conv, optional BigGAN up/down resampling),
`AttentionBlock` (multi-head self-attention through `jax.nn.dot_product_attention`),
`Downsample` / `Upsample` (strided conv or average pool / nearest neighbour + conv).
`encoder_half` builds the down path and middle block shared by `unet.UNet` and
`classifier.EncoderClassifier`, with the same parameter names in both.

CPU speed: `Conv` can compute its weight gradient as k*k shifted GEMMs under
`jax.custom_vjp` (exact up to float32 rounding, tested against float64), a workaround for
XLA:CPU's convolution weight gradient. It is only ever used on the CPU backend (decided at
trace time), so TPU/GPU always run the native `lax.conv_general_dilated` and its gradients.
Which path is faster depends on the CPU: an earlier development machine (jax 0.10.2) measured
the 3x3 conv 32x32x64 weight gradient (batch 64) at 140-148 ms native vs 104-106 ms shifted;
the current one (2-core AMD EPYC, AVX2, same jax, one run of `benchmarks/unet_ops.py`) at
80.7 ms native vs 112.2 ms shifted with XLA's YNNPACK convolutions (input + weight gradients
133.9 vs 148.5 ms, a small UNet train step 1.40 s vs 1.64 s), and at 53.7 ms vs 143.5 ms
(113.9 vs 182.6 ms; 1.26 s vs 1.77 s) with its Eigen convolutions, which diffjax's runs use
on CPU (`parallel.XLA_DEFAULTS`: YNNPACK runs each convolution on one core). The native
path also needs less memory (no shifted copies of each activation: about 250 MB less on the
Fashion-MNIST train step at batch 16). `cpu_fast_conv="auto"` follows `CPU_FAST_CONV_AUTO`
(False: native); "on" selects the shifted GEMMs where they win - re-run the benchmark on new
hardware or jax versions. Parameters are identical in both paths, so checkpoints move freely
between them and between backends.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import errors as flax_errors
from flax.core import meta
from jax import lax

Array = jax.Array
Dtype = Any

# PyTorch's default Linear/Conv weight init (kaiming_uniform, a=sqrt(5)): U(+-1/sqrt(fan_in)).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

CPU_FAST_CONV_CHOICES = ("auto", "on", "off")
# Self-attention kernels (`attention_impl`): XLA's (the [B, N, L, S] logits materialised),
# cuDNN's fused flash attention (GPU, bf16/fp16, head dim a multiple of 8 up to 128), or
# "blocked": the same over blocks of ATTENTION_BLOCK queries in a loop, each block recomputed
# in the backward pass, so the whole logits never exist (`blocked_attention`).
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "blocked")
ATTENTION_BLOCK = 256
# "auto" on the CPU backend: "blocked" from this many queries on (ADM-64's 32x32 attention,
# 1024 tokens: see `blocked_attention`), XLA's below (Fashion-MNIST's 14x14 and 7x7).
CPU_BLOCKED_MIN_QUERIES = 512
# What rematerialisation keeps inside a rematerialised block (`remat_policy`, with remat on):
# "block" keeps nothing (recomputes the whole block in the backward pass), "dots" keeps the
# outputs of its matrix products and convolutions (recomputes only norms, activations,
# softmax: less recomputation for more memory).
REMAT_POLICIES = ("block", "dots")
# What "auto" picks on the CPU backend (False: XLA's native convolution gradient, measured
# faster than the shifted GEMMs on the current development CPU; see the module docstring).
CPU_FAST_CONV_AUTO = False
_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def use_fast_conv(option: str) -> bool:
    """Resolves the `cpu_fast_conv` option at trace time; never True off the CPU backend.

    "on": shifted-GEMM weight gradient when `jax.default_backend() == "cpu"`;
    "auto": the same if `CPU_FAST_CONV_AUTO` (the measured-faster choice: now False);
    "off": always the native convolution gradient.
    """
    if option not in CPU_FAST_CONV_CHOICES:
        raise ValueError(f"cpu_fast_conv={option!r} is invalid; use one of {CPU_FAST_CONV_CHOICES}")
    on_cpu = jax.default_backend() == "cpu"
    if option == "auto":
        return on_cpu and CPU_FAST_CONV_AUTO
    return on_cpu and option == "on"


def _conv_native(x: Array, w: Array, stride: int, padding: int) -> Array:
    """x: [B, H, W, C], w: [kh, kw, C, D] -> [B, Ho, Wo, D] (symmetric zero padding)."""
    return lax.conv_general_dilated(
        x, w, (stride, stride), ((padding, padding), (padding, padding)),
        dimension_numbers=_DIMENSION_NUMBERS)


def _conv_weight_grad(x: Array, g: Array, kernel_hw: tuple[int, int], stride: int,
                      padding: int) -> Array:
    """d(sum(g * conv(x, w)))/dw as kh*kw GEMMs over shifted (strided) views of padded x.

    dw[i, j] = sum_{b, p, q} xpad[b, p*stride + i, q*stride + j, :]^T g[b, p, q, :],
    each tap as B batched [C, Ho*Wo] x [Ho*Wo, D] products summed over b (this batched form
    was the fastest on XLA:CPU among the layouts tried; see benchmarks/unet_ops.py).
    x: [B, H, W, C], g: [B, Ho, Wo, D] -> [kh, kw, C, D] (float32 accumulation).
    """
    kh, kw = kernel_hw
    b, ho, wo, d = g.shape
    c = x.shape[-1]
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    gm = g.reshape(b, ho * wo, d)
    taps = []
    for i in range(kh):
        for j in range(kw):
            view = lax.slice(xp, (0, i, j, 0),
                             (b, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, c),
                             (1, stride, stride, 1))
            per_example = jnp.einsum("bnc,bnd->bcd", view.reshape(b, ho * wo, c), gm,
                                     preferred_element_type=jnp.float32)
            taps.append(per_example.sum(axis=0))
    return jnp.stack(taps).reshape(kh, kw, c, d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_fast_grad(x: Array, w: Array, stride: int, padding: int) -> Array:
    """Same value as the native convolution; its VJP computes dw by shifted GEMMs.

    x: [B, H, W, C], w: [kh, kw, C, D] -> [B, Ho, Wo, D]. The input gradient is the exact
    transpose of the native convolution (`jax.linear_transpose`).
    """
    return _conv_native(x, w, stride, padding)


def _conv_fast_fwd(x, w, stride, padding):
    return _conv_native(x, w, stride, padding), (x, w)


def _conv_fast_bwd(stride, padding, residuals, g):
    x, w = residuals
    transpose = jax.linear_transpose(
        lambda x_: _conv_native(x_, w, stride, padding), jax.ShapeDtypeStruct(x.shape, x.dtype))
    (dx,) = transpose(g)
    dw = _conv_weight_grad(x, g, w.shape[:2], stride, padding).astype(w.dtype)
    return dx, dw


conv_fast_grad.defvjp(_conv_fast_fwd, _conv_fast_bwd)


class ReadsParams(nn.Module):
    """Mixin: ``self.param`` reads an existing parameter without tracing its initializer.

    Flax's ``Module.param`` checks an existing parameter's shape against its initializer's
    output by tracing the initializer (``jax.eval_shape``, random draws included) on every
    call, so every apply of a model traces every initializer once more (ADM-64's train step:
    543 initializers, 0.45-0.56 s of its 3.1-3.6 s trace on a 2-core Xeon). Here the shape
    is checked against the shape argument instead (the first after the key, as Flax's layers
    and this module's pass it), with Flax's error; a parameter being created, or an
    initializer given no shape, goes through ``Module.param``. Parameters, their names,
    values and initial values are Flax's.
    """

    def param(self, name, init_fn, *init_args, unbox=True, **init_kwargs):
        shape = init_args[0] if init_args else init_kwargs.get("shape")
        if (self.scope is None or not isinstance(shape, (tuple, list))
                or not self.has_variable("params", name)):
            return super().param(name, init_fn, *init_args, unbox=unbox, **init_kwargs)
        value = self.scope.get_variable("params", name)
        array = meta.unbox(value)
        if not hasattr(array, "shape"):  # not one array: Flax's check
            return super().param(name, init_fn, *init_args, unbox=unbox, **init_kwargs)
        if tuple(array.shape) != tuple(shape):
            raise flax_errors.ScopeParamShapeError(name, self.scope.path_text, array.shape,
                                                   tuple(shape))
        return array if unbox else value


class Dense(ReadsParams, nn.Dense):
    """``nn.Dense`` (same parameters, names and arithmetic) with :class:`ReadsParams`."""


class Embed(ReadsParams, nn.Embed):
    """``nn.Embed`` (same parameters, names and arithmetic) with :class:`ReadsParams`."""


class LayerNorm(ReadsParams, nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters, names and arithmetic) with :class:`ReadsParams`."""


class FlaxConv(ReadsParams, nn.Conv):
    """``nn.Conv`` (same parameters and arithmetic) with :class:`ReadsParams`, for the
    convolutions :class:`Conv` does not cover (other paddings, non-square kernels). Give it a
    ``name``: unnamed, Flax would call it ``FlaxConv_<i>`` where ``nn.Conv`` is ``Conv_<i>``."""


class Conv(ReadsParams):
    """kxk convolution, NHWC, symmetric padding k//2 (= 'SAME' at stride 1; ADM's padding).

    Params: 'kernel' [k, k, C_in, features] and 'bias' [features], as `nn.Conv`.
    x: [B, H, W, C_in] -> [B, ceil(H/strides), ceil(W/strides), features] in `dtype`.
    """

    features: int
    kernel_size: int = 3
    strides: int = 1
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = torch_default_init
    bias_init: Callable = nn.initializers.zeros
    cpu_fast_conv: str = "auto"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.kernel_size % 2 != 1:
            raise ValueError(f"Conv kernel_size={self.kernel_size} must be odd (symmetric padding)")
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features),
                            self.param_dtype)
        x = x.astype(self.dtype)
        kernel = kernel.astype(self.dtype)
        if use_fast_conv(self.cpu_fast_conv):
            y = conv_fast_grad(x, kernel, self.strides, k // 2)
        else:
            y = _conv_native(x, kernel, self.strides, k // 2)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def timestep_embedding(t: Array, dim: int, max_period: float = 10000.0) -> Array:
    """ADM's sinusoidal embedding: t: [B] (float, e.g. timestep index) -> [B, dim] float32.

    Columns are [cos(t f_0..f_{h-1}), sin(t f_0..f_{h-1})] with f_i = max_period^(-i/h),
    h = dim // 2, and a zero column appended when dim is odd.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def group_norm(x: Array, groups: int, name: str, param_dtype: Dtype, *, eps: float = 1e-5,
               fast_variance: bool = True, option: str = "norm_groups") -> Array:
    """GroupNorm(groups, eps) computed in float32 and cast back to x.dtype (ADM's GroupNorm32
    by default; SD's VAE: eps 1e-6, two-pass variance). ``option``: the config name of
    ``groups`` in the error.

    Must be called inside a compact method; creates a submodule called `name` holding
    `nn.GroupNorm`'s parameters ('scale' ones, 'bias' zeros, [C]) and computing its arithmetic
    (:class:`GroupNorm`).
    """
    if x.shape[-1] % groups:
        raise ValueError(f"GroupNorm: {x.shape[-1]} channels are not divisible by "
                         f"{option}={groups}; choose channel counts divisible by it")
    norm = GroupNorm(groups, eps, fast_variance, param_dtype, name=name)
    return norm(x.astype(jnp.float32)).astype(x.dtype)


class GroupNorm(ReadsParams):
    """``nn.GroupNorm(groups, epsilon=eps, dtype=float32, use_fast_variance=fast_variance)``
    over x: [B, ..., C] float32 (statistics per example and group over every other axis), with
    the same parameters ('scale' ones, 'bias' zeros, [C]) and the same operations in the same
    order, as one call of a jitted function: a trace records one equation per norm instead of
    ~25 (73 under a gradient, ~0.1 ms each) and traces the insides once per shape. A UNet holds
    over a hundred norms: ADM-64's train step and sampler trace and lower 10-25% faster.
    Forward programs are nn.GroupNorm's (the same jaxpr inside the call); under a gradient
    the backward is the same arithmetic grouped per norm, so a whole model's gradient can
    differ from the ungrouped one in float32 rounding (one norm's gradient: bit-equal, tested).
    """

    groups: int
    eps: float = 1e-5
    fast_variance: bool = True
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        return _group_norm_f32(x, scale, bias, self.groups, self.eps, self.fast_variance)


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _group_norm_f32(x: Array, scale: Array, bias: Array, groups: int, eps: float,
                    fast_variance: bool) -> Array:
    """Flax's GroupNorm arithmetic op for op (flax/linen/normalization.py: _compute_stats,
    then _normalize), checked equal to it in tests/models/test_layers.py."""
    b, c = x.shape[0], x.shape[-1]
    size = c // groups
    grouped = lax.reshape(x, (*x.shape[:-1], groups, size))
    axes = (*range(1, x.ndim - 1), x.ndim)
    n = float(math.prod(grouped.shape[a] for a in axes))
    if fast_variance:
        squares = lax.square(grouped)
        mean = lax.reduce_sum(grouped, axes) / n
        var = jnp.maximum(0.0, lax.reduce_sum(squares, axes) / n - lax.square(mean))
    else:
        mean = lax.reduce_sum(grouped, axes) / n
        centred = grouped - lax.expand_dims(mean, axes)
        var = lax.reduce_sum(lax.square(centred), axes) / n
    per_channel = lambda v: lax.reshape(lax.broadcast_in_dim(v, (b, groups, size), (0, 1)),
                                        (b, c))
    stats_shape = (b,) + (1,) * (x.ndim - 2) + (c,)
    mean, var = per_channel(mean), per_channel(var)
    mean = lax.broadcast_in_dim(mean, stats_shape, (0, x.ndim - 1))
    var = lax.broadcast_in_dim(var, stats_shape, (0, x.ndim - 1))
    feature_shape = (1,) * (x.ndim - 1) + (c,)
    y = x - mean
    mul = lax.rsqrt(var + eps)
    mul = mul * lax.reshape(scale, feature_shape)
    y = y * mul
    y = y + lax.reshape(bias, feature_shape)
    return jnp.asarray(y, jnp.float32)


def upsample_nearest(x: Array) -> Array:
    """[B, H, W, C] -> [B, 2H, 2W, C] by repetition (broadcast; cheap gradient on CPU)."""
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
    return x.reshape(b, 2 * h, 2 * w, c)


def avg_pool_2x2(x: Array) -> Array:
    """[B, H, W, C] -> [B, H/2, W/2, C] mean over 2x2 windows (H, W even)."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class Downsample(nn.Module):
    """Halves H, W: 3x3 stride-2 conv (padding 1, as ADM) or 2x2 average pool."""

    use_conv: bool
    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    cpu_fast_conv: str = "auto"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [B, H, W, C] -> [B, H/2, W/2, out_channels]."""
        if self.use_conv:
            return Conv(self.out_channels, 3, strides=2, dtype=self.dtype,
                        param_dtype=self.param_dtype, cpu_fast_conv=self.cpu_fast_conv,
                        name="op")(x)
        if self.out_channels != x.shape[-1]:
            raise ValueError("Downsample without conv cannot change the channel count")
        return avg_pool_2x2(x)


class Upsample(nn.Module):
    """Doubles H, W by nearest neighbour, then an optional 3x3 conv."""

    use_conv: bool
    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    cpu_fast_conv: str = "auto"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [B, H, W, C] -> [B, 2H, 2W, out_channels]."""
        x = upsample_nearest(x)
        if self.use_conv:
            return Conv(self.out_channels, 3, dtype=self.dtype, param_dtype=self.param_dtype,
                        cpu_fast_conv=self.cpu_fast_conv, name="conv")(x)
        if self.out_channels != x.shape[-1]:
            raise ValueError("Upsample without conv cannot change the channel count")
        return x


class ResBlock(nn.Module):
    """ADM residual block conditioned on an embedding.

    h = conv(SiLU(GN(x)))  [resampled before the conv when up/down: BigGAN-style]
    additive:     h = conv0(drop(SiLU(GN(h + W e))))
    scale-shift:  h = conv0(drop(SiLU(GN(h) * (1 + s) + b))), [s, b] = W e  (FiLM)
    out = skip(x) + h, skip = identity or 1x1 conv; conv0 is zero-initialised.
    """

    out_channels: int
    dropout: float = 0.0
    use_scale_shift_norm: bool = False
    up: bool = False
    down: bool = False
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    cpu_fast_conv: str = "auto"

    @nn.compact
    def __call__(self, x: Array, emb: Array, train: bool = False) -> Array:
        """x: [B, H, W, C], emb: [B, E] -> [B, H', W', out_channels] (H' = 2H / H/2 / H)."""
        conv = functools.partial(Conv, dtype=self.dtype, param_dtype=self.param_dtype,
                                 cpu_fast_conv=self.cpu_fast_conv)
        h = nn.silu(group_norm(x, self.norm_groups, "in_norm", self.param_dtype))
        if self.up:
            h, x = upsample_nearest(h), upsample_nearest(x)
        elif self.down:
            h, x = avg_pool_2x2(h), avg_pool_2x2(x)
        h = conv(self.out_channels, name="in_conv")(h)
        width = 2 * self.out_channels if self.use_scale_shift_norm else self.out_channels
        emb_out = Dense(width, dtype=self.dtype, param_dtype=self.param_dtype,
                           kernel_init=torch_default_init, name="emb_proj")(nn.silu(emb))
        emb_out = emb_out.astype(h.dtype)[:, None, None, :]
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = group_norm(h, self.norm_groups, "out_norm", self.param_dtype)
            h = nn.silu(h * (1 + scale) + shift)
        else:
            h = nn.silu(group_norm(h + emb_out, self.norm_groups, "out_norm", self.param_dtype))
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        h = conv(self.out_channels, kernel_init=nn.initializers.zeros, name="out_conv")(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, kernel_size=1, name="skip")(x)
        return x.astype(h.dtype) + h


def attention_heads(channels: int, num_heads: int, num_head_channels: int) -> int:
    """ADM's rule: channels // num_head_channels if num_head_channels != -1 else num_heads."""
    if num_head_channels != -1:
        if num_head_channels <= 0 or channels % num_head_channels:
            raise ValueError(f"attention: {channels} channels are not divisible by "
                             f"num_head_channels={num_head_channels}")
        return channels // num_head_channels
    if num_heads <= 0 or channels % num_heads:
        raise ValueError(f"attention: {channels} channels are not divisible by "
                         f"num_heads={num_heads}")
    return num_heads


def split_qkv(qkv: Array, heads: int, new_order: bool) -> tuple[Array, Array, Array]:
    """[B, L, 3C] -> q, k, v each [B, L, heads, C/heads].

    new_order (ADM's QKVAttention): columns are [q | k | v], each split into heads.
    legacy (QKVAttentionLegacy): columns are per head [q_h | k_h | v_h]. Same parameters, a
    different reading of the projection's columns (so weights are not interchangeable).
    """
    b, n, c3 = qkv.shape
    ch = c3 // (3 * heads)
    if new_order:
        qkv = qkv.reshape(b, n, 3, heads, ch)
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    qkv = qkv.reshape(b, n, heads, 3, ch)
    return qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]


def attention_implementation(option: str, dtype: Dtype, head_dim: int,
                             backend: str | None = None, num_queries: int = 0) -> str:
    """Resolves `attention_impl` to "xla", "cudnn" or "blocked" at trace time.

    "auto": cuDNN's flash attention where it applies (the GPU backend, bf16/fp16 compute, head
    dim a multiple of 8 and at most 128); on the CPU backend "blocked" for at least
    `CPU_BLOCKED_MIN_QUERIES` queries; else XLA's. "cudnn" where it does not apply is an
    error (use "auto" or "xla"). backend: default ``jax.default_backend()``.
    """
    if option not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={option!r} is invalid; use one of {ATTENTION_IMPLS}")
    backend = jax.default_backend() if backend is None else backend
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    fits = backend == "gpu" and half and head_dim % 8 == 0 and head_dim <= 128
    if option == "auto":
        if fits:
            return "cudnn"
        return "blocked" if backend == "cpu" and num_queries >= CPU_BLOCKED_MIN_QUERIES else "xla"
    if option == "cudnn" and not fits:
        raise ValueError(f"attention_impl='cudnn' needs the GPU backend (have {backend!r}), "
                         f"compute dtype bfloat16/float16 (have {jnp.dtype(dtype).name}) and "
                         f"head channels a multiple of 8 up to 128 (have {head_dim}); use "
                         "attention_impl='auto' or 'xla'")
    return option


def multihead_attention(q: Array, k: Array, v: Array, option: str = "auto",
                        mask: Array | None = None) -> Array:
    """softmax(q k^T / sqrt(d)) v per head: q: [B, L, N, d], k, v: [B, S, N, d] -> [B, L, N, d],
    by `jax.nn.dot_product_attention` with the implementation `option` resolves to
    (:func:`attention_implementation`); softmax in float32 in both.

    mask: [B, S] bool, False = key excluded (its logit set to a large negative number; a row
    with every key masked attends uniformly). cuDNN takes it as a [B, 1, L, S] bias, which
    its training kernels refuse for an odd S: "auto" then picks XLA's."""
    impl = attention_implementation(option, q.dtype, q.shape[-1], num_queries=q.shape[1])
    if mask is not None and impl == "cudnn" and option == "auto" and k.shape[1] % 2:
        impl = "xla"
    if mask is not None:
        mask = mask[:, None, None, :]
        if impl == "cudnn":  # its bias must span the query length
            mask = jnp.broadcast_to(mask, (q.shape[0], 1, q.shape[1], k.shape[1]))
    if impl == "blocked":
        return blocked_attention(q, k, v, mask)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)


def _attention_rows(q: Array, k: Array, v: Array, mask: Array | None) -> Array:
    """softmax(q k^T / sqrt(d)) v for q: [B, Q, N, d] as XLA's `jax.nn.dot_product_attention`
    computes it (float32 logits and softmax, probabilities cast to k's dtype, masked keys at
    -0.7 * the dtype's largest float), written as two einsums over [B, N, Q, S]: that one
    vmaps over key-value head groups, which on XLA:CPU transposes the whole logits."""
    logits = jnp.einsum("bqnd,bsnd->bnqs", q, k,
                        preferred_element_type=jnp.promote_types(q.dtype, jnp.float32))
    logits = logits * jnp.asarray(q.shape[-1] ** -0.5, logits.dtype)
    if mask is not None:
        logits = jnp.where(mask, logits, -0.7 * jnp.finfo(logits.dtype).max)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(k.dtype)
    return jnp.einsum("bnqs,bsnd->bqnd", probs, v)


def blocked_attention(q: Array, k: Array, v: Array, mask: Array | None = None,
                      block: int = ATTENTION_BLOCK) -> Array:
    """XLA's attention (:func:`_attention_rows`) over blocks of ``block`` queries (the last
    one padded), one block per iteration of a loop, each recomputed in the backward pass
    (`jax.checkpoint`): the same function as one call (each query's softmax row is whole in
    its block), holding a few [B, N, block, S] arrays at a time instead of [B, N, L, S] ones.

    q: [B, L, N, d]; k, v: [B, S, N, d]; mask: None or bool broadcastable to [B, 1, 1, S].
    On XLA:CPU attention over 1024 tokens is bound by memory traffic on the whole logits
    (written, read back by the softmax, saved for and read again by the backward pass);
    blocks of them stay in cache. Forward + backward of [4, 1024, 2, 32] (2-core AMD EPYC):
    42 ms blocked vs 135 ms `jax.nn.dot_product_attention`; ADM-64 at width 32 (batch 4,
    seven 32x32 attention blocks) train step 1.37 s vs 2.10-2.30 s, peak RSS +1.74 vs +2.50
    GB (two runs of each, alternating; blocks of 128 measured slower).
    """
    b, length, n, d = q.shape
    if length <= block:
        return _attention_rows(q, k, v, mask)
    blocks = -(-length // block)
    q = jnp.pad(q, ((0, 0), (0, blocks * block - length), (0, 0), (0, 0)))
    q = q.reshape(b, blocks, block, n, d).swapaxes(0, 1)

    @jax.checkpoint
    def one(q_block):
        return _attention_rows(q_block, k, v, mask)

    out = lax.map(one, q)  # [blocks, B, block, N, d]
    return out.swapaxes(0, 1).reshape(b, blocks * block, n, d)[:, :length]


def _saves_matmuls(prim, *_, **__) -> bool:
    """jax.checkpoint policy: keep the outputs of matrix products and convolutions."""
    return prim.name in ("dot_general", "conv_general_dilated")


def remat(cls: type, enabled: bool, policy: str = "block", static_argnums: tuple[int, ...] = ()):
    """``cls`` rematerialised as `remat_policy` says (:data:`REMAT_POLICIES`), or ``cls``
    itself when not ``enabled``. static_argnums as `nn.remat` (self is argument 0)."""
    if not enabled:
        return cls
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat_policy={policy!r} is invalid; use one of {REMAT_POLICIES}")
    return nn.remat(cls, static_argnums=static_argnums,
                    policy=_saves_matmuls if policy == "dots" else None)


class AttentionBlock(nn.Module):
    """Residual multi-head self-attention over all H*W positions (ADM's AttentionBlock).

    out = x + proj_out(attn(split(qkv(GN(x))))), softmax(q k^T / sqrt(d)) in float32 via
    `jax.nn.dot_product_attention` (XLA's or cuDNN's, `attention_impl`, see
    :func:`attention_implementation`); proj_out is zero-initialised.

    With a context [B, L, D] (GLIDE's ``encoder_kv``): a Dense ``encoder_kv`` (D -> 2C, no
    norm) projects it to keys and values (columns per head [k_h | v_h] as GLIDE's
    QKVAttention, [k | v] under the new attention order), which are placed before the image
    tokens' keys and values; context_mask [B, L] (False = excluded) masks their keys.
    """

    num_heads: int = 1
    num_head_channels: int = -1
    use_new_attention_order: bool = False
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array, context: Array | None = None,
                 context_mask: Array | None = None) -> Array:
        """x: [B, H, W, C], context: [B, L, D], context_mask: [B, L] bool -> [B, H, W, C]."""
        b, hh, ww, c = x.shape
        heads = attention_heads(c, self.num_heads, self.num_head_channels)
        dense = functools.partial(Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        h = group_norm(x, self.norm_groups, "norm", self.param_dtype).reshape(b, hh * ww, c)
        qkv = dense(3 * c, kernel_init=torch_default_init, name="qkv")(h)
        q, k, v = split_qkv(qkv, heads, self.use_new_attention_order)
        mask = None
        if context is not None:
            ekv = dense(2 * c, kernel_init=torch_default_init, name="encoder_kv")(
                context.astype(self.dtype))
            ekv = ekv.reshape(b, -1, 2, heads, c // heads) if self.use_new_attention_order \
                else ekv.reshape(b, -1, heads, 2, c // heads).swapaxes(2, 3)
            k = jnp.concatenate([ekv[:, :, 0], k], axis=1)
            v = jnp.concatenate([ekv[:, :, 1], v], axis=1)
            if context_mask is not None:
                mask = jnp.concatenate([context_mask.astype(bool),
                                        jnp.ones((b, hh * ww), bool)], axis=1)
        a = multihead_attention(q, k, v, self.attention_impl, mask).reshape(b, hh * ww, c)
        a = dense(c, kernel_init=nn.initializers.zeros, name="proj_out")(a)
        return x.astype(a.dtype) + a.reshape(b, hh, ww, c)


class TimeEmbed(nn.Module):
    """t: [B] -> [B, 4 * model_channels]: sinusoid (float32), Dense, SiLU, Dense."""

    model_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t: Array) -> Array:
        dense = functools.partial(Dense, 4 * self.model_channels, dtype=self.dtype,
                                  param_dtype=self.param_dtype, kernel_init=torch_default_init)
        emb = timestep_embedding(t, self.model_channels)
        return dense(name="dense_1")(nn.silu(dense(name="dense_0")(emb)))


class ADMOptions(Protocol):
    """Fields read by the shared builders (both `UNet` and `EncoderClassifier` have them)."""

    model_channels: int
    num_res_blocks: int
    channel_mult: tuple[int, ...]
    attention_resolutions: tuple[int, ...]
    num_heads: int
    num_head_channels: int
    dropout: float
    use_scale_shift_norm: bool
    resblock_updown: bool
    conv_resample: bool
    use_new_attention_order: bool
    norm_groups: int
    dtype: Dtype
    param_dtype: Dtype
    remat: bool
    remat_policy: str
    attention_impl: str
    cpu_fast_conv: str


def res_block(m: ADMOptions, out_channels: int, name: str, *, up: bool = False,
              down: bool = False) -> nn.Module:
    """A `ResBlock` with m's options (rematerialised by m.remat_policy if m.remat); call as
    blk(x, emb, train)."""
    cls = remat(ResBlock, m.remat, m.remat_policy, static_argnums=(3,))
    return cls(out_channels=out_channels, dropout=m.dropout,
               use_scale_shift_norm=m.use_scale_shift_norm, up=up, down=down,
               norm_groups=m.norm_groups, dtype=m.dtype, param_dtype=m.param_dtype,
               cpu_fast_conv=m.cpu_fast_conv, name=name)


def attention_block(m: ADMOptions, num_heads: int, name: str) -> nn.Module:
    """An `AttentionBlock` with m's options (rematerialised by m.remat_policy if m.remat);
    call as blk(x), or blk(x, context, context_mask) (GLIDE's encoder_kv)."""
    cls = remat(AttentionBlock, m.remat, m.remat_policy)
    return cls(num_heads=num_heads, num_head_channels=m.num_head_channels,
               use_new_attention_order=m.use_new_attention_order, norm_groups=m.norm_groups,
               dtype=m.dtype, param_dtype=m.param_dtype, attention_impl=m.attention_impl,
               name=name)


def encoder_half(m: ADMOptions, x: Array, emb: Array, *, train: bool,
                 attend: Callable[[Array, int, str], Array] | None = None
                 ) -> tuple[Array, list[Array]]:
    """ADM's input blocks and middle block, built in the calling module's scope.

    Must be called from m's compact `__call__`. Attention is applied after a res block when
    the current height is in m.attention_resolutions (pixel resolutions), and in the middle:
    ``attend(h, num_heads, name) -> h`` (default: ``attention_block(m, num_heads, name)(h)``;
    the UNet's context conditioning passes its own).
    x: [B, H, W, C_in], emb: [B, E] -> (h: [B, H/2^(n-1), W/2^(n-1), C_mid], skips), where
    skips are the outputs of every input block (what the UNet decoder concatenates).
    Parameter names: input_blocks_{i}_{conv,res,attn,down}, middle_{res_0,attn,res_1}.
    """
    if attend is None:
        def attend(h_: Array, heads: int, name: str) -> Array:
            return attention_block(m, heads, name)(h_)
    ch = int(m.channel_mult[0] * m.model_channels)
    h = Conv(ch, 3, dtype=m.dtype, param_dtype=m.param_dtype, cpu_fast_conv=m.cpu_fast_conv,
             name="input_blocks_0_conv")(x)
    skips, k = [h], 1
    for level, mult in enumerate(m.channel_mult):
        for _ in range(m.num_res_blocks):
            h = res_block(m, int(mult * m.model_channels), f"input_blocks_{k}_res")(h, emb,
                                                                                  train)
            if h.shape[1] in m.attention_resolutions:
                h = attend(h, m.num_heads, f"input_blocks_{k}_attn")
            skips.append(h)
            k += 1
        if level != len(m.channel_mult) - 1:
            name = f"input_blocks_{k}_down"
            if m.resblock_updown:
                h = res_block(m, h.shape[-1], name, down=True)(h, emb, train)
            else:
                h = Downsample(m.conv_resample, h.shape[-1], dtype=m.dtype,
                               param_dtype=m.param_dtype, cpu_fast_conv=m.cpu_fast_conv,
                               name=name)(h)
            skips.append(h)
            k += 1
    h = res_block(m, h.shape[-1], "middle_res_0")(h, emb, train)
    h = attend(h, m.num_heads, "middle_attn")
    h = res_block(m, h.shape[-1], "middle_res_1")(h, emb, train)
    return h, skips


def num_params(params: Any) -> int:
    """Total number of scalars in a pytree of arrays or ShapeDtypeStructs."""
    return int(sum(np.prod(p.shape, dtype=np.int64) for p in jax.tree.leaves(params)))
