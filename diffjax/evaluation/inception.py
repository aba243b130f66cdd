"""InceptionV3 in the FID variant (TensorFlow graph ``inception-2015-12-05``) as a Flax module.

This is the network behind FID/sFID/IS in ADM's evaluator (TF graph ``pool_3`` and
``mixed_6/conv``) and pytorch-fid (``use_fid_inception=True``). It differs from the usual
torchvision InceptionV3 in ways that change the numbers, all reproduced here:

* the 3x3 average pools inside Mixed_5b/5c/5d (InceptionA), Mixed_6b..6e (InceptionC) and
  Mixed_7b (first InceptionE) divide by the number of *valid* pixels in the window
  (TensorFlow semantics, ``count_include_pad=False``);
* the pool branch of Mixed_7c (second InceptionE) uses a 3x3 *max* pool (stride 1, pad 1);
* the classifier has 1008 classes (``fc``: 2048 -> 1008).
* batch norm uses eps = 1e-3 and running statistics (inference only).

Parameter names mirror torchvision/pytorch-fid module names (``Mixed_6d/branch1x1/kernel``),
so the converter in :mod:`diffjax.evaluation.convert_inception` is a direct renaming.
All parameters, batch-norm statistics included, live in the single ``params`` collection:
``InceptionV3().apply({"params": params}, x)``.

Preprocessing (``preprocess_images``) has two modes: ``"tf1"`` (default) reproduces the TF
graph of ADM's evaluator (TF1 ``ResizeBilinear`` on [0, 255] values, then (v - 128) / 128),
so statistics are comparable with ADM's reference batches; ``"pytorch_fid"`` reproduces
pytorch-fid (half-pixel bilinear resize of [-1, 1] values). They differ in the last digits
of FID: compute reference and sample statistics with the same mode.

Convolutions and the classifier run at ``Precision.HIGHEST`` so that TPUs/GPUs compute them
in float32 (their default bf16/TF32 passes would shift FID).

Shapes: B batch, H/W spatial, C channels. Images are NHWC float32.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable, Sequence

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from diffjax import hugepages

NUM_CLASSES = 1008
POOL_DIM = 2048
SPATIAL_CHANNELS = 7  # ADM keeps the first 7 channels of mixed_6/conv (17 * 17 * 7 = 2023)
INPUT_SIZE = 299
BN_EPS = 1e-3
_HIGHEST = jax.lax.Precision.HIGHEST


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class ConvBN(nn.Module):
    """Conv (no bias) + batch norm with running statistics + ReLU (torchvision ``BasicConv2d``).

    Params: ``kernel`` [kh, kw, Cin, Cout]; ``bn_scale``, ``bn_bias``, ``bn_mean``, ``bn_var``
    [Cout].
    """

    features: int
    kernel_size: int | Sequence[int]
    stride: int = 1
    padding: int | Sequence[int] = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, Cin] -> [B, H', W', Cout]."""
        kh, kw = _pair(self.kernel_size)
        ph, pw = _pair(self.padding)
        fan_in = kh * kw * x.shape[-1]
        kernel = self.param(
            "kernel", nn.initializers.normal(np.sqrt(2.0 / fan_in)),
            (kh, kw, x.shape[-1], self.features), jnp.float32)
        scale = self.param("bn_scale", nn.initializers.ones, (self.features,), jnp.float32)
        bias = self.param("bn_bias", nn.initializers.zeros, (self.features,), jnp.float32)
        mean = self.param("bn_mean", nn.initializers.zeros, (self.features,), jnp.float32)
        var = self.param("bn_var", nn.initializers.ones, (self.features,), jnp.float32)
        y = jax.lax.conv_general_dilated(
            x, kernel, window_strides=(self.stride, self.stride),
            padding=((ph, ph), (pw, pw)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=_HIGHEST)
        y = (y - mean) * (scale * jax.lax.rsqrt(var + BN_EPS)) + bias
        return nn.relu(y)


def max_pool_3x3(x: jax.Array, stride: int, padding: int = 0) -> jax.Array:
    """3x3 max pool; padded cells are -inf (never selected). x: [B, H, W, C]."""
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1),
                                 (1, stride, stride, 1), pad)


