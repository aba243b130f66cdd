"""SD UNet checkpoints -> diffjax's context-conditioned UNet (diffjax.convert.sd_unet).

Reference group (torch + diffusers): a small diffusers ``UNet2DConditionModel`` of SD's
structure (CrossAttn down/up blocks, a CrossAttn mid block, a plain lowest level) with every
weight re-randomised (zero-initialised and norm parameters included), saved as
safetensors, read by diffjax's torch-free reader, converted, and run on the same latents,
timesteps and ``encoder_hidden_states`` (with an attention mask): outputs agree within 1e-4
relative (max |diff| / max |reference|) in float32. Also: SD 2's Linear projections and two
transformer blocks per level, the diffusers config -> module mapping, one-line errors, and
``diffjax.convert.load_checkpoint`` / ``python -m diffjax.convert`` on a context-conditioned
UNet config. CompVis/LDM's names: a checkpoint in them, built from the diffusers model's
tensors, is what diffusers' own LDM -> diffusers conversion
(``diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint``) turns back into that
model's state dict, tensor for tensor, and converts to the same diffjax parameters.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from diffjax import checkpoint, configlib, experiment
from diffjax import convert as convert_lib
from diffjax.convert import sd_unet
from diffjax.convert.guided_diffusion import ConversionError

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")

SIZE, CHANNELS, CTX = 16, 4, 12
CONFIG = {"sample_size": SIZE, "in_channels": CHANNELS, "out_channels": CHANNELS,
          "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
          "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
          "block_out_channels": (32, 64, 64), "layers_per_block": 1,
          "cross_attention_dim": CTX, "attention_head_dim": 4, "norm_num_groups": 8}


def _diffusers_unet(seed: int = 0, **overrides):
    """A diffusers UNet2DConditionModel with all parameters re-randomised."""
    torch.manual_seed(seed)
    model = diffusers.UNet2DConditionModel(**{**CONFIG, **overrides})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:  # conv / linear: keep activations O(1)
                p.copy_(torch.randn_like(p) / np.sqrt(np.prod(p.shape[1:])))
            elif name.endswith("weight"):  # GroupNorm / LayerNorm scales
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model.eval()


def _state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _inputs():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, SIZE, SIZE, CHANNELS)).astype(np.float32)
    t = np.array([10.0, 913.0], np.float32)
    ctx = rng.normal(size=(2, 7, CTX)).astype(np.float32)
    mask = np.ones((2, 7), bool)
    mask[0, 4:] = False  # the first prompt is padded
    return x, t, ctx, mask


def _reference(model, x, t, ctx, mask) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                    torch.from_numpy(ctx),
                    encoder_attention_mask=torch.from_numpy(mask.astype(np.float32))).sample
    return out.numpy().transpose(0, 2, 3, 1)


def _rel(got, want) -> float:
    return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(diffusers model, safetensors path, reference output)."""
    model = _diffusers_unet()
    path = tmp_path_factory.mktemp("unet") / "diffusion_pytorch_model.safetensors"
    safetensors_torch.save_file(model.state_dict(), str(path))
    return model, path, _reference(model, *_inputs())


def _apply(module, params):
    x, t, ctx, mask = _inputs()
    return jax.jit(lambda p: module.apply({"params": p}, x, t, context=ctx,
                                          context_mask=mask))(params)


def test_diffusers_safetensors_matches_diffusers(reference):
    model, path, want = reference
    module = sd_unet.module_from_diffusers_config(dict(model.config))
    abstract = sd_unet.abstract_params(module, (SIZE, SIZE, CHANNELS))

    class Task:  # what diffjax.convert.load_checkpoint hands over: a task
        def abstract_params(self):
            return abstract

    Task.model = module
    params = sd_unet.load_checkpoint(path, Task())
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}
    error = _rel(_apply(module, params), want)
    print(f"diffusers SD UNet: max relative error {error:.2e}")
    assert error < 1e-4, error


