"""The PNDM and LMS twins against diffusers' own loops: their sequential chains bit for bit, the parallel solve
within its tolerance with the history crossing window boundaries, chains that start mid-schedule, and the
configurations they refuse."""

import pytest
import torch
from diffusers import LMSDiscreteScheduler, PNDMScheduler

from pcr_diffusers.sampling import DenoisingChain, denoise_parallel, denoise_sequential
from pcr_diffusers.schedulers import PCR_SCHEDULERS, PCRScheduler
from pcr_diffusers.schedulers.scheduling_pcr import StepHistory

SHAPE = (2, 3, 4, 4)
SD15 = dict(  # Stable Diffusion 1.5's scheduler_config.json
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    skip_prk_steps=True,
    set_alpha_to_one=False,
    steps_offset=1,
)
CASES = [  # (scheduler, config, steps, step_kwargs)
    (PNDMScheduler, SD15, 25, {}),
    (PNDMScheduler, SD15, 7, {}),
    (PNDMScheduler, SD15, 1, {}),
    (PNDMScheduler, {"skip_prk_steps": True}, 2, {}),
    (PNDMScheduler, {"skip_prk_steps": True}, 3, {}),
    (PNDMScheduler, {"skip_prk_steps": True, "timestep_spacing": "trailing"}, 20, {}),
    (PNDMScheduler, {**SD15, "prediction_type": "v_prediction", "timestep_spacing": "linspace"}, 7, {}),
    (PNDMScheduler, {"skip_prk_steps": True, "set_alpha_to_one": True, "beta_schedule": "squaredcos_cap_v2"}, 9, {}),
    (PNDMScheduler, {}, 4, {}),  # the PRK warm-up: 12 calls, then PLMS
    (PNDMScheduler, {}, 20, {}),
    (PNDMScheduler, {**SD15, "skip_prk_steps": False, "prediction_type": "v_prediction"}, 7, {}),
    (LMSDiscreteScheduler, {}, 20, {}),
    (LMSDiscreteScheduler, {}, 1, {}),
    (LMSDiscreteScheduler, {}, 2, {}),
    (LMSDiscreteScheduler, {}, 3, {}),
    (LMSDiscreteScheduler, {"use_karras_sigmas": True, "beta_schedule": "scaled_linear"}, 7, {}),
    (LMSDiscreteScheduler, {"use_exponential_sigmas": True}, 8, {"order": 2}),
    (LMSDiscreteScheduler, {"use_beta_sigmas": True, "prediction_type": "v_prediction"}, 6, {}),
    (LMSDiscreteScheduler, {"prediction_type": "sample", "timestep_spacing": "trailing"}, 7, {"order": 3}),
    (LMSDiscreteScheduler, {"timestep_spacing": "leading", "steps_offset": 1}, 25, {"order": 1}),
]


def case_id(case):
    scheduler, config, steps, kwargs = case
    sd = SD15.items() <= config.items()
    options = [f"{k}={v}" for k, v in {**config, **kwargs}.items() if not (sd and SD15.get(k) == v)]
    return "-".join([scheduler.__name__[:4], str(steps), *(["SD1.5"] if sd else []), *options])


def toy(x, t):
    """A smooth, batch-independent model: batched and single calls agree bit for bit."""
    return torch.tanh(0.7 * x + t.reshape(-1, 1, 1, 1).to(x.dtype) / 1000) * 0.9


def diffusers_loop(scheduler, config, steps, kwargs, x, start=0):
    """diffusers' loop, one `step` per entry of `timesteps` (PNDM's repeated one too); a chain starting at `start`
    after `set_begin_index(start)` where the scheduler has one (PNDM counts its warm-up from its first call)."""
    scheduler = scheduler(**config)
    scheduler.set_timesteps(steps)
    if start and hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    for t in scheduler.timesteps[start:]:
        x = scheduler.step(toy(scheduler.scale_model_input(x, t), t.reshape(1)), t, x, **kwargs).prev_sample
    return x


