"""GPU-readiness on a CPU-only machine: no tensors of two devices meet (every round's work runs on the `meta` device,
whose tensors cannot be mixed with the CPU's, as CUDA's cannot), and a parallel round reads device values on the host
at most twice and copies nothing from the host."""

import tempfile

import pytest
import torch
from conftest import (
    tiny_stable_diffusion_3_components,
    tiny_stable_diffusion_components,
    tiny_stable_diffusion_xl_components,
    tiny_unet2d,
)
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler
from test_schedulers import CASES, SHAPE, case_id

from pcr_diffusers import load_digits_pipeline
from pcr_diffusers.core import pcr_solve
from pcr_diffusers.diagnostics import HostTraffic
from pcr_diffusers.pipelines import (
    PCRDDIMPipeline,
    PCRDDPMPipeline,
    PCRStableDiffusion3Pipeline,
    PCRStableDiffusionPipeline,
    PCRStableDiffusionXLPipeline,
)
from pcr_diffusers.sampling import DIFFUSION_JACOBIANS, DenoisingChain, denoise_parallel
from pcr_diffusers.schedulers import PCRScheduler

META = torch.device("meta")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_scheduler_twins_work_on_device_tensors(case):
    """Timesteps set on the CPU (as diffusers computes them), every batched operation on `meta` tensors."""
    cls, config, steps, kwargs = case
    scheduler = PCRScheduler.from_scheduler(cls(**config))
    scheduler.set_timesteps(steps)
    indices = torch.arange(steps, device=META)
    sample = torch.empty(steps, *SHAPE, device=META)
    noise = scheduler.draw_noise(SHAPE, torch.Generator().manual_seed(0), META, **kwargs)
    assert noise is None or noise.device == META
    for out in (
        scheduler.batch_step(sample, indices, sample, noise, **kwargs),
        scheduler.batch_scale_model_input(sample, indices),
        scheduler.batch_predict_x0(sample, indices, sample),
        scheduler.batch_model_output_from_x0(sample, indices, sample),
        scheduler.batch_timesteps(indices),
        scheduler.state_scale(indices),
    ):
        assert out.device == META


@pytest.mark.parametrize("jacobian", DIFFUSION_JACOBIANS)
@pytest.mark.parametrize(
    "scheduler",
    [
        DDPMScheduler(),
        DDIMScheduler(),
        EulerAncestralDiscreteScheduler(),
        DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=3),
    ],
    ids=lambda s: type(s).__name__,
)
def test_a_round_of_the_chain_works_on_device_tensors(scheduler, jacobian):
    """What a parallel round does besides reading its one summary: the batched model call and step, the Jacobian,
    the predictor for entering steps and the linear solve."""
    unet = tiny_unet2d().to(META)
    twin = PCRScheduler.from_scheduler(scheduler)
    twin.set_timesteps(10)
    noise = twin.draw_noise((2, 1, 8, 8), torch.Generator().manual_seed(0), META)
    chain = DenoisingChain(lambda x, t: unet(x, t).sample, twin, noise, process_group=False)
    ls = torch.arange(2, 6, device=META)
    x = torch.empty(4, 2, 1, 8, 8, device=META)
    approximation = DIFFUSION_JACOBIANS[jacobian]()
    approximation.reset(10, x[0])
    fx, A = approximation.evaluate(chain, ls, x)
    update = pcr_solve(A, fx - x, torch.zeros_like(x[0]), check_finite=False)
    entering = chain.extend(torch.arange(6, 9, device=META), update[-1])
    assert {fx.device, A.device, update.device, entering.device} == {META}


def meta_pipelines():
    directory = tempfile.mkdtemp()
    yield PCRDDPMPipeline(tiny_unet2d(), DDPMScheduler()), {}
    yield PCRDDIMPipeline(tiny_unet2d(), DDIMScheduler()), {"eta": 0.5}
    for cls, components in [
        (PCRStableDiffusionPipeline, tiny_stable_diffusion_components),
        (PCRStableDiffusionXLPipeline, tiny_stable_diffusion_xl_components),
        (PCRStableDiffusion3Pipeline, tiny_stable_diffusion_3_components),
    ]:
        yield cls(**components(directory)), {"prompt": ["a cat", "a dog"], "guidance_scale": 7.5}


def test_pipelines_run_on_the_device_of_their_models():
    """Each pipeline on `meta` models, through the sequential twin of the loop (the parallel one reads one summary
    value per round, which `meta` tensors do not have): timesteps, tables, noise and latents all meet there."""
    for pipe, kwargs in meta_pipelines():
        pipe = pipe.to(META)
        pipe.set_progress_bar_config(disable=True)
        output_type = "latent" if "prompt" in kwargs else "pt"
        out = pipe(num_inference_steps=4, output_type=output_type, parallel=1, **kwargs)
        assert out.images.device == META, type(pipe).__name__


@pytest.mark.parametrize("jacobian", ["auto", "identity"])
def test_a_parallel_round_reads_the_host_once(jacobian):
    """DDPM-100 at window 16 on the shipped model: at most 2 host reads per round (the round's summary, and with
    sharding the processes' input check), no copies from the host; everything else is set up once."""
    pipe = load_digits_pipeline()
    twin = PCRScheduler.from_scheduler(pipe.scheduler)
    twin.set_timesteps(100)
    latents = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = twin.draw_noise((1, 1, 8, 8), torch.Generator().manual_seed(0))
    chain = DenoisingChain(lambda x, t: pipe.unet(x, t).sample, twin, noise, process_group=False)
    twin.step_table("cpu")  # the per-sampling setup (tables built once per set_timesteps and device)
    with torch.no_grad(), HostTraffic() as counted:
        _, stats = denoise_parallel(chain, latents, parallel=16, jacobian=jacobian)
    with torch.no_grad(), HostTraffic() as setup:  # the same call, stopped after its first round
        denoise_parallel(chain, latents, parallel=16, jacobian=jacobian, max_rounds=1)
    rounds = stats.rounds
    per_round = (counted.reads - setup.reads) / (rounds - 1)
    assert stats.converged and rounds > 5
    assert per_round <= 1, (counted.reads, setup.reads, rounds)
    assert counted.copies == setup.copies, (counted.copies, setup.copies)
