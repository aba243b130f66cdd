"""Tests of the noise-aware EncoderClassifier (ADM's EncoderUNetModel)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.models.classifier import AttentionPool2d, EncoderClassifier
from diffjax.models.unet import UNet, count_params

EPS32 = float(np.finfo(np.float32).eps)
TINY = dict(model_channels=8, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=(4,),
            num_head_channels=4, norm_groups=4, use_scale_shift_norm=True, resblock_updown=True)


def _key(seed):
    return jax.random.key(seed, impl="rbg")  # compiles fast on XLA:CPU


def _encoder_count(in_ch, mc, nrb, mult, attn_ds, scale_shift, updown):
    """Closed form for ADM's time embedding + input blocks + middle block."""
    lin = lambda i, o: i * o + o  # noqa: E731
    conv = lambda i, o, k: k * k * i * o + o  # noqa: E731
    emb = 4 * mc
    film = 2 if scale_shift else 1
    res = lambda i, o: (2 * i + conv(i, o, 3) + lin(emb, film * o)  # noqa: E731
                        + 2 * o + conv(o, o, 3) + (0 if i == o else conv(i, o, 1)))
    attn = lambda c: 2 * c + lin(c, 3 * c) + lin(c, c)  # noqa: E731
    total, ch, ds = lin(mc, emb) + lin(emb, emb) + conv(in_ch, mult[0] * mc, 3), mult[0] * mc, 1
    for level, m in enumerate(mult):
        for _ in range(nrb):
            total += res(ch, m * mc) + (attn(m * mc) if ds in attn_ds else 0)
            ch = m * mc
        if level != len(mult) - 1:
            total += res(ch, ch) if updown else conv(ch, ch, 3)
            ds *= 2
    return total + 2 * res(ch, ch) + attn(ch), ch, ds


def test_adm_imagenet64_classifier_param_count():
    """ADM's 64x64 classifier flags: width 128, depth 4, attention at 32,16,8, 64 channels
    per head, scale-shift norm, resblock up/down, attention pooling, 1000 classes."""
    model = EncoderClassifier(num_classes=1000, model_channels=128, num_res_blocks=4,
                              channel_mult=(1, 2, 3, 4), attention_resolutions=(32, 16, 8),
                              num_head_channels=64, use_scale_shift_norm=True,
                              resblock_updown=True, pool="attention")
    enc, ch, ds = _encoder_count(3, 128, 4, (1, 2, 3, 4), (2, 4, 8), True, True)
    spatial = 64 // ds
    head = 2 * ch + ch * (spatial ** 2 + 1) + (ch * 3 * ch + 3 * ch) + (ch * 1000 + 1000)
    assert count_params(model, (1, 64, 64, 3)) == enc + head


def test_encoder_params_are_the_unets():
    """Same blocks and parameter names as the UNet's encoder half (shared code)."""
    x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((2,), jnp.float32)
    clf = jax.eval_shape(EncoderClassifier(num_classes=5, **TINY).init, _key(0), x, t)
    unet = jax.eval_shape(UNet(out_channels=3, **TINY).init, _key(0), x, t)
    shapes = lambda tree: jax.tree.map(lambda a: a.shape, tree)  # noqa: E731
    head = {"out_norm", "out_pool"}
    shared = {k: v for k, v in clf["params"].items() if k not in head}
    assert set(clf["params"]) - set(shared) == head
    assert shapes(shared) == shapes({k: unet["params"][k] for k in shared})
    assert any(k.startswith("middle_") for k in shared) and "time_embed" in shared


def test_logits_shapes_zero_adaptive_init_and_input_gradient():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 3)), jnp.float32)
    t = jnp.array([10.0, 500.0])
    adaptive = EncoderClassifier(num_classes=5, pool="adaptive", **TINY)
    logits = jax.jit(adaptive.init_with_output)(_key(0), x, t)[0]
    assert logits.shape == (2, 5) and np.all(np.asarray(logits) == 0.0)  # zero-init projection

    model = EncoderClassifier(num_classes=5, **TINY)
    shapes = jax.eval_shape(model.init, _key(1), x, t)["params"]
    rng = np.random.default_rng(1)  # random weights, incl. the zero-initialised layers
    params = jax.tree.map(lambda s: 0.3 * rng.standard_normal(s.shape).astype(np.float32),
                          shapes)
    y = jnp.array([1, 3])

    def log_prob(x):  # what classifier guidance differentiates
        logp = jax.nn.log_softmax(model.apply({"params": params}, x, t))
        return jnp.sum(jnp.take_along_axis(logp, y[:, None], axis=1)), logp

    (_, logp), grad = jax.jit(jax.value_and_grad(log_prob, has_aux=True))(x)
    assert logp.shape == (2, 5) and logp.dtype == jnp.float32
    np.testing.assert_allclose(np.exp(logp).sum(-1), 1.0, rtol=1e-5)
    assert grad.shape == x.shape and np.all(np.isfinite(np.asarray(grad)))
    assert np.abs(np.asarray(grad)).max() > 0


def _attention_pool_ref(x, p, heads):
    """float64 ADM AttentionPool2d (channel-first, all tokens, new qkv order, token 0)."""
    b, h, w, c = x.shape
    xs = x.reshape(b, h * w, c).transpose(0, 2, 1)  # [B, C, L]
    xs = np.concatenate([xs.mean(-1, keepdims=True), xs], axis=-1)
    xs = xs + p["positional_embedding"].T[None]
    qkv = np.einsum("bcl,cd->bdl", xs, p["qkv_proj"]["kernel"]) + p["qkv_proj"]["bias"][:, None]
    ch = c // heads
    q, k, v = (a.reshape(b * heads, ch, -1) for a in np.split(qkv, 3, axis=1))
    logits = np.einsum("bct,bcs->bts", q, k) / math.sqrt(ch)
    wts = np.exp(logits - logits.max(-1, keepdims=True))
    wts /= wts.sum(-1, keepdims=True)
    a = np.einsum("bts,bcs->bct", wts, v).reshape(b, c, -1)
    out = np.einsum("bcl,cd->bdl", a, p["c_proj"]["kernel"]) + p["c_proj"]["bias"][:, None]
    return out[:, :, 0]


def test_attention_pool_matches_adm_reference():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 2, 3, 8)).astype(np.float32)
    pool = AttentionPool2d(num_head_channels=4, out_features=5)
    shapes = jax.eval_shape(lambda: pool.init(_key(0), x))["params"]
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32) * 0.5, shapes)
    assert params["positional_embedding"].shape == (7, 8)
    got = jax.jit(pool.apply)({"params": params}, x)
    p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    want = _attention_pool_ref(x.astype(np.float64), p64, heads=2)
    # A few float32 stages of sums over <= 24 terms; a wrong split or token gives O(1).
    rel = np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want)
    assert rel < 100 * EPS32


def test_bad_options_raise():
    x = jnp.ones((2, 8, 8, 3))
    t = jnp.ones((2,))
    cases = [(dict(TINY, pool="spatial"), x, t, "pool"),
             (dict(TINY, num_head_channels=-1), x, t, "num_head_channels"),
             (TINY, jnp.ones((2, 7, 8, 3)), t, "divisible"),
             (TINY, x, jnp.ones((3,)), "t of shape")]
    for kw, xx, tt, match in cases:
        with pytest.raises(ValueError, match=match):
            jax.eval_shape(lambda: EncoderClassifier(num_classes=3, **kw).init(_key(0), xx, tt))
