"""Sylvester flows (orthogonal, Householder, triangular): maths checks at random parameters."""

import pytest
import torch
from conftest import condition_rows, jacobian_blocks

from pyro_flowguides import flows
from pyro_flowguides.transforms.permutation import Reverse
from pyro_flowguides.transforms.sylvester import (
    ConditionalHouseholderSylvester,
    ConditionalOrthogonalSylvester,
    ConditionalTriangularSylvester,
    HouseholderSylvester,
    HouseholderSylvesterTransform,
    OrthogonalSylvester,
    OrthogonalSylvesterTransform,
    TriangularSylvester,
    TriangularSylvesterTransform,
)

DIM, CONTEXT, N = 6, 3, 7
VARIANTS = {
    "orthogonal": (OrthogonalSylvester, ConditionalOrthogonalSylvester, {"num_ortho_vecs": 4}),
    "orthogonal_full": (OrthogonalSylvester, ConditionalOrthogonalSylvester, {}),
    "householder": (HouseholderSylvester, ConditionalHouseholderSylvester, {"num_householder": 3}),
    "householder_k_over_d": (HouseholderSylvester, ConditionalHouseholderSylvester, {"num_householder": 9}),
    "triangular": (TriangularSylvester, ConditionalTriangularSylvester, {}),
}
CORE = ["orthogonal", "householder", "triangular"]
ALL_CASES = [
    pytest.param(name, cond, id=f"{name}-{'cond' if cond else 'plain'}")
    for name in VARIANTS
    for cond in (False, True)
]
CASES = [case for case in ALL_CASES if case.values[0] in CORE]


def build(name, conditional, seed=0, scale=1.0, dim=DIM):
    torch.manual_seed(seed)
    plain, cond, options = VARIANTS[name]
    layer = cond(dim, context_dim=CONTEXT, **options) if conditional else plain(dim, **options)
    layer = layer.double()
    for p in layer.parameters():
        p.data.normal_().mul_(scale)
    return layer


def inputs(scale=1.0, n=N, dim=DIM, seed=2):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, dim, generator=g, dtype=torch.float64)


@pytest.mark.parametrize(("name", "conditional"), ALL_CASES)
def test_log_det_matches_slogdet_of_autograd_jacobian(name, conditional):
    layer = build(name, conditional)
    x = inputs(2.0)
    t = condition_rows(layer, x)
    y = t(x)
    log_det = t.log_abs_det_jacobian(x, y)
    sign, reference = torch.linalg.slogdet(jacobian_blocks(t, x))
    assert (sign > 0).all()
    torch.testing.assert_close(log_det, reference, rtol=1e-6, atol=1e-9)
    # not only at cached points
    torch.testing.assert_close(t.log_abs_det_jacobian(x.clone(), y.clone()), log_det)


