"""Approximations of the per-step Jacobians `J_l = df_l / dx_{l-1}` that Newton's linear solve uses.

Newton's method on the chain `x_l = f_l(x_{l-1})` solves `d_l = J_l d_{l-1} + r_l` each iteration. Any `J_l` gives
the same fixed point (the sequential chain); a better one gives fewer iterations. Each approximation is a small
object with a `structure` ("elementwise" or "dense", as in `pcr_solve`) and an `evaluate(step, ls, x_prev)` that
returns `f_l(x_prev)` and the blocks `A` (first axis: the n steps evaluated) from one call of `step`.
"""

from collections.abc import Callable

import torch


def check_step_output(fx: torch.Tensor, x_prev: torch.Tensor) -> torch.Tensor:
    """Raises a clear error when `step` returned something other than a tensor like `x_prev`."""
    if not isinstance(fx, torch.Tensor):
        raise TypeError(f"`step` must return a torch.Tensor, got {type(fx).__name__}.")
    if fx.shape != x_prev.shape:
        raise ValueError(f"`step` must return shape (n, *state) = {tuple(x_prev.shape)}, got {tuple(fx.shape)}.")
    if fx.dtype != x_prev.dtype:
        raise TypeError(f"`step` must return the state's dtype {x_prev.dtype}, got {fx.dtype}.")
    return fx


