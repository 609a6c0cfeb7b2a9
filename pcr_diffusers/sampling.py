"""Diffusion sampling as one chain `x_{i+1} = Phi_i(x_i)`, solved in parallel over time by Newton + PCR.

`Phi_i` is the scheduler's update at `timesteps[i]` applied to the model output at `x_i` and to the noise that step
draws (drawn up front, see `PCRSchedulerMixin.draw_noise`). `denoise_parallel` solves all steps together over a
sliding window, one batched model call per round; `denoise_sequential` is its plain twin with the same signature.
Every pipeline of pcr-diffusers runs its denoising loop through these two functions.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .core import ConstantJacobian, Jacobian, SecantJacobian, newton_solve
from .schedulers import PCRSchedulerMixin

logger = logging.getLogger(__name__)


@dataclass
class SamplingStats:
    """How a denoising loop ran.

    Attributes:
        rounds: sequential rounds of model calls: parallel rounds plus steps finished one at a time.
        model_evaluations: single-step model evaluations (each covers the whole batch); N for the sequential loop.
        converged: whether the parallel solve accepted every step within `max_rounds`.
        residuals: per parallel round, the largest residual `||Phi_i(x_i) - x_{i+1}||_inf` in the window, in the
            scheduler's sample units.
        sequential_steps: steps finished one at a time after `max_rounds` ran out.
    """

    rounds: int
    model_evaluations: int
    converged: bool
    residuals: list[float] = field(default_factory=list)
    sequential_steps: int = 0


class DenoisingChain:
    """The sampling loop as a batched step function `step(ls, x_prev)` for `newton_solve`.

    Args:
        model_fn: `model_fn(model_input, t)` with `model_input` of shape `(n * B, C, H, W)` (already scaled by the
            scheduler) and `t` of shape `(n * B,)`; returns the model output of the input's shape. Classifier-free
            guidance and conditioning live inside it.
        scheduler: a PCR scheduler after `set_timesteps`.
        noise: `(N, B, C, H, W)` from `scheduler.draw_noise`, or None.
        step_kwargs: extra arguments of the scheduler's step (DDIM's `eta`, `use_clipped_model_output`).
    """

    def __init__(self, model_fn: Callable, scheduler: PCRSchedulerMixin, noise=None, step_kwargs=None):
        self.model_fn = model_fn
        self.scheduler = scheduler
        self.noise = noise
        self.step_kwargs = step_kwargs or {}

    def __len__(self):
        return len(self.scheduler.timesteps)

    def model_output(self, ls: torch.Tensor, x_prev: torch.Tensor) -> torch.Tensor:
        """The model at the states `x_prev` `(n, B, C, H, W)` and timesteps `timesteps[ls]`, in one call."""
        n, batch = x_prev.shape[:2]
        model_input = self.scheduler.batch_scale_model_input(x_prev, ls)
        t = self.scheduler.timesteps[ls.cpu()].to(x_prev.device)
        out = self.model_fn(model_input.flatten(0, 1), t.repeat_interleave(batch))
        return out.reshape(x_prev.shape)

    def update(self, ls: torch.Tensor, x_prev: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        """The scheduler's step for the given model outputs and the pre-drawn noise of those steps."""
        noise = None if self.noise is None else self.noise[ls.to(self.noise.device)]
        return self.scheduler.batch_step(model_output, ls, x_prev, noise, **self.step_kwargs).to(x_prev.dtype)

    def __call__(self, ls: torch.Tensor, x_prev: torch.Tensor) -> torch.Tensor:
        return self.update(ls, x_prev, self.model_output(ls, x_prev))


class SchedulerJacobian(Jacobian):
    """`J_i = dPhi_i/dx_i` with the model output held fixed: the step's own linear coefficient, elementwise.

    Computed by one vector-Jacobian product through the scheduler's update only (never through the model), so it
    costs no model call; it carries clipping masks where the scheduler clips.
    """

    def evaluate(self, step: DenoisingChain, ls, x_prev):
        model_output = step.model_output(ls, x_prev)
        with torch.enable_grad():
            fx, vjp_fn = torch.func.vjp(lambda x: step.update(ls, x, model_output), x_prev)
            (diag,) = vjp_fn(torch.ones_like(fx))
        return fx.detach(), diag.detach()


def _per_sample_secant(fallback: Jacobian) -> SecantJacobian:
    return SecantJacobian(dims=(1, 2, 3), fallback=fallback)  # state (B, C, H, W): one slope per image and step


DIFFUSION_JACOBIANS = {
    "identity": lambda: ConstantJacobian(1.0),
    "scheduler": SchedulerJacobian,
    "secant": lambda: _per_sample_secant(SchedulerJacobian()),
}
DIFFUSION_JACOBIANS["auto"] = DIFFUSION_JACOBIANS["secant"]


def diffusion_jacobian(jacobian: "str | Jacobian") -> Jacobian:
    """A fresh Jacobian approximation for a denoising chain, from its name or as given."""
    if isinstance(jacobian, Jacobian):
        return jacobian
    if jacobian not in DIFFUSION_JACOBIANS:
        raise ValueError(f"`jacobian` must be one of {tuple(DIFFUSION_JACOBIANS)} or a `Jacobian`, got {jacobian!r}.")
    return DIFFUSION_JACOBIANS[jacobian]()


