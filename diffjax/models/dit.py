"""The DiT transformer of Peebles & Xie (2023), Flax Linen, NHWC.

Option names are those of facebookresearch/DiT's `models.DiT`, so its configs transcribe one
to one: `input_size` (latent side), `patch_size`, `in_channels`, `hidden_size`, `depth`,
`num_heads`, `mlp_ratio`, `class_dropout_prob`, `num_classes`, `learn_sigma`.

Dimension letters: B batch, H/W image height/width, C channels, p patch size,
h = H/p, w = W/p, L = h*w tokens, D = hidden_size.

Architecture: x -> patchify (p x p conv, stride p: [B, L, D]) + a fixed 2-D sin-cos position
table (a constant, not a parameter); c = TimestepEmbedder(t) + LabelEmbedder(y);
`depth` DiT blocks with adaLN-Zero,

    shift1, scale1, gate1, shift2, scale2, gate2 = Dense_6D(SiLU(c))
    x = x + gate1 * Attn(LN(x) * (1 + scale1) + shift1)
    x = x + gate2 * MLP(LN(x) * (1 + scale2) + shift2)

(LayerNorm without affine, eps 1e-6; MLP with tanh-approximated GELU); a final layer
(shift, scale = Dense_2D(SiLU(c)), Dense_{p*p*out}(LN(x) * (1 + scale) + shift)); unpatchify.
out = C * (2 if learn_sigma else 1): [eps | variance interpolation v] as in iDDPM.

Notes:
- Label dropout (classifier-free guidance) is the caller's job: it passes y = num_classes
  for the null label. `class_dropout_prob` only decides whether that row exists
  (rows = num_classes + (class_dropout_prob > 0)), as in DiT's LabelEmbedder.
- Initialisation follows DiT: xavier-uniform Linear kernels with zero biases, the patch conv
  xavier on its flattened [p*p*C, D] kernel, N(0, 0.02) label table and timestep MLP kernels,
  zero adaLN modulations and final linear, so a fresh model outputs exactly zero.
- Mixed precision: with dtype=bfloat16 the Dense/conv matmuls and attention run in bf16;
  the residual stream, LayerNorms and modulations stay float32 and the output is float32.
- `remat`: every DiT block is rematerialised (`nn.remat`, `remat_policy` as the UNet's);
  same params and outputs. `attention_impl` as the UNet's (cuDNN flash attention on GPU).
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.models import layers

Array = jax.Array
Dtype = Any

# The paper's model sizes (Table 1): name -> (depth, hidden_size, num_heads).
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
PATCH_SIZES = (2, 4, 8)
FREQUENCY_EMBEDDING_SIZE = 256
_NAME = re.compile(r"DiT-(S|B|L|XL)/(\d+)$")


def dit_options(name: str) -> dict[str, int]:
    """'DiT-XL/2' -> {'depth': 28, 'hidden_size': 1152, 'num_heads': 16, 'patch_size': 2}."""
    match = _NAME.match(name)
    if not match or int(match.group(2)) not in PATCH_SIZES:
        raise ValueError(f"unknown DiT size {name!r}; use DiT-<S|B|L|XL>/<2|4|8>, e.g. DiT-XL/2")
    depth, hidden, heads = DIT_SIZES[match.group(1)]
    return {"depth": depth, "hidden_size": hidden, "num_heads": heads,
            "patch_size": int(match.group(2))}


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """DiT's (MAE's) fixed position table: [grid_size**2, embed_dim] float32.

    Token k = i * grid_size + j (row i, column j). The first embed_dim/2 columns encode the
    column j, the last embed_dim/2 the row i (DiT's meshgrid puts w first); each half is
    [sin(pos * w_0..w_{n-1}), cos(pos * w_0..w_{n-1})], w_m = 10000^(-m/n), n = embed_dim/4.
    Computed in float64, returned as float32 (as DiT stores it).
    """
    if embed_dim % 4:
        raise ValueError(f"DiT: hidden_size={embed_dim} must be divisible by 4 (position table)")
    n = embed_dim // 4
    omega = 1.0 / 10000.0 ** (np.arange(n, dtype=np.float64) / n)
    rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float64),
                             np.arange(grid_size, dtype=np.float64), indexing="ij")

    def encode(pos: np.ndarray) -> np.ndarray:
        angles = pos.reshape(-1)[:, None] * omega[None, :]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([encode(cols), encode(rows)], axis=1).astype(np.float32)


def patchify(x: Array, p: int) -> Array:
    """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C], tokens row-major, each patch (row, col, C)."""
    b, hh, ww, c = x.shape
    x = x.reshape(b, hh // p, p, ww // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (hh // p) * (ww // p), p * p * c)


def unpatchify(x: Array, p: int, h: int, w: int) -> Array:
    """[B, h*w, p*p*C] -> [B, h*p, w*p, C]; the inverse of `patchify` (DiT's unpatchify)."""
    b, _, d = x.shape
    c = d // (p * p)
    x = x.reshape(b, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * p, w * p, c)


def layer_norm(x: Array, eps: float = 1e-6) -> Array:
    """LayerNorm over the last axis without affine parameters, in float32 (biased variance)."""
    x = x.astype(jnp.float32)
    mean = x.mean(axis=-1, keepdims=True)
    var = jnp.square(x - mean).mean(axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def modulate(x: Array, shift: Array, scale: Array) -> Array:
    """x: [B, L, D], shift/scale: [B, D] -> x * (1 + scale) + shift (float32)."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


def _torch_uniform_bias(fan_in: int):
    """PyTorch's default conv bias init U(+-1/sqrt(fan_in)) (DiT leaves the patch conv's bias)."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block: x: [B, L, D] float32, c: [B, D] -> [B, L, D] float32."""

    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array, c: Array) -> Array:
        b, n, d = x.shape
        dense = functools.partial(layers.Dense, dtype=self.dtype, param_dtype=self.param_dtype,
                                  kernel_init=nn.initializers.xavier_uniform())
        mod = dense(6 * d, kernel_init=nn.initializers.zeros, name="adaLN_modulation")(
            nn.silu(c)).astype(jnp.float32)
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)
        h = modulate(layer_norm(x), shift1, scale1).astype(self.dtype)
        qkv = dense(3 * d, name="qkv")(h).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        a = layers.multihead_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2],
                                       self.attention_impl)
        a = dense(d, name="proj")(a.reshape(b, n, d))
        x = x + gate1[:, None, :] * a.astype(jnp.float32)
        h = modulate(layer_norm(x), shift2, scale2).astype(self.dtype)
        h = nn.gelu(dense(int(d * self.mlp_ratio), name="fc1")(h), approximate=True)
        h = dense(d, name="fc2")(h)
        return x + gate2[:, None, :] * h.astype(jnp.float32)


