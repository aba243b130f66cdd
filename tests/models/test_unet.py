"""Tests of the ADM UNet: shapes over option combinations, exact published parameter counts,
batch equivariance, zero-initialised output, class conditioning, bf16, remat, fast conv."""

import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.models.layers import num_params
from diffjax.models.unet import UNet, count_params, upsample_low_res

EPS32 = float(np.finfo(np.float32).eps)

# --- Closed-form parameter counts, derived by hand from the reference implementations ------


def _lin(cin, cout):
    return cin * cout + cout


def _conv(cin, cout, k):
    return k * k * cin * cout + cout


def adm_count(in_ch, mc, out_ch, nrb, mult, attn_ds, num_classes, learn_sigma, scale_shift,
              updown):
    """openai/guided-diffusion UNetModel (conv_resample=True); attn_ds are ADM's rates."""
    emb = 4 * mc

    def res(ci, co):
        return (2 * ci + _conv(ci, co, 3) + _lin(emb, (2 if scale_shift else 1) * co) + 2 * co
                + _conv(co, co, 3) + (0 if ci == co else _conv(ci, co, 1)))

    def attn(c):  # norm, qkv (1x1 conv1d), proj_out
        return 2 * c + _lin(c, 3 * c) + _lin(c, c)

    total = _lin(mc, emb) + _lin(emb, emb) + (num_classes * emb if num_classes else 0)
    ch = int(mult[0] * mc)
    total += _conv(in_ch, ch, 3)
    chans, ds = [ch], 1
    for level, m in enumerate(mult):
        for _ in range(nrb):
            total += res(ch, int(m * mc)) + (attn(int(m * mc)) if ds in attn_ds else 0)
            ch = int(m * mc)
            chans.append(ch)
        if level != len(mult) - 1:
            total += res(ch, ch) if updown else _conv(ch, ch, 3)
            chans.append(ch)
            ds *= 2
    total += 2 * res(ch, ch) + attn(ch)
    for level, m in reversed(list(enumerate(mult))):
        for i in range(nrb + 1):
            total += res(ch + chans.pop(), int(m * mc))
            ch = int(m * mc)
            total += attn(ch) if ds in attn_ds else 0
            if level and i == nrb:
                total += res(ch, ch) if updown else _conv(ch, ch, 3)
                ds //= 2
    return total + 2 * ch + _conv(ch, out_ch * (2 if learn_sigma else 1), 3)


def ddpm_count(ch, out_ch, ch_mult, nrb, attn_res, size):
    """hojonathanho/diffusion diffusion_tf/models/unet.py `model` (resamp_with_conv=True)."""

    def resnet(c, o):  # norm1, conv1, temb_proj, norm2, conv2, nin_shortcut
        return 2 * c + _conv(c, o, 3) + _lin(4 * ch, o) + 2 * o + _conv(o, o, 3) + (
            _lin(c, o) if c != o else 0)

    def attn(c):  # norm, q, k, v, proj_out
        return 2 * c + 4 * _lin(c, c)

    n = _lin(ch, 4 * ch) + _lin(4 * ch, 4 * ch) + _conv(3, ch, 3)
    hs, res, cur = [ch], size, ch
    for lvl, m in enumerate(ch_mult):
        for _ in range(nrb):
            n += resnet(cur, ch * m) + (attn(ch * m) if res in attn_res else 0)
            cur = ch * m
            hs.append(cur)
        if lvl != len(ch_mult) - 1:
            n += _conv(cur, cur, 3)
            hs.append(cur)
            res //= 2
    n += 2 * resnet(cur, cur) + attn(cur)
    for lvl in reversed(range(len(ch_mult))):
        for _ in range(nrb + 1):
            n += resnet(cur + hs.pop(), ch * ch_mult[lvl])
            cur = ch * ch_mult[lvl]
            n += attn(cur) if res in attn_res else 0
        if lvl != 0:
            n += _conv(cur, cur, 3)
            res *= 2
    return n + 2 * cur + _conv(cur, out_ch, 3)


ADM_IMAGENET64 = 295_904_454  # from adm_count; the ADM paper reports "296M"
DDPM_CIFAR10 = 35_746_307  # Ho et al. (2020): 35.7M


