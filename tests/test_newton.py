import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pcr_diffusers import SolveResult, newton_solve
from pcr_diffusers.core import SecantJacobian


def tanh_chain(L, d=8, gain=0.5, dtype=torch.float64, seed=0):
    """x_l = tanh(W_l x_{l-1} + c_l): a random MLP, contractive for gain < 1."""
    gen = torch.Generator().manual_seed(seed)
    W = (torch.randn(L, d, d, generator=gen, dtype=torch.float64) * gain / d**0.5).to(dtype)
    c = (torch.randn(L, d, generator=gen, dtype=torch.float64) * 0.5).to(dtype)
    x0 = torch.randn(d, generator=gen, dtype=torch.float64).to(dtype)

    def step(ls, x):
        return torch.tanh((W[ls] @ x.unsqueeze(-1)).squeeze(-1) + c[ls])

    return step, x0


def residual_chain(L, d=8, h=0.01, dtype=torch.float64, seed=0):
    """x_l = x_{l-1} + h g_l(x_{l-1}): near-identity steps, like a ResNet or a diffusion sampler."""
    inner, x0 = tanh_chain(L, d, gain=1.0, dtype=dtype, seed=seed)

    def step(ls, x):
        return x + h * inner(ls, x)

    return step, x0


def sequential(step, x0, L):
    states, x = [], x0
    for l in range(L):
        x = step(torch.tensor([l]), x[None])[0]
        states.append(x)
    return torch.stack(states)


