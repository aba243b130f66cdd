"""CLIP text encoder checkpoints -> diffjax.models.clip_text (diffjax.convert.clip_text).

Reference group (torch + transformers): a small transformers ``CLIPTextModel`` with every
weight re-randomised, saved as safetensors, read by diffjax's torch-free reader, converted and
run on the same token ids: ``last_hidden_state`` agrees within 1e-5 relative (max |diff| /
max |reference|) in float32, with and without a padding mask, for CLIP skip (the output of an
earlier layer through the final LayerNorm, as diffusers' ``clip_skip``) and with the exact
GELU. Also: a whole CompVis/LDM SD 1.x checkpoint's ``cond_stage_model``, transformers 4's
``text_model.`` names, SD 1.x's parameter count, the config mapping and one-line errors.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from diffjax.convert import clip_text
from diffjax.convert.guided_diffusion import ConversionError
from diffjax.models.clip_text import CLIPTextModel

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

CONFIG = {"vocab_size": 99, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 3,
          "num_attention_heads": 4, "max_position_embeddings": 16, "bos_token_id": 97,
          "eos_token_id": 98, "pad_token_id": 98}


def _reference_model(seed: int = 0, **overrides):
    """A transformers CLIPTextModel with all parameters re-randomised."""
    torch.manual_seed(seed)
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**{**CONFIG, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and "embedding" not in name:
                p.copy_(torch.randn_like(p) / np.sqrt(p.shape[1]))
            elif p.ndim >= 2:
                p.copy_(torch.randn_like(p))
            elif name.endswith("weight"):  # LayerNorm scales
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model.eval()


def _state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _tokens() -> tuple[np.ndarray, np.ndarray]:
    """Two prompts of 11 ids: <bos> words <eos> and padding (<eos> ids) after; their mask."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 97, (2, 11)).astype(np.int32)
    ids[:, 0] = 97
    ids[0, 6:], ids[1, 10] = 98, 98
    mask = np.ones((2, 11), bool)
    mask[0, 7:] = False
    return ids, mask


def _reference(model, ids, mask=None, clip_skip: int = 0) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.from_numpy(ids.astype(np.int64)),
                    attention_mask=None if mask is None else torch.from_numpy(mask.astype(
                        np.int64)), output_hidden_states=bool(clip_skip))
        if not clip_skip:
            return out.last_hidden_state.numpy()
        final_norm = model.final_layer_norm if hasattr(model, "final_layer_norm") else \
            model.text_model.final_layer_norm
        return final_norm(out.hidden_states[-(clip_skip + 1)]).numpy()


def _rel(got, want) -> float:
    return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


def _apply(module, params, ids, mask=None, **kw):
    return jax.jit(lambda p: module.apply({"params": p}, ids, mask, **kw))(params)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(transformers model, safetensors path, diffjax module)."""
    model = _reference_model()
    path = tmp_path_factory.mktemp("clip") / "model.safetensors"
    safetensors_torch.save_file(model.state_dict(), str(path))
    return model, path, clip_text.module_from_transformers_config(model.config.to_dict())


def test_safetensors_matches_transformers(reference):
    model, path, module = reference
    assert (module.width, module.layers, module.heads, module.mlp_width) == (32, 3, 4, 37)
    assert (module.vocab_size, module.context_length, module.activation) == \
        (99, 16, "quick_gelu")
    params = clip_text.load_checkpoint(path, module)
    ids, mask = _tokens()
    for m in (None, mask):
        error = _rel(_apply(module, params, ids, m), _reference(model, ids, m))
        print(f"CLIP text, mask {m is not None}: max relative error {error:.2e}")
        assert error < 1e-5, error
    error = _rel(_apply(module, params, ids, skip_last_layers=1),
                 _reference(model, ids, clip_skip=1))
    print(f"CLIP skip 1: max relative error {error:.2e}")
    assert error < 1e-5, error


def test_exact_gelu():
    model = _reference_model(1, hidden_act="gelu")
    module = clip_text.module_from_transformers_config(model.config.to_dict())
    assert module.activation == "gelu"
    params = clip_text.convert(_state_dict(model), clip_text.abstract_params(module))
    ids, _ = _tokens()
    assert _rel(_apply(module, params, ids), _reference(model, ids)) < 1e-5


def test_sd_checkpoint_and_transformers4_names(reference):
    """A whole SD 1.x checkpoint holds the encoder under cond_stage_model.transformer. with
    transformers 4's text_model. names and a position_ids buffer: the same parameters."""
    model, _, module = reference
    sd = _state_dict(model)
    abstract = clip_text.abstract_params(module)
    want = clip_text.convert(sd, abstract)
    names = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in sd.items()}
    names["text_model.embeddings.position_ids"] = np.arange(16)[None]
    whole = {f"{clip_text.SD_PREFIX}{k}": v for k, v in names.items()}
    whole.update({"model.diffusion_model.out.2.bias": np.zeros(4, np.float32),
                  "first_stage_model.decoder.conv_out.bias": np.zeros(3, np.float32)})
    for state_dict in (names, whole):
        jax.tree.map(np.testing.assert_array_equal, clip_text.convert(state_dict, abstract),
                     want)


