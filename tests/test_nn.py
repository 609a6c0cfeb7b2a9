import copy
import math

import pytest
import torch
from torch import nn

from pcr_diffusers import SolveResult, newton_solve
from pcr_diffusers.core import ConstantJacobian, make_jacobian
from pcr_diffusers.nn import EXACT_MAX_SIZE, PCRSequential, Residual, SampleDiagonalJacobian, TrustRegionJacobian
from pcr_diffusers.nn.jacobians import resolve_jacobian

KINDS = ["mlp", "residual", "norm"]
JACOBIANS = ["exact", "diagonal", "identity"]
TOL = {torch.float32: 2e-6, torch.float64: 1e-13}  # a bound on each layer's residual
ATOL = {torch.float32: 1e-4, torch.float64: 1e-8}  # what the outputs and gradients are compared at


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


@pytest.mark.parametrize("jacobian", JACOBIANS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("L", [1, 2, 7, 65])
@pytest.mark.parametrize("batch", [1, 3])
def test_outputs_and_gradients_equal_nn_sequential(kind, dtype, L, batch, jacobian):
    if kind == "mlp" and jacobian == "identity":
        pytest.skip("Picard iteration diverges on a non-residual tanh chain; see the damping test")
    pcr = PCRSequential(*make_layers(kind, L, dtype=dtype), jacobian=jacobian, tol=TOL[dtype])
    x = torch.randn(batch, 6, dtype=dtype)
    assert_matches_twin(pcr, x, atol=ATOL[dtype], rtol=ATOL[dtype])
    result = pcr.last_result
    assert isinstance(result, SolveResult) and result.converged
    assert result.states.shape == (L, batch, 6)
    assert len(result.residuals) == result.num_iters <= (min(L, 12) if jacobian == "exact" else L)
    if jacobian != "exact":  # the adjoint was solved by Newton with exact VJPs, within the same bound
        assert pcr.last_adjoint_result.converged and pcr.last_adjoint_result.num_iters <= L


def test_a_257_block_stack_with_picard():
    pcr = PCRSequential(*make_layers("norm", 257), jacobian="identity", tol=TOL[torch.float64])
    assert_matches_twin(pcr, torch.randn(1, 6, dtype=torch.float64), atol=1e-8, rtol=1e-8)
    assert pcr.last_result.converged and pcr.last_result.num_iters < 64


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
    with pytest.raises(ValueError, match="`input` of shape \\(2, 5\\) does not fit layer 0"):
        pcr(torch.randn(2, 5, dtype=torch.float64))


class ConvBlock(nn.Module):
    """A user's own pre-norm conv residual block on images `(B, C, H, W)`: `x + s conv(silu(GroupNorm(x)))`."""

    def __init__(self, channels, scale):
        super().__init__()
        self.norm = nn.GroupNorm(2, channels)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.scale = scale

    def forward(self, x):
        return x + self.scale * self.conv(nn.functional.silu(self.norm(x)))


def make_conv_blocks(L, channels=2, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    blocks = [ConvBlock(channels, 2 / L**0.5) for _ in range(L)]
    for block in blocks:
        nn.init.normal_(block.norm.weight, 1.0, 0.2)
        nn.init.normal_(block.norm.bias, 0.0, 0.2)
    return [block.to(dtype) for block in blocks]


@pytest.mark.parametrize("jacobian", JACOBIANS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("L", [1, 2, 7, 65])
@pytest.mark.parametrize("batch", [1, 3])
def test_conv_resnet_outputs_and_gradients_equal_nn_sequential(L, batch, dtype, jacobian):
    pcr = PCRSequential(*make_conv_blocks(L, dtype=dtype), jacobian=jacobian, tol=TOL[dtype])
    x = torch.randn(batch, 2, 4, 4, dtype=dtype)  # 32 entries per sample
    assert_matches_twin(pcr, x, atol=ATOL[dtype], rtol=ATOL[dtype])
    assert pcr.last_result.converged and pcr.last_result.states.shape == (L, batch, 32)


def test_sequences_in_training_mode_with_per_sample_normalisation():
    torch.manual_seed(0)
    blocks = [Residual(nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4), nn.GELU()), scale=0.3) for _ in range(9)]
    x = torch.randn(3, 5, 4, dtype=torch.float64)  # (B, T, d)
    for jacobian in JACOBIANS:
        pcr = PCRSequential(*[block.double() for block in blocks], jacobian=jacobian, tol=1e-13).train()
        assert_matches_twin(pcr, x, atol=1e-8, rtol=1e-8)
        assert pcr.last_result.states.shape == (9, 3, 20)


@pytest.mark.parametrize("jacobian", JACOBIANS)
@pytest.mark.parametrize("kind", ["norm", "conv"])
def test_gradcheck_every_jacobian(kind, jacobian):
    layers = make_layers(kind, 4, d=3) if kind == "norm" else make_conv_blocks(3)
    x = torch.randn(2, 3, dtype=torch.float64) if kind == "norm" else torch.randn(2, 2, 2, 2, dtype=torch.float64)
    pcr = PCRSequential(*layers, jacobian=jacobian, tol=1e-12)
    names = [name for name, _ in pcr.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in pcr.parameters()]

    def f(x, *params):
        return torch.func.functional_call(pcr, dict(zip(names, params, strict=True)), (x,))

    assert torch.autograd.gradcheck(f, (x.requires_grad_(), *params))


def test_hutchinson_diagonal_converges_to_the_same_chain():
    pcr = PCRSequential(*make_conv_blocks(20), jacobian=SampleDiagonalJacobian(probes=4), tol=1e-13)
    assert_matches_twin(pcr, torch.randn(3, 2, 4, 4, dtype=torch.float64), atol=1e-8, rtol=1e-8)
    assert pcr.last_result.converged and pcr.last_adjoint_result.converged
    with pytest.raises(ValueError, match="probes"):
        SampleDiagonalJacobian(probes=0)


def test_exact_diagonal_is_the_jacobians_diagonal():
    layers = make_conv_blocks(3)
    x_prev = torch.randn(3, 2, 32, dtype=torch.float64)  # (L, batch, D)

    def step(ls, h):
        return torch.stack([layers[l](h[i].reshape(2, 2, 4, 4)).reshape(2, 32) for i, l in enumerate(ls)])

    jacobian = SampleDiagonalJacobian()
    jacobian.reset(3, x_prev[0])
    _, diag = jacobian.evaluate(step, torch.arange(3), x_prev)
    for l, layer in enumerate(layers):
        for b in range(2):
            J = torch.autograd.functional.jacobian(
                lambda v, layer=layer: layer(v.reshape(1, 2, 4, 4)).reshape(32), x_prev[l, b]
            )
            torch.testing.assert_close(diag[l, b], J.diagonal(), rtol=1e-12, atol=1e-12)


def test_auto_and_the_size_limit_of_exact():
    assert resolve_jacobian("auto", 16)[0] == "exact" and resolve_jacobian("auto", 17, residual=True)[0] == "identity"
    # Picard can diverge on stacks that are not residual: exact while the dense solve is allowed
    assert resolve_jacobian("auto", 256)[0] == "exact" and resolve_jacobian("auto", 257)[0] == "identity"
    big = PCRSequential(*make_conv_blocks(2, channels=4), jacobian="exact")
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)  # 256 entries: at the limit
    assert resolve_jacobian("exact", EXACT_MAX_SIZE)[0] == "exact"
    with pytest.raises(ValueError, match="jacobian='exact'.*257 x 257.*limit of 256"):
        resolve_jacobian("exact", EXACT_MAX_SIZE + 1)
    with pytest.raises(ValueError, match="jacobian='exact'.*1024 x 1024"):
        big(torch.randn(1, 4, 16, 16, dtype=torch.float64))
    torch.testing.assert_close(PCRSequential(*big, tol=1e-13)(x), nn.Sequential(*big)(x), rtol=1e-8, atol=1e-8)


