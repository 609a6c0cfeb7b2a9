import pytest
import torch

from pcr_diffusers import pcr_solve, sequential_solve

LENGTHS = [1, 2, 3, 7, 100, 1000]
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def make_system(L, kind, dtype, batch, seed=0):
    """A random recurrence with ||A_l|| <= 1 (the regime the docstring's tolerances cover)."""
    gen = torch.Generator().manual_seed(seed)
    lead = (3,) if batch else ()
    d = 4
    state = (*lead, d)
    if kind == "scalar":
        A = torch.rand(L, generator=gen, dtype=torch.float64) * 2 - 1
    elif kind == "scalar_padded":
        A = (torch.rand(L, generator=gen, dtype=torch.float64) * 2 - 1).reshape(L, *([1] * len(state)))
    elif kind == "diagonal":
        A = torch.rand(L, *state, generator=gen, dtype=torch.float64) * 2 - 1
    else:  # dense: scaled orthogonal blocks, one per sample when batched
        q, _ = torch.linalg.qr(torch.randn(L, *lead, d, d, generator=gen, dtype=torch.float64))
        A = 0.99 * q
    b = torch.randn(L, *state, generator=gen, dtype=torch.float64)
    x0 = torch.randn(state, generator=gen, dtype=torch.float64)
    return A.to(dtype), b.to(dtype), x0.to(dtype)


def structure_of(kind):
    return "dense" if kind == "dense" else "elementwise"


@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("kind", ["scalar", "scalar_padded", "diagonal", "dense"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [False, True])
def test_pcr_matches_sequential(L, kind, reverse, dtype, batch):
    A, b, x0 = make_system(L, kind, dtype, batch)
    kwargs = dict(structure=structure_of(kind), reverse=reverse)
    fast = pcr_solve(A, b, x0, **kwargs)
    ref = sequential_solve(A, b, x0, **kwargs)
    assert fast.shape == (L, *x0.shape) and fast.dtype == dtype
    assert (fast - ref).abs().max() <= TOL[dtype] * ref.abs().max().clamp(min=1)


def test_dense_blocks_shared_over_batch():
    A, b, x0 = make_system(37, "dense", torch.float64, batch=False)
    b = torch.randn(37, 5, 4, dtype=torch.float64)
    x0 = torch.randn(5, 4, dtype=torch.float64)
    out = pcr_solve(A, b, x0, structure="dense")
    for i in range(5):  # each batch row is the unbatched system with the shared blocks
        torch.testing.assert_close(out[:, i], sequential_solve(A, b[:, i], x0[i], structure="dense"))


def test_reverse_is_the_transposed_recurrence():
    A, b, x0 = make_system(9, "dense", torch.float64, batch=False)
    x = pcr_solve(A, b, x0, structure="dense", reverse=True)
    nxt = torch.cat([x[1:], x0[None]])  # x_{l+1}, with x_{L+1} = x0
    torch.testing.assert_close(x, (A.transpose(-1, -2) @ nxt.unsqueeze(-1)).squeeze(-1) + b)


@pytest.mark.parametrize("kind", ["scalar", "diagonal", "dense"])
@pytest.mark.parametrize("L", [1, 7, 100])
def test_bfloat16_within_documented_tolerance(kind, L):
    A, b, x0 = make_system(L, kind, torch.bfloat16, batch=True)
    kwargs = dict(structure=structure_of(kind))
    exact = sequential_solve(A.double(), b.double(), x0.double(), **kwargs)
    out = pcr_solve(A, b, x0, **kwargs)
    assert out.dtype == torch.bfloat16
    assert (out.double() - exact).abs().max() <= 1e-2 * exact.abs().max()
    assert (out.double() - sequential_solve(A, b, x0, **kwargs).double()).abs().max() <= 1e-2 * exact.abs().max()


@pytest.mark.parametrize("kind", ["scalar", "diagonal", "dense"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("L", [1, 7, 100])
def test_gradients_match_the_loop(kind, reverse, L):
    A, b, x0 = make_system(L, kind, torch.float64, batch=True)
    weights = torch.randn(L, *x0.shape, dtype=torch.float64)
    kwargs = dict(structure=structure_of(kind), reverse=reverse)

    def grads(solve):
        inputs = [t.clone().requires_grad_() for t in (A, b, x0)]
        (solve(*inputs, **kwargs) * weights).sum().backward()
        return [t.grad for t in inputs]

    for fast, ref in zip(grads(pcr_solve), grads(sequential_solve), strict=True):
        torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["scalar", "dense"])
def test_gradcheck(kind):
    A, b, x0 = make_system(6, kind, torch.float64, batch=True)
    inputs = [t.clone().requires_grad_() for t in (A, b, x0)]
    assert torch.autograd.gradcheck(lambda *t: pcr_solve(*t, structure=structure_of(kind)), inputs)


def test_bad_input_is_refused_with_clear_errors():
    A, b, x0 = make_system(5, "diagonal", torch.float64, batch=False)
    with pytest.raises(ValueError, match="structure"):
        pcr_solve(A, b, x0, structure="tridiagonal")
    with pytest.raises(ValueError, match="x0"):
        pcr_solve(A, b, x0[:-1])
    with pytest.raises(ValueError, match="A"):
        pcr_solve(A[:-1], b, x0)
    with pytest.raises(ValueError, match="A"):
        pcr_solve(A[:, :-1], b, x0)
    with pytest.raises(ValueError, match="L >= 1"):
        pcr_solve(A[:0], b[:0], x0)
    with pytest.raises(TypeError, match="dtype"):
        pcr_solve(A.float(), b, x0)
    with pytest.raises(TypeError, match="x0"):
        pcr_solve(A, b, x0.tolist())
    bad = b.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        pcr_solve(A, bad, x0)
    with pytest.raises(ValueError, match="NaN"):
        sequential_solve(A, bad, x0)
    dense, b2, x2 = make_system(5, "dense", torch.float64, batch=True)
    with pytest.raises(ValueError, match="dense"):
        pcr_solve(dense[..., :-1], b2, x2, structure="dense")
    with pytest.raises(ValueError, match="dense"):
        pcr_solve(dense[:, :2], b2, x2, structure="dense")


@pytest.mark.parametrize("solve", [pcr_solve, sequential_solve])
def test_check_finite_false_skips_the_check_and_propagates(solve):
    A, b, x0 = make_system(9, "diagonal", torch.float64, batch=False)
    b[4, 0] = float("nan")
    out = solve(A, b, x0, check_finite=False)
    assert out[:4].isfinite().all() and out[4:, 0].isnan().all()
