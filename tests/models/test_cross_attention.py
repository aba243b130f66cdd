"""Context conditioning of the UNet (diffjax.models.cross_attention, issue 13 part 1).

GLIDE's form (context keys/values beside an attention block's own) against a NumPy
reference of GLIDE's QKVAttention; masks that really mask (changing masked context entries
changes nothing); the pooled context; shapes and one-line errors; parameter counts in closed
form for a tiny config and SD 1.5's 859,520,964 (diffusers' UNet2DConditionModel) without
allocating anything. Parity of the SD form with diffusers is tests/convert/test_sd_unet.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import configlib, experiment, parallel
from diffjax.errors import ConfigError
from diffjax.models import cross_attention, layers, unet

D = 6  # context width
TINY = {"out_channels": 3, "model_channels": 16, "num_res_blocks": 1, "channel_mult": (1, 2),
        "attention_resolutions": (8,), "num_heads": 2, "norm_groups": 4}


def _unet(**kw) -> unet.UNet:
    return unet.UNet(**{**TINY, "context_dim": D, **kw})


def _perturbed(params, seed):
    """Every parameter moved off its init (zero-initialised projections matter) by
    0.3 N(0, 1), drawn with NumPy (jax.random leaf by leaf compiles a sampler per shape)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: p + 0.3 * rng.standard_normal(p.shape).astype(p.dtype),
                        jax.device_get(params))


def _inputs(b=2, length=5):
    k1, k2 = jax.random.split(jax.random.key(1))
    x = jax.random.normal(k1, (b, 8, 8, 3))
    ctx = jax.random.normal(k2, (b, length, D))
    mask = jnp.array([[True, True, False, True, False], [True] * length])[:b, :length]
    return x, jnp.array([3.0, 700.0])[:b], ctx, mask


def _init(module, x, t, ctx):
    init = jax.jit(lambda: module.init(jax.random.key(0), x, t, context=ctx)["params"],
                   compiler_options=parallel.init_compiler_options())
    return _perturbed(init(), 2)


@pytest.mark.parametrize("spatial", [False, True])
def test_masked_context_entries_change_nothing(spatial):
    module = _unet(use_spatial_transformer=spatial)
    x, t, ctx, mask = _inputs()
    params = _init(module, x, t, ctx)
    apply = jax.jit(lambda p, c, m: module.apply({"params": p}, x, t, context=c,
                                                 context_mask=m))
    run = lambda c, m: apply(params, c, m)  # noqa: E731
    out = run(ctx, mask)
    assert out.shape == (2, 8, 8, 3) and bool(jnp.all(jnp.isfinite(out)))
    changed = jnp.where(mask[..., None], ctx, 100.0 * jnp.ones_like(ctx))
    np.testing.assert_allclose(run(changed, mask), out, rtol=0, atol=1e-5)
    # the same change is seen without the mask, and the context matters at all
    assert float(jnp.max(jnp.abs(run(changed, jnp.ones_like(mask)) - out))) > 1e-3
    assert float(jnp.max(jnp.abs(run(ctx + 1.0, mask) - out))) > 1e-3
    # no mask = every token
    np.testing.assert_allclose(run(ctx, None), run(ctx, jnp.ones_like(mask)), rtol=0,
                               atol=1e-5)


def test_parameter_names_of_the_two_forms():
    x, t, ctx, _ = _inputs()

    def shapes(module):
        return jax.eval_shape(lambda: module.init(jax.random.key(0), x, t, context=ctx))[
            "params"]

    glide = shapes(_unet())
    assert set(glide["middle_attn"]) == {"norm", "qkv", "encoder_kv", "proj_out"}
    assert glide["middle_attn"]["encoder_kv"]["kernel"].shape == (D, 2 * 32)
    sd = shapes(_unet(use_spatial_transformer=True, transformer_depth=2))
    assert set(sd["middle_attn"]) == {"norm", "proj_in", "transformer_blocks_0",
                                      "transformer_blocks_1", "proj_out"}
    block = sd["middle_attn"]["transformer_blocks_0"]
    assert set(block) == {"norm1", "attn1", "norm2", "attn2", "norm3", "ff_geglu", "ff_out"}
    assert block["attn2"]["to_k"]["kernel"].shape == (D, 32)
    assert "bias" not in block["attn1"]["to_q"] and "bias" in block["attn1"]["to_out"]
    assert block["ff_geglu"]["kernel"].shape == (32, 8 * 32)
    assert block["ff_out"]["kernel"].shape == (4 * 32, 32)
    # the decoder's attention and the encoder's sit where attention_resolutions say
    assert "input_blocks_1_attn" in sd and "output_blocks_0_attn" not in sd
    assert "output_blocks_3_attn" in sd


