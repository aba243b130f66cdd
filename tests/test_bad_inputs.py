"""A corpus of bad inputs: each is one line ``diffjax: error: ...`` (exit status 2), before any
model is compiled, and leaves every file already in the workdir as it was.

Most cases run in-process (:func:`diffjax.main.run`, what ``main`` runs once the flags are
read) and check the raised error is a user error with a one-line message; a subset runs the
real command lines in a subprocess and checks the exit status and stderr. The slowest time
to an error is printed, not asserted.
"""

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
import zipfile

import numpy as np
import orbax.checkpoint as ocp
import pytest

from diffjax import checkpoint, configlib, experiment
from diffjax import text as text_lib
from diffjax import main as cli
from diffjax.app import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FM = "experiments/fashion_mnist.py:smoke"
CLS = "experiments/classifier_fashion_mnist.py:smoke"
DIT = "experiments/dit_fashion_mnist.py:smoke"
AE = "experiments/fashion_mnist_autoencoder.py:smoke"
EDM = "experiments/fashion_mnist_edm.py:smoke"
TXT = "experiments/fashion_mnist_text.py:smoke"
TIMES: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    if TIMES:
        slow = max(TIMES, key=TIMES.get)
        print(f"\nbad inputs: {len(TIMES)} cases, slowest to its error {TIMES[slow]:.2f}s ({slow})")


def _config(base: str, overrides: dict):
    c = configlib.load_config_file(os.path.join(REPO, base))
    for dotted, value in overrides.items():
        *path, name = dotted.split(".")
        node = c
        for part in path:
            node = node[part]
        node[name] = value
    return c


def _workdir(tmp_path, config_json: dict | None = None):
    """A workdir holding a small file (and a config.json when given)."""
    w = tmp_path / "run"
    w.mkdir()
    (w / "notes.txt").write_text("keep me\n")
    if config_json is not None:
        (w / "config.json").write_text(json.dumps(config_json, default=str))
    return w


def _hashes(root) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _check_one_line(name: str, message: str, expect: str, start: float) -> None:
    TIMES[name] = time.perf_counter() - start
    assert message and "\n" not in message and "Traceback" not in message, message
    assert expect in message, message


def _expect_user_error(name, config, mode, workdir, expect, **kwargs):
    before = _hashes(workdir)
    start = time.perf_counter()
    with pytest.raises(common.USER_ERRORS) as info:
        cli.run(config, mode, str(workdir), **kwargs)
    _check_one_line(name, str(info.value), expect, start)
    assert _hashes(workdir) == before


def _fake_checkpoint(run_dir, step: int, ema: dict) -> None:
    """A checkpoint of ``{"params", "ema_params": [ema]}`` at ``step`` (no model compiled)."""
    manager = checkpoint.make_manager(checkpoint.checkpoint_dir(str(run_dir)), async_save=False)
    try:
        state = {"params": ema, "ema_params": [ema]}
        manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                                   config=ocp.args.JsonSave({})), force=True)
        manager.wait_until_finished()
    finally:
        manager.close()


# --------------------------------------------------------------------------- config values

