"""Newton's method over all states of a chain `x_l = f_l(x_{l-1})` at once, each linear solve done by PCR."""

import numbers
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
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
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
    window: "int | Callable[[int], int] | None" = None,
    extend: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    callback: Callable | None = None,
    pad_window: bool = False,
) -> SolveResult:
    r"""Solves the chain `x_l = f_l(x_{l-1})`, l = 1..L, for all states at once by Newton's method.

    Each iteration evaluates every step of the current window in one call, `F_l = f_l(x_{l-1})`, forms the
    residuals `r_l = F_l - x_l`, solves the linearised chain `d_l = J_l d_{l-1} + r_l` (`d` = 0 before the window)
    with `pcr_solve`, and updates `x_l += d_l`. With exact Jacobians this is Newton's method and converges
    quadratically; `J = I` is Picard iteration and `J = 0` the plain fixed-point sweep.

    Acceptance, and what it guarantees. A step's residual only says something about the state that is returned if
    it was evaluated at the input that is returned with it. So a step is accepted only on a residual evaluated at
    its final input: in each iteration the leading steps of the window whose residual `||r_l||_inf` and Newton
    update `||d_l||_inf` are both within `tol_l` keep their states unchanged (so the input each was evaluated at is
    final, and so is its residual), and the step after them, whose input is now final, is set to its exact value
    `F_l`; all of these are accepted, the later steps get the Newton update from that corrected start, and the
    window slides past the accepted steps. Hence every accepted state satisfies

        ||f_l(x_{l-1}) - x_l||_inf <= tol_l        (backward error; 0 for the steps set to F_l)

    at the returned `x_{l-1}`, whatever the Jacobian, and the returned chain is within
    `sum_l tol_l prod_{m > l} Lip(f_m)` of the sequential one (inf-norm; `Lip` the steps' Lipschitz constants).
    The update test is the calibration on top: it estimates each state's forward error from the window's
    residuals, so that one `tol` means a comparable accuracy for every Jacobian. Every iteration accepts at least
    one step (the window's first input is final), so after k iterations the first k states are within tolerance,
    and `max_iters=num_steps` (the default) always finishes. Each iteration reads device values once.

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
        window: how many steps each iteration evaluates (a sliding window, as in ParaDiGMS); default all. A callable
            `window(num_accepted) -> int` chooses it before every iteration, from the steps accepted so far (e.g. to
            time iterations at several windows and keep the fastest).
        extend: `extend(ls, x_last) -> (len(ls), *state)`, the guess for steps `ls` as they enter the window, given
            the last state before them (a cheap predictor, such as a diffusion sampler's rollout with the model
            output held fixed). Default: the `init` values, or without `init` the last state repeated (ParaDiGMS).
        callback: called after every iteration as `callback(num_iters=..., num_accepted=..., residual=...)`.
        pad_window: call `step` on exactly `window` steps every iteration, repeating the last step where the window
            runs past the chain's end (the extra rows are evaluated and dropped), so `step` sees one shape: what
            `torch.compile` without dynamic shapes and CUDA graphs need to capture a call once.

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
    if not callable(window):
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
    max_iters = num_steps if max_iters is None else int(max_iters)
    window_of = window if callable(window) else (lambda num_accepted: num_steps if window is None else window)

    states = (x0.expand(num_steps, *x0.shape) if init is None else init).clone()  # (L, *state)
    start, num_iters, num_evaluations, residuals = 0, 0, 0, []
    horizon = None  # the states up to here hold guesses: `init`, or the first window's, or `extend`'s
    with torch.no_grad():
        while start < num_steps and num_iters < max_iters:
            size = window_of(start)
            _check_int("window", size)
            end = min(start + size, num_steps)
            ls = torch.arange(start, end, device=x0.device)
            if horizon is not None and end > horizon:  # steps entering the window for the first time
                if extend is not None:
                    states[horizon:end] = extend(torch.arange(horizon, end, device=x0.device), states[horizon - 1])
                elif init is None:
                    states[horizon:end] = states[horizon - 1]
            horizon = end if horizon is None else max(horizon, end)
            first = x0 if start == 0 else states[start - 1]
            x_prev = torch.cat([first.unsqueeze(0), states[start : end - 1]])  # (n, *state)
            if pad_window and end - start < size:
                pad = size - (end - start)
                ls_padded = torch.cat([ls, ls[-1:].expand(pad)])
                x_padded = torch.cat([x_prev, x_prev[-1:].expand(pad, *x0.shape)])  # (size, *state)
                fx, A = (value[: end - start] for value in jac.evaluate(step, ls_padded, x_padded))
            else:
                fx, A = jac.evaluate(step, ls, x_prev)
            num_iters += 1
            num_evaluations += size if pad_window else end - start
            r = fx - states[start:end]  # (n, *state), each step's residual at the input it was evaluated at
            step_residuals = r.reshape(end - start, -1).abs().amax(1)  # (n,)
            # The leading steps within tolerance keep their states, so their inputs, and with them their
            # residuals, stay as evaluated; the next step's input is then final, and it takes its exact value.
            full = pcr_solve(A, r, torch.zeros_like(x0), structure=jac.structure, check_finite=False)
            step_updates = full.reshape(end - start, -1).abs().amax(1)
            k = (torch.maximum(step_residuals, step_updates) <= tols[start:end]).cumprod(0).sum()  # NaN: outside
            is_k = (ls - start == k).reshape(-1, *([1] * x0.ndim))  # (n, 1, ..., 1)
            before_k = ls - start < k
            b = torch.where(before_k.reshape(is_k.shape), 0, r)  # no correction before step k, r_k at step k
            update = pcr_solve(A, b, torch.zeros_like(x0), structure=jac.structure, check_finite=False)
            finite = torch.isfinite(r).all() & torch.isfinite(A).all() & torch.isfinite(update).all()
            # the round's one read of device values
            k, max_residual, finite = torch.stack([k.to(r.dtype), step_residuals.max(), finite.to(r.dtype)]).tolist()
            residuals.append(max_residual)
            if not finite:
                start += int(k)  # these steps were accepted on finite residuals; the rest is left as it was
                break
            states[start:end] = torch.where(is_k, fx, states[start:end] + update)
            start = min(start + int(k) + 1, end)
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
