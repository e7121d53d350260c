"""AutoFlowGuide keeps the promises of a Pyro autoguide."""

import io
import pickle

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import CUDA
from pyro import poutine
from pyro.infer import (
    SVI,
    JitTrace_ELBO,
    Predictive,
    RenyiELBO,
    Trace_ELBO,
    TraceGraph_ELBO,
    WeighedPredictive,
)
from pyro.infer.autoguide import AutoGuideList, AutoNormal, init_to_value
from pyro.nn import PyroModule, PyroSample

from pyro_flowguides import AutoFlowGuide, flows

DATA = torch.tensor([0.3, 1.2, -0.4, 0.9, 1.5])


def regression(data=DATA):
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
    with pyro.plate("obs", data.shape[0]):
        pyro.sample("y", dist.Normal(mu, sigma), obs=data)


def fit(model, guide, *args, steps=50, loss=None, lr=0.02):
    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), loss or Trace_ELBO())
    losses = [svi.step(*args) for _ in range(steps)]
    assert all(torch.isfinite(torch.tensor(losses)))
    return losses


def test_median_equals_init_values_before_any_step():
    init = {"mu": torch.tensor(0.7), "sigma": torch.tensor(2.5)}
    guide = AutoFlowGuide(regression, flow="planar", num_flows=3, init_loc_fn=init_to_value(values=init))
    median = guide.median()
    for name, value in init.items():
        torch.testing.assert_close(median[name], value)


@pytest.mark.parametrize("flow", ["affine_coupling", "orthogonal_sylvester", "iaf", "neural_spline"])
def test_every_flow_starts_at_the_identity(flow):
    init = {"mu": torch.tensor(-1.3), "sigma": torch.tensor(0.4)}
    guide = AutoFlowGuide(regression, flow=flow, init_loc_fn=init_to_value(values=init))
    for name, value in guide.median().items():
        torch.testing.assert_close(value, init[name], atol=1e-6, rtol=0)


def test_init_scale_sets_the_base_scale():
    guide = AutoFlowGuide(regression, flow="planar", init_scale=0.3)
    guide()
    torch.testing.assert_close(guide.scale, torch.full((2,), 0.3))


def test_improper_uniform_prior():
    def model():
        beta = pyro.sample("beta", dist.ImproperUniform(dist.constraints.real, (), (3,)))
        sigma = pyro.sample("sigma", dist.ImproperUniform(dist.constraints.positive, (), ()))
        with pyro.plate("obs", 4):
            pyro.sample("y", dist.Normal(beta.sum(), sigma), obs=torch.ones(4))

    guide = AutoFlowGuide(model, flow="planar", num_flows=2)
    median = guide.median()
    torch.testing.assert_close(median["beta"], torch.zeros(3))
    torch.testing.assert_close(median["sigma"], torch.tensor(1.0))
    fit(model, guide, steps=5)


CONSTRAINED = {
    "positive": dist.Gamma(3.0, 2.0),
    "interval": dist.Uniform(-1.0, 2.0),
    "simplex": dist.Dirichlet(torch.tensor([2.0, 3.0, 4.0])),
    "ordered": dist.TransformedDistribution(
        dist.Normal(torch.zeros(3), 1.0).to_event(1), [dist.transforms.OrderedTransform()]
    ),
    "corr_cholesky": dist.LKJCholesky(3, 2.0),
}


@pytest.mark.parametrize("support", list(CONSTRAINED))
def test_constrained_supports_have_exact_jacobians(support):
    """With no data the posterior is the prior: KL(q || prior) >= 0 holds only with the right Jacobians."""
    prior = CONSTRAINED[support]

    def model():
        pyro.sample("z", prior)

    guide = AutoFlowGuide(model, flow="affine_coupling", num_flows=2, init_scale=0.5)
    fit(model, guide, steps=300, lr=0.03)
    elbo = Trace_ELBO(num_particles=4000, vectorize_particles=True, max_plate_nesting=0)
    kl = elbo.loss(model, guide)
    assert -0.02 < kl < 0.25, f"KL(q || prior) estimate {kl}"
    sample = guide()["z"]
    assert prior.support.check(sample).all()


