"""Generalized planar, Householder and LU-linear layers: exact log-determinants, inverses, options."""

import pytest
import torch
from conftest import condition_rows, jacobian_blocks

from pyro_flowguides import flows
from pyro_flowguides.transforms.generalized_planar import GeneralizedPlanarTransform
from pyro_flowguides.transforms.householder import HouseholderTransform
from pyro_flowguides.transforms.lu_linear import LULinearTransform

DIM, CONTEXT, N = 5, 3, 6
# (layer, options): each option value that changes the code path
LAYERS = [
    ("generalized_planar", {}),
    ("generalized_planar", {"bottleneck": 1}),
    ("generalized_planar", {"bottleneck": DIM}),
    ("householder", {}),
    ("householder", {"num_reflections": 1}),
    ("householder", {"num_reflections": 3 * DIM}),
    ("lu_linear", {}),
]
CASES = [
    pytest.param(name, opts, cond, id="-".join([name, *map(str, opts.values()), "cond" if cond else "plain"]))
    for name, opts in LAYERS
    for cond in (False, True)
]


def build(name, opts, conditional, scale=1.0, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    layer = flows.make(name, DIM, context_dim=CONTEXT if conditional else None, **opts)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, scale)
    return layer.to(dtype)


def sample(n=N, scale=2.0, seed=2, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(n, DIM, generator=g, dtype=torch.float64)).to(dtype)


def expected_sign(name, opts):
    """``det J > 0`` everywhere, except for an odd number of reflections (``det = -1``)."""
    return -1.0 if name == "householder" and opts.get("num_reflections", 4) % 2 else 1.0


@pytest.mark.parametrize(("name", "opts", "conditional"), CASES)
def test_log_det_and_inverse_at_random_parameters(name, opts, conditional):
    layer = build(name, opts, conditional)
    x = sample()
    t = condition_rows(layer, x)
    y = t(x)
    log_det = t.log_abs_det_jacobian(x, y)
    sign, reference = torch.linalg.slogdet(jacobian_blocks(t, x))
    assert (sign == expected_sign(name, opts)).all()
    torch.testing.assert_close(log_det, reference, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(t.inv(y.clone()), x, rtol=1e-6, atol=1e-8)
    target = sample(seed=3)
    torch.testing.assert_close(t(t.inv(target).clone()), target, rtol=1e-6, atol=1e-8)
    if name == "householder":
        assert (log_det == 0).all()
        torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))


@pytest.mark.parametrize(("name", "opts", "conditional"), CASES)
@pytest.mark.parametrize("input_scale", [1.0, 100.0], ids=["x1", "x100"])
def test_extreme_parameters_keep_one_jacobian_sign(name, opts, conditional, input_scale):
    layer = build(name, opts, conditional, scale=100.0)
    x = sample(n=12, scale=input_scale)
    t = condition_rows(layer, x, context_scale=100.0)
    y = t(x)
    log_det = t.log_abs_det_jacobian(x, y)
    sign, reference = torch.linalg.slogdet(jacobian_blocks(t, x))
    assert torch.isfinite(y).all() and torch.isfinite(log_det).all()
    assert (sign == expected_sign(name, opts)).all()
    torch.testing.assert_close(log_det, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t.inv(y.clone()), x, rtol=1e-6, atol=1e-6 * input_scale)


@pytest.mark.parametrize(("name", "opts", "conditional"), CASES)
def test_gradients_reach_every_parameter(name, opts, conditional):
    layer = build(name, opts, conditional)
    x = sample()
    t = condition_rows(layer, x)
    y = t(x)
    weights = sample(seed=4)  # not |y|²: a Householder layer keeps norms
    ((y * weights).sum() + t.log_abs_det_jacobian(x, y).sum()).backward()
    for pname, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize(("name", "opts", "conditional"), CASES)
def test_sample_and_batch_dimensions_broadcast(name, opts, conditional):
    layer = build(name, opts, conditional)
    x = torch.randn(4, 3, DIM, dtype=torch.float64)
    t = layer.condition(torch.randn(3, CONTEXT, dtype=torch.float64)) if conditional else layer
    y = t(x)
    assert y.shape == x.shape and t.log_abs_det_jacobian(x, y).shape == (4, 3)
    torch.testing.assert_close(t.inv(y.clone()), x)
    for i in range(4):  # the same map row by row
        torch.testing.assert_close(t(x[i].clone()), y[i])


