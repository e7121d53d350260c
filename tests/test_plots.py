"""Plots: the files and figures, and the densities behind the 2-D plot against known ones."""

import matplotlib
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from matplotlib.figure import Figure
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal

from pyro_flowguides.arviz_export import to_inference_data
from pyro_flowguides.diagnostics import Diagnosis, LooResult
from pyro_flowguides.draws import draw_posterior
from pyro_flowguides.plots import (
    density_grid_2d,
    plot_density_2d,
    plot_elbo_trace,
    plot_khat_summary,
    plot_pair,
)

matplotlib.use("Agg")
F64 = {"dtype": torch.float64}
A = torch.tensor([[1.0, 0.0], [0.6, 0.8]], **F64)
X = torch.randn(10, 2, generator=torch.Generator().manual_seed(0), **F64) + torch.tensor([2.0, -1.5], **F64)


def conjugate_model(x):
    z = pyro.sample("z", dist.Normal(torch.zeros(2, **F64), 1.0).to_event(1))
    with pyro.plate("obs", x.shape[0]):
        pyro.sample("x", dist.Normal(z @ A.T, 1.0).to_event(1), obs=x)


def scale_model(x):
    """Two scalar sites, one positive: the guide's density needs the Jacobian of exp."""
    mu = pyro.sample("mu", dist.Normal(torch.zeros((), **F64), 1.0))
    sigma = pyro.sample("sigma", dist.LogNormal(torch.zeros((), **F64), 0.5))
    with pyro.plate("obs", x.shape[0]):
        pyro.sample("x", dist.Normal(mu, sigma), obs=x)


def fit(model, guide, *args, steps=200):
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    return [svi.step(*args) for _ in range(steps)]


def test_elbo_trace_plots_the_negated_losses(tmp_path):
    losses = [5.0, 4.0, 3.5, 3.2, 3.1]
    fig = plot_elbo_trace(losses, tmp_path / "elbo.png", log_evidence=-3.0, window=2)
    raw, running = fig.axes[0].lines[:2]
    np.testing.assert_allclose(raw.get_ydata(), -np.array(losses))
    np.testing.assert_allclose(running.get_ydata(), [-4.5, -3.75, -3.35, -3.15])
    assert isinstance(fig, Figure) and (tmp_path / "elbo.png").stat().st_size > 0


def diagnosis(k_hat):
    return Diagnosis("guide", 10, 0.0, 0.0, 0.0, 0.0, k_hat, 10.0, resampled={}, log_weights=torch.zeros(10))


def test_khat_summary_bars_and_loo_points(tmp_path):
    pareto_k = np.array([0.1, 0.6, 0.9])
    loo = LooResult(-3.0, 1.0, 0.5, np.zeros(3), pareto_k, n_samples=1000, good_k=0.67)
    fig = plot_khat_summary({"mean-field": diagnosis(1.2), "flow": diagnosis(0.3)}, loo, tmp_path / "k.png")
    bars, points = fig.axes
    assert [patch.get_height() for patch in bars.patches if patch.get_width() < 1] == [1.2, 0.3]
    np.testing.assert_allclose(points.collections[0].get_offsets()[:, 1], pareto_k)
    assert (tmp_path / "k.png").stat().st_size > 0
    with pytest.raises(ValueError, match="needs diagnoses"):
        plot_khat_summary()


def test_target_on_the_grid_is_the_conjugate_posterior():
    cov = torch.linalg.inv(torch.eye(2, **F64) + 10 * A.T @ A)
    mean, sd = cov @ A.T @ X.sum(0), cov.diagonal().sqrt()
    posterior = dist.MultivariateNormal(mean, cov)
    bounds = tuple((float(m - 5 * s), float(m + 5 * s)) for m, s in zip(mean, sd, strict=True))
    guide = AutoDiagonalNormal(conjugate_model)  # the target does not depend on the guide
    _, xs, ys, log_target, _ = density_grid_2d(conjugate_model, guide, X, bounds=bounds, grid_size=60)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="ij"), -1)
    exact = posterior.log_prob(grid).exp()
    assert float((log_target.exp() - exact).abs().max()) < 0.01 * float(exact.max())


def test_guide_density_on_the_grid_is_the_density_of_its_draws():
    x = torch.tensor([0.3, -0.8, 1.5, 0.9, -0.1], **F64)
    guide = AutoDiagonalNormal(scale_model)
    fit(scale_model, guide, x)
    labels, xs, ys, _, log_q = density_grid_2d(scale_model, guide, x, grid_size=150)
    cell = float((xs[1] - xs[0]) * (ys[1] - ys[0]))
    q = log_q.exp()
    assert labels == ["mu", "sigma"]
    assert float(q.sum()) * cell == pytest.approx(1.0, abs=0.01)
    draws = draw_posterior(scale_model, guide, x, num_samples=20000).samples
    mean_sigma = float((q * ys).sum()) * cell
    assert mean_sigma == pytest.approx(float(draws["sigma"].mean()), rel=0.02)


def test_plot_density_2d_saves_and_refuses_what_it_cannot_plot(tmp_path):
    guide = AutoDiagonalNormal(conjugate_model)
    fit(conjugate_model, guide, X, steps=50)
    fig = plot_density_2d(conjugate_model, guide, X, path=tmp_path / "density.png", grid_size=30)
    assert len(fig.axes) == 2 and (tmp_path / "density.png").stat().st_size > 0
    with pytest.raises(TypeError, match="AutoContinuous"):
        density_grid_2d(conjugate_model, AutoNormal(conjugate_model), X)

    def three_dims():
        pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))

    pyro.clear_param_store()  # AutoDiagonalNormal's parameter names are the same for every model
    three_guide = AutoDiagonalNormal(three_dims)
    three_guide()
    with pytest.raises(ValueError, match=r"two latent coordinates.*z: shape \(3,\)"):
        density_grid_2d(three_dims, three_guide)


def test_plot_pair_through_arviz(tmp_path):
    data = to_inference_data(AutoNormal(conjugate_model), conjugate_model, X, num_samples=200)
    fig = plot_pair(data, var_names=["z"], path=tmp_path / "pair.png")
    assert isinstance(fig, Figure) and (tmp_path / "pair.png").stat().st_size > 0
    assert len(fig.axes) == 1  # two coordinates of z: one scatter
