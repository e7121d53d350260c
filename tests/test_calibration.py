"""Simulation-based calibration: ranks, the uniformity test, coverage, importance resampling, plots."""

import math

import matplotlib
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_flowguides.calibration import SBCResult, rank_statistics, simulation_based_calibration

matplotlib.use("Agg")


def normal_mean(n, y=None):
    """mu ~ N(0, 1), y_j ~ N(mu, 1): p(mu | y) = N(sum(y) / (n + 1), 1 / (n + 1))."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("obs", n):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def gaussian_guide(shift=0.0, widen=1.0):
    """The exact posterior moved by ``shift`` posterior sds and widened ``widen`` times; for one
    data set ``y`` of shape ``(n,)`` or a batch ``(B, n)`` (in a plate at dim -2)."""

    def guide(n, y):
        loc = y.sum(-1, keepdim=y.dim() > 1) / (n + 1)
        sd = 1 / math.sqrt(n + 1)
        pyro.sample("mu", dist.Normal(loc + shift * sd, widen * sd))

    return guide


def sbc(guide, **options):
    return simulation_based_calibration(
        normal_mean, guide, 1000, 99, observed="y", shared=lambda: {"n": 5}, **options
    )


def test_exact_posterior_passes_and_covers_at_every_level():
    result = sbc(gaussian_guide())
    assert result.passed() == {"mu": True}
    expected = result.expected_coverage()
    # binomial sd of a coverage over 1000 data sets is at most 0.016
    for level, cover in result.coverage()["mu"].items():
        assert abs(cover - expected[level]) < 0.05, (level, cover)


@pytest.mark.parametrize("shift, widen", [(0.0, 0.5), (0.0, 2.0), (1.0, 1.0)])
def test_miscalibrated_posteriors_fail(shift, widen):
    result = sbc(gaussian_guide(shift, widen))
    assert result.p_values()["mu"] < 0.01
    u = result.ranks["mu"] / 99
    cover = result.coverage([0.5])["mu"][0.5]
    if shift:  # draws shifted above the truth: E[r / L] = Φ(-shift / √2) = 0.24
        assert u.mean() < 0.3
    elif widen < 1:  # the central 50% interval covers P(|Z| < 0.674 widen) = 0.26 of the time
        assert cover < 0.4
    else:  # P(|Z| < 0.674 widen) = 0.82
        assert cover > 0.7


def test_importance_resampling_corrects_an_overdispersed_guide():
    # q = N(loc, (1.5 sd)²) is a good proposal for N(loc, sd²): the resampled draws are calibrated
    raw = sbc(gaussian_guide(widen=1.5))
    corrected = sbc(gaussian_guide(widen=1.5), importance_resampling=400)
    assert raw.p_values()["mu"] < 0.01 and corrected.p_values()["mu"] > 0.01
    assert corrected.k_hat.shape == (1000,) and np.median(corrected.k_hat) < 0.5
    assert "k-hat over data sets" in str(corrected)


def test_coverage_and_expected_coverage_read_the_ranks():
    # 100 rank values 0..99: the central 50% interval holds ranks 25..74 (u = r / 99 in [0.25, 0.75])
    every_rank = np.arange(100)
    result = SBCResult({"a": every_rank, "b": np.zeros(100, dtype=int)}, num_draws=99)
    assert result.expected_coverage([0.5, 0.9, 0.95]) == {0.5: 0.5, 0.9: 0.9, 0.95: 0.94}
    assert result.coverage([0.5]) == {"a": {0.5: 0.5}, "b": {0.5: 0.0}}
    assert result.p_values()["a"] == pytest.approx(1.0)
    assert result.passed() == {"a": True, "b": False}
    assert result.counts("b").tolist() == [100] + [0] * 19


def test_tensor_sites_get_one_rank_per_element():
    def model(y=None):
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        pyro.sample("y", dist.Normal(z, 1.0).to_event(1), obs=y)

    def exact(y):  # p(z | y) = N(y / 2, 1/2) per element
        pyro.sample("z", dist.Normal(y / 2, 0.5**0.5).to_event(1))

    result = simulation_based_calibration(model, exact, 500, 19, observed="y", bins=10)
    assert sorted(result.ranks) == ["z[0]", "z[1]"]
    assert all(result.passed().values())


def test_rank_statistics_counts_draws_below_the_truth():
    draws = torch.tensor([[0.0, 5.0], [1.0, 6.0], [2.0, 7.0]])  # (L = 3, N = 2)
    assert rank_statistics(torch.tensor([1.5, 4.0]), draws).tolist() == [2, 0]


def test_bins_must_split_the_ranks_evenly():
    with pytest.raises(ValueError, match="num_draws \\+ 1"):
        SBCResult({"a": np.arange(100)}, num_draws=100, bins=20)


@pytest.mark.parametrize("kind", ["hist", "ecdf"])
def test_plots_one_panel_per_parameter(kind):
    result = SBCResult({"a": np.arange(100), "b": np.arange(100)[::-1].copy()}, num_draws=99)
    axes = result.plot(kind)
    visible = [ax for ax in np.ravel(axes) if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["a", "b"]
    with pytest.raises(ValueError, match="no ranks for"):
        result.plot(kind, names=["c"])
