import copy

import pytest
import torch
from torch import nn

from pcr_diffusers import SolveResult
from pcr_diffusers.nn import PCRSequential, Residual

KINDS = ["mlp", "residual", "norm"]
TOL = {torch.float32: 1e-5, torch.float64: 1e-13}  # a bound on each layer's residual; the tests compare at 1e-4, 1e-12


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a loaded machine every parallel op of the solver would
    wait for a descheduled second thread (milliseconds per op); these tests check values, not speed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_layers(kind, L, d=6, gain=0.8, dtype=torch.float64, seed=0):
    """L random layers of one kind: `tanh(W x + c)`, `x + 0.3 tanh(W x + c)`, or pre-norm `x + s W gelu(LN x)`."""
    torch.manual_seed(seed)
    layers = []
    for _ in range(L):
        linear = nn.Linear(d, d)
        nn.init.normal_(linear.weight, std=gain / d**0.5)
        nn.init.normal_(linear.bias, std=0.5)
        if kind == "mlp":
            layers.append(nn.Sequential(linear, nn.Tanh()))
        elif kind == "residual":
            layers.append(Residual(nn.Sequential(linear, nn.Tanh()), scale=0.3))
        else:
            norm = nn.LayerNorm(d)
            nn.init.normal_(norm.weight, 1.0, 0.1)
            layers.append(Residual(nn.Sequential(norm, nn.GELU(), linear), scale=2 / L**0.5))
    return [layer.to(dtype) for layer in layers]


def outputs_and_gradients(model, x):
    """`model(x)` and the gradients, with respect to `x` and every parameter, of a loss weighting outputs unequally."""
    x = x.detach().requires_grad_()
    y = model(x)
    weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
    grads = torch.autograd.grad((weights * y).sum() + y.square().sum(), [x, *model.parameters()])
    return y.detach(), grads


def sequential_states(layers, x):
    """All states `x_1, ..., x_L` of the plain loop, `(L, *x.shape)`."""
    states = []
    with torch.no_grad():
        for layer in layers:
            x = layer(x)
            states.append(x)
    return torch.stack(states)


def assert_matches_twin(pcr, x, atol, rtol):
    twin = nn.Sequential(*pcr)
    y, grads = outputs_and_gradients(pcr, x)
    y_ref, grads_ref = outputs_and_gradients(twin, x)
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol)
    assert max(g.abs().max() for g in grads_ref) > 0.1  # the comparison below is not between zeros
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, atol=atol * max(1.0, g_ref.abs().max().item()), rtol=rtol)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("L", [1, 2, 7, 100, 257])
def test_outputs_and_gradients_equal_nn_sequential(kind, dtype, L):
    pcr = PCRSequential(*make_layers(kind, L, dtype=dtype), tol=TOL[dtype])
    x = torch.randn(3, 6, dtype=dtype)
    atol = 1e-12 if dtype == torch.float64 else 1e-4
    assert_matches_twin(pcr, x, atol=atol, rtol=atol)
    result = pcr.last_result
    assert isinstance(result, SolveResult) and result.converged
    assert result.states.shape == (L, 3, 6)
    assert result.num_iters <= min(L, 12) and len(result.residuals) == result.num_iters


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck(kind):
    pcr = PCRSequential(*make_layers(kind, 4, d=3), tol=1e-12)
    names = [name for name, _ in pcr.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in pcr.parameters()]
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)

    def f(x, *params):  # every parameter an input, so gradcheck perturbs the layers' weights too
        return torch.func.functional_call(pcr, dict(zip(names, params, strict=True)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params))
    assert pcr.last_result.converged


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gain", [0.5, 1.0, 1.3])
def test_converges_for_contractive_and_mildly_expansive_stacks(gain, dtype):
    L = 1024
    pcr = PCRSequential(*make_layers("mlp", L, d=8, gain=gain, dtype=dtype))
    x = torch.randn(4, 8, dtype=dtype)
    with torch.no_grad():
        y, y_ref = pcr(x), nn.Sequential(*pcr)(x)
    assert pcr.last_result.converged and pcr.last_result.num_iters <= 16, pcr.last_result.num_iters
    # The default tolerance sqrt(eps) bounds each layer's residual; Newton's quadratic convergence puts the last
    # accepted residuals far below it.
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-12)


