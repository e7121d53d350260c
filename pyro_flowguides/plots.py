"""Plots of a variational fit (matplotlib): ELBO trace, k-hat summary, 2-D guide density against the
target, and a pair plot through ArviZ. Each returns its figure and, given ``path``, saves it there."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from os import PathLike

import matplotlib.pyplot as plt
import numpy as np
import pyro
import pyro.distributions as dist
import torch
from matplotlib.figure import Figure
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.importance import vectorized_importance_weights
from torch import Tensor
from torch.distributions import biject_to

from .arviz_export import arviz_major
from .diagnostics import GOOD_KHAT, USABLE_KHAT, Diagnosis, LooResult, khat_reading
from .draws import draw_posterior

#: colours of Yao et al.'s k-hat readings
READING_COLOURS = {"good": "tab:green", "usable": "tab:orange", "unreliable": "tab:red"}


def _finish(fig: Figure, path: str | PathLike | None) -> Figure:
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
    return fig


def plot_elbo_trace(
    losses: Sequence[float],
    path: str | PathLike | None = None,
    *,
    log_evidence: float | None = None,
    window: int | None = None,
) -> Figure:
    """The ELBO (``-loss`` from ``SVI.step``) per step with its running mean over ``window`` steps
    (default: 2% of the steps), and, if given, the log evidence it bounds from below.

    >>> fig = plot_elbo_trace([3.0, 2.0, 1.5, 1.2], log_evidence=-1.0)
    >>> fig.axes[0].get_ylabel()
    'ELBO'
    """
    elbo = -np.asarray(losses, dtype=float)
    window = window or max(1, len(elbo) // 50)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = np.arange(1, len(elbo) + 1)
    ax.plot(steps, elbo, color="tab:blue", alpha=0.3, lw=0.8, label="ELBO")
    running = np.convolve(elbo, np.ones(window) / window, mode="valid")
    ax.plot(steps[window - 1 :], running, color="tab:blue", label=f"running mean ({window} steps)")
    if log_evidence is not None:
        ax.axhline(log_evidence, color="black", ls="--", lw=1, label="log evidence")
    lower = np.quantile(elbo, 0.05) if len(elbo) > 20 else elbo.min()  # the start would squash the rest
    upper = max(elbo.max(), log_evidence if log_evidence is not None else -math.inf)
    ax.set_ylim(lower - 0.05 * (upper - lower + 1e-12), upper + 0.1 * (upper - lower + 1e-12))
    ax.set_xlabel("step")
    ax.set_ylabel("ELBO")
    ax.legend(loc="lower right")
    return _finish(fig, path)


def plot_khat_summary(
    diagnoses: Diagnosis | Mapping[str, Diagnosis] | None = None,
    loo: LooResult | None = None,
    path: str | PathLike | None = None,
) -> Figure:
    """Pareto k-hat against Yao et al.'s bands (< 0.5 good, 0.5-0.7 usable, > 0.7 unreliable): one bar
    per guide (``diagnoses``: a :class:`Diagnosis` or a mapping label -> Diagnosis) and, with ``loo``,
    the k-hat of every observation's LOO weights.
    """
    if diagnoses is None and loo is None:
        raise ValueError("plot_khat_summary needs diagnoses (from diagnose()) or loo (from loo()), or both")
    if isinstance(diagnoses, Diagnosis):
        diagnoses = {diagnoses.guide: diagnoses}
    panels = [panel for panel in (diagnoses, loo) if panel is not None]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    for ax in axes[0]:
        for low, high, reading in (
            (-1, GOOD_KHAT, "good"),
            (GOOD_KHAT, USABLE_KHAT, "usable"),
            (USABLE_KHAT, 3, "unreliable"),
        ):
            ax.axhspan(low, high, color=READING_COLOURS[reading], alpha=0.12, lw=0)
    if diagnoses is not None:
        ax = axes[0][0]
        labels, k_hats = list(diagnoses), [diagnosis.k_hat for diagnosis in diagnoses.values()]
        colours = [READING_COLOURS[diagnosis.reading] for diagnosis in diagnoses.values()]
        ax.bar(labels, np.clip(k_hats, -0.5, None), color=colours)
        ax.set_title("guide: k-hat of log p(x, z) - log q(z)", fontsize=10)
        ax.set_ylabel("Pareto k-hat")
        ax.set_ylim(min(-0.1, *k_hats), max(1.0, *k_hats) + 0.1)
    if loo is not None:
        ax = axes[0][-1]
        k = loo.pareto_k
        ax.scatter(np.arange(k.size), k, s=12, c=[READING_COLOURS[khat_reading(value)] for value in k])
        ax.axhline(loo.good_k, color="black", ls=":", lw=1, label=f"ArviZ's good_k = {loo.good_k:.2f}")
        ax.set_title("LOO: k-hat per observation", fontsize=10)
        ax.set_xlabel("observation")
        ax.set_ylabel("Pareto k-hat")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylim(min(-0.1, k.min() - 0.05), max(1.0, k.max() + 0.1))
        ax.legend(loc="upper right")
    return _finish(fig, path)


def density_grid_2d(
    model: Callable,
    guide: AutoContinuous,
    *args,
    bounds: tuple[tuple[float, float], tuple[float, float]] | None = None,
    grid_size: int = 100,
    **kwargs,
) -> tuple[list[str], Tensor, Tensor, Tensor, Tensor]:
    """A guide's density and the posterior on a grid over a model's two latent coordinates.

    Returns ``(labels, xs, ys, log_target, log_q)``: ``log_target`` is ``log p(z | x)`` up to a
    constant, normalised so its grid density integrates to 1 over the grid; ``log_q`` is the
    guide's exact log density in the model's (constrained) coordinates, Jacobians of
    ``biject_to`` included. ``guide`` must be an ``AutoContinuous`` guide (``AutoFlowGuide``,
    ``AutoMultivariateNormal``, ``AutoDiagonalNormal``, ...) over exactly two coordinates of
    global sites whose supports are elementwise (real, positive, interval). ``bounds`` default
    to the guide's 0.1%-99.9% quantiles, widened by half their range on each side.
    """
    if not isinstance(guide, AutoContinuous):
        raise TypeError(
            f"density_grid_2d needs an AutoContinuous guide (AutoFlowGuide, AutoMultivariateNormal, "
            f"AutoDiagonalNormal, ...) to evaluate its density, got {type(guide).__name__}; for other "
            f"guides compare draws with plot_pair"
        )
    draws = draw_posterior(model, guide, *args, num_samples=4000, **kwargs)
    sites = list(guide.prototype_trace.iter_stochastic_nodes())
    shapes = {name: site["value"].shape for name, site in sites}
    labels = [
        name if len(shape) == 0 else f"{name}[{i}]"
        for name, shape in shapes.items()
        for i in range(shape.numel())
    ]
    if guide.latent_dim != 2 or len(labels) != 2 or any(site["cond_indep_stack"] for _, site in sites):
        raise ValueError(
            f"density_grid_2d plots two latent coordinates of global sites; the model has "
            f"{len(labels)} constrained and {guide.latent_dim} unconstrained coordinates "
            f"({', '.join(f'{name}: shape {tuple(shape)}' for name, shape in shapes.items())})"
        )
    transforms = [biject_to(site["fn"].support) for _, site in sites]
    dtype = draws.log_weights.dtype
    if bounds is None:
        unconstrained = torch.cat(
            [
                t.inv(draws.samples[name]).reshape(4000, -1)
                for (name, _), t in zip(sites, transforms, strict=True)
            ],
            -1,
        )
        low, high = torch.quantile(unconstrained, torch.tensor([0.001, 0.999], dtype=dtype), dim=0)
        low, high = low - 0.5 * (high - low), high + 0.5 * (high - low)
        sizes = [shape.numel() for shape in shapes.values()]
        low, high = (
            torch.cat(
                [
                    t(block.reshape(shape)).reshape(-1)
                    for block, shape, t in zip(end.split(sizes), shapes.values(), transforms, strict=True)
                ]
            )
            for end in (low, high)
        )
        bounds = ((float(low[0]), float(high[0])), (float(low[1]), float(high[1])))
    xs, ys = (torch.linspace(*bound, grid_size, dtype=dtype) for bound in bounds)
    points = torch.stack(torch.meshgrid(xs, ys, indexing="ij"), -1).reshape(-1, 2)
    values = {
        name: value.reshape(-1, *shapes[name])
        for name, value in zip(
            shapes, points.split([shape.numel() for shape in shapes.values()], -1), strict=True
        )
    }
    log_target = _log_joint(model, values, draws.plate_nesting, *args, **kwargs)
    cell = (xs[1] - xs[0]) * (ys[1] - ys[0])
    log_target = log_target - log_target.logsumexp(0) - cell.log()
    log_q = _log_density(guide, sites, transforms, values, *args, **kwargs)
    return labels, xs, ys, log_target.reshape(grid_size, grid_size), log_q.reshape(grid_size, grid_size)


@torch.no_grad()
def _log_joint(model: Callable, values: dict[str, Tensor], nesting: int, *args, **kwargs) -> Tensor:
    """``log p(x, z)`` at each of ``G`` points ``values[site][g]``: the model replayed on a guide of
    point masses (log-density 0), vectorised as importance weights are."""
    num_points = next(iter(values.values())).shape[0]

    def point_masses(*args, **kwargs) -> None:
        for name, value in values.items():
            batched = value.reshape(num_points, *([1] * nesting), *value.shape[1:])
            pyro.sample(name, dist.Delta(batched, event_dim=value.dim() - 1))

    log_p, _, _ = vectorized_importance_weights(
        model, point_masses, *args, num_samples=num_points, max_plate_nesting=nesting, **kwargs
    )
    return log_p


@torch.no_grad()
def _log_density(guide, sites, transforms, values: dict[str, Tensor], *args, **kwargs) -> Tensor:
    """``log q(z)`` in constrained coordinates: ``log q_u(u) - Σ log|det ∂z/∂u|`` with ``u = T⁻¹(z)``,
    packed in the guide's order."""
    unconstrained, log_det = [], 0.0
    for (name, _), t in zip(sites, transforms, strict=True):
        z = values[name]
        u = t.inv(z)
        unconstrained.append(u.reshape(z.shape[0], -1))
        log_det = log_det + t.log_abs_det_jacobian(u, z).reshape(z.shape[0], -1).sum(-1)
    return guide.get_posterior(*args, **kwargs).log_prob(torch.cat(unconstrained, -1)) - log_det