def test_lower_cholesky_support():
    """An improper prior over Cholesky factors; the data pin down the covariance L Lᵀ."""
    true_cov = torch.tensor([[2.0, 0.6], [0.6, 1.0]])
    data = dist.MultivariateNormal(torch.zeros(2), true_cov).sample((400,))

    def model():
        scale_tril = pyro.sample("L", dist.ImproperUniform(dist.constraints.lower_cholesky, (), (2, 2)))
        with pyro.plate("obs", 400):
            pyro.sample("x", dist.MultivariateNormal(torch.zeros(2), scale_tril=scale_tril), obs=data)

    guide = AutoFlowGuide(model, flow="planar", num_flows=2)
    assert torch.equal(guide.median()["L"], torch.eye(2))
    fit(model, guide, steps=400, lr=0.05)
    scale_tril = guide.median()["L"]
    assert dist.constraints.lower_cholesky.check(scale_tril)
    torch.testing.assert_close(scale_tril @ scale_tril.T, torch.cov(data.T), atol=0.25, rtol=0)


def test_median_quantiles_posterior_and_sample_latent():
    guide = AutoFlowGuide(regression, flow="planar", num_flows=2)
    fit(regression, guide, steps=200)
    q = guide.quantiles([0.1, 0.5, 0.9])
    assert q["mu"].shape == (3,) and (q["mu"].diff() > 0).all()
    assert (q["sigma"] > 0).all()
    posterior = guide.get_posterior()
    z = posterior.rsample((10,))
    assert z.shape == (10, 2)
    torch.testing.assert_close(posterior.log_prob(z.clone()), posterior.log_prob(z), atol=1e-5, rtol=1e-5)
    assert guide.sample_latent().shape == (2,)
    with pytest.raises(ValueError, match="quantiles must be"):
        guide.quantiles([1.5])


def test_full_base_covariance_is_a_multivariate_normal_with_the_flow_inside():
    """``loc + scale ⊙ f(U ε)``: median at the init values; ``log_prob`` inverts the layers, ``U``
    and ``scale`` (checked against sampling's own log-density at trained, non-trivial values); with
    the layers removed it is ``MultivariateNormal(loc, diag(scale) U)``."""
    init = {"mu": torch.tensor(0.7), "sigma": torch.tensor(2.5)}
    guide = AutoFlowGuide(
        regression, flow="iaf", num_flows=2, base_covariance="full", init_loc_fn=init_to_value(values=init)
    )
    for name, value in guide.median().items():
        torch.testing.assert_close(value, init[name], atol=1e-6, rtol=0)
    fit(regression, guide, steps=100, lr=0.05)
    shear = guide.shear.detach()
    assert shear[1, 0].abs() > 1e-3 and torch.equal(shear.diagonal(), torch.ones(2))
    posterior = guide.get_posterior()
    z = posterior.rsample((20,))
    torch.testing.assert_close(posterior.log_prob(z.clone()), posterior.log_prob(z), atol=1e-5, rtol=1e-5)
    assert guide.median()["mu"] != init["mu"]
    gaussian = type(posterior)(guide.loc, guide.scale, [], shear=guide.shear, standardised=True)
    torch.testing.assert_close(gaussian.log_prob(z), guide.get_base_dist().log_prob(z), atol=1e-5, rtol=1e-5)


def test_the_default_is_the_measured_best_stack_on_a_full_base_and_a_named_flow_keeps_a_diagonal_one():
    """No ``flow``: ``DEFAULT_FLOW`` (LU, IAF, LU, IAF) with ``U``; a named flow: 4 layers, no ``U``;
    ``num_flows`` without a flow to repeat is refused."""
    from pyro_flowguides.guide import DEFAULT_FLOW

    default = AutoFlowGuide(regression)
    default()
    assert [type(layer).__name__ for layer in default.flow] == ["LULinear", "IAF", "LULinear", "IAF"]
    assert DEFAULT_FLOW == ("lu_linear", "iaf", "lu_linear", "iaf")
    assert default.shear.shape == (2, 2)
    named = AutoFlowGuide(regression, flow="iaf")
    named()
    assert [type(layer).__name__ for layer in named.flow].count("IAF") == 4 and not hasattr(named, "shear")
    with pytest.raises(ValueError, match="num_flows=2 needs a flow to repeat"):
        AutoFlowGuide(regression, num_flows=2)


def test_full_base_covariance_is_refused_with_a_data_set_summary():
    from pyro_flowguides import DataSummary

    with pytest.raises(ValueError, match="base_covariance='full' is for the guide's own global flow"):
        AutoFlowGuide(regression, base_covariance="full", summary=DataSummary(inputs=lambda data: data))