def test_adm_imagenet64_param_count_exact():
    model = UNet(out_channels=3, model_channels=192, num_res_blocks=3,
                 channel_mult=(1, 2, 3, 4), attention_resolutions=(32, 16, 8),
                 num_head_channels=64, use_scale_shift_norm=True, resblock_updown=True,
                 learn_sigma=True, num_classes=1000, dropout=0.1, use_new_attention_order=True)
    closed = adm_count(3, 192, 3, 3, (1, 2, 3, 4), (2, 4, 8), 1000, True, True, True)
    assert closed == ADM_IMAGENET64
    assert count_params(model, (1, 64, 64, 3)) == ADM_IMAGENET64


def test_ddpm_cifar10_param_count_exact():
    model = UNet(out_channels=3, model_channels=128, num_res_blocks=2,
                 channel_mult=(1, 2, 2, 2), attention_resolutions=(16,), dropout=0.1)
    assert ddpm_count(128, 3, (1, 2, 2, 2), 2, (16,), 32) == DDPM_CIFAR10
    assert adm_count(3, 128, 3, 2, (1, 2, 2, 2), (2,), None, False, False, False) == DDPM_CIFAR10
    assert count_params(model, (1, 32, 32, 3)) == DDPM_CIFAR10


def test_null_label_and_low_res_param_counts():
    kw = dict(out_channels=3, model_channels=8, num_res_blocks=1, channel_mult=(1, 2),
              attention_resolutions=(4,), norm_groups=4, num_classes=5)
    base = count_params(UNet(**kw), (1, 8, 8, 3))
    assert count_params(UNet(**kw, class_null_label=True), (1, 8, 8, 3)) == base + 4 * 8
    # low_res adds 3 input channels to the first 3x3 conv (8 filters).
    assert count_params(UNet(**kw), (1, 8, 8, 3), low_res_shape=(1, 4, 4, 3)) == base + 9 * 3 * 8
    assert base == adm_count(3, 8, 3, 1, (1, 2), (2,), 5, False, False, False)


# --- Output shapes for every option combination (abstract evaluation: nothing computed) -----

RESAMPLE = {"updown": dict(resblock_updown=True), "conv": dict(conv_resample=True),
            "pool": dict(conv_resample=False)}
ATTENTION = {"heads2_legacy_up1": dict(num_heads=2, num_heads_upsample=1),
             "headch4_new": dict(num_head_channels=4, use_new_attention_order=True)}
CLASSES = {"uncond": dict(), "cond": dict(num_classes=5),
           "cond_null": dict(num_classes=5, class_null_label=True)}


def test_output_shapes_every_option_combination():
    """All 36 combinations of the structural options (abstract evaluation, nothing computed).
    The two options that only change channel counts (learn_sigma, low_res) cycle through
    their 4 combinations along the product; every pair (their values, another option's
    value) occurs, which is checked below."""
    b, size = 2, 8
    io_cases = list(itertools.product((False, True), (False, True)))
    pairs = set()
    combos = itertools.product(ATTENTION, (False, True), RESAMPLE, CLASSES)
    for i, (att, ss, rs, cls) in enumerate(combos):
        sigma, low = io_cases[i % 4]
        pairs |= {(0, att, i % 4), (1, ss, i % 4), (2, rs, i % 4), (3, cls, i % 4)}
        model = UNet(out_channels=3, model_channels=8, num_res_blocks=1, channel_mult=(1, 2),
                     attention_resolutions=(8, 4), norm_groups=4, learn_sigma=sigma,
                     use_scale_shift_norm=ss, **RESAMPLE[rs], **ATTENTION[att], **CLASSES[cls])
        x = jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32)
        t = jax.ShapeDtypeStruct((b,), jnp.float32)
        y = jax.ShapeDtypeStruct((b,), jnp.int32) if cls != "uncond" else None
        lr = jax.ShapeDtypeStruct((b, 4, 4, 3), jnp.float32) if low else None
        out, _ = jax.eval_shape(
            lambda x, t, y, lr, m=model: m.init_with_output(jax.random.key(0), x, t, y,
                                                            low_res=lr), x, t, y, lr)
        assert out.shape == (b, size, size, 6 if sigma else 3), (ss, rs, att, cls, sigma, low)
        assert out.dtype == jnp.float32
    assert len(pairs) == 4 * (len(ATTENTION) + 2 + len(RESAMPLE) + len(CLASSES))


