"""Tests of diffjax.models.layers against float64 NumPy references written from the formulas."""

import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.models import layers

EPS32 = float(np.finfo(np.float32).eps)


def _key(seed):
    return jax.random.key(seed, impl="rbg")  # compiles far faster than threefry on XLA:CPU


def _normal(seed, shape, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _conv_ref(x, w, stride, pad):
    """float64 out[b,p,q,d] = sum_{i,j,c} xpad[b, p*s+i, q*s+j, c] w[i,j,c,d]."""
    kh, kw = w.shape[:2]
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho = (xp.shape[1] - kh) // stride + 1
    wo = (xp.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, w.shape[-1]))
    for i in range(kh):
        for j in range(kw):
            view = xp[:, i:i + (ho - 1) * stride + 1:stride, j:j + (wo - 1) * stride + 1:stride]
            out += view @ w[i, j]
    return out


def _conv_grads_ref(x, w, g, stride, pad):
    """float64 (dx, dw) of sum(g * conv(x, w)) by scattering each tap."""
    kh, kw = w.shape[:2]
    ho, wo = g.shape[1:3]
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    dxp = np.zeros_like(xp)
    dw = np.zeros_like(w)
    for i in range(kh):
        for j in range(kw):
            sl = (slice(None), slice(i, i + (ho - 1) * stride + 1, stride),
                  slice(j, j + (wo - 1) * stride + 1, stride))
            dw[i, j] = np.einsum("bhwc,bhwd->cd", xp[sl], g)
            dxp[sl] += g @ w[i, j].T
    return dxp[:, pad:pad + x.shape[1], pad:pad + x.shape[2]], dw


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("k,stride,shape", [(3, 1, (2, 8, 8, 5)), (3, 2, (2, 8, 6, 4)),
                                            (1, 1, (2, 5, 5, 3)), (5, 1, (1, 7, 9, 2))])
def test_fast_conv_matches_native_and_float64(k, stride, shape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal((k, k, shape[-1], 6)).astype(np.float32)
    pad = k // 2
    y_ref = _conv_ref(x.astype(np.float64), w.astype(np.float64), stride, pad)
    g = rng.standard_normal(y_ref.shape).astype(np.float32)
    dx_ref, dw_ref = _conv_grads_ref(x.astype(np.float64), w.astype(np.float64),
                                     g.astype(np.float64), stride, pad)

    def vjp(fn):
        y, pull = jax.vjp(fn, jnp.asarray(x), jnp.asarray(w))
        return (y, *pull(jnp.asarray(g)))

    fast = jax.jit(lambda: vjp(lambda a, b: layers.conv_fast_grad(a, b, stride, pad)))()
    native = jax.jit(lambda: vjp(lambda a, b: layers._conv_native(a, b, stride, pad)))()
    # float32 sums of n terms: relative rounding error of order sqrt(n) * eps.
    n_terms = max(k * k * shape[-1], shape[0] * y_ref.shape[1] * y_ref.shape[2])
    tol = 4 * math.sqrt(n_terms) * EPS32
    for got, want in zip(fast, (y_ref, dx_ref, dw_ref)):
        assert _rel(got, want) < tol
    for got, want in zip(fast, native):
        assert _rel(got, np.asarray(want, np.float64)) < tol


def test_conv_module_is_portable_to_nn_conv():
    """Same params, outputs and gradients as nn.Conv (padding 1) with either gradient path."""
    x = _normal(1, (2, 6, 6, 3))
    ref = nn.Conv(4, (3, 3), padding=1)
    for opt in ("on", "off"):
        conv = layers.Conv(4, 3, cpu_fast_conv=opt)
        params = conv.init(_key(2), x)["params"]
        params = {"kernel": params["kernel"], "bias": params["bias"] + 0.5}
        assert params["kernel"].shape == (3, 3, 3, 4)

        def loss(module, p, x):
            return jnp.sum(jnp.sin(module.apply({"params": p}, x)))

        got = jax.jit(jax.value_and_grad(lambda p, x: loss(conv, p, x), argnums=(0, 1)))(params, x)
        want = jax.jit(jax.value_and_grad(lambda p, x: loss(ref, p, x), argnums=(0, 1)))(params, x)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))


