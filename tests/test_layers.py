"""Every registered layer, unconditional and conditional, through the same mathematical checks.

Parameters are drawn from N(0, 1) (not the initial values): the log-determinant must match
``slogdet`` of the autograd Jacobian, the inverse must undo the forward map, and the Jacobian must
keep one sign at extreme parameters and inputs.
"""

import copy
import io
import pickle

import pytest
import torch
from conftest import CUDA, condition_rows, jacobian_blocks
from hypothesis import given, settings
from hypothesis import strategies as st

from pyro_flowguides import flows
from pyro_flowguides.transforms.permutation import Reverse
from pyro_flowguides.transforms.stacked import ConditionalFlowStack, FlowStack

DIM, CONTEXT, N = 5, 3, 6
CASES = [
    pytest.param(name, cond, id=f"{name}-{'cond' if cond else 'plain'}")
    for name in flows.available()
    for cond in (False, True)
]
TOL = {torch.float64: 1e-6, torch.float32: 2e-3}


def build(name, conditional, dtype=torch.float64, dim=DIM, seed=0, scale=1.0, **options):
    """A layer with every parameter drawn from N(0, scale²)."""
    torch.manual_seed(seed)
    layer = flows.make(name, dim, context_dim=CONTEXT if conditional else None, **options)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, scale)
    return layer.to(dtype)


def inputs(dtype, scale=2.0, seed=2, n=N, dim=DIM):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(n, dim, generator=g)).to(dtype)


@pytest.mark.parametrize(("name", "conditional"), CASES)
def test_log_det_matches_autograd_jacobian(name, conditional):
    layer = build(name, conditional)
    x = inputs(torch.float64)
    t = condition_rows(layer, x)
    y = t(x)
    log_det = t.log_abs_det_jacobian(x, y)
    assert log_det.shape == x.shape[:-1] and log_det.dtype == torch.float64
    sign, reference = torch.linalg.slogdet(jacobian_blocks(t, x))
    assert (sign != 0).all()
    torch.testing.assert_close(log_det, reference, rtol=1e-6, atol=1e-6)
    if layer.volume_preserving:
        assert (log_det == 0).all()