@pytest.mark.parametrize(("name", "conditional"), ALL_CASES)
def test_inverse_round_trip(name, conditional):
    layer = build(name, conditional)
    x = inputs(2.0)
    t = condition_rows(layer, x)
    torch.testing.assert_close(t.inv(t(x).clone()), x, rtol=1e-6, atol=1e-6)
    y = inputs(3.0, seed=5)
    torch.testing.assert_close(t(t.inv(y).clone()), y, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("conditional", [False, True])
def test_orthogonal_columns(conditional):
    layer = build("orthogonal", conditional)
    t = condition_rows(layer, inputs())
    t = getattr(t, "layer", t)  # the maths behind an unconditional module
    q = t.basis(t.raw_params())[0]
    assert q.shape[-2:] == (DIM, 4)
    eye = torch.eye(4, dtype=q.dtype)
    assert (q.mT @ q - eye).abs().max() < 1e-6


@pytest.mark.parametrize("num_householder", [1, 3, 9], ids=["wy-form", "dense", "dense-k-over-d"])
@pytest.mark.parametrize("conditional", [False, True])
def test_householder_basis_is_the_product_of_reflections(conditional, num_householder):
    # D > 4K applies Q through the compact WY form; D <= 4K multiplies the reflections out
    torch.manual_seed(0)
    plain, cond = HouseholderSylvester, ConditionalHouseholderSylvester
    options = {"num_householder": num_householder}
    layer = (cond(DIM, context_dim=CONTEXT, **options) if conditional else plain(DIM, **options)).double()
    for p in layer.parameters():
        p.data.normal_()
    t = condition_rows(layer, inputs())
    t = getattr(t, "layer", t)
    p = t.raw_params()
    basis = t.basis(p)
    eye = torch.eye(DIM, dtype=torch.float64)
    q = eye.expand(*p["v"].shape[:-2], DIM, DIM)
    for k in range(p["v"].shape[-2]):  # Q = H_1 ... H_K
        v = p["v"][..., k, :]
        h = eye - 2 * v.unsqueeze(-1) * v.unsqueeze(-2) / (v * v).sum(-1)[..., None, None]
        q = q @ h
    z = inputs()
    torch.testing.assert_close(t.lift(basis, z), (q @ z.unsqueeze(-1)).squeeze(-1))
    torch.testing.assert_close(t.project(basis, z), (q.mT @ z.unsqueeze(-1)).squeeze(-1))


@pytest.mark.parametrize(("name", "conditional"), CASES)
def test_extreme_parameters_and_inputs(name, conditional):
    layer = build(name, conditional, scale=100.0)
    x = inputs(100.0, n=12)
    t = condition_rows(layer, x, context_scale=100.0)
    y = t(x)
    log_det = t.log_abs_det_jacobian(x, y)
    assert torch.isfinite(y).all() and torch.isfinite(log_det).all()
    sign, reference = torch.linalg.slogdet(jacobian_blocks(t, x))
    assert (sign > 0).all()
    torch.testing.assert_close(log_det, reference, rtol=1e-5, atol=1e-5)


def test_log_det_finite_where_the_diagonal_product_rounds_to_minus_one():
    # r_11 r~_11 = tanh(-50) tanh(50) is -1 in float64, and the pre-activation is exactly 0:
    # the factor 1 + h'·d is sech²(50) > 0, which a naive log1p(h'·d) would turn into -inf.
    params = {"r": torch.tensor([[-50.0]]), "r_tilde": torch.tensor([[50.0]]), "b": torch.zeros(1)}
    params = {k: v.double() for k, v in params.items()}
    t = TriangularSylvesterTransform(params, dim=1)
    x = torch.zeros(1, 1, dtype=torch.float64)
    log_det = t.log_abs_det_jacobian(x, t(x))
    expected = -2 * (
        50
        + torch.log1p(torch.exp(torch.tensor(-100.0, dtype=torch.float64)))
        - torch.log(torch.tensor(2.0, dtype=torch.float64))
    )
    torch.testing.assert_close(log_det, expected.reshape(1))


@pytest.mark.parametrize(("name", "conditional"), CASES)
def test_gradients_reach_every_parameter(name, conditional):
    layer = build(name, conditional)
    x = inputs(2.0)
    t = condition_rows(layer, x)
    y = t(x)
    (y.pow(2).sum() + t.log_abs_det_jacobian(x, y).sum()).backward()
    for pname, p in layer.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize(("name", "conditional"), CASES)
def test_initial_layer_is_identity_with_gradients(name, conditional):
    torch.manual_seed(0)
    plain, cond, options = VARIANTS[name]
    layer = (cond(DIM, context_dim=CONTEXT, **options) if conditional else plain(DIM, **options)).double()
    x = inputs(2.0)
    t = condition_rows(layer, x)
    y = t(x)
    log_det = t.log_abs_det_jacobian(x, y)
    torch.testing.assert_close(y, x, rtol=0, atol=1e-12)
    assert (log_det.abs() < 1e-12).all()
    (y.pow(3).sum() + log_det.sum()).backward()
    r_grad = layer.r.grad if not conditional else layer.conditioner.head.bias.grad
    assert r_grad.abs().sum() > 0


@pytest.mark.parametrize("name", CORE)
def test_batched_parameters_broadcast_against_sample_dims(name):
    layer = build(name, True)
    x = torch.randn(4, 3, DIM, dtype=torch.float64)
    context = torch.randn(3, CONTEXT, dtype=torch.float64)
    t = layer.condition(context)
    y = t(x)
    log_det = t.log_abs_det_jacobian(x, y)
    assert y.shape == x.shape and log_det.shape == (4, 3)
    torch.testing.assert_close(t.inv(y.clone()), x, rtol=1e-6, atol=1e-6)
    for j in range(3):  # batch item j uses context j's parameters
        single = layer.condition(context[j])
        torch.testing.assert_close(single(x[:, j]), y[:, j])
        torch.testing.assert_close(
            single.log_abs_det_jacobian(x[:, j].clone(), y[:, j].clone()), log_det[:, j]
        )


@pytest.mark.parametrize("name", ["orthogonal", "householder", "triangular"])
def test_float32_and_dimension_one(name):
    layer = build(name, False, dim=DIM).float()
    x = inputs(2.0).float()
    y = layer(x)
    assert y.dtype == torch.float32 and layer.log_abs_det_jacobian(x, y).dtype == torch.float32
    plain, _, options = VARIANTS[name]
    options = {k: min(v, 1) if k == "num_ortho_vecs" else v for k, v in options.items()}
    tiny = plain(1, **options).double()
    for p in tiny.parameters():
        p.data.normal_()
    z = inputs(2.0, dim=1)
    torch.testing.assert_close(tiny.inv(tiny(z).clone()), z)


def test_triangular_layers_get_a_reverse_between_them():
    assert TriangularSylvester(4).needs_permutation
    assert not OrthogonalSylvester(4).needs_permutation and not HouseholderSylvester(4).needs_permutation
    layers = flows.stack(["triangular_sylvester", "triangular_sylvester"], 4)
    assert [type(m) for m in layers][:3] == [TriangularSylvester, Reverse, TriangularSylvester]


@pytest.mark.parametrize("name", ["orthogonal_sylvester", "householder_sylvester", "triangular_sylvester"])
def test_stack_of_layers(name):
    # whatever flows.stack builds (separate layers or one fused module), the composition must be right
    torch.manual_seed(0)
    layers = flows.stack(name, 4, num_flows=3).double()
    for p in layers.parameters():
        p.data.normal_()
    x = inputs(2.0, dim=4)

    def through(v):
        log_det = 0
        for layer in layers:
            out = layer(v)
            log_det = log_det + layer.log_abs_det_jacobian(v, out)
            v = out
        return v, log_det

    y, log_det = through(x)
    torch.testing.assert_close(log_det, torch.linalg.slogdet(jacobian_blocks(lambda v: through(v)[0], x))[1])
    back = y.clone()
    for layer in reversed(layers):
        back = layer.inv(back)
    torch.testing.assert_close(back, x, rtol=1e-6, atol=1e-6)


def test_default_options():
    assert OrthogonalSylvesterTransform.param_shapes(50)["q"] == (50, 32)
    assert OrthogonalSylvesterTransform.param_shapes(5)["q"] == (5, 5)
    assert HouseholderSylvesterTransform.param_shapes(5)["v"] == (5, 5)
    assert HouseholderSylvesterTransform.param_shapes(50)["v"] == (8, 50)
    assert HouseholderSylvesterTransform.param_shapes(5, num_householder=12)["v"] == (12, 5)
    assert TriangularSylvesterTransform.param_shapes(5)["r"] == (5, 5)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="num_ortho_vecs=7 is larger than the dimension 6"):
        OrthogonalSylvester(DIM, num_ortho_vecs=7)
    with pytest.raises(ValueError, match="num_ortho_vecs=7 is larger than the dimension 6"):
        ConditionalOrthogonalSylvester(DIM, context_dim=CONTEXT, num_ortho_vecs=7)
    with pytest.raises(ValueError, match="num_ortho_vecs must be an integer >= 1, got 0"):
        flows.make("orthogonal_sylvester", DIM, num_ortho_vecs=0)
    with pytest.raises(ValueError, match="num_householder must be an integer >= 1, got 0"):
        HouseholderSylvester(DIM, num_householder=0)
    with pytest.raises(ValueError, match=r"num_householder must be an integer >= 1, got 2\.5"):
        flows.make("householder_sylvester", DIM, context_dim=CONTEXT, num_householder=2.5)
    with pytest.raises(ValueError, match=r"unknown option.*num_householder"):
        TriangularSylvester(DIM, num_householder=2)