CONFIG_CASES = [
    # bad choices
    ("sampler_name", FM, {"sampler.name": "bogus"}, "valid: "),
    ("schedule", FM, {"diffusion.schedule": "cosinus"}, "valid: linear, cosine"),
    ("prediction", FM, {"diffusion.prediction": "z"}, "config.diffusion.prediction='z'"),
    ("loss", FM, {"diffusion.loss": "l3"}, "config.diffusion.loss='l3'"),
    ("model_name", FM, {"model.name": "vit"}, "config.model.name='vit'"),
    ("dtype", FM, {"model.dtype": "float16"}, "config.model.dtype='float16'"),
    ("shard_state", FM, {"parallel.shard_state": "zero3"}, "config.parallel.shard_state='zero3'"),
    ("remat_policy", FM, {"model.remat_policy": "all"}, "config.model.remat_policy='all'"),
    ("attention_impl", FM, {"model.attention_impl": "flash"},
     "config.model.attention_impl='flash'"),
    ("cudnn_off_gpu", FM, {"model.attention_impl": "cudnn"}, "needs a GPU"),
    ("context_train", FM, {"model.context_dim": 8}, "needs a context source"),
    ("decay", FM, {"optim.decay": "linear"}, "config.optim.decay='linear'"),
    ("condition_type", FM, {"condition.type": "outpaint"}, "config.condition.type"),
    ("classifier_mode", FM, {"guidance.classifier_mode": "both"}, "guidance.classifier_mode"),
    ("thresholding", FM, {"sampler.thresholding": "soft"}, "sampler.thresholding"),
    ("sigma_spacing", FM, {"sampler.sigma_spacing": "cosine"}, "sampler.sigma_spacing"),
    ("data_source", FM, {"data.source": "mnist"}, "config.data.source='mnist'"),
    ("guidance_type", FM, {"guidance.type": "cfg"}, "valid: none, classifier, classifier_free"),
    ("pool", CLS, {"model.pool": "max"}, "model.pool='max'"),
    ("cpu_fast_conv", FM, {"model.cpu_fast_conv": "yes"}, "model.cpu_fast_conv='yes'"),
    # counts >= 1, batch sizes vs the 8 devices
    ("batch_not_multiple", FM, {"data.batch_size": 12}, "multiple of the 8 devices"),
    ("batch_zero", FM, {"data.batch_size": 0}, "data.batch_size=0"),
    ("sampler_batch", FM, {"sampler.batch_size": 4}, "sampler.batch_size=4"),
    ("sampler_steps_zero", FM, {"sampler.num_steps": 0}, "sampler.num_steps"),
    ("timesteps_zero", FM, {"diffusion.num_timesteps": 0}, "diffusion.num_timesteps=0"),
    ("steps_over_timesteps", FM, {"sampler.num_steps": 200}, "diffusion.num_timesteps=100"),
    ("model_channels_zero", FM, {"model.model_channels": 0}, "model.model_channels=0"),
    ("image_size_zero", FM, {"data.image_size": 0}, "data.image_size=0"),
    ("channels_zero", FM, {"data.channels": 0}, "data.channels=0"),
    # probabilities and ordered intervals
    ("label_dropout_high", FM, {"guidance.label_dropout": 1.5}, "guidance.label_dropout=1.5"),
    ("label_dropout_negative", FM, {"guidance.label_dropout": -0.1}, "guidance.label_dropout"),
    ("strength", FM, {"condition.type": "img2img", "condition.strength": 1.5},
     "condition.strength=1.5"),
    ("ema_decay", FM, {"optim.ema_decays": (1.0,)}, "optim.ema_decays"),
    ("percentile", FM, {"sampler.thresholding": "dynamic", "sampler.dynamic_percentile": 0.0},
     "sampler.dynamic_percentile=0.0"),
    ("eta", FM, {"sampler.eta": 1.5}, "sampler.eta=1.5"),
    ("adam_b1", FM, {"optim.b1": 1.5}, "optim.b1=1.5"),
    ("interval", FM, {"guidance.interval_sigma_min": 5.0, "guidance.interval_sigma_max": 1.0},
     "guidance.interval_sigma_min=5.0"),
    # shapes that do not divide
    ("channel_mult", FM, {"model.channel_mult": (1, 2, 2, 2)}, "not divisible by 2**"),
    ("norm_groups_zero", FM, {"model.norm_groups": 0}, "model.norm_groups=0"),
    ("norm_groups", FM, {"model.model_channels": 20}, "model.norm_groups=32"),
    ("head_channels", FM, {"model.num_head_channels": 24, "model.use_new_attention_order": True},
     "model.num_head_channels=24"),
    ("num_heads", FM, {"model.num_heads": 3}, "model.num_heads=3"),
    ("pool_heads", CLS, {"model.num_head_channels": -1}, "model.pool='attention'"),
    ("dit_patch", DIT, {"model.dit.patch_size": 3}, "model.dit.patch_size=3"),
    ("dit_patch_zero", DIT, {"model.dit.patch_size": 0}, "model.dit.patch_size=0"),
    ("dit_depth", DIT, {"model.dit.depth": 0}, "model.dit.depth=0"),
    ("dit_heads", DIT, {"model.dit.num_heads": 3}, "not divisible by num_heads=3"),
    ("dit_hidden_4", DIT, {"model.dit.hidden_size": 66}, "model.dit.hidden_size=66"),
    ("dit_size", DIT, {"model.dit.size": "XXL"}, "model.dit.size='XXL'"),
    ("dit_mlp", DIT, {"model.dit.mlp_ratio": 0.0}, "model.dit.mlp_ratio"),
    ("ae_groups", AE, {"model.autoencoder.block_out_channels": (24, 64)}, "norm_num_groups"),
    ("ae_groups_zero", AE, {"model.autoencoder.norm_num_groups": 0},
     "model.autoencoder.norm_num_groups=0"),
    ("ae_latent", AE, {"model.autoencoder.latent_channels": 0}, "latent_channels >= 1"),
    ("ae_kl", AE, {"model.autoencoder.kl_weight": -1.0}, "kl_weight=-1.0"),
    ("ae_recon", AE, {"model.autoencoder.recon_loss": "l3"}, "recon_loss='l3'"),
    ("ae_size", AE, {"model.autoencoder.block_out_channels": (32, 32, 32, 32),
                     "data.image_size": 36},
     "autoencoder's downsampling"),
    # guidance.channels, sampler.order / variant and other options
    ("guidance_channels", FM, {"guidance.channels": 2}, "guidance.channels=2"),
    ("guidance_channels_type", FM, {"guidance.type": "none", "guidance.channels": 1},
     "guidance.channels=1"),
    ("unipc_order", FM, {"sampler.name": "unipc", "sampler.order": 4}, "sampler.order=4"),
    ("unipc_variant", FM, {"sampler.name": "unipc", "sampler.variant": "bh3"},
     "sampler.variant='bh3'"),
    ("order_ddim", FM, {"sampler.order": 2}, "not an option of sampler 'ddim'"),
    ("churn_ddim", FM, {"sampler.s_churn": 1.0}, "sampler.s_churn=1.0"),
    # conditioning and the loss
    ("low_res_unused", FM, {"condition.low_res_size": 7}, "condition.low_res_size"),
    ("repaint_zero", FM, {"condition.type": "inpaint", "condition.repaint_resample": 0},
     "condition.repaint_resample"),
    ("mask_name", FM, {"condition.type": "inpaint", "condition.mask": "diamond"},
     "condition.mask='diamond'"),
    ("hybrid_fixed", FM, {"diffusion.loss": "hybrid"}, "variance_type must be"),
    ("edm_rescale", FM, {"diffusion.prediction": "edm", "diffusion.rescale_timesteps": True},
     "rescale_timesteps"),
    ("unlabelled", FM, {"data.num_classes": 0}, "data.num_classes > 0"),
    ("cfg_uncond", FM, {"model.class_cond": False}, "class-conditional"),
    ("invert_sampler", FM, {"condition.type": "invert", "sampler.name": "heun"},
     "condition.type='invert'"),
    ("mean_mode", FM, {"guidance.type": "classifier", "guidance.classifier_mode": "mean",
                       "guidance.classifier_config": CLS.split(":")[0],
                       "guidance.classifier_workdir": "nowhere"}, "classifier_mode='mean'"),
    # EDM training and EDM2's power-function EMA
    ("lognormal_eps", FM, {"diffusion.timestep_sampler": "lognormal"}, "prediction='edm'"),
    ("lognormal_table", EDM, {"sampler.sigma_spacing": "model"}, "no timestep table"),
    ("lognormal_nll", EDM, {"eval.metrics": ("nll",)}, "'nll'"),
    ("sigma_data_zero", EDM, {"diffusion.sigma_data": 0.0}, "diffusion.sigma_data=0.0"),
    ("sigma_max_low", EDM, {"diffusion.sigma_max": 0.001}, "diffusion.sigma_min=0.002"),
    ("sigma_rels_high", EDM, {"ema.sigma_rels": (0.05, 0.3)}, "ema.sigma_rels=(0.05, 0.3)"),
    ("sigma_rel_zero_rels", EDM, {"ema.sigma_rels": (0.05, 0.05)}, "twice"),
    ("no_ema", EDM, {"ema.sigma_rels": (), "ema.snapshot_every": 0}, "no EMA"),
    ("snapshots_without_rels", FM, {"ema.snapshot_every": 5}, "ema.snapshot_every=5"),
    # text models (issue 13)
    ("text_encoder", TXT, {"text.encoder": "bert"}, "config.text.encoder='bert'"),
    ("text_tokenizer", TXT, {"text.tokenizer": "bpe"}, "config.text.tokenizer='bpe'"),
    ("text_captions", TXT, {"text.captions": "coco"}, "config.text.captions='coco'"),
    ("text_heads", TXT, {"text.heads": 3}, "must divide the width"),
    ("text_vocab", TXT, {"text.vocab_size": 1}, "text.vocab_size=1 must be >= 2"),
    ("text_context_dim", TXT, {"model.context_dim": 16}, "model.context_dim to 0 or 32"),
    ("text_class_cond", TXT, {"model.class_cond": True}, "model.class_cond=False"),
    ("text_dit", TXT, {"model.name": "dit"}, "model.name='unet'"),
    ("text_inpaint", TXT, {"condition.type": "inpaint"}, "condition.type='none'"),
    ("prompts_empty", TXT, {"sampler.prompts": ()}, "sampler.prompts is empty"),
    ("embeddings_unset", TXT, {"text.encoder": "embeddings"}, "text.embeddings=FILE.npz"),
    ("embeddings_prompts", TXT, {"text.encoder": "embeddings", "text.embeddings": "e.npz",
                                 "sampler.prompts": ("a coat",)}, "text.sample_embeddings"),
    ("prompts_untext", FM, {"sampler.prompts": ("a coat",)}, "for a text model"),
]


