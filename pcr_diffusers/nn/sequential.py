"""`PCRSequential`: a drop-in for `nn.Sequential` that runs a deep stack of layers in parallel over depth."""

import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..core import ExactJacobian, Jacobian, SolveResult, make_jacobian, newton_solve, pcr_solve
from .stacking import LayerStack

MODES = ("pcr", "sequential")
# Beyond a few dozen Newton iterations a plain pass is cheaper than another parallel one; finishing sequentially
# then bounds the cost of a forward pass whose chain is too chaotic for Newton.
DEFAULT_MAX_ITERS = 64


@dataclass
class _Solve:
    """What one forward pass needs besides tensors, and where it leaves its `SolveResult`."""

    stack: LayerStack
    layers: list[nn.Module]
    param_names: list[str]
    buffers: dict[str, torch.Tensor]
    jacobian: Jacobian
    tol: float | None
    max_iters: int
    result: SolveResult | None = None

    def step(self, params: dict[str, torch.Tensor]):
        """The chain's step for `newton_solve`: `step(ls, x_prev)` runs layers `ls` on `x_prev` `(n, batch, d)`."""

        def step(ls, x_prev):
            return self.stack.evaluate(
                {name: p[ls] for name, p in params.items()}, {name: b[ls] for name, b in self.buffers.items()}, x_prev
            )

        return step


