"""`PCRSequential`: a drop-in for `nn.Sequential` that runs a deep stack of layers in parallel over depth."""

import math
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..core import (
    CallableJacobian,
    ConstantJacobian,
    ExactJacobian,
    Jacobian,
    SolveResult,
    newton_solve,
    pcr_solve,
)
from .blocks import Residual
from .jacobians import DampedJacobian, TrustRegionJacobian, check_damping, check_jacobian, resolve_jacobian
from .stacking import LayerStack

MODES = ("pcr", "sequential")
# Beyond a few dozen Newton iterations a plain pass is cheaper than another parallel one; finishing sequentially
# then bounds the cost of a forward pass whose chain is too chaotic for Newton.
DEFAULT_MAX_ITERS = 64


@dataclass
class _Solve:
    """What one forward pass needs besides tensors, and where it leaves its `SolveResult`.

    The solver sees states `(batch, D)`, one flattened sample per row; the layers see `shape`, the input's shape.
    """

    stack: LayerStack
    layers: list[nn.Module]
    param_names: list[str]
    buffers: dict[str, torch.Tensor]
    kind: str
    jacobian: Jacobian
    damping: float | str
    shape: tuple[int, ...]
    tol: float | None
    max_iters: int
    result: SolveResult | None = None
    on_adjoint: Callable[[SolveResult], None] | None = None

    def evaluate(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x_prev: torch.Tensor):
        """`f_l(x_{l-1})` for n layers: stacked `params`, `buffers` `(n, ...)` and `x_prev` `(n, batch, D)`."""
        n, flat = x_prev.shape[0], x_prev.shape[1:]
        return self.stack.evaluate(params, buffers, x_prev.reshape(n, *self.shape)).reshape(n, *flat)

    def step(self, params: dict[str, torch.Tensor]):
        """The chain's step for `newton_solve`: `step(ls, x_prev)` runs layers `ls` on `x_prev` `(n, batch, D)`."""

        def step(ls, x_prev):
            return self.evaluate(
                {name: p[ls] for name, p in params.items()}, {name: b[ls] for name, b in self.buffers.items()}, x_prev
            )

        return step

    def damped(self, jacobian: Jacobian) -> Jacobian:
        """`jacobian` as one solve uses it: adaptively damped (a fresh trust region per solve), damped, or as is."""
        if self.damping == "trust":
            return TrustRegionJacobian(jacobian)
        return DampedJacobian(jacobian, self.damping) if self.damping else jacobian


def _finish_sequentially(result: SolveResult, first: torch.Tensor, step, what: str) -> SolveResult:
    """Runs the steps Newton did not accept one by one from the last accepted state, and warns.

    The accepted prefix is exact up to `tol`: finishing from it costs at most one plain pass and returns what the
    loop would, where returning the unconverged iterate would return garbage.
    """
    states = result.states.clone()  # (L, batch, D)
    h = first if result.num_accepted == 0 else states[result.num_accepted - 1]
    for index in range(result.num_accepted, len(states)):
        h = states[index] = step(torch.tensor([index], device=h.device), h.unsqueeze(0))[0]
    warnings.warn(
        f"PCRSequential: Newton did not converge within `max_iters` (or met a non-finite value) in the {what}; the "
        "remaining layers were run sequentially. `.last_result` records converged=False and the iterations spent.",
        RuntimeWarning,
        stacklevel=3,
    )
    return replace(result, states=states)


