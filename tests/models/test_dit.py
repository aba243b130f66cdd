"""Tests of the DiT transformer: closed-form parameter counts of the paper's 12 models, shapes,
adaLN-Zero's zero output at init, patchify/unpatchify, the fixed position table, bf16,
remat and the null-label row. Parity with diffusers' DiT is in tests/convert/test_dit.py."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.models import dit

# --- Closed-form parameter counts, derived by hand from facebookresearch/DiT's models.py ------


def _lin(cin, cout):
    return cin * cout + cout


def dit_count(depth, hidden_size, patch_size, in_ch=4, num_classes=1000, learn_sigma=True,
              class_dropout_prob=0.1, mlp_ratio=4.0):
    """Trainable parameters of facebookresearch/DiT's DiT (its pos_embed buffer excluded)."""
    hidden, patch = hidden_size, patch_size
    out_ch = in_ch * (2 if learn_sigma else 1)
    mlp = int(hidden * mlp_ratio)
    block = (_lin(hidden, 6 * hidden) + _lin(hidden, 3 * hidden) + _lin(hidden, hidden)
             + _lin(hidden, mlp) + _lin(mlp, hidden))
    total = patch * patch * in_ch * hidden + hidden  # x_embedder conv
    total += _lin(256, hidden) + _lin(hidden, hidden)  # t_embedder
    if num_classes:
        total += (num_classes + (class_dropout_prob > 0)) * hidden  # y_embedder
    total += depth * block
    return total + _lin(hidden, 2 * hidden) + _lin(hidden, patch * patch * out_ch)


# The 12 models at input_size 32 (256x256 latents), 4 channels, 1000 classes, learn_sigma.
EXPECTED = {
    "DiT-S/2": 32_865_056, "DiT-S/4": 32_920_448, "DiT-S/8": 33_142_016,
    "DiT-B/2": 130_315_808, "DiT-B/4": 130_426_496, "DiT-B/8": 130_869_248,
    "DiT-L/2": 457_840_672, "DiT-L/4": 457_988_224, "DiT-L/8": 458_578_432,
    "DiT-XL/2": 674_834_720, "DiT-XL/4": 675_000_704, "DiT-XL/8": 675_664_640,
}
NAMES = [f"DiT-{s}/{p}" for s, p in itertools.product(dit.DIT_SIZES, dit.PATCH_SIZES)]


def test_closed_form_matches_the_published_xl2_count():
    depth, hidden, _ = dit.DIT_SIZES["XL"]
    assert dit_count(depth, hidden, 2) == 674_834_720
    # DiT's own repo counts its frozen 256 x 1152 pos_embed Parameter too.
    assert dit_count(depth, hidden, 2) + 256 * hidden == 675_129_632
    assert {n: dit_count(**{k: v for k, v in dit.dit_options(n).items() if k != "num_heads"})
            for n in NAMES} == EXPECTED


@pytest.mark.parametrize("name", NAMES)
def test_module_param_count_equals_the_formula(name):
    options = dit.dit_options(name)
    module = dit.DiT(input_size=32, in_channels=4, num_classes=1000, learn_sigma=True,
                     class_dropout_prob=0.1, **options)
    assert dit.count_params(module) == EXPECTED[name]


@pytest.mark.parametrize("kwargs", [{"num_classes": None}, {"class_dropout_prob": 0.0},
                                    {"learn_sigma": False, "mlp_ratio": 2.0}])
def test_small_counts_follow_the_formula_for_other_options(kwargs):
    module = _small(**kwargs)
    expected = dit_count(2, 64, 2, in_ch=3, **{"num_classes": 10, **kwargs})
    assert dit.count_params(module) == expected


def test_dit_options_parses_names_and_rejects_others():
    assert dit.dit_options("DiT-B/4") == {"depth": 12, "hidden_size": 768, "num_heads": 12,
                                          "patch_size": 4}
    for bad in ("DiT-XL/3", "DiT-M/2", "XL/2"):
        with pytest.raises(ValueError, match="unknown DiT size"):
            dit.dit_options(bad)


# --- Behaviour of a tiny model -------------------------------------------------------------


def _small(**kwargs):
    options = {"input_size": 8, "patch_size": 2, "in_channels": 3, "hidden_size": 64, "depth": 2,
               "num_heads": 4, "num_classes": 10}
    return dit.DiT(**{**options, **kwargs})


def _inputs(module, batch=3, seed=0):
    kx, kt = jax.random.split(jax.random.key(seed))
    s = module.input_size
    x = jax.random.normal(kx, (batch, s, s, module.in_channels))
    t = jax.random.uniform(kt, (batch,), maxval=1000.0)
    y = None if module.num_classes is None else jnp.arange(batch, dtype=jnp.int32) % 10
    return x, t, y


def _random_params(module, seed=1):
    """Parameters of module's shapes (eval_shape: no init compiled) drawn as N(0, 1/fan_in)
    (kernels, tables) or N(0, 0.1) (biases): no zero-initialised layer left."""
    x, t, y = _inputs(module, batch=1)
    shapes = jax.eval_shape(module.init, jax.random.key(0), x, t, y)["params"]
    rng = np.random.default_rng(seed)

    def draw(p):
        scale = 1 / math.sqrt(np.prod(p.shape[:-1])) if len(p.shape) > 1 else 0.1
        return jnp.asarray(rng.normal(size=p.shape) * scale, jnp.float32)

    return jax.tree.map(draw, shapes)


@pytest.mark.parametrize("kwargs,out_ch", [({}, 6), ({"learn_sigma": False}, 3),
                                           ({"num_classes": None, "patch_size": 4}, 6)])
