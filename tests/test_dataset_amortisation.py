"""AutoFlowGuide conditioned on a data-set summary: one guide, a posterior for any data set."""

import copy
import importlib.util
import math
import os
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from pyro_flowguides import AutoFlowGuide, DataSummary
from pyro_flowguides.datasets import (
    DatasetBatch,
    DatasetELBO,
    DatasetLoader,
    ForwardKL,
    PriorPredictive,
    draw_for_datasets,
    fine_tune,
    posterior_log_density,
    simulate_datasets,
    stack_datasets,
)
from pyro_flowguides.diagnostics import diagnose
from pyro_flowguides.draws import draw_posterior
from pyro_flowguides.training import fit


def normal_mean(n, y=None):
    """mu ~ N(0, 1), y_j ~ N(mu, 1), j < n: p(mu | y) = N(sum(y) / (n + 1), 1 / (n + 1)) for any n."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("obs", n):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def noisy_mean(sigma, y=None):
    """mu ~ N(0, 1), y_j ~ N(mu, sigma_j): a design (sigma) that varies between data sets."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("obs", sigma.shape[-1]):
        pyro.sample("y", dist.Normal(mu, sigma), obs=y)


def exact_normal_mean(n, y):
    """The exact posterior of ``normal_mean``, for one data set or a batch (in a plate at dim -2)."""
    loc = y.sum(-1, keepdim=y.dim() > 1) / (n + 1)
    pyro.sample("mu", dist.Normal(loc, 1 / math.sqrt(n + 1)))


def log_evidence(y):
    """log p(y) of ``normal_mean``: y ~ N(0, I + 11ᵀ)."""
    n = y.shape[-1]
    return dist.MultivariateNormal(torch.zeros(n), torch.eye(n) + 1).log_prob(y)


def summary_guide(**options):
    spec = DataSummary(inputs=lambda n, y: y.unsqueeze(-1), hidden_dims=[32, 32])
    return AutoFlowGuide(normal_mean, flow="planar", num_flows=2, summary=spec, **options)


# -- simulation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("vectorise, num", [(True, 4000), (False, 1000)])
def test_simulated_datasets_follow_the_prior_predictive(vectorise, num):
    sigma = torch.linspace(0.5, 3.0, 4)
    batch = simulate_datasets(
        noisy_mean,
        num,
        observed="y",
        design=lambda num: {"sigma": sigma.expand(num, 4)},
        vectorise=vectorise,
    )
    mu, y = batch.latents["mu"], batch.data["y"]
    assert mu.shape == (num,) and y.shape == (num, 4) and len(batch) == num
    # mu ~ N(0, 1); (y - mu) / sigma ~ N(0, 1) independently of mu: each data set used its own design
    z = (y - mu.unsqueeze(-1)) / sigma
    tolerance = 4 / math.sqrt(num)
    for sample in (mu, z.flatten()):
        assert abs(sample.mean()) < tolerance and abs(sample.var() - 1) < 2 * tolerance
    assert abs(torch.corrcoef(torch.stack([mu, z[:, 0]]))[0, 1]) < tolerance


def test_shared_arguments_are_drawn_once_per_batch():
    sizes = iter([3, 7])
    data = iter(PriorPredictive(normal_mean, 5, observed="y", shared=lambda: {"n": next(sizes)}))
    first, second = next(data)[0], next(data)[0]
    assert first.shared == {"n": 3} and first.data["y"].shape == (5, 3)
    assert second.data["y"].shape == (5, 7) and second[4]["n"] == 7


def test_simulation_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"no sample site \['x'\]"):
        simulate_datasets(normal_mean, 3, observed={"x": "y"}, shared={"n": 2})
    with pytest.raises(ValueError, match="leading dim of num_datasets = 3"):
        simulate_datasets(noisy_mean, 3, observed="y", design=lambda num: {"sigma": torch.ones(2, 4)})


# -- collections ----------------------------------------------------------------------------------