@pytest.mark.parametrize(("name", "opts", "conditional"), CASES)
def test_starts_near_identity_and_float32(name, opts, conditional):
    torch.manual_seed(0)
    layer = flows.make(name, DIM, context_dim=CONTEXT if conditional else None, **opts)
    x = sample(dtype=torch.float32)
    y = condition_rows(layer, x)(x)
    assert y.dtype == torch.float32
    odd_reflections = name == "householder" and opts.get("num_reflections", 4) % 2 == 1
    if not odd_reflections:
        torch.testing.assert_close(y, x, atol=1e-5, rtol=0)


def test_lu_linear_many_samples_form_the_weight_once():
    layer = build("lu_linear", {}, False)
    x = torch.randn(3 * DIM * DIM, DIM, dtype=torch.float64)  # more samples than coordinates
    y = layer(x)
    torch.testing.assert_close(y[:2], layer(x[:2].clone()))
    torch.testing.assert_close(layer.inv(y.clone()), x)


def test_generalized_planar_is_a_contraction_in_the_bottleneck():
    layer = build("generalized_planar", {"bottleneck": 3}, True, scale=10.0)
    t = layer.condition(torch.randn(50, CONTEXT, dtype=torch.float64))
    a, b_mat, _, k = t.constrained()
    torch.testing.assert_close(k, b_mat @ a)
    norms = torch.linalg.matrix_norm(k, ord=2)
    assert (norms <= GeneralizedPlanarTransform.max_contraction + 1e-12).all()


@pytest.mark.parametrize("bottleneck", [1, 3, DIM])
def test_generalized_planar_inverse_at_the_contraction_limit(bottleneck):
    """``K = -0.99 Q``: ``v + K tanh(v)`` has slope 0.01 at 0, the root finder's hardest case."""
    torch.manual_seed(5)
    q, _ = torch.linalg.qr(torch.randn(bottleneck, bottleneck, dtype=torch.float64))
    b_mat = torch.randn(bottleneck, DIM, dtype=torch.float64)
    a_mat = torch.linalg.pinv(b_mat) @ (-5 * q)
    params = {"A": a_mat, "B": b_mat, "b": torch.zeros(bottleneck, dtype=torch.float64)}
    t = GeneralizedPlanarTransform(params, DIM)
    x = torch.randn(500, DIM, dtype=torch.float64)
    torch.testing.assert_close(t.inv(t(x).clone()), x, rtol=1e-9, atol=1e-9)


def test_generalized_planar_inverse_gradient_matches_finite_differences():
    layer = build("generalized_planar", {"bottleneck": 3}, False)
    y = sample(n=3).requires_grad_()
    # clone: perturbing the input in place would hit the transform's cache
    assert torch.autograd.gradcheck(lambda v: layer.inv(v.clone()), (y,), fast_mode=True)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("generalized_planar", {"bottleneck": DIM + 1}, f"bottleneck={DIM + 1} is larger than the dimension"),
        ("generalized_planar", {"bottleneck": 0}, "bottleneck must be an integer >= 1, got 0"),
        ("generalized_planar", {"bottleneck": 2.5}, "bottleneck must be an integer"),
        ("householder", {"num_reflections": 0}, "num_reflections must be an integer >= 1, got 0"),
        ("householder", {"num_reflections": True}, "num_reflections must be an integer"),
        ("lu_linear", {"bottleneck": 2}, "unknown option.*bottleneck"),
    ],
)
@pytest.mark.parametrize("conditional", [False, True], ids=["plain", "cond"])
def test_bad_options_raise(name, options, message, conditional):
    with pytest.raises(ValueError, match=message):
        flows.make(name, DIM, context_dim=CONTEXT if conditional else None, **options)


@pytest.mark.parametrize("transform", [GeneralizedPlanarTransform, HouseholderTransform, LULinearTransform])
def test_wrong_event_dimension_names_the_layer(transform):
    params = {k: torch.randn(s) for k, s in transform.param_shapes(DIM).items()}
    with pytest.raises(ValueError, match=f"{transform.__name__}.*{DIM}"):
        transform(params, DIM)(torch.zeros(2, DIM + 1))