def test_use_fast_conv_option():
    on_cpu = jax.default_backend() == "cpu"
    assert layers.use_fast_conv("auto") == (on_cpu and layers.CPU_FAST_CONV_AUTO)
    assert layers.use_fast_conv("on") == on_cpu and not layers.use_fast_conv("off")
    with pytest.raises(ValueError, match="cpu_fast_conv"):
        layers.use_fast_conv("yes")
    with pytest.raises(ValueError, match="odd"):
        layers.Conv(2, 2).init(jax.random.key(0), jnp.ones((1, 4, 4, 1)))


def test_timestep_embedding_closed_form():
    t = np.array([0.0, 1.0, 17.5, 999.0])
    for dim in (8, 7):
        half = dim // 2
        f = 10000.0 ** (-np.arange(half) / half)
        want = np.concatenate([np.cos(t[:, None] * f), np.sin(t[:, None] * f)], axis=1)
        if dim % 2:
            want = np.concatenate([want, np.zeros((4, 1))], axis=1)
        got = layers.timestep_embedding(jnp.asarray(t, jnp.float32), dim)
        # |arg| <= 999: float32 argument rounding gives abs error <= 999 * eps.
        np.testing.assert_allclose(got, want, atol=2 * 999 * EPS32)


def test_resampling_ops():
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)
    np.testing.assert_array_equal(layers.upsample_nearest(jnp.asarray(x)),
                                  np.repeat(np.repeat(x, 2, axis=1), 2, axis=2))
    windows = x[:, :2].astype(np.float64).reshape(2, 1, 2, 2, 2, 5)  # [B, H/2, 2, W/2, 2, C]
    want = windows.mean(axis=(2, 4))
    got = np.asarray(layers.avg_pool_2x2(jnp.asarray(x[:, :2])), np.float64)
    # The tolerance scales with the inputs, not the output: a mean of signed terms can cancel
    # to near zero (one window here averages to 1.5e-4), where any rtol is meaningless.
    # Summing n float32 terms in any order (XLA's reduction order is its own) errs by at
    # most gamma_{n-1} * sum|x_i|, gamma_k = k*u / (1 - k*u), u = eps/2 (Higham, Accuracy
    # and Stability of Numerical Algorithms, eq. 4.4); the inputs are exact float32 and
    # dividing by n = 4 is exact, so per window |got - mean| <= gamma_3 * mean|x_i|, about
    # 1.5 * eps * mean|x_i|. Rounding bound and float64 reference: no other slack needed.
    n, u = 4, EPS32 / 2
    bound = (n - 1) * u / (1 - (n - 1) * u) * np.abs(windows).mean(axis=(2, 4))
    err = np.abs(got - want)
    assert got.shape == want.shape
    assert np.all(err <= bound), f"max |got - want| / bound = {np.max(err / bound):.3g}"


