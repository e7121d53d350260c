"""ArviZ data from guides: layout (dims, coords), the numbers in each group, ArviZ functions on it."""

import logging
import warnings

import arviz as az
import matplotlib
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal

from pyro_flowguides import AutoFlowEnsemble, AutoFlowGuide, arviz_export
from pyro_flowguides.amortisation import Amortised
from pyro_flowguides.arviz_export import arviz_major, to_inference_data
from pyro_flowguides.diagnostics import loo, psis

matplotlib.use("Agg")
F64 = {"dtype": torch.float64}
X = torch.tensor([0.5, -1.0, 2.0, 0.3, 1.1], **F64)


def model(x):
    mu = pyro.sample("mu", dist.Normal(torch.zeros((), **F64), 1.0))
    beta = pyro.sample("beta", dist.Normal(torch.zeros(2, **F64), 1.0).to_event(1))
    pyro.deterministic("shift", mu + beta.sum(-1))
    with pyro.plate("obs", x.shape[0]):
        loc = pyro.sample("loc", dist.Normal(mu, 1.0))
        pyro.deterministic("twice", 2 * loc)
        pyro.sample("x", dist.Normal(loc, 1.0), obs=x)


@pytest.fixture(scope="module")
def data():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    return to_inference_data(AutoNormal(model), model, X, num_samples=300)


def dims(dataset):
    return {name: variable.dims for name, variable in dataset.data_vars.items()}


def test_groups_and_dims_follow_the_plates(data):
    assert set(data.groups()) == {
        "posterior",
        "posterior_predictive",
        "log_likelihood",
        "observed_data",
        "sample_stats",
    }
    assert dims(data.posterior) == {
        "mu": ("chain", "draw"),
        "beta": ("chain", "draw", "beta_dim_0"),
        "shift": ("chain", "draw"),
        "loc": ("chain", "draw", "obs"),
        "twice": ("chain", "draw", "obs"),
    }
    assert dict(data.posterior.sizes) == {"chain": 1, "draw": 300, "beta_dim_0": 2, "obs": 5}
    np.testing.assert_array_equal(data.posterior.obs.values, np.arange(5))
    for group in ("posterior_predictive", "log_likelihood"):
        assert dims(data[group]) == {"x": ("chain", "draw", "obs")}
    assert dims(data.observed_data) == {"x": ("obs",)}
    assert dims(data.sample_stats) == dict.fromkeys(("lp", "log_q", "log_weight"), ("chain", "draw"))


def test_groups_hold_the_model_numbers(data):
    post = data.posterior
    mu, beta, loc = (torch.as_tensor(post[name].values[0]) for name in ("mu", "beta", "loc"))
    np.testing.assert_allclose(post["shift"].values[0], (mu + beta.sum(-1)).numpy())
    np.testing.assert_allclose(post["twice"].values[0], 2 * loc.numpy())
    np.testing.assert_array_equal(data.observed_data.x.values, X.numpy())
    log_lik = dist.Normal(loc, 1.0).log_prob(X)
    np.testing.assert_allclose(data.log_likelihood.x.values[0], log_lik.numpy(), rtol=1e-12)
    lp = (
        dist.Normal(0.0, 1.0).log_prob(mu)
        + dist.Normal(0.0, 1.0).log_prob(beta).sum(-1)
        + dist.Normal(mu[:, None], 1.0).log_prob(loc).sum(-1)
        + log_lik.sum(-1)
    )
    stats = data.sample_stats
    np.testing.assert_allclose(stats.lp.values[0], lp.numpy(), rtol=1e-10)
    np.testing.assert_allclose(stats.log_weight.values, stats.lp.values - stats.log_q.values, rtol=1e-10)


def test_posterior_predictive_replicates_the_data_given_each_draw():
    data = to_inference_data(AutoNormal(model), model, X, num_samples=4000)
    residual = data.posterior_predictive.x.values - data.posterior["loc"].values  # ~ N(0, 1)
    assert abs(residual.mean()) < 0.03 and abs(residual.std() - 1) < 0.03


def test_attrs_name_the_guide_and_the_flow():
    guide = AutoFlowGuide(model, flow="lu_linear", num_flows=2)
    data = to_inference_data(guide, model, X, num_samples=10)
    assert data.attrs["guide"] == "AutoFlowGuide" and data.attrs["num_samples"] == 10
    assert "LULinearTransform" in data.attrs["flow"] and "num_layers=2" in data.attrs["flow"]
    assert data.attrs["inference_library"] == "pyro"


def test_an_ensemble_names_its_members_and_their_flows():
    alike = AutoFlowEnsemble([AutoFlowGuide(model, flow="planar", num_flows=2) for _ in range(3)])
    data = to_inference_data(alike, model, X, num_samples=10)
    assert data.attrs["guide"] == "AutoFlowEnsemble" and data.attrs["ensemble_members"] == 3
    assert data.attrs["flow"].count("FlowStack") == 1 and "PlanarTransform" in data.attrs["flow"]
    assert data.posterior["mu"].shape == (1, 10)
    pyro.clear_param_store()
    mixed = AutoFlowEnsemble([AutoFlowGuide(model, flow=flow, num_flows=1) for flow in ("planar", "radial")])
    attrs = to_inference_data(mixed, model, X, num_samples=10).attrs["flow"]
    assert (
        attrs.startswith("member 0: ")
        and "Planar" in attrs
        and " | member 1: " in attrs
        and "Radial" in attrs
    )