def test_stack_datasets_stacks_tensors_and_shares_the_rest():
    batch = stack_datasets([{"n": 2, "y": torch.tensor([1.0, 2.0])}, {"n": 2, "y": torch.zeros(2)}])
    assert batch.shared == {"n": 2} and batch.data["y"].tolist() == [[1.0, 2.0], [0.0, 0.0]]
    assert batch[0]["y"].tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="argument 'y' has shapes"):
        stack_datasets([{"y": torch.zeros(2)}, {"y": torch.zeros(3)}])
    with pytest.raises(ValueError, match="'n' is not a tensor and differs"):
        stack_datasets([{"n": 2, "y": torch.zeros(2)}, {"n": 3, "y": torch.zeros(2)}])
    with pytest.raises(ValueError, match="same keyword arguments"):
        stack_datasets([{"y": torch.zeros(2)}, {"x": torch.zeros(2)}])


def test_dataset_loader_covers_every_dataset_once_per_epoch_in_same_shape_batches():
    datasets = [{"n": n, "y": torch.full((n,), float(i))} for i, n in enumerate([2, 3, 2, 2, 3, 4, 2])]
    loader = DatasetLoader(datasets, batch_size=2)
    batches = [batch for (batch,) in loader]
    assert len(batches) == len(loader) == 4  # n = 2: 4 data sets, n = 3: 2, n = 4: 1
    seen = sorted(int(batch.data["y"][i, 0]) for batch in batches for i in range(len(batch)))
    assert seen == list(range(7))
    assert all(batch.data["y"].shape[-1] == batch.shared["n"] for batch in batches)


# -- the loss -------------------------------------------------------------------------------------


def analytic_elbo(y, loc, scale):
    """ELBO of q(mu) = N(loc, scale²) for ``normal_mean``: E_q log p(y, mu) + H(q)."""
    n = y.shape[-1]
    log_lik = -0.5 * n * math.log(2 * math.pi) - 0.5 * (((y - loc) ** 2).sum(-1) + n * scale**2)
    log_prior = -0.5 * math.log(2 * math.pi) - 0.5 * (loc**2 + scale**2)
    entropy = 0.5 * math.log(2 * math.pi * math.e * scale**2)
    return log_lik + log_prior + entropy


@pytest.mark.parametrize("options", [{}, {"vectorise": False}, {"tail_quantile": 0.9}])
def test_dataset_elbo_is_the_mean_of_the_datasets_elbos(options):
    # before training the posterior is N(init loc, init_scale²) for every data set
    guide = summary_guide(init_scale=0.1)
    batch = simulate_datasets(normal_mean, 6, observed="y", shared={"n": 4})
    loss = DatasetELBO(num_particles=20000, **options)(normal_mean, guide, batch)
    loc = guide.median(**batch[0])["mu"]
    expected = -analytic_elbo(batch.data["y"], loc, 0.1).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=0.05)


def test_tail_quantile_scales_down_the_gradient_of_outlying_datasets():
    guide = summary_guide()
    y = torch.randn(20, 4)
    y[:3] += 40.0  # three data sets far in the tail: losses of hundreds of nats
    batch = DatasetBatch({"y": y}, {"n": 4})
    tail = DatasetELBO(num_particles=8, tail_quantile=0.8)
    tail.plate_nesting(normal_mean, guide, batch[0])  # sets the guide up (and draws) once, before seeding
    params = [p.unconstrained() for p in pyro.get_param_store().values()]

    def gradients(loss):
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return torch.cat([g.flatten() for g in grads if g is not None])

    pyro.set_rng_seed(3)
    loss = tail(normal_mean, guide, batch)
    pyro.set_rng_seed(3)  # the same draws
    losses = tail.per_dataset_losses(normal_mean, guide, batch)
    median, top = losses.detach().quantile(losses.new_tensor([0.5, 0.8]))
    detached = losses.detach()
    weights = torch.where(detached > top, (top - median) / (detached - median), 1.0)
    assert weights[:3].max() < 0.01 and weights[3:].min() > 0.5
    assert loss.item() == pytest.approx(losses.mean().item())  # the value is the plain mean
    torch.testing.assert_close(gradients(loss), gradients((weights * losses).mean()))


