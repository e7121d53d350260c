"""EqualMixture and AutoFlowEnsemble: the mixture's density, its draws, and the ensemble as a guide."""

import math
import pickle

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import CUDA
from pyro.infer import Predictive

from pyro_flowguides import (
    Amortised,
    AutoFlowEnsemble,
    AutoFlowGuide,
    DataSummary,
    EqualMixture,
    FlowDistribution,
    flows,
)
from pyro_flowguides.datasets import (
    DatasetELBO,
    PriorPredictive,
    draw_for_datasets,
    posterior_log_density,
    simulate_datasets,
)
from pyro_flowguides.diagnostics import diagnose
from pyro_flowguides.draws import draw_posterior
from pyro_flowguides.training import fit


def random_flow(dim, seed, dtype=torch.float64):
    """A planar-and-radial flow distribution at random, non-trivial parameters."""
    torch.manual_seed(seed)
    layers = flows.stack(["planar", "radial"], dim, 1).to(dtype)
    with torch.no_grad():
        for parameter in layers.parameters():
            parameter.normal_(0.0, 0.8)
    loc, scale = torch.randn(dim, dtype=dtype), torch.rand(dim, dtype=dtype) + 0.5
    return FlowDistribution(loc, scale, layers)


# -- EqualMixture ---------------------------------------------------------------------------------


def test_mixture_log_prob_is_the_mean_of_the_component_densities():
    components = [random_flow(3, seed) for seed in range(3)]
    z = torch.randn(5, 3, dtype=torch.float64) * 2
    expected = torch.stack([c.log_prob(z).exp() for c in components]).mean(0).log()
    assert torch.allclose(EqualMixture(components).log_prob(z), expected, rtol=1e-10)


def test_mixture_density_integrates_to_one():
    mixture = EqualMixture([random_flow(1, seed) for seed in (3, 4)])
    grid = torch.linspace(-30, 30, 200001, dtype=torch.float64).unsqueeze(-1)
    mass = torch.trapezoid(mixture.log_prob(grid).exp(), grid.squeeze(-1))
    assert abs(mass.item() - 1) < 1e-6


def test_mixture_draws_one_uniform_component_per_draw_and_batch_element():
    left, right = dist.Normal(-10.0, 1.0), dist.Normal(10.0, 1.0)
    mixture = EqualMixture([d.expand([3, 1]).to_event(1) for d in (left, right)])
    z = mixture.rsample((40000,)).squeeze(-1)  # (draws, 3)
    assert z.shape == (40000, 3)
    positive = (z > 0).double()
    assert torch.allclose(positive.mean(0), torch.full((3,), 0.5, dtype=torch.float64), atol=0.01)
    correlation = torch.corrcoef(positive.T)  # choices independent across batch elements
    assert (correlation - torch.eye(3, dtype=torch.float64)).abs().max() < 0.02
    assert abs(z[z > 0].mean() - 10) < 0.02 and abs(z[z > 0].std() - 1) < 0.02


def test_mixture_draws_are_reparameterised_through_every_component():
    components = [random_flow(2, seed) for seed in range(2)]
    for c in components:
        c.loc.requires_grad_(True)
    EqualMixture(components).rsample((200,)).sum().backward()
    assert all(c.loc.grad is not None and (c.loc.grad != 0).all() for c in components)


def test_mixture_expands_and_refuses_mismatched_components():
    mixture = EqualMixture([random_flow(2, 0), random_flow(2, 1)]).expand([4])
    assert mixture.batch_shape == (4,) and mixture.rsample((3,)).shape == (3, 4, 2)
    with pytest.raises(ValueError, match="at least one component"):
        EqualMixture([])
    with pytest.raises(ValueError, match="vectors of one size"):
        EqualMixture([random_flow(2, 0), random_flow(3, 1)])


# -- AutoFlowEnsemble on one data set: a known mixture ---------------------------------------------

Y = torch.tensor([0.5, 1.2, -0.3, 0.9], dtype=torch.float64)


def normal_mean(y):
    """mu ~ N(0, 1), y_j ~ N(mu, 1): p(mu | y) = N(sum(y) / (n + 1), 1 / (n + 1))."""
    mu = pyro.sample("mu", dist.Normal(y.new_zeros(()), 1.0))
    with pyro.plate("obs", y.shape[-1]):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def exact_posterior(y):
    n = y.shape[-1]
    return y.sum() / (n + 1), 1 / math.sqrt(n + 1)


