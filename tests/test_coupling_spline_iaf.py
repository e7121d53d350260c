"""Coupling (additive, affine), neural spline and IAF layers: exactness, inverses, extremes, options."""

import math

import pytest
import torch
from conftest import condition_rows, jacobian_blocks
from torch.distributions import constraints

from pyro_flowguides import flows
from pyro_flowguides.transforms.autoregressive import IAF, MadeConditioner
from pyro_flowguides.transforms.coupling import AdditiveCoupling, AffineCoupling
from pyro_flowguides.transforms.permutation import Reverse
from pyro_flowguides.transforms.spline import (
    NeuralSpline,
    rational_quadratic_spline,
    rational_quadratic_spline_inverse,
)

NAMES = ["additive_coupling", "affine_coupling", "neural_spline", "iaf"]
DIM, CONTEXT, N = 5, 3, 7
CASES = [pytest.param(n, c, id=f"{n}-{'cond' if c else 'plain'}") for n in NAMES for c in (False, True)]


def make(name, conditional, scale=1.0, seed=0, dim=DIM, **options):
    """float64 layer with every parameter drawn from N(0, scale²)."""
    torch.manual_seed(seed)
    layer = flows.make(name, dim, context_dim=CONTEXT if conditional else None, **options).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, scale)
    return layer


def points(scale=2.0, n=N, dim=DIM, seed=2):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, dim, generator=g, dtype=torch.float64)


# -- exactness ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "conditional"), CASES)
def test_log_det_matches_slogdet_of_autograd_jacobian(name, conditional):
    layer = make(name, conditional)
    x = points()
    t = condition_rows(layer, x)
    y = t(x)
    log_det = t.log_abs_det_jacobian(x, y)
    sign, reference = torch.linalg.slogdet(jacobian_blocks(t, x))
    assert (sign == 1).all()
    torch.testing.assert_close(log_det, reference, rtol=1e-6, atol=1e-9)
    if name == "additive_coupling":
        assert layer.volume_preserving and (log_det == 0).all()
    else:
        assert not layer.volume_preserving