def test_importance_weighted_bound_tightens_towards_the_evidence():
    # q = N(loc, 1) is wider than every posterior N(sum(y) / 4, 1/4): bounded weights
    guide = summary_guide(init_scale=1.0)
    batch = simulate_datasets(normal_mean, 8, observed="y", shared={"n": 3})
    elbo = DatasetELBO(num_particles=4000).per_dataset_losses(normal_mean, guide, batch)
    iwae = DatasetELBO(num_particles=4000, importance_weighted=True).per_dataset_losses(
        normal_mean, guide, batch
    )
    loc = guide.median(**batch[0])["mu"]  # init_to_median: the median of a few prior draws
    torch.testing.assert_close(elbo, -analytic_elbo(batch.data["y"], loc, 1.0), atol=0.1, rtol=0)
    torch.testing.assert_close(iwae, -log_evidence(batch.data["y"]), atol=0.03, rtol=0)
    assert (elbo > iwae + 0.2).all()


def test_dataset_elbo_refuses_other_arguments():
    with pytest.raises(TypeError, match="expected a DatasetBatch"):
        DatasetELBO()(normal_mean, summary_guide(), torch.zeros(3))
    with pytest.raises(ValueError, match="num_particles must be an integer >= 1"):
        DatasetELBO(num_particles=0)
    with pytest.raises(ValueError, match="tail_quantile must lie in"):
        DatasetELBO(tail_quantile=1.5)
    with pytest.raises(ValueError, match="use vectorise=True"):
        DatasetELBO(vectorise=False, importance_weighted=True)


def test_draws_for_datasets_carry_exact_log_weights():
    # with the exact posterior as guide, log p(y, mu) - log q(mu) = log p(y) for every draw
    batch = simulate_datasets(normal_mean, 5, observed="y", shared={"n": 3})
    draws = draw_for_datasets(normal_mean, exact_normal_mean, batch, num_draws=7, log_weights=True)
    assert draws.samples["mu"].shape == (7, 5)
    expected = log_evidence(batch.data["y"]).expand(7, 5)
    torch.testing.assert_close(draws.log_weights, expected, atol=1e-4, rtol=0)


def noise_scale(n, y=None):
    """s ~ LogNormal(0, 1), y_j ~ N(0, s): a positive latent, constrained by exp."""
    s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
    with pyro.plate("obs", n):
        pyro.sample("y", dist.Normal(0.0, s), obs=y)


def test_posterior_log_density_is_the_density_the_guide_samples_from():
    spec = DataSummary(inputs=lambda n, y: y.unsqueeze(-1), hidden_dims=[8])
    guide = AutoFlowGuide(noise_scale, flow="neural_spline", num_flows=2, summary=spec)
    batch = simulate_datasets(noise_scale, 5, observed="y", shared={"n": 4})
    guide(**batch[0])
    with torch.no_grad():  # parameters away from the identity flow
        for param in pyro.get_param_store().values():
            param.unconstrained().add_(0.3 * torch.randn_like(param.unconstrained()))
    draws = draw_for_datasets(noise_scale, guide, batch, num_draws=7, log_weights=True)
    s = draws.samples["s"]
    log_joint = dist.LogNormal(0.0, 1.0).log_prob(s) + dist.Normal(0.0, s.unsqueeze(-1)).log_prob(
        batch.data["y"]
    ).sum(-1)
    # log q(s | y) = log p(y, s) - log w, with the Jacobian of s = exp(u) inside both
    expected = log_joint - draws.log_weights
    log_q = posterior_log_density(guide, batch, draws.samples, (7,))
    torch.testing.assert_close(log_q, expected, atol=1e-3, rtol=1e-4)  # float32 inverse
    assert posterior_log_density(guide, batch, batch.latents).shape == (5,)


def test_forward_kl_is_minus_the_mean_log_density():
    guide = summary_guide(init_scale=0.5)
    batch = simulate_datasets(normal_mean, 6, observed="y", shared={"n": 4})
    loc = guide.median(**batch[0])["mu"]  # before training q = N(loc, 0.5²) for every data set
    expected = -dist.Normal(loc, 0.5).log_prob(batch.latents["mu"]).mean()
    loss = ForwardKL(num_particles=0)(normal_mean, guide, batch)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    # the importance-weighted term: with q wider than the posterior, the weighted mean of
    # -log q over many draws is the posterior's cross-entropy with q
    wake = ForwardKL(num_particles=20000, simulated_weight=0.0)(normal_mean, guide, batch)
    post_loc, post_var = batch.data["y"].sum(-1) / 5, 1 / 5
    cross_entropy = 0.5 * math.log(2 * math.pi * 0.25) + (post_var + (post_loc - loc) ** 2) / (2 * 0.25)
    assert wake.item() == pytest.approx(cross_entropy.mean().item(), abs=0.02)