def _np_group_norm(x, groups, eps=1e-5):
    b, h, w, c = x.shape
    g = x.reshape(b, h * w, groups, c // groups)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = g.var(axis=(1, 3), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(b, h, w, c)


@pytest.mark.parametrize("new_order", [False, True])
def test_glide_attention_matches_a_numpy_reference(new_order):
    """GLIDE's QKVAttention: per-head [k_h | v_h] columns of encoder_kv (legacy order),
    context keys before the image's, softmax over both; masked context keys excluded."""
    c, heads, b, hw, length = 8, 2, 2, 4, 3
    block = layers.AttentionBlock(num_heads=heads, norm_groups=2,
                                  use_new_attention_order=new_order)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(b, 2, 2, c)).astype(np.float32)
    ctx = rng.normal(size=(b, length, D)).astype(np.float32)
    mask = np.array([[True, False, True], [True, True, True]])
    params = _perturbed(block.init(jax.random.key(0), x, ctx)["params"], 3)
    got = block.apply({"params": params}, x, ctx, mask)
    p = jax.tree.map(np.asarray, params)
    h = _np_group_norm(x, 2) * p["norm"]["scale"] + p["norm"]["bias"]
    qkv = h.reshape(b, hw, c) @ p["qkv"]["kernel"] + p["qkv"]["bias"]
    ekv = ctx @ p["encoder_kv"]["kernel"] + p["encoder_kv"]["bias"]
    ch = c // heads
    want = np.zeros((b, hw, c), np.float32)
    for i in range(b):
        for n in range(heads):
            if new_order:
                q, k, v = (qkv[i, :, j * c + n * ch: j * c + (n + 1) * ch] for j in range(3))
                ek, ev = (ekv[i, :, j * c + n * ch: j * c + (n + 1) * ch] for j in range(2))
            else:
                q, k, v = (qkv[i, :, n * 3 * ch + j * ch: n * 3 * ch + (j + 1) * ch]
                           for j in range(3))
                ek, ev = (ekv[i, :, n * 2 * ch + j * ch: n * 2 * ch + (j + 1) * ch]
                          for j in range(2))
            keys, values = np.concatenate([ek, k]), np.concatenate([ev, v])
            logits = q @ keys.T / np.sqrt(ch)
            logits[:, :length][:, ~mask[i]] = -np.inf
            w = np.exp(logits - logits.max(axis=1, keepdims=True))
            want[i, :, n * ch:(n + 1) * ch] = (w / w.sum(axis=1, keepdims=True)) @ values
    want = x + (want @ p["proj_out"]["kernel"] + p["proj_out"]["bias"]).reshape(x.shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_multihead_attention_mask_excludes_keys():
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 3, 2, 4)) for i in range(3))
    mask = jnp.array([[True, False, True], [False, True, True]])
    got = layers.multihead_attention(q, k, v, "xla", mask)
    for i in range(2):
        keep = np.asarray(mask[i])
        want = layers.multihead_attention(q[i:i + 1], k[i:i + 1, keep], v[i:i + 1, keep])
        np.testing.assert_allclose(got[i:i + 1], want, rtol=1e-6, atol=1e-6)


def test_pool_context():
    ctx = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2)
    mask = jnp.array([[True, False, True], [False, False, False]])
    np.testing.assert_array_equal(cross_attention.pool_context(ctx, mask, "last"), ctx[:, -1])
    mean = cross_attention.pool_context(ctx, mask, "mean")
    np.testing.assert_allclose(mean[0], (ctx[0, 0] + ctx[0, 2]) / 2)
    np.testing.assert_array_equal(mean[1], jnp.zeros(2))  # nothing to pool
    np.testing.assert_allclose(cross_attention.pool_context(ctx, None, "mean"), ctx.mean(1))


@pytest.mark.parametrize("pool", ["last", "mean"])
def test_pooled_context_enters_the_time_embedding(pool):
    module = _unet(context_pool=pool)
    x, t, ctx, mask = _inputs()
    params = _init(module, x, t, ctx)
    assert params["context_proj"]["kernel"].shape == (D, 4 * 16)
    run = jax.jit(lambda p: module.apply({"params": p}, x, t, context=ctx, context_mask=mask))
    out = run(params)
    without = run({**params, "context_proj": jax.tree.map(jnp.zeros_like,
                                                          params["context_proj"])})
    assert float(jnp.max(jnp.abs(out - without))) > 1e-3


