"""The Jacobians `PCRSequential` offers, chosen by name and by the size of one sample's state.

A layer stack's state is `(batch, D)` inside the solver, `D` the number of entries of one sample (`C*H*W` for an
image, `T*d` for a sequence); every layer acts on each sample independently, so its Jacobian is block diagonal over
the batch with one `D x D` block per sample. The choices:

- `"exact"`: the dense per-sample blocks `(L, batch, D, D)` from D vector-Jacobian products (`ExactJacobian`);
  Newton converges quadratically, but memory grows as `L batch D^2` and PCR's work as `D^3`: refused above
  `EXACT_MAX_SIZE`.
- `"diagonal"` (quasi-DEER): the diagonal of each block, `(L, batch, D)`, solved by elementwise PCR. Exact, from D
  vector-Jacobian products taken `chunk` basis vectors at a time (memory `O(chunk L batch D)`, never `L batch D^2`),
  or, with `SampleDiagonalJacobian(probes=k)`, Hutchinson's estimate `E[z * (J^T z)]` from k Rademacher probes.
- `"identity"`: `J = I` (Picard), free; natural for residual blocks `x + f(x)` whose `f` is small.
- `"auto"`: `"exact"` up to `AUTO_EXACT_MAX_SIZE` entries per sample; above, `"identity"` for stacks of `Residual`
  blocks (Picard suits `x + f(x)`), `"exact"` for other stacks up to `EXACT_MAX_SIZE` (Picard can diverge on them),
  and `"identity"` beyond.

`damping` lambda replaces every block by `J / (1 + lambda)`: a shorter Newton step, which for a large lambda
approaches the plain fixed-point sweep (`J = 0`) that can never diverge. `damping="trust"` adapts lambda every
iteration from whether the last step lowered the residual (`TrustRegionJacobian`).
"""

import math

import torch

from ..core import ConstantJacobian, ExactJacobian, Jacobian
from ..core.jacobians import check_step_output

JACOBIAN_NAMES = ("auto", "exact", "diagonal", "identity")
DAMPING_NAMES = ("trust",)
# (L, batch, D, D) blocks and O(D^3) products per PCR level: beyond this per-sample size the dense solve is both
# too large to store and slower than any diagonal one.
EXACT_MAX_SIZE = 256
# Up to here exact Jacobians cost about the plain loop on 2 CPU cores (residual LayerNorm MLP, L=1024, batch 1) and
# converge on any smooth stack; beyond, Picard is cheaper but assumes residual blocks (it diverges on plain tanh MLPs).
AUTO_EXACT_MAX_SIZE = 16
# Entries of the VJP outputs held at once while the exact diagonal is extracted basis vector by basis vector.
_CHUNK_ELEMENTS = 2**22