@pytest.mark.parametrize(("name", "conditional"), CASES)
def test_two_hidden_layers_and_other_split(name, conditional):
    options = {"hidden_dims": [12, 12]} | ({} if name == "iaf" else {"split_dim": 3})
    layer = make(name, conditional, **options)
    x = points()
    t = condition_rows(layer, x)
    y = t(x)
    reference = torch.linalg.slogdet(jacobian_blocks(t, x))[1]
    torch.testing.assert_close(t.log_abs_det_jacobian(x, y), reference, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(t.inv(y.clone()), x, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("name", "conditional"), CASES)
def test_inverse_round_trip(name, conditional):
    layer = make(name, conditional)
    x = points()
    t = condition_rows(layer, x)
    y = t(x)
    torch.testing.assert_close(t.inv(y.clone()), x, rtol=1e-6, atol=1e-6)
    z = points(seed=5)
    torch.testing.assert_close(t(t.inv(z.clone()).clone()), z, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("name", "conditional"), CASES)
@pytest.mark.parametrize("input_scale", [1.0, 100.0], ids=["x1", "x100"])
def test_extreme_parameters_and_inputs(name, conditional, input_scale):
    layer = make(name, conditional, scale=100.0)
    x = points(scale=2 * input_scale, n=12).requires_grad_()
    t = condition_rows(layer, x.detach(), context_scale=100.0)
    y = t(x)
    log_det = t.log_abs_det_jacobian(x, y)
    assert torch.isfinite(y).all() and torch.isfinite(log_det).all()
    (y.sum() + log_det.sum()).backward()
    assert torch.isfinite(x.grad).all()
    for pname, p in layer.named_parameters():
        assert torch.isfinite(p.grad).all(), pname
    sign, reference = torch.linalg.slogdet(jacobian_blocks(t, x.detach()))
    assert (sign == 1).all(), sign
    torch.testing.assert_close(log_det.detach(), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("conditional", [False, True], ids=["plain", "cond"])
def test_spline_finite_gradients_at_and_beyond_the_bound(conditional):
    bound = 3.0
    layer = make("neural_spline", conditional, scale=100.0, bound=bound)
    edge = torch.tensor([-1e6, -bound - 1e-9, -bound, bound, bound + 1e-9, 1e6], dtype=torch.float64)
    x = torch.stack([edge.roll(k) for k in range(DIM)], dim=-1).requires_grad_()  # every coordinate
    t = condition_rows(layer, x.detach(), context_scale=100.0)
    y = t(x)
    log_det = t.log_abs_det_jacobian(x, y)
    (y.sum() + log_det.sum()).backward()
    assert torch.isfinite(y).all() and torch.isfinite(log_det).all()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    outside = x.detach().abs() > bound
    assert torch.equal(y.detach()[outside], x.detach()[outside])  # identity tails
    torch.testing.assert_close(t.inv(y.detach().clone()), x.detach(), rtol=1e-9, atol=1e-9)


def test_spline_function_slopes_are_bounded_and_float32_inverse_accurate():
    torch.manual_seed(0)
    n = 500
    x = torch.linspace(-5, 5, 1001, dtype=torch.float64).expand(n, 1001)
    for scale in (1.0, 100.0, 1e4):
        w, s, d = (scale * torch.randn(n, 1, k, dtype=torch.float64) for k in (8, 8, 7))
        _, log_det = rational_quadratic_spline(x, w, s, d, bound=5.0)
        assert log_det.exp().min() > 4e-3 and log_det.exp().max() < 60
        y32, _ = rational_quadratic_spline(x.float(), w.float(), s.float(), d.float(), bound=5.0)
        x32, _ = rational_quadratic_spline_inverse(y32, w.float(), s.float(), d.float(), bound=5.0)
        assert (x32 - x.float()).abs().max() < 1e-3


def test_spline_function_is_the_identity_at_zero_and_continuous_at_the_knots():
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    zeros = torch.zeros(101, 8, dtype=torch.float64)
    y, log_det = rational_quadratic_spline(x, zeros, zeros, zeros[:, :7], bound=5.0)
    torch.testing.assert_close(y, x)
    torch.testing.assert_close(log_det, torch.zeros_like(x))
    torch.manual_seed(3)
    w, s, d = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64), torch.randn(7)
    fine = torch.linspace(-5.5, 5.5, 20001, dtype=torch.float64)
    y, log_det = rational_quadratic_spline(
        fine, w.expand(20001, 8), s.expand(20001, 8), d.double().expand(20001, 7), 5.0
    )
    assert (y.diff() > 0).all()  # monotone, no jumps: the steps are bounded by the largest slope
    assert y.diff().max() < 60 * fine.diff().max()
    slope = log_det.exp()
    assert (slope[:-1] - slope[1:]).abs().max() < 0.2  # derivative continuous (C¹) across knots and ±B


@pytest.mark.parametrize(("name", "conditional"), CASES)
def test_gradients_reach_every_parameter(name, conditional):
    layer = make(name, conditional)
    x = points()
    t = condition_rows(layer, x)
    y = t(x)
    (y.pow(2).sum() + t.log_abs_det_jacobian(x, y).sum()).backward()
    for pname, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize(("name", "conditional"), CASES)
def test_initial_layer_is_the_identity(name, conditional):
    torch.manual_seed(0)
    layer = flows.make(name, DIM, context_dim=CONTEXT if conditional else None).double()
    x = points()
    t = condition_rows(layer, x)
    y = t(x)
    torch.testing.assert_close(y, x, rtol=0, atol=1e-12)
    torch.testing.assert_close(t.log_abs_det_jacobian(x, y), torch.zeros(N, dtype=torch.float64))
    torch.testing.assert_close(t.inv(y.clone()), x, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("name", "conditional"), CASES)
def test_layer_attributes(name, conditional):
    layer = flows.make(name, DIM, context_dim=CONTEXT if conditional else None)
    assert layer.needs_permutation
    t = layer.condition(torch.zeros(CONTEXT)) if conditional else layer
    assert t.bijective and t.needs_permutation
    for c in (t.domain, t.codomain):
        assert isinstance(c, constraints.independent) and c.reinterpreted_batch_ndims == 1
        assert c.base_constraint is constraints.real
    assert layer.volume_preserving == (name == "additive_coupling")


@pytest.mark.parametrize("name", NAMES)
def test_stack_reverses_between_layers(name):
    layers = flows.stack(name, DIM, num_flows=3)
    assert [isinstance(m, Reverse) for m in layers] == [False, True, False, True, False]


# -- shapes, dtypes, contexts --------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_context_broadcasts_against_sample_and_batch_shapes(name):
    layer = make(name, True)
    x = torch.randn(4, 3, DIM, dtype=torch.float64)
    t = layer.condition(torch.randn(3, CONTEXT, dtype=torch.float64))  # (B, C) against (S, B, D)
    y = t(x)
    assert y.shape == x.shape and t.log_abs_det_jacobian(x, y).shape == (4, 3)
    torch.testing.assert_close(t.inv(y.clone()), x)
    single = layer.condition(torch.randn(CONTEXT, dtype=torch.float64))
    assert single(x).shape == x.shape
    wide = layer.condition(torch.randn(6, CONTEXT, dtype=torch.float64))  # contexts, one shared point
    one = torch.randn(DIM, dtype=torch.float64)
    y = wide(one)
    assert y.shape == (6, DIM) and wide.log_abs_det_jacobian(one, y).shape == (6,)
    torch.testing.assert_close(wide.inv(y.clone()), one.expand(6, DIM))


@pytest.mark.parametrize(("name", "conditional"), CASES)
def test_float32_end_to_end(name, conditional):
    layer = flows.make(name, DIM, context_dim=CONTEXT if conditional else None)
    x = torch.randn(N, DIM)
    t = condition_rows(layer, x)
    y = t(x)
    log_det = t.log_abs_det_jacobian(x, y)
    assert y.dtype == log_det.dtype == t.inv(y.clone()).dtype == torch.float32


def test_iaf_inverse_stops_early_only_at_the_fixed_point():
    layer = make("iaf", False, dim=8)
    x = points(dim=8)
    y = layer(x)
    t = layer.layer
    full = y  # dim plain passes, no early stop
    for _ in range(8):
        mean, raw = t.conditioner(full)
        full = (y - mean) * torch.exp(-t._log_scale(raw))
    torch.testing.assert_close(t.inverse_map(y), full, rtol=0, atol=0)

    fresh = IAF(8).double()  # the identity: the first pass changes nothing, so it stops there
    passes = []
    fresh.layer.conditioner = lambda v: passes.append(1) or fresh.net(v)
    torch.testing.assert_close(fresh.inv(x.clone()), x)
    assert len(passes) == 1


@pytest.mark.parametrize("conditional", [False, True], ids=["plain", "cond"])
def test_made_conditioner_equals_pyro_autoregressive_nn(conditional):
    layer = make("iaf", conditional, hidden_dims=[12, 9])
    made = layer.net
    x = torch.randn(4, 3, DIM, dtype=torch.float64)
    if conditional:
        context = torch.randn(3, CONTEXT, dtype=torch.float64)
        ours = MadeConditioner(made, context)(x)
        theirs = made(x, context)
    else:
        ours, theirs = MadeConditioner(made)(x), made(x)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)


