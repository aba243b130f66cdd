"""SD VAE checkpoints -> diffjax AutoencoderKL (diffjax.convert.autoencoder_kl).

Reference group (torch + diffusers): a small diffusers ``AutoencoderKL`` with every weight
re-randomised (GroupNorm scales and biases included), saved as safetensors, read by
diffjax's torch-free reader, converted, and run on the same inputs: encode (mean, logvar)
and decode agree within 1e-4 relative (max |diff| / max |reference|) in float32. The same
weights renamed to CompVis/LDM names (mapping written here from CompVis's module names, not
taken from the converter) and saved with ``torch.save`` under ``first_stage_model.`` beside
other models' tensors and the training loss's, give the same parameters and outputs.
"""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from diffjax.convert import autoencoder_kl as vae_convert
from diffjax.models.autoencoder import AutoencoderKL

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

CONFIG = {"block_out_channels": (32, 64), "layers_per_block": 1, "norm_num_groups": 8,
          "latent_channels": 4, "in_channels": 3, "out_channels": 3}


def _diffusers_vae(seed: int = 0, **overrides):
    """A diffusers AutoencoderKL with all parameters re-randomised (no default init left)."""
    config = dict(CONFIG, **overrides)
    n = len(config["block_out_channels"])
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n,
                                  up_block_types=("UpDecoderBlock2D",) * n, **config)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if p.ndim >= 2:  # conv / linear: keep activations O(1)
                p.copy_(torch.randn_like(p) / np.sqrt(np.prod(p.shape[1:])))
            elif name.endswith("weight"):  # GroupNorm scales
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return vae.eval()


def _module(**overrides) -> AutoencoderKL:
    config = dict(CONFIG, **overrides)
    config["block_out_channels"] = tuple(config["block_out_channels"])
    return AutoencoderKL(**config)


def _state_dict(vae) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in vae.state_dict().items()}


def _ldm_name(name: str, levels: int) -> str:
    """diffusers name -> CompVis/LDM name (ldm/modules/diffusionmodules/model.py's modules:
    Encoder.down[i].block[j] / .downsample, Decoder.up[i] indexed by resolution level,
    mid.block_1 / attn_1 / block_2, AttnBlock.norm/q/k/v/proj_out, ResnetBlock.nin_shortcut)."""
    table = [
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.", lambda m: f"encoder.down.{m[1]}.block."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.",
         lambda m: f"encoder.down.{m[1]}.downsample."),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.",
         lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block."),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
         lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample."),
        (r"\.mid_block\.resnets\.0\.", lambda m: ".mid.block_1."),
        (r"\.mid_block\.resnets\.1\.", lambda m: ".mid.block_2."),
        (r"\.mid_block\.attentions\.0\.group_norm\.", lambda m: ".mid.attn_1.norm."),
        (r"\.mid_block\.attentions\.0\.to_([qkv])\.", lambda m: f".mid.attn_1.{m[1]}."),
        (r"\.mid_block\.attentions\.0\.to_out\.0\.", lambda m: ".mid.attn_1.proj_out."),
        (r"\.conv_norm_out\.", lambda m: ".norm_out."),
        (r"\.conv_shortcut\.", lambda m: ".nin_shortcut."),
    ]
    for pattern, repl in table:
        name = re.sub(pattern, repl, name)
    return name


def _ldm_state_dict(state_dict: dict[str, np.ndarray], levels: int) -> dict[str, np.ndarray]:
    """LDM names; the attention's Linear weights become 1x1 convs [O, I, 1, 1] as in LDM."""
    out = {}
    for k, v in state_dict.items():
        name = _ldm_name(k, levels)
        if ".attn_1." in name and name.endswith("weight") and v.ndim == 2:
            v = v[:, :, None, None]
        out[name] = v
    return out


def _rel(got, want) -> float:
    return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


def _outputs(vae, x, z) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """diffusers' (mean, logvar) of x and decoding of z, NHWC in and out."""
    with torch.no_grad():
        dist = vae.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).latent_dist
        image = vae.decode(torch.from_numpy(z.transpose(0, 3, 1, 2))).sample
    return tuple(t.numpy().transpose(0, 2, 3, 1) for t in (dist.mean, dist.logvar, image))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(diffusers vae, safetensors path, x NHWC, z NHWC, reference mean, logvar, image)."""
    vae = _diffusers_vae()
    path = tmp_path_factory.mktemp("vae") / "diffusion_pytorch_model.safetensors"
    safetensors_torch.save_file(vae.state_dict(), str(path))
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    z = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
    return (vae, path, x, z) + _outputs(vae, x, z)


@pytest.fixture(scope="module")
def run():
    """Jitted (params, x, z) -> (mean, logvar, image) of the small module (compiled once)."""
    module = _module()

    @jax.jit
    def f(params, x, z):
        mean, logvar = module.apply({"params": params}, x, method="encode")
        return mean, logvar, module.apply({"params": params}, z, method="decode")
    return f


def _check_parity(params, run, reference, label):
    _, _, x, z, mean, logvar, image = reference
    got = run(params, x, z)
    errors = [_rel(g, w) for g, w in zip(got, (mean, logvar, image))]
    print(f"{label}: max relative error mean {errors[0]:.2e} logvar {errors[1]:.2e} "
          f"decode {errors[2]:.2e}")
    assert max(errors) < 1e-4, errors


def test_diffusers_safetensors_matches_diffusers(reference, run):
    params = vae_convert.load_checkpoint(reference[1], _module())
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}
    _check_parity(params, run, reference, "diffusers")


def test_ldm_ckpt_matches_diffusers(reference, run, tmp_path):
    vae = reference[0]
    sd = _state_dict(vae)
    ldm = _ldm_state_dict(sd, 2)
    assert "decoder.up.1.upsample.conv.weight" in ldm
    assert "decoder.up.0.block.0.nin_shortcut.bias" in ldm
    full = {f"first_stage_model.{k}": torch.from_numpy(v) for k, v in ldm.items()}
    full["model.diffusion_model.out.2.weight"] = torch.zeros(3, 3)  # other models: ignored
    full["cond_stage_model.x.weight"] = torch.zeros(2)
    path = tmp_path / "sd.ckpt"
    torch.save({"state_dict": full, "global_step": 3}, str(path))
    params = vae_convert.load_checkpoint(path, _module())
    _check_parity(params, run, reference, "ldm")
    # The VAE's own training checkpoint: no prefix, loss.* ignored.
    own = dict(ldm, **{"loss.logvar": np.zeros(()), "loss.discriminator.main.0.weight":
                       np.zeros((4, 3, 4, 4))})
    same = vae_convert.convert_state_dict(own, _module(), np.float32)
    jax.tree.map(np.testing.assert_array_equal, same, params)


def test_groupnorm_epsilon_is_sds(reference, run):
    """With conv_in scaled down, the first GroupNorm's variance is ~1e-7: eps (1e-6) matters."""
    vae = _diffusers_vae()
    with torch.no_grad():
        for conv in (vae.encoder.conv_in, vae.decoder.conv_in):
            conv.weight.mul_(1e-3)
            conv.bias.mul_(1e-3)
    x, z = reference[2], reference[3]
    params = vae_convert.convert_state_dict(_state_dict(vae), _module())
    _check_parity(params, run, (vae, None, x, z) + _outputs(vae, x, z), "small activations")


