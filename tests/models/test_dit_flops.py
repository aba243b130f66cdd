"""DiT's analytic forward FLOPs (`dit.forward_flops`) against XLA's cost analysis on CPU and
against the Gflops of the DiT paper's Table 4.

XLA's check has two parts: the matmul part of the forward, each dot_general/convolution of
the traced program lowered alone and costed by XLA, must equal the analytic count exactly;
the whole forward's XLA cost must exceed it only by elementwise work, bounded below."""

import functools
import itertools

import jax
import pytest

from diffjax.models import dit

MATMULS = ("dot_general", "conv_general_dilated")


def _sub_jaxprs(params):
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(item, "eqns"):
                yield item
            elif hasattr(getattr(item, "jaxpr", None), "eqns"):
                yield item.jaxpr


@functools.cache
def _xla_flops_of_one(primitive, operands, params):
    fn = jax.jit(lambda *a: primitive.bind(*a, **dict(params)))
    return fn.lower(*(jax.ShapeDtypeStruct(s, d) for s, d in operands)).cost_analysis()["flops"]


def xla_matmul_flops(jaxpr) -> float:
    """XLA's flops of every matmul/conv equation in `jaxpr` (and its sub-jaxprs), each alone."""
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in MATMULS:
            operands = tuple((v.aval.shape, v.aval.dtype) for v in eqn.invars)
            total += _xla_flops_of_one(eqn.primitive, operands, tuple(sorted(eqn.params.items())))
        for sub in _sub_jaxprs(eqn.params):
            total += xla_matmul_flops(sub)
    return total


def _forward_and_inputs(module, batch):
    params = dit.abstract_params(module)
    x = jax.ShapeDtypeStruct((batch, module.input_size, module.input_size,
                              module.in_channels), "float32")
    t = jax.ShapeDtypeStruct((batch,), "float32")
    y = None if module.num_classes is None else jax.ShapeDtypeStruct((batch,), "int32")
    return (lambda p, x, t, y: module.apply({"params": p}, x, t, y)), (params, x, t, y)


# Tiny models on CPU: patch sizes 1, 2, 4, 7, single- and multi-head, mlp_ratio != 4,
# with and without labels and learned variance.
SMALL = [
    {"input_size": 8, "patch_size": 2, "in_channels": 1, "hidden_size": 32, "depth": 2,
     "num_heads": 2},
    {"input_size": 28, "patch_size": 7, "in_channels": 1, "hidden_size": 48, "depth": 1,
     "num_heads": 3},
    {"input_size": 12, "patch_size": 4, "in_channels": 3, "hidden_size": 64, "depth": 3,
     "num_heads": 4, "mlp_ratio": 2.0, "learn_sigma": False},
    {"input_size": 8, "patch_size": 1, "in_channels": 2, "hidden_size": 16, "depth": 2,
     "num_heads": 1, "num_classes": None},
]


@pytest.mark.parametrize("options", SMALL, ids=lambda o: f"p{o['patch_size']}-D{o['hidden_size']}")
def test_forward_flops_match_xla_cost_analysis(options):
    batch = 3
    module = dit.DiT(**{"num_classes": 10, **options})
    forward, args = _forward_and_inputs(module, batch)
    analytic = dit.forward_flops(module, batch)
    assert analytic == batch * dit.forward_flops(module)

    # The matmuls: XLA costs each dot/conv of the traced forward; equal to the last FLOP.
    assert xla_matmul_flops(jax.make_jaxpr(forward)(*args).jaxpr) == analytic

    # The whole lowered forward: the rest is elementwise (biases, LayerNorm, modulate, gates,
    # GELU, SiLU, softmax, residual adds), measured at 13-16 FLOPs per element of each block's
    # [L, D + M] activations; 20 per element of [L, D + M + H*L] per block (+1 for the final
    # layer) bounds it with room.
    total = jax.jit(forward).lower(*args).cost_analysis()["flops"]
    tokens = (module.input_size // module.patch_size) ** 2
    d, heads = module.hidden_size, module.num_heads
    elements = batch * (module.depth + 1) * tokens * (d + int(d * module.mlp_ratio)
                                                      + heads * tokens)
    assert analytic < total <= analytic + 20 * elements


def test_parts_follow_the_formula():
    """DiT-XL/2 at 32x32x4: each part by hand (MACs), doubled."""
    parts = dit.forward_flops_by_part(dit.DiT())  # the defaults are DiT-XL/2, 1000 classes
    tokens, d = 256, 1152
    assert parts == {k: 2 * v for k, v in {
        "patch_embed": tokens * 16 * d, "t_embed": 256 * d + d * d,
        "adaLN": 28 * 6 * d * d + 2 * d * d, "qkv": 28 * tokens * 3 * d * d,
        "attention": 28 * 2 * tokens * tokens * d, "proj": 28 * tokens * d * d,
        "mlp": 28 * 2 * tokens * d * 4 * d, "final_linear": tokens * d * 4 * 8}.items()}
    assert dit.forward_flops(dit.DiT()) == sum(parts.values()) == 237_242_843_136


# The DiT paper's Table 4 (256x256 images, 32x32x4 latents), in its convention: Gflops are
# multiply-adds (MACs), so they are forward_flops / 2.
PAPER_GFLOPS = {
    "DiT-S/8": 0.36, "DiT-S/4": 1.41, "DiT-S/2": 6.06, "DiT-B/8": 1.42, "DiT-B/4": 5.56,
    "DiT-B/2": 23.01, "DiT-L/8": 5.01, "DiT-L/4": 19.70, "DiT-L/2": 80.71,
    "DiT-XL/8": 7.39, "DiT-XL/4": 29.05, "DiT-XL/2": 118.64,
}


@pytest.mark.parametrize("name", [f"DiT-{s}/{p}" for s, p in
                                  itertools.product(dit.DIT_SIZES, dit.PATCH_SIZES)])
def test_paper_gflops_are_half_the_flops(name):
    """8 of the 12 printed values are reproduced to the printed 0.01 G; the other four (B/4,
    L/2, XL/4, XL/2) are printed 0.005-0.019 G away (XL/2: 118.62 here, 118.64 printed),
    an excess of at most 0.016% that no simple convention explains (fvcore's LayerNorm
    count, 4 per element, would add 0.067 G to XL/2). So: half a unit of the printed digit
    plus 0.016% of the value; counting FLOPs as FLOPs (2x) or dropping attention fails."""
    module = dit.DiT(input_size=32, in_channels=4, num_classes=1000, learn_sigma=True,
                     **dit.dit_options(name))
    gmacs = dit.forward_flops(module) / 2e9
    paper = PAPER_GFLOPS[name]
    assert abs(gmacs - paper) <= 0.005 + 1.6e-4 * paper, (name, gmacs, paper)
