"""Memory- and compute-aware windows: the probe measures memory, `parallel="auto"` fits the window to a budget, and
sampling then stays within it; timed probe rounds choose among the windows that fit; and half-precision models with
float32 solver states."""

import copy
import logging
import time

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from pcr_diffusers import load_digits_pipeline
from pcr_diffusers.core import ConstantJacobian
from pcr_diffusers.memory import PeakMemory, memory_budget
from pcr_diffusers.pipelines import PCRDDIMPipeline, PCRDDPMPipeline
from pcr_diffusers.sampling import DenoisingChain, denoise_parallel
from pcr_diffusers.schedulers import PCRScheduler


@pytest.fixture(scope="module")
def digits():
    return load_digits_pipeline()


def ddim(digits, unet=None):
    pipe = PCRDDIMPipeline(unet or digits.unet, DDIMScheduler.from_config(digits.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_peak_memory_counts_live_tensors_only():
    with PeakMemory() as one:
        torch.ones(2**18)  # 1 MiB, freed at once
    with PeakMemory() as loop:
        for _ in range(10):
            torch.ones(2**18)
    with PeakMemory() as held:
        kept = [torch.ones(2**18) for _ in range(10)]
    assert 2**20 <= one.peak < 2 * 2**20
    assert loop.peak < 2 * 2**20  # freed tensors are not counted twice
    assert held.peak >= 10 * 2**20 and len(kept) == 10


@pytest.mark.parametrize("budget", [2_000_000, 5_000_000])
def test_auto_window_fits_the_budget_and_stays_within_it(digits, budget, caplog):
    pipe = ddim(digits)
    kwargs = dict(batch_size=2, num_inference_steps=50, output_type="np")
    ref = pipe(generator=torch.Generator().manual_seed(0), parallel=1, **kwargs).images
    with caplog.at_level(logging.INFO, logger="pcr_diffusers"), PeakMemory() as used:
        out = pipe(generator=torch.Generator().manual_seed(0), parallel="auto", max_memory=budget, **kwargs)
    assert 1 < out.stats.window < 50
    assert used.peak <= budget
    assert any("shrunk" in record.message for record in caplog.records)
    assert out.stats.converged and np.abs(out.images - ref).max() <= 1 / 255


def test_a_requested_window_too_large_for_the_budget_is_shrunk(digits):
    out = ddim(digits)(
        generator=torch.Generator().manual_seed(0),
        num_inference_steps=50,
        output_type="np",
        parallel=50,
        max_memory="2MB",
    )
    assert out.stats.window < 50
    plenty = ddim(digits)(
        generator=torch.Generator().manual_seed(0),
        num_inference_steps=50,
        output_type="np",
        parallel=50,
        max_memory="1GB",
    )
    assert plenty.stats.window == 50 and plenty.stats.rounds < out.stats.rounds  # the larger window pays off


def test_a_budget_below_one_step_samples_one_step_per_round(digits, caplog):
    with caplog.at_level(logging.WARNING, logger="pcr_diffusers"):
        out = ddim(digits)(
            generator=torch.Generator().manual_seed(0),
            num_inference_steps=10,
            output_type="np",
            parallel="auto",
            max_memory=1000,
        )
    assert out.stats.window == 1 and out.stats.rounds == 11  # the probe, then one step per round
    assert any("below one step" in record.message for record in caplog.records)


@pytest.mark.parametrize("bad", [0, -5, "lots", "0GB"])
def test_bad_max_memory_is_refused(digits, bad):
    with pytest.raises(ValueError, match="max_memory"):
        ddim(digits)(num_inference_steps=10, max_memory=bad)
    with pytest.raises(ValueError, match="parallel"):
        ddim(digits)(num_inference_steps=10, parallel="all")


def test_memory_budget_defaults_to_the_available_memory():
    assert memory_budget("cpu", None) > 0
    assert memory_budget("cpu", "3MB") == 3 * 10**6


def test_bfloat16_model_with_float32_states(digits):
    """A bfloat16 model: its output changes by one bfloat16 rounding with the batch composition, so tolerances
    must stay above that noise; at 0.4 (2e-3 per step of 200) the parallel result matches the sequential loop (same
    precision policy) within one bfloat16 rounding of the output, in far fewer rounds (35 measured)."""
    unet = copy.deepcopy(digits.unet).to(torch.bfloat16)
    pipe = PCRDDPMPipeline(unet, DDPMScheduler.from_config(digits.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(batch_size=4, num_inference_steps=200, output_type="np")
    ref = pipe(generator=torch.Generator().manual_seed(0), parallel=1, **kwargs).images
    out = pipe(generator=torch.Generator().manual_seed(0), tolerance=0.4, **kwargs)
    assert out.stats.converged and out.stats.rounds <= 40
    assert np.abs(out.images - ref).max() <= 1 / 255 + 1e-6


def sleeping_chain(fixed: float, per_row: float, num_steps: int = 50):
    """A chain whose model call takes `fixed + per_row * rows` seconds (and returns zeros)."""
    scheduler = PCRScheduler.from_scheduler(DDIMScheduler(clip_sample=False))
    scheduler.set_timesteps(num_steps)

    def model(x, t):
        time.sleep(fixed + per_row * len(x))
        return torch.zeros_like(x)

    return DenoisingChain(model, scheduler)


@pytest.mark.parametrize(
    "fixed, per_row, num_steps, largest",
    [(0.02, 0.0, 60, True), (0.002, 0.01, 30, False)],
    ids=["rows-are-free", "rows-cost"],
)
def test_auto_takes_a_large_window_where_rows_are_free_and_a_small_one_where_they_cost(
    fixed, per_row, num_steps, largest
):
    """Rows free: every round takes the same time, so the probe climbs the whole ladder (8, 16, 32, 60, two rounds
    each; the last ones hold only the steps not yet accepted) and keeps the largest. Rows cost (30 steps): window 16
    predicts `(0.002 + 0.16) (75 / 16 + 12)` = 2.7 s against `0.082 (75 / 8 + 12)` = 1.75 s at 8, beyond the
    margin, so the probe stops there and keeps 8; a round at 8 would have to run 40 ms slow to change that.
    (`J = 0` at a tight tolerance accepts one step per round, which leaves the probe enough rounds.)"""
    chain = sleeping_chain(fixed, per_row, num_steps=num_steps)
    latents = torch.randn(1, 1, 4, 4, dtype=torch.float64)
    sizes = []
    model_fn = chain.model_fn
    chain.model_fn = lambda x, t: sizes.append(len(x)) or model_fn(x, t)
    _, stats = denoise_parallel(chain, latents, parallel="auto", jacobian=ConstantJacobian(0.0), tolerance=1e-10)
    ladder = [8, 8, 16, 16, 32, 32, 60, 60] if largest else [8, 8, 16, 16]
    probe = sizes[1 : 1 + len(ladder)]  # after the memory probe's one row
    assert [min(a, b) for a, b in zip(probe, ladder, strict=True)] == probe  # the ladder, short of the chain's end
    assert stats.converged and stats.window == (probe[-1] if largest else 8) and sizes[-1] <= stats.window
    assert stats.rounds == len(sizes) and stats.probe_seconds >= (len(ladder) - 1) * fixed


def test_auto_reports_the_probe_in_the_stats(digits):
    pipe = ddim(digits)
    kwargs = dict(batch_size=1, num_inference_steps=20, output_type="np")
    ref = pipe(generator=torch.Generator().manual_seed(0), parallel=1, **kwargs).images
    out = pipe(generator=torch.Generator().manual_seed(0), parallel="auto", **kwargs)
    assert out.stats.probe_seconds > 0 and out.stats.converged
    assert np.abs(out.images - ref).max() <= 1e-3
