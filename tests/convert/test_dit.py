"""DiT checkpoints -> diffjax params (diffjax.convert.dit).

Without torch: every parameter has exactly one DiT tensor name, a DiT-named state dict built
from diffjax params converts back to them, and architecture mismatches raise one-line errors
naming the tensor and the config option.

Reference group (torch + diffusers): a small diffusers ``DiTTransformer2DModel`` with every
weight re-randomised (none of DiT's zero-initialised layers left) and its per-block copies of
the timestep/class embedder tied to one (a real DiT has one), converted from its own names
and, renamed to facebookresearch/DiT's names, from a ``torch.save`` file read by diffjax's
torch-free reader: outputs agree within TOLERANCE = 1e-5 relative (max |diff| / max |reference|;
measured 1.1e-6). Tighter than a generic 1e-4 on purpose: erf GELU instead of DiT's tanh
approximation moves these outputs by 3.5e-5, which 1e-4 would let through.
diffusers' DiT departs from the original in its timestep sinusoid (``downscale_freq_shift=1``)
and its block LayerNorm eps (1e-5); the reference is set to the original's (shift 0, 1e-6).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.convert import dit as dit_convert
from diffjax.convert.guided_diffusion import ConversionError
from diffjax.models import dit

SMALL = {"input_size": 8, "patch_size": 2, "in_channels": 4, "hidden_size": 64, "depth": 2,
         "num_heads": 2, "num_classes": 10, "class_dropout_prob": 0.1, "learn_sigma": True}

TOLERANCE = 1e-5


def _module(**kwargs):
    return dit.DiT(**{**SMALL, **kwargs})


# ----------------------------------------------------------------------------- no torch


def _dit_state_dict(module, seed=0) -> dict[str, np.ndarray]:
    """A facebookresearch/DiT-style state dict of random tensors for ``module``'s shapes,
    written from DiT's layer list (not from the converter's tables)."""
    rng = np.random.default_rng(seed)
    d, p, c = module.hidden_size, module.patch_size, module.in_channels
    mlp = int(d * module.mlp_ratio)
    shapes = {"x_embedder.proj.weight": (d, c, p, p), "x_embedder.proj.bias": (d,),
              "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,),
              "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,)}
    if module.num_classes is not None:
        shapes["y_embedder.embedding_table.weight"] = (module.label_rows, d)
    for i in range(module.depth):
        for name, (o, n) in {"attn.qkv": (3 * d, d), "attn.proj": (d, d), "mlp.fc1": (mlp, d),
                             "mlp.fc2": (d, mlp), "adaLN_modulation.1": (6 * d, d)}.items():
            shapes[f"blocks.{i}.{name}.weight"] = (o, n)
            shapes[f"blocks.{i}.{name}.bias"] = (o,)
    out_ch = module.out_channels
    shapes.update({"final_layer.linear.weight": (p * p * out_ch, d),
                   "final_layer.linear.bias": (p * p * out_ch,),
                   "final_layer.adaLN_modulation.1.weight": (2 * d, d),
                   "final_layer.adaLN_modulation.1.bias": (2 * d,)})
    sd = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    grid = module.input_size // p
    sd["pos_embed"] = dit.get_2d_sincos_pos_embed(d, grid)[None]
    return sd


def test_every_parameter_has_one_dit_name():
    abstract = dit.abstract_params(_module())
    names = dit_convert.torch_names(abstract)
    leaves = jax.tree_util.tree_leaves_with_path(abstract)
    assert len(names) == len(set(names.values())) == len(leaves)
    assert set(names) == set(_dit_state_dict(_module())) - {"pos_embed"}


def test_conversion_places_each_tensor_in_diffjax_layout():
    module = _module()
    sd = _dit_state_dict(module)
    params = dit_convert.convert_state_dict(sd, module)
    np.testing.assert_array_equal(params["x_embedder"]["kernel"],
                                  sd["x_embedder.proj.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["blocks_1"]["qkv"]["kernel"],
                                  sd["blocks.1.attn.qkv.weight"].T)
    np.testing.assert_array_equal(params["y_embedder"]["embedding"],
                                  sd["y_embedder.embedding_table.weight"])
    np.testing.assert_array_equal(params["final_linear"]["bias"], sd["final_layer.linear.bias"])
    shapes = jax.tree.map(lambda a: (a.shape, a.dtype), dit.abstract_params(module))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), params) == shapes
    half = dit_convert.convert_state_dict(sd, module, jnp.bfloat16)
    assert half["blocks_0"]["fc1"]["kernel"].dtype == jnp.bfloat16


@pytest.mark.parametrize("kwargs,tensor,option", [
    ({"depth": 3}, "blocks.2.", "depth"),
    ({"depth": 1}, "blocks.1.", "depth"),
    ({"hidden_size": 128}, "x_embedder.proj.weight", "hidden_size"),
    ({"patch_size": 4}, "x_embedder.proj.weight", "patch_size"),
    ({"in_channels": 3}, "x_embedder.proj.weight", "in_channels"),
    ({"num_classes": None}, "y_embedder.embedding_table.weight", "num_classes"),
    ({"num_classes": 12}, "y_embedder.embedding_table.weight", "num_classes"),
    ({"class_dropout_prob": 0.0}, "y_embedder.embedding_table.weight", "class_dropout_prob"),
    ({"learn_sigma": False}, "final_layer.linear.weight", "learn_sigma"),
    ({"mlp_ratio": 2.0}, "blocks.0.mlp.fc1.weight", "mlp_ratio"),
    ({"input_size": 16}, "pos_embed", "input_size"),
])
def test_wrong_architecture_raises_one_line_error_naming_tensor_and_option(kwargs, tensor,
                                                                           option):
    sd = _dit_state_dict(_module())
    with pytest.raises(ConversionError) as info:
        dit_convert.convert_state_dict(sd, _module(**kwargs))
    message = str(info.value)
    assert "\n" not in message and tensor in message and option in message, message


def test_a_wrong_position_table_or_a_stray_tensor_is_rejected():
    module = _module()
    sd = _dit_state_dict(module)
    sd["pos_embed"] = sd["pos_embed"][:, ::-1]
    with pytest.raises(ConversionError, match="pos_embed differs from DiT's fixed"):
        dit_convert.convert_state_dict(sd, module)
    sd = {**_dit_state_dict(module), "blocks.0.norm1.weight": np.ones(64, np.float32)}
    with pytest.raises(ConversionError, match=r"blocks\.0\.norm1\.weight \(64,\) has no place"):
        dit_convert.convert_state_dict(sd, module)


# ----------------------------------------------------------------------------- reference


@pytest.fixture(scope="module")
def reference():
    """(torch, diffusers model, its state dict as NumPy) for SMALL, randomised and tied."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8,
        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_eps=1e-6)
    shared = model.transformer_blocks[0].norm1.emb
    for block in model.transformer_blocks[1:]:
        block.norm1.emb = shared
    shared.time_proj.downscale_freq_shift = 0  # the original DiT's frequencies 10000^(-i/128)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(noise / np.sqrt(p.shape[1]) if p.ndim > 1 else 0.1 * noise)
    model.eval()
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return torch, model, sd