# --- Behaviour of a tiny model (one config, few compiled programs: compiling is the cost) ---

TINY = dict(out_channels=3, model_channels=8, num_res_blocks=1, channel_mult=(1, 2),
            attention_resolutions=(4,), num_head_channels=4, norm_groups=4,
            use_scale_shift_norm=True, resblock_updown=True)
COND = dict(TINY, num_classes=4, class_null_label=True, learn_sigma=True, dropout=0.3)


def _inputs(b=3, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((b, 8, 8, 3)), jnp.float32)
    t = jnp.asarray(rng.uniform(0, 999, (b,)), jnp.float32)
    y = jnp.array([0, 1, 4, 2][:b], jnp.int32)
    return x, t, y


def _perturb(params, scale=0.1, seed=7):
    """params + scale * N(0, 1) (NumPy draws: no XLA compilation)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: p + scale * rng.standard_normal(p.shape).astype(p.dtype), params)


def _random_params(shapes, seed=5):
    """Random params for abstract shapes: weights N(0, 1/fan_in), vectors 1 + 0.1 N(0, 1)."""
    rng = np.random.default_rng(seed)

    def draw(s):
        if len(s.shape) == 1:
            return 1.0 + 0.1 * rng.standard_normal(s.shape).astype(np.float32)
        fan_in = int(np.prod(s.shape[:-1]))
        return rng.standard_normal(s.shape).astype(np.float32) / np.sqrt(fan_in)
    return jax.tree.map(draw, shapes)


def _key(seed):
    # The "rbg" PRNG compiles far faster than threefry on XLA:CPU; the model is agnostic.
    return jax.random.key(seed, impl="rbg")


def _grad_fn(model):
    def loss(params, x, t, y, key):
        out = model.apply({"params": params}, x, t, y, train=True, rngs={"dropout": key})
        return jnp.mean(out ** 2)
    return jax.jit(jax.value_and_grad(loss))


@pytest.fixture(scope="module")
def tiny():
    """(model, initial params, perturbed params, jitted eval apply(params, x, t, y))."""
    model = UNet(**COND)
    x, t, y = _inputs()
    params = jax.jit(model.init)(_key(0), x, t, y)["params"]
    apply = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))
    return model, params, _perturb(params), apply


def test_zero_init_output_is_zero(tiny):
    _, params, _, apply = tiny
    out = apply(params, *_inputs())
    assert out.shape == (3, 8, 8, 6)
    assert np.all(np.asarray(out) == 0.0)


def test_batch_equivariance_and_labels(tiny):
    _, _, params, apply = tiny
    x, t, y = _inputs()
    out = np.asarray(apply(params, x, t, y))
    perm = np.array([2, 0, 1])
    np.testing.assert_allclose(apply(params, x[perm], t[perm], y[perm]), out[perm],
                               rtol=1e-5, atol=1e-6 * np.abs(out).max())
    # Other labels (incl. the null label 4) change the output of the same images.
    out_y = np.asarray(apply(params, x, t, jnp.array([1, 4, 0], jnp.int32)))
    for i in range(3):
        assert np.abs(out_y[i] - out[i]).max() > 1e-3 * np.abs(out[i]).max()
    # Examples do not interact: a single example equals its row of the batch (float32
    # summation order may change with the batch size: relative error ~ sqrt(n) eps).
    np.testing.assert_allclose(apply(params, x[1:2], t[1:2], y[1:2])[0], out[1],
                               rtol=1e-5, atol=1e-5 * np.abs(out).max())


def test_bfloat16_compute_close_to_float32(tiny):
    _, _, params, apply = tiny
    x, t, y = _inputs()
    bf = UNet(**COND, dtype=jnp.bfloat16)
    out16 = jax.jit(lambda p: bf.apply({"params": p}, x, t, y))(params)
    jaxpr = str(jax.make_jaxpr(lambda p: bf.apply({"params": p}, x, t, y))(params))
    conv_dtypes = re.findall(r":(\w+)\[[\d,]*\] = conv_general_dilated", jaxpr)
    assert len(conv_dtypes) >= 10 and set(conv_dtypes) == {"bf16"}  # convs compute in bf16
    out32 = apply(params, x, t, y)
    assert out16.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(out16)))
    # bf16 keeps 8 significant bits (unit roundoff 2^-8); this net has ~20 rounding stages
    # in sequence, so the relative error is a few percent at most.
    rel = np.linalg.norm(out16 - out32) / np.linalg.norm(out32)
    assert rel < 20 * 2.0 ** -8
    bfp = UNet(**COND, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    v = jax.eval_shape(lambda: bfp.init(jax.random.key(0), x, t, y))
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(v["params"]))


def test_remat_identical_outputs_and_grads():
    # A one-level model (5 ResBlocks, 3 attention blocks, dropout) keeps compilation short.
    kw = dict(COND, channel_mult=(1,), attention_resolutions=(8,))
    x, t, y = _inputs()
    params = _random_params(jax.eval_shape(lambda: UNet(**kw).init(_key(0), x, t, y))["params"])
    plain = _grad_fn(UNet(**kw))
    l0, g0 = plain(params, x, t, y, _key(3))
    for policy in ("block", "dots"):
        remat = _grad_fn(UNet(**kw, remat=True, remat_policy=policy))
        # remat really rematerialises: checkpointed sub-computations appear in the program.
        traced = [str(jax.make_jaxpr(f)(params, x, t, y, _key(3))) for f in (plain, remat)]
        assert "remat" not in traced[0] and traced[1].count("remat") >= 8  # 5 res + 3 attn
        l1, g1 = remat(params, x, t, y, _key(3))
        # Same ops recomputed with the same dropout masks: equal up to XLA's fusion choices.
        np.testing.assert_allclose(l1, l0, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
            scale = float(np.abs(b).max())
            assert scale > 0
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale)


def _residuals(model, params, x, t, y):
    """What the backward pass of model's loss keeps from the forward pass: {shape: count}."""
    def loss(p):
        return jnp.mean(model.apply({"params": p}, x, t, y) ** 2)
    # The VJP closure is a pytree whose leaves are the residuals; shapes only, nothing run.
    leaves = jax.eval_shape(lambda p: jax.tree.leaves(jax.vjp(loss, p)[1]), params)
    kept = {}
    for leaf in leaves:
        kept[leaf.shape] = kept.get(leaf.shape, 0) + 1
    return kept


