"""Diagnostics on posteriors with known answers.

Conjugate Gaussian: x_i ~ N(A z, I), z ~ N(0, I_2), i = 1..10; the posterior is Gaussian and the
log evidence that of x ~ N(0, 1 1ᵀ ⊗ A Aᵀ + I). Correlated Gaussian: z ~ N(0, I_4), y ~ N(Σ_j z_j, 0.3²):
the posterior's precision is I + 1 1ᵀ / 0.09, strongly correlated along the sum, which a mean-field
guide cannot follow. Local model: z_i ~ N(0, 1), x_i ~ N(z_i, s²): z_i | x_i ~ N(x_i / (1 + s²),
s² / (1 + s²)) and x_i ~ N(0, 1 + s²).
"""

import dataclasses
import math
import sys
import types
from pathlib import Path

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from pyro_flowguides import AutoFlowGuide, diagnostics, init_to_median_or_feasible
from pyro_flowguides.amortisation import Amortised
from pyro_flowguides.arviz_export import to_inference_data
from pyro_flowguides.diagnostics import (
    Diagnosis,
    diagnose,
    khat_reading,
    log_evidence_per_item,
    log_mean_exp,
    loo,
    psis,
)

F64 = {"dtype": torch.float64}
D, N = 2, 10
A = torch.tensor([[1.0, 0.0], [0.6, 0.8]], **F64)
X = torch.randn(N, D, generator=torch.Generator().manual_seed(0), **F64) + torch.tensor([2.0, -1.5], **F64)


def conjugate_model(x):
    z = pyro.sample("z", dist.Normal(torch.zeros(D, **F64), 1.0).to_event(1))
    with pyro.plate("obs", x.shape[0]):
        pyro.sample("x", dist.Normal(z @ A.T, 1.0).to_event(1), obs=x)


def conjugate_posterior(x):
    """``(log evidence, posterior mean, posterior covariance)``."""
    n = x.shape[0]
    cov_x = torch.ones(n, n, **F64).kron(A @ A.T) + torch.eye(n * D, **F64)
    log_evidence = dist.MultivariateNormal(torch.zeros(n * D, **F64), cov_x).log_prob(x.reshape(-1))
    cov = torch.linalg.inv(torch.eye(D, **F64) + n * A.T @ A)
    return float(log_evidence), cov @ A.T @ x.sum(0), cov


def exact_guide(x):
    _, mean, cov = conjugate_posterior(x)
    pyro.sample("z", dist.MultivariateNormal(mean, cov))