class _NewtonThroughLayers(torch.autograd.Function):
    """`x_L` of the chain `x_l = f_l(x_{l-1}; theta_l)` by Newton + PCR, with the adjoint solved by PCR too."""

    @staticmethod
    def forward(ctx, solve: _Solve, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        params = dict(zip(solve.param_names, (p.detach() for p in params), strict=True))
        L = len(solve.layers)
        result = newton_solve(
            solve.step(params), x.detach(), L, jacobian=solve.jacobian, tol=solve.tol, max_iters=solve.max_iters
        )
        if not result.converged:
            # The accepted prefix is exact up to `tol`: finishing from it costs at most one plain pass and returns
            # what nn.Sequential would, where returning the unconverged iterate would return garbage.
            states = result.states.clone()  # (L, batch, d)
            h = x if result.num_accepted == 0 else states[result.num_accepted - 1]
            for index in range(result.num_accepted, L):
                h = states[index] = solve.layers[index](h)
            result = replace(result, states=states)
            warnings.warn(
                "PCRSequential: Newton did not converge within `max_iters` (or met a non-finite value); the remaining "
                "layers were run sequentially. `.last_result` records converged=False and the iterations spent.",
                RuntimeWarning,
                stacklevel=2,
            )
        solve.result = result
        ctx.solve = solve
        ctx.save_for_backward(x, result.states, *params.values())
        return result.states[-1].clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x, states, *values = ctx.saved_tensors
        solve: _Solve = ctx.solve
        params = dict(zip(solve.param_names, values, strict=True))
        x_prev = torch.cat([x.unsqueeze(0), states[:-1]])  # (L, batch, d): the input of every layer
        ls = torch.arange(len(x_prev), device=x.device)
        _, J = ExactJacobian().evaluate(solve.step(params), ls, x_prev)  # (L, batch, d, d) at the solved states
        # a_{l-1} = J_l^T a_l with a_L = grad_out; the reverse solve returns a_0, ..., a_{L-1}.
        # Non-finite gradients propagate as they would through nn.Sequential, so the finiteness check is skipped.
        adjoint = pcr_solve(J, torch.zeros_like(x_prev), grad_out, structure="dense", reverse=True, check_finite=False)
        wanted = [name for name, needed in zip(solve.param_names, ctx.needs_input_grad[2:], strict=True) if needed]
        grads = {}
        if wanted:
            cotangent = torch.cat([adjoint[1:], grad_out.unsqueeze(0)])  # (L, batch, d): a_1, ..., a_L

            def run(trained):
                return solve.stack.evaluate({**params, **trained}, solve.buffers, x_prev)

            with torch.enable_grad():
                _, vjp = torch.func.vjp(run, {name: params[name] for name in wanted})
            (grads,) = vjp(cotangent)
        grad_x = adjoint[0] if ctx.needs_input_grad[1] else None
        return None, grad_x, *(grads.get(name) for name in solve.param_names)


class PCRSequential(nn.Sequential):
    r"""A drop-in for `nn.Sequential` over L layers of one architecture, solved in parallel over depth (DeepPCR).

    The stack is the chain `x_l = f_l(x_{l-1})`, l = 1..L, with `x_0` the input of shape `(*batch, d)` and every
    layer mapping `(batch, d)` to `(batch, d)`, each sample (row) independently. With `mode="pcr"`:

    - Forward: `newton_solve` over all L states at once. Each Newton iteration evaluates every layer in one batched
      call (the layers' parameters stacked on a leading layer axis, `torch.func.functional_call` under `vmap`),
      takes the per-sample Jacobians `J_l = df_l/dx_{l-1}` `(L, batch, d, d)` (`jacobian="exact"`), and solves the
      linearised chain with `pcr_solve(..., structure="dense")`, the samples being its batch dims.
    - Backward: the adjoint recurrence `a_{l-1} = J_l^T a_l`, `a_L = dLoss/dx_L`, solved by
      `pcr_solve(..., structure="dense", reverse=True)` with the exact Jacobians at the solved states (one
      batched call), then every layer's parameter gradient `(df_l/dtheta_l)^T a_l` in one batched vector-Jacobian
      product. Nothing is back-propagated through the L layers one by one.

    Cost: PCR does `O(L log L batch d^3)` work in `O(log L)` sequential levels per Newton iteration; the plain loop
    does `O(L batch d^2)` in L levels. PCR wins for deep, narrow stacks where the loop is bound by its L sequential
    launches, and loses for wide layers (see `benchmarks/layers.py`). The Jacobians take `L batch d^2` numbers.

    Supported layers: any module that acts per sample and can run under `torch.func.vmap`, e.g. `Linear` +
    activation, residual blocks (`Residual`), `LayerNorm`, `BatchNorm` in eval mode. All layers must
    share one architecture (types, sizes, hyperparameters, parameter shapes). Anything else raises a `ValueError`
    naming the offending layer on the first forward pass; there is no silent fallback: use `mode="sequential"`
    for mixed stacks, BatchNorm in training mode, or Dropout in training mode.

    Non-convergence: when Newton has not accepted every layer after `max_iters` iterations (or met a non-finite
    value), the remaining layers are run sequentially from the last accepted state, a `RuntimeWarning` is issued
    (shown once by Python's default filter), and `last_result.converged` is False. The output is then what the
    plain loop gives (up to `tol` on the accepted prefix), never the unconverged iterate; `last_result.states`
    holds the returned trajectory.

    Args:
        *layers: the modules, or one `OrderedDict` of them, as for `nn.Sequential`.
        mode (`str`): `"pcr"` (parallel) or `"sequential"` (the plain loop of `nn.Sequential`).
        jacobian: the forward Newton's Jacobian approximation, as for `newton_solve`: `"exact"` (default, quadratic
            convergence), or e.g. `"identity"` (Picard iteration, cheap, for near-identity residual blocks). The
            backward pass always uses exact Jacobians.
        tol (`float`, *optional*): Newton's per-layer tolerance on `max(residual, update)` (absolute, largest entry);
            default `sqrt(eps)` of the dtype. With exact Jacobians the output's error is typically far below `tol`
            (Newton converges quadratically: the last update's error is about its square, times the conditioning).
        max_iters (`int`, *optional*): the most Newton iterations per forward pass; default
            `min(L, DEFAULT_MAX_ITERS)` (64). With `max_iters >= L` the sequential finish is never needed, as every
            iteration makes at least one more layer exact.

    Attributes:
        last_result (`SolveResult` or None): the last forward pass's solve, `states` of shape `(L, batch, d)`;
            None in `mode="sequential"`.
    """

    def __init__(self, *layers, mode: str = "pcr", jacobian="exact", tol: float | None = None, max_iters=None):
        super().__init__(*layers)
        if mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}.")
        if tol is not None and (
            isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (0 < tol < math.inf)
        ):
            raise ValueError(f"`tol` must be a positive finite number or None, got {tol!r}.")
        if max_iters is not None and (isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1):
            raise ValueError(f"`max_iters` must be a positive int or None, got {max_iters!r}.")
        self.mode = mode
        self.jacobian = make_jacobian(jacobian)
        self.tol = tol
        self.max_iters = max_iters
        self.last_result: SolveResult | None = None
        self._stack: tuple[tuple, LayerStack] | None = None

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            layers = OrderedDict(list(self._modules.items())[idx])
            return type(self)(layers, mode=self.mode, jacobian=self.jacobian, tol=self.tol, max_iters=self.max_iters)
        return super().__getitem__(idx)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, tol={self.tol}, max_iters={self.max_iters}"

    def _layer_stack(self) -> LayerStack:
        """The checked stack of the current layers, rebuilt when a layer or a layer's training mode changes."""
        key = tuple((id(layer), layer.training) for layer in self)
        if self._stack is None or self._stack[0] != key:
            self._stack = (key, LayerStack(list(self)))
        return self._stack[1]

    def _check_width(self, x: torch.Tensor) -> None:
        """One row through the first layer: a clear error for an input the layers cannot take (the batched
        evaluation would fail inside a matrix product, naming no argument)."""
        with torch.no_grad():
            try:
                self[0](x[:1])
            except RuntimeError as error:
                raise ValueError(
                    f"`input` with last axis {x.shape[-1]} does not fit layer 0 ({type(self[0]).__name__}): {error}"
                ) from error

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.mode == "sequential" or len(self) == 0:
            self.last_result = None
            return super().forward(input)
        if not isinstance(input, torch.Tensor) or not input.dtype.is_floating_point:
            raise TypeError(f"`input` must be a floating torch.Tensor, got {getattr(input, 'dtype', type(input))}.")
        if input.ndim < 1:
            raise ValueError("`input` must have shape (*batch, d), got a 0-dim tensor.")
        stack = self._layer_stack()
        params = stack.parameters()
        for name, p in params.items():
            if p.dtype != input.dtype:
                raise TypeError(f"`input` has dtype {input.dtype}, but the layers' parameter {name} has {p.dtype}.")
        max_iters = min(len(self), DEFAULT_MAX_ITERS) if self.max_iters is None else self.max_iters
        solve = _Solve(stack, list(self), list(params), stack.buffers(), self.jacobian, self.tol, max_iters)
        x = input.reshape(-1, input.shape[-1])  # (batch, d)
        self._check_width(x)
        out = _NewtonThroughLayers.apply(solve, x, *params.values())
        self.last_result = solve.result
        return out.reshape(input.shape)