def test_remat_policies_keep_what_they_say():
    """Activations [B, H, W, C] kept for the backward pass: all of them without remat, only the
    blocks' inputs with "block", those plus every conv/matmul output with "dots"."""
    kw = dict(COND, channel_mult=(1,), attention_resolutions=(8,), dropout=0.0,
              cpu_fast_conv="off")
    x, t, y = _inputs()
    params = jax.eval_shape(lambda: UNet(**kw).init(_key(0), x, t, y))["params"]
    feature = x.shape[:3] + (kw["model_channels"],)  # [B, H, W, C] inside the blocks
    kept = {name: _residuals(UNet(**kw, remat=name != "none", remat_policy=p), params, x, t, y)
            .get(feature, 0) for name, p in (("none", "block"), ("block", "block"),
                                             ("dots", "dots"))}
    # 5 ResBlocks and 3 attention blocks (whose qkv / proj outputs are [B, L, C]-shaped). Of a
    # ResBlock's two conv outputs the backward pass needs the first (GroupNorm's input) and
    # not the second (only added to the skip), so "dots" keeps 5 arrays more than "block".
    assert kept["block"] < kept["dots"] < kept["none"], kept
    assert kept["dots"] - kept["block"] == 5, kept


def test_dropout_only_in_training(tiny):
    model, _, params, apply = tiny
    x, t, y = _inputs()
    train = jax.jit(lambda p, k: model.apply({"params": p}, x, t, y, train=True,
                                             rngs={"dropout": k}))
    a, b = np.asarray(train(params, _key(1))), np.asarray(train(params, _key(2)))
    evaluated = np.asarray(apply(params, x, t, y))
    assert np.abs(a - b).max() > 1e-3 * np.abs(a).max()
    assert np.abs(a - evaluated).max() > 1e-3 * np.abs(a).max()
    np.testing.assert_array_equal(apply(params, x, t, y), evaluated)


