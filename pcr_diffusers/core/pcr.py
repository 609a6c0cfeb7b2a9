"""Linear first-order recurrences, solved sequentially or by parallel cyclic reduction.

Both solvers take the same arguments and return the same thing; `sequential_solve` is the reference that every
test of `pcr_solve` compares against.
"""

import torch

STRUCTURES = ("elementwise", "dense")
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _check_inputs(A: torch.Tensor, b: torch.Tensor, x0: torch.Tensor, structure: str, check_finite: bool) -> None:
    if structure not in STRUCTURES:
        raise ValueError(f"`structure` must be one of {STRUCTURES}, got {structure!r}.")
    for name, value in (("A", A), ("b", b), ("x0", x0)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}.")
    if not b.dtype.is_floating_point:
        raise TypeError(f"`b` must have a floating dtype, got {b.dtype}.")
    if A.dtype != b.dtype or x0.dtype != b.dtype:
        raise TypeError(f"`A`, `b` and `x0` must share one dtype, got A: {A.dtype}, b: {b.dtype}, x0: {x0.dtype}.")
    if A.device != b.device or x0.device != b.device:
        raise ValueError(f"`A`, `b` and `x0` must be on one device, got {A.device}, {b.device}, {x0.device}.")
    if b.ndim < 1 or b.shape[0] < 1:
        raise ValueError(f"`b` must have shape (L, *state) with L >= 1, got {tuple(b.shape)}.")
    L, state = b.shape[0], tuple(b.shape[1:])
    if tuple(x0.shape) != state:
        raise ValueError(f"`x0` must have the state shape b.shape[1:] = {state}, got {tuple(x0.shape)}.")
    if A.ndim < 1 or A.shape[0] != L:
        raise ValueError(f"`A` must have L = {L} steps on its first axis, got shape {tuple(A.shape)}.")
    if structure == "elementwise":
        padded = tuple(A.shape) + (1,) * (b.ndim - A.ndim)
        if A.ndim > b.ndim or any(a not in (1, s) for a, s in zip(padded[1:], state, strict=True)):
            raise ValueError(
                f"With structure='elementwise', `A` must have shape (L,), (L, 1, ..., 1) or a shape that broadcasts "
                f"to b's {tuple(b.shape)}, got {tuple(A.shape)}."
            )
    else:
        if len(state) < 1:
            raise ValueError("With structure='dense', the state needs at least one axis (its last axis is acted on).")
        d = state[-1]
        batch = tuple(A.shape[1:-2])
        if (
            A.ndim < 3
            or tuple(A.shape[-2:]) != (d, d)
            or len(batch) > len(state) - 1
            or any(a not in (1, s) for a, s in zip(batch[::-1], state[-2::-1], strict=False))
        ):
            raise ValueError(
                f"With structure='dense', `A` must have shape (L, *batch, d, d) with d = {d} and batch dims that "
                f"broadcast to the state's leading dims {state[:-1]}, got {tuple(A.shape)}."
            )
    for name, value in (("A", A), ("b", b), ("x0", x0)) if check_finite else ():
        if not torch.isfinite(value).all():
            raise ValueError(f"`{name}` contains NaN or infinite values.")


def _prepare(A, b, x0, structure, reverse, check_finite):
    """Validates, upcasts half precision to float32, turns `reverse` into a forward system and fixes `A`'s rank."""
    _check_inputs(A, b, x0, structure, check_finite)
    if b.dtype in _HALF_DTYPES:
        A, b, x0 = A.float(), b.float(), x0.float()
    if structure == "elementwise":
        A = A.reshape(*A.shape, *([1] * (b.ndim - A.ndim)))
    else:  # (L, *batch, d, d) -> (L, 1, ..., 1, *batch, d, d), so batch dims align with the state's leading dims
        A = A.reshape(A.shape[0], *([1] * (b.ndim - A.ndim + 1)), *A.shape[1:])
    if reverse:
        A, b = A.flip(0), b.flip(0)
        if structure == "dense":
            A = A.transpose(-1, -2)
    return A, b, x0


def _apply(A: torch.Tensor, x: torch.Tensor, structure: str) -> torch.Tensor:
    """`A x` for a stack of steps: a broadcast product, or a batched matrix-vector product on the last axis."""
    if structure == "elementwise":
        return A * x
    return (A @ x.unsqueeze(-1)).squeeze(-1)


def _compose(A_later: torch.Tensor, A_earlier: torch.Tensor, structure: str) -> torch.Tensor:
    """The linear part of applying step `earlier`, then step `later`."""
    if structure == "elementwise":
        return A_later * A_earlier
    return A_later @ A_earlier


def _finish(x: torch.Tensor, dtype: torch.dtype, reverse: bool) -> torch.Tensor:
    return (x.flip(0) if reverse else x).to(dtype)