def _attention_ref(x, p, heads, new_order, groups):
    """float64 ADM AttentionBlock in its channel-first [B, C, L] layout."""
    b, h, w, c = x.shape
    xs = x.reshape(b, h * w, c)
    g = xs.reshape(b, h * w, groups, c // groups)
    mu = g.mean(axis=(1, 3), keepdims=True)
    var = g.var(axis=(1, 3), keepdims=True)
    normed = ((g - mu) / np.sqrt(var + 1e-5)).reshape(b, h * w, c)
    normed = normed * p["norm"]["scale"] + p["norm"]["bias"]
    qkv = (normed @ p["qkv"]["kernel"] + p["qkv"]["bias"]).transpose(0, 2, 1)  # [B, 3C, L]
    ch = c // heads
    if new_order:
        q, k, v = (a.reshape(b * heads, ch, -1) for a in np.split(qkv, 3, axis=1))
    else:
        q, k, v = np.split(qkv.reshape(b * heads, 3 * ch, -1), 3, axis=1)
    logits = np.einsum("bct,bcs->bts", q, k) / math.sqrt(ch)
    wts = np.exp(logits - logits.max(-1, keepdims=True))
    wts /= wts.sum(-1, keepdims=True)
    a = np.einsum("bts,bcs->bct", wts, v).reshape(b, c, -1).transpose(0, 2, 1)
    out = a @ p["proj_out"]["kernel"] + p["proj_out"]["bias"]
    return x + out.reshape(b, h, w, c)


@pytest.mark.parametrize("new_order", [False, True])
def test_attention_block_matches_adm_reference(new_order):
    x = _normal(0, (2, 3, 3, 8))
    block = layers.AttentionBlock(num_head_channels=4, use_new_attention_order=new_order,
                                  norm_groups=2)
    params = jax.jit(block.init)(_key(1), x)["params"]
    params = jax.tree.map(lambda p: p + _normal(2, p.shape, 0.3), params)  # proj_out != 0
    got = jax.jit(block.apply)({"params": params}, x)
    p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    want = _attention_ref(np.asarray(x, np.float64), p64, 2, new_order, 2)
    # ~10 float32 stages (norm, two projections, softmax, weighted sum) of sums of <= 9
    # terms: relative error well under 10 * 9 * eps; a wrong head split gives O(1).
    assert _rel(got, want) < 90 * EPS32


def test_attention_heads_rule_and_errors():
    assert layers.attention_heads(256, 1, 64) == 4
    assert layers.attention_heads(256, 4, -1) == 4
    with pytest.raises(ValueError, match="num_head_channels"):
        layers.attention_heads(96, 1, 64)
    with pytest.raises(ValueError, match="num_heads"):
        layers.attention_heads(96, 5, -1)


@pytest.mark.parametrize("scale_shift", [False, True])
def test_resblock_init_is_skip_and_shapes(scale_shift):
    x = _normal(0, (2, 4, 4, 4))
    emb = _normal(1, (2, 16))
    for up, down, hw in ((False, False, 4), (True, False, 8), (False, True, 2)):
        blk = layers.ResBlock(8, use_scale_shift_norm=scale_shift, up=up, down=down,
                              norm_groups=4)
        out, v = jax.jit(blk.init_with_output)(_key(2), x, emb)
        p = v["params"]
        assert out.shape == (2, hw, hw, 8)
        assert p["emb_proj"]["kernel"].shape == (16, 16 if scale_shift else 8)
        xs = x if not up else layers.upsample_nearest(x)
        xs = xs if not down else layers.avg_pool_2x2(x)
        skip = layers.Conv(8, 1).apply({"params": p["skip"]}, xs)
        np.testing.assert_allclose(out, skip, rtol=1e-6, atol=1e-6)  # zero-init out_conv


@pytest.mark.parametrize("shape,groups", [((2, 4, 4, 64), 32), ((3, 8, 96), 32),
                                          ((2, 2, 2, 2, 32), 8), ((2, 64), 16)])
@pytest.mark.parametrize("fast_variance", [True, False])
@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_group_norm_is_flax_group_norm(shape, groups, fast_variance, param_dtype):
    """layers.GroupNorm is nn.GroupNorm(dtype=float32) with its parameters, traced as one
    jitted call: the same jaxpr inside (so the same program on every backend), the same
    parameter tree, and bit-equal compiled values and gradients."""
    ref = nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=jnp.float32,
                       param_dtype=param_dtype, use_fast_variance=fast_variance)
    new = layers.GroupNorm(groups, 1e-5, fast_variance, param_dtype)
    x = 1.0 + _normal(0, shape, 3.0)
    p_ref, p_new = ref.init(_key(0), x), new.init(_key(0), x)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), p_new) == jax.tree.map(
        lambda a: (a.shape, a.dtype), p_ref)
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, p_new, p_ref)))  # ones, zeros
    rng = np.random.default_rng(1)
    p = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype), p_ref)
    flat = lambda j: " ".join(str(j).split())
    (call,) = jax.make_jaxpr(new.apply)(p, x).eqns  # one equation: the jitted norm
    assert call.primitive.name == "jit"
    as_call = lambda x, scale, bias: ref.apply({"params": {"scale": scale, "bias": bias}}, x)
    want = jax.make_jaxpr(as_call)(x, p["params"]["scale"], p["params"]["bias"])
    assert flat(call.params["jaxpr"]) == flat(want)
    # compiled, as models run (eagerly the reference runs op by op, unfused)
    assert np.array_equal(jax.jit(new.apply)(p, x), jax.jit(ref.apply)(p, x))
    loss = lambda m: jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.sin(m.apply(p, x))), (0, 1)))
    for a, b in zip(jax.tree.leaves(loss(new)(p, x)), jax.tree.leaves(loss(ref)(p, x))):
        assert np.array_equal(a, b)


