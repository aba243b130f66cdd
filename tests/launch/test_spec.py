"""Sweep expansion (product, zip), run naming and sweep-file loading."""

import re

import pytest

from launch.spec import (MAX_NAME_LEN, Sweep, axis, default_labels, expand, format_value,
                         load_sweep, override_text, product, zip_)

SAFE = re.compile(r"^[A-Za-z0-9.+=_-]+$")


def _sweep(axes, **kw):
    return Sweep(config="experiments/fashion_mnist.py", axes=axes, **kw)


def test_product_order_and_size():
    axes = product(axis("a.x", [1, 2, 3]), axis("b.y", ["p", "q"]))
    assert axes.keys == ("a.x", "b.y")
    assert [dict(p) for p in axes.points] == [
        {"a.x": 1, "b.y": "p"}, {"a.x": 1, "b.y": "q"}, {"a.x": 2, "b.y": "p"},
        {"a.x": 2, "b.y": "q"}, {"a.x": 3, "b.y": "p"}, {"a.x": 3, "b.y": "q"}]


def test_zip_pairs_elementwise_and_nests_in_product():
    samplers = zip_(axis("sampler.name", ["ddim", "heun"]), axis("sampler.num_steps", [50, 25]))
    axes = product(axis("guidance.scale", [0.0, 2.0]), samplers)
    points = [dict(p) for p in axes.points]
    assert len(points) == 4
    assert points[0] == {"guidance.scale": 0.0, "sampler.name": "ddim", "sampler.num_steps": 50}
    assert points[1] == {"guidance.scale": 0.0, "sampler.name": "heun", "sampler.num_steps": 25}
    assert points[3] == {"guidance.scale": 2.0, "sampler.name": "heun", "sampler.num_steps": 25}


def test_zip_of_products_and_three_way_product():
    axes = product(axis("a.x", [1, 2]), axis("a.y", [1, 2]), axis("a.z", [1, 2, 3]))
    assert len(axes) == 12
    zipped = zip_(product(axis("a.x", [1, 2]), axis("a.y", [3, 4])), axis("a.z", list("abcd")))
    assert [dict(p)["a.z"] for p in zipped.points] == list("abcd")
    assert dict(zipped.points[2]) == {"a.x": 2, "a.y": 3, "a.z": "c"}


@pytest.mark.parametrize("make, match", [
    (lambda: zip_(axis("a.x", [1, 2]), axis("a.y", [1, 2, 3])), "equal length"),
    (lambda: product(axis("a.x", [1]), axis("a.x", [2])), "swept twice"),
    (lambda: axis("a.x", []), "non-empty"),
    (lambda: axis("a.x", [1, 1]), "repeated"),
    (lambda: axis("a x", [1]), "dotted config path"),
    (lambda: axis("a.x", "abc"), "string"),
    (lambda: _sweep(axis("a.x", [1]), mode="fit"), "mode"),
    (lambda: _sweep(axis("a.x", [1]), overrides={"a.x": 2}), "both"),
])
def test_bad_sweeps_raise_one_line_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_format_and_override_text():
    assert format_value(3.0) == "3"
    assert format_value(0.5) == "0.5"
    assert format_value(1e-4) == "0.0001"
    assert format_value(2.5e-7) == "2.5e-07"
    assert format_value(True) == "true"
    assert format_value((1, 2, 2)) == "1x2x2"
    assert format_value(None) == "none"
    assert override_text(3.0) == "3.0"
    assert override_text("dpmpp_2m") == "dpmpp_2m"
    assert override_text((1, 2)) == "(1, 2)"
    assert override_text(False) == "False"


def test_labels():
    assert default_labels(["sampler.name", "guidance.scale"]) == {
        "sampler.name": "sampler", "guidance.scale": "scale"}
    # 'steps' is shared by two sections, so the section disambiguates.
    assert default_labels(["sampler.num_steps", "train.num_steps"]) == {
        "sampler.num_steps": "sampler.num_steps", "train.num_steps": "train.num_steps"}


def test_names_readable_and_unique():
    runs = expand(_sweep(product(axis("sampler.name", ["ddim", "dpmpp_2m"]),
                                 axis("guidance.scale", [0.0, 3.0]))))
    assert [r.name for r in runs] == ["sampler-ddim_scale-0", "sampler-ddim_scale-3",
                                      "sampler-dpmpp_2m_scale-0", "sampler-dpmpp_2m_scale-3"]
    assert runs[1].assignment == {"sampler.name": "ddim", "guidance.scale": 3.0}


def test_names_unique_after_sanitising_and_shortening():
    # 'a/b' and 'a:b' both sanitise to 'a_b'; they must still get distinct names.
    runs = expand(_sweep(axis("data.path", ["a/b", "a:b", "c d"])))
    names = [r.name for r in runs]
    assert len(set(names)) == 3 and all(SAFE.match(n) for n in names)
    assert names[2] == "path-c_d"
    assert names[0].startswith("path-a_b-") and names[1].startswith("path-a_b-")
    long_values = ["x" * 200 + str(i) for i in range(3)]
    runs = expand(_sweep(axis("model.tag", long_values, label="tag")))
    names = [r.name for r in runs]
    assert len(set(names)) == 3
    assert all(len(n) <= MAX_NAME_LEN and SAFE.match(n) for n in names)
    # Stable: adding values to an axis does not rename existing runs.
    more = expand(_sweep(axis("model.tag", long_values + ["y"], label="tag")))
    assert [r.name for r in more][:3] == names


def test_explicit_labels_and_label_clash():
    runs = expand(_sweep(axis("optim.learning_rate", [1e-4, 3e-4], label="lr")))
    assert [r.name for r in runs] == ["lr-0.0001", "lr-0.0003"]
    with pytest.raises(ValueError, match="labels"):
        expand(_sweep(product(axis("a.x", [1], label="k"), axis("b.y", [2], label="k"))))


def test_shipped_sweep_files_load():
    fm = load_sweep("experiments/sweeps/fashion_mnist_samplers.py")
    assert fm.name == "fashion_mnist_samplers" and fm.modes == ("eval",)
    assert fm.checkpoint and len(expand(fm)) == 4
    in64 = load_sweep("experiments/sweeps/imagenet64_schedules.py")
    assert in64.modes == ("train", "eval") and len(expand(in64)) == 4


def test_load_sweep_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_sweep(tmp_path / "nope.py")
    bad = tmp_path / "bad.py"
    bad.write_text("X = 1\n")
    with pytest.raises(ValueError, match="get_sweep"):
        load_sweep(bad)
