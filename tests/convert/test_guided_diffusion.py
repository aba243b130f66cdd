"""guided-diffusion checkpoints -> diffjax params (diffjax.convert.guided_diffusion, CLI).

Without torch: the name/layout mapping covers every parameter (a round trip through an
inverse mapping, which only checks bookkeeping), the one-line mismatch errors, and the
``python -m diffjax.convert`` command on .safetensors files.

Reference group (torch + the ``guided-diffusion-sdk`` package, guided-diffusion's own
``unet.py``): small UNetModel / SuperResModel / EncoderUNetModel with every weight
re-randomised (no zero-initialised layer left), saved with ``torch.save``, read back by
diffjax's torch-free reader, converted, and run on the same inputs: outputs agree within
1e-4 relative (max |diff| / max |reference|) in float32.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from diffjax import checkpoint, configlib, experiment
from diffjax.convert import guided_diffusion as gd_convert
from diffjax.convert import load_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ----------------------------------------------------------------------------- configs


def _config(*, image_size=16, channels=3, num_classes=10, class_cond=False, learn_sigma=False,
            superres=0, classifier=None, **model):
    """A tiny config; ``model`` overrides config.model fields (attention in pixels)."""
    c = configlib.base_config()
    c.data.image_size = image_size
    c.data.channels = channels
    c.data.num_classes = num_classes
    c.model.model_channels = 32
    c.model.channel_mult = (1, 2)
    c.model.num_res_blocks = 1
    c.model.attention_resolutions = (image_size // 2,)
    c.model.class_cond = class_cond
    if learn_sigma:
        c.diffusion.variance_type = "learned_range"
        c.diffusion.loss = "hybrid"
    if superres:
        c.condition.type = "superres"
        c.condition.low_res_size = superres
    if classifier:
        c.model.name = "classifier"
        c.model.pool = classifier
        c.model.class_cond = False
    for k, v in model.items():
        setattr(c.model, k, v)
    return c


def _task(c):
    return experiment.build(c).task


def _params(task, seed: int):
    """Parameters of ``task``'s structure drawn on the host, N(0, 1/fan-in) for kernels and
    N(0, 1) for vectors: every tensor distinct and non-zero (the init's zero layers would let
    a swap of two of them pass), activations of O(1) through the network, nothing to
    compile."""
    rng = np.random.default_rng(seed)

    def draw(s):
        scale = 1 / np.sqrt(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 1.0
        return (scale * rng.standard_normal(s.shape)).astype(s.dtype)

    return jax.tree.map(draw, task.abstract_params())


_TOP = ("time_embed", "label_emb", "input_blocks", "middle_block", "output_blocks", "out")
_SUB = ("in_layers", "emb_layers", "out_layers", "skip_connection", "op", "conv", "norm", "qkv",
        "proj_out", "positional_embedding", "qkv_proj", "c_proj", "weight", "bias")


def _module_order(name: str) -> tuple:
    """guided-diffusion's registration order of tensor names (as in its state_dict())."""
    return tuple((0, int(p)) if p.isdigit() else (1, (_TOP + _SUB).index(p))
                 for p in name.split("."))


def _inverse(params) -> dict[str, np.ndarray]:
    """A guided-diffusion-style state dict from diffjax params (bookkeeping only), in
    guided-diffusion's tensor order."""
    out = {}
    flat = gd_convert._flatten(params)
    for name, path in gd_convert.torch_names(params).items():
        x = np.asarray(flat[path])
        if path[-1] == "kernel" and x.ndim == 4:
            x = x.transpose(3, 2, 0, 1)
        elif path[-1] == "kernel":
            x = x.T[..., None] if ("qkv" in path or "proj_out" in path or "out_pool" in path) \
                else x.T
        elif path[-1] == "positional_embedding":
            x = x.T
        out[name] = np.ascontiguousarray(x)  # safetensors writes the buffer as laid out
    return dict(sorted(out.items(), key=lambda kv: _module_order(kv[0])))


# ----------------------------------------------------------------------------- no torch