def test_group_norm_rejects_indivisible_channels():
    with pytest.raises(ValueError, match="norm_groups"):
        layers.ResBlock(6, norm_groups=4).init(jax.random.key(0), jnp.ones((1, 4, 4, 6)),
                                               jnp.ones((1, 8)))


def test_num_params_counts_shape_structs():
    tree = {"a": jax.ShapeDtypeStruct((3, 4), jnp.float32), "b": jnp.zeros((5,))}
    assert layers.num_params(tree) == 17


def test_attention_implementation_option():
    """cuDNN's flash attention only where it applies; "cudnn" elsewhere is a one-line error."""
    from diffjax.models.layers import attention_implementation as impl

    bf16 = jnp.bfloat16
    assert impl("auto", bf16, 64, "gpu") == "cudnn"
    assert impl("auto", jnp.float16, 128, "gpu") == "cudnn"
    # float32, a head dim cuDNN does not take, or another backend: XLA's
    assert impl("auto", jnp.float32, 64, "gpu") == "xla"
    assert impl("auto", bf16, 12, "gpu") == "xla"
    assert impl("auto", bf16, 256, "gpu") == "xla"
    assert impl("auto", bf16, 64, "cpu") == "xla"
    assert impl("auto", bf16, 64, "tpu") == "xla"
    # CPU from CPU_BLOCKED_MIN_QUERIES (512) queries on: blocked; never elsewhere by itself
    assert impl("auto", jnp.float32, 32, "cpu", num_queries=1024) == "blocked"
    assert impl("auto", jnp.float32, 32, "cpu", num_queries=512) == "blocked"
    assert impl("auto", jnp.float32, 32, "cpu", num_queries=511) == "xla"
    assert impl("auto", jnp.float32, 32, "gpu", num_queries=4096) == "xla"
    assert impl("auto", bf16, 64, "gpu", num_queries=4096) == "cudnn"
    assert impl("auto", bf16, 64, "tpu", num_queries=4096) == "xla"
    assert impl("blocked", bf16, 64, "gpu") == "blocked"
    assert impl("xla", bf16, 64, "gpu") == "xla"
    assert impl("cudnn", bf16, 64, "gpu") == "cudnn"
    for dtype, head, backend in ((bf16, 64, "cpu"), (jnp.float32, 64, "gpu"), (bf16, 12, "gpu")):
        with pytest.raises(ValueError, match="attention_impl='cudnn' needs") as e:
            impl("cudnn", dtype, head, backend)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="use one of"):
        impl("flash", bf16, 64, "gpu")
    # On this machine "auto" is XLA's: the block computes what it always did.
    assert impl("auto", bf16, 64) == ("cudnn" if jax.default_backend() == "gpu" else "xla")


