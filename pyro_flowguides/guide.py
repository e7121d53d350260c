"""``AutoFlowGuide``: a Pyro autoguide whose posterior is a normalizing flow over all latents."""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from pyro.nn import PyroParam
from pyro.params.param_store import param_with_module_name
from torch import Tensor
from torch.distributions import biject_to

from . import flows
from .flow_distribution import FlowDistribution


def init_to_feasible_point(site: dict | None = None) -> Tensor | Callable:
    """A point in the support, ``biject_to(support)(0)``, built without sampling the prior.

    Works for priors that cannot be sampled, such as ``ImproperUniform``.
    """
    if site is None:
        return init_to_feasible_point
    fn = site["fn"]
    transform = biject_to(fn.support)
    shape = transform.inverse_shape(fn.batch_shape + fn.event_shape)
    like = _a_float_tensor_of(fn)
    return transform(torch.zeros(shape, dtype=like.dtype, device=like.device)).detach()


def _a_float_tensor_of(fn: dist.Distribution) -> Tensor:
    """A floating tensor among ``fn``'s parameters (looking inside wrappers such as ``Independent``),
    to take dtype and device from; a default-dtype scalar when there is none (``ImproperUniform``)."""
    for value in vars(fn).values():
        if isinstance(value, Tensor) and value.is_floating_point():
            return value
        if isinstance(value, torch.distributions.Distribution):
            return _a_float_tensor_of(value)
    return torch.zeros(())


def init_to_median_or_feasible(site: dict | None = None) -> Tensor | Callable:
    """The prior median (as ``init_to_median``), or a feasible point when the prior cannot be sampled."""
    if site is None:
        return init_to_median_or_feasible
    if any(size > 1 for size in site["fn"].event_shape):  # init_to_median would sample these
        return init_to_feasible_point(site)
    return init_to_median(site, fallback=init_to_feasible_point)