def test_bad_inputs_raise_one_line_errors():
    model = UNet(**TINY)
    cond = UNet(**TINY, num_classes=3)
    x = jnp.ones((2, 8, 8, 3))
    t = jnp.ones((2,))
    y = jnp.zeros((2,), jnp.int32)
    cases = [(model, (jnp.ones((2, 7, 8, 3)), t), {}, "divisible"),
             (model, (x, t, y), {}, "num_classes"),
             (cond, (x, t), {}, "num_classes"),
             (model, (x, jnp.ones((3,))), {}, "t of shape"),
             (cond, (x, t, jnp.zeros((3,), jnp.int32)), {}, "y of shape"),
             (model, (x, t), {"low_res": jnp.ones((3, 4, 4, 3))}, "low_res"),
             (UNet(**{**TINY, "num_head_channels": 3}), (x, t), {}, "num_head_channels"),
             (UNet(**{**TINY, "norm_groups": 3}), (x, t), {}, "norm_groups")]
    for m, args, kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            jax.eval_shape(lambda m=m: m.init(jax.random.key(0), *args, **kwargs))


def _bilinear_ref(a, n_out):
    """float64 1-D linear interpolation along axis 1, half-pixel centres, clamped edges."""
    n = a.shape[1]
    src = np.clip((np.arange(n_out) + 0.5) * n / n_out - 0.5, 0, n - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    frac = (src - lo)[None, :, None, None]
    return a[:, lo] * (1 - frac) + a[:, hi] * frac


def test_low_res_upsampling_is_pytorch_bilinear():
    a = np.random.default_rng(0).standard_normal((2, 4, 3, 2))
    want = _bilinear_ref(_bilinear_ref(a, 8).transpose(0, 2, 1, 3), 12).transpose(0, 2, 1, 3)
    got = upsample_low_res(jnp.asarray(a, jnp.float32), 8, 12)
    np.testing.assert_allclose(got, want, rtol=0, atol=8 * EPS32 * np.abs(a).max())


def test_aug_embed_adds_a_second_time_embedding():
    """aug_embed=True adds one TimeEmbed (sinusoid, Dense, SiLU, Dense) summed into the time
    embedding; with its last Dense zeroed the model is the model without it."""
    x, t, _ = _inputs()
    low = jnp.asarray(np.random.default_rng(1).standard_normal((3, 4, 4, 3)), jnp.float32)
    plain, aug = UNet(**TINY), UNet(**TINY, aug_embed=True)
    mc = TINY["model_channels"]
    n_plain = count_params(plain, (1, 8, 8, 3), low_res_shape=(1, 4, 4, 3))
    shapes = jax.eval_shape(lambda: aug.init(jax.random.key(0), x, t, low_res=low,
                                             aug_level=t))
    assert num_params(shapes["params"]) == n_plain + (mc * 4 * mc + 4 * mc) + (16 * mc * mc
                                                                                + 4 * mc)
    params = _random_params(shapes["params"])
    a0, a1 = jnp.zeros((3,)), jnp.full((3,), 250.0)
    out0 = aug.apply({"params": params}, x, t, low_res=low, aug_level=a0)
    out1 = aug.apply({"params": params}, x, t, low_res=low, aug_level=a1)
    assert np.abs(np.asarray(out0 - out1)).max() > 1e-3 * np.abs(np.asarray(out0)).max()
    zeroed = dict(params, aug_embed={**params["aug_embed"], "dense_1": jax.tree.map(
        jnp.zeros_like, params["aug_embed"]["dense_1"])})
    without = {k: v for k, v in params.items() if k != "aug_embed"}
    np.testing.assert_array_equal(
        aug.apply({"params": zeroed}, x, t, low_res=low, aug_level=a1),
        plain.apply({"params": without}, x, t, low_res=low))
    with pytest.raises(ValueError, match="aug_level"):
        aug.apply({"params": params}, x, t, low_res=low)
    with pytest.raises(ValueError, match="aug_level"):
        plain.apply({"params": without}, x, t, low_res=low, aug_level=a0)