@pytest.mark.parametrize(
    "loss",
    [
        Trace_ELBO(),
        TraceGraph_ELBO(),
        RenyiELBO(alpha=0.5, num_particles=3),
        JitTrace_ELBO(),
        Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1),
        JitTrace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1),
    ],
    ids=["trace", "tracegraph", "renyi", "jit", "vectorized", "jit-vectorized"],
)
@pytest.mark.parametrize(
    "flow", [{"flow": "orthogonal_sylvester", "num_flows": 2}, {}], ids=["o-snf", "default"]
)
def test_elbos(loss, flow):
    guide = AutoFlowGuide(regression, **flow)
    losses = fit(regression, guide, steps=30, loss=loss)
    assert losses[-1] < losses[0] + 5


def test_no_parameter_registered_twice():
    guide = AutoFlowGuide(regression, flow="planar", num_flows=2)
    guide()
    names = list(pyro.get_param_store().keys())
    assert len(names) == len(set(names))
    values = [pyro.get_param_store()[n] for n in names]
    assert len({id(v.unconstrained()) if hasattr(v, "unconstrained") else id(v) for v in values}) == len(
        values
    )


@pytest.mark.parametrize("parallel", [False, True])
def test_predictive(parallel):
    guide = AutoFlowGuide(regression, flow="planar", num_flows=2)
    fit(regression, guide, steps=20)
    predictive = Predictive(regression, guide=guide, num_samples=50, parallel=parallel)
    samples = predictive(DATA)
    assert samples["mu"].shape == (50, 1)  # as with Pyro's own autoguides: the plate dim is kept
    assert samples["y"].shape == (50, 5)


def test_weighed_predictive():
    guide = AutoFlowGuide(regression, flow="planar", num_flows=2)
    fit(regression, guide, steps=200)
    predictive = WeighedPredictive(regression, guide=guide, num_samples=200, parallel=True)
    result = predictive(DATA, model_guide=regression)
    assert result.log_weights.shape == (200,)
    assert torch.isfinite(result.log_weights).all()


def test_inside_auto_guide_list():
    def model():
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        b = pyro.sample("b", dist.Normal(a, 1.0))
        pyro.sample("y", dist.Normal(b, 0.5), obs=torch.tensor(1.0))

    guide = AutoGuideList(model)
    guide.append(AutoFlowGuide(poutine.block(model, expose=["a"]), flow="planar"))
    guide.append(AutoNormal(poutine.block(model, hide=["a"])))
    fit(model, guide, steps=20)
    assert set(guide.median()) == {"a", "b"}


def test_pyro_module_model():
    class Regression(PyroModule):
        def __init__(self):
            super().__init__()
            self.linear = PyroModule[torch.nn.Linear](2, 1)
            self.linear.weight = PyroSample(dist.Normal(0.0, 1.0).expand([1, 2]).to_event(2))
            self.linear.bias = PyroSample(dist.Normal(0.0, 1.0).expand([1]).to_event(1))

        def forward(self, x, y=None):
            mean = self.linear(x).squeeze(-1)
            with pyro.plate("data", x.shape[0]):
                return pyro.sample("y", dist.Normal(mean, 0.5), obs=y)

    model = Regression()
    x = torch.randn(20, 2)
    y = x @ torch.tensor([1.0, -2.0]) + 0.3
    guide = AutoFlowGuide(model, flow="householder_sylvester", num_flows=2)
    fit(model, guide, x, y, steps=300, lr=0.05)
    torch.testing.assert_close(guide.median()["linear.weight"], torch.tensor([[1.0, -2.0]]), atol=0.4, rtol=0)


def test_pickle_torch_save_and_param_store_round_trip(tmp_path):
    guide = AutoFlowGuide(regression, flow="planar", num_flows=2)
    fit(regression, guide, steps=20)
    expected = guide.median()
    for copy in (pickle.loads(pickle.dumps(guide)),):
        for name, value in copy.median().items():
            torch.testing.assert_close(value, expected[name])
    buffer = io.BytesIO()
    torch.save(guide, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for name, value in loaded.median().items():
        torch.testing.assert_close(value, expected[name])

    path = tmp_path / "params.pt"
    pyro.get_param_store().save(path)
    pyro.clear_param_store()
    fresh = AutoFlowGuide(regression, flow="planar", num_flows=2)
    fresh()
    pyro.get_param_store().load(path)
    for name, value in fresh.median().items():
        torch.testing.assert_close(value, expected[name])


def test_a_guide_of_a_local_model_pickles():
    """As Pyro's autoguides, the guide does not pickle its model, which need not be picklable."""

    def local_model():
        pyro.sample("x", dist.Normal(0.0, 1.0))

    guide = AutoFlowGuide(local_model, flow="planar", num_flows=2)
    guide()
    assert sorted(pickle.loads(pickle.dumps(guide))()) == ["x"]


def test_float64_model_gets_float64_guide():
    data = DATA.double()

    def model():
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 2.0))
        with pyro.plate("obs", 5):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=data)

    guide = AutoFlowGuide(model, flow="orthogonal_sylvester", num_flows=2)
    assert guide()["mu"].dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in guide.parameters())
    fit(model, guide, steps=5)