@pytest.mark.parametrize(("name", "conditional"), CASES)
def test_float32_agrees_with_float64(name, conditional):
    """The same parameters in float32 give the float64 map and log-det to float32 accuracy."""
    layer64 = build(name, conditional)
    layer32 = copy.deepcopy(layer64).float()
    x = inputs(torch.float64)
    t64, t32 = condition_rows(layer64, x), condition_rows(layer32, x.float())
    y64, y32 = t64(x), t32(x.float())
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), y64, rtol=1e-4, atol=1e-4)
    log_det32 = t32.log_abs_det_jacobian(x.float(), y32)
    torch.testing.assert_close(log_det32.double(), t64.log_abs_det_jacobian(x, y64), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(("name", "conditional"), CASES)
def test_log_det_of_any_point_not_only_cached_samples(name, conditional):
    layer = build(name, conditional)
    x = inputs(torch.float64)
    t = condition_rows(layer, x)
    y = t(x)
    fresh = condition_rows(layer, x)  # a new transform with nothing cached
    torch.testing.assert_close(fresh.log_abs_det_jacobian(x.clone(), y.clone()), t.log_abs_det_jacobian(x, y))


@pytest.mark.parametrize(("name", "conditional"), CASES)
def test_log_det_scored_through_the_inverse_is_the_forward_one(name, conditional):
    """``log|det ∂f/∂x|`` at ``x = f⁻¹(y)``, as a density through the inverse asks for it (layers
    whose inverse yields it keep it), equals the forward pass's at ``x``, values and gradients."""
    layer = build(name, conditional)
    y = inputs(torch.float64, seed=7).requires_grad_(True)
    t = condition_rows(layer, y)
    x = t.inv(y)
    through_inverse = t.log_abs_det_jacobian(x, y)
    x_again = x.detach().clone().requires_grad_(True)
    forward = condition_rows(layer, y).log_abs_det_jacobian(x_again, t(x_again))
    torch.testing.assert_close(through_inverse, forward, rtol=1e-8, atol=1e-8)
    params = [p for p in layer.parameters() if p.requires_grad]
    if layer.volume_preserving or not params:
        return
    grads = torch.autograd.grad(through_inverse.sum(), [y, *params], allow_unused=True)
    # the forward log-det as a function of (y, θ): through x = f⁻¹(y; θ), by the chain rule
    fresh = condition_rows(layer, y)
    x_of = fresh.inv(y.detach().clone())
    reference = torch.autograd.grad(
        fresh.log_abs_det_jacobian(x_of, fresh(x_of)).sum(), params, allow_unused=True
    )
    for got, want in zip(grads[1:], reference, strict=True):
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(("name", "conditional"), CASES)
def test_inverse_round_trip(name, conditional, dtype):
    layer = build(name, conditional, dtype)
    x = inputs(dtype)
    t = condition_rows(layer, x)
    y = t(x)
    x_back = t.inv(y.clone())  # clone: score a point the layer did not produce itself
    if dtype == torch.float64:
        torch.testing.assert_close(x_back, x, rtol=1e-6, atol=1e-6)
    # float32: x itself is only as well determined as the Jacobian's conditioning allows,
    # so check the residual f(f^{-1}(y)) = y, which is well posed
    torch.testing.assert_close(t(x_back.clone()), y, rtol=TOL[dtype], atol=TOL[dtype])
    target = inputs(dtype, seed=5)
    torch.testing.assert_close(t(t.inv(target).clone()), target, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize(("name", "conditional"), CASES)
@pytest.mark.parametrize("input_scale", [1.0, 100.0], ids=["x1", "x100"])
def test_jacobian_nonsingular_with_one_sign_at_extreme_parameters(name, conditional, input_scale):
    layer = build(name, conditional, scale=100.0)
    x = inputs(torch.float64, scale=input_scale, n=12)
    t = condition_rows(layer, x, context_scale=100.0)
    y = t(x)
    log_det = t.log_abs_det_jacobian(x, y)
    sign, reference = torch.linalg.slogdet(jacobian_blocks(t, x))
    assert torch.isfinite(y).all() and torch.isfinite(log_det).all()
    assert (sign != 0).all() and (sign == sign[0]).all(), f"Jacobian signs {sign.tolist()}"
    torch.testing.assert_close(log_det, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("name", "conditional"), CASES)
def test_gradients_reach_every_parameter(name, conditional):
    layer = build(name, conditional)
    x = inputs(torch.float64)
    t = condition_rows(layer, x)
    y = t(x)
    # a random linear loss: |y|² would be blind to orthogonal layers (Householder), whose gradient is 0
    weights = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(3))
    ((weights * y).sum() + t.log_abs_det_jacobian(x, y).sum()).backward()
    for pname, p in layer.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{pname} has an all-zero gradient"


@pytest.mark.parametrize(("name", "conditional"), CASES)
def test_batch_and_sample_shapes_broadcast(name, conditional):
    layer = build(name, conditional)
    x = torch.randn(4, 3, DIM, dtype=torch.float64)
    if conditional:
        t = layer.condition(torch.randn(3, CONTEXT, dtype=torch.float64))  # one context per batch item
        single = layer.condition(torch.randn(CONTEXT, dtype=torch.float64))  # one context for all
        assert single(x).shape == x.shape
    else:
        t = layer
    y = t(x)
    assert y.shape == x.shape
    assert t.log_abs_det_jacobian(x, y).shape == (4, 3)
    assert t.inv(y.clone()).shape == x.shape


@pytest.mark.parametrize(("name", "conditional"), CASES)
def test_state_dict_pickle_and_dtype(name, conditional):
    layer = build(name, conditional)
    x = inputs(torch.float64)
    expected = condition_rows(layer, x)(x)
    other = build(name, conditional, seed=123)
    other.load_state_dict(layer.state_dict())
    torch.testing.assert_close(condition_rows(other, x)(x), expected)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(condition_rows(other, x)(x), expected)
    for clone in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        torch.testing.assert_close(condition_rows(clone, x)(x), expected)
    as32 = copy.deepcopy(layer).to(torch.float32)
    y32 = condition_rows(as32, x.float())(x.float())
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32, expected.float(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(("name", "conditional"), CASES)
def test_initial_layer_is_near_identity(name, conditional):
    torch.manual_seed(0)
    layer = flows.make(name, DIM, context_dim=CONTEXT if conditional else None).double()
    x = inputs(torch.float64)
    t = condition_rows(layer, x)
    y = t(x)
    if name == "lu_linear" or not getattr(layer, "needs_permutation", False):
        torch.testing.assert_close(y, x, atol=1e-2, rtol=0)
    assert torch.isfinite(t.log_abs_det_jacobian(x, y)).all()


@pytest.mark.parametrize("name", flows.available())
def test_stack_transforms_every_coordinate(name):
    torch.manual_seed(0)
    layers = flows.stack(name, DIM, num_flows=3).double()
    with torch.no_grad():
        for p in layers.parameters():
            p.normal_()
    x = inputs(torch.float64)

    def through(v):
        for layer in layers:
            v = layer(v)
        return v

    jac = jacobian_blocks(through, x)
    off_diagonal = jac - torch.diag_embed(torch.diagonal(jac, dim1=-2, dim2=-1))
    # every output coordinate depends on some other coordinate, or is rescaled
    moved = (off_diagonal.abs().amax(-1) > 1e-8) | ((torch.diagonal(jac, dim1=-2, dim2=-1) - 1).abs() > 1e-8)
    if name != "householder":  # a product of reflections can fix a coordinate only by chance
        assert moved.all(), f"coordinates never transformed: {(~moved).nonzero().tolist()}"


@settings(max_examples=20, deadline=None)
@given(name=st.sampled_from(flows.available()), seed=st.integers(0, 2**16), log_scale=st.floats(-2, 2))
def test_round_trip_property(name, seed, log_scale):
    layer = build(name, False, seed=seed)
    x = inputs(torch.float64, scale=10**log_scale, seed=seed)
    y = layer(x)
    torch.testing.assert_close(layer.inv(y.clone()), x, rtol=1e-6, atol=1e-6 * 10 ** max(log_scale, 0))


# --- bad input ---------------------------------------------------------------------------


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown flow layer 'plannar'.*available: .*planar"):
        flows.make("plannar", 3)


@pytest.mark.parametrize(("name", "conditional"), CASES)
def test_wrong_input_and_context_dimension(name, conditional):
    layer = build(name, conditional)
    x = inputs(torch.float64, dim=DIM + 1)
    if conditional:
        with pytest.raises(ValueError, match=rf"context.*(last dimension|size|dim).*{CONTEXT}"):
            layer.condition(torch.randn(N, CONTEXT + 2, dtype=torch.float64))
    t = condition_rows(layer, inputs(torch.float64))
    with pytest.raises(ValueError, match=rf"{DIM}.*{DIM + 1}|{DIM + 1}.*{DIM}"):
        t(x)


def test_options_out_of_range_and_unknown():
    with pytest.raises(ValueError, match="num_ortho_vecs=9 is larger than the dimension 5"):
        flows.make("orthogonal_sylvester", 5, num_ortho_vecs=9)
    with pytest.raises(ValueError, match="bottleneck=6 is larger than the dimension 5"):
        flows.make("generalized_planar", 5, bottleneck=6)
    with pytest.raises(ValueError, match="num_householder must be an integer >= 1, got 0"):
        flows.make("householder_sylvester", 5, num_householder=0)
    with pytest.raises(ValueError, match="num_reflections must be an integer >= 1, got 0"):
        flows.make("householder", 5, num_reflections=0)
    with pytest.raises(ValueError, match=r"unknown option.*colour.*options it takes"):
        flows.make("planar", 5, colour="red")
    with pytest.raises(ValueError, match="num_flows must be an integer >= 1"):
        flows.stack("planar", 5, num_flows=0)


@pytest.mark.parametrize("context_dim", [None, CONTEXT])
def test_a_list_of_names_gives_each_layer_the_options_it_takes(context_dim):
    """``hidden_dims`` reaches the IAF layers of ``lu_linear+iaf`` (an LU layer does not take it
    unconditionally; a conditional one takes it for its context network)."""
    layers = flows.stack(
        ["lu_linear", "iaf", "lu_linear", "iaf"], DIM, context_dim=context_dim, hidden_dims=[7]
    )
    iafs = [m for m in layers if type(m).__name__.endswith("IAF")]
    assert len(iafs) == 2
    for iaf in iafs:
        assert any(p.shape[0] == 7 for p in iaf.parameters())
    with pytest.raises(
        ValueError, match=r"unknown option\(s\) colour; options the layers take: lu_linear: none; "
    ):
        flows.stack(["lu_linear", "iaf"], DIM, colour="red")


# --- devices -----------------------------------------------------------------------------


@CUDA
@pytest.mark.cuda
@pytest.mark.parametrize(("name", "conditional"), CASES)
def test_cuda(name, conditional):
    layer = build(name, conditional).cuda()
    x = inputs(torch.float64).cuda()
    t = layer.condition(torch.randn(N, CONTEXT, dtype=torch.float64, device="cuda")) if conditional else layer
    y = t(x)
    log_det = t.log_abs_det_jacobian(x, y)
    assert y.device.type == "cuda" and log_det.device.type == "cuda"
    torch.testing.assert_close(t.inv(y.clone()), x, rtol=1e-6, atol=1e-6)
    (y.sum() + log_det.sum()).backward()
    assert all(p.grad is not None and p.grad.device.type == "cuda" for p in layer.parameters())


# --- fused stacks ------------------------------------------------------------------------

FUSABLE = [n for n in flows.available() if isinstance(flows.stack(n, DIM, 2)[0], FlowStack)]


@pytest.mark.parametrize("num_flows", [2, 3])
@pytest.mark.parametrize("name", FUSABLE)
def test_fused_stack_equals_layers_applied_one_by_one(name, num_flows):
    torch.manual_seed(0)
    one_by_one = flows.stack(name, DIM, num_flows, fuse=False).double()
    with torch.no_grad():
        for p in one_by_one.parameters():
            p.normal_()
    (fused,) = flows.stack(name, DIM, num_flows).double()
    layers = [m for m in one_by_one if not isinstance(m, Reverse)]
    with torch.no_grad():
        for pname, p in fused.named_parameters():
            p.copy_(torch.stack([getattr(layer, pname) for layer in layers]))
    x = inputs(torch.float64)
    y, log_det = x, torch.zeros(N, dtype=torch.float64)
    for layer in one_by_one:
        y_next = layer(y)
        log_det = log_det + layer.log_abs_det_jacobian(y, y_next)
        y = y_next
    torch.testing.assert_close(fused(x), y)
    torch.testing.assert_close(fused.log_abs_det_jacobian(x, fused(x)), log_det)
    torch.testing.assert_close(fused.inv(y.clone()), x, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", FUSABLE)
def test_conditional_fused_stack(name):
    torch.manual_seed(0)
    (stack,) = flows.stack(name, DIM, 3, context_dim=CONTEXT).double()
    assert isinstance(stack, ConditionalFlowStack)
    with torch.no_grad():
        for p in stack.parameters():
            p.normal_()
    x = inputs(torch.float64)
    t = condition_rows(stack, x)
    y = t(x)
    _, reference = torch.linalg.slogdet(jacobian_blocks(t, x))
    torch.testing.assert_close(t.log_abs_det_jacobian(x, y), reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(t.inv(y.clone()), x, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", FUSABLE)
def test_conditional_fused_stack_with_sample_dimensions(name):
    """Draws ``(S, N, D)`` over a context batch ``(N, C)``: each draw's log-det is its own row's."""
    torch.manual_seed(0)
    (stack,) = flows.stack(name, DIM, 3, context_dim=CONTEXT).double()
    with torch.no_grad():
        for p in stack.parameters():
            p.normal_()
    context = torch.randn(N, CONTEXT, dtype=torch.float64)
    x = torch.stack([inputs(torch.float64, seed=s) for s in range(2)])
    t = stack.condition(context)
    y = t(x)
    log_det = t.log_abs_det_jacobian(x, y)
    assert log_det.shape == (2, N)
    for s in range(2):
        one = stack.condition(context)
        y_s = one(x[s])
        torch.testing.assert_close(y_s, y[s])
        torch.testing.assert_close(one.log_abs_det_jacobian(x[s], y_s), log_det[s])


@pytest.mark.parametrize(("name", "conditional"), CASES)
def test_one_dimensional_input(name, conditional):
    """A model with a single latent gets a working layer of every family."""
    layer = build(name, conditional, dim=1)
    x = inputs(torch.float64, dim=1)
    t = condition_rows(layer, x)
    y = t(x)
    _, reference = torch.linalg.slogdet(jacobian_blocks(t, x))
    torch.testing.assert_close(t.log_abs_det_jacobian(x, y), reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(t.inv(y.clone()), x, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", FUSABLE)
def test_fused_stack_copies_after_use(name):
    (stack,) = flows.stack(name, DIM, 3).double()
    x = inputs(torch.float64)
    y = stack(x)
    (y.sum() + stack.log_abs_det_jacobian(x, y).sum()).backward()
    for clone in (copy.deepcopy(stack), pickle.loads(pickle.dumps(stack))):
        torch.testing.assert_close(clone(x), y)


@pytest.mark.parametrize(("name", "conditional"), CASES)
def test_inverse_jacobian_is_the_inverse_of_the_forward_jacobian(name, conditional):
    """Autograd through the inverse gives ``(∂y/∂x)⁻¹``: root-finding inverses differentiate by the
    implicit function theorem, not through their iterations (path gradients rely on it)."""
    layer = build(name, conditional)
    x = inputs(torch.float64)
    t = condition_rows(layer, x)
    y = t(x).detach()
    forward = jacobian_blocks(t, x)
    inverse = jacobian_blocks(lambda v: t.inv(v.view_as(v)), y)
    torch.testing.assert_close(inverse, torch.linalg.inv(forward), rtol=1e-6, atol=1e-6)


def test_planar_inverse_stays_in_its_bracket_where_the_slope_rounds_to_zero():
    """float32, ûᵀw rounded to -1: the last (differentiable) Newton step divides by a zero slope;
    its value is then not taken, and the inverse stays as close as float32 resolves."""
    from pyro_flowguides.transforms.planar import PlanarTransform

    params = {"u": torch.tensor([-25.0, 0.5]), "w": torch.tensor([1.0, 0.0]), "b": torch.zeros(1)}
    layer = PlanarTransform(params, dim=2)
    x = torch.tensor([[3e-3, 1.0], [1e-2, 1.0], [3e-2, 1.0], [1e-1, 1.0]])
    for row in x:  # one point per call: the loop stops on that point alone
        inverse = layer.inv(layer(row[None]).clone())
        assert (inverse - row).abs().max() < 0.01
