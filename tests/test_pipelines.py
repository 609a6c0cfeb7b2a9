import copy
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiffusionPipeline,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    KDPM2DiscreteScheduler,
)
from diffusers.utils.torch_utils import randn_tensor

from pcr_diffusers.pipelines import PCRDDIMPipeline, PCRDDPMPipeline

PIPELINE_DIR = Path(__file__).resolve().parents[1] / "pipelines"
TIGHT = dict(tolerance=1e-6, output_type="np")


def generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@torch.no_grad()
def diffusers_loop(unet, scheduler, batch_size, generator, steps):
    """The sampling loop diffusers' pipelines run, for schedulers that DDPMPipeline does not drive correctly."""
    scheduler.set_timesteps(steps)
    shape = (batch_size, 1, 8, 8)
    latents = randn_tensor(shape, generator=generator, dtype=unet.dtype) * getattr(scheduler, "init_noise_sigma", 1.0)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
        latents = scheduler.step(unet(model_input, t).sample, t, latents, generator=generator).prev_sample
    return (latents / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("jacobian", ["auto", "identity", "scheduler", "secant"])
@pytest.mark.parametrize("seeds", [(0,), (1, 2)])
def test_ddpm_matches_the_sequential_pipeline(tiny_unet, jacobian, seeds):
    pipe = DDPMPipeline(tiny_unet, DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(batch_size=len(seeds), num_inference_steps=31)
    gen = generators(seeds) if len(seeds) > 1 else generators(seeds)[0]
    ref = pipe(generator=gen, output_type="np", **kwargs).images
    pcr = PCRDDPMPipeline.from_pipe(pipe)
    gen = generators(seeds) if len(seeds) > 1 else generators(seeds)[0]
    out = pcr(generator=gen, jacobian=jacobian, parallel=16, **kwargs, **TIGHT)
    assert out.stats.converged and out.stats.rounds < 31
    assert np.abs(out.images - ref).max() <= 1e-4


@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("seeds", [(0,), (3, 4)])
def test_ddim_matches_the_sequential_pipeline(tiny_unet, eta, seeds):
    pipe = DDIMPipeline(tiny_unet, DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(batch_size=len(seeds), num_inference_steps=25, eta=eta)
    ref = pipe(generator=generators(seeds), output_type="np", **kwargs).images
    out = PCRDDIMPipeline.from_pipe(pipe)(generator=generators(seeds), **kwargs, **TIGHT)
    assert out.stats.converged and out.stats.model_evaluations >= 25
    assert np.abs(out.images - ref).max() <= 1e-4


@pytest.mark.parametrize(
    "scheduler",
    [
        EulerDiscreteScheduler(),
        EulerAncestralDiscreteScheduler(),
        FlowMatchEulerDiscreteScheduler(),
        FlowMatchEulerDiscreteScheduler(stochastic_sampling=True),
    ],
    ids=["euler", "euler-ancestral", "flow-match", "flow-match-stochastic"],
)
def test_other_schedulers_match_the_diffusers_loop(tiny_unet, scheduler):
    ref = diffusers_loop(tiny_unet, scheduler, 2, torch.Generator().manual_seed(5), 20)
    pcr = PCRDDPMPipeline(tiny_unet, scheduler)
    pcr.set_progress_bar_config(disable=True)
    out = pcr(batch_size=2, generator=torch.Generator().manual_seed(5), num_inference_steps=20, **TIGHT)
    assert out.stats.converged
    assert np.abs(out.images - ref).max() <= 1e-4


def test_parallel_one_is_the_sequential_loop(tiny_unet):
    pipe = DDPMPipeline(tiny_unet, DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=10, output_type="np").images
    out = PCRDDPMPipeline.from_pipe(pipe)(
        generator=torch.Generator().manual_seed(0), num_inference_steps=10, output_type="np", parallel=1
    )
    assert out.stats.rounds == 10 and out.stats.model_evaluations == 10
    np.testing.assert_array_equal(out.images, ref)


def test_default_tolerance_is_close_and_output_types(tiny_unet):
    pipe = DDIMPipeline(tiny_unet, DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=20, output_type="np").images
    pcr = PCRDDIMPipeline.from_pipe(pipe)
    out = pcr(generator=torch.Generator().manual_seed(0), num_inference_steps=20, output_type="np")
    assert np.abs(out.images - ref).max() <= 1e-2
    (images,) = pcr(generator=torch.Generator().manual_seed(0), num_inference_steps=20, return_dict=False)
    assert images[0].size == (8, 8) and pcr.stats.converged  # the parent's tuple; the statistics on the pipeline
    for output_type in ("numpy", None):  # DDIMPipeline returns numpy for anything but "pil" and "pt"
        ours = pcr(generator=torch.Generator().manual_seed(0), num_inference_steps=20, output_type=output_type)
        theirs = pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=20, output_type=output_type)
        assert type(ours.images) is type(theirs.images) is np.ndarray and ours.images.shape == (1, 8, 8, 1)
        assert type(ours) is type(theirs) and ours.keys() == theirs.keys() and ours.stats is pcr.stats
    pt = pcr(generator=torch.Generator().manual_seed(0), num_inference_steps=20, output_type="pt").images
    assert pt.shape == (1, 1, 8, 8) and 0 <= pt.min() and pt.max() <= 1


def test_max_rounds_finishes_sequentially_and_warns(tiny_unet, caplog):
    pipe = DDPMPipeline(tiny_unet, DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=30, output_type="np").images
    pcr = PCRDDPMPipeline.from_pipe(pipe)
    with caplog.at_level(logging.WARNING, logger="pcr_diffusers"):
        out = pcr(generator=torch.Generator().manual_seed(0), num_inference_steps=30, max_rounds=2, **TIGHT)
    assert not out.stats.converged and out.stats.sequential_steps > 0
    assert out.stats.rounds == 2 + out.stats.sequential_steps
    assert len(out.stats.residuals) == 2
    assert sum("sequentially" in r.message for r in caplog.records) == 1
    assert np.abs(out.images - ref).max() <= 1e-4


def test_custom_pipeline_loading(tiny_unet, tmp_path):
    DDPMPipeline(tiny_unet, DDPMScheduler()).save_pretrained(tmp_path)
    for name, cls in [("pipeline_pcr_ddpm.py", "PCRDDPMPipeline"), ("pipeline_pcr_ddim.py", "PCRDDIMPipeline")]:
        pipe = DiffusionPipeline.from_pretrained(
            tmp_path, custom_pipeline=str(PIPELINE_DIR / name), trust_remote_code=True
        )
        pipe.set_progress_bar_config(disable=True)
        assert type(pipe).__name__ == cls
        out = pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=5, output_type="np")
        assert out.images.shape == (1, 8, 8, 1) and out.stats.converged


class _NoCalls(torch.nn.Module):
    """Stands in for the UNet and fails the test if the pipeline calls it."""

    def __init__(self, unet):
        super().__init__()
        self.config = unet.config
        self.dtype = unet.dtype

    def forward(self, *args, **kwargs):
        raise AssertionError("the model was called before the input was checked")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"parallel": 0}, "parallel"),
        ({"tolerance": 0.0}, "tolerance"),
        ({"tolerance": -1}, "tolerance"),
        ({"jacobian": "newton"}, "jacobian"),
        ({"max_rounds": 0}, "max_rounds"),
        ({"batch_size": 2, "generator": [torch.Generator()]}, "generators"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"generator": "abc"}, "generator"),
        ({"max_memory": float("inf")}, "max_memory"),
        ({"tolerance": float("inf")}, "tolerance"),
        ({"scheduler": DDPMScheduler(variance_type="fixed_large_log")}, "variance_type"),
    ],
)
def test_bad_input_fails_before_any_model_call(tiny_unet, kwargs, match):
    kwargs = dict(kwargs)
    pcr = PCRDDPMPipeline(_NoCalls(tiny_unet), kwargs.pop("scheduler", DDPMScheduler()))
    with pytest.raises((ValueError, TypeError), match=match):
        pcr(**kwargs)