def test_legacy_diffusers_attention_names(reference):
    sd = _state_dict(reference[0])
    legacy = {re.sub(r"\.to_q\.", ".query.", re.sub(r"\.to_k\.", ".key.", re.sub(
        r"\.to_v\.", ".value.", re.sub(r"\.to_out\.0\.", ".proj_attn.", k)))): v
        for k, v in sd.items()}
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
    want = vae_convert.convert_state_dict(sd, _module())
    jax.tree.map(np.testing.assert_array_equal,
                 vae_convert.convert_state_dict(legacy, _module()), want)


def test_module_from_diffusers_config(reference):
    config = dict(reference[0].config)
    assert vae_convert.module_from_diffusers_config(config) == _module()
    bf16 = vae_convert.module_from_diffusers_config(config, dtype=jax.numpy.bfloat16)
    assert bf16.dtype == jax.numpy.bfloat16
    for bad in ({"act_fn": "relu"}, {"use_quant_conv": False},
                {"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]}):
        with pytest.raises(vae_convert.ConversionError, match=next(iter(bad))):
            vae_convert.module_from_diffusers_config(dict(config, **bad))


def test_bfloat16_params(reference):
    params = vae_convert.convert_state_dict(_state_dict(reference[0]), _module(), "bfloat16")
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(jax.numpy.bfloat16)}


def _error(state_dict, module) -> str:
    with pytest.raises(vae_convert.ConversionError) as e:
        vae_convert.convert_state_dict(state_dict, module)
    message = str(e.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("saved, wanted, tensor, option", [
    ({"layers_per_block": 2}, {}, "encoder.down_blocks.0.resnets.1.norm1.weight",
     "layers_per_block"),
    ({}, {"layers_per_block": 2}, "encoder.down_blocks.0.resnets.1.norm1.weight",
     "layers_per_block"),
    ({}, {"latent_channels": 8}, "encoder.conv_out.weight", "latent_channels"),
    ({}, {"block_out_channels": (32, 32)}, "encoder.down_blocks.1.resnets.0.conv1.weight",
     "block_out_channels"),
    ({"block_out_channels": (32, 64, 64)}, {}, "encoder.down_blocks.1.downsamplers.0.conv.weight",
     "block_out_channels"),
    ({}, {"in_channels": 1}, "encoder.conv_in.weight", "in_channels"),
])
def test_wrong_architecture_names_the_tensor_and_the_option(saved, wanted, tensor, option):
    message = _error(_state_dict(_diffusers_vae(**saved)), _module(**wanted))
    assert tensor in message and option in message, message


def test_wrong_architecture_in_ldm_names(reference):
    ldm = _ldm_state_dict(_state_dict(_diffusers_vae(layers_per_block=2)), 2)
    message = _error(ldm, _module())
    assert "encoder.down.0.block.1.norm1.weight" in message, message
    assert "(32,) has no place" in message and "layers_per_block" in message, message
    ldm = _ldm_state_dict(_state_dict(reference[0]), 2)
    message = _error(ldm, _module(layers_per_block=2))
    assert "lacks tensor encoder.down.0.block.1.norm1.weight (32,)" in message, message
    assert "layers_per_block" in message, message


def test_unused_missing_and_foreign_tensors(reference):
    sd = _state_dict(reference[0])
    extra = dict(sd, **{"decoder.up_blocks.0.attentions.0.to_q.weight": np.zeros((4, 4))})
    message = _error(extra, _module())
    assert "decoder.up_blocks.0.attentions.0.to_q.weight (4, 4) has no place" in message
    assert "UpDecoderBlock2D" in message, message
    no_attn = {k: v for k, v in sd.items() if ".mid_block.attentions." not in k}
    assert "mid_block_add_attention" in _error(no_attn, _module())
    missing = {k: v for k, v in sd.items() if not k.startswith("quant_conv.")}
    assert "lacks tensor quant_conv.weight (8, 8, 1, 1)" in _error(missing, _module())
    assert "not an AutoencoderKL" in _error({"input_blocks.0.0.weight": np.zeros(3)}, _module())
