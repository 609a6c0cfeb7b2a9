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
import torch.distributed as dist
from accelerate.utils import convert_file_size_to_int

from .core import ConstantJacobian, Jacobian, newton_solve, pcr_solve
from .memory import fit_window
from .schedulers import PCRSchedulerMixin

logger = logging.getLogger(__name__)

# Measured on the shipped digits model on 2 CPU cores (benchmarks/sampling.py): for DDPM-1000 at batch 1, windows of
# 32 to 128 ran within timing noise of each other and 64 needs fewer rounds than 32. With tolerance 3e-3 (per step
# 3e-3 / sqrt(N), see `step_tolerances`) the images stayed within 1.2e-3 of the sequential ones in [0, 1] pixels
# (a third of an 8-bit gray level) for DDPM-1000 and DDIM-50 at batches 1 and 16, windows 16 to N.
DEFAULT_PARALLEL = 64
DEFAULT_TOLERANCE = 3e-3


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
        window: the window used (steps per round); 1 for the sequential loop.
    """

    rounds: int
    model_evaluations: int
    converged: bool
    residuals: list[float] = field(default_factory=list)
    sequential_steps: int = 0
    window: int = 1


def default_process_group():
    """The default `torch.distributed` group when one is initialised with more than one process, else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


class ShardedModel:
    """`model_fn` with each batched call split across the processes of a `torch.distributed` group.

    Rank r evaluates rows `[r * k, (r + 1) * k)` of the `n` rows (`k = ceil(n / world_size)`), and the outputs are
    all-gathered, so every rank gets the whole batch and the solver runs identically everywhere. Works with gloo
    (CPU) and nccl (GPU); launch with `torchrun` or `accelerate launch`.
    """

    def __init__(self, model_fn: Callable, group=None):
        self.model_fn = model_fn
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        rows = -(-n // self.world_size)
        start = min(self.rank * rows, n)
        stop = min(start + rows, n)
        if stop == start:  # more ranks than rows: evaluate row 0 to learn the output's shape, then drop it
            out = self.model_fn(x[:1], t[:1])[:0]
        else:
            out = self.model_fn(x[start:stop], t[start:stop])
        padded = out.new_zeros(rows, *out.shape[1:])
        padded[: len(out)] = out
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded.contiguous(), group=self.group)
        return torch.cat(gathered)[:n]  # only trailing ranks are short, so the first n rows are in order