def log_evidence(y):
    n = y.shape[-1]
    return dist.MultivariateNormal(y.new_zeros(n), torch.eye(n, dtype=y.dtype) + 1).log_prob(y)


def shifted_ensemble(shift):
    """Two Gaussian members (IAF layers at their identity start) at the exact posterior mean
    -+ ``shift`` posterior sds, with the exact sd: the mixture's density is known."""
    ensemble = AutoFlowEnsemble([AutoFlowGuide(normal_mean, "iaf", 1) for _ in range(2)])
    ensemble(Y)
    mean, sd = exact_posterior(Y)
    store = pyro.get_param_store()
    for m, sign in enumerate((-1, 1)):
        store[f"AutoFlowEnsemble.members.{m}.loc"] = (mean + sign * shift * sd).reshape(1)
        store[f"AutoFlowEnsemble.members.{m}.scale"] = torch.full((1,), sd, dtype=torch.float64)
    return ensemble


def test_ensemble_log_weights_use_the_mixture_density():
    ensemble, (mean, sd) = shifted_ensemble(1.0), exact_posterior(Y)
    draws = draw_posterior(normal_mean, ensemble, num_samples=2000, y=Y)
    mu = draws.samples["mu"].reshape(-1)
    log_p = dist.Normal(0.0, 1.0).log_prob(mu) + dist.Normal(mu.unsqueeze(-1), 1.0).log_prob(Y).sum(-1)
    components = torch.stack([dist.Normal(mean + s * sd, sd).log_prob(mu) for s in (-1, 1)])
    log_q = components.logsumexp(0) - math.log(2)
    assert torch.allclose(draws.log_weights.reshape(-1), log_p - log_q, atol=1e-3)
    # the draws follow the mixture: sd² = sd² (1 + shift²)
    assert abs(mu.mean() - mean) < 0.05 and abs(mu.std() / (sd * math.sqrt(2)) - 1) < 0.05


def test_ensemble_importance_weights_recover_the_evidence_and_the_posterior():
    ensemble, (mean, sd) = shifted_ensemble(0.7), exact_posterior(Y)
    report = diagnose(ensemble, normal_mean, Y, num_samples=20000)
    log_weights = draw_posterior(normal_mean, ensemble, num_samples=20000, y=Y).log_weights.reshape(-1)
    log_mean_weight = log_weights.logsumexp(0) - math.log(log_weights.numel())
    assert abs(log_mean_weight - log_evidence(Y)) < 0.01
    assert report.k_hat < 0.5
    resampled = report.resampled["mu"].reshape(-1)
    assert abs(resampled.mean() - mean) < 0.02 and abs(resampled.std() / sd - 1) < 0.03


def test_ensemble_median_quantiles_and_predictive():
    ensemble, (mean, sd) = shifted_ensemble(0.5), exact_posterior(Y)
    assert abs(ensemble.median(Y, num_samples=20000)["mu"] - mean) < 0.02
    quantiles = ensemble.quantiles([0.25, 0.75], Y, num_samples=20000)["mu"]
    cdf = sum(dist.Normal(mean + s * 0.5 * sd, sd).cdf(quantiles) for s in (-1, 1)) / 2
    assert torch.allclose(cdf, torch.tensor([0.25, 0.75], dtype=torch.float64), atol=0.01)
    predictive = Predictive(normal_mean, guide=ensemble, num_samples=50, return_sites=["mu", "y"])(Y)
    assert predictive["mu"].shape == (50, 1) and predictive["y"].shape == (50, 4)
    assert predictive["mu"].dtype == torch.float64


def test_a_one_member_ensemble_is_its_member():
    ensemble = AutoFlowEnsemble([AutoFlowGuide(normal_mean, "planar", 2)])
    ensemble(Y)
    member = ensemble.members[0]
    z = torch.randn(7, 1, dtype=torch.float64)
    expected = member._current_posterior(Y).log_prob(z)
    assert torch.allclose(ensemble._current_posterior(Y).log_prob(z), expected)


