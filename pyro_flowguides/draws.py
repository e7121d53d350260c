"""Posterior draws from any guide, with importance log-weights, vectorised and prior-free.

Pyro's ``Predictive`` runs the model once with ``init_to_sample`` to learn its shapes, which fails
for priors that cannot be sampled (``ImproperUniform``). This module never samples a prior: the
guide's draws are replayed through the model in one vectorised pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.infer.importance import vectorized_importance_weights
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from torch import Tensor

PARTICLE_PLATE = "num_particles_vectorized"  # the name Pyro's vectorized_importance_weights gives it


@dataclass
class PosteriorDraws:
    """``samples``: latent and deterministic sites, leading dim ``num_samples``;
    ``log_weights``: ``log p(x, z) - log q(z)`` per draw (guide Jacobians included).

    ``model_trace`` and ``guide_trace`` are the vectorised traces the draws come from (log-probs
    computed; the particle dimension is ``-(plate_nesting + 1)``); ``plate_indices`` holds each
    plate's indices (its subsample for subsampled plates), the same in model and guide.
    """

    samples: dict[str, Tensor]
    log_weights: Tensor
    model_trace: Trace
    guide_trace: Trace
    plate_nesting: int
    plate_indices: dict[str, Tensor]


def _probe_trace(model: Callable, guide: Callable, *args, **kwargs) -> tuple[Trace, Trace]:
    """Traces of one guide run and of the model replayed on it (subsample sites kept)."""
    with torch.no_grad(), poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    return model_trace, guide_trace


def max_plate_nesting(model: Callable, guide: Callable, *args, **kwargs) -> int:
    """The number of nested plates in ``model``, read off one run replayed from the guide."""
    model_trace, _ = _probe_trace(model, guide, *args, **kwargs)
    dims = [
        -frame.dim
        for site in model_trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return max(dims, default=0)


def fix_subsamples(
    model: Callable, guide: Callable, *args, **kwargs
) -> tuple[Callable, Callable, dict[str, Tensor]]:
    """``model`` and ``guide`` with every plate's indices fixed to those of one run, and the indices.

    Subsampled plates draw new indices on every run; fixed, repeated runs (chunks of draws, a
    posterior predictive pass) see the same data points.

    >>> import pyro, pyro.distributions as dist, torch
    >>> def model():
    ...     with pyro.plate("data", 10, subsample_size=3):
    ...         pyro.sample("x", dist.Normal(0.0, 1.0))
    >>> fixed_model, _, indices = fix_subsamples(model, model)
    >>> runs = [poutine.trace(fixed_model).get_trace().nodes["data"]["value"] for _ in range(2)]
    >>> bool((runs[0] == runs[1]).all() and (runs[0] == indices["data"]).all())
    True
    """
    indices = {
        name: site["value"]
        for trace in _probe_trace(model, guide, *args, **kwargs)
        for name, site in trace.nodes.items()
        if site_is_subsample(site)
    }
    return _with_plate_indices(model, indices), _with_plate_indices(guide, indices), indices


def _with_plate_indices(fn: Callable, indices: dict[str, Tensor]) -> Callable:
    """``fn`` with the plates named in ``indices`` replaying those indices."""
    subsamples = Trace()
    for name, value in indices.items():
        subsamples.add_node(name, type="sample", is_observed=False, value=value, infer={})
    return poutine.replay(fn, trace=subsamples)


@torch.no_grad()
def draw_posterior(
    model: Callable,
    guide: Callable,
    *args,
    num_samples: int = 1000,
    plate_nesting: int | None = None,
    **kwargs,
) -> PosteriorDraws:
    """``num_samples`` draws of every latent and ``pyro.deterministic`` site, with log-weights.

    Each sample's leading dimension is ``num_samples``; the model's plate dimensions follow
    (size-1 dimensions of global sites included, as Pyro's vectorised traces give them).
    """
    model, guide, plate_indices = fix_subsamples(model, guide, *args, **kwargs)
    if plate_nesting is None:
        plate_nesting = max_plate_nesting(model, guide, *args, **kwargs)
    log_weights, model_trace, guide_trace = vectorized_importance_weights(
        model, guide, *args, num_samples=num_samples, max_plate_nesting=plate_nesting, **kwargs
    )
    samples = {}
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        if not site["is_observed"] or site["infer"].get("_deterministic"):
            value = site["value"]
            samples[name] = (
                value.expand((num_samples, *value.shape[1:])) if value.shape[:1] == (1,) else value
            )
    return PosteriorDraws(samples, log_weights, model_trace, guide_trace, plate_nesting, plate_indices)


@torch.no_grad()
def replicate_observations(model: Callable, draws: PosteriorDraws, *args, **kwargs) -> dict[str, Tensor]:
    """Posterior predictive draws of every observed site: the model, unconditioned, replayed on the
    guide's draws (``draws.guide_trace``) with the same plate indices. Leading dim ``num_samples``."""
    num_samples = draws.log_weights.shape[0]
    model = _with_plate_indices(model, draws.plate_indices)

    def vectorised_model(*args, **kwargs):
        with pyro.plate(PARTICLE_PLATE, num_samples, dim=-(draws.plate_nesting + 1)):
            return model(*args, **kwargs)

    replayed = poutine.uncondition(poutine.replay(vectorised_model, trace=draws.guide_trace))
    with poutine.block():
        trace = poutine.trace(replayed).get_trace(*args, **kwargs)
    return {
        name: site["value"]
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
        and site["infer"].get("was_observed")
        and not site["infer"].get("_deterministic")
    }