@pytest.mark.parametrize("kwargs", [
    dict(class_cond=True, learn_sigma=True, use_scale_shift_norm=True, resblock_updown=True),
    dict(superres=8, class_cond=True, resblock_updown=False, conv_resample=False),
    dict(classifier="attention", num_head_channels=32),
    dict(classifier="adaptive", resblock_updown=True),
], ids=["unet", "superres", "classifier_attention", "classifier_adaptive"])
def test_round_trip_fills_every_parameter(kwargs):
    task = _task(_config(**kwargs))
    params = _params(task, 0)
    state_dict = _inverse(params)
    assert len(state_dict) == len(jax.tree.leaves(params))
    back = gd_convert.convert_for(state_dict, task.abstract_params())
    jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, params))


def test_names_follow_guided_diffusion():
    task = _task(_config(class_cond=True, learn_sigma=True, resblock_updown=True))
    names = gd_convert.torch_names(task.abstract_params())
    for name in ("time_embed.0.weight", "time_embed.2.bias", "label_emb.weight",
                 "input_blocks.0.0.weight", "input_blocks.1.0.in_layers.0.weight",
                 "input_blocks.2.0.in_layers.2.weight",  # resblock down
                 "input_blocks.3.0.skip_connection.weight", "input_blocks.3.1.qkv.weight",
                 "middle_block.1.proj_out.bias", "middle_block.2.emb_layers.1.weight",
                 "output_blocks.1.1.qkv.weight", "output_blocks.1.2.out_layers.3.weight",
                 "output_blocks.3.0.skip_connection.bias", "out.0.weight", "out.2.bias"):
        assert name in names, name
    plain = gd_convert.torch_names(_task(_config(conv_resample=True)).abstract_params())
    assert "input_blocks.2.0.op.weight" in plain and "output_blocks.1.2.conv.weight" in plain


def test_fp16_is_cast_to_the_param_dtype():
    task = _task(_config())
    params = _params(task, 1)
    half = {k: v.astype(np.float16) for k, v in _inverse(params).items()}
    back = gd_convert.convert_for(half, task.abstract_params())
    assert {x.dtype for x in jax.tree.leaves(back)} == {np.dtype(np.float32)}
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3),
                 back, jax.tree.map(np.asarray, params))


def test_bfloat16_params():
    c = _config(param_dtype="bfloat16")
    state_dict = _inverse(_params(_task(_config()), 2))
    back = gd_convert.convert_for(state_dict, _task(c).abstract_params())
    assert {x.dtype for x in jax.tree.leaves(back)} == {jnp.dtype(jnp.bfloat16)}


def _error(state_dict, c) -> str:
    with pytest.raises(gd_convert.ConversionError) as e:
        gd_convert.convert_for(state_dict, _task(c).abstract_params())
    message = str(e.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("saved, wanted, tensor, option", [
    (dict(class_cond=True), dict(), "label_emb.weight", "class_cond=True"),
    (dict(), dict(class_cond=True), "label_emb.weight", "class_cond=False"),
    (dict(learn_sigma=True), dict(), "out.2.weight", "variance_type"),
    (dict(use_scale_shift_norm=True), dict(), "input_blocks.1.0.emb_layers.1.weight",
     "use_scale_shift_norm"),
    (dict(resblock_updown=True), dict(), "input_blocks.2.0.in_layers.0.weight",
     "resblock_updown"),
    (dict(attention_resolutions=(16, 8)), dict(), "input_blocks.1.1.norm.weight",
     "attention_resolutions"),
    (dict(superres=8), dict(), "input_blocks.0.0.weight", "superres"),
    (dict(classifier="adaptive"), dict(classifier="attention", num_head_channels=32),
     "out.3.weight", "model.pool"),
])
def test_mismatch_names_the_first_tensor_and_the_option(saved, wanted, tensor, option):
    state_dict = _inverse(_params(_task(_config(**saved)), 0))
    message = _error(state_dict, _config(**wanted))
    assert tensor in message and option in message, message


def test_unused_and_missing_tensors_are_errors():
    c = _config()
    state_dict = _inverse(_params(_task(c), 0))
    extra = dict(state_dict, **{"output_blocks.9.0.in_layers.0.weight": np.zeros(4)})
    assert "output_blocks.9.0.in_layers.0.weight (4,) has no place" in _error(extra, c)
    missing = dict(state_dict)
    del missing["middle_block.1.qkv.bias"]
    assert "lacks tensor middle_block.1.qkv.bias (192,)" in _error(missing, c)


def test_a_unet_checkpoint_is_refused_by_a_classifier_config():
    state_dict = _inverse(_params(_task(_config()), 0))
    message = _error(state_dict, _config(classifier="adaptive"))
    assert "model.name='unet'" in message


# ----------------------------------------------------------------------------- command line


def _run_convert(tmp_path, config: str, ckpt: str, workdir: str):
    return subprocess.run(
        [sys.executable, "-m", "diffjax.convert", "--config", config, "--checkpoint", ckpt,
         "--workdir", workdir], cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))