def test_damping_keeps_a_divergent_picard_chain_bounded():
    layers = make_layers("mlp", 100)  # non-residual: J = I is a poor model and Picard's iterates blow up
    x = torch.randn(3, 6, dtype=torch.float64)
    plain = PCRSequential(*layers, jacobian="identity", tol=1e-10, max_iters=100)
    damped = PCRSequential(*layers, jacobian="identity", damping=3.0, tol=1e-10, max_iters=100)
    assert_matches_twin(damped, x, atol=1e-8, rtol=1e-8)
    plain(x)
    assert max(plain.last_result.residuals) > 1e6 and max(damped.last_result.residuals) < 10
    assert damped.last_result.num_iters < 0.8 * plain.last_result.num_iters
    with pytest.raises(ValueError, match="damping"):
        PCRSequential(*layers, damping=-1.0)


def test_unconverged_adjoint_is_reported_and_finished_sequentially():
    pcr = PCRSequential(*make_conv_blocks(30), jacobian="identity", tol=1e-13, max_iters=4)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    with pytest.warns(RuntimeWarning) as caught:
        assert_matches_twin(pcr, x, atol=1e-8, rtol=1e-8)
    assert {"forward pass", "backward (adjoint) pass"} == {
        what for what in ("forward pass", "backward (adjoint) pass") for w in caught if what in str(w.message)
    }
    assert not pcr.last_adjoint_result.converged and pcr.last_adjoint_result.num_iters == 4