def pcr_solve(
    A: torch.Tensor,
    b: torch.Tensor,
    x0: torch.Tensor,
    *,
    structure: str = "elementwise",
    reverse: bool = False,
    check_finite: bool = True,
) -> torch.Tensor:
    r"""Solves a linear first-order recurrence by parallel cyclic reduction.

    The system, for l = 1..L, with the time axis first::

        x_l = A_l x_{l-1} + b_l,        x_0 = x0 given,                  (reverse=False)
        x_l = A_l^T x_{l+1} + b_l,      x_{L+1} = x0 given, l = L..1     (reverse=True, the adjoint system)

    It is the block lower-bidiagonal system `x_l - A_l x_{l-1} = b_l`. Parallel cyclic reduction lets every
    equation eliminate its neighbour at distance s = 1, 2, 4, ...: after the level with shift s, equation l reads
    `x_l = \bar A_l x_{l-2s} + \bar b_l`, where (the doubling step)

        \bar b_l = A_l \bar b_{l-s} + b_l,      \bar A_l = A_l \bar A_{l-s}.

    Folding `x0` into `b_1` first, every equation whose span reaches the start is solved, so after
    `ceil(log2 L)` levels `\bar b_l = x_l` for all l. Each level is one vectorised update over all l (no Python loop
    over l): `O(L)` elementwise products or `O(L d^3)` matrix products per level, `O(L log L)` work in
    `ceil(log2 L)` sequential levels, against `O(L)` work in L levels for `sequential_solve`. Products `\bar A_l`
    are only formed for equations that still need them.

    Args:
        A (`torch.Tensor`):
            The step matrices. With `structure="elementwise"` it broadcasts against `b`: shape `(L,)` or
            `(L, 1, ..., 1)` is a scalar per step, `(L, *state)` a diagonal per step. With `structure="dense"` it has
            shape `(L, *batch, d, d)`, where `batch` broadcasts against the state's leading dims, and acts on the
            state's last axis: `x_l[..., i] = sum_j A_l[..., i, j] x_{l-1}[..., j] + b_l[..., i]`.
        b (`torch.Tensor`): the inputs, shape `(L, *state)`.
        x0 (`torch.Tensor`): the initial (or, with `reverse=True`, final) state, shape `state`.
        structure (`str`): `"elementwise"` or `"dense"`.
        reverse (`bool`): solve the adjoint recurrence from the end with transposed blocks.
        check_finite (`bool`): raise a `ValueError` when an input holds NaN or inf (as scipy.linalg does). The check
            costs a reduction and a device sync; callers that have checked their inputs can turn it off, and then
            non-finite inputs give non-finite outputs.

    Returns:
        `torch.Tensor` of shape `(L, *state)`: the states `x_1, ..., x_L`.

    Precision: float32 and float64 are solved in their own dtype; float16 and bfloat16 are solved in float32 and
    rounded once at the end, so the result is within one rounding (relative 2**-8 for bfloat16) of the float32
    solution. Against `sequential_solve` the tests guarantee, relative to the largest state: 1e-12 in float64,
    1e-5 in float32 and 1e-2 in bfloat16, for steps with `||A_l|| <= 1`; the reduction reassociates products,
    so for expanding steps the error grows like the conditioning of the system, as it does for the loop.

    Differentiable with autograd (every level is out of place), on CPU and CUDA.
    """
    dtype = b.dtype
    A, b, x0 = _prepare(A, b, x0, structure, reverse, check_finite)
    L = b.shape[0]
    b = torch.cat([_apply(A[:1], x0.unsqueeze(0), structure) + b[:1], b[1:]])
    # `tail` holds \bar A_l for l >= s only: equations l < s already reach x0 and need no matrix.
    tail = A[1:]
    s = 1
    while s < L:
        b = torch.cat([b[:s], _apply(tail, b[:-s], structure) + b[s:]])  # (L, *state)
        if 2 * s < L:
            tail = _compose(tail[s:], tail[: L - 2 * s], structure)  # \bar A_l for l >= 2s
        s *= 2
    return _finish(b, dtype, reverse)


def sequential_solve(
    A: torch.Tensor,
    b: torch.Tensor,
    x0: torch.Tensor,
    *,
    structure: str = "elementwise",
    reverse: bool = False,
    check_finite: bool = True,
) -> torch.Tensor:
    """The plain loop over l for the recurrence `pcr_solve` solves; same arguments, same result.

    `O(L)` work in L sequential steps. The reference every test of `pcr_solve` compares against.
    """
    dtype = b.dtype
    A, b, x = _prepare(A, b, x0, structure, reverse, check_finite)
    states = []
    for l in range(b.shape[0]):
        x = _apply(A[l], x, structure) + b[l]
        states.append(x)
    return _finish(torch.stack(states), dtype, reverse)