def check_parallel_args(parallel, tolerance, jacobian, max_rounds) -> None:
    """Raises a clear `ValueError` for bad parallel-sampling arguments (before any model call)."""
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise ValueError(f"`parallel` (the window size) must be a positive int, got {parallel!r}.")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance > 0:
        raise ValueError(f"`tolerance` must be a positive number, got {tolerance!r}.")
    if max_rounds is not None and (isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 1):
        raise ValueError(f"`max_rounds` must be a positive int or None, got {max_rounds!r}.")
    if not isinstance(jacobian, Jacobian) and jacobian not in DIFFUSION_JACOBIANS:
        raise ValueError(f"`jacobian` must be one of {tuple(DIFFUSION_JACOBIANS)} or a `Jacobian`, got {jacobian!r}.")


def denoise_parallel(
    chain: DenoisingChain,
    latents: torch.Tensor,
    *,
    parallel: int = 128,
    tolerance: float = 1e-3,
    jacobian: "str | Jacobian" = "auto",
    max_rounds: int | None = None,
    progress_bar=None,
) -> tuple[torch.Tensor, SamplingStats]:
    """Runs the denoising loop in parallel over time; returns the final latents `(B, C, H, W)` and the stats.

    Each round evaluates the model once on a window of `parallel` consecutive steps (times the batch), solves the
    linearised window with `pcr_solve`, and slides past the steps whose residual is within tolerance. A step is
    accepted when it and all steps before it satisfy `||Phi_i(x_i) - x_{i+1}||_inf <= tolerance * scale_{i+1}`:
    the result is then a sequential trajectory whose every step was perturbed by at most `tolerance` (relative to
    the state's size), whatever the `jacobian`. After `max_rounds` rounds the remaining steps are finished one at a
    time (warned, and recorded in the stats).

    Args:
        chain: the denoising chain (model, scheduler after `set_timesteps`, pre-drawn noise).
        latents: the initial latents `(B, C, H, W)`, already scaled by `init_noise_sigma`.
        parallel: the window size (steps per round).
        tolerance: the per-step residual tolerance, relative to the state's size.
        jacobian: `"auto"` (the default: currently `"secant"`), `"secant"` (one quasi-Newton slope per image and
            step from the last two rounds, starting from `"scheduler"`), `"scheduler"` (the step's own coefficient
            with the model output held fixed), `"identity"` (Picard iteration, as ParaDiGMS), or a `Jacobian`.
        max_rounds: the most parallel rounds; default: no limit (at most N are ever needed).
        progress_bar: a tqdm bar with `total` = N, advanced as steps are accepted.
    """
    check_parallel_args(parallel, tolerance, jacobian, max_rounds)
    num_steps = len(chain)
    scale = chain.scheduler.state_scale(torch.arange(num_steps))

    def callback(num_iters, num_accepted, residual):
        if progress_bar is not None:
            progress_bar.update(num_accepted - progress_bar.n)
            progress_bar.set_postfix(round=num_iters, residual=f"{residual:.1e}")

    result = newton_solve(
        chain,
        latents,
        num_steps,
        jacobian=diffusion_jacobian(jacobian),
        tol=tolerance * scale,
        max_iters=max_rounds,
        window=parallel,
        callback=callback,
    )
    done = result.num_accepted
    x = latents if done == 0 else result.states[done - 1]
    if done < num_steps:
        logger.warning(
            f"Parallel sampling accepted {done} of {num_steps} steps in {result.num_iters} rounds "
            f"(max_rounds={max_rounds}); finishing the remaining {num_steps - done} steps sequentially."
        )
        for i in range(done, num_steps):
            x = chain(torch.tensor([i], device=x.device), x.unsqueeze(0))[0]
            if progress_bar is not None:
                progress_bar.update(1)
    stats = SamplingStats(
        rounds=result.num_iters + num_steps - done,
        model_evaluations=result.num_evaluations + num_steps - done,
        converged=result.converged,
        residuals=result.residuals,
        sequential_steps=num_steps - done,
    )
    return x, stats


def denoise_sequential(
    chain: DenoisingChain,
    latents: torch.Tensor,
    *,
    parallel: int = 128,
    tolerance: float = 1e-3,
    jacobian: "str | Jacobian" = "auto",
    max_rounds: int | None = None,
    progress_bar=None,
) -> tuple[torch.Tensor, SamplingStats]:
    """The plain loop, one model call per step: the twin of `denoise_parallel` (the parallel arguments are checked
    and otherwise ignored)."""
    check_parallel_args(parallel, tolerance, jacobian, max_rounds)
    x = latents
    for i in range(len(chain)):
        x = chain(torch.tensor([i], device=x.device), x.unsqueeze(0))[0]
        if progress_bar is not None:
            progress_bar.update(1)
    return x, SamplingStats(rounds=len(chain), model_evaluations=len(chain), converged=True)
