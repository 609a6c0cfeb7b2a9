import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    KDPM2DiscreteScheduler,
)

from pcr_diffusers.schedulers import PCRScheduler

SHAPE = (2, 3, 4, 4)  # (B, C, H, W)

CASES = [
    (DDPMScheduler, {}, 1000, {}),
    (DDPMScheduler, {"timestep_spacing": "trailing"}, 37, {}),
    (DDPMScheduler, {"timestep_spacing": "linspace", "prediction_type": "v_prediction"}, 20, {}),
    (DDPMScheduler, {"prediction_type": "sample", "clip_sample": False}, 20, {}),
    (DDPMScheduler, {"thresholding": True, "sample_max_value": 1.5}, 20, {}),
    (DDPMScheduler, {"variance_type": "fixed_small_log"}, 20, {}),
    (DDPMScheduler, {"variance_type": "fixed_large", "beta_schedule": "squaredcos_cap_v2"}, 20, {}),
    (DDIMScheduler, {}, 50, {}),
    (DDIMScheduler, {}, 51, {"eta": 0.5}),
    (DDIMScheduler, {"timestep_spacing": "trailing", "prediction_type": "v_prediction"}, 25, {"eta": 1.0}),
    (DDIMScheduler, {"timestep_spacing": "linspace", "set_alpha_to_one": False}, 25, {}),
    (DDIMScheduler, {"prediction_type": "sample"}, 25, {"eta": 0.3, "use_clipped_model_output": True}),
    (DDIMScheduler, {"thresholding": True, "clip_sample": False}, 25, {}),
    (EulerDiscreteScheduler, {}, 30, {}),
    (EulerDiscreteScheduler, {"prediction_type": "v_prediction", "use_karras_sigmas": True}, 31, {}),
    (EulerDiscreteScheduler, {"timestep_spacing": "trailing", "prediction_type": "sample"}, 30, {}),
    (EulerAncestralDiscreteScheduler, {}, 30, {}),
    (EulerAncestralDiscreteScheduler, {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 29, {}),
    (FlowMatchEulerDiscreteScheduler, {}, 28, {}),
    (FlowMatchEulerDiscreteScheduler, {"shift": 3.0}, 27, {}),
    (FlowMatchEulerDiscreteScheduler, {"stochastic_sampling": True}, 20, {}),
]


def case_id(case):
    cls, config, steps, kwargs = case
    return f"{cls.__name__}-{steps}-{'-'.join(f'{k}={v}' for k, v in {**config, **kwargs}.items())}"


def sequential_steps(scheduler, model_outputs, samples, generator, **kwargs):
    """The base scheduler's own `step`, one timestep at a time, as a sampling loop calls it."""
    outs = []
    for i, t in enumerate(scheduler.timesteps):
        if hasattr(scheduler, "scale_model_input"):  # Euler schedulers warn unless it was called
            scheduler.scale_model_input(samples[i], t)
        outs.append(scheduler.step(model_outputs[i], t, samples[i], generator=generator, **kwargs).prev_sample)
    return torch.stack(outs)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_batch_step_equals_the_base_step(case):
    cls, config, steps, kwargs = case
    base = cls(**config)
    base.set_timesteps(steps)
    pcr = PCRScheduler.from_scheduler(base)
    pcr.set_timesteps(steps)
    torch.testing.assert_close(pcr.timesteps, base.timesteps, rtol=0, atol=0)

    gen = torch.Generator().manual_seed(0)
    samples = torch.randn(steps, *SHAPE, generator=gen) * 1.5
    model_outputs = torch.randn(steps, *SHAPE, generator=gen)
    ref = sequential_steps(base, model_outputs, samples, torch.Generator().manual_seed(1), **kwargs)
    noise = pcr.draw_noise(SHAPE, generator=torch.Generator().manual_seed(1), **kwargs)
    out = pcr.batch_step(model_outputs, torch.arange(steps), samples, noise, **kwargs)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)

    # Any subset of steps, in any order, gives the same rows.
    subset = torch.tensor([steps - 1, 0, steps // 2])
    part = pcr.batch_step(
        model_outputs[subset], subset, samples[subset], None if noise is None else noise[subset], **kwargs
    )
    torch.testing.assert_close(part, ref[subset], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "case", [c for c in CASES if c[0] in (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler)][:2]
)
def test_batch_scale_model_input(case):
    cls, config, steps, _ = case
    base = cls(**config)
    base.set_timesteps(steps)
    pcr = PCRScheduler.from_scheduler(base)
    pcr.set_timesteps(steps)
    samples = torch.randn(steps, *SHAPE)
    ref = []
    for i, t in enumerate(base.timesteps):  # the base scheduler only learns its step index by stepping
        ref.append(base.scale_model_input(samples[i], t))
        base.step(samples[i], t, samples[i])
    ref = torch.stack(ref)
    torch.testing.assert_close(pcr.batch_scale_model_input(samples, torch.arange(steps)), ref)


def test_noise_is_drawn_per_image_from_a_list_of_generators():
    base = DDIMScheduler()
    pcr = PCRScheduler.from_scheduler(base)
    pcr.set_timesteps(10)
    noise = pcr.draw_noise(SHAPE, generator=[torch.Generator().manual_seed(s) for s in (3, 4)], eta=1.0)
    alone = pcr.draw_noise((1, *SHAPE[1:]), generator=torch.Generator().manual_seed(4), eta=1.0)
    torch.testing.assert_close(noise[:, 1:], alone)
    assert pcr.draw_noise(SHAPE, generator=torch.Generator().manual_seed(4), eta=0.0) is None


def test_unsupported_schedulers_and_options_are_refused():
    with pytest.raises(ValueError, match=r"DDIMScheduler.from_config\(pipe.scheduler.config\)"):
        PCRScheduler.from_scheduler(KDPM2DiscreteScheduler())
    pcr = PCRScheduler.from_scheduler(DDPMScheduler(variance_type="fixed_large_log"))
    pcr.set_timesteps(10)  # as a plain scheduler it works like its parent; only the batched step refuses
    with pytest.raises(ValueError, match="variance_type.*fixed_large_log"):
        pcr.batch_step(torch.zeros(1, *SHAPE), torch.tensor([0]), torch.zeros(1, *SHAPE), torch.zeros(1, *SHAPE))
    with pytest.raises(RuntimeError, match="set_timesteps"):  # as DDIMScheduler.step
        PCRScheduler.from_scheduler(DDIMScheduler()).batch_step(
            torch.zeros(1, *SHAPE), torch.tensor([0]), torch.zeros(1, *SHAPE)
        )
    pcr = PCRScheduler.from_scheduler(DDPMScheduler())
    pcr.set_timesteps(10)
    with pytest.raises(ValueError, match="noise"):
        pcr.batch_step(torch.zeros(1, *SHAPE), torch.tensor([0]), torch.zeros(1, *SHAPE))
    with pytest.raises(ValueError, match="model_output"):
        pcr.batch_step(torch.zeros(1, 1, 3, 4, 4), torch.tensor([0]), torch.zeros(1, *SHAPE))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_x0_conversions_invert_each_other_and_match_the_base_prediction(case):
    cls, config, steps, kwargs = case
    pcr = PCRScheduler.from_scheduler(cls(**config))
    pcr.set_timesteps(steps)
    gen = torch.Generator().manual_seed(0)
    samples = torch.randn(steps, *SHAPE, generator=gen, dtype=torch.float64)
    model_outputs = torch.randn(steps, *SHAPE, generator=gen, dtype=torch.float64)
    indices = torch.arange(steps)
    x0 = pcr.batch_predict_x0(model_outputs, indices, samples)
    torch.testing.assert_close(pcr.batch_model_output_from_x0(x0, indices, samples), model_outputs)

    base = cls(**config)
    base.set_timesteps(steps)
    clips = getattr(base.config, "clip_sample", False) or getattr(base.config, "thresholding", False)
    if clips or cls is FlowMatchEulerDiscreteScheduler:  # clipped, or the base step does not return x0
        return
    for i, t in enumerate(base.timesteps):
        if hasattr(base, "scale_model_input"):
            base.scale_model_input(samples[i].float(), t)
        out = base.step(model_outputs[i].float(), t, samples[i].float(), generator=torch.Generator(), **kwargs)
        torch.testing.assert_close(x0[i].float(), out.pred_original_sample, rtol=1e-5, atol=1e-5)


def test_the_twin_keeps_config_values_changed_after_construction():
    base = DDIMScheduler()  # clip_sample=True by default, recorded in `_use_default_values`
    base.register_to_config(clip_sample=False)  # as StableDiffusionPipeline does for SD 1.x checkpoints
    assert PCRScheduler.from_scheduler(base).config.clip_sample is False


@pytest.mark.parametrize("variance_type", ["learned", "learned_range"])
def test_learned_variances_split_the_model_output_as_the_base_step(variance_type):
    base = DDPMScheduler(variance_type=variance_type)
    base.set_timesteps(12)
    pcr = PCRScheduler.from_scheduler(base)
    pcr.set_timesteps(12)
    gen = torch.Generator().manual_seed(0)
    samples = torch.randn(12, *SHAPE, generator=gen)
    channels = SHAPE[1]
    model_outputs = torch.randn(12, SHAPE[0], 2 * channels, *SHAPE[2:], generator=gen)
    if variance_type == "learned":  # the model's variance itself: positive
        model_outputs[:, :, channels:] = model_outputs[:, :, channels:].abs()
    ref = sequential_steps(base, model_outputs, samples, torch.Generator().manual_seed(1))
    noise = pcr.draw_noise(SHAPE, generator=torch.Generator().manual_seed(1))
    out = pcr.batch_step(model_outputs, torch.arange(12), samples, noise)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="twice"):
        pcr.batch_step(samples, torch.arange(12), samples, noise)
