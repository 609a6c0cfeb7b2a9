"""PCRDiTPipeline against diffusers' DiTPipeline on tiny random components (float64): the same images for the same
seed, with and without guidance, with and without a learned variance, over the schedulers DiT runs with."""

import numpy as np
import pytest
import torch
from conftest import _seeded, _tiny_vae
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from pcr_diffusers import load_guided_digits_pipeline
from pcr_diffusers.pipelines import PCRAutoPipeline, PCRDiTPipeline

STEPS = 10
TOLERANCE = 1e-7
SCHEDULERS = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "dpm++2m": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
}


def dit_pipeline(scheduler="ddim", learned_variance=False) -> DiTPipeline:
    """A DiT on 8x8x4 latents (patches of 2) with DiTPipeline's 1000 classes + the null class, and a tiny VAE."""
    modules = _seeded(
        torch.float64,
        transformer=lambda: DiTTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=8 if learned_variance else 4,
            num_layers=2,
            sample_size=8,
            patch_size=2,
            num_embeds_ada_norm=1000,
            norm_num_groups=4,
        ),
        vae=_tiny_vae,
    )
    pipe = DiTPipeline(scheduler=SCHEDULERS[scheduler](), **modules)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, seed=0, **kwargs):
    torch.manual_seed(seed)  # the scheduler steps draw from the global RNG
    kwargs = {"class_labels": [3, 7], "num_inference_steps": STEPS, "output_type": "pt", **kwargs}
    return pipe(generator=torch.Generator().manual_seed(seed), **kwargs)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("guidance_scale", [1.0, 4.0], ids=["no-cfg", "cfg"])
@pytest.mark.parametrize("learned_variance", [False, True], ids=["eps", "learned-variance"])
def test_matches_the_parent(scheduler, guidance_scale, learned_variance):
    pipe = dit_pipeline(scheduler, learned_variance)
    expected = sample(pipe, guidance_scale=guidance_scale).images
    pcr = PCRDiTPipeline.from_pipe(pipe)
    out = sample(pcr, guidance_scale=guidance_scale, parallel=4, tolerance=TOLERANCE)
    assert out.stats.converged
    torch.testing.assert_close(out.images, expected, rtol=0, atol=1e-6)


def test_latents_match_before_the_vae():
    """The images pass through a random VAE, which could hide differences: compare the latents it decodes."""
    pipe = dit_pipeline("ddpm")
    decoded = []
    pipe.vae.decode = lambda latents, decode=pipe.vae.decode: decoded.append(latents.clone()) or decode(latents)
    sample(pipe, guidance_scale=4.0, class_labels=[1])
    sample(PCRDiTPipeline.from_pipe(pipe), guidance_scale=4.0, class_labels=[1], tolerance=TOLERANCE, parallel=3)
    expected, ours = decoded
    assert (ours - expected).abs().max() <= 1e-6 * expected.abs().max()


def test_auto_pipeline_and_save_reload(tmp_path):
    pipe = dit_pipeline()
    pcr = PCRAutoPipeline.from_pipe(pipe)
    assert type(pcr) is PCRDiTPipeline
    pcr.save_pretrained(tmp_path)
    loaded = PCRAutoPipeline.from_pretrained(tmp_path, torch_dtype=torch.float64)
    parent = DiffusionPipeline.from_pretrained(tmp_path, torch_dtype=torch.float64)
    assert type(loaded) is PCRDiTPipeline and type(parent) is DiTPipeline
    loaded.set_progress_bar_config(disable=True)
    (images,) = sample(loaded, output_type="np", return_dict=False)  # the parent's tuple
    np.testing.assert_allclose(images, sample(pipe, output_type="np").images, atol=1e-6)
    assert loaded.stats.converged


def test_a_scheduler_that_scales_the_input_fails_before_any_model_call(monkeypatch):
    pcr = PCRDiTPipeline.from_pipe(dit_pipeline())
    pcr.scheduler = EulerDiscreteScheduler.from_config(pcr.scheduler.config)
    monkeypatch.setattr(pcr.transformer, "forward", lambda *args, **kwargs: pytest.fail("transformer called"))
    with pytest.raises(ValueError, match="do not scale the model input"):
        sample(pcr)


@pytest.mark.parametrize("scheduler, steps", [("ddim", 20), ("ddpm", 40)])
def test_the_shipped_guided_model_in_parallel_matches_the_parent(scheduler, steps):
    """On trained weights a guided chain converges in a fraction of its steps (random weights do not show it)."""
    pipe = load_guided_digits_pipeline(scheduler)
    pipe.set_progress_bar_config(disable=True)
    pcr = PCRDiTPipeline.from_pipe(pipe)
    pcr.set_progress_bar_config(disable=True)
    kwargs = dict(class_labels=[3, 7], guidance_scale=4.0, num_inference_steps=steps, output_type="np")
    expected = sample(pipe, **kwargs).images
    out = sample(pcr, **kwargs, parallel=steps)
    assert out.stats.converged and out.stats.rounds <= steps // 2
    assert np.abs(out.images - expected).max() <= 1e-3