@pytest.mark.parametrize("L", [7, 101])
def test_exact_newton_converges_superlinearly(L):
    step, x0 = tanh_chain(L)
    out = newton_solve(step, x0, L, jacobian="exact", tol=1e-10)
    assert isinstance(out, SolveResult)
    assert out.converged and out.num_iters <= 7
    torch.testing.assert_close(out.states, sequential(step, x0, L), rtol=0, atol=1e-10)
    r = out.residuals
    assert len(r) == out.num_iters and out.num_evaluations <= L * out.num_iters
    if len(r) >= 4:  # the contraction factor itself shrinks: quadratic, not linear, convergence
        ratios = [r[k + 1] / r[k] for k in range(len(r) - 4, len(r) - 1)]
        assert ratios[0] > ratios[1] > ratios[2] and ratios[2] < 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_jacobian_converges(dtype):
    step, x0 = tanh_chain(37, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    out = newton_solve(step, x0, 37, jacobian="zero", tol=tol)
    assert out.converged
    torch.testing.assert_close(out.states, sequential(step, x0, 37), rtol=0, atol=10 * tol)


@pytest.mark.parametrize("jacobian", ["identity", "secant"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("L", [201, 1000])
def test_near_identity_chain_needs_few_iterations(jacobian, dtype, L):
    step, x0 = residual_chain(L, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    out = newton_solve(step, x0, L, jacobian=jacobian, tol=tol)
    assert out.converged and out.num_iters <= 12, out.num_iters
    torch.testing.assert_close(out.states, sequential(step, x0, L), rtol=0, atol=100 * tol)


@pytest.mark.parametrize("jacobian", ["identity", "zero", "exact", "diagonal", "secant"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_max_iters_equal_to_num_steps_is_exact(jacobian, dtype):
    L = 23
    step, x0 = tanh_chain(L, gain=0.9, dtype=dtype)
    # A tolerance of zero would be refused; the tiniest positive one accepts only exact steps.
    out = newton_solve(step, x0, L, jacobian=jacobian, tol=1e-300, max_iters=L)
    assert out.converged and out.num_iters <= L
    torch.testing.assert_close(
        out.states, sequential(step, x0, L), rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-14
    )


def test_first_k_states_are_exact_after_k_iterations():
    step, x0 = tanh_chain(30, gain=0.9)
    out = newton_solve(step, x0, 30, jacobian="zero", tol=1e-300, max_iters=5)
    assert not out.converged and out.num_accepted >= 5
    torch.testing.assert_close(out.states[:5], sequential(step, x0, 30)[:5], rtol=0, atol=1e-15)


@pytest.mark.parametrize("window", [1, 5, 16])
def test_sliding_window_reaches_the_same_states(window):
    L = 101
    step, x0 = residual_chain(L)
    out = newton_solve(step, x0, L, jacobian="secant", tol=1e-10, window=window)
    assert out.converged
    assert out.num_evaluations <= window * out.num_iters
    torch.testing.assert_close(out.states, sequential(step, x0, L), rtol=0, atol=1e-8)


def test_callable_jacobians_elementwise_and_dense():
    L = 41
    step, x0 = residual_chain(L)
    ref = sequential(step, x0, L)
    ones = newton_solve(step, x0, L, jacobian=lambda ls, x, fx: torch.ones(len(ls), dtype=fx.dtype), tol=1e-10)
    picard = newton_solve(step, x0, L, jacobian="identity", tol=1e-10)
    assert ones.num_iters == picard.num_iters
    torch.testing.assert_close(ones.states, ref, rtol=0, atol=1e-8)

    def eye(ls, x, fx):
        return torch.eye(x.shape[-1], dtype=x.dtype).expand(len(ls), -1, -1)

    eye.structure = "dense"
    dense = newton_solve(step, x0, L, jacobian=eye, tol=1e-10)
    assert dense.num_iters == picard.num_iters
    torch.testing.assert_close(dense.states, picard.states)


def test_secant_per_sample_slopes():
    step, x0 = residual_chain(50)

    def batch_step(ls, x):  # (n, 2, d): the same chain for two samples
        return torch.stack([step(ls, x[:, i]) for i in range(x.shape[1])], dim=1)

    x0 = torch.stack([x0, 2 * x0])
    out = newton_solve(batch_step, x0, 50, jacobian=SecantJacobian(dims=(1,)), tol=1e-10)
    assert out.converged and out.num_iters <= 12
    for i in range(2):
        torch.testing.assert_close(out.states[:, i], sequential(step, x0[i], 50), rtol=0, atol=1e-8)


def test_non_finite_step_output_stops_unconverged():
    inner, x0 = tanh_chain(20)

    def step(ls, x):
        out = inner(ls, x)
        return torch.where((ls == 12).reshape(-1, 1), float("nan"), out)

    out = newton_solve(step, x0, 20, jacobian="exact", tol=1e-10)
    assert not out.converged and out.num_iters == 1
    assert torch.isfinite(out.states).all()
    assert out.residuals[-1] != out.residuals[-1]  # the NaN is recorded, not hidden


def test_bad_input_is_refused_with_clear_errors():
    step, x0 = tanh_chain(5)
    with pytest.raises(ValueError, match="identity"):
        newton_solve(step, x0, 5, jacobian="broyden")
    with pytest.raises(ValueError, match="num_steps"):
        newton_solve(step, x0, 0)
    with pytest.raises(ValueError, match="tol"):
        newton_solve(step, x0, 5, tol=0.0)
    with pytest.raises(ValueError, match="window"):
        newton_solve(step, x0, 5, window=0)
    with pytest.raises(ValueError, match="max_iters"):
        newton_solve(step, x0, 5, max_iters=-1)
    with pytest.raises(ValueError, match="init"):
        newton_solve(step, x0, 5, init=torch.zeros(4, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="init"):
        newton_solve(step, x0, 5, init=torch.zeros(5, 8))
    with pytest.raises(ValueError, match="shape"):
        newton_solve(lambda ls, x: x[:, :-1], x0, 5, jacobian="identity")
    with pytest.raises(TypeError, match="dtype"):
        newton_solve(lambda ls, x: x.float(), x0, 5, jacobian="identity")
    with pytest.raises(TypeError, match="x0"):
        newton_solve(step, x0.long(), 5)
    with pytest.raises(ValueError, match="dims"):
        newton_solve(step, x0, 5, jacobian=SecantJacobian(dims=(3,)))


def test_a_window_chosen_each_iteration_reaches_the_same_states_and_is_called_with_the_accepted_steps():
    L = 101
    step, x0 = residual_chain(L)
    constant = newton_solve(step, x0, L, jacobian="secant", tol=1e-10, window=7)
    asked, sizes = [], []

    def recording(ls, x_prev):
        sizes.append(len(ls))
        return step(ls, x_prev)

    def window(num_accepted):
        asked.append(num_accepted)
        return 7

    same = newton_solve(recording, x0, L, jacobian="secant", tol=1e-10, window=window)
    assert same.num_iters == constant.num_iters and same.num_accepted == L
    torch.testing.assert_close(same.states, constant.states, rtol=0, atol=0)
    assert asked[0] == 0 and asked == sorted(asked) and len(asked) == same.num_iters

    sizes.clear()
    growing = newton_solve(recording, x0, L, jacobian="secant", tol=1e-10, window=lambda done: 1 + done % 13)
    assert growing.converged and len(set(sizes)) > 3
    torch.testing.assert_close(growing.states, sequential(step, x0, L), rtol=0, atol=1e-8)
    with pytest.raises(ValueError, match="window"):
        newton_solve(step, x0, L, window=lambda done: 0)


@settings(max_examples=30, deadline=None)
@given(
    L=st.integers(1, 40),
    sizes=st.lists(st.integers(1, 50), min_size=1, max_size=6),
    jacobian=st.sampled_from(["identity", "secant", "exact"]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_any_sequence_of_windows_gives_the_sequential_states(L, sizes, jacobian, dtype):
    """Whatever windows a callable asks for, round after round, each accepted state is within its tolerance."""
    step, x0 = residual_chain(L, dtype=dtype)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    out = newton_solve(step, x0, L, jacobian=jacobian, tol=tol, window=lambda done: sizes[done % len(sizes)])
    assert out.converged and out.num_iters <= L
    ref = sequential(step, x0, L)
    torch.testing.assert_close(out.states, ref, rtol=0, atol=2 * L * tol)


def test_extend_predicts_the_steps_entering_the_window():
    L = 60
    step, x0 = residual_chain(L)
    ref = sequential(step, x0, L)
    calls = []

    def exact_prediction(ls, x_last):
        calls.append((int(ls[0]), len(ls)))
        return ref[ls]

    plain = newton_solve(step, x0, L, jacobian="identity", tol=1e-10, window=10)
    predicted = newton_solve(step, x0, L, jacobian="identity", tol=1e-10, window=10, extend=exact_prediction)
    assert predicted.converged and predicted.num_iters < plain.num_iters
    assert calls and all(start >= 10 for start, _ in calls)  # only steps entering after the first window
    torch.testing.assert_close(predicted.states, ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("jacobian", ["secant", "exact"])
def test_pad_window_calls_step_with_one_shape_and_changes_nothing(jacobian):
    L, window = 23, 7
    step, x0 = residual_chain(L)
    sizes = []

    def recording(ls, x):
        sizes.append(len(ls))
        return step(ls, x)

    padded = newton_solve(recording, x0, L, jacobian=jacobian, tol=1e-12, window=window, pad_window=True)
    plain = newton_solve(step, x0, L, jacobian=jacobian, tol=1e-12, window=window)
    assert set(sizes) == {window} and padded.converged
    assert padded.num_iters == plain.num_iters and padded.num_evaluations == window * padded.num_iters
    torch.testing.assert_close(padded.states, plain.states, rtol=0, atol=1e-14)