def test_coupling_with_one_coordinate_rejects_a_split():
    for name in ("additive_coupling", "affine_coupling", "neural_spline"):
        with pytest.raises(ValueError, match=r"with dim=1 there is nothing to split"):
            flows.make(name, 1, split_dim=1)


# -- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "conditional"), CASES)
def test_wrong_input_and_context_dimension(name, conditional):
    layer = make(name, conditional)
    t = condition_rows(layer, points())
    with pytest.raises(
        ValueError, match=rf"expected input with last dimension {DIM}, got shape \({N}, {DIM + 1}\)"
    ):
        t(points(dim=DIM + 1))
    with pytest.raises(ValueError, match=rf"expected input with last dimension {DIM}"):
        t.inv(points(dim=DIM - 1))
    if conditional:
        with pytest.raises(ValueError, match=rf"expected context with last dimension {CONTEXT}, got shape"):
            layer.condition(torch.randn(N, CONTEXT + 1, dtype=torch.float64))


BAD_OPTIONS = [
    ("additive_coupling", {"split_dim": 0}, r"AdditiveCoupling: option split_dim must be .* >= 1, got 0"),
    ("additive_coupling", {"split_dim": 5}, r"split_dim=5 must be < dim=5.*1 <= split_dim <= 4"),
    ("affine_coupling", {"split_dim": 2.5}, r"AffineCoupling: option split_dim must be .* got 2.5"),
    ("affine_coupling", {"hidden_dims": []}, r"AffineCoupling: option hidden_dims must be a non-empty list"),
    ("affine_coupling", {"hidden_dims": [16, 0]}, r"hidden_dims must be .* got \[16, 0\]"),
    ("affine_coupling", {"hidden_dims": "64"}, r"hidden_dims must be a non-empty list of integers"),
    ("affine_coupling", {"max_log_scale": 0}, r"AffineCoupling: option max_log_scale must be .* > 0, got 0"),
    ("affine_coupling", {"max_log_scale": math.inf}, r"max_log_scale must be a finite number > 0, got inf"),
    ("neural_spline", {"num_bins": 1}, r"NeuralSpline: option num_bins must be an integer >= 2, got 1"),
    ("neural_spline", {"num_bins": 0}, r"NeuralSpline: option num_bins must be an integer >= 1, got 0"),
    ("neural_spline", {"bound": -1.0}, r"NeuralSpline: option bound must be a finite number > 0, got -1.0"),
    ("neural_spline", {"bound": "5"}, r"option bound must be a finite number > 0, got '5'"),
    ("iaf", {"hidden_dims": [4]}, r"IAF: option hidden_dims=\[4\] has a layer narrower than dim=5"),
    ("iaf", {"max_log_scale": -3}, r"IAF: option max_log_scale must be a finite number > 0, got -3"),
    ("iaf", {"colour": "red"}, r"unknown option\(s\) colour; options it takes: hidden_dims, max_log_scale"),
    ("neural_spline", {"colour": 1}, r"unknown option\(s\) colour; options it takes: bound, hidden_dims"),
]
CONDITIONAL_NAMES = {
    "AdditiveCoupling": "ConditionalAdditiveCoupling",
    "AffineCoupling": "ConditionalAffineCoupling",
    "NeuralSpline": "ConditionalNeuralSpline",
    "IAF": "ConditionalIAF",
}


@pytest.mark.parametrize(("name", "options", "message"), BAD_OPTIONS)
@pytest.mark.parametrize("conditional", [False, True], ids=["plain", "cond"])
def test_bad_options_raise_value_error(name, options, message, conditional):
    if conditional:
        for plain, cond in CONDITIONAL_NAMES.items():
            message = message.replace(f"{plain}:", f"{cond}:")
    with pytest.raises(ValueError, match=message):
        flows.make(name, DIM, context_dim=CONTEXT if conditional else None, **options)


@pytest.mark.parametrize("cls", [AdditiveCoupling, AffineCoupling, NeuralSpline, IAF])
def test_bad_dimensions(cls):
    for dim in (0, 2.0, True):
        with pytest.raises(ValueError, match=rf"{cls.__name__}: option dim must be an integer >= 1"):
            cls(dim)
    with pytest.raises(ValueError, match="option context_dim must be an integer >= 1, got 0"):
        flows.make(
            {
                AdditiveCoupling: "additive_coupling",
                AffineCoupling: "affine_coupling",
                NeuralSpline: "neural_spline",
                IAF: "iaf",
            }[cls],
            4,
            context_dim=0,
        )