def test_normalisation_epsilons_are_sds():
    """With conv_in, the first ResBlock's last conv and the first transformer's proj_in
    scaled down, that transformer's GroupNorm (eps 1e-6) and first LayerNorm (1e-5) see
    variances ~1e-6: their epsilons matter."""
    model = _diffusers_unet(2)
    with torch.no_grad():
        for p in (model.conv_in, model.down_blocks[0].resnets[0].conv2,
                  model.down_blocks[0].attentions[0].proj_in):
            p.weight.mul_(1e-3)
            p.bias.mul_(1e-3)
    module = sd_unet.module_from_diffusers_config(dict(model.config))
    params = sd_unet.convert_state_dict(_state_dict(model), module, (SIZE, SIZE, CHANNELS))
    error = _rel(_apply(module, params), _reference(model, *_inputs()))
    print(f"small activations: max relative error {error:.2e}")
    assert error < 1e-4, error


def test_module_from_diffusers_config(reference):
    module = sd_unet.module_from_diffusers_config(dict(reference[0].config))
    assert (module.model_channels, module.channel_mult, module.num_res_blocks) == \
        (32, (1, 2, 2), 1)
    assert (module.attention_resolutions, module.num_heads, module.norm_groups) == \
        ((16, 8), 4, 8)
    assert module.context_dim == CTX and module.use_spatial_transformer
    for bad in ({"act_fn": "gelu"}, {"norm_eps": 1e-6}, {"class_embed_type": "timestep"},
                {"transformer_layers_per_block": [1, 2, 1]}):
        with pytest.raises(ConversionError, match=next(iter(bad))):
            sd_unet.module_from_diffusers_config({**reference[0].config, **bad})


def test_sd2_linear_projections_and_deeper_transformers():
    """SD 2.x: Linear proj_in / proj_out, head width instead of head count; and two
    transformer blocks per attention."""
    overrides = {"use_linear_projection": True, "attention_head_dim": (4, 8, 8),
                 "transformer_layers_per_block": 2}
    model = _diffusers_unet(1, **overrides)
    module = sd_unet.module_from_diffusers_config(dict(model.config))
    assert (module.num_heads, module.num_head_channels) == (-1, 8)
    assert module.use_linear_in_transformer and module.transformer_depth == 2
    params = sd_unet.convert_state_dict(_state_dict(model), module, (SIZE, SIZE, CHANNELS))
    error = _rel(_apply(module, params), _reference(model, *_inputs()))
    print(f"SD 2 style: max relative error {error:.2e}")
    assert error < 1e-4, error
    # the 1x1-conv layout under use_linear_in_transformer=True is an error, and vice versa
    conv = {k: v[:, :, None, None] if k.endswith(("proj_in.weight", "proj_out.weight"))
            and ".attentions." in k else v for k, v in _state_dict(model).items()}
    message = _error(conv, module)
    assert "proj_in.weight" in message and "use_linear_in_transformer" in message, message


def test_bfloat16_params(reference):
    module = sd_unet.module_from_diffusers_config(dict(reference[0].config))
    params = sd_unet.convert_state_dict(_state_dict(reference[0]), module,
                                        (SIZE, SIZE, CHANNELS), "bfloat16")
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(jax.numpy.bfloat16)}


def _error(state_dict, module) -> str:
    with pytest.raises(ConversionError) as e:
        sd_unet.convert_state_dict(state_dict, module, (SIZE, SIZE, CHANNELS))
    message = str(e.value)
    assert "\n" not in message
    return message


def test_wrong_architecture_names_the_tensor_and_the_option(reference):
    sd = _state_dict(reference[0])
    module = sd_unet.module_from_diffusers_config(dict(reference[0].config))
    wide = module.clone(context_dim=CTX + 4)
    message = _error(sd, wide)
    assert "attn2.to_k.weight" in message and "model.context_dim" in message, message
    deeper = module.clone(transformer_depth=2)
    message = _error(sd, deeper)
    assert "lacks tensor down_blocks.0.attentions.0.transformer_blocks.1" in message, message
    assert "model.transformer_depth" in message, message
    fewer = module.clone(attention_resolutions=(16,))
    message = _error(sd, fewer)
    assert "down_blocks.1.attentions.0" in message and "attention_resolutions" in message
    linear = module.clone(use_linear_in_transformer=True)
    message = _error(sd, linear)
    assert "(32, 32, 1, 1) but the config's model needs (32, 32)" in message, message
    message = _error(sd, module.clone(use_spatial_transformer=False))
    assert "use_spatial_transformer=True" in message, message
    message = _error(sd, module.clone(context_pool="mean"))
    assert "context_pool='none'" in message, message


