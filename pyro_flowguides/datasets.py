r"""Training a data-set-amortised guide over many data sets.

A guide built with ``AutoFlowGuide(model, summary=DataSummary(...))`` gives the posterior of the
global latents as a function of a whole data set. It is trained by maximising the ELBO averaged
over data sets ``x^{(b)}`` (simulated from the model's prior predictive, or a user's collection):

    ``L = (1/B) Σ_b E_{q(z | x^{(b)})}[log p(x^{(b)}, z) - log q(z | x^{(b)})]``,

with :class:`~pyro.infer.Trace_ELBO` (:class:`DatasetELBO`). The data sets of a batch are stacked
along a leading dimension and run through model and guide at once, under a plate
(:data:`DATASET_PLATE`) to the left of the model's own plates, when the model vectorises.

A data set is the model's keyword arguments: ``model(**dataset)``.

>>> import pyro, pyro.distributions as dist, torch
>>> def model(sigma, y=None):
...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
...     with pyro.plate("obs", sigma.shape[-1]):
...         pyro.sample("y", dist.Normal(mu, sigma), obs=y)
>>> batch = simulate_datasets(model, 5, design=lambda n: {"sigma": torch.ones(n, 3)}, observed="y")
>>> len(batch), batch.data["y"].shape, batch.latents["mu"].shape, sorted(batch[0])
(5, torch.Size([5, 3]), torch.Size([5]), ['sigma', 'y'])
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.infer.enum import get_importance_trace
from pyro.poutine.messenger import unwrap
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import biject_to

from .draws import max_plate_nesting
from .training import FitHistory, fit

#: the name of the plate over a batch of data sets
DATASET_PLATE = "datasets"

Design = Callable[[int], Mapping[str, Tensor]]
Shared = Mapping[str, Any] | Callable[[], Mapping[str, Any]]


@dataclass(frozen=True)
class DatasetBatch:
    """Data sets stacked along dim 0: data set ``i`` is ``{**shared, **{k: v[i] for k, v in data}}``.

    :param data: keyword arguments of the model that vary between data sets, each with leading
        dim ``len(batch)``.
    :param shared: keyword arguments common to every data set of the batch (sizes, a fixed design).
    :param latents: for simulated data sets, the latent values that generated them (leading dim
        ``len(batch)``, then each site's shape), for calibration.
    """

    data: dict[str, Tensor]
    shared: dict[str, Any] = field(default_factory=dict)
    latents: dict[str, Tensor] | None = None

    def __post_init__(self) -> None:
        sizes = {name: value.shape[0] if value.dim() else None for name, value in self.data.items()}
        if not sizes or len(set(sizes.values())) != 1 or None in sizes.values():
            raise ValueError(
                f"DatasetBatch: data must hold tensors with the same leading (data-set) dim, got shapes "
                f"{ {name: tuple(value.shape) for name, value in self.data.items()} }"
            )
        overlap = set(self.data) & set(self.shared)
        if overlap:
            raise ValueError(f"DatasetBatch: {sorted(overlap)} given both per data set and shared")

    def __len__(self) -> int:
        return next(iter(self.data.values())).shape[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The keyword arguments of data set ``index``."""
        return {**self.shared, **{name: value[index] for name, value in self.data.items()}}

    def kwargs(self) -> dict[str, Any]:
        """The model's keyword arguments for the whole (stacked) batch."""
        return {**self.shared, **self.data}


def stack_datasets(datasets: Sequence[Mapping[str, Any]]) -> DatasetBatch:
    """One :class:`DatasetBatch` from data sets given as keyword-argument dicts: tensors are
    stacked, other values must be equal in every data set (they become ``shared``).

    >>> batch = stack_datasets([{"y": torch.zeros(3), "n": 3}, {"y": torch.ones(3), "n": 3}])
    >>> batch.data["y"].shape, batch.shared
    (torch.Size([2, 3]), {'n': 3})
    """
    if not datasets:
        raise ValueError("stack_datasets: no data sets given")
    names = set(datasets[0])
    data, shared = {}, {}
    for i, dataset in enumerate(datasets):
        if set(dataset) != names:
            raise ValueError(
                f"stack_datasets: data set {i} has arguments {sorted(dataset)}, data set 0 has "
                f"{sorted(names)}; every data set must give the same keyword arguments"
            )
    for name in sorted(names):
        values = [dataset[name] for dataset in datasets]
        if isinstance(values[0], Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) != 1:
                raise ValueError(
                    f"stack_datasets: argument {name!r} has shapes {sorted(shapes)} across data sets; "
                    f"only data sets of the same shapes stack (DatasetLoader groups them by shape)"
                )
            data[name] = torch.stack(values)
        elif any(v != values[0] for v in values):
            raise ValueError(
                f"stack_datasets: argument {name!r} is not a tensor and differs across data sets; "
                f"give it as a tensor or group the data sets by it"
            )
        else:
            shared[name] = values[0]
    if not data:
        raise ValueError("stack_datasets: the data sets hold no tensor argument to stack")
    return DatasetBatch(data, shared)


def _observed_arguments(observed: str | Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    """``{site name: keyword argument}`` from a name, a list of names (site = argument) or a dict."""
    if isinstance(observed, str):
        return {observed: observed}
    if isinstance(observed, Mapping):
        return dict(observed)
    return {name: name for name in observed}


def _probe(model: Callable, kwargs: Mapping[str, Any]) -> tuple[int, dict[str, torch.Size]]:
    """One run of ``model`` on one data set: its number of plate dims and each sample site's shape."""
    trace = poutine.trace(model).get_trace(**kwargs)
    sites = [site for site in trace.nodes.values() if site["type"] == "sample"]
    dims = [-frame.dim for site in sites for frame in site["cond_indep_stack"] if frame.vectorized]
    shapes = {site["name"]: site["value"].shape for site in sites if not site_is_subsample(site)}
    return max(dims, default=0), shapes


@torch.no_grad()
def simulate_datasets(
    model: Callable,
    num_datasets: int,
    *,
    observed: str | Sequence[str] | Mapping[str, str],
    design: Design | None = None,
    shared: Shared | None = None,
    vectorise: bool = True,
) -> DatasetBatch:
    """``num_datasets`` data sets from the model's prior predictive, with the latents behind them.

    The model is called as ``model(**design(num_datasets)[i], **shared, <observed>=None)``: it must
    sample each observed site when its argument is ``None`` (Pyro's convention).

    :param observed: the observed sites: a name, a list of names (the site and the model's
        keyword argument have the same name), or a dict ``{site: argument}``.
    :param design: ``design(num_datasets)`` gives the keyword arguments that vary from one data set
        to the next and are not simulated by the model (covariates, noise levels), each with
        leading dim ``num_datasets``.
    :param shared: keyword arguments common to all data sets (a dict), or a function returning
        them, called once per batch (e.g. a random number of observations).
    :param vectorise: run all data sets at once, under a plate left of the model's plates
        (default), or one by one for models that do not vectorise.
    """
    if isinstance(num_datasets, bool) or not isinstance(num_datasets, int) or num_datasets < 1:
        raise ValueError(f"simulate_datasets: num_datasets must be an integer >= 1, got {num_datasets!r}")
    arguments = _observed_arguments(observed)
    common = dict((shared() if callable(shared) else shared) or {})
    varying = {
        name: torch.as_tensor(value) for name, value in (design(num_datasets) if design else {}).items()
    }
    for name, value in varying.items():
        if value.dim() == 0 or value.shape[0] != num_datasets:
            raise ValueError(
                f"simulate_datasets: design returned {name!r} of shape {tuple(value.shape)}; each value "
                f"must have a leading dim of num_datasets = {num_datasets}"
            )
    unobserved = {argument: None for argument in arguments.values()}
    with poutine.block():
        nesting, shapes = _probe(model, {**common, **{k: v[0] for k, v in varying.items()}, **unobserved})
        missing = [name for name in arguments if name not in shapes]
        if missing:
            raise ValueError(
                f"simulate_datasets: the model has no sample site {missing}; observed names the sites "
                f"whose values form the data set (sites: {sorted(shapes)})"
            )
        if vectorise:
            with pyro.plate(DATASET_PLATE, num_datasets, dim=-(nesting + 1)):
                trace = poutine.trace(model).get_trace(**common, **varying, **unobserved)
            sites = _per_dataset_values(trace, (num_datasets,), shapes)
        else:
            traces = [
                poutine.trace(model).get_trace(
                    **common, **{k: v[i] for k, v in varying.items()}, **unobserved
                )
                for i in range(num_datasets)
            ]
            sites = {name: torch.stack([t.nodes[name]["value"] for t in traces]) for name in shapes}
    data = {**varying, **{arguments[name]: sites.pop(name) for name in arguments}}
    return DatasetBatch(data, common, latents=sites)


def _per_dataset_values(
    trace, leading: tuple[int, ...], shapes: Mapping[str, torch.Size]
) -> dict[str, Tensor]:
    """Site values of a run vectorised over data sets (and draws), reshaped from
    ``leading + (1,) * k + shape`` to ``leading + shape``."""
    values = {}
    for name, shape in shapes.items():
        value = trace.nodes[name]["value"]
        if value.numel() != math.prod(leading) * shape.numel():
            raise ValueError(
                f"site {name!r} has shape {tuple(value.shape)} when run over data sets {leading}, but "
                f"{tuple(shape)} for one data set; the model must broadcast over a leading data-set "
                f"dim of its arguments (or use vectorise=False)"
            )
        values[name] = value.reshape(leading + shape)
    return values


@contextmanager
def _summary_over_datasets(guide: Callable, nesting: int, event_rank: int) -> Iterator[None]:
    """While active, a guide with a :class:`~pyro_flowguides.DataSummary` reads inputs with leading
    data-set dims as a batch of data sets in :data:`DATASET_PLATE`: those dims are moved left of
    the model's ``nesting`` plate dims, so the global posterior's batch lines up with the plate."""
    guide = unwrap(guide)  # the AutoFlowGuide inside poutine handlers
    spec = getattr(guide, "_summary", None)
    if spec is None:
        yield
        return

    def aligned_inputs(*args: Any, **kwargs: Any) -> Tensor:
        x = spec.inputs(*args, **kwargs)
        batch, event = x.shape[: x.dim() - event_rank], x.shape[x.dim() - event_rank :]
        return x.reshape(batch + (1,) * nesting + event)

    guide._summary = dataclasses.replace(spec, inputs=aligned_inputs)
    try:
        yield
    finally:
        guide._summary = spec


def _in_dataset_plate(fn: Callable, size: int, nesting: int, scale: float = 1.0) -> Callable:
    """``fn`` run under :data:`DATASET_PLATE` (size ``size``, left of ``nesting`` plate dims)."""

    def over_datasets(*args: Any, **kwargs: Any) -> Any:
        with pyro.plate(DATASET_PLATE, size, dim=-(nesting + 1)), poutine.scale(scale=scale):
            return fn(*args, **kwargs)

    return over_datasets


@contextmanager
def _datasets_at_once(
    model: Callable, guide: Callable, batch: DatasetBatch, plate_nesting: int, scale: float = 1.0
) -> Iterator[tuple[Callable, Callable]]:
    """``(model, guide)`` that run all data sets of ``batch`` at once, under :data:`DATASET_PLATE`
    left of the model's ``plate_nesting`` plate dims, log-densities multiplied by ``scale``. The
    guide must have been set up on one data set (run once)."""
    spec = getattr(unwrap(guide), "_summary", None)
    rank = spec.inputs(**batch[0]).dim() if spec is not None else 0
    with _summary_over_datasets(guide, plate_nesting, rank):
        yield (
            _in_dataset_plate(model, len(batch), plate_nesting, scale),
            _in_dataset_plate(guide, len(batch), plate_nesting, scale),
        )


class _PlateNestingCache:
    """The model's plate dims per (model, guide), found once by tracing them (which also sets the
    guide up), not at every step."""

    def __init__(self) -> None:
        self._known: dict[tuple[int, int], int] = {}

    def __call__(self, model: Callable, guide: Callable, dataset: Mapping[str, Any]) -> int:
        key = (id(unwrap(model)), id(unwrap(guide)))
        if key not in self._known:
            self._known[key] = max_plate_nesting(model, guide, **dataset)
        return self._known[key]


class DatasetELBO:
    r"""The negative ELBO averaged over a :class:`DatasetBatch` of data sets, with ``Trace_ELBO``:
    ``-(1/B) Σ_b E_q[log p(x^{(b)}, z) - log q(z | x^{(b)})]``, ``num_particles`` draws per data set.

    A callable ``loss(model, guide, batch)`` for :func:`~pyro_flowguides.training.fit` (with
    ``data=`` a :class:`PriorPredictive` or :class:`DatasetLoader`) or :class:`~pyro.infer.SVI`.
    With ``vectorise`` (default) the batch runs at once under :data:`DATASET_PLATE`; the model
    must then broadcast over a leading dim of its arguments. Otherwise data sets run one by one.

    :param importance_weighted: per data set, the importance-weighted bound
        ``log (1/K) Σ_k p(x, z_k) / q(z_k | x)`` with ``K = num_particles`` (Burda et al. 2016)
        instead of the ELBO; it pulls ``q`` over the posterior's tails.
    :param tail_quantile: ``q`` in (0.5, 1): a data set whose loss ``ℓ_b`` exceeds the batch's
        ``q``-quantile ``t`` has its gradient multiplied by ``(t - m) / (ℓ_b - m)`` (``m`` the batch
        median), so that no data set counts for more than the quantile's excess; the value
        returned stays the plain mean. Each data set's optimum is unchanged. For prior predictives
        with heavy tails, whose few extreme data sets otherwise dominate every step.

    >>> DatasetELBO(num_particles=8, importance_weighted=True, tail_quantile=0.9).num_particles
    8
    """

    def __init__(
        self,
        num_particles: int = 1,
        vectorise: bool = True,
        tail_quantile: float | None = None,
        importance_weighted: bool = False,
    ) -> None:
        if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(f"DatasetELBO: num_particles must be an integer >= 1, got {num_particles!r}")
        self.num_particles = num_particles
        self.vectorise = vectorise
        if tail_quantile is not None and not 0.5 < tail_quantile < 1:
            raise ValueError(f"DatasetELBO: tail_quantile must lie in (0.5, 1), got {tail_quantile!r}")
        if not vectorise and (tail_quantile is not None or importance_weighted):
            raise ValueError(
                "DatasetELBO: tail_quantile and importance_weighted need the per-data-set losses of a "
                "vectorised batch; use vectorise=True (the model must broadcast over data sets)"
            )
        self.tail_quantile = tail_quantile
        self.importance_weighted = importance_weighted
        self.plate_nesting = _PlateNestingCache()

    def _elbo(self, plate_nesting: int) -> Trace_ELBO:
        return Trace_ELBO(
            num_particles=self.num_particles, vectorize_particles=True, max_plate_nesting=plate_nesting
        )

    def __call__(self, model: Callable, guide: Callable, batch: DatasetBatch) -> Tensor:
        if not isinstance(batch, DatasetBatch):
            raise TypeError(
                f"DatasetELBO: expected a DatasetBatch of data sets, got {type(batch).__name__}; "
                f"train with fit(..., data=PriorPredictive(...) or DatasetLoader(...))"
            )
        size, nesting = len(batch), self.plate_nesting(model, guide, batch[0])
        if not self.vectorise:
            elbo = self._elbo(nesting)
            return sum(elbo.differentiable_loss(model, guide, **batch[i]) for i in range(size)) / size
        if self.tail_quantile is None and not self.importance_weighted:
            with _datasets_at_once(model, guide, batch, nesting, scale=1 / size) as (
                batched_model,
                batched_guide,
            ):
                return self._elbo(nesting + 1).differentiable_loss(
                    batched_model, batched_guide, **batch.kwargs()
                )
        losses = self.per_dataset_losses(model, guide, batch)
        mean = losses.mean()
        if self.tail_quantile is None:
            return mean
        median, top = torch.quantile(losses.detach(), losses.new_tensor([0.5, self.tail_quantile]))
        excess = (losses.detach() - median).clamp(min=1e-30)
        weights = ((top - median).clamp(min=0) / excess).clamp(max=1.0)
        weighted = (weights * losses).mean()
        return weighted + (mean - weighted).detach()

    def per_dataset_losses(self, model: Callable, guide: Callable, batch: DatasetBatch) -> Tensor:
        """``-ELBO`` (or the importance-weighted bound's negative) of each data set of ``batch``,
        shape ``(len(batch),)``, differentiable (for reparameterised guides)."""
        if (
            self.importance_weighted
            and self.num_particles > 1
            and getattr(unwrap(guide), "path_gradient", False)
        ):
            raise ValueError(
                "DatasetELBO(importance_weighted=True): the guide has path_gradient=True, whose gradient "
                "is biased for importance-weighted bounds (Tucker et al. 2019); build the guide with "
                "path_gradient=False, or use importance_weighted=False"
            )
        nesting = self.plate_nesting(model, guide, batch[0])
        elbo = self._elbo(nesting + 1)
        with _datasets_at_once(model, guide, batch, nesting) as (batched_model, batched_guide):
            ((model_trace, guide_trace),) = elbo._get_traces(batched_model, batched_guide, (), batch.kwargs())
            log_ratios = _log_prob_per_dataset(model_trace, nesting) - _log_prob_per_dataset(
                guide_trace, nesting
            )
        log_ratios = log_ratios.reshape(-1, len(batch))
        if self.importance_weighted:
            return -(log_ratios.logsumexp(0) - math.log(self.num_particles))
        return -log_ratios.mean(0)


def _log_prob_per_dataset(trace, nesting: int) -> Tensor:
    """``Σ_sites log p`` per data set (dim ``-(nesting + 1)`` of the batch), keeping the dims to
    its left (particles, draws)."""
    total = 0.0
    for site in trace.nodes.values():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        log_prob = site["log_prob"]
        log_prob = log_prob.reshape((1,) * max(0, nesting + 1 - log_prob.dim()) + log_prob.shape)
        total = total + log_prob.sum(tuple(range(log_prob.dim() - nesting, log_prob.dim())))
    return total


def posterior_log_density(
    guide: Callable, batch: DatasetBatch, latents: Mapping[str, Tensor], leading: tuple[int, ...] = ()
) -> Tensor:
    r"""``log q(θ | x_b)`` of a data-set-amortised guide at given latent values, Jacobians of the
    constraining maps included: ``log q_u(u | x_b) - Σ log|dθ/du|``, ``u`` the unconstrained values
    packed as the guide packs them and ``q_u`` the flow, evaluated by inverting its layers.

    :param latents: each of the guide's latent sites, shaped ``leading + (len(batch),) + site
        shape`` (as :class:`DatasetBatch`'s ``latents`` with ``leading = ()``, or
        :class:`DatasetDraws`' ``samples`` with ``leading = (num_draws,)``).
    :returns: shape ``leading + (len(batch),)``, differentiable in the guide's parameters.
    """
    auto = unwrap(guide)
    if getattr(auto, "_summary", None) is None:
        raise ValueError(
            "posterior_log_density: the guide is not conditioned on a data-set summary; build it with "
            "AutoFlowGuide(model, summary=DataSummary(...))"
        )
    if auto.prototype_trace is None:
        auto._setup_prototype(**batch[0])
    with auto._pyro_context:
        posterior = auto.get_posterior(**batch.kwargs())
    shape = (*leading, len(batch))
    packed, log_det = [], 0.0
    for name, site in auto.prototype_trace.iter_stochastic_nodes():
        if name not in latents:
            raise ValueError(
                f"posterior_log_density: no value for latent site {name!r}; give every latent site "
                f"of the guide ({[n for n, _ in auto.prototype_trace.iter_stochastic_nodes()]})"
            )
        value = latents[name]
        transform = biject_to(site["fn"].support)
        unconstrained = transform.inv(value)
        jacobian = transform.inv.log_abs_det_jacobian(value, unconstrained)
        log_det = log_det + jacobian.reshape(*shape, -1).sum(-1)
        packed.append(unconstrained.reshape(*shape, -1))
    return posterior.log_prob(torch.cat(packed, -1)) + log_det


class ForwardKL:
    r"""Mass-covering training over data sets: the forward KL ``E_x KL(p(θ | x) ‖ q(θ | x))``,
    up to a constant, from two estimates (Le et al. 2019, "Revisiting reweighted wake-sleep"):

    - simulated (neural posterior estimation; Papamakarios & Murray 2016):
      ``-(1/B) Σ_b log q(θ_b | x_b)`` at the latents ``θ_b`` that simulated ``x_b``, weight
      ``simulated_weight``;
    - importance-weighted (the wake-phase update of reweighted wake-sleep; Bornschein & Bengio
      2015): ``-(1/B) Σ_b Σ_k w̄_bk log q(θ_bk | x_b)``, ``K = num_particles`` draws ``θ_bk`` from
      the guide held fixed, ``w̄_bk`` their self-normalised weights ``∝ p(x_b, θ_bk) / q(θ_bk | x_b)``;
      off with ``num_particles=0``.

    Unlike the ELBO (reverse KL), which makes ``q`` too narrow when it cannot be exact, it spreads
    ``q`` over the posterior's mass, so credible intervals do not under-cover (see
    :func:`~pyro_flowguides.calibration.simulation_based_calibration`). The simulated term needs
    data sets with their latents (:class:`PriorPredictive`); the flow's log-density at a given
    point inverts its layers (:func:`posterior_log_density`).

    >>> ForwardKL(num_particles=16).num_particles
    16
    """

    def __init__(self, num_particles: int = 16, simulated_weight: float = 1.0) -> None:
        if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < 0:
            raise ValueError(f"ForwardKL: num_particles must be an integer >= 0, got {num_particles!r}")
        if not simulated_weight >= 0 or (num_particles == 0 and simulated_weight == 0):
            raise ValueError(
                f"ForwardKL: simulated_weight must be >= 0 and not 0 when num_particles is 0, got "
                f"{simulated_weight!r}"
            )
        self.num_particles, self.simulated_weight = num_particles, simulated_weight
        self._plate_nesting = _PlateNestingCache()

    def __call__(self, model: Callable, guide: Callable, batch: DatasetBatch) -> Tensor:
        if not isinstance(batch, DatasetBatch):
            raise TypeError(
                f"ForwardKL: expected a DatasetBatch of data sets, got {type(batch).__name__}; "
                f"train with fit(..., data=PriorPredictive(...))"
            )
        terms = []
        if self.simulated_weight:
            if batch.latents is None:
                raise ValueError(
                    "ForwardKL: the simulated term needs the latents behind each data set, and this "
                    "batch has none (a user's collection); train on PriorPredictive(...) data sets or "
                    "set simulated_weight=0"
                )
            log_q = posterior_log_density(guide, batch, batch.latents)
            terms.append(-self.simulated_weight * log_q.mean())
        if self.num_particles:
            nesting = self._plate_nesting(model, guide, batch[0])
            draws = draw_for_datasets(
                model, guide, batch, self.num_particles, log_weights=True, plate_nesting=nesting
            )
            weights = torch.softmax(draws.log_weights, 0)
            log_q = posterior_log_density(guide, batch, draws.samples, (self.num_particles,))
            terms.append(-(weights * log_q).sum(0).mean())
        return sum(terms)


@dataclass(frozen=True)
class DatasetDraws:
    """Draws of the guide's latent sites for a batch of data sets: ``samples[site]`` has shape
    ``(num_draws, num_datasets) + site shape``; ``log_weights`` (when asked for) holds
    ``log p(x_b, z) - log q(z | x_b)`` per draw and data set, ``(num_draws, num_datasets)``."""

    samples: dict[str, Tensor]
    log_weights: Tensor | None = None


@torch.no_grad()
def draw_for_datasets(
    model: Callable,
    guide: Callable,
    batch: DatasetBatch,
    num_draws: int = 1000,
    log_weights: bool = False,
    *,
    plate_nesting: int | None = None,
) -> DatasetDraws:
    """``num_draws`` draws of the guide's latent sites for every data set of ``batch``, all in one
    vectorised guide run (one encoder pass per data set); with ``log_weights`` the model is
    replayed on them for the importance log-weights. ``plate_nesting``: the model's plate dims
    (default: found by tracing the model and guide on one data set).

    >>> import pyro.distributions as dist
    >>> from pyro_flowguides import AutoFlowGuide, DataSummary
    >>> def model(y=None):
    ...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    ...     with pyro.plate("obs", 4):
    ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
    >>> guide = AutoFlowGuide(model, "planar", 2, summary=DataSummary(inputs=lambda y: y.unsqueeze(-1)))
    >>> draws = draw_for_datasets(model, guide, simulate_datasets(model, 6, observed="y"), 10, True)
    >>> draws.samples["mu"].shape, draws.log_weights.shape
    (torch.Size([10, 6]), torch.Size([10, 6]))
    """
    nesting = max_plate_nesting(model, guide, **batch[0]) if plate_nesting is None else plate_nesting
    with poutine.block():
        _, shapes = _probe(guide, batch[0])
    with _datasets_at_once(model, guide, batch, nesting) as (batched_model, batched_guide):
        model, guide = (
            _in_draws_plate(batched_model, num_draws, nesting),
            _in_draws_plate(batched_guide, num_draws, nesting),
        )
        if log_weights:
            model_trace, guide_trace = get_importance_trace(
                "flat", nesting + 2, model, guide, (), batch.kwargs()
            )
            weights = _log_prob_per_dataset(model_trace, nesting) - _log_prob_per_dataset(
                guide_trace, nesting
            )
        else:
            guide_trace, weights = poutine.trace(guide).get_trace(**batch.kwargs()), None
    latent = {
        name: shape
        for name, shape in shapes.items()
        if not guide_trace.nodes[name]["infer"].get("is_auxiliary")
    }
    return DatasetDraws(_per_dataset_values(guide_trace, (num_draws, len(batch)), latent), weights)


def _in_draws_plate(fn: Callable, num_draws: int, nesting: int) -> Callable:
    def drawn(*args: Any, **kwargs: Any) -> Any:
        with pyro.plate("draws", num_draws, dim=-(nesting + 2)):
            return fn(*args, **kwargs)

    return drawn


class PriorPredictive:
    """Fresh data sets from the prior predictive, ``batch_size`` per batch, without end: the
    ``data`` for :func:`~pyro_flowguides.training.fit` with ``num_steps`` (each item is a 1-tuple
    ``(DatasetBatch,)``, the positional arguments of :class:`DatasetELBO`). Options as
    :func:`simulate_datasets`."""

    def __init__(
        self,
        model: Callable,
        batch_size: int,
        *,
        observed: str | Sequence[str] | Mapping[str, str],
        design: Design | None = None,
        shared: Shared | None = None,
        vectorise: bool = True,
    ) -> None:
        self.model, self.batch_size = model, batch_size
        self.options = {"observed": observed, "design": design, "shared": shared, "vectorise": vectorise}

    def __iter__(self) -> Iterator[tuple[DatasetBatch]]:
        while True:
            yield (simulate_datasets(self.model, self.batch_size, **self.options),)


class DatasetLoader:
    """Batches of ``batch_size`` data sets from a collection (a list of keyword-argument dicts, or
    a :class:`DatasetBatch`), reshuffled each pass: the ``data`` for
    :func:`~pyro_flowguides.training.fit` with ``epochs``. Data sets of different shapes (e.g.
    different numbers of observations) go to different batches.

    >>> loader = DatasetLoader([{"y": torch.zeros(n)} for n in (2, 2, 3)], batch_size=4)
    >>> sorted(len(batch) for (batch,) in loader)
    [1, 2]
    """

    def __init__(
        self, datasets: Sequence[Mapping[str, Any]] | DatasetBatch, batch_size: int, shuffle: bool = True
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"DatasetLoader: batch_size must be an integer >= 1, got {batch_size!r}")
        items = [datasets[i] for i in range(len(datasets))]
        if not items:
            raise ValueError("DatasetLoader: no data sets given")
        groups: dict[tuple, list[Mapping[str, Any]]] = {}
        for dataset in items:
            key = tuple(
                sorted((k, tuple(v.shape) if isinstance(v, Tensor) else repr(v)) for k, v in dataset.items())
            )
            groups.setdefault(key, []).append(dataset)
        self.groups = list(groups.values())
        self.batch_size, self.shuffle = batch_size, shuffle

    def __len__(self) -> int:
        return sum(math.ceil(len(group) / self.batch_size) for group in self.groups)

    def __iter__(self) -> Iterator[tuple[DatasetBatch]]:
        chunks = []
        for group in self.groups:
            order = torch.randperm(len(group)).tolist() if self.shuffle else range(len(group))
            picked = [group[i] for i in order]
            chunks += [picked[i : i + self.batch_size] for i in range(0, len(picked), self.batch_size)]
        order = torch.randperm(len(chunks)).tolist() if self.shuffle else range(len(chunks))
        for i in order:
            yield (stack_datasets(chunks[i]),)


def fine_tune(
    model: Callable,
    guide: Callable,
    dataset: Mapping[str, Any],
    num_steps: int = 500,
    *,
    num_particles: int = 8,
    optim: pyro.optim.PyroOptim | None = None,
    **fit_options: Any,
) -> FitHistory:
    """Go on training an amortised ``guide`` on one observed ``dataset`` (keyword arguments of the
    model), starting from the amortised posterior: :func:`~pyro_flowguides.training.fit` with
    ``Trace_ELBO(num_particles)`` and a small learning rate (``ClippedAdam``, 1e-3, decaying ten
    times over the run). The guide is changed in place; to keep the amortised guide, save
    ``copy.deepcopy(pyro.get_param_store().get_state())`` before and ``set_state`` it back after."""
    nesting = max_plate_nesting(model, guide, **dataset)
    elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=nesting)
    if optim is None:
        optim = pyro.optim.ClippedAdam({"lr": 1e-3, "lrd": 0.1 ** (1 / num_steps)})
    return fit(model, guide, num_steps=num_steps, model_kwargs=dataset, loss=elbo, optim=optim, **fit_options)