def test_ensemble_pickles_with_its_members():
    ensemble = shifted_ensemble(0.5)
    copy = pickle.loads(pickle.dumps(ensemble))
    z = torch.randn(5, 1, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(copy.get_posterior(Y).log_prob(z), ensemble.get_posterior(Y).log_prob(z))


# -- AutoFlowEnsemble over data sets ----------------------------------------------------------------


def normal_means(n, y=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("obs", n):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def summary_of(n, y):
    return y.unsqueeze(-1)


def summary_ensemble(num_members=2, encoder=None):
    members = [
        AutoFlowGuide(
            normal_means,
            "planar",
            2,
            summary=DataSummary(inputs=summary_of, hidden_dims=[16], encoder=encoder),
        )
        for _ in range(num_members)
    ]
    return AutoFlowEnsemble(members)


def train_member(ensemble, m, steps=60):
    pyro.set_rng_seed(m)
    data = PriorPredictive(normal_means, 32, observed="y", shared={"n": 4})
    optim = pyro.optim.Adam({"lr": 1e-2})
    fit(normal_means, ensemble.members[m], num_steps=steps, data=data, loss=DatasetELBO(), optim=optim)


def test_members_train_independently_under_their_own_names():
    ensemble = summary_ensemble()
    train_member(ensemble, 1)
    before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    assert before and all(k.startswith("AutoFlowEnsemble.members.1.") for k in before)
    train_member(ensemble, 0)
    store = pyro.get_param_store()
    assert all(torch.equal(store[k], v) for k, v in before.items())  # member 1 untouched
    assert any(k.startswith("AutoFlowEnsemble.members.0.") for k in store)


def test_ensemble_density_over_data_sets_is_the_members_mixture_and_reloads():
    ensemble = summary_ensemble()
    for m in range(2):
        train_member(ensemble, m)
    batch = simulate_datasets(normal_means, 6, observed="y", shared={"n": 4})
    draws = draw_for_datasets(normal_means, ensemble, batch, 10, log_weights=True)
    assert draws.samples["mu"].shape == (10, 6) and draws.log_weights.isfinite().all()
    with torch.no_grad():
        log_q = posterior_log_density(ensemble, batch, draws.samples, (10,))
        each = [posterior_log_density(m, batch, draws.samples, (10,)) for m in ensemble.members]
    assert torch.allclose(log_q, torch.stack(each).logsumexp(0) - math.log(2), atol=1e-5)
    state = pyro.get_param_store().get_state()
    pyro.clear_param_store()
    pyro.get_param_store().set_state(state)
    reloaded = summary_ensemble()
    with torch.no_grad():
        assert torch.allclose(posterior_log_density(reloaded, batch, draws.samples, (10,)), log_q)


# -- refusals ---------------------------------------------------------------------------------------


def test_ensemble_refuses_members_it_cannot_mix():
    guide = AutoFlowGuide(normal_mean, "planar", 1)
    with pytest.raises(ValueError, match="at least one member"):
        AutoFlowEnsemble([])
    with pytest.raises(TypeError, match="member 0 is a function"):
        AutoFlowEnsemble([normal_mean])
    with pytest.raises(ValueError, match="member 1 guides another model"):
        AutoFlowEnsemble([guide, AutoFlowGuide(normal_means, "planar", 1)])
    used = AutoFlowGuide(normal_mean, "planar", 1)
    used(Y)
    with pytest.raises(ValueError, match="member 1 has already run"):
        AutoFlowEnsemble([guide, used])
    local = AutoFlowGuide(normal_mean, "planar", 1, amortised=Amortised(plate="obs", inputs=lambda y: y))
    with pytest.raises(ValueError, match="member 1 amortises local latents"):
        AutoFlowEnsemble([guide, local])
    summarised = AutoFlowGuide(normal_mean, "planar", 1, summary=DataSummary(inputs=lambda y: y))
    with pytest.raises(
        ValueError, match="member 1 has a data-set summary and member 0 has no data-set summary"
    ):
        AutoFlowEnsemble([guide, summarised])


def test_ensemble_refuses_a_shared_encoder_and_different_inputs():
    shared = summary_ensemble(encoder=torch.nn.Linear(1, 8))
    with pytest.raises(ValueError, match="members 0 and 1 share a parameter"):
        shared(4, torch.zeros(4))
    members = [
        AutoFlowGuide(normal_means, "planar", 1, summary=DataSummary(inputs=inputs))
        for inputs in (summary_of, lambda n, y: 2 * y.unsqueeze(-1))
    ]
    with pytest.raises(ValueError, match="member 1's DataSummary inputs differ"):
        AutoFlowEnsemble(members)(4, torch.ones(4))


@pytest.mark.cuda
@CUDA
def test_ensemble_on_cuda():
    y = Y.float().cuda()
    ensemble = AutoFlowEnsemble([AutoFlowGuide(normal_mean, "iaf", 2) for _ in range(3)])
    draws = draw_posterior(normal_mean, ensemble, num_samples=100, y=y)
    assert draws.samples["mu"].device.type == "cuda" and draws.log_weights.isfinite().all()