@pytest.mark.parametrize("name, base, overrides, expect", CONFIG_CASES,
                         ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_value(tmp_path, name, base, overrides, expect):
    _expect_user_error(name, _config(base, overrides), "train", _workdir(tmp_path), expect)


def test_attribute_accuracy_of_a_model_without_text(tmp_path):
    _expect_user_error("attribute_metric", _config(FM, {"eval.metrics": ("attribute_accuracy",)}),
                       "eval", _workdir(tmp_path), "attribute_accuracy scores a text model")


def test_nll_of_a_text_model(tmp_path):
    _expect_user_error("nll_text", _config(TXT, {"eval.metrics": ("nll",)}), "eval",
                       _workdir(tmp_path), "nll of a text model")


def test_eval_of_precomputed_embeddings(tmp_path):
    c = _config(TXT, {"text.encoder": "embeddings", "text.embeddings": "e.npz"})
    _expect_user_error("eval_embeddings", c, "eval", _workdir(tmp_path), "--mode sample")


# A text model's run: its tokenizer (15 words, context length 8) and no checkpoint, so a
# prompt error must come before any checkpoint is looked for.
_VOCAB = ("a", "bag", "boot", "bright", "coat", "dark", "dress", "large", "pullover", "sandal",
          "shirt", "small", "sneaker", "t-shirt", "trousers")


@pytest.mark.parametrize("mode, prompts, tokenizer, expect", [
    ("sample", ("a dark shoe",), "ok", "word 'shoe' of prompt 'a dark shoe' is not in the"),
    ("sample", ("a dark small sneaker a bright large bag a",), "ok", "more than the context "
     "length 8"),
    ("sample", ("a coat", " "), "ok", "empty"),
    ("sample", None, "missing", "tokenizer.json not found"),
    ("sample", None, "corrupt", "tokenizer.json"),
    ("eval", ("a dark",), "ok", "no class"),
    ("eval", ("a coat", "a dark dress bright"), "ok", "bright"),
], ids=["unknown_word", "too_long", "empty_prompt", "no_tokenizer", "corrupt_tokenizer",
        "eval_no_class", "eval_contradiction"])
def test_bad_prompts(tmp_path, mode, prompts, tokenizer, expect):
    w = _workdir(tmp_path)
    if tokenizer == "ok":
        text_lib.Tokenizer(kind="word", context_length=8, vocab=_VOCAB).save(
            str(w / "tokenizer.json"))
    elif tokenizer == "corrupt":
        (w / "tokenizer.json").write_text('{"format": "diffjax.tokenizer", "version": 1, ')
    overrides = {"eval.metrics": ("attribute_accuracy",)}
    if prompts is not None:
        overrides["sampler.prompts"] = prompts
    _expect_user_error(f"prompt_{expect[:12]}", _config(TXT, overrides), mode, w, expect)


def test_bad_variant_is_a_config_error():
    start = time.perf_counter()
    with pytest.raises(configlib.ConfigError) as info:
        configlib.load_config_file(os.path.join(REPO, "experiments/fashion_mnist.py:tiny"))
    _check_one_line("variant", str(info.value), "unknown config variant 'tiny'", start)


# --------------------------------------------------------------------------- data, workdir


def test_missing_data_dir(tmp_path):
    _expect_user_error("data_dir", _config(FM, {"data.path": str(tmp_path / "nowhere")}),
                       "train", _workdir(tmp_path), "dataset-fashion-mnist")


@pytest.mark.parametrize("overrides, expect", [
    ({"data.channels": 3, "guidance.channels": 0}, "data.channels=3"),
    ({"data.num_classes": 5}, "data.num_classes=5"),
])
def test_data_does_not_match(tmp_path, overrides, expect):
    _expect_user_error(f"data_{expect}", _config(FM, overrides), "train", _workdir(tmp_path),
                       expect)


def test_workdir_of_another_config(tmp_path):
    other = experiment.build(_config(FM, {"model.model_channels": 64}), num_devices=8).resolved
    _expect_user_error("workdir_config", _config(FM, {}), "train", _workdir(tmp_path, other),
                       "holds a run of a different config")


# --------------------------------------------------------------------------- checkpoints


def test_sample_on_an_empty_workdir(tmp_path):
    _expect_user_error("sample_empty", _config(FM, {}), "sample", _workdir(tmp_path),
                       "train first")


def test_sample_from_a_missing_checkpoint_dir(tmp_path):
    _expect_user_error("checkpoint_dir", _config(FM, {}), "sample", _workdir(tmp_path),
                       "no checkpoints at", checkpoint=str(tmp_path / "elsewhere"))


def test_checkpoint_step_that_does_not_exist(tmp_path):
    w = _workdir(tmp_path)
    _fake_checkpoint(w, 4, {"w": np.zeros(2, np.float32)})
    _expect_user_error("checkpoint_step", _config(FM, {}), "sample", w, "step 7", step=7)


def test_checkpoint_of_another_model(tmp_path):
    w = _workdir(tmp_path)
    _fake_checkpoint(w, 4, {"w": np.zeros(2, np.float32)})
    _expect_user_error("checkpoint_model", _config(FM, {}), "sample", w,
                       "parameters of another model")


def _trained_run(tmp_path, base=FM):
    """A run directory with the config.json its training wrote and a (fake) checkpoint."""
    trained = _config(base, {})
    w = _workdir(tmp_path, json.loads(json.dumps(trained.to_dict(), default=str)))
    _fake_checkpoint(w, 4, {"w": np.zeros(2, np.float32)})
    return w


@pytest.mark.parametrize("mode", ["sample", "eval", "posthoc_ema"])
@pytest.mark.parametrize("name, overrides, expect", [
    ("prediction", {"diffusion.prediction": "eps"}, "diffusion.prediction='v'"),
    ("width", {"model.model_channels": 64}, "model.model_channels=32"),
    ("schedule", {"diffusion.schedule": "linear"}, "diffusion.schedule='cosine'"),
    ("blocks", {"model.num_res_blocks": 2}, "model.num_res_blocks=1"),
])
def test_sampling_a_run_with_another_network(tmp_path, mode, name, overrides, expect):
    w = _trained_run(tmp_path)
    extra = {"posthoc_ema": {"ema.sigma_rel": 0.1},  # eval: a metric needing no other run
             "eval": {"eval.metrics": ("nll",)}}.get(mode, {})
    overrides = {**overrides, **extra}
    _expect_user_error(f"run_{name}_{mode}", _config(FM, overrides), mode, w,
                       f"was trained with {expect}")


def test_sampling_may_change_compute_options(tmp_path):
    """model.dtype is not part of the trained network: the run's checkpoint is read (and
    found to be of another model: the fake checkpoint's)."""
    w = _trained_run(tmp_path)
    _expect_user_error("run_dtype", _config(FM, {"model.dtype": "bfloat16"}), "sample", w,
                       "parameters of another model")


def test_posthoc_ema_inputs(tmp_path):
    w = _trained_run(tmp_path, EDM)
    _expect_user_error("posthoc_no_sigma_rel", _config(EDM, {}), "posthoc_ema", w,
                       "needs --config.ema.sigma_rel")
    _expect_user_error("posthoc_no_snapshots", _config(EDM, {"ema.sigma_rel": 0.08}),
                       "posthoc_ema", w, "ema_snapshots does not exist")
    _expect_user_error("sample_no_snapshots", _config(EDM, {"ema.sigma_rel": 0.08}), "sample",
                       w, "ema_snapshots does not exist")


def test_sample_mode_of_a_classifier(tmp_path):
    _expect_user_error("sample_classifier", _config(CLS, {}), "sample", _workdir(tmp_path),
                       "needs a diffusion model")


# --------------------------------------------------------------------------- conditioning


def _img2img(path) -> dict:
    return {"condition.type": "img2img", "condition.input": str(path)}


def test_condition_input_missing(tmp_path):
    _expect_user_error("input_missing", _config(FM, _img2img(tmp_path / "no.png")), "sample",
                       _workdir(tmp_path), "is not a file")


@pytest.mark.parametrize("kind", ["png", "npz"])
def test_condition_input_corrupt(tmp_path, kind):
    path = tmp_path / f"bad.{kind}"
    path.write_bytes(b"PK\x03\x04 not a zip" if kind == "npz" else b"\x89PNG\r\n not a png")
    _expect_user_error(f"input_corrupt_{kind}", _config(FM, _img2img(path)), "sample",
                       _workdir(tmp_path), f"bad.{kind}")


@pytest.mark.parametrize("labels", [np.array([0, 12]), np.array([0.5, 1.0]), np.array([1])])
def test_condition_input_bad_labels(tmp_path, labels):
    path = tmp_path / "inputs.npz"
    np.savez(path, images=np.zeros((2, 28, 28, 1), np.uint8), labels=labels)
    _expect_user_error(f"labels_{labels.dtype}_{labels.size}", _config(FM, _img2img(path)),
                       "sample", _workdir(tmp_path), "'labels' must be 2 integers")


def test_mask_file_missing(tmp_path):
    overrides = {"condition.type": "inpaint", "condition.mask": str(tmp_path / "mask.png")}
    _expect_user_error("mask_missing", _config(FM, overrides), "sample", _workdir(tmp_path),
                       "existing PNG file")


def test_mask_file_corrupt(tmp_path):
    mask = tmp_path / "mask.png"
    mask.write_bytes(b"not a png at all")
    overrides = {"condition.type": "inpaint", "condition.mask": str(mask)}
    _expect_user_error("mask_corrupt", _config(FM, overrides), "sample", _workdir(tmp_path),
                       "mask.png")


# --------------------------------------------------------------------------- guidance


def _classifier_guidance(config: str, workdir: str) -> dict:
    return {"guidance.type": "classifier", "guidance.classifier_config": config,
            "guidance.classifier_workdir": workdir}


def test_classifier_config_missing(tmp_path):
    _expect_user_error("classifier_config", _config(FM, _classifier_guidance(
        str(tmp_path / "nope.py"), str(tmp_path))), "train", _workdir(tmp_path), "not found")


def test_classifier_config_not_a_classifier(tmp_path):
    _expect_user_error("classifier_not", _config(FM, _classifier_guidance(
        os.path.join(REPO, FM), str(tmp_path))), "train", _workdir(tmp_path),
        "is not a classifier config")


def test_classifier_workdir_missing(tmp_path):
    overrides = _classifier_guidance(os.path.join(REPO, CLS), str(tmp_path / "no_cls"))
    _expect_user_error("classifier_workdir", _config(FM, overrides), "train",
                       _workdir(tmp_path), "no_cls")


# --------------------------------------------------------------------------- eval


@pytest.mark.parametrize("base, overrides, expect", [
    (FM, {"eval.metrics": ("fd_mnist",)}, "unknown metric(s) ['fd_mnist']"),
    (FM, {"eval.features_workdir": "/nonexistent/features"}, "no trained feature classifier"),
    (FM, {"eval.metrics": ("fid",)}, "eval.inception_weights=''"),
    (FM, {"eval.metrics": ("fid",), "eval.inception_weights": "/nonexistent/inc.npz"},
     "/nonexistent/inc.npz"),
    (FM, {"eval.features_config": "/nonexistent/features.py"}, "not found"),
    (FM, {"eval.num_samples": 1}, "eval.num_samples must be >= 2"),
    (FM, {"eval.sweep_num_steps": (0, 4)}, "eval.sweep_num_steps"),
    (AE, {"eval.metrics": ("fid",)}, "PSNR"),
], ids=["metric", "features_workdir", "inception_unset", "inception_missing",
        "features_config", "num_samples", "sweep_steps", "ae_metric"])
def test_bad_eval_inputs(tmp_path, base, overrides, expect):
    _expect_user_error(f"eval_{expect[:20]}", _config(base, overrides), "eval",
                       _workdir(tmp_path), expect)


# --------------------------------------------------------------------------- command lines


def _cli(module: str, *args):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    return out, start


def _expect_cli_error(name, workdir, expect, module, *args):
    before = _hashes(workdir)
    out, start = _cli(module, *args)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("diffjax: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], out.stderr[-3000:]
    _check_one_line(f"cli_{name}", errors[0], expect, start)
    assert _hashes(workdir) == before


MAIN_CASES = [
    ("near_name", ["--config.model.chanel_mult=(1,2)"], 'Did you mean "channel_mult"'),
    ("bad_int", ["--config.sampler.num_steps=abc"], "--config.sampler.num_steps=abc"),
    ("bad_mode", ["--mode=bogus"], "--mode=bogus"),
    ("unknown_flag", ["--wrkdir=x"], "wrkdir"),
    ("bad_choice", ["--config.sampler.name=bogus"], "config.sampler.name='bogus'"),
    ("steps_over", ["--config.sampler.num_steps=500"], "diffusion.num_timesteps=100"),
    ("missing_data", ["--config.data.path=/nonexistent/fmnist"], "dataset-fashion-mnist"),
    ("sample_empty", ["--mode=sample"], "train first"),
    ("eval_metric", ["--mode=eval", "--config.eval.metrics=('bogus',)"], "unknown metric"),
    ("pool_heads", ["--config", CLS, "--config.model.num_head_channels=-1"],
     "model.pool='attention'"),
]


@pytest.mark.parametrize("name, args, expect", MAIN_CASES, ids=[c[0] for c in MAIN_CASES])
def test_main_command_line(tmp_path, name, args, expect):
    w = _workdir(tmp_path)
    config = [] if "--config" in args else ["--config", FM]
    _expect_cli_error(name, w, expect, "diffjax.main", *config, "--workdir", str(w), *args)


@pytest.mark.parametrize("config", ["experiments/nothere.py", f"{FM[:-6]}:tiny"])
def test_main_config_file_that_does_not_load(tmp_path, config):
    w = _workdir(tmp_path)
    _expect_cli_error("config_file", w, "nothere.py" if "nothere" in config else "tiny",
                      "diffjax.main", "--config", config, "--workdir", str(w))


def test_main_workdir_of_another_config(tmp_path):
    other = experiment.build(_config(FM, {"model.model_channels": 64}), num_devices=8).resolved
    w = _workdir(tmp_path, other)
    _expect_cli_error("workdir_config", w, "different config", "diffjax.main", "--config", FM,
                      "--workdir", str(w))


def test_gs_paths_without_gcsfs(tmp_path, monkeypatch):
    """A gs:// workdir or checkpoint without gcsfs (etils.epath's backend for Google Cloud
    Storage) is one line naming the flag, not an ImportError from the first file written."""
    monkeypatch.setattr(cli, "_has_gcsfs", lambda: False)  # whether or not it is installed
    c = _config(FM, {})
    _expect_user_error("gcs_workdir", c, "train", "gs://bkt/run", "--workdir=gs://bkt/run")
    _expect_user_error("gcs_checkpoint", c, "sample", _workdir(tmp_path), "diffjax[gcs]",
                       checkpoint="gs://bkt/run")


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None,
                    reason="the command line's own check: only where gcsfs is missing")
def test_gs_compilation_cache_without_gcsfs(tmp_path):
    """The same for --compilation_cache_dir, checked before the cache is switched on (JAX
    would warn once per entry and run uncached)."""
    w = _workdir(tmp_path)
    _expect_cli_error("gcs_cache", w, "--compilation_cache_dir=gs://bkt/cache", "diffjax.main",
                      "--config", FM, "--workdir", str(w), "--compilation_cache_dir",
                      "gs://bkt/cache")


def _safetensors_header_only(path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})
    path.write_bytes(len(header).to_bytes(8, "little") + header.encode() + b"\0" * 3)


@pytest.mark.parametrize("kind", ["missing", "not_zip", "truncated_zip", "safetensors"])
def test_convert_bad_weight_file(tmp_path, kind):
    w = _workdir(tmp_path)
    path = tmp_path / ("model.safetensors" if kind == "safetensors" else "model.pt")
    if kind == "not_zip":
        path.write_bytes(b"this is not a torch file")
    elif kind == "truncated_zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        path.write_bytes(path.read_bytes()[:40])
    elif kind == "safetensors":
        _safetensors_header_only(path)
    _expect_cli_error(f"convert_{kind}", w, "model.", "diffjax.convert", "--config", FM,
                      "--checkpoint", str(path), "--workdir", str(w))