def test_unused_and_missing_tensors(reference):
    sd = _state_dict(reference[0])
    module = sd_unet.module_from_diffusers_config(dict(reference[0].config))
    extra = dict(sd, **{"add_embedding.linear_1.weight": np.zeros((4, 4))})
    assert "add_embedding.linear_1.weight (4, 4) has no place" in _error(extra, module)
    missing = {k: v for k, v in sd.items() if k != "conv_norm_out.weight"}
    assert "lacks tensor conv_norm_out.weight (32,)" in _error(missing, module)
    odd = dict(sd, **{"conv_in.weight": np.zeros((32, 3, 3, 3), np.float32)})
    message = _error(odd, module)
    assert "conv_in.weight has shape (32, 3, 3, 3) but" in message and "data.channels" in message


CONFIG_FILE = """
from diffjax import configlib


def get_config(arg=None):
    c = configlib.base_config()
    c.data.source = "folder"
    c.data.image_size, c.data.channels, c.data.num_classes = 16, 4, 0
    c.model.model_channels, c.model.channel_mult, c.model.num_res_blocks = 32, (1, 2, 2), 1
    c.model.attention_resolutions, c.model.num_heads, c.model.norm_groups = (16, 8), 4, 8
    c.model.context_dim, c.model.use_spatial_transformer = 12, True
    return c
"""


def test_load_checkpoint_dispatch_and_the_cli(reference, tmp_path):
    """diffjax.convert.load_checkpoint picks this converter for a context-conditioned UNet
    config, and ``python -m diffjax.convert`` writes its step-0 checkpoint."""
    _, path, want = reference
    config = tmp_path / "sd_tiny.py"
    config.write_text(CONFIG_FILE)
    exp = experiment.build(configlib.load_config_file(str(config)), mode="convert")
    params = convert_lib.load_checkpoint(path, exp)
    assert _rel(_apply(exp.task.model, params), want) < 1e-4
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    workdir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "diffjax.convert", "--config", str(config), "--checkpoint",
         str(path), "--workdir", str(workdir)], cwd=repo, capture_output=True, text=True,
        timeout=600, check=False, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-3000:]
    restored, step = checkpoint.restore_ema_params(str(workdir), exp.task.abstract_params())
    assert step == 0
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, restored), params)


# ----------------------------------------------------------------------------- CompVis/LDM

SD2 = {"use_linear_projection": True, "attention_head_dim": (4, 8, 8),
       "transformer_layers_per_block": 2}
# What else a whole SD checkpoint holds (the VAE, the text encoder, LitEma's copies, the noise
# table): ignored by the UNet's converter.
OTHER_PARTS = {"first_stage_model.encoder.conv_in.weight": np.ones((8, 3, 3, 3), np.float32),
               "cond_stage_model.transformer.text_model.final_layer_norm.weight":
                   np.ones(12, np.float32),
               "model_ema.decay": np.array(0.9999, np.float32),
               "model_ema.diffusion_modelout2bias": np.ones(4, np.float32),
               "betas": np.ones(1000, np.float32)}


def _ldm_state_dict(model) -> tuple[dict[str, np.ndarray], sd_unet.UNet, dict]:
    """(the diffusers model's tensors under CompVis/LDM's names, as a whole SD checkpoint holds
    them, with its other parts; the diffjax module; its abstract params)."""
    sd = _state_dict(model)
    module = sd_unet.module_from_diffusers_config(dict(model.config))
    abstract = sd_unet.abstract_params(module, (SIZE, SIZE, CHANNELS))
    diffusers_name = {path: name for name, path in
                      sd_unet.diffusers_names(abstract, module).items()}
    ldm = {sd_unet.LDM_PREFIX + name: sd[diffusers_name[path]]
           for name, path in sd_unet.ldm_names(abstract, module).items()}
    return {**OTHER_PARTS, **ldm}, module, abstract