def avg_pool_3x3_valid_count(x: jax.Array) -> jax.Array:
    """3x3 average pool, stride 1, pad 1, dividing by the number of in-image pixels.

    TensorFlow's average pool (and pytorch-fid's ``count_include_pad=False``): a border
    pixel averages over 4 or 6 values, not 9. x: [B, H, W, C] -> [B, H, W, C].
    """
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    window, strides = (1, 3, 3, 1), (1, 1, 1, 1)
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pad)
    ones = jnp.ones((1, x.shape[1], x.shape[2], 1), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, strides, pad)
    return total / count


class InceptionA(nn.Module):
    """Mixed_5b/5c/5d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool(valid count)-1x1."""

    pool_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = ConvBN(64, 1, name="branch1x1")(x)
        b5 = ConvBN(48, 1, name="branch5x5_1")(x)
        b5 = ConvBN(64, 5, padding=2, name="branch5x5_2")(b5)
        b3 = ConvBN(64, 1, name="branch3x3dbl_1")(x)
        b3 = ConvBN(96, 3, padding=1, name="branch3x3dbl_2")(b3)
        b3 = ConvBN(96, 3, padding=1, name="branch3x3dbl_3")(b3)
        bp = ConvBN(self.pool_features, 1, name="branch_pool")(avg_pool_3x3_valid_count(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a (grid reduction 35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = ConvBN(384, 3, stride=2, name="branch3x3")(x)
        bd = ConvBN(64, 1, name="branch3x3dbl_1")(x)
        bd = ConvBN(96, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = ConvBN(96, 3, stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, max_pool_3x3(x, 2)], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b..6e: 1x1 | factorised 7x7 | double factorised 7x7 | avgpool(valid count)-1x1.

    Returns (output [B, 17, 17, 768], branch1x1 [B, 17, 17, 192]); the branch1x1 output of
    Mixed_6d is the TF graph's ``mixed_6/conv`` (sFID features).
    """

    channels_7x7: int

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        c7 = self.channels_7x7
        b1 = ConvBN(192, 1, name="branch1x1")(x)
        b7 = ConvBN(c7, 1, name="branch7x7_1")(x)
        b7 = ConvBN(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = ConvBN(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = ConvBN(c7, 1, name="branch7x7dbl_1")(x)
        bd = ConvBN(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = ConvBN(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = ConvBN(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = ConvBN(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = ConvBN(192, 1, name="branch_pool")(avg_pool_3x3_valid_count(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(nn.Module):
    """Mixed_7a (grid reduction 17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = ConvBN(192, 1, name="branch3x3_1")(x)
        b3 = ConvBN(320, 3, stride=2, name="branch3x3_2")(b3)
        b7 = ConvBN(192, 1, name="branch7x7x3_1")(x)
        b7 = ConvBN(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = ConvBN(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = ConvBN(192, 3, stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, max_pool_3x3(x, 2)], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b/7c: 1x1 | 1x1-(1x3,3x1) | 1x1-3x3-(1x3,3x1) | pool-1x1.

    ``pool="avg"`` (Mixed_7b): average pool with valid count; ``pool="max"`` (Mixed_7c): the
    FID graph's max pool, stride 1, pad 1.
    """

    pool: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = ConvBN(320, 1, name="branch1x1")(x)
        b3 = ConvBN(384, 1, name="branch3x3_1")(x)
        b3 = jnp.concatenate([
            ConvBN(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
            ConvBN(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = ConvBN(448, 1, name="branch3x3dbl_1")(x)
        bd = ConvBN(384, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([
            ConvBN(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
            ConvBN(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        pooled = max_pool_3x3(x, 1, 1) if self.pool == "max" else avg_pool_3x3_valid_count(x)
        bp = ConvBN(192, 1, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """The FID InceptionV3 (TF 2015-12-05 graph) without preprocessing.

    ``__call__(x)`` with x: [B, H, W, 3] float32 in [-1, 1] (H, W >= 75; 299 for the standard
    metrics, see :func:`preprocess_images`) returns a dict:

    * ``"pool"``: [B, 2048] global average pool of Mixed_7c (TF ``pool_3``; FID, KID, P/R);
    * ``"spatial"``: [B, 17 * 17 * 7] the first 7 channels of Mixed_6d's 1x1 branch after its
      ReLU (TF ``mixed_6/conv``, ADM's sFID features), flattened in (H, W, C) order like ADM;
      for inputs other than 299x299 the spatial size differs;
    * ``"logits"``: [B, 1008] ``fc`` output with its bias;
    * ``"logits_unbiased"``: [B, 1008] ``pool @ fc.kernel`` without the bias, what the
      original Inception Score code (improved-GAN) and ADM's evaluator feed to the softmax.
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        if x.ndim != 4 or x.shape[-1] != 3 or min(x.shape[1:3]) < 75:
            raise ValueError(
                f"InceptionV3 expects images [B, H, W, 3] with H, W >= 75, got {x.shape}; "
                "resize with preprocess_images first")
        x = ConvBN(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
        x = ConvBN(32, 3, name="Conv2d_2a_3x3")(x)
        x = ConvBN(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
        x = max_pool_3x3(x, 2)
        x = ConvBN(80, 1, name="Conv2d_3b_1x1")(x)
        x = ConvBN(192, 3, name="Conv2d_4a_3x3")(x)
        x = max_pool_3x3(x, 2)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x, _ = InceptionC(128, name="Mixed_6b")(x)
        x, _ = InceptionC(160, name="Mixed_6c")(x)
        x, mixed_6_conv = InceptionC(160, name="Mixed_6d")(x)
        x, _ = InceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE("avg", name="Mixed_7b")(x)
        x = InceptionE("max", name="Mixed_7c")(x)
        pool = jnp.mean(x, axis=(1, 2))
        kernel = self.param("fc_kernel", nn.initializers.normal(np.sqrt(1.0 / POOL_DIM)),
                            (POOL_DIM, NUM_CLASSES), jnp.float32)
        bias = self.param("fc_bias", nn.initializers.zeros, (NUM_CLASSES,), jnp.float32)
        logits_unbiased = jnp.dot(pool, kernel, precision=_HIGHEST)
        spatial = mixed_6_conv[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)
        return {"pool": pool, "spatial": spatial, "logits": logits_unbiased + bias,
                "logits_unbiased": logits_unbiased}


PREPROCESSING = ("tf1", "pytorch_fid")


def preprocess_images(images: jax.Array, size: int = INPUT_SIZE,
                      mode: str = "tf1") -> jax.Array:
    """Bring images to the network's input: [B, size, size, 3] float32 in about [-1, 1].

    images: [B, H, W, 3] (grayscale [B, H, W, 1] is repeated to 3 channels); uint8 is read
    as [0, 255] (ADM's sample/reference ``arr_0`` files), any float dtype as [-1, 1]
    (diffjax's convention, mapped to [0, 255] by (x + 1) * 127.5 for ``"tf1"``).

    mode ``"tf1"`` (default) reproduces the TF graph behind ADM's evaluator and its reference
    statistics: TF1 ``ResizeBilinear`` with ``align_corners=False`` (source pixel
    ``i * in / out``, no half-pixel offset, upper neighbour clamped) on [0, 255] values, then
    (v - 128) / 128. mode ``"pytorch_fid"`` reproduces pytorch-fid: x / 127.5 - 1, then
    bilinear resize with half-pixel centres (``align_corners=False``), no antialiasing.
    The two give FIDs that differ slightly; compare only statistics made with one mode.
    """
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"images must be [B, H, W, 3] (or [B, H, W, 1]), got shape {images.shape}")
    if mode not in PREPROCESSING:
        raise ValueError(f"unknown preprocessing mode {mode!r}; choose one of {PREPROCESSING}")
    if images.dtype == jnp.uint8:
        v = images.astype(jnp.float32)  # [0, 255]
    elif jnp.issubdtype(images.dtype, jnp.floating):
        v = (images.astype(jnp.float32) + 1.0) * 127.5
    else:
        raise ValueError(
            f"images must be uint8 in [0, 255] or float in [-1, 1], got dtype {images.dtype}")
    if v.shape[-1] == 1:
        v = jnp.repeat(v, 3, axis=-1)
    if mode == "pytorch_fid":
        x = (v / 127.5 - 1.0) if images.dtype == jnp.uint8 else images.astype(jnp.float32)
        x = jnp.broadcast_to(x, v.shape)
        if x.shape[1:3] != (size, size):
            x = jax.image.resize(x, (x.shape[0], size, size, 3), "bilinear", antialias=False)
        return x
    rows = jnp.asarray(tf1_resize_matrix(v.shape[1], size))
    cols = jnp.asarray(tf1_resize_matrix(v.shape[2], size))
    v = jnp.einsum("oh,bhwc->bowc", rows, v, precision=_HIGHEST)
    v = jnp.einsum("pw,bowc->bopc", cols, v, precision=_HIGHEST)
    return (v - 128.0) / 128.0


def tf1_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of TF1 bilinear resizing (align_corners=False) along one axis.

    Output i samples source position i * (n_in / n_out) (float32, as TF computes it),
    between floor and min(floor + 1, n_in - 1).
    """
    src = np.arange(n_out, dtype=np.float32) * np.float32(n_in / n_out)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (src - lo).astype(np.float32)
    w = np.zeros((n_out, n_in), np.float32)
    np.add.at(w, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(w, (np.arange(n_out), hi), frac)
    return w


def init_params(key: jax.Array) -> dict:
    """Random parameters of the right structure, for tests and shape checks.

    He-normal conv kernels, N(0, 1/2048) fc kernel, identity batch norm, zero fc bias.
    Drawn with NumPy, seeded from ``key`` (compiling the module's ``init`` or one sampler
    per leaf costs ~30 s on CPU). Real FID needs the converted published weights
    (:func:`diffjax.evaluation.convert_inception.load_inception_params`).
    """
    shapes = jax.eval_shape(lambda: InceptionV3().init(
        jax.random.key(0), jnp.zeros((1, 75, 75, 3), jnp.float32))["params"])
    flat = flax.traverse_util.flatten_dict(shapes)
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
    out = {}
    for path, leaf in sorted(flat.items()):
        name, shape = path[-1], leaf.shape
        if name in ("kernel", "fc_kernel"):
            fan_in = int(np.prod(shape[:-1]))
            std = np.sqrt((2.0 if name == "kernel" else 1.0) / fan_in)
            out[path] = jnp.asarray((std * rng.standard_normal(shape)).astype(np.float32))
        elif name in ("bn_scale", "bn_var"):
            out[path] = jnp.ones(shape, jnp.float32)
        else:
            out[path] = jnp.zeros(shape, jnp.float32)
    return flax.traverse_util.unflatten_dict(out)


def _default_apply(params: dict, x: jax.Array) -> dict[str, jax.Array]:
    return InceptionV3().apply({"params": params}, x)


@functools.cache
def _jitted_step(apply_fn: Callable, size: int, mode: str) -> Callable:
    return jax.jit(lambda p, x: apply_fn(p, preprocess_images(x, size, mode)))


def _batches(images, batch_size: int) -> Iterable[np.ndarray]:
    if isinstance(images, (np.ndarray, jax.Array)):
        return [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    return images


def compute_activations(params: dict, images: Iterable[np.ndarray] | np.ndarray, *,
                        batch_size: int = 64, sharding: jax.sharding.Sharding | None = None,
                        progress: bool = True, size: int = INPUT_SIZE,
                        preprocessing: str = "tf1",
                        apply_fn: Callable[[dict, jax.Array], dict[str, jax.Array]] | None
                        = None) -> dict[str, np.ndarray]:
    """Inception features of a stream of images, batched and (optionally) sharded.

    images: an iterable of [b, H, W, 3] batches (uint8 in [0, 255] or float in [-1, 1],
    resized and scaled by :func:`preprocess_images` with ``preprocessing`` and ``size``), or
    one [N, H, W, 3] array cut into ``batch_size`` pieces.
    Each batch is cut/padded to a fixed size (``batch_size`` rounded up to a multiple of the
    sharding's local device count), so the network compiles once per input resolution.
    With ``sharding`` (e.g. a NamedSharding splitting the batch axis over a mesh, from
    ``diffjax.parallel``) each process passes its own images and the batch is split over
    devices; every process must then yield the same number of batches, and every process
    receives all processes' features (concatenated in process order per batch).
    apply_fn(params, x [B, size, size, 3] in [-1, 1]) -> dict of [B, ...] features; default
    the FID InceptionV3. Returns the features of all images, e.g. ``pool`` [N, 2048],
    ``spatial`` [N, 2023], ``logits`` / ``logits_unbiased`` [N, 1008], as float32 NumPy.
    """
    apply_fn = apply_fn or _default_apply
    if preprocessing not in PREPROCESSING:
        raise ValueError(f"unknown preprocessing {preprocessing!r}; choose one of "
                         f"{PREPROCESSING}")
    shards = 1 if sharding is None else len(sharding.addressable_devices)
    fixed = -(-batch_size // shards) * shards
    step = _jitted_step(apply_fn, size, preprocessing)
    params = _place_params(params, sharding)
    batches = _batches(images, batch_size)
    total = len(batches) if hasattr(batches, "__len__") else None
    bar = tqdm.tqdm(batches, total=total, desc="inception activations", unit="batch",
                    disable=not progress or jax.process_index() != 0)
    outputs: dict[str, list[np.ndarray]] = {}
    pending = None  # the previous chunk's device results, fetched after the next dispatch
    for batch in bar:
        batch = np.asarray(batch)
        for start in range(0, len(batch), fixed):
            chunk = batch[start:start + fixed]
            valid = np.zeros(fixed, bool)
            valid[:len(chunk)] = True
            if len(chunk) < fixed:
                pad = np.zeros((fixed - len(chunk), *chunk.shape[1:]), chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            x = (jnp.asarray(chunk) if sharding is None
                 else jax.make_array_from_process_local_data(sharding, chunk))
            current = (step(params, x), valid)
            if pending is None:  # the first call: what compiling freed goes back to the system
                hugepages.release_freed_memory()
            if pending is not None:
                _collect(outputs, *pending)
            pending = current
    if pending is None:
        raise ValueError("compute_activations got no images; check the image iterator")
    _collect(outputs, *pending)
    return {name: np.concatenate(parts) for name, parts in outputs.items()}


def _place_params(params: dict, sharding: jax.sharding.Sharding | None) -> dict:
    """Put params on device once (replicated over the sharding's mesh), not per batch."""
    if sharding is None:
        return jax.device_put(params)
    if isinstance(sharding, jax.sharding.NamedSharding):
        replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
        return jax.device_put(params, replicated)
    return params


def _collect(outputs: dict[str, list[np.ndarray]], feats: dict[str, jax.Array],
             valid: np.ndarray) -> None:
    """Append the valid rows of one batch's features (of all processes) to outputs."""
    if jax.process_count() > 1:
        feats = multihost_utils.process_allgather(feats, tiled=True)
        valid = multihost_utils.process_allgather(valid, tiled=True)
    for name, value in jax.device_get(feats).items():
        outputs.setdefault(name, []).append(np.asarray(value)[valid])