class DiT(nn.Module):
    """DiT: (x [B,H,W,C], t [B], y [B] | None) -> [B, H, W, C * (1 + learn_sigma)] float32.

    `t` is the timestep fed to the sinusoid (DiT's TimestepEmbedder: 256 frequencies,
    max_period 10000, [cos | sin]). H = W = input_size. Labels must lie in [0, num_classes]
    (num_classes = the null label when class_dropout_prob > 0); traced values cannot be
    checked, and out-of-range indices are clamped by the table lookup. `train` is accepted
    for the UNet's signature; DiT has no dropout.
    """

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int | None = 1000
    learn_sigma: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    remat_policy: str = "block"
    attention_impl: str = "auto"

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)

    @property
    def label_rows(self) -> int:
        """Rows of the label table: num_classes, plus the null label if class_dropout_prob > 0."""
        return (self.num_classes or 0) + int(self.class_dropout_prob > 0)

    def _validate(self, x: Array, t: Array, y: Array | None) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"DiT: hidden_size={self.hidden_size} is not divisible by "
                             f"num_heads={self.num_heads}")
        if self.input_size % self.patch_size:
            raise ValueError(f"DiT: input_size={self.input_size} is not divisible by "
                             f"patch_size={self.patch_size}")
        if x.ndim != 4:
            raise ValueError(f"DiT expects x of shape [B, H, W, C], got {x.shape}")
        if x.shape[1] % self.patch_size or x.shape[2] % self.patch_size:
            raise ValueError(f"DiT: image size {x.shape[1]}x{x.shape[2]} is not divisible by "
                             f"patch_size={self.patch_size}")
        if x.shape[1:] != (self.input_size, self.input_size, self.in_channels):
            raise ValueError(f"DiT expects x of shape [B, {self.input_size}, {self.input_size}, "
                             f"{self.in_channels}] (input_size, in_channels), got {x.shape}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"DiT expects t of shape [B] = ({x.shape[0]},), got {t.shape}")
        if (y is None) != (self.num_classes is None):
            raise ValueError("DiT: pass labels y if and only if num_classes is set "
                             f"(num_classes={self.num_classes}, y given: {y is not None})")
        if y is not None and y.shape != (x.shape[0],):
            raise ValueError(f"DiT expects y of shape [B] = ({x.shape[0]},), got {y.shape}")

    @nn.compact
    def __call__(self, x: Array, t: Array, y: Array | None = None, *,
                 train: bool = False) -> Array:
        """x: [B,H,W,C], t: [B] float, y: [B] int32 (iff num_classes) -> [B,H,W,out] float32."""
        del train  # no dropout in DiT; label dropout is done by the caller
        self._validate(x, t, y)
        d, p = self.hidden_size, self.patch_size
        grid = self.input_size // p
        dense = functools.partial(layers.Dense, dtype=self.dtype, param_dtype=self.param_dtype,
                                  kernel_init=nn.initializers.xavier_uniform())
        # Patch embedding: xavier on the flattened [p*p*C, D] kernel (DiT's "like nn.Linear").
        patch_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform",
                                                      in_axis=(0, 1, 2), out_axis=3)
        h = layers.FlaxConv(d, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                            param_dtype=self.param_dtype, kernel_init=patch_init,
                            bias_init=_torch_uniform_bias(p * p * self.in_channels),
                            name="x_embedder")(x.astype(self.dtype))
        h = h.reshape(h.shape[0], grid * grid, d).astype(jnp.float32)
        h = h + jnp.asarray(get_2d_sincos_pos_embed(d, grid))[None]

        small = nn.initializers.normal(0.02)
        freq = layers.timestep_embedding(t, FREQUENCY_EMBEDDING_SIZE)
        c = dense(d, kernel_init=small, name="t_embedder_0")(freq)
        c = dense(d, kernel_init=small, name="t_embedder_1")(nn.silu(c)).astype(jnp.float32)
        if self.num_classes is not None:
            table = layers.Embed(self.label_rows, d, dtype=jnp.float32,
                                 param_dtype=self.param_dtype, embedding_init=small,
                                 name="y_embedder")
            c = c + table(y)

        block = layers.remat(DiTBlock, self.remat, self.remat_policy)
        for i in range(self.depth):
            h = block(d, self.num_heads, self.mlp_ratio, dtype=self.dtype,
                      param_dtype=self.param_dtype, attention_impl=self.attention_impl,
                      name=f"blocks_{i}")(h, c)

        mod = dense(2 * d, kernel_init=nn.initializers.zeros, name="final_adaLN_modulation")(
            nn.silu(c)).astype(jnp.float32)
        shift, scale = jnp.split(mod, 2, axis=-1)
        h = modulate(layer_norm(h), shift, scale).astype(self.dtype)
        h = dense(p * p * self.out_channels, kernel_init=nn.initializers.zeros,
                  name="final_linear")(h)
        return unpatchify(h.astype(jnp.float32), p, grid, grid)