def _smoke_state_dict(overrides=None) -> dict[str, np.ndarray]:
    c = configlib.load_config_file(os.path.join(REPO, "experiments/imagenet64.py"), "smoke")
    for k, v in (overrides or {}).items():
        setattr(c.model, k, v)
    return _inverse(_params(_task(c), 3))


def test_cli_refuses_the_wrong_architecture_and_writes_nothing(tmp_path):
    ckpt = str(tmp_path / "other.safetensors")
    safetensors.numpy.save_file(_smoke_state_dict({"use_scale_shift_norm": False}), ckpt)
    workdir = tmp_path / "run"
    out = _run_convert(tmp_path, "experiments/imagenet64.py:smoke", ckpt, str(workdir))
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("diffjax: error:")]
    assert len(errors) == 1 and errors[0] == out.stderr.strip().splitlines()[-1], out.stderr
    assert "input_blocks.1.0.emb_layers.1." in errors[0]  # safetensors stores names sorted
    assert "use_scale_shift_norm" in errors[0]
    assert not workdir.exists()


def test_cli_missing_file_is_one_line(tmp_path):
    out = _run_convert(tmp_path, "experiments/imagenet64.py:smoke", str(tmp_path / "no.pt"),
                       str(tmp_path / "run"))
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith(
        "diffjax: error:"), out.stderr
    assert not (tmp_path / "run").exists()