class DenoisingChain:
    """The sampling loop as a batched step function `step(ls, x_prev)` for `newton_solve`.

    Args:
        model_fn: `model_fn(model_input, t)` with `model_input` of shape `(n * B, C, H, W)` (already scaled by the
            scheduler) and `t` of shape `(n * B,)`; returns the model output of the input's shape. Classifier-free
            guidance and conditioning live inside it. Its output is cast to the states' dtype, so the model may run
            in half precision while the solver works in float32.
        scheduler: a PCR scheduler after `set_timesteps`.
        noise: `(N, B, C, H, W)` from `scheduler.draw_noise`, or None.
        step_kwargs: extra arguments of the scheduler's step (DDIM's `eta`, `use_clipped_model_output`).
        process_group: split every model call across this `torch.distributed` group (`ShardedModel`); default: the
            default group when `torch.distributed` is initialised with several processes. Every process must pass
            the same inputs (same generator seeds); all then compute the same result. `False` turns sharding off.
        model_dtype: the dtype the model runs in, when it differs from the states' (e.g. a float16 model with
            float32 states): its inputs are cast to it and its outputs back to the states' dtype.

    The chain remembers the last step it evaluated (its input and model output): `extend` predicts the steps after
    it from that step's denoised prediction.
    """

    def __init__(
        self,
        model_fn: Callable,
        scheduler: PCRSchedulerMixin,
        noise=None,
        step_kwargs=None,
        process_group=None,
        model_dtype: torch.dtype | None = None,
    ):
        group = default_process_group() if process_group is None else process_group
        self.model_dtype = model_dtype
        self.model_fn = model_fn if group in (None, False) else ShardedModel(model_fn, group)
        self.scheduler = scheduler
        self.noise = noise
        self.step_kwargs = step_kwargs or {}
        self._frontier = None

    def __len__(self):
        return len(self.scheduler.timesteps)

    def model_output(self, ls: torch.Tensor, x_prev: torch.Tensor) -> torch.Tensor:
        """The model at the states `x_prev` `(n, B, C, H, W)` and timesteps `timesteps[ls]`, in one call."""
        n, batch = x_prev.shape[:2]
        model_input = self.scheduler.batch_scale_model_input(x_prev, ls)
        t = self.scheduler.timesteps[ls.cpu()].to(x_prev.device)
        model_input = model_input.flatten(0, 1).to(self.model_dtype or x_prev.dtype)
        out = self.model_fn(model_input, t.repeat_interleave(batch))
        out = out.reshape(x_prev.shape).to(x_prev.dtype)
        self._frontier = (ls[-1:], x_prev[-1:], out[-1:])
        return out

    def update(self, ls: torch.Tensor, x_prev: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        """The scheduler's step for the given model outputs and the pre-drawn noise of those steps."""
        noise = None if self.noise is None else self.noise[ls.to(self.noise.device)]
        return self.scheduler.batch_step(model_output, ls, x_prev, noise, **self.step_kwargs).to(x_prev.dtype)

    def __call__(self, ls: torch.Tensor, x_prev: torch.Tensor) -> torch.Tensor:
        return self.update(ls, x_prev, self.model_output(ls, x_prev))

    def _frozen_x0_update(self, ls, x0):
        """`x -> Phi_l(x)` with the model output that predicts `x0` at `x`: affine in `x`."""
        return lambda x: self.update(ls, x, self.scheduler.batch_model_output_from_x0(x0.expand_as(x), ls, x))

    def linearize(self, ls, x_prev):
        """`Phi_l(x_prev)` and two elementwise coefficients of `dPhi_l/dx`, from one model call.

        Returns `(fx, j_output, j_x0)`: `j_output` holds the model output fixed (the step's own linear coefficient),
        `j_x0` holds the model's denoised prediction fixed. A trained denoiser's Jacobian lies between the two
        extremes (it ignores directions off the data and follows those along it), and so, roughly, does the step's.
        Both are vector-Jacobian products through the scheduler only, never through the model.
        """
        model_output = self.model_output(ls, x_prev)
        x0 = self.scheduler.batch_predict_x0(model_output, ls, x_prev)
        with torch.enable_grad():
            fx, vjp_output = torch.func.vjp(lambda x: self.update(ls, x, model_output), x_prev)
            (j_output,) = vjp_output(torch.ones_like(fx))
            _, vjp_x0 = torch.func.vjp(self._frozen_x0_update(ls, x0), x_prev)
            (j_x0,) = vjp_x0(torch.ones_like(fx))
        return fx.detach(), j_output.detach(), j_x0.detach()

    def extend(self, ls: torch.Tensor, x_last: torch.Tensor) -> torch.Tensor:
        """Predicts the steps `ls` after the last evaluated one, starting from `x_last`, with no model call.

        Each step is taken with the model output that the last evaluated step's denoised prediction implies
        (and the steps' own pre-drawn noise). With the prediction fixed every step is affine,
        `x_l = alpha_l x_{l-1} + beta_l`, so the whole rollout is one `pcr_solve`.
        """
        if self._frontier is None:
            return x_last.expand(len(ls), *x_last.shape).clone()
        last, x_prev, model_output = self._frontier
        x0 = self.scheduler.batch_predict_x0(model_output, last, x_prev)
        zeros = torch.zeros(len(ls), *x_last.shape, dtype=x_last.dtype, device=x_last.device)
        with torch.enable_grad():
            beta, vjp = torch.func.vjp(self._frozen_x0_update(ls, x0), zeros)
            (alpha,) = vjp(torch.ones_like(beta))
        return pcr_solve(alpha.detach(), beta.detach(), x_last, check_finite=False)  # NaNs show in the residuals


class SchedulerJacobian(Jacobian):
    """`J_i = dPhi_i/dx_i` with the model output held fixed: the step's own linear coefficient, elementwise.

    No model call: a vector-Jacobian product through the scheduler's update only. Carries clipping masks.
    For DDIM it is `sqrt(alpha_prev / alpha) > 1`, which overstates how errors grow; see `DenoiserJacobian`.
    """

    def evaluate(self, step: DenoisingChain, ls, x_prev):
        fx, j_output, _ = step.linearize(ls, x_prev)
        return fx, j_output


class DenoiserJacobian(Jacobian):
    """`J_i = dPhi_i/dx_i` with the model's denoised prediction `x0` held fixed, elementwise (e.g. DDIM:
    `sqrt(1 - alpha_prev) / sqrt(1 - alpha)`; DDPM: the posterior mean's coefficient of `x_t`). No model call."""

    def evaluate(self, step: DenoisingChain, ls, x_prev):
        fx, _, j_x0 = step.linearize(ls, x_prev)
        return fx, j_x0


class DiffusionSecant(Jacobian):
    """Per-element secant slopes from the last two evaluations of each step, kept between the two extremes.

    `J_i = clamp(Δf_i / Δx_i, min(j_output, j_x0), max(j_output, j_x0))` elementwise, where `Δ` is the change
    between the step's last two evaluations and `j_output`, `j_x0` are `SchedulerJacobian` and
    `DenoiserJacobian`; steps seen once use `j_x0`. No model call. The interval keeps a noisy slope from
    overstating or reversing the step's sensitivity; where the scheduler clips, it pins the slope exactly.
    """

    def reset(self, num_steps, x0):
        self._x = torch.zeros(num_steps, *x0.shape, dtype=x0.dtype, device=x0.device)
        self._f = torch.zeros_like(self._x)
        self._seen = torch.zeros(num_steps, dtype=torch.bool, device=x0.device)

    def evaluate(self, step: DenoisingChain, ls, x_prev):
        fx, j_output, j_x0 = step.linearize(ls, x_prev)
        dx = x_prev - self._x[ls]
        seen = self._seen[ls].reshape(-1, *([1] * (dx.ndim - 1)))
        valid = seen & (dx.abs() > torch.finfo(dx.dtype).eps * (x_prev.abs() + 1))
        slope = torch.where(valid, (fx - self._f[ls]) / torch.where(valid, dx, 1), j_x0)
        self._x[ls], self._f[ls], self._seen[ls] = x_prev, fx, True
        return fx, slope.clamp(torch.minimum(j_output, j_x0), torch.maximum(j_output, j_x0))


DIFFUSION_JACOBIANS = {
    "identity": lambda: ConstantJacobian(1.0),
    "scheduler": SchedulerJacobian,
    "denoiser": DenoiserJacobian,
    "secant": DiffusionSecant,
}
DIFFUSION_JACOBIANS["auto"] = DIFFUSION_JACOBIANS["secant"]


def diffusion_jacobian(jacobian: "str | Jacobian") -> Jacobian:
    """A fresh Jacobian approximation for a denoising chain, from its name or as given."""
    if isinstance(jacobian, Jacobian):
        return jacobian
    if jacobian not in DIFFUSION_JACOBIANS:
        raise ValueError(f"`jacobian` must be one of {tuple(DIFFUSION_JACOBIANS)} or a `Jacobian`, got {jacobian!r}.")
    return DIFFUSION_JACOBIANS[jacobian]()


def step_tolerances(tolerance: float, scale: torch.Tensor) -> torch.Tensor:
    """The per-step tolerances `(N,)` of a chain of N steps for a requested `tolerance`: `tolerance * scale_i /
    sqrt(N)`.

    `scale_i` is the typical size of the state after step i (`state_scale`). Each accepted step may be off by up
    to its tolerance, and the final sample's error is their sum carried through the later steps; divided by
    `sqrt(N)`, N such errors of random sign add up to about `tolerance` (most steps carry an error to the end
    nearly unchanged: measured on the shipped model, except the first quarter of DDPM's steps, which damp it).
    """
    return tolerance * scale / len(scale) ** 0.5


def warn_unreachable_tolerance(tolerance: float, num_steps: int, model_dtype: torch.dtype) -> None:
    """Warns when the per-step tolerance is below a tenth of the precision the model computes in: its rounding
    noise alone can then keep steps from being accepted, and sampling may take up to one round per step."""
    precision = torch.finfo(model_dtype).eps
    if tolerance / num_steps**0.5 < 0.1 * precision:
        logger.warning(
            f"`tolerance`={tolerance:g} asks each of the {num_steps} steps for {tolerance / num_steps**0.5:.1e} of "
            f"the state's size, below a tenth of the model's {model_dtype} precision ({precision:.1e}): rounding "
            f"noise may keep steps from being accepted, up to one round per step. A `tolerance` of at least "
            f"{0.1 * precision * num_steps**0.5:.1e} avoids this."
        )


def check_parallel_args(parallel, tolerance, jacobian, max_rounds, max_memory=None) -> None:
    """Raises a clear `ValueError` for bad parallel-sampling arguments (before any model call)."""
    if parallel != "auto" and (isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1):
        raise ValueError(f"`parallel` (the window size) must be a positive int or 'auto', got {parallel!r}.")
    if max_memory is not None:
        try:
            size = convert_file_size_to_int(max_memory) if isinstance(max_memory, str) else max_memory
        except ValueError:
            size = None
        if isinstance(size, bool) or not isinstance(size, (int, float)) or not size > 0:
            raise ValueError(
                f"`max_memory` must be a positive number of bytes or a size like '2GB', got {max_memory!r}."
            )
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
    parallel: int = DEFAULT_PARALLEL,
    tolerance: float = DEFAULT_TOLERANCE,
    jacobian: "str | Jacobian" = "auto",
    max_rounds: int | None = None,
    max_memory: int | str | None = None,
    progress_bar=None,
) -> tuple[torch.Tensor, SamplingStats]:
    """Runs the denoising loop in parallel over time; returns the final latents `(B, C, H, W)` and the stats.

    Each round evaluates the model once on a window of `parallel` consecutive steps (times the batch), solves the
    linearised window with `pcr_solve`, and slides past the accepted steps; steps entering the window start from
    `DenoisingChain.extend`, a rollout with the model's latest denoised prediction held fixed. A step is accepted
    only on its residual `||Phi_i(x_i) - x_{i+1}||_inf` evaluated at its final input `x_i`, within its tolerance
    `tolerance * scale_{i+1} / sqrt(N)` (`step_tolerances`; `scale` is 1, or `sqrt(sigma^2 + 1)` for Euler-type
    schedulers), and with its Newton correction within it too (`newton_solve` gives the rule and its proof). So
    whenever `converged` is True the result is an exact sequential trajectory up to those per-step errors, whatever
    the `jacobian`. After `max_rounds` rounds the remaining steps are finished one at a time (warned, and recorded
    in the stats).

    Args:
        chain: the denoising chain (model, scheduler after `set_timesteps`, pre-drawn noise).
        latents: the initial latents `(B, C, H, W)`, already scaled by `init_noise_sigma`.
        parallel: the window size (steps per round), or `"auto"`: the largest window that fits the memory budget.
        tolerance: how far the result may be from the sequential one, relative to the state's size: about the
            largest difference in the final sample (see `step_tolerances`).
        jacobian: `"auto"` (the default: currently `"secant"`, which converged in the fewest rounds in our
            benchmarks), `"secant"` (`DiffusionSecant`: per-element secant slopes from the iterate history, kept
            between the next two), `"denoiser"` (`DenoiserJacobian`: the step's coefficient with the denoised
            prediction held fixed), `"scheduler"` (`SchedulerJacobian`: the step's own coefficient with the model
            output held fixed), `"identity"` (Picard iteration, as ParaDiGMS), or a `Jacobian`. None costs a model
            call.
        max_rounds: the most parallel rounds; default: no limit (at most N are ever needed).
        max_memory: the memory sampling may use, in bytes or as a string like `"2GB"`; default: the free CUDA
            memory, or the available RAM. With `parallel="auto"` or `max_memory` given, one probe step (counted in
            the stats as a round) measures the memory of a step and the window is fitted to the budget
            (`pcr_diffusers.memory.fit_window`); a requested window that would not fit is shrunk, with a log message.
        progress_bar: a tqdm bar with `total` = N, advanced as steps are accepted.
    """
    check_parallel_args(parallel, tolerance, jacobian, max_rounds, max_memory)
    num_steps = len(chain)
    probes = int(parallel == "auto" or max_memory is not None)
    window = min(fit_window(chain, latents, parallel, max_memory) if probes else parallel, num_steps)
    tols = step_tolerances(tolerance, chain.scheduler.state_scale(torch.arange(num_steps)))
    warn_unreachable_tolerance(tolerance, num_steps, chain.model_dtype or latents.dtype)

    def callback(num_iters, num_accepted, residual):
        if progress_bar is not None:
            progress_bar.update(num_accepted - progress_bar.n)
            progress_bar.set_postfix(round=num_iters, residual=f"{residual:.1e}")

    result = newton_solve(
        chain,
        latents,
        num_steps,
        jacobian=diffusion_jacobian(jacobian),
        tol=tols,
        max_iters=max_rounds,
        window=window,
        extend=chain.extend,
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
        rounds=probes + result.num_iters + num_steps - done,
        model_evaluations=probes + result.num_evaluations + num_steps - done,
        converged=result.converged,
        residuals=result.residuals,
        sequential_steps=num_steps - done,
        window=window,
    )
    return x, stats


def denoise_sequential(
    chain: DenoisingChain,
    latents: torch.Tensor,
    *,
    parallel: int = DEFAULT_PARALLEL,
    tolerance: float = DEFAULT_TOLERANCE,
    jacobian: "str | Jacobian" = "auto",
    max_rounds: int | None = None,
    max_memory: int | str | None = None,
    progress_bar=None,
) -> tuple[torch.Tensor, SamplingStats]:
    """The plain loop, one model call per step: the twin of `denoise_parallel` (the parallel arguments are checked
    and otherwise ignored)."""
    check_parallel_args(parallel, tolerance, jacobian, max_rounds, max_memory)
    x = latents
    for i in range(len(chain)):
        x = chain(torch.tensor([i], device=x.device), x.unsqueeze(0))[0]
        if progress_bar is not None:
            progress_bar.update(1)
    return x, SamplingStats(rounds=len(chain), model_evaluations=len(chain), converged=True)
