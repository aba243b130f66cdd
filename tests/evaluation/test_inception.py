"""Tests of the Flax FID InceptionV3, its pooling quirks, the converter and the weight loader.

The reference test needs torch, torchvision and pytorch-fid (optional test group:
``pip install torch==2.14.1 torchvision==0.29.1 pytorch-fid``) and is skipped without them.
"""

import importlib.util

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.evaluation import convert_inception as ci
from diffjax.evaluation import inception

_HAVE_TORCH_REF = all(importlib.util.find_spec(m) is not None
                      for m in ("torch", "torchvision", "pytorch_fid"))


def _np_avg_pool_valid(x):
    """Naive float64 3x3/1 average over in-image pixels only. x: [B, H, W, C]."""
    b, h, w, c = x.shape
    out = np.zeros_like(x, dtype=np.float64)
    for i in range(h):
        for j in range(w):
            win = x[:, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2, :]
            out[:, i, j, :] = win.reshape(b, -1, c).mean(axis=1)
    return out


def test_avg_pool_excludes_padding():
    x = np.random.default_rng(0).normal(size=(2, 5, 6, 3)).astype(np.float32)
    got = np.asarray(inception.avg_pool_3x3_valid_count(jnp.asarray(x)))
    np.testing.assert_allclose(got, _np_avg_pool_valid(x.astype(np.float64)), rtol=1e-6,
                               atol=1e-6)
    # A corner averages 4 pixels: a constant image stays constant (a zero-padded
    # count_include_pad pool would give 4/9 there).
    ones = np.asarray(inception.avg_pool_3x3_valid_count(jnp.ones((1, 4, 4, 1))))
    np.testing.assert_allclose(ones, 1.0, rtol=1e-7)


def test_max_pool_padding_never_wins():
    x = -np.abs(np.random.default_rng(1).normal(size=(1, 4, 5, 2))).astype(np.float32) - 1.0
    got = np.asarray(inception.max_pool_3x3(jnp.asarray(x), 1, 1))
    ref = np.full_like(x, -np.inf)
    for i in range(4):
        for j in range(5):
            ref[:, i, j] = x[:, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2].max(axis=(1, 2))
    np.testing.assert_array_equal(got, ref)


def test_preprocess_scaling_and_shape():
    u8 = np.array([0, 255, 127], np.uint8).reshape(1, 1, 3, 1).repeat(3, -1)
    # float32 x / 127.5 - 1 and (v - 128) / 128 are exact to one ulp of 1.0 (2^-23).
    x = np.asarray(inception.preprocess_images(jnp.asarray(u8), size=3, mode="pytorch_fid"))
    assert x.shape == (1, 3, 3, 3)
    np.testing.assert_allclose(x[0, 0, :, 0], [-1.0, 1.0, 127 / 127.5 - 1], rtol=0,
                               atol=2.0**-23)
    x = np.asarray(inception.preprocess_images(jnp.asarray(u8), size=3, mode="tf1"))
    np.testing.assert_allclose(x[0, 0, :, 0], [-1.0, 127 / 128, -1 / 128], rtol=0,
                               atol=2.0**-23)
    gray = jnp.linspace(-1, 1, 16).reshape(1, 4, 4, 1)
    y = inception.preprocess_images(gray, size=4, mode="pytorch_fid")
    np.testing.assert_array_equal(np.asarray(y), np.repeat(np.asarray(gray), 3, -1))
    y = inception.preprocess_images(gray, size=4, mode="tf1")
    ref = ((np.asarray(gray) + 1) * 127.5 - 128) / 128
    np.testing.assert_allclose(np.asarray(y), np.repeat(ref, 3, -1), rtol=0, atol=2.0**-22)
    with pytest.raises(ValueError, match="dtype"):
        inception.preprocess_images(jnp.zeros((1, 4, 4, 3), jnp.int32))
    with pytest.raises(ValueError, match="shape"):
        inception.preprocess_images(jnp.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match="mode"):
        inception.preprocess_images(jnp.zeros((1, 4, 4, 3)), mode="bicubic")


def _np_tf1_resize(v, out):
    """TF1 ResizeBilinear (align_corners=False) per output pixel, float64. v: [H, W, C]."""
    h, w, _ = v.shape
    res = np.zeros((out, out, v.shape[2]))
    for i in range(out):
        in_y = i * np.float32(h / out)
        top, y_l = int(np.floor(in_y)), in_y - np.floor(in_y)
        bot = min(top + 1, h - 1)
        for j in range(out):
            in_x = j * np.float32(w / out)
            left, x_l = int(np.floor(in_x)), in_x - np.floor(in_x)
            right = min(left + 1, w - 1)
            top_v = v[top, left] + (v[top, right] - v[top, left]) * x_l
            bot_v = v[bot, left] + (v[bot, right] - v[bot, left]) * x_l
            res[i, j] = top_v + (bot_v - top_v) * y_l
    return res