def twin_chain(scheduler, config, steps, kwargs, start=0):
    twin = PCRScheduler.from_scheduler(scheduler(**config))
    twin.set_timesteps(steps)
    return DenoisingChain(toy, twin, step_kwargs=kwargs, process_group=False, steps=range(start, len(twin.timesteps)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_the_sequential_chain_is_diffusers_loop_bit_for_bit(case, dtype):
    scheduler, config, steps, kwargs = case
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=dtype)
    chain = twin_chain(scheduler, config, steps, kwargs)
    ours, _ = denoise_sequential(chain, x)
    assert len(chain) == len(chain.scheduler.timesteps)  # PNDM: one chain step per model call
    assert torch.equal(ours, diffusers_loop(scheduler, config, steps, kwargs, x))


@pytest.mark.parametrize("window", [3, 5])
@pytest.mark.parametrize("case", [CASES[i] for i in (0, 5, 6, 9, 10, 11, 15, 18)], ids=case_id)
def test_the_parallel_solve_matches_diffusers_loop(case, window):
    scheduler, config, steps, kwargs = case
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours, stats = denoise_parallel(twin_chain(scheduler, config, steps, kwargs), x, parallel=window, tolerance=1e-7)
    ref = diffusers_loop(scheduler, config, steps, kwargs, x)
    assert stats.converged and stats.sequential_steps == 0
    assert (ours - ref).abs().max() <= 1e-6 * ref.abs().max()


@pytest.mark.parametrize("start", [1, 2, 5])
@pytest.mark.parametrize("case", [CASES[0], CASES[9], CASES[11], CASES[18]], ids=case_id)
def test_a_chain_that_starts_mid_schedule_matches_diffusers_loop(case, start):
    """img2img: LMS's order counts from the schedule's start and its derivatives from the chain's (after
    `set_begin_index`); PNDM has no begin index and counts its warm-up from its first call."""
    scheduler, config, steps, kwargs = case
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    ours, _ = denoise_sequential(twin_chain(scheduler, config, steps, kwargs, start=start), x)
    assert torch.equal(ours, diffusers_loop(scheduler, config, steps, kwargs, x, start=start))
    chain = twin_chain(scheduler, config, steps, kwargs, start=start)
    parallel, stats = denoise_parallel(chain, x.double(), parallel=4, tolerance=1e-7)
    ref = diffusers_loop(scheduler, config, steps, kwargs, x.double(), start=start)
    assert stats.converged and (parallel - ref).abs().max() <= 1e-6 * ref.abs().max()


@pytest.mark.parametrize(
    "scheduler, config, kwargs, match",
    [
        (PNDMScheduler, {"prediction_type": "sample"}, {}, "prediction_type"),
        (PNDMScheduler, {"num_train_timesteps": 10, "steps_offset": 1, "skip_prk_steps": True}, {}, "num_train"),
        (LMSDiscreteScheduler, {"prediction_type": "flow_prediction"}, {}, "prediction_type"),
        (LMSDiscreteScheduler, {}, {"order": 5}, "order"),
        (LMSDiscreteScheduler, {}, {"order": 0}, "order"),
        (LMSDiscreteScheduler, {}, {"order": 2.0}, "order"),
    ],
)
def test_configurations_the_batched_step_cannot_follow_are_refused(scheduler, config, kwargs, match):
    twin = PCRScheduler.from_scheduler(scheduler(**config))
    twin.set_timesteps(10)  # a plain scheduler still (PNDM's step fails on a timestep of 10 too)
    with pytest.raises(ValueError, match=match):
        DenoisingChain(toy, twin, step_kwargs=kwargs, process_group=False)


def test_pndm_steps_need_set_timesteps_as_its_step_does():
    with pytest.raises(RuntimeError, match="set_timesteps"):
        PCRScheduler.from_scheduler(PNDMScheduler()).host_table()


@pytest.mark.parametrize("scheduler", [PNDMScheduler, LMSDiscreteScheduler], ids=lambda c: c.__name__)
def test_the_twins_are_registered_and_plain_schedulers_otherwise(scheduler):
    config = {key: value for key, value in SD15.items() if key in scheduler().config}
    twin, parent = PCR_SCHEDULERS[scheduler](**config), scheduler(**config)
    for s in (parent, twin):
        s.set_timesteps(6)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    a, b = x, x
    for t in parent.timesteps:
        a = parent.step(toy(parent.scale_model_input(a, t), t.reshape(1)), t, a).prev_sample
        b = twin.step(toy(twin.scale_model_input(b, t), t.reshape(1)), t, b).prev_sample
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "scheduler, config",
    [(PNDMScheduler, SD15), (PNDMScheduler, {}), (LMSDiscreteScheduler, {})],
    ids=["PNDM-SD1.5", "PNDM-prk", "LMS"],
)
def test_batched_steps_run_on_device_tensors(scheduler, config):
    """Every batched operation on `meta` tensors (which cannot meet CPU tensors, as CUDA's cannot)."""
    meta = torch.device("meta")
    twin = PCRScheduler.from_scheduler(scheduler(**config))
    twin.set_timesteps(8)
    n, k = len(twin.timesteps), twin.history_size
    indices = torch.arange(n, device=meta)
    sample = torch.empty(n, *SHAPE, device=meta)
    history = StepHistory(torch.empty(n, k, *SHAPE, device=meta), torch.empty(n, k, *SHAPE, device=meta))
    for start in (0, 3):
        assert twin.batch_step(sample, indices, sample, history=history, start=start).device == meta
    assert twin.batch_convert_model_output(sample, indices, sample).device == meta
    assert twin.batch_predict_x0(sample, indices, sample).device == meta
    assert twin.batch_model_output_from_x0(sample, indices, sample).device == meta
    assert twin.batch_scale_model_input(sample, indices).device == meta