def test_blocks_that_are_not_per_sample_or_change_the_shape_are_refused():
    class CentreOverBatch(nn.Module):
        def forward(self, x):
            return x - x.mean(0)

    x = torch.randn(3, 4, 4, 4)
    cases = [
        (
            [nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(4, 8, 3, padding=1)],
            "layer 0 \\(Conv2d\\) must map .* same shape",
        ),
        ([nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3)], "layer 0 \\(Conv2d\\) must map .* same shape"),
        ([CentreOverBatch(), CentreOverBatch()], "layer 0 \\(CentreOverBatch\\) .* couples the samples"),
        ([nn.BatchNorm2d(4), nn.BatchNorm2d(4)], "layer 0 is a BatchNorm2d that normalises with batch statistics"),
    ]
    for layers, message in cases:
        with pytest.raises(ValueError, match=f"`layers`.*{message}"):
            PCRSequential(*layers)(x)
    with pytest.raises(ValueError, match="jacobian"):
        PCRSequential(nn.Tanh(), jacobian="zero")


def test_trust_region_keeps_a_divergent_picard_chain_convergent():
    layers = make_layers("mlp", 1000)  # non-residual: J = I is a poor model and Picard's iterates blow up
    x = torch.randn(3, 6, dtype=torch.float64)
    # undamped Picard accepts one layer per iteration here, so it cannot finish 1000 layers within 300 iterations
    plain = PCRSequential(*layers, jacobian="identity", max_iters=300)
    trust = PCRSequential(*layers, jacobian="identity", damping="trust", max_iters=300)
    with pytest.warns(RuntimeWarning, match="did not converge"), torch.no_grad():
        plain(x)
    assert not plain.last_result.converged and max(plain.last_result.residuals) > 1e100
    assert_matches_twin(trust, x, atol=1e-8, rtol=1e-8)
    assert trust.last_result.converged and max(trust.last_result.residuals) < 1e4
    assert trust.last_adjoint_result.converged


