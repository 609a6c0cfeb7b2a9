"""Newton's method over all states of a chain `x_l = f_l(x_{l-1})` at once, each linear solve done by PCR."""

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .jacobians import Jacobian, make_jacobian
from .pcr import pcr_solve


@dataclass
class SolveResult:
    """What a parallel solve returns.

    Attributes:
        states: `(num_steps, *state)`, the states `x_1, ..., x_L` (time axis first).
        converged: whether every step was accepted by the residual test within `max_iters`.
        num_iters: Newton iterations (rounds), each one batched call of `step`.
        residuals: per iteration, the largest per-step residual `||f_l(x_{l-1}) - x_l||_inf` over the steps
            evaluated in that iteration.
        num_evaluations: total evaluations of single steps `f_l` (the sum of the batch sizes passed to `step`).
        num_accepted: how many leading steps were accepted; `num_steps` when `converged`.
    """

    states: torch.Tensor
    converged: bool
    num_iters: int
    residuals: list[float] = field(default_factory=list)
    num_evaluations: int = 0
    num_accepted: int = 0


def _check_int(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int{' or None' if allow_none else ''}, got {value!r}.")


def _per_step_tolerance(tol, num_steps: int, x0: torch.Tensor) -> torch.Tensor:
    if tol is None:
        tol = torch.finfo(x0.dtype).eps ** 0.5
    tol = torch.as_tensor(tol, dtype=torch.float64, device=x0.device)
    if tol.ndim == 0:
        tol = tol.expand(num_steps)
    if tol.shape != (num_steps,) or not bool((tol > 0).all()) or not bool(torch.isfinite(tol).all()):
        raise ValueError(f"`tol` must be a positive number or {num_steps} positive per-step numbers, got {tol}.")
    return tol


def newton_solve(
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    num_steps: int,
    *,
    jacobian: "str | Jacobian | Callable" = "exact",
    tol: "float | torch.Tensor | None" = None,
    max_iters: int | None = None,
    init: torch.Tensor | None = None,
    window: int | None = None,
    extend: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    callback: Callable | None = None,
) -> SolveResult:
    r"""Solves the chain `x_l = f_l(x_{l-1})`, l = 1..L, for all states at once by Newton's method.

    Each iteration evaluates every step of the current window in one call, `F_l = f_l(x_{l-1})`, forms the
    residuals `r_l = F_l - x_l`, solves the linearised chain `d_l = J_l d_{l-1} + r_l` (`d` = 0 before the window)
    with `pcr_solve`, and updates `x_l += d_l`. With exact Jacobians this is Newton's method and converges
    quadratically; `J = I` is Picard iteration and `J = 0` the plain fixed-point sweep.

    Convergence: a step is accepted when it and every step before it have both their residual and their Newton
    update within tolerance, `max(||r_l||_inf, ||d_l||_inf) <= tol_l` (largest absolute entry over the state), and
    the window slides past accepted steps; the returned states are the evaluated iterate plus its update. The
    residual bounds the backward error (the state is an exact step from its predecessor up to `tol`); the update
    estimates the forward error of the iterate. Testing the update alone under-reports the error of a poor
    Jacobian, and the residual alone that of a good one (its updates move far); together they make one `tol`
    give a comparable accuracy for every Jacobian. The first step of the window has a fixed input, so it is set
    to `F_l` and accepted: after k iterations the first k states are exact, and `max_iters=num_steps` (the
    default) always reproduces the sequential chain.

    Args:
        step: `step(ls, x_prev)` evaluates `f_l` for many steps at once: `ls` a LongTensor of 0-based step indices
            of shape `(n,)`, `x_prev` of shape `(n, *state)`; returns `(n, *state)`. Called once per iteration.
        x0: the initial state, shape `state`.
        num_steps: L, the number of steps.
        jacobian: `"identity"` (J = I, Picard iteration as in ParaDiGMS: right for near-identity steps such as
            diffusion updates and residual blocks, but it can diverge on general chains), `"zero"` (J = 0: slow, at
            least one step per iteration, never diverges), `"exact"` (dense Jacobians on the state's last axis by
            `torch.func`, for small states), `"diagonal"` (the exact diagonal, for elementwise steps), `"secant"`
            (a scalar quasi-Newton estimate per step from the iterate history, no extra `step` calls), a `Jacobian`,
            or a callable `(ls, x_prev, fx) -> A` returning elementwise blocks for `pcr_solve` (dense ones if the
            callable has an attribute `structure = "dense"`).
        tol: the residual tolerance, a number or a tensor of `num_steps` per-step numbers; default `sqrt(eps)` of
            the state's dtype.
        max_iters: the most iterations; default `num_steps`.
        init: the initial guess for all states, `(num_steps, *state)`; default `x0` everywhere.
        window: how many steps each iteration evaluates (a sliding window, as in ParaDiGMS); default all.
        extend: `extend(ls, x_last) -> (len(ls), *state)`, the guess for steps `ls` as they enter the window, given
            the last state before them (a cheap predictor, such as a diffusion sampler's rollout with the model
            output held fixed). Default: the `init` values, or without `init` the last state repeated (ParaDiGMS).
        callback: called after every iteration as `callback(num_iters=..., num_accepted=..., residual=...)`.

    Returns:
        `SolveResult`. A non-finite step output, Jacobian or update stops the solve with `converged=False` and the
        last finite states; it never loops.

    The solve runs under `torch.no_grad()`: it is not differentiable itself (see `pcr_diffusers.nn` for gradients).
    """
    if not callable(step):
        raise TypeError(f"`step` must be callable, got {type(step).__name__}.")
    if not isinstance(x0, torch.Tensor) or not x0.dtype.is_floating_point:
        raise TypeError(f"`x0` must be a floating torch.Tensor, got {getattr(x0, 'dtype', type(x0).__name__)}.")
    _check_int("num_steps", num_steps)
    _check_int("max_iters", max_iters, allow_none=True)
    _check_int("window", window, allow_none=True)
    tols = _per_step_tolerance(tol, num_steps, x0)
    if init is not None:
        if not isinstance(init, torch.Tensor) or init.shape != (num_steps, *x0.shape):
            raise ValueError(
                f"`init` must be a tensor of shape {(num_steps, *x0.shape)}, got {getattr(init, 'shape', init)}."
            )
        if init.dtype != x0.dtype:
            raise TypeError(f"`init` must have x0's dtype {x0.dtype}, got {init.dtype}.")
    jac = make_jacobian(jacobian)
    jac.reset(num_steps, x0)
    max_iters = num_steps if max_iters is None else max_iters
    window = num_steps if window is None else min(window, num_steps)

    states = (x0.expand(num_steps, *x0.shape) if init is None else init).clone()  # (L, *state)
    start, num_iters, num_evaluations, residuals = 0, 0, 0, []
    with torch.no_grad():
        while start < num_steps and num_iters < max_iters:
            end = min(start + window, num_steps)
            ls = torch.arange(start, end, device=x0.device)
            first = x0 if start == 0 else states[start - 1]
            x_prev = torch.cat([first.unsqueeze(0), states[start : end - 1]])  # (n, *state)
            fx, A = jac.evaluate(step, ls, x_prev)
            num_iters += 1
            num_evaluations += end - start
            r = fx - states[start:end]
            step_residuals = r.reshape(end - start, -1).abs().amax(1)  # (n,)
            residuals.append(step_residuals.max().item())
            if not math.isfinite(residuals[-1]) or not bool(torch.isfinite(A).all()):
                break
            update = pcr_solve(A, r, torch.zeros_like(x0), structure=jac.structure, check_finite=False)  # checked
            if not bool(torch.isfinite(update).all()):
                break
            states[start:end] += update
            states[start] = fx[0]  # its input is final, so this step is exact
            step_updates = update.reshape(end - start, -1).abs().amax(1)
            ok = torch.maximum(step_residuals, step_updates) <= tols[start:end]
            ok[0] = True
            new_start = start + int(ok.cumprod(0).sum())
            new_end = min(new_start + window, num_steps)
            if new_end > end and extend is not None:
                states[end:new_end] = extend(torch.arange(end, new_end, device=x0.device), states[end - 1])
            elif new_end > end and init is None:
                states[end:new_end] = states[end - 1]
            start = new_start
            if callback is not None:
                callback(num_iters=num_iters, num_accepted=start, residual=residuals[-1])
    return SolveResult(
        states=states,
        converged=start == num_steps,
        num_iters=num_iters,
        residuals=residuals,
        num_evaluations=num_evaluations,
        num_accepted=start,
    )