def test_subsampled_local_latent_is_refused():
    def model(data):
        with pyro.plate("data", 100, subsample_size=10) as idx:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=data[idx])

    guide = AutoFlowGuide(model, flow="planar")
    with pytest.raises(ValueError, match=r"'z' is local to the subsampled plate 'data'.*Amortise"):
        guide(torch.randn(100))


def test_discrete_latent_gets_a_hint():
    def model():
        pyro.sample("k", dist.Categorical(torch.ones(3) / 3))

    with pytest.raises(ValueError, match=r"discrete.*'k'.*enumerat"):
        AutoFlowGuide(model, flow="planar")()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"flow": "plannar"}, "unknown flow layer 'plannar'"),
        ({"flow": "planar", "num_flows": 0}, "num_flows must be an integer >= 1"),
        ({"flow": "planar", "init_scale": -1.0}, "init_scale must be a positive number"),
        ({"base_covariance": "dense"}, "base_covariance must be 'diagonal' or 'full'"),
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AutoFlowGuide(regression, **kwargs)


@CUDA
@pytest.mark.cuda
def test_cuda_model_gets_cuda_guide():
    data = DATA.cuda()

    def model():
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, device="cuda"), 2.0))
        with pyro.plate("obs", 5):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=data)

    guide = AutoFlowGuide(model, flow="orthogonal_sylvester", num_flows=2)
    assert guide()["mu"].device.type == "cuda"
    fit(model, guide, steps=5)


def test_stale_param_store_from_another_model_is_a_clear_error():
    guide = AutoFlowGuide(regression, flow="planar", num_flows=2)
    guide()

    def bigger():
        pyro.sample("z", dist.Normal(0.0, 1.0).expand([7]).to_event(1))

    with pytest.raises(
        ValueError, match=r"param store holds 'AutoFlowGuide.flow\$\$\$0.u'.*clear_param_store"
    ):
        AutoFlowGuide(bigger, flow="planar", num_flows=2)()


def test_feasible_init_takes_dtype_from_wrapped_distributions():
    def model():
        pyro.sample("z", dist.Normal(torch.zeros(3, dtype=torch.float64), 1.0).to_event(1))

    guide = AutoFlowGuide(model, flow="planar")
    assert guide.median()["z"].dtype == torch.float64


def test_flow_as_a_list_of_names_or_a_callable():
    listed = AutoFlowGuide(regression, flow=["planar", "affine_coupling", "affine_coupling", "lu_linear"])
    listed()
    kinds = [type(layer).__name__ for layer in listed.flow]
    assert kinds == ["Planar", "AffineCoupling", "Reverse", "AffineCoupling", "LULinear", "Reverse"]
    fit(regression, listed, steps=5)

    pyro.clear_param_store()
    built = AutoFlowGuide(regression, flow=lambda dim: flows.make("radial", dim), num_flows=3)
    built()
    assert [type(layer).__name__ for layer in built.flow] == ["Radial"] * 3
    fit(regression, built, steps=5)


def test_layer_options_pass_through():
    guide = AutoFlowGuide(regression, flow="orthogonal_sylvester", num_flows=2, num_ortho_vecs=1)
    guide()
    (stack,) = guide.flow
    assert stack.layer.options["num_ortho_vecs"] == 1
    with pytest.raises(ValueError, match="num_ortho_vecs=3 is larger than the dimension 2"):
        AutoFlowGuide(regression, flow="orthogonal_sylvester", num_ortho_vecs=3)()


def test_the_default_stack_takes_its_iaf_layers_options():
    guide = AutoFlowGuide(regression, hidden_dims=[16], max_log_scale=1.0)
    guide()
    iafs = [layer for layer in guide.flow if type(layer).__name__ == "IAF"]
    options = [layer.layer.options for layer in iafs]
    assert [(o["hidden_dims"], o["max_log_scale"]) for o in options] == [([16], 1.0)] * 2
    fit(regression, guide, steps=5)
