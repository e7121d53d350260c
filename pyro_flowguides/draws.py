"""Posterior draws from any guide, with importance log-weights, vectorised and prior-free.

Pyro's ``Predictive`` runs the model once with ``init_to_sample`` to learn its shapes, which fails
for priors that cannot be sampled (``ImproperUniform``). This module never samples a prior: the
guide's draws are replayed through the model in one vectorised pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from pyro import poutine
from pyro.infer.importance import vectorized_importance_weights
from torch import Tensor


@dataclass
class PosteriorDraws:
    """``samples``: latent and deterministic sites, leading dim ``num_samples``;
    ``log_weights``: ``log p(x, z) - log q(z)`` per draw (guide Jacobians included)."""

    samples: dict[str, Tensor]
    log_weights: Tensor


def max_plate_nesting(model: Callable, guide: Callable, *args, **kwargs) -> int:
    """The number of nested plates in ``model``, read off one run replayed from the guide."""
    with torch.no_grad(), poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    dims = [
        -frame.dim
        for site in model_trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return max(dims, default=0)


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
    if plate_nesting is None:
        plate_nesting = max_plate_nesting(model, guide, *args, **kwargs)
    log_weights, model_trace, _ = vectorized_importance_weights(
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
    return PosteriorDraws(samples, log_weights)
