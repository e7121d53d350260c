"""ArviZ data from any Pyro guide: posterior, posterior predictive, pointwise log-likelihood,
observed data and the importance weights ``log p(x, z) - log q(z)`` of every draw.

ArviZ's ``from_pyro`` accepts only MCMC results (and ArviZ 1.x has none). Here the guide's draws
are replayed through the model (:func:`pyro_flowguides.draws.draw_posterior`, never sampling a
prior) and laid out as ArviZ expects: dims ``(chain=1, draw=S, ...)``, site dims named after the
model's plates with the plates' indices as coords (the subsample indices of subsampled plates).
ArviZ 0.x gets ``InferenceData``; ArviZ 1.x the ``xarray.DataTree`` it uses.
"""

from __future__ import annotations

from collections.abc import Callable

import arviz as az
import numpy as np
import pyro
import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer.util import plate_log_prob_sum
from torch import Tensor

from .draws import PARTICLE_PLATE, PosteriorDraws, draw_posterior, replicate_observations

Groups = dict[str, dict[str, np.ndarray]]


def arviz_major() -> int:
    """The installed ArviZ's major version (0: ``InferenceData``; 1: ``DataTree``)."""
    return int(az.__version__.split(".")[0])


def to_inference_data(guide: Callable, model: Callable, *args, num_samples: int = 1000, **kwargs):
    """``num_samples`` draws of ``guide`` as ArviZ data: ``InferenceData`` (ArviZ 0.x) or ``DataTree`` (1.x).

    Groups: ``posterior`` (latent and ``pyro.deterministic`` sites), ``posterior_predictive``
    (observed sites replicated given each draw), ``log_likelihood`` (pointwise, one variable per
    observed site), ``observed_data`` and ``sample_stats`` with ``lp = log p(x, z)``,
    ``log_q = log q(z)`` and ``log_weight = lp - log_q`` per draw (guide Jacobians included).
    Root attrs name the guide and, for flow guides, the flow layers.

    >>> import pyro, pyro.distributions as dist, torch
    >>> from pyro.infer.autoguide import AutoNormal
    >>> def model(x):
    ...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    ...     with pyro.plate("obs", len(x)):
    ...         pyro.sample("x", dist.Normal(mu, 1.0), obs=x)
    >>> data = to_inference_data(AutoNormal(model), model, torch.zeros(3), num_samples=10)
    >>> dict(data.posterior.sizes), dict(data.log_likelihood.sizes)
    ({'chain': 1, 'draw': 10}, {'chain': 1, 'draw': 10, 'obs': 3})
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"num_samples must be an integer >= 2, got {num_samples!r}")
    draws = draw_posterior(model, guide, *args, num_samples=num_samples, **kwargs)
    replicated = replicate_observations(model, draws, *args, **kwargs)
    groups, dims, coords = arviz_groups(draws, replicated)
    return build_arviz_data(groups, dims=dims, coords=coords, attrs=describe(guide, num_samples))


def arviz_groups(
    draws: PosteriorDraws, replicated: dict[str, Tensor]
) -> tuple[Groups, dict[str, list[str]], dict[str, np.ndarray]]:
    """The nested ``{group: {variable: array}}`` dict, dims and coords for ArviZ's ``from_dict``.

    Arrays of sampled groups are shaped ``(1, S, ...)``; ``observed_data`` has no sample dims.
    """
    num_samples, nesting = draws.log_weights.shape[0], draws.plate_nesting
    groups: Groups = {name: {} for name in ("posterior", "posterior_predictive", "log_likelihood")}
    groups["observed_data"] = {}
    dims: dict[str, list[str]] = {}
    coords: dict[str, np.ndarray] = {}

    def layout(value: Tensor, event_dim: int, site: dict, draws_dim: int = num_samples) -> np.ndarray:
        array, dims[site["name"]] = _layout(value, event_dim, site, nesting, draws_dim, draws, coords)
        return array

    for name, site in draws.model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        deterministic = bool(site["infer"].get("_deterministic"))
        if site["is_observed"] and not deterministic:
            event_dim = site["fn"].event_dim
            log_lik = scale_and_mask(site["unscaled_log_prob"], mask=site["mask"])
            groups["log_likelihood"][name] = layout(log_lik, 0, site)
            groups["observed_data"][name] = layout(site["value"], event_dim, site, draws_dim=1)[0]
            groups["posterior_predictive"][name] = layout(replicated[name], event_dim, site)
        else:
            # pyro.deterministic sets event_dim = value.dim(): all dims past the plates are event dims
            event_dim = max(site["value"].dim() - nesting - 1, 0) if deterministic else site["fn"].event_dim
            groups["posterior"][name] = layout(site["value"], event_dim, site)
    groups["sample_stats"] = _importance_stats(draws)
    groups = {group: variables for group, variables in groups.items() if variables}
    for group, variables in groups.items():
        if group != "observed_data":
            groups[group] = {name: value[None] for name, value in variables.items()}  # chain = 1
    return groups, dims, coords


def _importance_stats(draws: PosteriorDraws) -> dict[str, np.ndarray]:
    """Per draw: ``lp = log p(x, z)``, ``log_q = log q(z)``, ``log_weight = lp - log_q``."""
    symbol = draws.guide_trace.plate_to_symbol[PARTICLE_PLATE]
    lp = plate_log_prob_sum(draws.model_trace, symbol)
    log_q = plate_log_prob_sum(draws.guide_trace, symbol)
    return {"lp": _numpy(lp), "log_q": _numpy(log_q), "log_weight": _numpy(draws.log_weights)}


def _layout(
    value: Tensor,
    event_dim: int,
    site: dict,
    nesting: int,
    num_draws: int,
    draws: PosteriorDraws,
    coords: dict[str, np.ndarray],
) -> tuple[np.ndarray, list[str]]:
    """``value`` as ``(num_draws, kept batch dims, event dims)``, and the names of all but the first dim.

    Batch dims are right-aligned at the model's ``nesting`` plate dims, after the particle dim. A
    dim of one of the site's plates is named after the plate (broadcast to the plate's size; the
    plate's indices go into ``coords``); a size-1 dim of no plate is dropped (global sites in
    vectorised traces); any other dim is named ``{site}_dim_{k}``, as are event dims.
    """
    name = site["name"]
    # Pyro's packing of the vectorised trace has checked that batch dims fit the plates
    value = value.reshape((1,) * (nesting + 1 + event_dim - value.dim()) + tuple(value.shape))
    plates = {frame.dim: frame for frame in site["cond_indep_stack"] if frame.vectorized}
    shape, index, names, unnamed = [num_draws], [slice(None)], [], 0
    for position in range(1, nesting + 1):
        frame = plates.get(position - nesting - 1)
        if frame is None and value.shape[position] == 1:
            shape.append(1)
            index.append(0)
            continue
        if frame is None:
            shape.append(value.shape[position])
            names.append(f"{name}_dim_{unnamed}")
            unnamed += 1
        else:
            shape.append(frame.size)
            names.append(frame.name)
            plate_indices = draws.plate_indices.get(frame.name)
            coords[frame.name] = np.arange(frame.size) if plate_indices is None else _numpy(plate_indices)
        index.append(slice(None))
    names.extend(f"{name}_dim_{unnamed + k}" for k in range(event_dim))
    value = value.expand(*shape, *value.shape[nesting + 1 :])[tuple(index)]
    return _numpy(value), names


def _numpy(tensor: Tensor) -> np.ndarray:
    return tensor.detach().cpu().contiguous().numpy()


def describe(guide: Callable, num_samples: int) -> dict[str, str | int]:
    """Root attrs: the guide's name, its flow layers, the inference library.

    The layers are read from a flow guide's ``flow`` (global latents) and, for amortised guides,
    ``local_posterior.layers`` and ``global_posterior.layers``; an empty list reads "Gaussian".
    An ensemble (``AutoFlowEnsemble``) gives its number of members and, per kind, their layers
    (``member 0: ... | member 1: ...`` when the members differ).
    """
    attrs: dict[str, str | int] = {
        "guide": guide_name(guide),
        "num_samples": num_samples,
        "inference_library": "pyro",
        "inference_library_version": pyro.__version__,
        "created_by": "pyro_flowguides",
    }
    members = getattr(guide, "members", None)
    if isinstance(members, torch.nn.ModuleList):
        attrs["ensemble_members"] = len(members)
        described = [describe(member, num_samples) for member in members]
        for key in ("flow", "local_flow", "global_flow"):
            kinds = [d[key] for d in described if key in d]
            if kinds:
                same = len(set(kinds)) == 1
                attrs[key] = kinds[0] if same else " | ".join(f"member {m}: {k}" for m, k in enumerate(kinds))
        return attrs
    layer_lists = {
        "flow": getattr(guide, "flow", None),
        "local_flow": getattr(getattr(guide, "local_posterior", None), "layers", None),
        "global_flow": getattr(getattr(guide, "global_posterior", None), "layers", None),
    }
    for key, layers in layer_lists.items():
        if isinstance(layers, torch.nn.ModuleList):
            names = [f"{type(layer).__name__}({layer.extra_repr()})" for layer in layers]
            attrs[key] = "; ".join(names) or "Gaussian (no flow layers)"
    return attrs


def guide_name(guide: Callable) -> str:
    """A guide's function name, or its class name (autoguides)."""
    return getattr(guide, "__name__", type(guide).__name__)


def build_arviz_data(
    groups: Groups, *, dims: dict[str, list[str]], coords: dict[str, np.ndarray], attrs: dict
):
    """``groups`` as ArviZ data: ``from_dict(**groups)`` in ArviZ 0.x, ``from_dict(groups)`` (a
    ``DataTree``, root attrs under ``"/"``) in ArviZ 1.x."""
    if arviz_major() >= 1:
        return az.from_dict(groups, dims=dims, coords=coords, attrs={"/": attrs})
    return az.from_dict(**groups, dims=dims, coords=coords, attrs=attrs)