def fit(model, guide, *args, steps=300, lr=0.05):
    elbo = Trace_ELBO(num_particles=16, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": lr, "lrd": 0.05 ** (1 / steps)}), elbo)
    for _ in range(steps):
        svi.step(*args)
    return guide


@pytest.fixture(scope="module")
def conjugate_flow():
    """A flow guide fitted to the conjugate posterior, its diagnosis and its LOO."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = fit(conjugate_model, AutoFlowGuide(conjugate_model), X)
    return (
        guide,
        diagnose(guide, conjugate_model, X),
        loo(to_inference_data(guide, conjugate_model, X, num_samples=4000)),
    )


def test_flow_on_a_conjugate_posterior_passes(conjugate_flow):
    _, report, _ = conjugate_flow
    log_evidence, _, _ = conjugate_posterior(X)
    assert report.k_hat < 0.5 and report.reading == "good"
    assert abs(report.log_evidence - log_evidence) < 0.05
    assert report.elbo <= report.log_evidence  # Jensen, on the same draws
    assert report.ess > 0.5 * report.num_samples


def test_loo_from_the_flow_matches_arviz_loo_on_exact_draws(conjugate_flow):
    _, _, flow_loo = conjugate_flow
    exact = az.loo(to_inference_data(exact_guide, conjugate_model, X, num_samples=4000))
    assert abs(flow_loo.elpd - exact.elpd_loo) < exact.se
    assert abs(flow_loo.p_loo - exact.p_loo) < 0.2


def test_loo_on_exact_draws_is_arviz_loo():
    # with exact draws log p(x, z_s) - log q(z_s) = log p(x) for every s: the correction vanishes
    data = to_inference_data(exact_guide, conjugate_model, X, num_samples=2000)
    ours, theirs = loo(data), az.loo(data, pointwise=True)
    assert ours.elpd == pytest.approx(theirs.elpd_loo, rel=1e-6)
    assert ours.se == pytest.approx(theirs.se, rel=1e-6)
    assert ours.p_loo == pytest.approx(theirs.p_loo, rel=1e-5)
    np.testing.assert_allclose(ours.pareto_k, theirs.pareto_k.values, atol=1e-6)
    np.testing.assert_allclose(ours.elpd_i, theirs.loo_i.values, rtol=1e-6)
    assert ours.warning == theirs.warning


def test_exact_guide_gives_the_log_evidence_with_full_ess():
    report = diagnose(exact_guide, conjugate_model, X, num_samples=1000)
    log_evidence, _, _ = conjugate_posterior(X)
    assert report.log_evidence == pytest.approx(log_evidence, abs=1e-8)
    assert report.elbo == pytest.approx(log_evidence, abs=1e-8)
    assert report.log_evidence_se < 1e-6 and report.ess == pytest.approx(1000, rel=1e-6)
    assert report.reading == "good"


def correlated_model(y):
    z = pyro.sample("z", dist.Normal(torch.zeros(4, **F64), 1.0).to_event(1))
    with pyro.plate("obs", y.shape[0]):
        pyro.sample("y", dist.Normal(z.sum(-1), 0.3), obs=y)


def test_mean_field_on_a_correlated_posterior_is_flagged_and_a_flow_is_not():
    y = torch.tensor([1.5], **F64)
    mean_field = diagnose(
        fit(correlated_model, AutoNormal(correlated_model), y), correlated_model, y, num_samples=20000
    )
    pyro.clear_param_store()
    flow_guide = AutoFlowGuide(correlated_model, flow="lu_linear", num_flows=1)
    flow = diagnose(
        fit(correlated_model, flow_guide, y, steps=150, lr=0.1), correlated_model, y, num_samples=20000
    )
    assert mean_field.k_hat > 0.7 and mean_field.reading == "unreliable"
    assert flow.k_hat < 0.5 and flow.k_hat < mean_field.k_hat


def test_psis_resampling_corrects_a_too_wide_guide():
    # z ~ N(0, 1), x = 2 ~ N(z, 1): the posterior is N(1, 1/2); the guide N(0.5, 1.5²) is too wide
    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros((), **F64), 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(2.0, **F64))

    def guide():
        pyro.sample("z", dist.Normal(torch.tensor(0.5, **F64), 1.5))

    report = diagnose(guide, model, num_samples=20000)
    z = report.resampled["z"].flatten()
    assert report.k_hat < 0.5  # a wider proposal has bounded weights
    assert abs(float(z.mean()) - 1.0) < 0.03 and abs(float(z.var()) - 0.5) < 0.03
    log_evidence = float(dist.Normal(0.0, math.sqrt(2.0)).log_prob(torch.tensor(2.0)))
    assert abs(report.log_evidence - log_evidence) < 4 * report.log_evidence_se
    assert report.ess < 0.9 * report.num_samples


def test_log_mean_exp_is_the_delta_method():
    log_w = torch.randn(1000, **F64)
    estimate, se = log_mean_exp(log_w.logsumexp(0), (2 * log_w).logsumexp(0), 1000)
    w = log_w.exp().numpy()
    assert float(estimate) == pytest.approx(math.log(w.mean()), rel=1e-12)
    assert float(se) == pytest.approx(w.std(ddof=1) / math.sqrt(1000) / w.mean(), rel=1e-10)


def test_psis_under_arviz_1_smooths_the_negated_log_ratios(monkeypatch):
    # arviz_stats' psislw(ary) smooths -ary; stand it in with ArviZ 0.x's psislw to check the sign
    array_stats = types.SimpleNamespace(psislw=lambda ary, r_eff, axis: az.psislw(-ary, reff=r_eff))
    base = types.ModuleType("arviz_stats.base")
    base.array_stats = array_stats
    monkeypatch.setitem(sys.modules, "arviz_stats", types.ModuleType("arviz_stats"))
    monkeypatch.setitem(sys.modules, "arviz_stats.base", base)
    log_ratios = np.random.default_rng(1).standard_t(3, size=(3, 500))
    expected = psis(log_ratios)
    monkeypatch.setattr(diagnostics, "arviz_major", lambda: 1)
    log_weights, k_hat = psis(log_ratios)
    np.testing.assert_allclose(log_weights, expected[0])
    np.testing.assert_allclose(k_hat, expected[1])


def test_khat_reading_follows_yao_et_al():
    assert [khat_reading(k) for k in (-0.1, 0.49, 0.5, 0.7, 0.71, math.inf)] == [
        "good",
        "good",
        "usable",
        "usable",
        "unreliable",
        "unreliable",
    ]


def test_diagnosis_prints_a_summary_and_is_frozen():
    report = diagnose(exact_guide, conjugate_model, X, num_samples=200)
    text = str(report)
    for expected in ("exact_guide", "ELBO", "log evidence", "k-hat", "good", "ESS", f"{report.elbo:.4f}"):
        assert expected in text
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.k_hat = 0.0
    assert isinstance(report, Diagnosis) and report.resampled["z"].shape == (200, 1, D)


def test_diagnose_refuses_bad_input():
    with pytest.raises(ValueError, match="num_samples"):
        diagnose(exact_guide, conjugate_model, X, num_samples=5)

    def model():
        pyro.sample("p", dist.Uniform(0.0, 1.0, validate_args=False))

    def guide():  # puts mass outside (0, 1)
        pyro.sample("p", dist.Normal(0.5, 1.0))

    with pytest.raises(ValueError, match=r"^\d+ of 100 log-weights .* not finite"):
        diagnose(guide, model, num_samples=100)


def test_loo_names_the_observed_site_to_pick():
    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("obs", x.shape[0]):
            pyro.sample("a", dist.Normal(z, 1.0), obs=x)
            pyro.sample("b", dist.Normal(z, 2.0), obs=x)

    data = to_inference_data(AutoNormal(model), model, torch.zeros(4), num_samples=100)
    with pytest.raises(ValueError, match=r"\['a', 'b'\].*var_name"):
        loo(data)
    with pytest.raises(ValueError, match="no observed site 'c'"):
        loo(data, var_name="c")
    assert loo(data, var_name="b").elpd_i.shape == (4,)


S_LOCAL = 0.5
X_LOCAL = torch.linspace(-2.0, 3.0, 12, **F64)


def local_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0))
        pyro.sample("x", dist.Normal(z, S_LOCAL), obs=x)


def amortised_guide(shift=0.0, widen=1.0):
    """``q(z_i | x_i)``: the exact posterior, shifted by ``shift`` and widened by ``widen``."""

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            loc = x / (1 + S_LOCAL**2) + shift
            pyro.sample("z", dist.Normal(loc, widen * S_LOCAL / math.sqrt(1 + S_LOCAL**2)))

    return guide


def local_log_evidence(x):
    return dist.Normal(torch.zeros_like(x), math.sqrt(1 + S_LOCAL**2)).log_prob(x)


def test_log_evidence_per_item_is_exact_for_the_exact_guide():
    estimate, se = log_evidence_per_item(
        local_model, amortised_guide(), X_LOCAL, plate="data", num_samples=2000, chunk_size=700
    )
    assert estimate.shape == se.shape == (12,)
    torch.testing.assert_close(estimate, local_log_evidence(X_LOCAL), atol=1e-9, rtol=0)
    assert float(se.max()) < 1e-6


def test_log_evidence_per_item_of_a_wrong_guide_is_within_its_standard_error():
    estimate, se = log_evidence_per_item(
        local_model, amortised_guide(shift=0.3, widen=1.3), X_LOCAL, plate="data", num_samples=5000
    )
    error = (estimate - local_log_evidence(X_LOCAL)).abs()
    assert float(se.min()) > 0 and bool((error < 4 * se).all()), (error / se).max()


def test_log_evidence_per_item_works_with_an_autoguide():
    guide = fit(local_model, AutoNormal(local_model), X_LOCAL, steps=400)
    estimate, se = log_evidence_per_item(local_model, guide, X_LOCAL, plate="data", num_samples=3000)
    assert bool(((estimate - local_log_evidence(X_LOCAL)).abs() < 4 * se + 1e-3).all())


def test_log_evidence_per_item_refuses_global_latents_and_subsampled_plates():
    def with_global(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    def guide(x):
        pyro.sample("mu", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match=r"model site 'mu' is outside plate 'data'"):
        log_evidence_per_item(with_global, guide, X_LOCAL, plate="data", num_samples=10)
    with pytest.raises(ValueError, match=r"outside plate 'items' \(plates: \['data'\]\)"):
        log_evidence_per_item(local_model, amortised_guide(), X_LOCAL, plate="items", num_samples=10)

    def subsampled(x):
        with pyro.plate("data", x.shape[0], subsample_size=4) as i:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, S_LOCAL), obs=x[i])

    with pytest.raises(ValueError, match=r"plate 'data' is subsampled \(4 of 12\)"):
        log_evidence_per_item(subsampled, AutoNormal(subsampled), X_LOCAL, plate="data", num_samples=10)


def test_log_evidence_per_item_with_an_amortised_flow_guide():
    # trained on minibatches passed as the argument; evaluated on other items
    spec = Amortised(plate="data", inputs=lambda x: x[:, None], hidden_dims=[16])
    guide = AutoFlowGuide(local_model, flow="planar", num_flows=2, amortised=spec)
    train = 2 * torch.randn(300, **F64)
    elbo = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(local_model, guide, pyro.optim.Adam({"lr": 0.01}), elbo)
    for _ in range(300):
        svi.step(train[torch.randint(0, 300, (64,))])
    estimate, se = log_evidence_per_item(local_model, guide, X_LOCAL, plate="data", num_samples=2000)
    error = (estimate - local_log_evidence(X_LOCAL)).abs()
    assert bool((error < 4 * se + 1e-3).all()), error / se


POSTERIORDB = Path(__file__).resolve().parents[2] / "shared" / "data" / "posteriordb"


@pytest.fixture
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.slow
@pytest.mark.skipif(
    not (POSTERIORDB / "kidiq-kidscore_interaction").exists(),
    reason=f"needs posteriordb's kidiq in {POSTERIORDB}",
)
def test_kidiq_mean_field_is_flagged_and_a_flow_does_better(float64_default, monkeypatch):
    # beta1 and beta3 have posterior correlation about -0.99 (posteriordb's reference draws)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import posteriordb_models

    model, data, _ = posteriordb_models.load(POSTERIORDB / "kidiq-kidscore_interaction")
    k_hats = {}
    for name, guide in {
        "mean-field": AutoNormal(model, init_loc_fn=init_to_median_or_feasible),
        "flow": AutoFlowGuide(model),
    }.items():
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": 0.01, "lrd": 0.05 ** (1 / 2000)}), Trace_ELBO())
        for _ in range(2000):
            svi.step(**data)
        k_hats[name] = diagnose(guide, model, num_samples=10000, **data).k_hat
    assert k_hats["mean-field"] > 0.7 and k_hats["flow"] < k_hats["mean-field"], k_hats


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_diagnostics_of_a_model_on_cuda():
    x = X.cuda()

    def model(x):
        z = pyro.sample("z", dist.Normal(torch.zeros(D, **F64, device=x.device), 1.0).to_event(1))
        with pyro.plate("obs", x.shape[0]):
            pyro.sample("x", dist.Normal(z @ A.to(x.device).T, 1.0).to_event(1), obs=x)

    def guide(x):
        _, mean, cov = conjugate_posterior(x.cpu())
        pyro.sample("z", dist.MultivariateNormal(mean.to(x.device), cov.to(x.device)))

    report = diagnose(guide, model, x, num_samples=500)
    assert report.log_evidence == pytest.approx(conjugate_posterior(X)[0], abs=1e-6)
    assert report.resampled["z"].device.type == "cuda"
    assert np.isfinite(loo(to_inference_data(guide, model, x, num_samples=500)).elpd)
    estimate, _ = log_evidence_per_item(
        local_model, amortised_guide(), X_LOCAL.cuda(), plate="data", num_samples=100
    )
    torch.testing.assert_close(estimate.cpu(), local_log_evidence(X_LOCAL), atol=1e-9, rtol=0)
