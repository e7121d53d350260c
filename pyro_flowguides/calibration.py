r"""Simulation-based calibration (Talts et al. 2018, "Validating Bayesian inference algorithms with
simulation-based calibration") of a data-set-amortised guide.

Draw ``θ̃ ~ p(θ)``, ``x̃ ~ p(x | θ̃)``, then ``θ_1..θ_L ~ q(θ | x̃)``; the rank
``r = #{l : θ_l < θ̃}`` of each scalar parameter is uniform on ``{0, …, L}`` for every ``L`` when
``q`` is the exact posterior. Over ``N`` simulated data sets, ranks binned into ``bins`` equal
bins are tested for uniformity with Pearson's chi-square test (``bins - 1`` degrees of freedom).
A central ``α`` interval of the ``L`` draws covers ``θ̃`` when ``(1 - α)/2 ≤ r/L ≤ (1 + α)/2``;
its coverage over data sets should be the share of ranks in that range, about ``α``.

An amortised guide gives all ``N`` posteriors in one vectorised pass
(:func:`~pyro_flowguides.datasets.draw_for_datasets`), so SBC costs seconds, not ``N`` fits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import Tensor

from .datasets import DatasetBatch, Design, Shared, draw_for_datasets, simulate_datasets
from .diagnostics import psis

#: the central-interval levels :meth:`SBCResult.coverage` reports by default
COVERAGE_LEVELS = (0.5, 0.8, 0.9, 0.95)


def _scalar_names(name: str, shape: torch.Size) -> list[str]:
    """``name`` for a scalar site, ``name[i,j]`` (0-based) for each element of a tensor site."""
    if not shape:
        return [name]
    return [f"{name}[{','.join(map(str, index))}]" for index in np.ndindex(*shape)]


def rank_statistics(truth: Tensor, draws: Tensor) -> Tensor:
    """``#{l : draws[l] < truth}`` elementwise: ``truth`` ``(N, ...)``, ``draws`` ``(L, N, ...)``.

    >>> rank_statistics(torch.tensor([0.5, 2.0]), torch.tensor([[0.0, 1.0], [1.0, 3.0], [0.2, 0.0]]))
    tensor([2, 2])
    """
    return (draws < truth).sum(0)


@dataclass(frozen=True)
class SBCResult:
    """Rank statistics of ``num_datasets`` simulated data sets with ``num_draws`` posterior draws
    each: ``ranks[parameter]`` holds integers in ``0..num_draws``, one per data set; ``k_hat``
    each data set's Pareto k-hat when the draws were importance-resampled. ``print`` it for a
    table of uniformity p-values and coverage."""

    ranks: dict[str, np.ndarray] = field(repr=False)
    num_draws: int
    bins: int = 20
    k_hat: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.num_draws + 1) % self.bins:
            raise ValueError(
                f"SBCResult: {self.num_draws + 1} rank values (num_draws + 1) do not split into "
                f"{self.bins} equal bins; choose num_draws + 1 a multiple of bins (e.g. 99 draws, 20 bins)"
            )

    @property
    def num_datasets(self) -> int:
        return len(next(iter(self.ranks.values())))

    def counts(self, name: str) -> np.ndarray:
        """How many data sets put ``name``'s rank in each of the ``bins`` equal bins."""
        width = (self.num_draws + 1) // self.bins
        return np.bincount(self.ranks[name] // width, minlength=self.bins)

    def p_values(self) -> dict[str, float]:
        """Pearson's chi-square test of uniform ranks, per parameter (``bins - 1`` d.o.f.)."""
        return {name: float(stats.chisquare(self.counts(name)).pvalue) for name in self.ranks}

    def passed(self, level: float = 0.01) -> dict[str, bool]:
        """Whether each parameter's ranks pass the uniformity test at ``level``."""
        return {name: p >= level for name, p in self.p_values().items()}

    def coverage(self, levels: Sequence[float] = COVERAGE_LEVELS) -> dict[str, dict[float, float]]:
        """Share of data sets whose true value lies in the central ``level`` interval of the draws,
        per parameter and level."""
        return {
            name: {level: float(self._inside(ranks, level).mean()) for level in levels}
            for name, ranks in self.ranks.items()
        }

    def expected_coverage(self, levels: Sequence[float] = COVERAGE_LEVELS) -> dict[float, float]:
        """The coverage of a calibrated posterior: the share of rank values ``0..L`` inside each
        level's range (``level`` up to the discreteness of ``L`` draws)."""
        every_rank = np.arange(self.num_draws + 1)
        return {level: float(self._inside(every_rank, level).mean()) for level in levels}

    def _inside(self, ranks: np.ndarray, level: float) -> np.ndarray:
        u = ranks / self.num_draws
        return ((1 - level) / 2 <= u) & (u <= (1 + level) / 2)

    def __str__(self) -> str:
        levels = COVERAGE_LEVELS
        expected = self.expected_coverage(levels)
        coverage = self.coverage(levels)
        width = max(len(name) for name in self.ranks) + 2
        lines = [
            f"SBC over {self.num_datasets} data sets, {self.num_draws} draws each; chi-square test of "
            f"uniform ranks in {self.bins} bins",
            f"{'':{width}s}{'p-value':>9s}  {'1% test':7s}"
            + "".join(f"{f'cover {level:.0%}':>11s}" for level in levels),
        ]
        for name, p in self.p_values().items():
            lines.append(
                f"{name:{width}s}{p:9.3f}  {'pass' if p >= 0.01 else 'FAIL':7s}"
                + "".join(f"{coverage[name][level]:11.3f}" for level in levels)
            )
        lines.append(f"{'calibrated':{width}s}{'':18s}" + "".join(f"{expected[lv]:11.3f}" for lv in levels))
        if self.k_hat is not None:
            lines.append(
                f"importance-resampled draws; k-hat over data sets: median {np.median(self.k_hat):.2f}, "
                f"> 0.7 for {np.mean(self.k_hat > 0.7):.1%}"
            )
        return "\n".join(lines)

    def plot(self, kind: str = "hist", names: Sequence[str] | None = None, axes: Any = None) -> Any:
        """Rank histograms with the band that holds 99% of a bin's count under uniformity
        (``kind="hist"``), or ArviZ's ECDF-difference plot of ``r / L`` with simultaneous 99%
        bands (``kind="ecdf"``); one panel per parameter. Returns the matplotlib axes."""
        import matplotlib.pyplot as plt

        if kind not in ("hist", "ecdf"):
            raise ValueError(f"SBCResult.plot: kind must be 'hist' or 'ecdf', got {kind!r}")
        names = list(self.ranks) if names is None else list(names)
        unknown = [name for name in names if name not in self.ranks]
        if unknown:
            raise ValueError(f"SBCResult.plot: no ranks for {unknown}; parameters: {list(self.ranks)}")
        if axes is None:
            columns = min(4, len(names))
            rows = math.ceil(len(names) / columns)
            _, axes = plt.subplots(rows, columns, figsize=(3 * columns, 2.4 * rows), squeeze=False)
        flat = np.ravel(axes)
        for ax, name in zip(flat, names, strict=False):
            if kind == "hist":
                self._plot_hist(ax, name)
            else:
                import arviz as az

                az.plot_ecdf(
                    self.ranks[name] / self.num_draws,
                    cdf=stats.uniform(0, 1).cdf,
                    eval_points=np.linspace(0, 1, 101),
                    difference=True,
                    confidence_bands=True,
                    ci_prob=0.99,
                    ax=ax,
                )
            ax.set_title(name, fontsize=9)
        for ax in flat[len(names) :]:
            ax.set_visible(False)
        return axes

    def _plot_hist(self, ax: Any, name: str) -> None:
        n, bins = self.num_datasets, self.bins
        low, high = stats.binom.ppf([0.005, 0.995], n, 1 / bins)
        ax.axhspan(low, high, color="0.85", zorder=0)
        ax.axhline(n / bins, color="0.5", lw=0.8)
        ax.bar(np.arange(bins), self.counts(name), width=1.0, color="C0", alpha=0.8)
        ax.set_xticks([])


def simulation_based_calibration(
    model: Callable,
    guide: Callable,
    num_datasets: int = 1000,
    num_draws: int = 99,
    *,
    observed: str | Sequence[str] | Mapping[str, str],
    design: Design | None = None,
    shared: Shared | None = None,
    batch_size: int = 250,
    bins: int = 20,
    vectorise: bool = True,
    importance_resampling: int | None = None,
) -> SBCResult:
    """SBC ranks of every latent site the guide samples, over ``num_datasets`` data sets from the
    model's prior predictive (options as :func:`~pyro_flowguides.datasets.simulate_datasets`,
    simulated ``batch_size`` at a time; ``shared`` is drawn once per batch), with ``num_draws``
    draws from the amortised guide for each (:func:`~pyro_flowguides.datasets.draw_for_datasets`).

    With ``importance_resampling = S``, the draws come from the importance-corrected posterior
    instead: ``S`` proposals per data set from the guide, weighted by ``p(x, z) / q(z | x)``
    with Pareto smoothing (PSIS), resampled with replacement; the result then holds each data
    set's k-hat (``SBCResult.k_hat``).

    >>> import pyro, pyro.distributions as dist
    >>> def model(y=None):
    ...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    ...     with pyro.plate("obs", 3):
    ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
    >>> def exact(y):  # the exact posterior N(sum(y) / 4, 1 / 4), also for y of shape (batch, 3)
    ...     pyro.sample("mu", dist.Normal(y.sum(-1, keepdim=y.dim() > 1) / 4, 0.5))
    >>> result = simulation_based_calibration(model, exact, 200, 19, observed="y", bins=10)
    >>> result.p_values()["mu"] > 0.01
    True
    """
    ranks: dict[str, list[np.ndarray]] = {}
    k_hat: list[np.ndarray] = []
    for start in range(0, num_datasets, batch_size):
        size = min(batch_size, num_datasets - start)
        batch = simulate_datasets(
            model, size, observed=observed, design=design, shared=shared, vectorise=vectorise
        )
        if importance_resampling is None:
            samples = draw_for_datasets(model, guide, batch, num_draws).samples
        else:
            samples, batch_k_hat = _importance_resample(model, guide, batch, importance_resampling, num_draws)
            k_hat.append(batch_k_hat)
        for site, values in samples.items():
            truth = batch.latents[site]
            site_ranks = rank_statistics(truth, values).reshape(len(batch), -1).cpu().numpy()
            for i, name in enumerate(_scalar_names(site, truth.shape[1:])):
                ranks.setdefault(name, []).append(site_ranks[:, i])
    return SBCResult(
        {name: np.concatenate(parts) for name, parts in ranks.items()},
        num_draws,
        bins,
        k_hat=np.concatenate(k_hat) if k_hat else None,
    )


def _importance_resample(
    model: Callable, guide: Callable, batch: DatasetBatch, num_proposals: int, num_draws: int
) -> tuple[dict[str, Tensor], np.ndarray]:
    """``num_draws`` PSIS-resampled draws per data set out of ``num_proposals`` from the guide,
    and each data set's k-hat."""
    draws = draw_for_datasets(model, guide, batch, num_proposals, log_weights=True)
    log_weights, k_hat = psis(draws.log_weights.T.double().cpu().numpy())
    weights = torch.as_tensor(np.exp(log_weights), device=draws.log_weights.device)
    picks = torch.multinomial(weights, num_draws, replacement=True).T  # (num_draws, num_datasets)
    columns = torch.arange(len(batch), device=picks.device)
    return {site: values[picks, columns] for site, values in draws.samples.items()}, k_hat