def test_cli_writes_a_step_0_checkpoint_that_inference_restores(tmp_path):
    state_dict = _smoke_state_dict()
    ckpt = str(tmp_path / "adm.safetensors")
    safetensors.numpy.save_file(state_dict, ckpt)
    workdir = tmp_path / "run"
    out = _run_convert(tmp_path, "experiments/imagenet64.py:smoke", ckpt, str(workdir))
    assert out.returncode == 0, out.stderr[-3000:]
    assert (workdir / "config.json").exists()
    c = configlib.load_config_file(os.path.join(REPO, "experiments/imagenet64.py"), "smoke")
    task = _task(c)
    params, step = checkpoint.restore_ema_params(str(workdir), task.abstract_params())
    assert step == 0
    expected = gd_convert.convert_for(state_dict, task.abstract_params())
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params), expected)
    again = _run_convert(tmp_path, "experiments/imagenet64.py:smoke", ckpt, str(workdir))
    assert again.returncode == 2 and "fresh --workdir" in again.stderr
    sample = subprocess.run(
        [sys.executable, "-m", "diffjax.main", "--config", "experiments/imagenet64.py:smoke",
         "--workdir", str(workdir), "--mode", "sample"], cwd=REPO, capture_output=True, check=False,
        text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert (workdir / "samples.npz").exists()


# ----------------------------------------------------------------------------- reference


def _reference():
    torch = pytest.importorskip("torch")
    gd_unet = pytest.importorskip("guided_diffusion.unet",
                                  reason="needs guided-diffusion-sdk (reference group)")
    return torch, gd_unet


def _randomize(torch, model, seed: int):
    """Every parameter non-zero and O(1)-scaled: N(0, 1/fan_in) weights, N(0, 0.1) biases,
    GroupNorm scales 1 + N(0, 0.1) (guided-diffusion zero-initialises several layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=g)
                if isinstance(module, torch.nn.GroupNorm) and name == "weight":
                    p.copy_(1.0 + 0.1 * noise)
                elif p.ndim >= 2:
                    p.copy_(noise / np.sqrt(p[0].numel() if p.ndim > 1 else 1))
                else:
                    p.copy_(0.1 * noise)
    return model


# guided-diffusion constructor options, and the diffjax config of the same model.
REFERENCE_CASES = {
    "unet_new_order": (
        "UNetModel",
        dict(in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
             attention_resolutions=(2,), channel_mult=(1, 2), num_classes=10,
             num_head_channels=32, use_scale_shift_norm=True, resblock_updown=True,
             use_new_attention_order=True),
        dict(class_cond=True, learn_sigma=True, num_head_channels=32, use_scale_shift_norm=True,
             resblock_updown=True, use_new_attention_order=True)),
    "unet_legacy_order": (
        "UNetModel",
        dict(in_channels=3, model_channels=32, out_channels=3, num_res_blocks=2,
             attention_resolutions=(1, 2), channel_mult=(1, 2), num_heads=4,
             num_heads_upsample=2),
        dict(num_heads=4, num_heads_upsample=2, num_res_blocks=2,
             attention_resolutions=(16, 8))),
    "superres": (
        "SuperResModel",
        dict(in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
             attention_resolutions=(2,), channel_mult=(1, 2), num_classes=10, num_heads=2,
             use_scale_shift_norm=True, resblock_updown=True),
        dict(superres=8, class_cond=True, learn_sigma=True, num_heads=2,
             use_scale_shift_norm=True, resblock_updown=True)),
    "classifier_attention": (
        "EncoderUNetModel",
        dict(in_channels=3, model_channels=32, out_channels=10, num_res_blocks=1,
             attention_resolutions=(2,), channel_mult=(1, 2), num_head_channels=32,
             use_scale_shift_norm=True, resblock_updown=True, pool="attention"),
        dict(classifier="attention", num_head_channels=32, use_scale_shift_norm=True,
             resblock_updown=True)),
    "classifier_adaptive": (
        "EncoderUNetModel",
        dict(in_channels=3, model_channels=32, out_channels=10, num_res_blocks=1,
             attention_resolutions=(2,), channel_mult=(1, 2), num_heads=2,
             use_new_attention_order=True, pool="adaptive"),
        dict(classifier="adaptive", num_heads=2, use_new_attention_order=True)),
}


def _parity(case: str, tmp_path, fp16: bool = False, mutate=None) -> float:
    """Max |diffjax - guided-diffusion| / max |guided-diffusion| on one batch."""
    torch, gd_unet = _reference()
    torch.manual_seed(0)
    kind, gd_kwargs, dj_kwargs = REFERENCE_CASES[case]
    model = _randomize(torch, getattr(gd_unet, kind)(image_size=16, **gd_kwargs), 0).eval()
    state_dict = model.state_dict()
    if fp16:  # a half-precision file; the reference runs the same rounded weights in float32
        state_dict = {k: v.half() for k, v in state_dict.items()}
        model.load_state_dict({k: v.float() for k, v in state_dict.items()})
    path = str(tmp_path / f"{case}.pt")
    torch.save(state_dict, path)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
    t = np.array([3.0, 731.0], np.float32)
    y = np.array([1, 7])
    low = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    kwargs = {}
    if "num_classes" in gd_kwargs:
        kwargs["y"] = torch.from_numpy(y)
    if kind == "SuperResModel":
        kwargs["low_res"] = torch.from_numpy(low)
    with torch.no_grad():
        ref = model(torch.from_numpy(x), torch.from_numpy(t), **kwargs).numpy()

    task = _task(_config(**dj_kwargs))
    if mutate is not None:
        sd = gd_convert.torch_file.load_state_dict(path)
        params = gd_convert.convert_for(mutate(sd), task.abstract_params())
    else:
        params = load_checkpoint(path, task)
    extra = {"low_res": jnp.asarray(low.transpose(0, 2, 3, 1))} if kind == "SuperResModel" else {}
    out = task.apply(params, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t),
                     jnp.asarray(y, jnp.int32), False, **extra)
    out = np.asarray(out)
    if out.ndim == 4:
        out = out.transpose(0, 3, 1, 2)
    assert out.shape == ref.shape
    return float(np.abs(out - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
def test_matches_guided_diffusion(case, tmp_path):
    err = _parity(case, tmp_path)
    print(f"{case}: max relative error {err:.2e}")
    assert err < 1e-4


def test_matches_guided_diffusion_from_fp16_file(tmp_path):
    assert _parity("unet_new_order", tmp_path, fp16=True) < 1e-4


def _swap_q_k(sd):
    out = dict(sd)
    for name in [n for n in sd if n.endswith((".qkv.weight", ".qkv.bias"))]:
        w = sd[name]
        c = w.shape[0] // 3
        out[name] = np.concatenate([w[c:2 * c], w[:c], w[2 * c:]])
    return out


def _transpose_conv_kernels(sd):
    return {k: (v.transpose(0, 1, 3, 2) if v.ndim == 4 and v.shape[2] > 1 else v)
            for k, v in sd.items()}


@pytest.mark.parametrize("mutate", [_swap_q_k, _transpose_conv_kernels])
def test_parity_detects_a_broken_mapping(mutate, tmp_path):
    """The comparison is sharp: a swapped q/k or a spatially transposed kernel fails it."""
    assert _parity("unet_new_order", tmp_path, mutate=mutate) > 1e-2


def test_full_size_adm64_matches_guided_diffusion(tmp_path):
    """The released 64x64 model's architecture at full size (295,904,454 parameters, the flags
    of OpenAI's ``64x64_diffusion.pt``), random weights stored in half precision as released,
    through ``python -m diffjax.convert``'s loader with ``experiments/imagenet64.py`` itself
    (compute switched to float32): the output, variance channels included, agrees within
    1e-4 relative of guided-diffusion's forward on the same rounded weights."""
    torch, gd_unet = _reference()
    torch.manual_seed(0)
    model = gd_unet.UNetModel(
        image_size=64, in_channels=3, model_channels=192, out_channels=6, num_res_blocks=3,
        attention_resolutions=(2, 4, 8), dropout=0.1, channel_mult=(1, 2, 3, 4),
        num_classes=1000, num_head_channels=64, use_scale_shift_norm=True,
        resblock_updown=True, use_new_attention_order=True)
    state_dict = {k: v.half() for k, v in _randomize(torch, model, 1).state_dict().items()}
    model.load_state_dict({k: v.float() for k, v in state_dict.items()})
    path = str(tmp_path / "64x64_diffusion.pt")
    torch.save(state_dict, path)
    del state_dict
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 3, 64, 64)).astype(np.float32)
    t, y = np.array([417.0], np.float32), np.array([207])
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(x), torch.from_numpy(t), y=torch.from_numpy(y))
    ref = ref.numpy()
    del model

    c = configlib.load_config_file(os.path.join(REPO, "experiments", "imagenet64.py"))
    c.model.dtype = "float32"
    task = _task(c)
    params = load_checkpoint(path, task)
    assert sum(int(p.size) for p in jax.tree.leaves(params)) == 295_904_454
    out = task.apply(params, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t),
                     jnp.asarray(y, jnp.int32), False)
    out = np.asarray(out).transpose(0, 3, 1, 2)
    err = float(np.abs(out - ref).max() / np.abs(ref).max())
    print(f"ADM-64 full size: max relative error {err:.2e}")
    assert err < 1e-4