def test_forward_kl_refuses_batches_without_latents_and_bad_options():
    batch = stack_datasets([{"n": 3, "y": torch.zeros(3)}, {"n": 3, "y": torch.ones(3)}])
    with pytest.raises(ValueError, match="needs the latents"):
        ForwardKL()(normal_mean, summary_guide(), batch)
    with pytest.raises(TypeError, match="expected a DatasetBatch"):
        ForwardKL()(normal_mean, summary_guide(), torch.zeros(3))
    with pytest.raises(ValueError, match="num_particles must be an integer >= 0"):
        ForwardKL(num_particles=-1)
    with pytest.raises(ValueError, match="simulated_weight"):
        ForwardKL(num_particles=0, simulated_weight=0.0)
    with pytest.raises(ValueError, match="not conditioned on a data-set summary"):
        posterior_log_density(AutoFlowGuide(normal_mean, "planar", 1), batch, {"mu": torch.zeros(2)})


# -- training -------------------------------------------------------------------------------------


def posterior_errors(guide, num_datasets=10, seed=1):
    """Errors of the amortised posterior's median and sd, in posterior sds, on new data sets."""
    generator = torch.Generator().manual_seed(seed)
    errors = []
    for _ in range(num_datasets):
        n = int(torch.randint(2, 12, (), generator=generator))
        y = torch.randn((), generator=generator) + torch.randn(n, generator=generator)
        loc, sd = y.sum() / (n + 1), (1 / (n + 1)) ** 0.5
        lo, mid, hi = guide.quantiles([0.1587, 0.5, 0.8413], n=n, y=y, num_samples=4000)["mu"]
        errors += [float((mid - loc) / sd), float(((hi - lo) / 2 - sd) / sd)]
    return errors


def test_data_summary_amortises_over_data_sets():
    guide = summary_guide()
    data = PriorPredictive(normal_mean, 64, observed="y", shared=lambda: {"n": int(torch.randint(2, 12, ()))})
    steps = 600
    optim = pyro.optim.ClippedAdam({"lr": 0.01, "lrd": 0.1 ** (1 / steps)})
    fit(normal_mean, guide, data=data, num_steps=steps, loss=DatasetELBO(), optim=optim, progress=False)
    errors = posterior_errors(guide)
    # one encoder pass gives each new data set (n = 2..11) its posterior, to within 0.5 sd
    assert max(abs(e) for e in errors) < 0.5, errors