def test_output_shape_and_dtype(kwargs, out_ch):
    module = _small(**kwargs)
    x, t, y = _inputs(module)
    out, _ = jax.eval_shape(lambda: module.init_with_output(jax.random.key(0), x, t, y))
    assert out.shape == (3, 8, 8, out_ch) and out.dtype == jnp.float32


def test_fresh_init_outputs_exactly_zero():
    module = _small()
    x, t, y = _inputs(module)
    out, variables = jax.jit(module.init_with_output)(jax.random.key(0), x, t, y)
    assert not np.any(np.asarray(out))
    assert set(variables) == {"params"}  # the position table is a constant, not a variable
    p = variables["params"]
    assert np.all(np.asarray(p["blocks_0"]["adaLN_modulation"]["kernel"]) == 0)
    assert np.std(np.asarray(p["blocks_0"]["qkv"]["kernel"])) > 0


def test_patchify_unpatchify_round_trip_and_layout():
    x = np.random.default_rng(0).normal(size=(2, 8, 12, 3)).astype(np.float32)
    p = 4
    tokens = np.asarray(dit.patchify(jnp.asarray(x), p))
    assert tokens.shape == (2, 2 * 3, p * p * 3)
    for i, j, a, b, c in itertools.product(range(2), range(3), range(p), range(p), range(3)):
        assert tokens[1, i * 3 + j, (a * p + b) * 3 + c] == x[1, i * p + a, j * p + b, c]
    np.testing.assert_array_equal(np.asarray(dit.unpatchify(jnp.asarray(tokens), p, 2, 3)), x)


def _pos_embed_reference(dim, grid):
    """Element by element: column k < dim/2 encodes the token's column j, the rest its row i;
    within each half, [sin | cos] of pos / 10000^(m / (dim/4))."""
    quarter = dim // 4
    out = np.zeros((grid * grid, dim))
    for i, j, k in itertools.product(range(grid), range(grid), range(dim)):
        pos = j if k < dim // 2 else i
        m = k % quarter
        fn = math.sin if (k % (dim // 2)) < quarter else math.cos
        out[i * grid + j, k] = fn(pos / 10000 ** (m / quarter))
    return out


def test_position_table_matches_an_independent_formula():
    table = dit.get_2d_sincos_pos_embed(32, 5)
    assert table.dtype == np.float32 and table.shape == (25, 32)
    np.testing.assert_allclose(table, _pos_embed_reference(32, 5), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        dit.get_2d_sincos_pos_embed(30, 2)


def test_bfloat16_runs_close_to_float32():
    module = _small()
    x, t, y = _inputs(module)
    params = _random_params(module)
    ref = jax.jit(module.apply)({"params": params}, x, t, y)
    half = _small(dtype=jnp.bfloat16)
    out = jax.jit(half.apply)({"params": params}, x, t, y)
    assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
    err = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
    assert 0 < err < 5e-2, err


def test_remat_gives_the_same_params_outputs_and_gradients():
    module, remat = _small(), _small(remat=True)
    x, t, y = _inputs(module)
    params = _random_params(module)
    remat_params = jax.eval_shape(remat.init, jax.random.key(0), x, t, y)["params"]
    assert jax.tree.structure(params) == jax.tree.structure(remat_params)

    def loss(m, p):
        return jnp.sum(m.apply({"params": p}, x, t, y) ** 2)

    grad = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)
    (a, ga), (b, gb) = (grad(m, params) for m in (module, remat))
    np.testing.assert_allclose(a, b, rtol=1e-6)
    for u, v in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5 * float(jnp.abs(u).max()))


def test_null_label_row_exists_iff_class_dropout_and_is_used():
    module = _small()
    x, t, _ = _inputs(module, batch=2)
    params = _random_params(module)
    assert params["y_embedder"]["embedding"].shape == (11, 64)
    no_null = _small(class_dropout_prob=0.0)
    shapes = jax.eval_shape(no_null.init, jax.random.key(0), x, t, jnp.zeros(2, jnp.int32))
    assert shapes["params"]["y_embedder"]["embedding"].shape == (10, 64)
    apply = jax.jit(module.apply)
    null = apply({"params": params}, x, t, jnp.full((2,), 10, jnp.int32))
    zero = apply({"params": params}, x, t, jnp.zeros(2, jnp.int32))
    assert float(jnp.max(jnp.abs(null - zero))) > 1e-3
    table = params["y_embedder"]["embedding"]
    swapped = {**params, "y_embedder": {"embedding": table.at[10].set(table[0])}}
    np.testing.assert_array_equal(
        apply({"params": swapped}, x, t, jnp.full((2,), 10, jnp.int32)), zero)


@pytest.mark.parametrize("kwargs,shape,labels,match", [
    ({}, (2, 8, 8, 3), None, "pass labels y if and only if"),
    ({"num_classes": None}, (2, 8, 8, 3), True, "pass labels y if and only if"),
    ({}, (2, 16, 16, 3), True, r"x of shape \[B, 8, 8, 3\]"),
    ({}, (2, 8, 8, 4), True, "in_channels"),
    ({}, (2, 7, 8, 3), True, "not divisible by patch_size"),
    ({"num_heads": 3}, (2, 8, 8, 3), True, "num_heads=3"),
])
def test_invalid_inputs_raise_one_line_errors(kwargs, shape, labels, match):
    module = _small(**kwargs)
    x = jnp.zeros(shape)
    y = jnp.zeros(2, jnp.int32) if labels else None
    with pytest.raises(ValueError, match=match) as info:
        jax.eval_shape(module.init, jax.random.key(0), x, jnp.zeros(2), y)
    assert "\n" not in str(info.value)
