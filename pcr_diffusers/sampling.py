"""Diffusion sampling as one chain `x_{i+1} = Phi_i(x_i)`, solved in parallel over time by Newton + PCR.

`Phi_i` is the scheduler's update at `timesteps[i]` applied to the model output at `x_i` and to the noise that step
draws (drawn up front, see `PCRSchedulerMixin.draw_noise`). `denoise_parallel` solves all steps together over a
sliding window, one batched model call per round; `denoise_sequential` is its plain twin with the same signature.
Every pipeline of pcr-diffusers runs its denoising loop through these two functions.
"""

import logging
import math
import numbers
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist
from accelerate.utils import convert_file_size_to_int

from .core import ConstantJacobian, Jacobian, newton_solve, pcr_solve
from .memory import agreed, fit_window
from .schedulers import PCRSchedulerMixin
from .schedulers.scheduling_pcr import StepHistory

logger = logging.getLogger(__name__)

# Measured on the shipped digits model on 2 CPU cores (benchmarks/sampling.py): for DDPM-1000 at batch 1, windows of
# 32 to 128 ran within timing noise of each other and 64 needs fewer rounds than 32. With tolerance 3e-3 (per step
# 3e-3 / N, see `step_tolerances`) the images stayed within 1.9e-3 of the sequential ones in [0, 1] pixels (half an
# 8-bit gray level; DDPM-100 at window 100, the worst case measured) and far closer for long chains (DDPM-1000: 3e-6).
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
        probe_seconds: the time of the rounds that `parallel="auto"` timed to choose the window (`FastestWindow`;
            rounds of the solve, counted in `rounds` like the others).
    """

    rounds: int
    model_evaluations: int
    converged: bool
    residuals: list[float] = field(default_factory=list)
    sequential_steps: int = 0
    window: int = 1
    probe_seconds: float = 0.0


def default_process_group():
    """The default `torch.distributed` group when one is initialised with more than one process, else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


class ShardedModel:
    """`model_fn` with each batched call split across the processes of a `torch.distributed` group, on whole steps.

    A call's rows are `n` steps of `rows_per_step` rows each, step-major (`x` `(n * B, C, H, W)`, `t` `(n * B,)`, as
    `DenoisingChain` passes them). Rank r evaluates steps `[r * k, (r + 1) * k)` (`k = ceil(n / world_size)`), so a
    model that needs a step's B rows together (`GuidedModel`) gets them; the outputs, padded to `k` steps, are
    all-gathered, so every rank gets the whole output in step order and the solver runs identically everywhere.
    Every rank takes part in every call, also one with no step of its own (fewer steps than processes). Works with
    gloo (CPU) and nccl (GPU, one device per process); launch with `torchrun` or `accelerate launch`.

    Args:
        model_fn: `model_fn(x, t)` as `DenoisingChain` takes it (with `positions`, sliced like `t`, for a model that
            `takes_positions`).
        group: the `torch.distributed` group; None for the default group.
        rows_per_step: `B`, the rows of one step; `DenoisingChain` sets it to its states' batch.
    """

    def __init__(self, model_fn: Callable, group=None, rows_per_step: int = 1):
        self.model_fn = model_fn
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.rows_per_step = rows_per_step
        self.takes_positions = getattr(model_fn, "takes_positions", False)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        rows = self.rows_per_step
        if x.shape[0] % rows or t.shape[0] != x.shape[0]:
            raise ValueError(
                f"`ShardedModel` takes whole steps of `rows_per_step`={rows} rows, got `x` of {x.shape[0]} rows and "
                f"`t` of {t.shape[0]}."
            )
        self.check_same_inputs(x, t)
        n = x.shape[0] // rows
        steps = -(-n // self.world_size)
        start = min(self.rank * steps, n)
        stop = min(start + steps, n)
        empty = stop == start  # no step here: evaluate step 0 to learn the output's shape and dtype, then drop it
        here = slice(0, rows) if empty else slice(start * rows, stop * rows)
        kwargs = {} if positions is None else {"positions": positions[here]}
        out = self.model_fn(x[here], t[here], **kwargs)
        out = out[:0] if empty else out
        padded = out.new_zeros(steps * rows, *out.shape[1:])  # all_gather needs the same shape on every rank
        padded[: len(out)] = out
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded.contiguous(), group=self.group)
        return torch.cat(gathered)[: n * rows]  # only trailing ranks are short, so the first n steps are in order

    def check_same_inputs(self, x: torch.Tensor, t: torch.Tensor) -> None:
        """Raises on every rank at once when the ranks' inputs differ, where the sharded call would otherwise mix
        different trajectories, or wait forever for a rank whose solver has stopped. Compares the number of rows and
        the norms of `t` and `x` (l1 and l2), gathered from every rank, within a relative `1e-5` (ranks may round
        differently)."""
        dtype = torch.promote_types(x.dtype, torch.float32)  # half precision sums would overflow
        norms = [torch.linalg.vector_norm(x, order, dtype=dtype).float() for order in (1, 2)]
        t_norm = t.float().abs().sum().to(x.device)
        fingerprint = torch.stack([x.new_tensor(len(x), dtype=torch.float32), t_norm, *norms])
        gathered = [torch.empty_like(fingerprint) for _ in range(self.world_size)]
        dist.all_gather(gathered, fingerprint, group=self.group)
        gathered = torch.stack(gathered).cpu()  # (world_size, 4), the same on every rank
        differ = ((gathered - gathered[0]).abs() > 1e-5 * gathered.amax(0)).any(1)
        if differ.any():
            raise ValueError(
                f"The processes of the group called the model on different inputs (ranks "
                f"{differ.nonzero().flatten().tolist()} differ from rank 0): every process must pass the same "
                f"arguments and generator seeds, and seed the global RNG identically (`torch.manual_seed`) where the "
                f"scheduler draws from it, e.g. `FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)`."
            )