@pytest.mark.parametrize("length,masked", [(600, False), (1024, True), (256, False)])
def test_blocked_attention_is_xla_attention(length, masked):
    """blocked_attention computes XLA's attention (float32 rounding: each block's logits,
    softmax and products are the same operations on the same rows), values and the gradients
    of q, k and v; 600 queries pad the last block of 256, 256 is one block (no loop); a key
    mask reaches every block, and a row with every key masked attends uniformly as XLA's."""
    rng = np.random.default_rng(length)
    q, k, v, g = (jnp.asarray(rng.standard_normal((2, length, 2, 16)), jnp.float32)
                  for _ in range(4))
    k = k[:, :300]
    v = v[:, :300]
    mask = None
    if masked:
        keep = rng.uniform(size=(2, 300)) < 0.7
        keep[1] = False  # every key masked: XLA's attends uniformly
        mask = jnp.asarray(keep)[:, None, None, :]

    def xla(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")

    def blocked(q, k, v):
        return layers.blocked_attention(q, k, v, mask)

    for name, fn in (("values", lambda f: f(q, k, v)),
                     ("grads", lambda f: jax.vjp(f, q, k, v)[1](g))):
        want, got = jax.jit(lambda: fn(xla))(), jax.jit(lambda: fn(blocked))()
        for w, o in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
            np.testing.assert_allclose(o, w, rtol=1e-5, atol=1e-5, err_msg=name)
    assert float(jnp.std(want[0])) > 0.01  # gradients that are not zero


def test_blocked_attention_never_holds_the_whole_logits():
    """Its compiled forward + backward at 1024 queries needs a fraction of XLA's temporary
    memory (which holds the [B, N, 1024, 1024] float32 logits and probabilities whole), and
    what it needs follows the block size (a few [B, N, block, S] arrays alive at a time): the
    loop is real and the backward recomputes each block rather than saving them all (without
    jax.checkpoint it needed 47 MB here, next to XLA's 50 MB and blocked's 18 MB)."""
    q = jnp.zeros((2, 1024, 2, 32), jnp.float32)

    def temp(attention):
        fn = jax.jit(lambda q: jax.vjp(lambda q: attention(q, q, q), q)[1](q))
        return fn.lower(q).compile().memory_analysis().temp_size_in_bytes

    logits = 2 * 2 * 1024 * 1024 * 4
    whole = temp(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"))
    blocked = temp(layers.blocked_attention)
    smaller = temp(lambda q, k, v: layers.blocked_attention(q, k, v, block=128))
    assert whole >= 2 * logits
    assert blocked < whole / 2, (blocked, whole)
    assert smaller < 0.6 * blocked, (smaller, blocked)
    # What the models call: "auto" on this CPU backend at 1024 queries is the blocked kernel.
    if jax.default_backend() == "cpu":
        assert temp(lambda q, k, v: layers.multihead_attention(q, k, v, "auto")) == blocked



def _counting(init):
    """``init`` and the list of shapes it was called for (under a trace or not)."""
    calls = []

    def counted(key, shape, dtype=jnp.float32):
        calls.append(tuple(shape))
        return init(key, shape, dtype)

    return counted, calls


@pytest.mark.parametrize("make, flax_layer, x", [
    (lambda i: layers.Conv(4, kernel_init=i, bias_init=i), None, jnp.ones((1, 4, 4, 3))),
    (lambda i: layers.GroupNorm(2), None, jnp.ones((1, 2, 2, 4))),
    (lambda i: layers.Dense(4, kernel_init=i, bias_init=i), nn.Dense, jnp.ones((2, 3))),
    (lambda i: layers.Embed(5, 4, embedding_init=i), nn.Embed, jnp.array([0, 4])),
    (lambda i: layers.LayerNorm(scale_init=i, bias_init=i), nn.LayerNorm, jnp.ones((2, 3))),
])
def test_apply_reads_parameters_without_tracing_initializers(make, flax_layer, x):
    """Flax's Module.param traces a parameter's initializer on every apply to check its
    shape; layers.ReadsParams reads the parameter and checks the shape itself: initializers
    run at init only, the Flax layer's parameters and outputs, a wrong shape still Flax's
    error."""
    init, calls = _counting(nn.initializers.normal(0.5))
    module = make(init)
    params = module.init(jax.random.PRNGKey(0), x)
    created, traced, eval_shape = list(calls), [], jax.eval_shape
    with pytest.MonkeyPatch.context() as m:  # Flax's check is an eval_shape of the init
        m.setattr(jax, "eval_shape", lambda f, *a, **k: (traced.append(f),
                                                         eval_shape(f, *a, **k))[1])
        module.apply(params, x)
        jax.jit(module.apply)(params, x)
        jax.grad(lambda p: jnp.sum(module.apply(p, x) ** 2))(params)
    assert calls == created and not traced, (calls[len(created):], traced)
    if flax_layer is not None:  # the same parameters, names, values and outputs as Flax's
        assert len(created) >= 1
        twin = flax_layer(**{f: getattr(module, f) for f in module.__dataclass_fields__
                             if f not in ("parent", "name")})
        ref = twin.init(jax.random.PRNGKey(0), x)
        assert jax.tree.structure(ref) == jax.tree.structure(params)
        for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(params)):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(twin.apply(ref, x), module.apply(params, x))
    bad = jax.tree.map(lambda a: jnp.zeros(a.shape[:-1] + (a.shape[-1] + 1,)), params)
    with pytest.raises(flax.errors.ScopeParamShapeError, match="is expected to generate shape"):
        module.apply(bad, x)