def test_remat_changes_nothing():
    x, t, ctx, mask = _inputs()
    module = _unet(use_spatial_transformer=True)
    params = _init(module, x, t, ctx)
    want, got = (jax.jit(lambda p, m=m: m.apply({"params": p}, x, t, context=ctx,
                                                context_mask=mask))(params)
                 for m in (module, _unet(use_spatial_transformer=True, remat=True)))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_bad_context_inputs_are_one_line_errors():
    x, t, ctx, mask = _inputs()
    module = _unet()
    params = _init(module, x, t, ctx)
    cases = [
        ({}, "pass context"),
        ({"context": ctx[..., :4]}, "context of shape [B, L, context_dim]"),
        ({"context": ctx[:1]}, "context of shape"),
        ({"context": ctx, "context_mask": mask[:, :4]}, "context_mask of shape"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")) \
                as e:
            module.apply({"params": params}, x, t, **kwargs)
        assert "\n" not in str(e.value)
    plain = unet.UNet(**TINY)
    with pytest.raises(ValueError, match="context_dim > 0"):
        plain.init(jax.random.key(0), x, t, context=ctx)
    with pytest.raises(ValueError, match="context_pool"):
        _unet(context_pool="max").init(jax.random.key(0), x, t, context=ctx)


def _transformer(c: int, d: int, depth: int) -> int:
    """SpatialTransformer: GroupNorm, proj_in, depth x (3 LayerNorms, self-attention,
    cross-attention (k, v from d), GEGLU 4c), proj_out."""
    block = 3 * 2 * c + (4 * c * c + c) + (2 * c * c + 2 * d * c + c) + (c * 8 * c + 8 * c) \
        + (4 * c * c + c)
    return 2 * c + (c * c + c) + depth * block + (c * c + c)


def _attention(c: int) -> int:
    return 2 * c + (3 * c * c + 3 * c) + (c * c + c)


def test_closed_form_counts_of_a_tiny_config():
    # attention sites: encoder 8x8 (16 ch), middle (32), decoder 8x8: two blocks (16 ch)
    sites = [16, 32, 16, 16]
    base = unet.count_params(unet.UNet(**TINY), (1, 8, 8, 3))
    glide = unet.count_params(_unet(), (1, 8, 8, 3))
    assert glide - base == sum(2 * c * D + 2 * c for c in sites)
    sd = unet.count_params(_unet(use_spatial_transformer=True, transformer_depth=2), (1, 8, 8, 3))
    assert sd - base == sum(_transformer(c, D, 2) - _attention(c) for c in sites)
    pooled = unet.count_params(_unet(context_pool="mean"), (1, 8, 8, 3))
    assert pooled - glide == D * 64 + 64
    linear = unet.count_params(_unet(use_spatial_transformer=True, transformer_depth=2,
                                     use_linear_in_transformer=True), (1, 8, 8, 3))
    assert linear == sd  # a 1x1 conv and a Dense have the same parameters


SD15 = {"out_channels": 4, "model_channels": 320, "num_res_blocks": 2,
        "channel_mult": (1, 2, 4, 4), "attention_resolutions": (64, 32, 16), "num_heads": 8,
        "context_dim": 768, "use_spatial_transformer": True}


def test_sd15_unet_has_diffusers_parameter_count():
    """diffusers' UNet2DConditionModel with SD 1.5's config has 859,520,964 parameters."""
    assert unet.count_params(unet.UNet(**SD15), (1, 64, 64, 4)) == 859_520_964


def test_sd15_experiment_builds_for_summary_only():
    exp = experiment.load("experiments/sd15_unet.py", mode="summary")
    assert exp.task.image_shape == (64, 64, 4)
    assert layers.num_params(exp.task.abstract_params()) == 859_520_964
    for mode in ("train", "sample", "eval"):
        with pytest.raises(ConfigError, match=f"--mode {mode} of a context-conditioned UNet"):
            experiment.load("experiments/sd15_unet.py", mode=mode)


def test_context_config_checks():
    assert configlib.CONTEXT_POOLS == cross_attention.CONTEXT_POOLS
    c = configlib.base_config()
    c.model.context_dim = 8
    c.model.name = "dit"
    with pytest.raises(ConfigError, match="conditions the UNet only"):
        experiment.build(c, mode="summary")
    c = configlib.base_config()
    c.model.context_dim = -1
    with pytest.raises(ConfigError, match="must be >= 0"):
        experiment.build(c, mode="summary")
    c = configlib.base_config()
    c.model.context_pool = "max"
    with pytest.raises(ConfigError, match="context_pool"):
        experiment.build(c, mode="summary")
    c = configlib.base_config()
    c.model.context_dim, c.model.context_pool = 8, "mean"
    params = experiment.build(c, mode="summary").task.abstract_params()
    assert params["context_proj"]["kernel"].shape == (8, 4 * c.model.model_channels)