class AutoFlowGuide(AutoContinuous):
    r"""A posterior ``z = loc + f_K ∘ … ∘ f_1(scale ⊙ ε)``, ``ε ~ N(0, I)``, over all continuous latents.

    The latents are unconstrained with ``biject_to`` (Jacobians included) and packed into one
    vector, as in Pyro's other ``AutoContinuous`` guides. ``loc`` starts at ``init_loc_fn``'s values
    and ``scale`` at ``init_scale``; every flow layer starts at (or next to) the identity, so before
    any step ``median()`` returns the init values.

    :param model: a Pyro model.
    :param flow: a registered layer name (see :func:`pyro_flowguides.flows.available`), a list of
        names stacked in order, or a callable ``dim -> TransformModule``.
    :param num_flows: how many layers of ``flow`` when it is a single name or a callable.
    :param init_loc_fn: per-site initialisation, as in Pyro's autoguides.
    :param init_scale: initial scale of the base distribution (unconstrained space).
    :param flow_options: passed to every layer, e.g. ``num_ortho_vecs=8``, ``hidden_dims=[64]``.

    >>> import pyro, pyro.distributions as dist, torch
    >>> def model():
    ...     pyro.sample("x", dist.Normal(0.0, 1.0))
    >>> guide = AutoFlowGuide(model, flow="planar", num_flows=2)
    >>> sorted(guide())
    ['x']
    """

    scale_constraint = constraints.softplus_positive

    def __init__(
        self,
        model: Callable,
        flow: flows.FlowSpec = "affine_coupling",
        num_flows: int = 4,
        *,
        init_loc_fn: Callable = init_to_median_or_feasible,
        init_scale: float = 0.1,
        **flow_options: object,
    ) -> None:
        if not isinstance(init_scale, int | float) or not init_scale > 0:
            raise ValueError(f"init_scale must be a positive number, got {init_scale!r}")
        # validate the flow specification now rather than at the first step
        if isinstance(flow, str) and flow not in flows.available():
            raise ValueError(f"unknown flow layer {flow!r}; available: {', '.join(flows.available())}")
        if isinstance(num_flows, bool) or not isinstance(num_flows, int) or num_flows < 1:
            raise ValueError(f"num_flows must be an integer >= 1, got {num_flows!r}")
        self._flow_spec = flow
        self._num_flows = num_flows if isinstance(flow, str) or callable(flow) else 1
        self._flow_options = flow_options
        self._init_scale = init_scale
        super().__init__(model, init_loc_fn=init_loc_fn)

    def _setup_prototype(self, *args, **kwargs) -> None:
        super()._setup_prototype(*args, **kwargs)
        self._refuse_subsampled_locals()
        init_loc = self._init_loc()
        self.loc = PyroParam(init_loc, constraint=constraints.real)
        self.scale = PyroParam(torch.full_like(init_loc, self._init_scale), constraint=self.scale_constraint)
        layers = flows.stack(self._flow_spec, self.latent_dim, self._num_flows, **self._flow_options)
        self.flow = layers.to(device=init_loc.device, dtype=init_loc.dtype)

    def _refuse_subsampled_locals(self) -> None:
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            for frame in site["cond_indep_stack"]:
                if frame.vectorized and frame.full_size is not None and frame.full_size != frame.size:
                    raise ValueError(
                        f"AutoFlowGuide: latent site {name!r} is local to the subsampled plate "
                        f"{frame.name!r} (subsample {frame.size} of {frame.full_size}); one flow over "
                        f"all latents would tie its values to minibatch positions. Amortise it "
                        f"(an encoder gives each data point its posterior), or hide the site with "
                        f"poutine.block and give it a guide of its own."
                    )

    def get_base_dist(self) -> dist.Distribution:
        return dist.Normal(self.loc, self.scale).to_event(1)

    def get_posterior(self, *args, **kwargs) -> FlowDistribution:
        """The flow posterior over the packed unconstrained latent vector."""
        return FlowDistribution(self.loc, self.scale, self._registered_flow())

    def _registered_flow(self) -> torch.nn.ModuleList:
        """The layers, registered with Pyro's param store.

        ``self.flow`` would register them without taking values loaded into the store (by
        ``ParamStore.load``); this registration copies those in. Not under JIT tracing, where
        the parameters are the trace's inputs.
        """
        flow = self._modules["flow"]
        if self._pyro_context.active:
            name = self._pyro_get_fullname("flow")
            if torch._C._get_tracing_state() is None:
                self._check_store_shapes(name, flow)
                pyro.module(name, flow, update_module_params=True)
            else:
                pyro.module(name, flow)
        return flow

    def _check_store_shapes(self, name: str, flow: torch.nn.Module) -> None:
        store = pyro.get_param_store()
        for param_name, param in flow.named_parameters():
            full_name = param_with_module_name(name, param_name)
            if full_name in store and store[full_name].shape != param.shape:
                raise ValueError(
                    f"AutoFlowGuide: Pyro's param store holds {full_name!r} with shape "
                    f"{tuple(store[full_name].shape)}, but this guide's flow has shape {tuple(param.shape)}: "
                    f"the store holds parameters of another model or guide. Call pyro.clear_param_store() "
                    f"before building a new guide, or load a store saved from this model."
                )

    @torch.no_grad()
    def median(self, *args, **kwargs) -> dict[str, Tensor]:
        """``loc + f(0)``, the image of the base distribution's centre, constrained, per site.

        At initialisation (identity flow) these are the init values; in general it is the point the
        base distribution's centre maps to. For marginal medians use ``quantiles([0.5])``.
        """
        return self._unpack_and_constrain(self._current_posterior(*args, **kwargs).median_point())

    @torch.no_grad()
    def quantiles(self, quantiles: list[float] | Tensor, *args, num_samples: int = 4000, **kwargs) -> dict:
        """Marginal quantiles per site, estimated from ``num_samples`` draws of the flow."""
        posterior = self._current_posterior(*args, **kwargs)
        q = torch.as_tensor(quantiles, dtype=self.loc.dtype, device=self.loc.device)
        if q.dim() != 1 or not ((q >= 0) & (q <= 1)).all():
            raise ValueError(f"quantiles must be a list of numbers in [0, 1], got {quantiles!r}")
        draws = self._unpack_and_constrain(posterior.rsample((num_samples,)))
        return {name: torch.quantile(value, q, dim=0) for name, value in draws.items()}

    def _current_posterior(self, *args, **kwargs) -> FlowDistribution:
        """The posterior with the param store's current values (also those loaded into it)."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        with self._pyro_context:
            return self.get_posterior(*args, **kwargs)

    def _unpack_and_constrain(self, latent: Tensor) -> dict[str, Tensor]:
        return {
            site["name"]: biject_to(site["fn"].support)(unconstrained)
            for site, unconstrained in self._unpack_latent(latent)
        }