def test_trust_region_avoids_the_float32_overflow_of_undamped_picard():
    layers = make_layers("mlp", 1000, dtype=torch.float32)
    x = torch.randn(3, 6)
    plain = PCRSequential(*layers, jacobian="identity", max_iters=1000)
    with pytest.warns(RuntimeWarning, match="non-finite"), torch.no_grad():
        plain(x)
    assert not plain.last_result.converged and plain.last_result.num_iters < 100  # stopped at the overflow
    trust = PCRSequential(*layers, jacobian="identity", damping="trust", max_iters=1000)
    with torch.no_grad():
        y = trust(x)
    assert trust.last_result.converged and trust.last_result.num_iters < 200
    torch.testing.assert_close(y, nn.Sequential(*layers)(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("jacobian", JACOBIANS)
@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("L", [1, 7, 65])
def test_trust_region_outputs_and_gradients_equal_nn_sequential(kind, L, jacobian):
    # the non-residual tanh MLP under Picard, which diverges undamped, is included
    layers = make_layers("mlp", L) if kind == "mlp" else make_conv_blocks(L)
    x = torch.randn(3, 6, dtype=torch.float64) if kind == "mlp" else torch.randn(3, 2, 4, 4, dtype=torch.float64)
    pcr = PCRSequential(*layers, jacobian=jacobian, damping="trust", tol=TOL[torch.float64], max_iters=L)
    assert_matches_twin(pcr, x, atol=1e-8, rtol=1e-8)
    assert pcr.last_result.converged
    if jacobian != "exact":
        assert pcr.last_adjoint_result.converged


def chain(L, d=6, gain=0.8, seed=0):
    """`step(ls, x) = tanh(W_l x + c_l)` on states `(n, d)`, for `newton_solve` directly."""
    generator = torch.Generator().manual_seed(seed)
    W = torch.randn(L, d, d, generator=generator, dtype=torch.float64) * gain / d**0.5
    c = torch.randn(L, d, generator=generator, dtype=torch.float64) * 0.5
    return lambda ls, x: torch.tanh(torch.einsum("nij,nj->ni", W[ls], x) + c[ls])


@pytest.mark.parametrize("inner, damped", [("exact", False), ("identity", True)])
def test_trust_region_damps_only_steps_that_raise_the_residual(inner, damped):
    L, lambdas = 300, []
    jacobian = TrustRegionJacobian(make_jacobian(inner))
    x0 = torch.randn(6, dtype=torch.float64)
    result = newton_solve(
        chain(L), x0, L, jacobian=jacobian, callback=lambda **_: lambdas.append(jacobian.damping.item())
    )
    assert result.converged
    if damped:  # Picard on a non-residual chain: lambda rises after the blow-ups, within its bound
        assert 0 < max(lambdas) <= jacobian.max_damping
        assert result.num_iters < newton_solve(chain(L), x0, L, jacobian=inner).num_iters
    else:  # Newton's residuals fall every iteration: it stays plain Newton, with the same iterates
        assert max(lambdas) == 0
        plain = newton_solve(chain(L), x0, L, jacobian=inner)
        assert result.num_iters == plain.num_iters and torch.equal(result.states, plain.states)


def test_trust_region_still_reports_non_convergence():
    pcr = PCRSequential(*make_layers("mlp", 100, gain=1.3), damping="trust", tol=1e-10, max_iters=3)
    x = torch.randn(3, 6, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        assert_matches_twin(pcr, x, atol=1e-12, rtol=1e-12)
    assert not pcr.last_result.converged and pcr.last_result.num_iters == 3
    assert pcr[:10].damping == "trust" and "damping='trust'" in repr(pcr)


def test_bad_damping_values_are_refused():
    layers = make_layers("mlp", 3)
    for damping in ["trusted", "Trust", None, True, -1.0, float("inf"), float("nan")]:
        with pytest.raises(ValueError, match="`damping` must be a finite number >= 0 or one of \\('trust',\\)"):
            PCRSequential(*layers, damping=damping)
    for name, value in [("grow", 1.0), ("grow", True), ("shrink", 0.5), ("max_damping", 0.0), ("shrink", math.inf)]:
        with pytest.raises(ValueError, match=f"`{name}` must be a finite number >"):
            TrustRegionJacobian(ConstantJacobian(1.0), **{name: value})