def _abstract_inputs(module: DiT, batch: int) -> tuple:
    s = module.input_size
    y = None if module.num_classes is None else jax.ShapeDtypeStruct((batch,), jnp.int32)
    return (jax.ShapeDtypeStruct((batch, s, s, module.in_channels), jnp.float32),
            jax.ShapeDtypeStruct((batch,), jnp.float32), y)


def abstract_params(module: DiT) -> Any:
    """The parameter tree of `module` as ShapeDtypeStructs (`jax.eval_shape`; nothing allocated)."""
    variables = jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a),
                               *_abstract_inputs(module, 1))
    return variables["params"]


def count_params(module: DiT) -> int:
    """Trainable parameters of `module` (the fixed position table is not one)."""
    return layers.num_params(abstract_params(module))


def forward_flops_by_part(module: DiT, batch: int = 1) -> dict[str, int]:
    """Analytic FLOPs of one forward pass of `module` on `batch` images, per kind of matmul.

    Counts every matrix product, a multiply-add as 2 FLOPs (XLA's cost analysis convention
    for dot and convolution), with L = (input_size / p)^2 tokens, D = hidden_size,
    M = int(D * mlp_ratio), P = p * p:

        patch_embed   L * P*C * D          (the p x p, stride-p conv)
        t_embed       256 * D + D * D      (TimestepEmbedder's two Dense)
        adaLN         depth * 6D * D + 2D * D   (blocks' and final layer's modulations)
        qkv, proj     depth * L * 3D * D, depth * L * D * D
        attention     depth * 2 * L * L * D     (scores Q K^T and the weighted sum of V,
                                                 summed over heads)
        mlp           depth * 2 * L * D * M
        final_linear  L * D * P*out

    each times 2 * batch. Not counted: elementwise work (biases, SiLU/GELU, LayerNorm,
    modulate, gates, residual adds, softmax, the position table add, the sinusoid) and the
    label-table lookup. XLA costs those at about 15 FLOPs per element of each block's [L, D + M]
    activations, against 2 * (12 D + 2 L) per element of [L, D] for the matmuls: about 8% more
    at D = 32 (tests/models/test_dit_flops.py), under 1% at D >= 384.

    The DiT paper's "Gflops" count a multiply-add as one (MACs, the representation-learning
    convention; Peebles, facebookresearch/DiT issue 14): paper Gflops ~ forward_flops / 2e9
    (DiT-XL/2 at 32x32x4: 237.24e9 here, 118.62 G MACs; the paper prints 118.64).
    """
    d, p, depth = module.hidden_size, module.patch_size, module.depth
    tokens = (module.input_size // p) ** 2
    mlp = int(d * module.mlp_ratio)
    macs = {
        "patch_embed": tokens * p * p * module.in_channels * d,
        "t_embed": FREQUENCY_EMBEDDING_SIZE * d + d * d,
        "adaLN": depth * 6 * d * d + 2 * d * d,
        "qkv": depth * tokens * 3 * d * d,
        "attention": depth * 2 * tokens * tokens * d,
        "proj": depth * tokens * d * d,
        "mlp": depth * 2 * tokens * d * mlp,
        "final_linear": tokens * d * p * p * module.out_channels,
    }
    return {name: 2 * batch * n for name, n in macs.items()}


def forward_flops(module: DiT, batch: int = 1) -> int:
    """Matmul FLOPs of one forward pass on `batch` images (see `forward_flops_by_part`)."""
    return sum(forward_flops_by_part(module, batch).values())