def test_subsampled_plate_coords_are_the_subsample_indices():
    full = torch.linspace(-1.0, 1.0, 8, **F64)

    def subsampled(x):
        mu = pyro.sample("mu", dist.Normal(torch.zeros((), **F64), 1.0))
        with pyro.plate("obs", x.shape[0], subsample_size=3) as i:
            loc = pyro.sample("loc", dist.Normal(mu, 1.0))
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x[i])

    data = to_inference_data(AutoNormal(subsampled), subsampled, full, num_samples=50)
    indices = np.array(data.posterior.obs.values)  # a copy: index values are read-only
    assert len(set(indices)) == 3 and set(indices) <= set(range(8))
    np.testing.assert_array_equal(data.observed_data.x.values, full.numpy()[indices])
    log_lik = dist.Normal(torch.as_tensor(data.posterior["loc"].values[0]), 1.0).log_prob(full[indices])
    np.testing.assert_allclose(data.log_likelihood.x.values[0], log_lik.numpy(), rtol=1e-12)


def test_amortised_guide_with_local_latents():
    def local(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x)

    def encoder_guide(x):
        weight = pyro.param("weight", torch.tensor(0.8, **F64))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(weight * x, 0.45))

    data = to_inference_data(encoder_guide, local, X, num_samples=200)
    assert dims(data.posterior) == {"z": ("chain", "draw", "data")}
    assert data.attrs["guide"] == "encoder_guide"
    z = torch.as_tensor(data.posterior.z.values[0])
    log_q = dist.Normal(0.8 * X, 0.45).log_prob(z).sum(-1)
    np.testing.assert_allclose(data.sample_stats.log_q.values[0], log_q.numpy(), rtol=1e-10)


def test_arviz_functions_run_on_the_output_without_warnings(data, tmp_path, caplog):
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING):
        warnings.simplefilter("error")
        # ArviZ 0.23's matplotlib backend calls an API that matplotlib 3.11 deprecates, whatever the data
        warnings.filterwarnings("ignore", category=matplotlib.MatplotlibDeprecationWarning)
        summary = az.summary(data, kind="stats")
        elpd = az.loo(data)
        az.plot_posterior(data, var_names=["mu", "beta"]).ravel()[0].figure.savefig(
            tmp_path / "posterior.png"
        )
        az.plot_pair(data, var_names=["mu", "beta"]).ravel()[0].figure.savefig(tmp_path / "pair.png")
    assert not caplog.records, [record.getMessage() for record in caplog.records]
    assert set(summary.index) >= {"mu", "beta[0]", "loc[0]"} and np.isfinite(elpd.elpd_loo)


def test_arviz_1_gets_one_nested_dict(monkeypatch):
    calls = []
    monkeypatch.setattr(arviz_export, "arviz_major", lambda: 1)
    monkeypatch.setattr(az, "from_dict", lambda *args, **kwargs: calls.append((args, kwargs)))
    to_inference_data(AutoNormal(model), model, X, num_samples=20)
    ((args, kwargs),) = calls
    (groups,) = args
    assert set(groups) == {
        "posterior",
        "posterior_predictive",
        "log_likelihood",
        "observed_data",
        "sample_stats",
    }
    assert groups["posterior"]["loc"].shape == (1, 20, 5) and groups["observed_data"]["x"].shape == (5,)
    assert kwargs["dims"]["loc"] == ["obs"] and list(kwargs["coords"]["obs"]) == list(range(5))
    assert kwargs["attrs"]["/"]["guide"] == "AutoNormal"


def test_num_samples_is_checked():
    with pytest.raises(ValueError, match="num_samples must be an integer >= 2"):
        to_inference_data(AutoNormal(model), model, X, num_samples=1)


@pytest.mark.skipif(arviz_major() < 1, reason="needs ArviZ >= 1 (Python >= 3.12)")
def test_arviz_1_datatree():
    import xarray

    data = to_inference_data(AutoNormal(model), model, X, num_samples=200)
    assert isinstance(data, xarray.DataTree)
    assert set(data.children) >= {"posterior", "log_likelihood", "sample_stats", "observed_data"}
    assert data["posterior"]["loc"].dims == ("chain", "draw", "obs")
    assert np.isfinite(loo(data).elpd)
    _, k_hat = psis(np.random.default_rng(0).normal(size=1000) * 0.1)
    assert k_hat < 0.5


def test_amortised_flow_guide_layout_and_attrs():
    def local(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2, **F64), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 0.5).to_event(1), obs=x)

    spec = Amortised(plate="data", inputs=lambda x: x, hidden_dims=[8])
    guide = AutoFlowGuide(local, flow="planar", num_flows=2, amortised=spec)
    data = to_inference_data(guide, local, torch.randn(6, 2, **F64), num_samples=40)
    assert dims(data.posterior) == {"z": ("chain", "draw", "data", "z_dim_0")}
    assert type(guide.local_posterior.layers[0]).__name__ in data.attrs["local_flow"]
    assert np.isfinite(data.sample_stats.log_weight.values).all()