def test_forward_kl_amortises_over_data_sets():
    guide = summary_guide()
    data = PriorPredictive(normal_mean, 64, observed="y", shared=lambda: {"n": int(torch.randint(2, 12, ()))})
    steps = 600
    optim = pyro.optim.ClippedAdam({"lr": 0.01, "lrd": 0.1 ** (1 / steps)})
    fit(normal_mean, guide, data=data, num_steps=steps, loss=ForwardKL(4), optim=optim, progress=False)
    errors = [abs(e) for e in posterior_errors(guide)]
    # measured: median 0.08-0.09 sd; the largest 0.71, then 0.90 after changes that only moved
    # float rounding (n = 11 points of mean -2.4, in the prior predictive's tail: the forward KL
    # averages over the prior predictive and fits rare data sets less closely than the ELBO fits
    # each), so the tail is bounded at one posterior sd
    assert sorted(errors)[len(errors) // 2] < 0.15 and max(errors) < 1.0, errors


def test_training_on_a_collection_of_datasets():
    collection = [simulate_datasets(normal_mean, 32, observed="y", shared={"n": n}) for n in (3, 6, 9)]
    datasets = [batch[i] for batch in collection for i in range(len(batch))]
    guide = summary_guide()
    optim = pyro.optim.ClippedAdam({"lr": 0.01, "lrd": 0.1 ** (1 / 300)})
    loader = DatasetLoader(datasets, batch_size=32)
    history = fit(
        normal_mean, guide, data=loader, epochs=100, loss=DatasetELBO(), optim=optim, progress=False
    )
    assert len(history.epoch_loss) == 100 and history.epoch_loss[-1] < history.epoch_loss[0]
    y = torch.tensor([0.5, 1.5, 1.0, 2.0, 0.0, 1.0])  # n = 6, seen in training
    lo, mid, hi = guide.quantiles([0.1587, 0.5, 0.8413], n=6, y=y, num_samples=4000)["mu"]
    sd = 1 / math.sqrt(7)
    assert abs(mid - y.sum() / 7) < 0.3 * sd and abs((hi - lo) / 2 - sd) < 0.3 * sd


def test_fine_tune_reaches_the_observed_datasets_posterior():
    guide = summary_guide()  # untrained: N(0, 0.1²) for every data set
    y = torch.tensor([2.0, 3.0, 1.5, 2.5])
    guide(n=4, y=y)
    saved = copy.deepcopy(pyro.get_param_store().get_state())
    optim = pyro.optim.ClippedAdam({"lr": 0.03, "lrd": 0.1 ** (1 / 400)})
    fine_tune(normal_mean, guide, {"n": 4, "y": y}, num_steps=400, optim=optim)
    lo, mid, hi = guide.quantiles([0.1587, 0.5, 0.8413], n=4, y=y, num_samples=4000)["mu"]
    sd = 1 / math.sqrt(5)
    assert abs(mid - y.sum() / 5) < 0.15 * sd and abs((hi - lo) / 2 - sd) < 0.15 * sd
    pyro.get_param_store().set_state(saved)  # the amortised guide back, N(init loc, 0.1²)
    lo, hi = guide.quantiles([0.1587, 0.8413], n=4, y=y, num_samples=4000)["mu"]
    assert abs((hi - lo) / 2 - 0.1) < 0.01


def test_batch_validates_its_shapes():
    with pytest.raises(ValueError, match="same leading"):
        DatasetBatch({"y": torch.zeros(3, 2), "x": torch.zeros(4, 2)})
    with pytest.raises(ValueError, match="both per data set and shared"):
        DatasetBatch({"y": torch.zeros(3, 2)}, {"y": 1})


# -- the proofs (long: run with -m slow) ---------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
POSTERIORDB = ROOT.parent / "shared" / "data" / "posteriordb"
EIGHT_SCHOOLS = POSTERIORDB / "eight_schools-eight_schools_noncentered"


def load_example():
    path = ROOT / "examples" / "amortised_eight_schools.py"
    spec = importlib.util.spec_from_file_location("amortised_eight_schools", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.skipif(
    not EIGHT_SCHOOLS.exists(), reason=f"needs posteriordb's reference draws in {EIGHT_SCHOOLS}"
)
def test_eight_schools_amortised_posterior_matches_the_reference(monkeypatch):
    """Issue 7's targets, with the example's ensemble (six members, seeds 0-5): the amortised
    posterior's own moments (a million raw draws) within 0.1 reference sd, and calibrated ranks."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import posteriordb_models
    from amortised_speed import raw_draws, signed_errors

    torch.set_num_threads(1)
    example = load_example()
    monkeypatch.setitem(sys.modules, "amortised_eight_schools", example)  # for the workers
    guide = example.train_ensemble("eight_schools", 6, workers=min(6, os.cpu_count() or 1))
    _, _, reference = posteriordb_models.load(EIGHT_SCHOOLS)
    raw = signed_errors(
        posteriordb_models.flatten_draws(raw_draws(example, guide, 1_000_000), [*reference]), reference
    )
    report = diagnose(guide, example.eight_schools, sigma=example.SIGMA, y=example.Y, num_samples=20000)
    psis = signed_errors(posteriordb_models.flatten_draws(report.resampled, [*reference]), reference)
    print(f"k-hat {report.k_hat:.2f}; (mean, sd) errors in reference sds, raw {raw}, PSIS {psis}")
    assert report.k_hat < 0.7
    # measured: 0.040 / 0.045 here; the benchmark's training of the same recipe and seeds (not
    # bit-identical to this one) 0.078 / 0.066 with 2 000 000 draws
    assert max(abs(error) for pair in raw.values() for error in pair) < 0.1, raw
    assert max(abs(error) for pair in psis.values() for error in pair) < 0.1, psis
    sbc = example.calibrate("eight_schools", guide)
    print(sbc)
    # ten parameters each tested at 1% fail one run in ten even for the exact posterior: test the
    # family at 1% (Bonferroni). Here every p >= 0.13; three runs on the benchmark's ensemble:
    # theta_tilde[6] at p 0.004 once, every other p >= 0.056
    assert min(sbc.p_values().values()) > 0.01 / len(sbc.p_values()), sbc.p_values()
    assert min(c[0.95] for c in sbc.coverage().values()) > 0.9


@pytest.mark.parametrize("workers", [1, 2])
def test_the_example_trains_each_ensemble_member_alone(monkeypatch, workers):
    example = load_example()
    monkeypatch.setitem(sys.modules, "amortised_eight_schools", example)  # for the workers
    alone = example.train_member("eight_schools", 2, 1, 4, 4, 2)["params"]  # member 1, from seed 3 + 1
    ensemble = example.train_ensemble(
        "eight_schools", 2, seed=3, workers=workers, elbo_steps=4, forward_kl_steps=2
    )
    trained = {name: value.detach().clone() for name, value in pyro.get_param_store().items()}
    assert {name.split(".")[2] for name in trained} == {"0", "1"}
    assert alone and all(torch.equal(trained[name], value) for name, value in alone.items())
    draws = draw_posterior(example.eight_schools, ensemble, num_samples=5, sigma=example.SIGMA, y=example.Y)
    assert draws.log_weights.isfinite().all()  # and the ensemble runs on the trained parameters:
    assert all(torch.equal(pyro.get_param_store()[name], value) for name, value in trained.items())


def test_the_regression_summary_is_the_least_squares_fit():
    """``beta_hat`` is the least-squares solution, the residual sd is that of the residuals, and a
    batch of data sets gives each its own summary."""
    example = load_example()
    x = example.regression_design(5)["x"].double()
    beta = torch.randn(5, 3, dtype=torch.float64)
    noise = 0.3 * torch.randn(5, 20, dtype=torch.float64)
    y = (x * beta.unsqueeze(-2)).sum(-1) + noise
    summary = example.regression_statistics(x, y)
    assert summary.shape == (5, 9)
    expected = torch.linalg.lstsq(x, y.unsqueeze(-1)).solution.squeeze(-1)
    torch.testing.assert_close(summary[:, :3], expected)
    residual = y - (x * expected.unsqueeze(-2)).sum(-1)
    torch.testing.assert_close(summary[:, 3], residual.pow(2).mean(-1).sqrt().log())
    torch.testing.assert_close(
        summary[:, 4:],
        torch.stack(
            [(x[..., 0] * x[..., j]).mean(-1) for j in (1, 2)]
            + [(x[..., i] * x[..., j]).mean(-1) for i, j in ((1, 1), (1, 2), (2, 2))],
            -1,
        ),
    )
    torch.testing.assert_close(example.regression_statistics(x[2], y[2]), summary[2])


@pytest.mark.slow
def test_regression_with_varying_design_is_calibrated():
    torch.set_num_threads(1)
    example = load_example()
    guide = example.amortised_guide("regression")
    example.train("regression", guide)
    sbc = example.calibrate("regression", guide)
    print(sbc)
    # with the rows and a pooling encoder s failed in every run (p < 1e-5); with the least-squares
    # summary every parameter passed: p 0.13-0.80, 95% coverage 0.938-0.946 (the benchmark's SBC
    # data sets); p 0.019-0.93, 0.942-0.952 here
    coverage = sbc.coverage()
    assert all(sbc.passed().values()), sbc.p_values()
    assert min(c[0.95] for c in coverage.values()) > 0.9
    assert max(abs(c[0.5] - 0.5) for c in coverage.values()) < 0.05


def test_importance_weighted_bound_refuses_a_path_gradient_guide():
    guide = summary_guide(path_gradient=True)
    batch = simulate_datasets(normal_mean, 4, observed="y", shared={"n": 3})
    with pytest.raises(ValueError, match="path_gradient=True, whose gradient is biased"):
        DatasetELBO(num_particles=4, importance_weighted=True)(normal_mean, guide, batch)
    with pytest.raises(ValueError, match="path_gradient=True, whose gradient is biased"):
        DatasetELBO(num_particles=4, importance_weighted=True)(normal_mean, poutine.block(guide), batch)
    assert DatasetELBO(num_particles=4)(normal_mean, guide, batch).isfinite()
