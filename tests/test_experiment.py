"""experiment.build: names resolved through one table per concept, sampler options checked."""

import pytest

from diffjax import configlib, experiment, tasks
from diffjax.diffusion import samplers


def _config(**overrides):
    c = configlib.base_config()
    c.update_from_flattened_dict(overrides)
    return c


def test_every_valid_name_has_an_implementation():
    tables = {"sampler.name": experiment.SAMPLERS, "guidance.type": experiment.GUIDANCE_SPECS,
              "sampler.thresholding": experiment.THRESHOLDING,
              "condition.type": experiment.CONDITIONS, "model.name": experiment.MODELS,
              "sampler.sigma_spacing": experiment.SIGMA_SPACINGS,
              "diffusion.schedule": experiment.SCHEDULES}
    for field, valid in configlib._tables().items():
        if field in tables:
            assert set(valid) == set(tables[field]), field


def test_sampler_options_are_those_the_sampler_takes():
    assert set(experiment.sampler_options(samplers.heun)[0]) == {"s_churn", "s_tmin", "s_tmax",
                                                                  "s_noise"}
    assert experiment.sampler_options(samplers.euler_ancestral)[0] == {"eta": 1.0,
                                                                       "s_noise": 1.0}
    assert experiment.sampler_options(samplers.ddpm) == ({}, {"variance": "fixed_small"})
    # Unset options are the sampler's own defaults; set ones reach the knobs.
    ea = experiment.build(_config(**{"sampler.name": "euler_ancestral"})).sampling.sampler
    assert dict(ea.knobs) == {"eta": 1.0, "s_noise": 1.0}
    ea = experiment.build(_config(**{"sampler.name": "euler_ancestral", "sampler.eta": 0.25}))
    assert ea.sampling.sampler.knobs["eta"] == 0.25
    assert dict(experiment.build(_config()).sampling.sampler.knobs) == {"eta": 0.0}  # ddim
    # unipc's variant and order are static options of the program (None = its defaults).
    u = experiment.build(_config(**{"sampler.name": "unipc"})).sampling.sampler
    assert (u.options, u.knobs) == ({}, {})
    u = experiment.build(_config(**{"sampler.name": "unipc", "sampler.order": 3,
                                    "sampler.variant": "bh1"})).sampling.sampler
    assert u.options == {"order": 3, "variant": "bh1"}


@pytest.mark.parametrize("overrides, message", [
    ({"sampler.name": "heun", "sampler.eta": 0.5},
     "sampler.eta=0.5 is not an option of sampler 'heun', which takes sampler.s_churn, "
     "sampler.s_tmin, sampler.s_tmax, sampler.s_noise"),
    ({"sampler.name": "dpmpp_2m", "sampler.s_noise": 0.9}, "which takes no options"),
    ({"sampler.name": "ddim", "sampler.s_churn": 1.0}, "which takes sampler.eta;"),
    ({"sampler.name": "ddim", "sampler.eta": 1.5}, "sampler.eta=1.5 must be in [0, 1]"),
    ({"sampler.thresholding": "dynamic", "sampler.dynamic_percentile": 0.0},
     "dynamic_percentile"),
    ({"guidance.type": "classifier"}, "guidance.classifier_config="),
    ({"data.source": "imagenet"}, "config.data.source='imagenet' is not a valid choice"),
    ({"sampler.order": 2}, "sampler.order=2 is not an option of sampler 'ddim'"),
    ({"sampler.name": "unipc", "sampler.order": 4}, "sampler.order=4 is not valid for unipc"),
    ({"sampler.name": "unipc", "sampler.variant": "bh3"}, "valid: bh1, bh2"),
])
def test_bad_options_are_one_line_errors(overrides, message):
    with pytest.raises(configlib.ConfigError) as info:
        experiment.build(_config(**overrides))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_the_task_follows_the_model_and_the_condition():
    assert type(experiment.build(_config()).task) is tasks.DiffusionTask
    sr = experiment.build(_config(**{"condition.type": "superres", "condition.low_res_size": 14}))
    assert type(sr.task) is tasks.SuperResTask and sr.task.input_shape == (14, 14, 1)
    cls = experiment.build(_config(**{"model.name": "classifier", "model.num_head_channels": 32}))
    assert type(cls.task) is tasks.ClassifierTask and cls.sampling is None


def test_unguided_sampling_takes_the_eval_scale_of_zero():
    """``--mode eval`` passes the guidance scale of each point; without guidance that is 0 and
    the program gets no guidance knob (it used to pass ``scale`` to ``no_guidance``)."""
    c = configlib.base_config()
    c.guidance.type = "none"
    sampling = experiment.build(c).sampling
    assert sampling.guidance.scale == 0.0
    assert sampling.knobs(guidance_scale=0.0)["guidance"] == {}
    with pytest.raises(ValueError, match="has no scale"):
        sampling.knobs(guidance_scale=2.0)