class _NewtonThroughLayers(torch.autograd.Function):
    """`x_L` of the chain `x_l = f_l(x_{l-1}; theta_l)` by Newton + PCR, with the adjoint solved in parallel too."""

    @staticmethod
    def forward(ctx, solve: _Solve, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        params = dict(zip(solve.param_names, (p.detach() for p in params), strict=True))
        L, step = len(solve.layers), solve.step(params)
        jacobian = solve.damped(solve.jacobian)
        result = newton_solve(step, x.detach(), L, jacobian=jacobian, tol=solve.tol, max_iters=solve.max_iters)
        if not result.converged:
            with torch.no_grad():
                result = _finish_sequentially(result, x.detach(), step, "forward pass")
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
        x_prev = torch.cat([x.unsqueeze(0), states[:-1]])  # (L, batch, D): the input of every layer
        # a_{l-1} = J_l^T a_l with a_L = grad_out: a_0, ..., a_{L-1}
        if solve.kind == "exact":
            adjoint = _exact_adjoint(solve, params, x_prev, grad_out)
        else:
            adjoint = _newton_adjoint(solve, params, x_prev, grad_out)
        wanted = [name for name, needed in zip(solve.param_names, ctx.needs_input_grad[2:], strict=True) if needed]
        grads = {}
        if wanted:
            cotangent = torch.cat([adjoint[1:], grad_out.unsqueeze(0)])  # (L, batch, D): a_1, ..., a_L

            def run(trained):
                return solve.evaluate({**params, **trained}, solve.buffers, x_prev)

            with torch.enable_grad():
                _, vjp = torch.func.vjp(run, {name: params[name] for name in wanted})
            (grads,) = vjp(cotangent)
        grad_x = adjoint[0] if ctx.needs_input_grad[1] else None
        return None, grad_x, *(grads.get(name) for name in solve.param_names)


def _exact_adjoint(solve: _Solve, params: dict, x_prev: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """The adjoint by one dense PCR solve with the exact Jacobians at the solved states, `(L, batch, D, D)`."""
    ls = torch.arange(len(x_prev), device=x_prev.device)
    _, J = ExactJacobian().evaluate(solve.step(params), ls, x_prev)
    # Non-finite gradients propagate as they would through nn.Sequential, so the finiteness check is skipped.
    return pcr_solve(J, torch.zeros_like(x_prev), grad_out, structure="dense", reverse=True, check_finite=False)


def _newton_adjoint(solve: _Solve, params: dict, x_prev: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """The adjoint chain solved by `newton_solve` with exact VJPs, the forward's Jacobian only preconditioning it.

    Read from the output back, the adjoint is the chain `c_k = g_k(c_{k-1})`, `c_0 = a_L`, `c_k = a_{L-k}`, with the
    linear steps `g_k(c) = J_{L-k+1}^T c`, each one exact vector-Jacobian product at the solved states (all layers'
    in one batched call). Newton on it with an approximate `J` (the diagonals at the solved states, or `I`) is
    iterative refinement: it converges to the exact adjoint, to `tol` times the largest entry of `grad_out`, and
    stores no `D x D` matrix. Unaccepted steps are finished one VJP at a time, as the forward does.
    """
    L = len(x_prev)
    buffers = solve.buffers
    with torch.enable_grad():
        _, vjp_fn = torch.func.vjp(lambda h: solve.evaluate(params, buffers, h), x_prev)

    def step(ks, c_prev):  # (n,) step indices of the reversed chain, (n, batch, D) -> (n, batch, D)
        layers = L - 1 - ks
        cotangent = torch.zeros_like(x_prev)
        cotangent[layers] = c_prev
        (grad,) = vjp_fn(cotangent)
        return grad[layers]

    if solve.kind == "diagonal":
        solve.jacobian.reset(L, x_prev[0])
        _, diagonal = solve.jacobian.evaluate(solve.step(params), torch.arange(L, device=x_prev.device), x_prev)

        def preconditioner(ks, c_prev, gc):  # diag(J^T) = diag(J)
            return diagonal[L - 1 - ks]

        jacobian = CallableJacobian(preconditioner)
    else:
        jacobian = ConstantJacobian(1.0)
    eps = torch.finfo(grad_out.dtype).eps
    scale = grad_out.abs().max().item()
    tol = (eps**0.5 if solve.tol is None else solve.tol) * (scale if scale > 0 else 1.0) / L**0.5
    with torch.no_grad():
        result = newton_solve(step, grad_out, L, jacobian=solve.damped(jacobian), tol=tol, max_iters=solve.max_iters)
        if not result.converged:
            result = _finish_sequentially(result, grad_out, step, "backward (adjoint) pass")
    if solve.on_adjoint is not None:
        solve.on_adjoint(result)
    return result.states.flip(0)  # (L, batch, D): a_0, ..., a_{L-1}


class PCRSequential(nn.Sequential):
    r"""A drop-in for `nn.Sequential` over L blocks of one architecture, solved in parallel over depth (DeepPCR).

    The stack is the chain `x_l = f_l(x_{l-1})`, l = 1..L, with `x_0` the input: any shape `(batch, *state)` that
    every block maps to the same shape, e.g. `(B, d)` for an MLP, `(B, C, H, W)` for a conv ResNet, `(B, T, d)`
    for a sequence model; the first axis holds independent samples (a 1-d input is one sample). Inside the solver
    each sample is flattened to `D = prod(state)` entries, so the states are `(L, batch, D)` with the layer axis
    first. With `mode="pcr"`:

    - Forward: `newton_solve` over all L states at once. Each Newton iteration evaluates every block in one batched
      call (the blocks' parameters stacked on a leading layer axis, `torch.func.functional_call` under `vmap`),
      takes the chosen approximation of the per-sample Jacobians `J_l = df_l/dx_{l-1}` and solves the linearised
      chain by PCR (dense for `"exact"`, elementwise otherwise).
    - Backward: the adjoint recurrence `a_{l-1} = J_l^T a_l`, `a_L = dLoss/dx_L`. With `jacobian="exact"` it is
      one dense reverse PCR solve with the exact Jacobians at the solved states. With `"diagonal"`, `"identity"`
      (or a custom `Jacobian`) it is solved by Newton with exact vector-Jacobian products as the steps (all blocks
      in one batched call per iteration) and the diagonal (or `I`) only as the preconditioner: the same fixed
      point, so the gradients are exact up to `tol`, and no `D x D` matrix is stored. Then every block's parameter
      gradient `(df_l/dtheta_l)^T a_l` comes from one batched vector-Jacobian product.

    Jacobians (`jacobian`, see `pcr_diffusers.nn.jacobians`):

    - `"exact"`: dense `(L, batch, D, D)` blocks from D VJPs; quadratic convergence; refused for D > 256.
    - `"diagonal"`: the exact diagonal of every block from D VJPs taken in chunks (quasi-DEER: memory
      `O(L batch D)`, elementwise PCR); `SampleDiagonalJacobian(probes=k)` estimates it from k Hutchinson probes.
    - `"identity"`: `J = I`, Picard iteration: free, right for residual blocks `x + f(x)` with a small `f`.
    - `"auto"` (default): `"exact"` for D <= 16, else `"identity"`.

    Damping uses `J / (1 + lambda)` in both Newton solves (forward and adjoint): a shorter step that keeps a chain
    convergent where the undamped approximation diverges (large lambda approaches the fixed-point sweep `J = 0`,
    which cannot diverge). `damping=lambda` fixes it; `damping="trust"` adapts it every iteration, Levenberg–Marquardt
    style (ELK's trust region): 0 while each step lowers the residual norm, raised tenfold after a step that raised
    it, halved back after a step that lowered it (`TrustRegionJacobian`). The fixed point, and so the output, is the
    same for every lambda.

    Cost: PCR does `O(L log L batch D^3)` work (`"exact"`) or `O(L log L batch D)` (`"diagonal"`, `"identity"`)
    in `O(log L)` sequential levels per Newton iteration, plus the Jacobians (`D` VJPs of every block for
    `"exact"` and `"diagonal"`, none for `"identity"`); the plain loop runs L sequential blocks. See
    `benchmarks/layers.py` for where each wins.

    Supported blocks: any module that acts on each sample independently, preserves the state's shape and runs under
    `torch.func.vmap`: `Linear`, `Conv2d`, `LayerNorm`, `GroupNorm`, activations, residual wrappers (`Residual` or
    your own `nn.Module`), `BatchNorm` in eval mode. All blocks must share one architecture (types, sizes,
    hyperparameters, parameter shapes). A block that is not shape-preserving, couples the samples of a batch
    (BatchNorm with batch statistics), draws random numbers (Dropout in training mode) or has hooks raises a
    `ValueError` naming the block and the reason; there is no silent fallback: use `mode="sequential"`.

    Non-convergence: when Newton has not accepted every layer after `max_iters` iterations (or met a non-finite
    value), forward or adjoint, the remaining layers are run sequentially from the last accepted state, a
    `RuntimeWarning` is issued (shown once by Python's default filter), and `last_result.converged` (or
    `last_adjoint_result.converged`) is False. The output is then what the plain loop gives (up to `tol` on the
    accepted prefix), never the unconverged iterate.

    Args:
        *layers: the modules, or one `OrderedDict` of them, as for `nn.Sequential`.
        mode (`str`): `"pcr"` (parallel) or `"sequential"` (the plain loop of `nn.Sequential`).
        jacobian: `"auto"`, `"exact"`, `"diagonal"`, `"identity"`, or a `Jacobian` object (e.g.
            `SampleDiagonalJacobian(probes=4)`).
        damping (`float` or `"trust"`): a fixed lambda >= 0 of `J / (1 + lambda)`, or `"trust"` for a lambda adapted
            every Newton iteration; default 0.
        tol (`float`, *optional*): Newton's per-layer tolerance on `max(residual, update)` (absolute, largest entry);
            default `sqrt(eps)` of the dtype. The adjoint uses `tol` times the largest entry of the output gradient.
        max_iters (`int`, *optional*): the most Newton iterations per solve; default `min(L, DEFAULT_MAX_ITERS)`
            (64). With `max_iters >= L` the sequential finish is never needed.

    Attributes:
        last_result (`SolveResult` or None): the last forward pass's solve, `states` of shape `(L, batch, D)`;
            None in `mode="sequential"`.
        last_adjoint_result (`SolveResult` or None): the last Newton adjoint solve (not `"exact"`), `states`
            `a_{L-1}, ..., a_0`.
    """

    def __init__(
        self,
        *layers,
        mode: str = "pcr",
        jacobian="auto",
        damping: float | str = 0.0,
        tol: float | None = None,
        max_iters=None,
    ):
        super().__init__(*layers)
        if mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}.")
        check_jacobian(jacobian)
        check_damping(damping)
        if tol is not None and (
            isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (0 < tol < math.inf)
        ):
            raise ValueError(f"`tol` must be a positive finite number or None, got {tol!r}.")
        if max_iters is not None and (isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1):
            raise ValueError(f"`max_iters` must be a positive int or None, got {max_iters!r}.")
        self.mode = mode
        self.jacobian = jacobian
        self.damping = damping if isinstance(damping, str) else float(damping)
        self.tol = tol
        self.max_iters = max_iters
        self.last_result: SolveResult | None = None
        self.last_adjoint_result: SolveResult | None = None
        self._stack: tuple[tuple, LayerStack] | None = None

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            layers = OrderedDict(list(self._modules.items())[idx])
            config = dict(jacobian=self.jacobian, damping=self.damping, tol=self.tol, max_iters=self.max_iters)
            return type(self)(layers, mode=self.mode, **config)
        return super().__getitem__(idx)

    def extra_repr(self) -> str:
        return (
            f"mode={self.mode!r}, jacobian={self.jacobian!r}, damping={self.damping!r}, tol={self.tol}, "
            f"max_iters={self.max_iters}"
        )

    def _layer_stack(self) -> LayerStack:
        """The checked stack of the current layers, rebuilt when a layer or a layer's training mode changes."""
        key = tuple((id(layer), layer.training) for layer in self)
        if self._stack is None or self._stack[0] != key:
            self._stack = (key, LayerStack(list(self)))
        return self._stack[1]

    def _check_first_block(self, x: torch.Tensor) -> None:
        """Runs block 0 once on `x` (and on its first sample alone): a clear error, naming the block, for an input
        it cannot take, an output of another shape, or an output that depends on the other samples."""
        block = f"layer 0 ({type(self[0]).__name__})"
        with torch.no_grad():
            try:
                y = self[0](x)
            except RuntimeError as error:
                raise ValueError(f"`input` of shape {tuple(x.shape)} does not fit {block}: {error}") from error
            if not isinstance(y, torch.Tensor) or y.shape != x.shape:
                raise ValueError(
                    f"`layers`: {block} must map a state to the same shape, but maps {tuple(x.shape)} to "
                    f"{tuple(getattr(y, 'shape', ()))}; use mode='sequential'."
                )
            if x.ndim >= 2 and len(x) > 1:
                alone = self[0](x[:1])
                scale = y[:1].abs().max().clamp_min(1.0)
                if (alone - y[:1]).abs().max() > 1e3 * torch.finfo(x.dtype).eps ** 0.5 * scale:
                    raise ValueError(
                        f"`layers`: {block} gives the first sample another output when it runs alone than in the "
                        "batch, so it couples the samples of a batch; use mode='sequential'."
                    )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.mode == "sequential" or len(self) == 0:
            self.last_result = self.last_adjoint_result = None
            return super().forward(input)
        if not isinstance(input, torch.Tensor) or not input.dtype.is_floating_point:
            raise TypeError(f"`input` must be a floating torch.Tensor, got {getattr(input, 'dtype', type(input))}.")
        if input.ndim < 1:
            raise ValueError("`input` must have shape (batch, *state) or (d,), got a 0-dim tensor.")
        stack = self._layer_stack()
        params = stack.parameters()
        for name, p in params.items():
            if p.dtype != input.dtype:
                raise TypeError(f"`input` has dtype {input.dtype}, but the layers' parameter {name} has {p.dtype}.")
        self._check_first_block(input)
        batch = input.shape[0] if input.ndim >= 2 else 1
        x = input.reshape(batch, -1)  # (batch, D)
        residual = all(isinstance(block, Residual) for block in self)
        kind, jacobian = resolve_jacobian(self.jacobian, x.shape[1], residual)
        max_iters = min(len(self), DEFAULT_MAX_ITERS) if self.max_iters is None else self.max_iters
        solve = _Solve(
            stack, list(self), list(params), stack.buffers(), kind, jacobian, self.damping, tuple(input.shape),
            self.tol, max_iters, on_adjoint=lambda result: setattr(self, "last_adjoint_result", result),
        )  # fmt: skip
        out = _NewtonThroughLayers.apply(solve, x, *params.values())
        self.last_result = solve.result
        self.last_adjoint_result = None
        return out.reshape(input.shape)