def test_sd15_text_encoder_size():
    """The defaults are SD 1.x's text encoder: as many parameters as transformers' model of
    openai/clip-vit-large-patch14's text config (built on the meta device)."""
    config = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
              "num_attention_heads": 12, "max_position_embeddings": 77,
              "hidden_act": "quick_gelu"}
    with torch.device("meta"):
        model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config))
    want = sum(p.numel() for p in model.parameters())
    abstract = clip_text.abstract_params(CLIPTextModel())
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract)) == want == 123_060_480
    assert clip_text.module_from_transformers_config(config) == CLIPTextModel()
    assert set(clip_text.transformers_names(abstract)) == {  # transformers 4: text_model.*
        k.removeprefix("text_model.") for k in model.state_dict() if "position_ids" not in k}


def _error(state_dict, module) -> str:
    with pytest.raises(ConversionError) as e:
        clip_text.convert(state_dict, clip_text.abstract_params(module))
    message = str(e.value)
    assert "\n" not in message
    return message


def test_errors_name_the_tensor_and_the_option(reference):
    model, _, module = reference
    sd = _state_dict(model)
    message = _error(sd, module.clone(layers=2))
    assert "encoder.layers.2." in message and "has no place" in message, message
    assert "num_hidden_layers" in message, message
    message = _error(sd, module.clone(mlp_width=40))
    assert "encoder.layers.0.mlp.fc1.weight has shape (37, 32) but the CLIPTextModel needs " \
           "(40, 32)" in message and "intermediate_size" in message, message
    missing = {k: v for k, v in sd.items() if k != "final_layer_norm.bias"}
    assert "lacks tensor final_layer_norm.bias (32,)" in _error(missing, module)
    whole = {f"{clip_text.SD_PREFIX}text_model.{k}": v for k, v in sd.items()
             if k != "embeddings.token_embedding.weight"}
    message = _error(whole, module)
    assert "lacks tensor cond_stage_model.transformer.text_model.embeddings.token_embedding" \
           ".weight (99, 32)" in message, message
    with pytest.raises(ConversionError, match="hidden_act='relu'"):
        clip_text.module_from_transformers_config({**CONFIG, "hidden_act": "relu"})


def test_bad_inputs_are_one_line_errors():
    module = CLIPTextModel(vocab_size=10, context_length=4, width=8, layers=2, heads=2,
                           mlp_width=16)
    ids = np.zeros((1, 4), np.int32)
    params = module.init(jax.random.key(0), ids)["params"]
    with pytest.raises(ValueError, match="5 tokens per text exceed context_length=4"):
        module.apply({"params": params}, np.zeros((1, 5), np.int32))
    with pytest.raises(ValueError, match=r"skip_last_layers=2 must be in \[0, 2\)"):
        module.apply({"params": params}, ids, skip_last_layers=2)
    with pytest.raises(ValueError, match="width=8 is not divisible by heads=3"):
        module.clone(heads=3).init(jax.random.key(0), ids)


