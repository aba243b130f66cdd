"""GLIDE's text transformer and the text-conditioned denoiser (models.text_encoder, issue 13).

The encoder: padding really is masked, positions matter, L < context_length is the same
function as padding up to it. TextConditioned: its parameters, the null caption equal to
the denoiser given the learned null sequence, rows independent of each other, captions that
matter, and finite gradients even when every caption is null.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.models import unet
from diffjax.models.text_encoder import TextConditioned, TextEncoder

W, CTX, VOCAB = 16, 6, 12
TINY = {"out_channels": 3, "model_channels": 16, "num_res_blocks": 1, "channel_mult": (1, 2),
        "attention_resolutions": (8,), "num_heads": 2, "norm_groups": 4}
NULL = [-1] * CTX


def _encoder(**kw) -> TextEncoder:
    return TextEncoder(**{"vocab_size": VOCAB, "context_length": CTX, "width": W, "layers": 2,
                          "heads": 2, **kw})


def _perturbed(params, key):
    """Every parameter moved off its init (zero-initialised projections matter)."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tree, [p + 0.3 * jax.random.normal(k, p.shape, p.dtype)
                                     for p, k in zip(leaves, keys)])


TOKENS = jnp.array([[3, 5, 7, 0, 0, 0], [1, 2, 3, 4, 5, 6]], jnp.int32)


@functools.cache
def _encoder_setup():
    enc = _encoder()
    params = _perturbed(jax.jit(enc.init)(jax.random.key(0), TOKENS, TOKENS > 0)["params"],
                        jax.random.key(1))
    return enc, params, jax.jit(lambda tok, m: enc.apply({"params": params}, tok, m))


def test_encoder_shape_and_padding_is_masked():
    _, _, run = _encoder_setup()
    mask = TOKENS > 0
    out = run(TOKENS, mask)
    assert out.shape == (2, CTX, W) and out.dtype == jnp.float32
    changed = TOKENS.at[0, 4].set(9)  # a padded position of row 0
    kept = np.asarray(mask)[..., None]
    np.testing.assert_allclose(np.where(kept, run(changed, mask), 0), np.where(kept, out, 0),
                               rtol=0, atol=1e-6)
    assert float(jnp.max(jnp.abs(run(changed, jnp.ones_like(mask))[0, :3]
                                 - run(TOKENS, jnp.ones_like(mask))[0, :3]))) > 1e-3
    # a row with every key masked attends uniformly: finite
    assert bool(jnp.all(jnp.isfinite(run(TOKENS, jnp.zeros_like(mask)))))


def test_encoder_positions_matter():
    _, _, run = _encoder_setup()
    perm = TOKENS[:, ::-1]  # row 1 reversed; every token attended
    out, out_perm = run(TOKENS, jnp.ones_like(TOKENS, bool)), run(perm, jnp.ones_like(perm, bool))
    assert float(jnp.max(jnp.abs(out_perm[1, ::-1] - out[1]))) > 1e-3


def test_encoder_shorter_l_is_the_padded_function_and_longer_l_raises():
    enc, params, run = _encoder_setup()
    short = enc.apply({"params": params}, TOKENS[:, :3], jnp.ones((2, 3), bool))
    padded_mask = jnp.arange(CTX)[None, :].repeat(2, 0) < 3
    np.testing.assert_allclose(short, run(TOKENS, padded_mask)[:, :3], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="exceed context_length=6"):
        enc.apply({"params": params}, jnp.ones((2, CTX + 1), jnp.int32),
                  jnp.ones((2, CTX + 1), bool))


@functools.cache
def _conditioned_setup():
    model = TextConditioned(unet.UNet(**TINY, context_dim=W), _encoder(layers=1))
    x = jax.random.normal(jax.random.key(3), (3, 8, 8, 3))
    t = jnp.array([3.0, 300.0, 700.0])
    y = jnp.array([[3, 5, 7, 0, 0, 0], NULL, [1, 2, 0, 0, 0, 0]], jnp.int32)
    params = _perturbed(jax.jit(model.init)(jax.random.key(0), x, t, y)["params"],
                        jax.random.key(4))
    run = jax.jit(lambda p, y_: model.apply({"params": p}, x, t, y_))
    return model, params, x, t, y, run


def test_parameters():
    _, params, *_ = _conditioned_setup()
    assert set(params) == {"text_encoder", "null_context", "denoiser"}
    assert params["null_context"].shape == (CTX, W)
    assert params["text_encoder"]["token_embedding"]["embedding"].shape == (VOCAB, W)
    assert params["text_encoder"]["positional_embedding"].shape == (CTX, W)
    assert params["denoiser"]["middle_attn"]["encoder_kv"]["kernel"].shape == (W, 2 * 32)


def test_null_caption_is_the_learned_null_sequence():
    model, params, x, t, y, run = _conditioned_setup()
    out = run(params, y)
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
    ctx = jnp.broadcast_to(params["null_context"], (3, CTX, W))
    direct = jax.jit(model.denoiser.apply)({"params": params["denoiser"]}, x, t, context=ctx,
                                           context_mask=jnp.ones((3, CTX), bool))
    np.testing.assert_allclose(out[1], direct[1], rtol=0, atol=1e-5)
    assert float(jnp.max(jnp.abs(out[0] - direct[0]))) > 1e-3  # a caption is not the null
    # the null row's value moves with null_context only
    moved = {**params, "null_context": params["null_context"] + 1.0}
    np.testing.assert_allclose(run(moved, y)[0], out[0], rtol=0, atol=1e-6)
    assert float(jnp.max(jnp.abs(run(moved, y)[1] - out[1]))) > 1e-3


def test_rows_are_independent_and_captions_matter():
    _, params, _, _, y, run = _conditioned_setup()
    out = run(params, y)
    other = y.at[2].set(jnp.array([4, 4, 4, 4, 0, 0], jnp.int32))
    out_other = run(params, other)
    np.testing.assert_allclose(out_other[:2], out[:2], rtol=0, atol=1e-6)
    assert float(jnp.max(jnp.abs(out_other[2] - out[2]))) > 1e-3
    # a row turned null changes no other row
    np.testing.assert_allclose(run(params, y.at[0].set(-1))[1:], out[1:], rtol=0, atol=1e-6)


def test_gradients_are_finite_with_null_captions():
    model, params, x, t, y, _ = _conditioned_setup()

    @jax.jit
    def grads(p, y_):
        return jax.grad(lambda p_: jnp.mean(model.apply({"params": p_}, x, t, y_) ** 2))(p)

    for captions in (jnp.full_like(y, -1), y):
        g = grads(params, captions)
        assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(g))
    assert float(jnp.abs(g["null_context"]).sum()) > 0
    assert float(jnp.abs(g["text_encoder"]["token_embedding"]["embedding"]).sum()) > 0
    g_null = grads(params, jnp.full_like(y, -1))
    assert float(jnp.abs(g_null["text_encoder"]["token_embedding"]["embedding"]).sum()) == 0