def test_unsupported_scheduler_names_the_conversion(tiny_unet):
    pcr = PCRDDPMPipeline(_NoCalls(tiny_unet), KDPM2DiscreteScheduler())
    with pytest.raises(ValueError, match="from_config"):
        pcr(num_inference_steps=10)


def test_a_tolerance_below_the_model_precision_warns_and_the_window_used_is_reported(tiny_unet, caplog):
    pcr = PCRDDPMPipeline(copy.deepcopy(tiny_unet).float(), DDPMScheduler())
    pcr.set_progress_bar_config(disable=True)
    with caplog.at_level(logging.WARNING, logger="pcr_diffusers"):
        out = pcr(num_inference_steps=4, tolerance=1e-12, parallel=10**9, output_type="np")
    assert sum("below a tenth of the model's torch.float32 precision" in r.message for r in caplog.records) == 1
    assert out.stats.window == 4 and out.stats.converged


def test_a_compiled_model_is_called_with_one_shape(tiny_unet):
    """With a `torch.compile`d UNet every round calls it on window x batch rows, also where the window runs past the
    last step, so it compiles once (and CUDA graphs capture one call); the result is that of the eager model."""
    pipe = DDPMPipeline(tiny_unet, DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    eager = PCRDDPMPipeline.from_pipe(pipe)(
        batch_size=2, generator=generators([0, 1]), num_inference_steps=11, parallel=4, **TIGHT
    )
    rows = []
    hook = tiny_unet.register_forward_pre_hook(lambda module, args: rows.append(len(args[0])))
    try:
        compiled = PCRDDPMPipeline(torch.compile(tiny_unet, backend="eager"), DDPMScheduler())
        compiled.set_progress_bar_config(disable=True)
        out = compiled(batch_size=2, generator=generators([0, 1]), num_inference_steps=11, parallel=4, **TIGHT)
    finally:
        hook.remove()
    assert set(rows) == {4 * 2} and out.stats.converged
    np.testing.assert_allclose(out.images, eager.images, atol=1e-7)