@pytest.mark.parametrize("shape", [(7, 5), (40, 33)])
def test_tf1_resize_matches_per_pixel_formula(shape):
    u8 = np.random.default_rng(shape[0]).integers(0, 256, size=(1, *shape, 3), dtype=np.uint8)
    got = np.asarray(inception.preprocess_images(jnp.asarray(u8), size=23, mode="tf1"))
    ref = (_np_tf1_resize(u8[0].astype(np.float64), 23) - 128) / 128
    # [0, 255] values interpolated in float32: error <= a few ulp of 255, i.e. ~1e-7 after /128.
    np.testing.assert_allclose(got[0], ref, rtol=0, atol=1e-6)


def test_model_rejects_small_images():
    with pytest.raises(ValueError, match="75"):
        jax.eval_shape(lambda: inception.InceptionV3().init(
            jax.random.key(0), jnp.zeros((1, 64, 64, 3))))


def _fake_state_dict(seed=0):
    """A state dict with torch's names and layouts built from the Flax shapes."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in ci.expected_shapes().items():
        mod, leaf = key.rsplit("/", 1) if "/" in key else ("", key)
        tmod = mod.replace("/", ".")
        if leaf == "kernel":
            out[f"{tmod}.conv.weight"] = rng.normal(size=(shape[3], shape[2], *shape[:2]))
        elif leaf == "fc_kernel":
            out["fc.weight"] = rng.normal(size=shape[::-1])
        elif leaf == "fc_bias":
            out["fc.bias"] = rng.normal(size=shape)
        else:
            torch_leaf = {v: k for k, v in ci._BN_NAMES.items()}[leaf]
            out[f"{tmod}.bn.{torch_leaf}"] = rng.normal(size=shape)
            out[f"{tmod}.bn.num_batches_tracked"] = np.array(0)
    return out


def test_convert_layout_and_roundtrip(tmp_path):
    sd = _fake_state_dict()
    params = ci.convert_state_dict(sd)
    w = sd["Mixed_6d.branch7x7_2.conv.weight"]  # [O, I, 1, 7]
    k = params["Mixed_6d"]["branch7x7_2"]["kernel"]  # [1, 7, I, O]
    assert k.shape == (1, 7, 160, 160)
    np.testing.assert_array_equal(k[0, 5, 3, 2], np.float32(w[2, 3, 0, 5]))
    np.testing.assert_array_equal(params["fc_kernel"], sd["fc.weight"].T.astype(np.float32))
    np.testing.assert_array_equal(params["Conv2d_1a_3x3"]["bn_var"],
                                  sd["Conv2d_1a_3x3.bn.running_var"].astype(np.float32))
    for name in ("w.npz", "w.msgpack"):
        ci.save_inception_params(params, str(tmp_path / name))
        loaded = ci.load_inception_params(str(tmp_path / name))
        jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_convert_and_load_errors(tmp_path):
    sd = _fake_state_dict()
    bad = dict(sd, **{"AuxLogits.fc.weight": np.zeros((1008, 768))})
    with pytest.raises(ValueError, match="unexpected key"):
        ci.convert_state_dict(bad)
    missing = {k: v for k, v in sd.items() if not k.startswith("Mixed_7c.branch_pool")}
    with pytest.raises(ValueError, match="missing"):
        ci.convert_state_dict(missing)
    wrong = dict(sd, **{"fc.bias": np.zeros(1000)})
    with pytest.raises(ValueError, match="fc_bias has shape"):
        ci.convert_state_dict(wrong)
    with pytest.raises(ValueError, match="not found"):
        ci.load_inception_params(str(tmp_path / "nope.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="corrupt"):
        ci.load_inception_params(str(tmp_path / "junk.npz"))
    (tmp_path / "junk.msgpack").write_bytes(b"garbage\x00\xff\xc1")
    with pytest.raises(ValueError, match="corrupt"):
        ci.load_inception_params(str(tmp_path / "junk.msgpack"))
    (tmp_path / "list.msgpack").write_bytes(flax.serialization.msgpack_serialize([1, 2]))
    with pytest.raises(ValueError, match="corrupt"):
        ci.load_inception_params(str(tmp_path / "list.msgpack"))
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="does not match"):
        ci.load_inception_params(str(tmp_path / "other.npz"))


def _randomize_torch_model(model, torch):
    """He-normal convs (activations stay O(1) through the depth), random BN and fc."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if name.endswith("conv.weight"):
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
            elif name.endswith("bn.weight") or name.endswith("bn.running_var"):
                p.copy_(torch.rand(p.shape, generator=gen) * 1.0 + 0.5)
            elif name.endswith("bn.bias") or name.endswith("bn.running_mean"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif name == "fc.weight":
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
            elif name == "fc.bias":
                p.copy_(torch.randn(p.shape, generator=gen))


@pytest.mark.skipif(not _HAVE_TORCH_REF, reason="reference test needs torch, torchvision and "
                    "pytorch-fid (pip install torch==2.14.1 torchvision==0.29.1 pytorch-fid)")
def test_matches_pytorch_fid_inception(monkeypatch):
    import torch
    import torchvision
    from pytorch_fid import inception as pfi

    torch.set_num_threads(2)
    tv = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False,
                                         num_classes=1008)
    # The same block swaps as pytorch_fid.inception.fid_inception_v3, without its download.
    tv.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    tv.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    tv.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    tv.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    tv.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    tv.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    tv.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    tv.Mixed_7b = pfi.FIDInceptionE_1(1280)
    tv.Mixed_7c = pfi.FIDInceptionE_2(2048)
    _randomize_torch_model(tv, torch)
    monkeypatch.setattr(pfi, "fid_inception_v3", lambda: tv)
    ref_model = pfi.InceptionV3([3], resize_input=True, normalize_input=True).eval()
    spatial = {}
    tv.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: spatial.setdefault("x", o))

    # Two 64x64 images in [0, 1] (pytorch-fid's input range), upsampled to 299 by both.
    imgs01 = np.random.default_rng(0).uniform(size=(2, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        pool_ref = ref_model(torch.from_numpy(imgs01).permute(0, 3, 1, 2))[0].flatten(1)
        logits_ref = tv.fc(pool_ref).numpy()
        pool_ref = pool_ref.numpy()
    spatial_ref = spatial["x"].permute(0, 2, 3, 1)[..., :7].reshape(2, -1).numpy()

    params = ci.convert_state_dict({k: v.numpy() for k, v in tv.state_dict().items()})
    x = inception.preprocess_images(jnp.asarray(imgs01 * 2.0 - 1.0), mode="pytorch_fid")
    out = jax.jit(inception.InceptionV3().apply)({"params": params}, x)
    assert out["spatial"].shape == (2, 2023)
    for name, ref in (("pool", pool_ref), ("logits", logits_ref), ("spatial", spatial_ref)):
        got = np.asarray(out[name])
        # He-initialised weights keep features O(1-10) (not vanishing, so the test can
        # fail); float32 differences measured here are ~1e-5, the bound is 1e-4 absolute.
        assert 1.0 < np.abs(ref).max() < 100.0, (name, np.abs(ref).max())
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4, err_msg=name)
    bias = params["fc_bias"]
    np.testing.assert_allclose(np.asarray(out["logits_unbiased"]), logits_ref - bias,
                               rtol=0, atol=1e-4)


@pytest.mark.skipif(not _HAVE_TORCH_REF, reason="needs torch (pip install torch==2.14.1)")
@pytest.mark.parametrize("size", [32, 320])
def test_resize_matches_torch_bilinear(size):
    import torch
    import torch.nn.functional as F

    x = np.random.default_rng(size).uniform(-1, 1, size=(1, size, size, 3)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299),
                        mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
    got = np.asarray(inception.preprocess_images(jnp.asarray(x), mode="pytorch_fid"))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


@pytest.mark.skipif(not _HAVE_TORCH_REF, reason="needs torch (pip install torch==2.14.1)")
def test_converter_cli_reads_pth(tmp_path, capsys):
    import torch

    sd = _fake_state_dict(seed=3)
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()},
               tmp_path / "pt_inception.pth")
    ci.main(["--torch", str(tmp_path / "pt_inception.pth"), "--out",
             str(tmp_path / "inception_fid.npz")])
    assert "wrote" in capsys.readouterr().out
    loaded = ci.load_inception_params(str(tmp_path / "inception_fid.npz"))
    jax.tree.map(np.testing.assert_array_equal, loaded, ci.convert_state_dict(sd))
    with pytest.raises(ValueError, match="not found"):
        ci.main(["--torch", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "o.npz")])