def test_unconverged_solve_is_reported_and_finished_sequentially():
    L = 100
    pcr = PCRSequential(*make_layers("mlp", L, gain=1.3), tol=1e-10, max_iters=3)
    x = torch.randn(3, 6, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        assert_matches_twin(pcr, x, atol=1e-12, rtol=1e-12)
    result = pcr.last_result
    assert not result.converged and result.num_iters == 3
    assert result.num_accepted < L and result.residuals[-1] > 1e-10  # Newton's own iterate was not the answer
    torch.testing.assert_close(result.states, sequential_states(pcr, x), rtol=0, atol=1e-12)


def test_identity_jacobian_forward_with_exact_backward():
    pcr = PCRSequential(*make_layers("residual", 64), jacobian="identity", tol=1e-10)
    assert_matches_twin(pcr, torch.randn(3, 6, dtype=torch.float64), atol=1e-9, rtol=1e-9)
    assert pcr.last_result.converged


def test_sequential_mode_is_the_plain_loop():
    layers = make_layers("norm", 9)
    seq = PCRSequential(*layers, mode="sequential")
    x = torch.randn(3, 6, dtype=torch.float64)
    assert torch.equal(seq(x), nn.Sequential(*layers)(x))
    assert seq.last_result is None


@pytest.mark.parametrize("shape", [(6,), (2, 3, 6)])
def test_inputs_with_any_leading_shape(shape):
    pcr = PCRSequential(*make_layers("residual", 20), tol=1e-13)
    x = torch.randn(shape, dtype=torch.float64)
    y = pcr(x)
    assert y.shape == shape
    torch.testing.assert_close(y, nn.Sequential(*pcr)(x), rtol=0, atol=1e-12)


def test_batchnorm_in_eval_mode_is_stacked_and_in_training_mode_refused():
    torch.manual_seed(0)
    layers = [nn.Sequential(nn.Linear(5, 5), nn.BatchNorm1d(5), nn.Tanh()).double() for _ in range(30)]
    for layer in layers:  # non-trivial running statistics
        layer[1].running_mean.normal_()
        layer[1].running_var.uniform_(0.5, 2.0)
    pcr = PCRSequential(*layers, tol=1e-13)
    x = torch.randn(4, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="layer 0 \\(1\\) is a BatchNorm1d"):
        pcr(x)
    pcr.eval()
    assert_matches_twin(pcr, x, atol=1e-12, rtol=1e-12)


def test_parameter_updates_and_new_layers_are_seen():
    pcr = PCRSequential(*make_layers("residual", 10), tol=1e-13)
    x = torch.randn(3, 6, dtype=torch.float64)
    pcr(x).square().sum().backward()
    torch.optim.SGD(pcr.parameters(), lr=0.1).step()
    pcr.append(make_layers("residual", 1, seed=1)[0])
    pcr[3].fn[0].weight = nn.Parameter(torch.zeros(6, 6, dtype=torch.float64))
    torch.testing.assert_close(pcr(x), nn.Sequential(*pcr)(x), rtol=0, atol=1e-12)
    assert pcr.last_result.states.shape[0] == 11


def test_slices_keep_the_configuration():
    pcr = PCRSequential(*make_layers("mlp", 10), tol=1e-9, max_iters=5)
    head = pcr[:4]
    assert isinstance(head, PCRSequential) and len(head) == 4
    assert (head.mode, head.tol, head.max_iters) == ("pcr", 1e-9, 5)


def test_unstackable_layers_are_refused_with_the_difference_named():
    x = torch.randn(2, 4)
    cases = [
        ([nn.Sequential(nn.Linear(4, 4), nn.Tanh()), nn.Sequential(nn.Linear(4, 4), nn.ReLU())], "layer 1 .*type"),
        ([nn.LeakyReLU(0.1), nn.LeakyReLU(0.2)], "layer 1 .*negative_slope"),
        ([nn.Linear(4, 4), nn.Linear(4, 4, bias=False)], "layer 1 .*bias"),
        ([nn.Linear(4, 4), nn.Dropout(0.5)], "layer 1 .*type"),
        ([nn.Dropout(0.5), nn.Dropout(0.5)], "layer 0 is a Dropout in training mode"),
        ([nn.Linear(4, 5), nn.Linear(4, 5)], "same shape"),
    ]
    for layers, message in cases:
        with pytest.raises(ValueError, match=f"`layers`.*{message}"):
            PCRSequential(*layers)(x)
    hooked = [nn.Linear(4, 4), nn.Linear(4, 4)]
    hooked[1].register_forward_hook(lambda *args: None)
    with pytest.raises(ValueError, match="layer 1 has forward hooks"):
        PCRSequential(*hooked)(x)
    dropout = PCRSequential(nn.Dropout(0.5), nn.Dropout(0.5)).eval()
    assert torch.equal(dropout(x), x)


def test_bad_arguments_are_refused_with_clear_errors():
    layers = make_layers("mlp", 3)
    with pytest.raises(ValueError, match="mode"):
        PCRSequential(*layers, mode="parallel")
    with pytest.raises(ValueError, match="jacobian"):
        PCRSequential(*layers, jacobian="broyden")
    with pytest.raises(ValueError, match="tol"):
        PCRSequential(*layers, tol=0.0)
    with pytest.raises(ValueError, match="tol"):
        PCRSequential(*layers, tol=float("nan"))
    with pytest.raises(ValueError, match="max_iters"):
        PCRSequential(*layers, max_iters=0)
    with pytest.raises(ValueError, match="max_iters"):
        PCRSequential(*layers, max_iters=2.5)
    pcr = PCRSequential(*layers)
    with pytest.raises(TypeError, match="input"):
        pcr(torch.ones(2, 6, dtype=torch.long))
    with pytest.raises(TypeError, match="input.*float32.*float64"):
        pcr(torch.ones(2, 6))
    with pytest.raises(ValueError, match="input"):
        pcr(torch.tensor(1.0, dtype=torch.float64))
    with pytest.raises(TypeError, match="fn"):
        Residual(torch.tanh)
    with pytest.raises(ValueError, match="scale"):
        Residual(nn.Tanh(), scale=float("inf"))


def test_empty_stack_is_the_identity_and_deepcopy_works():
    x = torch.randn(2, 3)
    assert torch.equal(PCRSequential()(x), x)
    pcr = PCRSequential(*make_layers("mlp", 5, d=3, dtype=torch.float32))
    pcr(x)
    clone = copy.deepcopy(pcr)
    torch.testing.assert_close(clone(x), pcr(x))


def test_an_input_of_the_wrong_width_gets_a_clear_error():
    pcr = PCRSequential(*make_layers("mlp", 3))
    with pytest.raises(ValueError, match="`input` with last axis 5 does not fit layer 0"):
        pcr(torch.randn(2, 5, dtype=torch.float64))