class DenoisingChain:
    """The sampling loop as a batched step function `step(ls, x_prev)` for `newton_solve`.

    Args:
        model_fn: `model_fn(model_input, t)` with `model_input` of shape `(n * B, C, H, W)` (already scaled by the
            scheduler) and `t` of shape `(n * B,)`; returns the model output of the input's shape. Classifier-free
            guidance and conditioning live inside it. Its output is cast to the states' dtype, so the model may run
            in half precision while the solver works in float32. A model whose call depends on the step's index as
            well as its timestep (ControlNet's `control_guidance_start/end`) sets the attribute
            `takes_positions = True` and is called `model_fn(model_input, t, positions=...)`, `positions` `(n * B,)`
            the rows' positions in the scheduler's `timesteps` (the parent loop's `i`), laid out like `t`.
        scheduler: a PCR scheduler after `set_timesteps`.
        noise: `(N, B, C, H, W)` from `scheduler.draw_noise(..., steps=steps)`, on the states' device, or None when
            no step draws noise.
        step_kwargs: extra arguments of the scheduler's step (DDIM's `eta`, `use_clipped_model_output`).
        process_group: split every model call across this `torch.distributed` group (`ShardedModel`); default: the
            default group when `torch.distributed` is initialised with several processes. Every process must pass
            the same inputs (same generator seeds); all then compute the same result. `False` turns sharding off.
        model_dtype: the dtype the model runs in, when it differs from the states' (e.g. a float16 model with
            float32 states): its inputs are cast to it and its outputs back to the states' dtype.
        steps: the positions in the scheduler's `timesteps` that the chain runs, a `range` with step 1: the chain's
            step l is the schedule's step `steps[l]`. Default: all of them; img2img starts later, SDXL's
            `denoising_end` stops earlier, and the scheduler's tables stay those of the whole schedule.
        static_shapes: call the model on the same number of rows every round (the parallel solve pads its last
            windows): for a `torch.compile`d model, which then compiles once, and for CUDA graphs.
        after_step: what a step does besides the scheduler's step, `after_step(ls, x_next) -> x_next` with the
            chain's steps `ls` `(n,)` and their scheduler outputs `(n, B, C, H, W)` (e.g. inpainting's blend of
            the known region). Part of `Phi_l`: residuals, Jacobians (VJPs through `update`) and the predictor
            include it. Elementwise and affine in `x_next` keeps `extend`'s rollout exact.

    The chain remembers the last step it evaluated (its input and model output): `extend` predicts the steps after
    it from that step's denoised prediction. For a multistep scheduler (`history_size` K > 0) it also keeps every
    step's model input and converted output, written by each model call before any step reads them: a step of the
    window reads the K steps before it from the same call, or from the accepted steps before the window, whose
    inputs are final (see `PCRSchedulerMixin`).
    """

    def __init__(
        self,
        model_fn: Callable,
        scheduler: PCRSchedulerMixin,
        noise=None,
        step_kwargs=None,
        process_group=None,
        model_dtype: torch.dtype | None = None,
        steps: range | None = None,
        static_shapes: bool = False,
        after_step: Callable | None = None,
    ):
        steps = range(len(scheduler.timesteps)) if steps is None else steps
        if (
            not isinstance(steps, range)
            or steps.step != 1
            or not 0 <= steps.start < steps.stop <= len(scheduler.timesteps)
        ):
            raise ValueError(
                f"`steps` must be a non-empty range of positions in the {len(scheduler.timesteps)} timesteps, "
                f"got {steps!r}."
            )
        step_kwargs = step_kwargs or {}
        scheduler.host_table()  # builds the step tables: a configuration the batched step cannot follow fails now
        if noise is None and any(scheduler.noise_mask(**step_kwargs)[steps.start : steps.stop]):
            raise ValueError("These steps draw noise: pass `noise` from `scheduler.draw_noise`.")
        if noise is not None and len(noise) != len(steps):
            raise ValueError(f"`noise` must hold the {len(steps)} steps' draws, got {len(noise)}.")
        group = default_process_group() if process_group is None else process_group
        self.model_dtype = model_dtype
        self.model_fn = model_fn if group in (None, False) else ShardedModel(model_fn, group)
        self.scheduler = scheduler
        self.noise = noise
        self.step_kwargs = step_kwargs
        self.steps = steps
        self.static_shapes = static_shapes
        self.after_step = after_step
        self._frontier = None
        self._positions = None  # (ls, its schedule positions), computed once per round
        self._samples = self._outputs = None  # (L, B, C, H, W): every step's model input and converted output

    def __len__(self):
        return len(self.steps)

    def positions(self, ls: torch.Tensor) -> torch.Tensor:
        """The schedule positions of the chain's steps `ls` (the same tensor for the same `ls`, so that the
        scheduler gathers a round's coefficients once)."""
        if self._positions is None or self._positions[0] is not ls:
            self._positions = (ls, ls + self.steps.start)
        return self._positions[1]

    def model_output(self, ls: torch.Tensor, x_prev: torch.Tensor) -> torch.Tensor:
        """The model at the states `x_prev` `(n, B, C, H, W)` and timesteps `timesteps[ls]`, in one call."""
        n, batch = x_prev.shape[:2]
        model_input = self.scheduler.batch_scale_model_input(x_prev, self.positions(ls))
        t = self.scheduler.batch_timesteps(self.positions(ls))
        model_input = model_input.flatten(0, 1).to(self.model_dtype or x_prev.dtype)
        if isinstance(self.model_fn, ShardedModel):
            self.model_fn.rows_per_step = batch  # shard on whole steps: a guided model needs a step's B rows together
        kwargs = {}
        if getattr(self.model_fn, "takes_positions", False):
            kwargs["positions"] = self.positions(ls).repeat_interleave(batch)
        out = self.model_fn(model_input, t.repeat_interleave(batch), **kwargs)
        out = out.reshape(n, batch, *out.shape[1:]).to(x_prev.dtype)  # (n, B, C', H, W)
        # a copy: a CUDA graph's outputs are overwritten by its next replay, and `extend` reads this after it
        self._frontier = (ls[-1:], x_prev[-1:], out[-1:].clone())
        if self.scheduler.history_size:
            self._record(ls, x_prev, out)
        return out

    def _record(self, ls: torch.Tensor, x_prev: torch.Tensor, model_output: torch.Tensor) -> None:
        """Keeps the steps' model inputs and converted outputs for the steps after them to read."""
        converted = self.scheduler.batch_convert_model_output(
            model_output, self.positions(ls), x_prev, self.steps.start
        )
        if self._samples is None:
            self._samples = x_prev.new_zeros(len(self), *x_prev.shape[1:])  # (L, B, C, H, W)
            self._outputs = converted.new_zeros(len(self), *converted.shape[1:])
        self._samples[ls], self._outputs[ls] = x_prev, converted

    def history(self, ls: torch.Tensor) -> StepHistory:
        """What steps `ls` read of the K steps before each: `(n, K, B, C, H, W)` inputs and converted outputs,
        zeros before the chain's first step."""
        lags = ls.unsqueeze(1) - torch.arange(1, self.scheduler.history_size + 1, device=ls.device)  # (n, K)
        before = (lags < 0).reshape(*lags.shape, *([1] * (self._samples.ndim - 1)))
        lags = lags.clamp(min=0)
        return StepHistory(self._samples[lags].masked_fill(before, 0), self._outputs[lags].masked_fill(before, 0))

    def update(
        self, ls: torch.Tensor, x_prev: torch.Tensor, model_output: torch.Tensor, history: StepHistory | None = None
    ) -> torch.Tensor:
        """The scheduler's step for the given model outputs and the pre-drawn noise of those steps, then `after_step`;
        a multistep scheduler's step also reads `history` (default: the chain's record of the steps before, as
        constants)."""
        noise = None if self.noise is None else self.noise[ls]
        kwargs = dict(self.step_kwargs)
        if self.scheduler.history_size:
            kwargs.update(history=self.history(ls) if history is None else history, start=self.steps.start)
        x_next = self.scheduler.batch_step(model_output, self.positions(ls), x_prev, noise, **kwargs).to(x_prev.dtype)
        return x_next if self.after_step is None else self.after_step(ls, x_next)

    def __call__(self, ls: torch.Tensor, x_prev: torch.Tensor) -> torch.Tensor:
        return self.update(ls, x_prev, self.model_output(ls, x_prev))

    def _frozen_x0_update(self, ls, x0, extra, own_history: bool = False):
        """`x -> Phi_l(x)` with the model output that predicts `x0` at `x` (and `extra`, the rest of the model's
        output, such as learned variances, held fixed): affine in `x`. With `own_history`, a multistep step reads
        its own input and output as its history, which makes it first order (for steps whose history is unknown)."""
        positions = self.positions(ls)

        def update(x):
            rest = None if extra is None else extra.expand(len(ls), *extra.shape[1:])
            model_output = self.scheduler.batch_model_output_from_x0(x0.expand_as(x), positions, x, rest)
            history = None
            if own_history and self.scheduler.history_size:
                converted = self.scheduler.batch_convert_model_output(model_output, positions, x, self.steps.start)
                lags = (len(ls), self.scheduler.history_size, *x.shape[1:])
                history = StepHistory(x.unsqueeze(1).expand(lags), converted.unsqueeze(1).expand(lags))
            return self.update(ls, x, model_output, history)

        return update

    def _denoised(self, ls, x_prev, model_output):
        """The denoised prediction and the rest of the model output (None, or e.g. learned variances)."""
        positions = self.positions(ls)
        x0 = self.scheduler.batch_predict_x0(model_output, positions, x_prev)
        return x0, self.scheduler.split_model_output(model_output, x_prev)[1]

    def linearize(self, ls, x_prev):
        """`Phi_l(x_prev)` and two elementwise coefficients of `dPhi_l/dx`, from one model call.

        Returns `(fx, j_output, j_x0)`: `j_output` holds the model output fixed (the step's own linear coefficient),
        `j_x0` holds the model's denoised prediction fixed. A trained denoiser's Jacobian lies between the two
        extremes (it ignores directions off the data and follows those along it), and so, roughly, does the step's.
        Both are vector-Jacobian products through the scheduler only, never through the model.
        """
        model_output = self.model_output(ls, x_prev)
        x0, extra = self._denoised(ls, x_prev, model_output)
        with torch.enable_grad():
            fx, vjp_output = torch.func.vjp(lambda x: self.update(ls, x, model_output), x_prev)
            (j_output,) = vjp_output(torch.ones_like(fx))
            _, vjp_x0 = torch.func.vjp(self._frozen_x0_update(ls, x0, extra), x_prev)
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
        x0, extra = self._denoised(last, x_prev, model_output)
        zeros = torch.zeros(len(ls), *x_last.shape, dtype=x_last.dtype, device=x_last.device)
        with torch.enable_grad():
            beta, vjp = torch.func.vjp(self._frozen_x0_update(ls, x0, extra, own_history=True), zeros)
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
    """The per-step tolerances `(N,)` of a chain of N steps for a requested `tolerance`: `tolerance * scale_i / N`.

    `scale_i` is the typical size of the state after step i (`state_scale`). The tolerance is split over the steps:
    each accepted step may be off by its share, and the final sample's error is the sum of the shares, each carried
    through the later steps. Where the chain carries errors unchanged or damps them, the final error stays within
    `tolerance`. A trained model can amplify some directions (measured on the shipped model, DDPM-100: up to 80x
    over the steps where the sample settles, and Newton's last residuals point there); a share of `tolerance / N`
    kept the images within one 8-bit gray level even then, where `tolerance / sqrt(N)` did not (2e-2).
    """
    return tolerance * scale / len(scale)