@pytest.mark.parametrize("overrides", [{}, SD2], ids=["sd1", "sd2"])
def test_compvis_names_are_those_diffusers_converts(overrides):
    """diffusers' own LDM -> diffusers conversion turns the LDM-named checkpoint back into the
    model's state dict, every tensor in place (so the names are LDM's: a swap of two
    same-shaped tensors, e.g. norm1 / norm2, would show here), and diffjax converts the
    LDM-named and the diffusers-named dicts to the same parameters, bit for bit."""
    model = _diffusers_unet(3, **overrides)
    ldm, module, abstract = _ldm_state_dict(model)
    # diffusers' conversion finds an upsampler's conv at either index; LDM's is after the
    # attention where a level has one (TimestepEmbedSequential's order)
    p = sd_unet.LDM_PREFIX
    assert {f"{p}output_blocks.1.1.conv.weight", f"{p}output_blocks.3.2.conv.weight"} <= set(ldm)
    back = single_file_utils.convert_ldm_unet_checkpoint(
        {k: torch.from_numpy(np.array(v)) for k, v in ldm.items()}, dict(model.config))
    want = _state_dict(model)
    assert sorted(back) == sorted(want)
    for name, array in want.items():
        np.testing.assert_array_equal(back[name].numpy(), array, err_msg=name)
    from_ldm = sd_unet.convert(ldm, abstract, module)
    from_diffusers = sd_unet.convert(want, abstract, module)
    jax.tree.map(np.testing.assert_array_equal, from_ldm, from_diffusers)
    # a bare LDM UNet dict (no model.diffusion_model. prefix) reads the same
    bare = {k[len(sd_unet.LDM_PREFIX):]: v for k, v in ldm.items()
            if k.startswith(sd_unet.LDM_PREFIX)}
    jax.tree.map(np.testing.assert_array_equal, sd_unet.convert(bare, abstract, module),
                 from_diffusers)


def test_compvis_ckpt_through_load_checkpoint(reference, tmp_path):
    """A Lightning ``.ckpt`` of a whole SD model (``state_dict`` beside ``global_step``),
    written by torch.save, read without torch and converted by diffjax.convert.load_checkpoint:
    the UNet's output agrees with diffusers' model."""
    model, _, want = reference
    ldm, _, _ = _ldm_state_dict(model)
    path = tmp_path / "sd-tiny.ckpt"
    torch.save({"state_dict": {k: torch.from_numpy(np.array(v)) for k, v in ldm.items()},
                "global_step": 470000}, str(path))
    config = tmp_path / "sd_tiny.py"
    config.write_text(CONFIG_FILE)
    exp = experiment.build(configlib.load_config_file(str(config)), mode="convert")
    params = convert_lib.load_checkpoint(path, exp)
    error = _rel(_apply(exp.task.model, params), want)
    print(f"CompVis-named SD UNet: max relative error {error:.2e}")
    assert error < 1e-4, error


def test_compvis_errors_name_the_files_tensor_and_the_option(reference):
    ldm, module, _ = _ldm_state_dict(reference[0])
    p = sd_unet.LDM_PREFIX
    message = _error(ldm, module.clone(context_dim=CTX + 4))
    assert f"{p}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight has shape" in message
    assert "model.context_dim" in message, message
    message = _error(ldm, module.clone(attention_resolutions=(16,)))
    assert re.search(rf"{re.escape(p)}input_blocks\.3\.1\.norm\.\w+ \(64,\) has no place",
                     message), message
    assert "attention_resolutions" in message, message
    message = _error(ldm, module.clone(use_linear_in_transformer=True))
    assert f"{p}input_blocks.1.1.proj_in.weight has shape (32, 32, 1, 1)" in message, message
    assert "use_linear_in_transformer" in message, message
    missing = {k: v for k, v in ldm.items() if k != f"{p}out.0.weight"}
    assert f"lacks tensor {p}out.0.weight (32,)" in _error(missing, module)
    message = _error(ldm, module.clone(transformer_depth=2))
    assert f"lacks tensor {p}input_blocks.1.1.transformer_blocks.1." in message, message
    assert "model.transformer_depth" in message, message
    message = _error(dict(ldm, **{f"{p}out.2.weight": np.zeros((3, 32, 3, 3), np.float32)}),
                     module)
    assert f"{p}out.2.weight has shape (3, 32, 3, 3)" in message and "data.channels" in message