def _inputs():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 8, 8, 4)).astype(np.float32)
    t = np.array([0.0, 250.5, 999.0], np.float32)
    y = np.array([0, 9, 10], np.int32)  # 10: the null label
    return x, t, y


def _reference_output(torch, model) -> np.ndarray:
    x, t, y = _inputs()
    with torch.no_grad():
        out = model(torch.from_numpy(x.transpose(0, 3, 1, 2)), timestep=torch.from_numpy(t),
                    class_labels=torch.from_numpy(y).long()).sample
    return out.numpy().transpose(0, 2, 3, 1)


def _relative_error(params, ref) -> float:
    x, t, y = _inputs()
    out = jax.jit(_module().apply)({"params": params}, x, t, y)
    return float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max())


def test_diffusers_names_convert_to_the_same_function(reference):
    torch, model, sd = reference
    assert "transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.weight" in sd
    err = _relative_error(dit_convert.convert_state_dict(sd, _module()),
                          _reference_output(torch, model))
    print(f"diffusers-named parity: max relative error {err:.2e}")
    assert err < TOLERANCE


# diffusers module -> facebookresearch/DiT module, as diffusers' conversion script renames.
_TO_DIT = {"pos_embed.proj": "x_embedder.proj", "proj_out_1": "final_layer.adaLN_modulation.1",
           "proj_out_2": "final_layer.linear",
           "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
           "transformer_blocks.0.norm1.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
           "transformer_blocks.0.norm1.emb.class_embedder.embedding_table": "y_embedder."
                                                                            "embedding_table"}
_BLOCK_TO_DIT = {"norm1.linear": "adaLN_modulation.1", "attn1.to_out.0": "attn.proj",
                 "ff.net.0.proj": "mlp.fc1", "ff.net.2": "mlp.fc2"}


def _original_names(sd: dict, pos_embed: np.ndarray) -> dict[str, np.ndarray]:
    out = {}
    for leaf in ("weight", "bias"):
        for i in range(2):
            b = f"transformer_blocks.{i}.attn1"
            out[f"blocks.{i}.attn.qkv.{leaf}"] = np.concatenate(
                [sd[f"{b}.to_{n}.{leaf}"] for n in "qkv"], axis=0)
            for src, dst in _BLOCK_TO_DIT.items():
                out[f"blocks.{i}.{dst}.{leaf}"] = sd[f"transformer_blocks.{i}.{src}.{leaf}"]
        for src, dst in _TO_DIT.items():
            if f"{src}.{leaf}" in sd:
                out[f"{dst}.{leaf}"] = sd[f"{src}.{leaf}"]
    out["pos_embed"] = pos_embed
    return out


def test_original_dit_file_converts_to_the_same_function(reference, tmp_path):
    torch, model, sd = reference
    original = _original_names(sd, model.pos_embed.pos_embed.numpy())
    path = tmp_path / "DiT-tiny.pt"
    torch.save({k: torch.from_numpy(v) for k, v in original.items()}, path)
    params = dit_convert.load_checkpoint(path, _module())
    err = _relative_error(params, _reference_output(torch, model))
    print(f"original-named .pt parity: max relative error {err:.2e}")
    assert err < TOLERANCE
    with pytest.raises(ConversionError, match=r"tensor blocks\.1\.\S+ .* check depth"):
        dit_convert.load_checkpoint(path, _module(depth=1))


def test_diffusers_embedder_copies_must_agree(reference):
    _, _, original = reference
    name = "transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"
    sd = {**original, name: original[name] + 1}
    with pytest.raises(ConversionError, match=f"{name} differs from transformer_blocks.0"):
        dit_convert.convert_state_dict(sd, _module())
    sd = {k: v for k, v in original.items() if "blocks.1.attn1.to_k." not in k}
    with pytest.raises(ConversionError, match=r"lacks transformer_blocks\.1\.attn1\.to_\{q,k,v\}"):
        dit_convert.convert_state_dict(sd, _module())