def warn_unreachable_tolerance(tolerance: float, num_steps: int, model_dtype: torch.dtype) -> None:
    """Warns when the per-step tolerance is below a tenth of the precision the model computes in: its rounding
    noise alone can then keep steps from being accepted, and sampling may take up to one round per step."""
    precision = torch.finfo(model_dtype).eps
    if tolerance / num_steps < 0.1 * precision:
        logger.warning(
            f"`tolerance`={tolerance:g} asks each of the {num_steps} steps for {tolerance / num_steps:.1e} of the "
            f"state's size, below a tenth of the model's {model_dtype} precision ({precision:.1e}): rounding noise "
            f"may keep steps from being accepted, up to one round per step. A `tolerance` of at least "
            f"{0.1 * precision * num_steps:.1e} avoids this."
        )


def is_positive_int(value) -> bool:
    """True for a positive integer of any integral type (`int`, `np.int64`, ...), never for a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def check_parallel_args(parallel, tolerance, jacobian, max_rounds, max_memory=None) -> None:
    """Raises a clear `ValueError` for bad parallel-sampling arguments (before any model call)."""
    if parallel != "auto" and not is_positive_int(parallel):
        raise ValueError(f"`parallel` (the window size) must be a positive int or 'auto', got {parallel!r}.")
    if max_memory is not None:
        try:
            size = convert_file_size_to_int(max_memory) if isinstance(max_memory, str) else max_memory
        except ValueError:
            size = None
        if isinstance(size, bool) or not isinstance(size, numbers.Real) or not 0 < size < math.inf:
            raise ValueError(
                f"`max_memory` must be a positive, finite number of bytes or a size like '2GB', got {max_memory!r}."
            )
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real) or not 0 < tolerance < math.inf:
        raise ValueError(f"`tolerance` must be a positive, finite number, got {tolerance!r}.")
    if max_rounds is not None and not is_positive_int(max_rounds):
        raise ValueError(f"`max_rounds` must be a positive int or None, got {max_rounds!r}.")
    if not isinstance(jacobian, Jacobian) and (not isinstance(jacobian, str) or jacobian not in DIFFUSION_JACOBIANS):
        raise ValueError(f"`jacobian` must be one of {tuple(DIFFUSION_JACOBIANS)} or a `Jacobian`, got {jacobian!r}.")


@dataclass(frozen=True)
class ParallelOptions:
    """The parallel solver's options, validated once where they are made; see `denoise_parallel` for each.

    Every pcr-diffusers pipeline takes these five as keyword arguments of its `__call__`.
    """

    parallel: int | str = DEFAULT_PARALLEL
    tolerance: float = DEFAULT_TOLERANCE
    jacobian: "str | Jacobian" = "auto"
    max_rounds: int | None = None
    max_memory: int | str | None = None

    def __post_init__(self):
        check_parallel_args(self.parallel, self.tolerance, self.jacobian, self.max_rounds, self.max_memory)
        for name in ("parallel", "max_rounds"):  # np.int64 and the like, as plain ints
            value = getattr(self, name)
            if isinstance(value, numbers.Integral):
                object.__setattr__(self, name, int(value))
        object.__setattr__(self, "tolerance", float(self.tolerance))

    def as_kwargs(self) -> dict:
        """The options as keyword arguments of `denoise_parallel` / `denoise_sequential`."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