def test_sd15_compvis_names_at_full_size():
    """experiments/sd15_unet.py's parameters under LDM's names: diffusers' LDM conversion maps
    them onto the names and shapes of diffusers' SD 1.5 UNet (built on the meta device:
    shapes only, nothing allocated), e.g. the released file's upsamplers at
    ``output_blocks.{2,5,8}.{1,2}.conv``."""
    sd15 = {"sample_size": 64, "in_channels": 4, "out_channels": 4, "cross_attention_dim": 768,
            "attention_head_dim": 8, "block_out_channels": (320, 640, 1280, 1280),
            "layers_per_block": 2}
    with torch.device("meta"):
        model = diffusers.UNet2DConditionModel(**sd15)
    want = model.state_dict()
    exp = experiment.build(configlib.load_config_file(os.path.join(
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        "experiments", "sd15_unet.py")), mode="convert")
    abstract, module = exp.task.abstract_params(), exp.task.model
    diffusers_name = {path: name for name, path in
                      sd_unet.diffusers_names(abstract, module).items()}
    ldm_names = sd_unet.ldm_names(abstract, module)
    assert len(ldm_names) == len(want) == 686
    for name in ("output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight",
                 "output_blocks.8.2.conv.weight", "input_blocks.3.0.op.weight",
                 "input_blocks.7.0.skip_connection.weight", "middle_block.1.proj_in.weight"):
        assert name in ldm_names, name
    ldm = {sd_unet.LDM_PREFIX + n: want[diffusers_name[p]] for n, p in ldm_names.items()}
    back = single_file_utils.convert_ldm_unet_checkpoint(ldm, dict(model.config))
    assert sorted(back) == sorted(want)
    assert all(back[k] is want[k] for k in want)


def test_lit_ema_copy_of_a_non_pruned_checkpoint(reference, tmp_path):
    """key="model_ema" reads LitEma's copy (model_ema.diffusion_model<name without dots>),
    as diffusers' LDM conversion with extract_ema=True does; without it, the non-EMA
    weights. Errors name LitEma's tensors."""
    model = reference[0]
    ldm, module, abstract = _ldm_state_dict(model)
    rng = np.random.default_rng(0)
    ema = {"model_ema." + "".join(k.split(".")[1:]): (v + rng.standard_normal(v.shape)).astype(
        np.float32) for k, v in ldm.items() if k.startswith(sd_unet.LDM_PREFIX)}
    ckpt = {**ldm, **ema, "model_ema.decay": np.array(0.9999, np.float32),
            "model_ema.num_updates": np.array(470000, np.int32)}
    want = single_file_utils.convert_ldm_unet_checkpoint(
        {k: torch.from_numpy(np.array(v)) for k, v in ckpt.items()}, dict(model.config),
        extract_ema=True)
    from_ema = sd_unet.convert(ckpt, abstract, module, ema=True)
    from_diffusers = sd_unet.convert({k: v.numpy() for k, v in want.items()}, abstract, module)
    jax.tree.map(np.testing.assert_array_equal, from_ema, from_diffusers)
    plain = sd_unet.convert(ckpt, abstract, module)  # no key: the non-EMA weights
    jax.tree.map(np.testing.assert_array_equal, plain, sd_unet.convert(ldm, abstract, module))
    path = tmp_path / "sd-tiny-full.ckpt"
    torch.save({"state_dict": {k: torch.from_numpy(np.array(v)) for k, v in ckpt.items()}},
               str(path))

    class Task:
        def abstract_params(self):
            return abstract

    Task.model = module
    loaded = sd_unet.load_checkpoint(path, Task(), key=sd_unet.EMA_KEY)
    jax.tree.map(np.testing.assert_array_equal, loaded, from_ema)
    missing = {k: v for k, v in ckpt.items() if k != "model_ema.diffusion_modelout2bias"}
    with pytest.raises(ConversionError, match="lacks tensor model_ema.diffusion_modelout2bias"):
        sd_unet.convert(missing, abstract, module, ema=True)
    pruned = {k: v for k, v in ldm.items() if not k.startswith("model_ema.")}
    with pytest.raises(ConversionError, match="holds no LitEma copy"):
        sd_unet.convert(pruned, abstract, module, ema=True)