def plot_density_2d(
    model: Callable,
    guide: AutoContinuous,
    *args,
    path: str | PathLike | None = None,
    bounds: tuple[tuple[float, float], tuple[float, float]] | None = None,
    grid_size: int = 100,
    **kwargs,
) -> Figure:
    """The posterior (left) and the guide's density (right) over a model's two latent coordinates,
    on shared contour levels; see :func:`density_grid_2d` for what is computed and required."""
    labels, xs, ys, log_target, log_q = density_grid_2d(
        model, guide, *args, bounds=bounds, grid_size=grid_size, **kwargs
    )
    target, q = log_target.exp().T.numpy(), log_q.exp().T.numpy()
    levels = np.linspace(0, max(target.max(), q.max()), 12)[1:]
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharex=True, sharey=True)
    for ax, density, title in zip(
        axes,
        (target, q),
        ("posterior p(z | x) (normalised on the grid)", f"guide q(z): {type(guide).__name__}"),
        strict=True,
    ):
        ax.contourf(xs.numpy(), ys.numpy(), density, levels=levels, cmap="viridis", extend="max")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(labels[0])
    axes[0].set_ylabel(labels[1])
    axes[1].contour(xs.numpy(), ys.numpy(), target, levels=levels[::2], colors="white", linewidths=0.6)
    return _finish(fig, path)


def plot_pair(
    data, var_names: Sequence[str] | None = None, path: str | PathLike | None = None, **kwargs
) -> Figure:
    """ArviZ's ``plot_pair`` of ``data`` (from :func:`~pyro_flowguides.arviz_export.to_inference_data`),
    as one figure; ``kwargs`` go to ArviZ (e.g. ``kind="kde"``, ``marginals=True``)."""
    if arviz_major() >= 1:
        raise NotImplementedError(
            "plot_pair wraps ArviZ 0.x's matplotlib plot_pair; with ArviZ 1.x call arviz.plot_pair(data) "
            "(arviz_plots) directly"
        )
    import arviz as az

    axes = az.plot_pair(data, var_names=var_names, show=False, **kwargs)
    return _finish(np.ravel(axes)[0].figure, path)