# A window of W steps needs about `EVALUATIONS_PER_STEP * N / W + FULL_WINDOW_ROUNDS` rounds for N steps. On the
# shipped digits model DDPM-1000 took 53, 33, 22 and 14 rounds at W = 64, 128, 256 and 1000 (2.6 N / W + 11.4 is
# within 2 of all four).
EVALUATIONS_PER_STEP = 2.5
FULL_WINDOW_ROUNDS = 12
FIRST_PROBE_WINDOW = 8
PROBE_MARGIN = 1.1  # the probe goes on while a window's prediction is within this factor of the least (timing noise)


class FastestWindow:
    """`parallel="auto"`'s window, chosen from the solve's own first rounds: the `window(num_accepted)` callable
    of `newton_solve`.

    A round of W steps takes `t(W)` (its model call grows with the W x batch rows, the rest of the round is a fixed
    cost), and N steps need about `c N / W + R` rounds (`EVALUATIONS_PER_STEP`, `FULL_WINDOW_ROUNDS`), so the solve
    takes about `t(W) (c N / W + R)`. The first rounds run at windows 8, 16, 32, ... up to `largest` (what fits the
    memory), two rounds each, the second timed (the first of a new shape pays one-time costs), for as long as that
    prediction stays within `PROBE_MARGIN` of the least so far; the rest of the solve keeps the window of the least.
    So a device with rows to spare (a GPU, or a small model at batch 1) gets a large window, and one where every row
    costs (a CPU at a large batch) a small one. The timed rounds are rounds of the solve and accept steps like any
    other: the choice costs only their windows' being off the best. The processes of a sharded model agree on each
    round's time (the slowest one's), and so on every window.
    """

    def __init__(self, chain, largest: int, device: torch.device):
        self.chain, self.device, self.num_steps = chain, device, len(chain)
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        windows = [min(FIRST_PROBE_WINDOW, largest)]
        while windows[-1] < largest:
            windows.append(min(2 * windows[-1], largest))
        self.ladder = [window for window in windows for _ in range(2)]  # each twice: warm-up (a new shape), timed
        self.chosen = largest if largest <= FIRST_PROBE_WINDOW else None
        self.predicted = {}  # rows of a timed round: the whole solve's predicted seconds at that window
        self.probe = 0  # the ladder's round running now
        self.started = self.left = None  # when it started, and the steps that were left then
        self.seconds = 0.0  # the probe's rounds, warm-ups included

    def __call__(self, num_accepted: int) -> int:
        if self.chosen is not None:
            return self.chosen
        self.sync()
        if self.started is not None:
            seconds = agreed(self.chain, time.perf_counter() - self.started, self.device, dist.ReduceOp.MAX)
            self.seconds += seconds
            rows = min(self.ladder[self.probe], self.left)
            timed = self.probe % 2 == 1
            if timed:
                rounds = EVALUATIONS_PER_STEP * self.num_steps / rows + FULL_WINDOW_ROUNDS
                self.predicted[rows] = seconds * rounds
            self.probe += 1
            rising = timed and self.predicted[rows] > PROBE_MARGIN * min(self.predicted.values())
            if rising or self.probe == len(self.ladder) or timed and rows == self.left:
                self.chosen = min(self.predicted, key=self.predicted.get, default=rows)
                logger.info(
                    f"parallel='auto': window {self.chosen}; predicted seconds by window: "
                    + ", ".join(f"{w}: {t:.2f}" for w, t in self.predicted.items())
                )
                return self.chosen
        self.started, self.left = time.perf_counter(), self.num_steps - num_accepted
        return self.ladder[self.probe]

    @property
    def current(self) -> int:
        """The window of the round running now, or of the last one."""
        return self.ladder[self.probe] if self.chosen is None else self.chosen


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
    keep_states: bool = False,
) -> tuple[torch.Tensor, SamplingStats]:
    """Runs the denoising loop in parallel over time; returns the final latents `(B, C, H, W)` and the stats.

    Each round evaluates the model once on a window of `parallel` consecutive steps (times the batch), solves the
    linearised window with `pcr_solve`, and slides past the accepted steps; steps entering the window start from
    `DenoisingChain.extend`, a rollout with the model's latest denoised prediction held fixed. A step is accepted
    only on its residual `||Phi_i(x_i) - x_{i+1}||_inf` evaluated at its final input `x_i`, within its tolerance
    `tolerance * scale_{i+1} / N` (`step_tolerances`; `scale` is 1, or `sqrt(sigma^2 + 1)` for Euler-type
    schedulers), and with its Newton correction within it too (`newton_solve` gives the rule and its proof). So
    whenever `converged` is True the result is an exact sequential trajectory up to those per-step errors, whatever
    the `jacobian`. After `max_rounds` rounds the remaining steps are finished one at a time (warned, and recorded
    in the stats).

    Args:
        chain: the denoising chain (model, scheduler after `set_timesteps`, pre-drawn noise).
        latents: the initial latents `(B, C, H, W)`, already scaled by `init_noise_sigma`.
        parallel: the window size (steps per round), or `"auto"`: the window of least predicted wall-clock among
            those that fit the memory budget, from the solve's first rounds, timed at growing windows
            (`FastestWindow`).
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
        keep_states: return every step's accepted state `(N, B, C, H, W)` (time axis first; the last is the final
            latents) in place of the final latents. No extra memory: the solve holds all N states anyway.
    """
    check_parallel_args(parallel, tolerance, jacobian, max_rounds, max_memory)
    num_steps = len(chain)
    probes = int(parallel == "auto" or max_memory is not None)
    window = min(int(fit_window(chain, latents, parallel, max_memory) if probes else parallel), num_steps)
    ls = torch.arange(num_steps, device=latents.device)
    tols = step_tolerances(tolerance, chain.scheduler.state_scale(chain.positions(ls)))
    auto = FastestWindow(chain, window, latents.device) if parallel == "auto" else None
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
        window=window if auto is None else auto,
        extend=chain.extend,
        callback=callback,
        pad_window=chain.static_shapes,
    )
    done, states = result.num_accepted, result.states  # (N, B, C, H, W), the accepted steps first
    x = latents if done == 0 else states[done - 1]
    if done < num_steps:
        logger.warning(
            f"Parallel sampling accepted {done} of {num_steps} steps in {result.num_iters} rounds "
            f"(max_rounds={max_rounds}); finishing the remaining {num_steps - done} steps sequentially."
        )
        for i in range(done, num_steps):
            x = states[i] = chain(ls[i : i + 1], x.unsqueeze(0))[0]
            if progress_bar is not None:
                progress_bar.update(1)
    stats = SamplingStats(
        rounds=probes + result.num_iters + num_steps - done,
        model_evaluations=probes + result.num_evaluations + num_steps - done,
        converged=result.converged,
        residuals=result.residuals,
        sequential_steps=num_steps - done,
        window=window if auto is None else auto.current,
        probe_seconds=0.0 if auto is None else auto.seconds,
    )
    return (states if keep_states else x), stats


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
    keep_states: bool = False,
) -> tuple[torch.Tensor, SamplingStats]:
    """The plain loop, one model call per step: the twin of `denoise_parallel` (the parallel arguments are checked
    and otherwise ignored). `keep_states` stores every step's state, `(N, B, C, H, W)`: N latents of memory here."""
    check_parallel_args(parallel, tolerance, jacobian, max_rounds, max_memory)
    x, ls = latents, torch.arange(len(chain), device=latents.device)
    states = latents.new_empty(len(chain), *latents.shape) if keep_states else None
    for i in range(len(chain)):
        x = chain(ls[i : i + 1], x.unsqueeze(0))[0]
        if states is not None:
            states[i] = x
        if progress_bar is not None:
            progress_bar.update(1)
    stats = SamplingStats(rounds=len(chain), model_evaluations=len(chain), converged=True)
    return (x if states is None else states), stats