class Jacobian:
    """Base class: evaluates the steps once and estimates their Jacobians from what that evaluation saw."""

    structure = "elementwise"

    def reset(self, num_steps: int, x0: torch.Tensor) -> None:
        """Called once at the start of a solve; stateful approximations clear their history here."""

    def evaluate(self, step: Callable, ls: torch.Tensor, x_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns `f_l(x_prev)` of shape `(n, *state)` and the Jacobian blocks `A` for `pcr_solve`."""
        fx = check_step_output(step(ls, x_prev), x_prev)
        return fx, self.estimate(ls, x_prev, fx)

    def estimate(self, ls: torch.Tensor, x_prev: torch.Tensor, fx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ConstantJacobian(Jacobian):
    """`J_l = c I` for every step: `c = 1` is Picard iteration (ParaDiGMS), `c = 0` the plain fixed-point sweep."""

    def __init__(self, value: float):
        self.value = value

    def estimate(self, ls, x_prev, fx):
        return torch.full((len(ls),), self.value, dtype=fx.dtype, device=fx.device)


class ExactJacobian(Jacobian):
    """Dense per-step Jacobians of `f_l` on the state's last axis by reverse-mode AD (`torch.func.vjp` + `vmap`).

    Costs `d` vector-Jacobian products per iteration for a last axis of size `d`, but no extra `step` call. Assumes
    that `f_l` acts on each leading index of the state independently (a batch of samples), the last axis being
    the one that mixes; for a state of shape `(d,)` it is the full Jacobian.
    """

    structure = "dense"

    def evaluate(self, step, ls, x_prev):
        with torch.enable_grad():
            fx, vjp_fn = torch.func.vjp(lambda x: step(ls, x), x_prev)
            check_step_output(fx, x_prev)
            d = fx.shape[-1]
            eye = torch.eye(d, dtype=fx.dtype, device=fx.device)
            cotangents = eye.reshape(d, *([1] * (fx.ndim - 1)), d).expand(d, *fx.shape)  # (d, n, *state)
            (rows,) = torch.func.vmap(vjp_fn)(cotangents)  # rows[i, l, ..., j] = J_l[..., i, j]
        return fx.detach(), rows.movedim(0, -2).detach()  # (n, *lead, d, d)


class DiagonalJacobian(Jacobian):
    """The exact diagonal of `df_l/dx_{l-1}` for steps whose Jacobian is diagonal (elementwise maps).

    One vector-Jacobian product with a vector of ones gives the column sums of `J_l`, which is its diagonal when
    `J_l` is diagonal; for any other step it is only an approximation.
    """

    def evaluate(self, step, ls, x_prev):
        with torch.enable_grad():
            fx, vjp_fn = torch.func.vjp(lambda x: step(ls, x), x_prev)
            check_step_output(fx, x_prev)
            (diag,) = vjp_fn(torch.ones_like(fx))
        return fx.detach(), diag.detach()


class SecantJacobian(Jacobian):
    """Quasi-Newton `J_l = s_l I` from the iterate history, at no extra `step` call.

    For each step, `s_l` is the least-squares secant slope between its last two evaluations,
    `s_l = <Δf_l, Δx_{l-1}> / <Δx_{l-1}, Δx_{l-1}>`, taken over the state dims `dims` (default: all of them, one
    scalar per step; `dims=(1, 2, 3)` on a `(B, C, H, W)` state gives one scalar per sample). A step keeps its last
    slope while its input moves by less than `sqrt(eps)` of its size, and uses `fallback` (a number, or an
    elementwise `Jacobian` that also does the evaluation) until it has a slope.
    """

    def __init__(self, dims: tuple[int, ...] | None = None, fallback: "float | Jacobian" = 1.0):
        self.dims = dims
        self.fallback = fallback if isinstance(fallback, Jacobian) else ConstantJacobian(fallback)
        if self.fallback.structure != "elementwise":
            raise ValueError("`fallback` must be an elementwise Jacobian.")

    def reset(self, num_steps, x0):
        dims = range(x0.ndim) if self.dims is None else self.dims
        for dim in dims:
            if not -x0.ndim <= dim < x0.ndim:
                raise ValueError(f"`dims` must index the state's {x0.ndim} dims, got {tuple(dims)}.")
        self._reduce = tuple(1 + (dim % x0.ndim) for dim in dims)
        self._x = torch.zeros(num_steps, *x0.shape, dtype=x0.dtype, device=x0.device)
        self._f = torch.zeros_like(self._x)
        self._seen = torch.zeros(num_steps, dtype=torch.bool, device=x0.device)
        self._slope = torch.full_like(self._x.sum(self._reduce, keepdim=True), float("nan"))
        self.fallback.reset(num_steps, x0)

    def evaluate(self, step, ls, x_prev):
        fx, fallback = self.fallback.evaluate(step, ls, x_prev)
        fallback = fallback.reshape(*fallback.shape, *([1] * (fx.ndim - fallback.ndim)))  # (n, ...) like fx
        dx = x_prev - self._x[ls]
        num = (dx * (fx - self._f[ls])).sum(self._reduce, keepdim=True)
        den = (dx * dx).sum(self._reduce, keepdim=True)
        size = (x_prev * x_prev).sum(self._reduce, keepdim=True)
        seen = self._seen[ls].reshape(-1, *([1] * (den.ndim - 1)))
        valid = seen & (den > torch.finfo(den.dtype).eps * size) & (den > 0)
        slope = torch.where(valid, num / torch.where(valid, den, 1), self._slope[ls])
        self._slope[ls] = slope
        self._x[ls], self._f[ls], self._seen[ls] = x_prev, fx, True
        return fx, torch.where(slope.isnan(), fallback, slope)


class CallableJacobian(Jacobian):
    """Wraps a user function `(ls, x_prev, fx) -> A`; dense when the function has `structure = "dense"`."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.structure = getattr(fn, "structure", "elementwise")

    def estimate(self, ls, x_prev, fx):
        return self.fn(ls, x_prev, fx)


JACOBIANS = {
    "identity": lambda: ConstantJacobian(1.0),
    "zero": lambda: ConstantJacobian(0.0),
    "exact": ExactJacobian,
    "diagonal": DiagonalJacobian,
    "secant": SecantJacobian,
}


def make_jacobian(jacobian: "str | Jacobian | Callable") -> Jacobian:
    """Turns a name, a `Jacobian` or a callable `(ls, x_prev, fx) -> A` into a `Jacobian`."""
    if isinstance(jacobian, Jacobian):
        return jacobian
    if isinstance(jacobian, str):
        if jacobian not in JACOBIANS:
            raise ValueError(f"`jacobian` must be one of {tuple(JACOBIANS)} or a callable, got {jacobian!r}.")
        return JACOBIANS[jacobian]()
    if callable(jacobian):
        return CallableJacobian(jacobian)
    raise TypeError(f"`jacobian` must be a name in {tuple(JACOBIANS)} or a callable, got {type(jacobian).__name__}.")