class SampleDiagonalJacobian(Jacobian):
    """The diagonal of each sample's Jacobian block, for states `(n, batch, D)`: exact, or by Hutchinson probes.

    With `probes=None` it is exact: row i of every block is the VJP with the basis cotangent `e_i` (one for all
    samples and layers at once), of which entry i is kept; basis vectors are taken in chunks so the rows are never
    all held, and the cost is D VJPs, as for `"exact"`. With `probes=k` it is Hutchinson's estimate
    `mean_k z_k * (J^T z_k)` over Rademacher vectors `z_k`: k VJPs, unbiased, with a variance set by the
    off-diagonal entries (drawn from a fixed seed, so a forward pass is reproducible).
    """

    def __init__(self, probes: int | None = None, seed: int = 0):
        if probes is not None and (isinstance(probes, bool) or not isinstance(probes, int) or probes < 1):
            raise ValueError(f"`probes` must be a positive int or None (the exact diagonal), got {probes!r}.")
        self.probes = probes
        self.seed = seed

    def reset(self, num_steps, x0):
        self._generator = torch.Generator(device=x0.device).manual_seed(self.seed)

    def evaluate(self, step, ls, x_prev):
        with torch.enable_grad():
            fx, vjp_fn = torch.func.vjp(lambda x: step(ls, x), x_prev)
            check_step_output(fx, x_prev)
            fx = fx.detach()
            if self.probes is not None:
                signs = torch.randint(0, 2, (self.probes, *fx.shape), generator=self._generator, device=fx.device)
                z = (2 * signs - 1).to(fx.dtype)  # (k, n, batch, D)
                (w,) = torch.func.vmap(vjp_fn)(z)
                return fx, (z * w).mean(0).detach()
            D = fx.shape[-1]
            chunk = max(1, min(D, _CHUNK_ELEMENTS // fx.numel()))
            diag = torch.empty_like(fx)  # (n, batch, D)
            for i in range(0, D, chunk):
                c = min(chunk, D - i)
                basis = torch.eye(D, dtype=fx.dtype, device=fx.device)[i : i + c]  # (c, D)
                (rows,) = torch.func.vmap(vjp_fn)(basis.reshape(c, *([1] * (fx.ndim - 1)), D).expand(c, *fx.shape))
                # rows[j, ..., m] = J[..., i + j, m]; keep m = i + j
                diag[..., i : i + c] = torch.diagonal(rows[..., i : i + c], dim1=0, dim2=-1).detach()
        return fx, diag


class DampedJacobian(Jacobian):
    """`J / (1 + damping)` for any Jacobian `inner`: a fixed trust region that shortens every Newton step."""

    def __init__(self, inner: Jacobian, damping: float):
        self.inner = inner
        self.damping = damping
        self.structure = inner.structure

    def reset(self, num_steps, x0):
        self.inner.reset(num_steps, x0)

    def evaluate(self, step, ls, x_prev):
        fx, A = self.inner.evaluate(step, ls, x_prev)
        return fx, A / (1 + self.damping)


class TrustRegionJacobian(Jacobian):
    r"""`J / (1 + lambda)` for any Jacobian `inner`, with lambda adapted every Newton iteration (Levenberg–Marquardt).

    ELK (Gonzalez et al., 2024) stabilises DEER with a trust region: it solves the damped least-squares Newton step
    `min_d ||r - (I - J) d||^2 + lambda ||d||^2` by a Kalman filter, at a fixed lambda. Here the damped step keeps the
    linear recurrence that PCR solves, `d_l = J_l / (1 + lambda) d_{l-1} + r_l` (the same fixed point for every
    lambda), and lambda follows the merit of each new iterate, as in Levenberg–Marquardt:

        phi_i = sum_l ||f_l(x_{l-1}) - x_l||_2^2        (l over the steps evaluated in iterations i - 1 and i)

    If the last step raised the merit (`phi_i > phi_{i-1}`), `1 + lambda` is multiplied by `grow`; if it lowered it,
    `1 + lambda` is divided by `shrink`, down to 1 (undamped Newton); lambda stays within `[0, max_damping]`, the
    upper end being the fixed-point sweep `J = 0` (which cannot diverge) to three digits. Growing fast and shrinking
    slowly matters: a damped step that repairs a blown-up iterate always lowers the merit, so one good step is no
    evidence that the undamped step is safe again; a symmetric rule oscillates between the two. Unlike textbook
    Levenberg–Marquardt a step that raised the merit is kept, not retried: `newton_solve` has no rollback, and its
    acceptance test still accepts at least one step per iteration, so a bad step costs iterations, not accuracy.

    What it buys, measured on 6-wide tanh stacks (float64, default `tol`): where undamped Newton's merit falls every
    iteration (contractive or residual stacks) lambda stays 0 and nothing changes; where the undamped iterate blows
    up (Picard, `J = I`, on a 1000-layer non-residual stack: residuals of 1e299, 1000 iterations; in float32 an
    overflow and the sequential finish) its residuals stay below 1e4 and it converges in 110 to 160 iterations (a fixed
    `damping=3`, tuned to that stack, in about 70, but it costs 4 to 12 times the iterations on healthy stacks); where
    Newton's merit spikes once on its way to converging (exact Jacobians on expansive stacks) it costs up to about
    twice the iterations. A first step that already overflows is not prevented (lambda starts at 0): that solve is
    reported unconverged, and a fixed `damping` avoids it.

    The merit is read from what `step` returns at the iterate `x_prev` `(n, *state)`: its rows `x_prev[1:]` are the
    states of steps `ls[:-1]`, so `fx[:-1] - x_prev[1:]` are their residuals. lambda stays a 0-dim tensor on the
    state's device, so adapting it reads nothing back to the host.

    Args:
        inner: the Jacobian to damp (any structure).
        grow: the factor > 1 on `1 + lambda` after a step that raised the merit.
        shrink: the factor > 1 by which `1 + lambda` is divided after a step that lowered it.
        max_damping: the largest lambda.
    """

    def __init__(self, inner: Jacobian, grow: float = 10.0, shrink: float = 2.0, max_damping: float = 1e3):
        for name, value, low in (("grow", grow, 1), ("shrink", shrink, 1), ("max_damping", max_damping, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low < value < math.inf):
                raise ValueError(f"`{name}` must be a finite number > {low}, got {value!r}.")
        self.inner = inner
        self.grow = float(grow)
        self.shrink = float(shrink)
        self.max_damping = float(max_damping)
        self.structure = inner.structure

    def reset(self, num_steps, x0):
        self.inner.reset(num_steps, x0)
        self.damping = torch.zeros((), dtype=x0.dtype, device=x0.device)
        # ||r_l||^2 of every step at its last evaluation, in float64 so that diverging iterates compare, not overflow
        self._merits = torch.zeros(num_steps, dtype=torch.float64, device=x0.device)
        self._seen = torch.zeros(num_steps, dtype=torch.bool, device=x0.device)

    def evaluate(self, step, ls, x_prev):
        fx, A = self.inner.evaluate(step, ls, x_prev)
        known = ls[:-1]  # the steps whose states are x_prev[1:]
        merits = (fx[:-1] - x_prev[1:]).double().square().flatten(1).sum(1)  # (n - 1,)
        seen = self._seen[known]
        before = torch.where(seen, self._merits[known], 0).sum()
        now = torch.where(seen, merits, 0).sum()
        scale = 1 + self.damping
        scale = torch.where(now > before, scale * self.grow, torch.where(now < before, scale / self.shrink, scale))
        self.damping = (scale - 1).clamp(0, self.max_damping)
        self._merits[known], self._seen[known] = merits, True
        return fx, A / (1 + self.damping)


def resolve_jacobian(jacobian: "str | Jacobian", size: int, residual: bool = False) -> tuple[str, Jacobian]:
    """The named choice for a state of `size` entries per sample, as `(kind, Jacobian)`; `residual`: the blocks are
    `Residual` blocks (which `"auto"` solves by Picard above `AUTO_EXACT_MAX_SIZE`).

    `kind` is `"exact"`, `"diagonal"` or `"identity"` for the named choices (it selects the backward solve) and
    `"custom"` for a user's `Jacobian` object.
    """
    if isinstance(jacobian, Jacobian):
        if isinstance(jacobian, SampleDiagonalJacobian):
            return "diagonal", jacobian
        return ("exact" if isinstance(jacobian, ExactJacobian) else "custom"), jacobian
    if jacobian == "auto":
        exact = size <= AUTO_EXACT_MAX_SIZE or (not residual and size <= EXACT_MAX_SIZE)
        jacobian = "exact" if exact else "identity"
    if jacobian == "exact":
        if size > EXACT_MAX_SIZE:
            raise ValueError(
                f"`jacobian='exact'` forms a dense {size} x {size} Jacobian per sample and layer, above the limit "
                f"of {EXACT_MAX_SIZE} entries per sample; use jacobian='diagonal', 'identity' or 'auto'."
            )
        return "exact", ExactJacobian()
    if jacobian == "diagonal":
        return "diagonal", SampleDiagonalJacobian()
    return "identity", ConstantJacobian(1.0)


def check_damping(damping) -> None:
    if isinstance(damping, str):
        if damping not in DAMPING_NAMES:
            raise ValueError(f"`damping` must be a finite number >= 0 or one of {DAMPING_NAMES}, got {damping!r}.")
        return
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not (0 <= damping < math.inf):
        raise ValueError(f"`damping` must be a finite number >= 0 or one of {DAMPING_NAMES}, got {damping!r}.")


def check_jacobian(jacobian) -> None:
    if isinstance(jacobian, Jacobian):
        return
    if not isinstance(jacobian, str) or jacobian not in JACOBIAN_NAMES:
        raise ValueError(f"`jacobian` must be one of {JACOBIAN_NAMES} or a `Jacobian`, got {jacobian!r}.")