# ----------------------------------------------------------------------------- SD 2.x


def _openclip(sd: dict[str, np.ndarray], extra_block: dict | None = None) -> dict:
    """A transformers CLIPTextModel's tensors as a CompVis/LDM SD 2.x checkpoint holds
    OpenCLIP's (q, k, v stacked into in_proj), with its pooled head and an optional extra
    last block."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items() if "position_ids" not in k}
    out = {}
    for name in sd:
        key, third = clip_text.openclip_name(name)
        if third is None:
            out[key] = sd[name]
        elif third == 0:
            parts = [sd[name.replace(".q_proj.", f".{p}_proj.")] for p in "qkv"]
            out[key] = np.concatenate(parts, axis=0)
    out.update(extra_block or {})
    width = sd["final_layer_norm.weight"].shape[0]
    out["text_projection"] = np.ones((width, 8), np.float32)
    out["logit_scale"] = np.array(4.6, np.float32)
    return {clip_text.OPENCLIP_PREFIX + k: v for k, v in out.items()} | {
        "model.diffusion_model.out.2.bias": np.zeros(4, np.float32)}


def test_sd2_openclip_names_are_those_diffusers_converts():
    """diffusers' own OpenCLIP -> transformers conversion of the SD 2-style checkpoint gives the
    model's tensors back exactly (names, in_proj's q / k / v order); diffjax converts it to the
    parameters of the transformers-named dict, its extra last block dropped as SD 2's, and the
    encoder then equals transformers' on the 3-block model."""
    single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    model = _reference_model(4, hidden_act="gelu")
    sd = _state_dict(model)
    extra = {f"transformer.resblocks.3.{k}": np.ones(2, np.float32)
             for k in ("ln_1.weight", "mlp.c_fc.bias")}
    ckpt = _openclip(sd)
    back = single_file_utils.convert_open_clip_checkpoint(
        model, {k: torch.from_numpy(np.array(v)) for k, v in ckpt.items()})
    want = {k.removeprefix("text_model."): v for k, v in sd.items() if "position_ids" not in k}
    back = {k.removeprefix("text_model."): v for k, v in back.items()
            if k != "text_projection.weight"}
    assert sorted(back) == sorted(want)
    for name, array in want.items():
        np.testing.assert_array_equal(back[name].numpy(), array, err_msg=name)
    module = clip_text.module_from_transformers_config(model.config.to_dict())
    abstract = clip_text.abstract_params(module)
    params = clip_text.convert(_openclip(sd, extra), abstract)
    jax.tree.map(np.testing.assert_array_equal, params, clip_text.convert(sd, abstract))
    ids, _ = _tokens()
    assert _rel(_apply(module, params, ids), _reference(model, ids)) < 1e-5


def test_sd2_openclip_errors_name_openclip_tensors():
    model = _reference_model(5, hidden_act="gelu")
    ckpt = _openclip(_state_dict(model))
    module = clip_text.module_from_transformers_config(model.config.to_dict())
    p = clip_text.OPENCLIP_PREFIX
    message = _error(ckpt, module.clone(layers=1))  # two blocks too many: not SD 2's one
    assert f"{p}transformer.resblocks.1.attn.in_proj_weight[q] (32, 32) has no place" in message
    assert "num_hidden_layers" in message, message
    missing = {k: v for k, v in ckpt.items()
               if k != f"{p}transformer.resblocks.2.attn.in_proj_bias"}
    message = _error(missing, module)
    assert f"lacks tensor {p}transformer.resblocks.2.attn.in_proj_bias[k] (32,)" in message
    wide = module.clone(mlp_width=40)
    message = _error(ckpt, wide)
    assert f"{p}transformer.resblocks.0.mlp.c_fc.weight has shape (37, 32)" in message, message
