"""The UniPC and DEIS twins against diffusers' own loops: DEIS's sequential chain bit for bit, UniPC's within the
rounding of its eliminated corrector (bit for bit where no step corrects), the parallel solve within its tolerance
with the history crossing window boundaries, chains that start mid-schedule, and the configurations refused."""

import inspect

import pytest
import torch
from diffusers import DDIMScheduler, DEISMultistepScheduler, UniPCMultistepScheduler

from pcr_diffusers.sampling import DenoisingChain, denoise_parallel, denoise_sequential
from pcr_diffusers.schedulers import PCR_SCHEDULERS, PCRScheduler

SHAPE = (2, 3, 4, 4)
STEPS = (1, 2, 3, 7, 20, 25)
UNIPC_CASES = [  # (config, steps)
    *[({}, steps) for steps in STEPS],
    ({"solver_order": 3}, 25),
    ({"solver_order": 3, "final_sigmas_type": "sigma_min", "lower_order_final": False}, 20),
    ({"solver_order": 1}, 7),
    ({"solver_order": 4}, 20),
    ({"solver_type": "bh1", "final_sigmas_type": "sigma_min", "solver_order": 3}, 7),
    ({"predict_x0": False, "final_sigmas_type": "sigma_min"}, 20),
    ({"predict_x0": False, "solver_type": "bh1", "final_sigmas_type": "sigma_min", "solver_order": 3}, 25),
    ({"disable_corrector": [0, 3, 4]}, 7),
    ({"use_karras_sigmas": True, "prediction_type": "v_prediction"}, 20),
    ({"use_exponential_sigmas": True, "final_sigmas_type": "sigma_min", "solver_order": 3}, 3),
    ({"use_beta_sigmas": True, "prediction_type": "sample", "thresholding": True}, 7),
    ({"thresholding": True, "sample_max_value": 1.5, "solver_order": 3}, 20),
    ({"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0}, 25),
    ({"predict_x0": False, "prediction_type": "v_prediction", "final_sigmas_type": "sigma_min"}, 7),
]
DEIS_CASES = [
    *[({}, steps) for steps in STEPS],
    ({"solver_order": 3}, 25),
    ({"solver_order": 3, "lower_order_final": False}, 7),
    ({"solver_order": 1}, 7),
    ({"solver_order": 4}, 20),
    ({"use_karras_sigmas": True, "solver_order": 3}, 20),
    ({"use_exponential_sigmas": True}, 3),
    ({"use_beta_sigmas": True, "prediction_type": "v_prediction"}, 7),
    ({"prediction_type": "sample", "thresholding": True, "solver_order": 3}, 20),
    ({"thresholding": True, "sample_max_value": 1.5}, 25),
    ({"use_flow_sigmas": True, "prediction_type": "flow_prediction", "solver_order": 3}, 25),
    ({"prediction_type": "flow_prediction"}, 7),  # the base divides by the raw sigma
    ({"beta_schedule": "scaled_linear", "timestep_spacing": "trailing"}, 20),
]
CASES = [(UniPCMultistepScheduler, *case) for case in UNIPC_CASES] + [
    (DEISMultistepScheduler, *case) for case in DEIS_CASES
]
# UniPC's corrected sample is rebuilt from the predicted one: equal up to rounding (measured over this grid at most
# 2.4e-15 of the largest sample in float64 and 5.8e-7 in float32; 2e-14 and 4e-6 over a wider one).
ROUNDING = {torch.float64: 1e-12, torch.float32: 1e-5}
pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning")  # diffusers' DEIS step (numpy 2)


def case_id(case):
    cls, config, steps = case
    return f"{cls.__name__[:5]}-{steps}-" + "-".join(f"{k}={v}" for k, v in config.items())


def toy(x, t):
    """A smooth, batch-independent model: batched and single calls agree bit for bit."""
    return torch.tanh(0.7 * x + t.reshape(-1, 1, 1, 1).to(x.dtype) / 1000) * 0.9


def diffusers_loop(cls, config, steps, x, start=0):
    scheduler = cls(**config)
    scheduler.set_timesteps(steps)
    if start:
        scheduler.set_begin_index(start)
    for t in scheduler.timesteps[start:]:
        x = scheduler.step(toy(scheduler.scale_model_input(x, t), t.reshape(1)), t, x).prev_sample
    return x


def twin_chain(cls, config, steps, start=0):
    twin = PCRScheduler.from_scheduler(cls(**config))
    twin.set_timesteps(steps)
    return DenoisingChain(toy, twin, None, process_group=False, steps=range(start, steps))


def assert_matches(ours, ref, cls, dtype):
    if cls is DEISMultistepScheduler:
        assert torch.equal(ours, ref)
    else:
        assert (ours - ref).abs().max() <= ROUNDING[dtype] * ref.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_the_sequential_chain_is_diffusers_loop(case, dtype):
    cls, config, steps = case
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=dtype)
    ours, _ = denoise_sequential(twin_chain(cls, config, steps), x)
    assert_matches(ours, diffusers_loop(cls, config, steps, x), cls, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("config", [{}, {"solver_order": 3, "predict_x0": False, "final_sigmas_type": "sigma_min"}])
def test_unipc_without_its_corrector_is_diffusers_loop_bit_for_bit(config, dtype):
    config = {**config, "disable_corrector": list(range(20))}
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=dtype)
    ours, _ = denoise_sequential(twin_chain(UniPCMultistepScheduler, config, 20), x)
    assert torch.equal(ours, diffusers_loop(UniPCMultistepScheduler, config, 20, x))


@pytest.mark.parametrize("window", [3, 5])
@pytest.mark.parametrize("case", [case for case in CASES if case[2] >= 7][::2], ids=case_id)
def test_the_parallel_solve_matches_diffusers_loop(case, window):
    cls, config, steps = case
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours, stats = denoise_parallel(twin_chain(cls, config, steps), x, parallel=window, tolerance=1e-7)
    ref = diffusers_loop(cls, config, steps, x)
    assert stats.converged and stats.window == window
    assert (ours - ref).abs().max() <= 1e-6 * ref.abs().max()


@pytest.mark.parametrize("start", [1, 4])
@pytest.mark.parametrize(
    "case",
    [
        (UniPCMultistepScheduler, {"solver_order": 3}, 12),
        (UniPCMultistepScheduler, {"disable_corrector": [4, 5]}, 9),
        (DEISMultistepScheduler, {"solver_order": 3}, 12),
        (DEISMultistepScheduler, {}, 9),
    ],
    ids=case_id,
)
def test_a_chain_that_starts_mid_schedule_matches_set_begin_index(case, start):
    """img2img: the base counts its warm-up (and UniPC its first, uncorrected step) from its first call."""
    cls, config, steps = case
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = diffusers_loop(cls, config, steps, x, start=start)
    ours, _ = denoise_sequential(twin_chain(cls, config, steps, start=start), x)
    assert_matches(ours, ref, cls, torch.float64)
    parallel, stats = denoise_parallel(twin_chain(cls, config, steps, start=start), x, parallel=4, tolerance=1e-7)
    assert stats.converged and (parallel - ref).abs().max() <= 1e-6 * ref.abs().max()


@pytest.mark.parametrize(
    "cls, config, match",
    [
        (UniPCMultistepScheduler, {"solver_p": DDIMScheduler()}, "solver_p"),
        (UniPCMultistepScheduler, {"solver_type": "bh1"}, "solver_type with final_sigmas_type='zero'.*NaN"),
        (UniPCMultistepScheduler, {"predict_x0": False}, "predict_x0 with final_sigmas_type='zero'.*NaN"),
        (UniPCMultistepScheduler, {"lower_order_final": False}, "lower_order_final with final_sigmas_type='zero'"),
        (
            UniPCMultistepScheduler,
            {
                "lower_order_final": False,
                "solver_order": 3,
                "use_karras_sigmas": True,
                "final_sigmas_type": "sigma_min",
            },
            "lower_order_final with solver_order > 2 and a repeated final sigma",
        ),
        (
            UniPCMultistepScheduler,
            {"predict_x0": False, "prediction_type": "flow_prediction", "final_sigmas_type": "sigma_min"},
            "prediction_type with predict_x0=False",
        ),
        (DEISMultistepScheduler, {"prediction_type": "x0"}, "prediction_type"),
    ],
)
def test_configurations_the_batched_step_cannot_follow_are_refused(cls, config, match):
    twin = PCRScheduler.from_scheduler(cls(**config))
    twin.set_timesteps(10)  # a plain scheduler still
    with pytest.raises(ValueError, match=match):
        twin.host_table()


@pytest.mark.parametrize("parent", [UniPCMultistepScheduler, DEISMultistepScheduler], ids=lambda c: c.__name__)
def test_the_twins_override_nothing_of_their_parent(parent):
    twin = PCR_SCHEDULERS[parent]
    assert not {name for name in vars(twin) if not name.startswith("__")} & set(dir(parent))
    for name, member in inspect.getmembers(parent, callable):
        if not name.startswith("_") or name == "__init__":
            assert inspect.signature(getattr(twin, name)) == inspect.signature(member), name
