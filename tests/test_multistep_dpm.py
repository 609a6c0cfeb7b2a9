"""The DPM-Solver(++) twin against diffusers' own loop: its sequential chain bit for bit, the parallel solve within
its tolerance, with the history crossing window boundaries and chains that start mid-schedule."""

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from pcr_diffusers.sampling import DenoisingChain, denoise_parallel, denoise_sequential
from pcr_diffusers.schedulers import PCRScheduler

SHAPE = (2, 3, 4, 4)
CASES = [  # (config, steps)
    ({}, 20),
    ({}, 1),
    ({}, 2),
    ({"solver_order": 3}, 17),
    ({"solver_order": 1}, 7),
    ({"algorithm_type": "sde-dpmsolver++"}, 15),
    ({"algorithm_type": "sde-dpmsolver++", "solver_order": 3}, 9),
    ({"use_karras_sigmas": True, "lower_order_final": True}, 9),
    ({"use_exponential_sigmas": True}, 12),
    ({"use_beta_sigmas": True, "solver_type": "heun"}, 12),
    ({"algorithm_type": "dpmsolver", "solver_order": 3, "final_sigmas_type": "sigma_min"}, 25),
    ({"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"}, 11),
    ({"prediction_type": "v_prediction", "thresholding": True}, 11),
    ({"prediction_type": "sample", "euler_at_final": True}, 10),
    ({"prediction_type": "flow_prediction", "use_flow_sigmas": True}, 13),
    ({"lower_order_final": False, "final_sigmas_type": "sigma_min", "solver_order": 3}, 20),
]


def case_id(case):
    config, steps = case
    return f"{steps}-" + "-".join(f"{k}={v}" for k, v in config.items())


def toy(x, t):
    """A smooth, batch-independent model: batched and single calls agree bit for bit."""
    return torch.tanh(0.7 * x + t.reshape(-1, 1, 1, 1).to(x.dtype) / 1000) * 0.9


def diffusers_loop(config, steps, x, seed, start=0):
    scheduler = DPMSolverMultistepScheduler(**config)
    scheduler.set_timesteps(steps)
    if start:
        scheduler.set_begin_index(start)
    generator = torch.Generator().manual_seed(seed)
    for t in scheduler.timesteps[start:]:
        x = scheduler.step(toy(scheduler.scale_model_input(x, t), t.reshape(1)), t, x, generator=generator).prev_sample
    return x


def twin_chain(config, steps, dtype, seed, start=0):
    twin = PCRScheduler.from_scheduler(DPMSolverMultistepScheduler(**config))
    twin.set_timesteps(steps)
    chain_steps = range(start, len(twin.timesteps))
    noise = twin.draw_noise(SHAPE, torch.Generator().manual_seed(seed), dtype=dtype, steps=chain_steps)
    return DenoisingChain(toy, twin, noise, process_group=False, steps=chain_steps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_the_sequential_chain_is_diffusers_loop_bit_for_bit(case, dtype):
    config, steps = case
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=dtype)
    ours, _ = denoise_sequential(twin_chain(config, steps, dtype, seed=1), x)
    assert torch.equal(ours, diffusers_loop(config, steps, x, seed=1))


@pytest.mark.parametrize("window", [3, 5, 64])
@pytest.mark.parametrize("case", CASES[::2], ids=case_id)
def test_the_parallel_solve_matches_diffusers_loop(case, window):
    config, steps = case
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    chain = twin_chain(config, steps, torch.float64, seed=1)
    ours, stats = denoise_parallel(chain, x, parallel=window, tolerance=1e-9)
    ref = diffusers_loop(config, steps, x, seed=1)
    assert stats.converged
    assert (ours - ref).abs().max() <= 1e-6 * ref.abs().max()


@pytest.mark.parametrize("start", [1, 4])
@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[5]], ids=case_id)
def test_a_chain_that_starts_mid_schedule_matches_set_begin_index(case, start):
    """img2img: the base counts its warm-up from its first call, at the begin index."""
    config, steps = case
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    ours, _ = denoise_sequential(twin_chain(config, steps, torch.float32, seed=1, start=start), x)
    assert torch.equal(ours, diffusers_loop(config, steps, x, seed=1, start=start))
    parallel, stats = denoise_parallel(
        twin_chain(config, steps, torch.float32, seed=1, start=start), x, parallel=4, tolerance=1e-5
    )
    assert stats.converged and (parallel - ours).abs().max() <= 1e-4 * ours.abs().max()


@pytest.mark.parametrize(
    "config, match",
    [
        ({"algorithm_type": "sde-dpmsolver", "solver_order": 3, "final_sigmas_type": "sigma_min"}, "solver_order"),
        ({"variance_type": "learned_range"}, "variance_type"),
    ],
)
def test_configurations_the_batched_step_cannot_follow_are_refused(config, match):
    twin = PCRScheduler.from_scheduler(DPMSolverMultistepScheduler(**config))
    twin.set_timesteps(10)  # a plain scheduler still
    with pytest.raises(ValueError, match=match):
        twin.host_table()
