"""``AutoFlowGuide``: a Pyro autoguide whose posterior is a normalizing flow, amortised or not."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from pyro.nn import PyroParam
from pyro.params.param_store import param_with_module_name
from torch import Tensor
from torch.distributions import biject_to

from . import flows
from .amortisation import Amortised, AmortisedFlow, DataSummary, build_encoder, resolve_conditioning
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


#: The global flow when none is given: the configuration with the lowest mean rank of error in
#: ``benchmarks/posteriordb.py`` (medians over three seeds), on a full-rank base.
DEFAULT_FLOW = ("lu_linear", "iaf", "lu_linear", "iaf")
#: The amortised flows (local latents, data-set summaries) when neither they nor the guide name one.
DEFAULT_AMORTISED_FLOW, DEFAULT_NUM_FLOWS = "iaf", 4


class AutoFlowGuide(AutoContinuous):
    r"""A posterior ``z = loc + f_K ∘ … ∘ f_1(scale ⊙ ε)``, ``ε ~ N(0, I)``, over continuous latents.

    The global latents are unconstrained with ``biject_to`` (Jacobians included) and packed into one
    vector, as in Pyro's other ``AutoContinuous`` guides. ``loc`` starts at ``init_loc_fn``'s values
    and ``scale`` at ``init_scale``; every flow layer starts at (or next to) the identity, so before
    any step ``median()`` returns the init values.

    With ``base_covariance="full"`` the posterior is ``z = loc + scale ⊙ f_K ∘ … ∘ f_1(U ε)``:
    Pyro's ``AutoMultivariateNormal`` (``U`` learnable unit lower triangular) with the layers
    between ``U`` and ``scale``. They act on a unit-scale variable (``FlowDistribution`` with
    ``standardised=True``), so layers that mix coordinates work alike whatever the posterior's
    scales, and correlations need nothing from the layers. (Without ``U`` the standardised variable
    ``ε`` is isotropic, and rotations of it would do nothing: the diagonal base keeps the layers on
    ``scale ⊙ ε``.)

    With ``amortised=Amortised(plate, inputs, ...)`` the latents local to ``plate`` get a posterior
    per item, ``q(z_i | x_i)``, a flow whose parameters an encoder computes from the item's inputs
    (see :mod:`pyro_flowguides.amortisation`); the plate may subsample. With
    ``summary=DataSummary(inputs, ...)`` the global posterior is conditioned on a summary of the
    whole data set instead of having its own parameters.

    :param model: a Pyro model.
    :param flow: a registered layer name (see :func:`pyro_flowguides.flows.available`), a list of
        names stacked in order, or a callable ``dim -> TransformModule``. Default: the stack
        :data:`DEFAULT_FLOW` (LU linear, IAF, LU linear, IAF) on a full-rank base, the configuration
        measured best on posteriordb; amortised flows default to IAF x 4.
    :param num_flows: how many layers of ``flow`` when it is a single name or a callable (default 4).
    :param init_loc_fn: per-site initialisation, as in Pyro's autoguides.
    :param init_scale: initial scale of the base distribution (unconstrained space).
    :param base_covariance: ``"diagonal"`` or ``"full"`` (learnable ``U``: ``D(D-1)/2`` parameters
        and O(D²) per draw). Default: ``"full"`` with the default flow (and no ``summary``),
        ``"diagonal"`` with a flow you name.
    :param path_gradient: "sticking the landing" (Roeder et al. 2017), for every posterior of the
        guide: the ELBO's gradient reaches the parameters only through the draws, which removes
        its noise where ``q`` fits the posterior (see :class:`~pyro_flowguides.FlowDistribution`).
        Costs a pass through the layers' inverse per step (about 2x the time); for ``Trace_ELBO``
        and its variants, not ``RenyiELBO`` (biased there). With the default flow, the best
        configuration measured on posteriordb (``docs/guide.md``).
    :param amortised: amortise the latents local to a plate (:class:`~pyro_flowguides.Amortised`).
    :param summary: condition the global latents on a data-set summary
        (:class:`~pyro_flowguides.DataSummary`).
    :param create_plates: as for Pyro's autoguides, a function of the model's arguments returning
        the guide's plates (e.g. with the subsample indices to use).
    :param flow_options: passed to every layer, e.g. ``num_ortho_vecs=8``, ``hidden_dims=[64]``.

    >>> import pyro, pyro.distributions as dist, torch
    >>> pyro.clear_param_store()
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
        flow: flows.FlowSpec | None = None,
        num_flows: int | None = None,
        *,
        init_loc_fn: Callable = init_to_median_or_feasible,
        init_scale: float = 0.1,
        base_covariance: str | None = None,
        path_gradient: bool = False,
        amortised: Amortised | None = None,
        summary: DataSummary | None = None,
        create_plates: Callable | None = None,
        **flow_options: object,
    ) -> None:
        if not isinstance(init_scale, int | float) or not init_scale > 0:
            raise ValueError(f"init_scale must be a positive number, got {init_scale!r}")
        # validate the flow specification now rather than at the first step
        if isinstance(flow, str) and flow not in flows.available():
            raise ValueError(f"unknown flow layer {flow!r}; available: {', '.join(flows.available())}")
        if flow is None and num_flows is not None:
            raise ValueError(
                f"num_flows={num_flows!r} needs a flow to repeat: name one, e.g. flow='iaf' "
                "(the default flow is a fixed stack)"
            )
        if num_flows is not None and (
            isinstance(num_flows, bool) or not isinstance(num_flows, int) or num_flows < 1
        ):
            raise ValueError(f"num_flows must be an integer >= 1, got {num_flows!r}")
        if base_covariance is None:
            base_covariance = "full" if flow is None and summary is None else "diagonal"
        if base_covariance not in ("diagonal", "full"):
            raise ValueError(f"base_covariance must be 'diagonal' or 'full', got {base_covariance!r}")
        if base_covariance == "full" and summary is not None:
            raise ValueError(
                "base_covariance='full' is for the guide's own global flow; with summary=DataSummary(...) "
                "the global posterior comes from the summary network: leave base_covariance='diagonal'"
            )
        if not isinstance(path_gradient, bool):
            raise TypeError(f"path_gradient must be True or False, got {path_gradient!r}")
        if amortised is not None and not isinstance(amortised, Amortised):
            raise TypeError(f"amortised must be an Amortised(...) specification, got {amortised!r}")
        if summary is not None and not isinstance(summary, DataSummary):
            raise TypeError(f"summary must be a DataSummary(...) specification, got {summary!r}")
        self._named_flow = flow is not None
        self._flow_spec = list(DEFAULT_FLOW) if flow is None else flow
        repeated = isinstance(flow, str) or callable(flow)
        self._num_flows = (num_flows or DEFAULT_NUM_FLOWS) if repeated else 1
        self._flow_options = flow_options
        self._init_scale = init_scale
        self._base_covariance = base_covariance
        self._path_gradient = path_gradient
        self._amortised = amortised
        self._summary = summary
        self._local_sites: dict[str, tuple[dict, torch.Size]] = {}
        self._given_model = (model,)  # before AutoContinuous wraps it with init_loc_fn; not a submodule
        super().__init__(model, init_loc_fn=init_loc_fn)
        self.create_plates = create_plates

    def __getstate__(self) -> dict:
        state = super().__getstate__()  # Pyro's AutoGuide drops the model: it need not pickle
        state["_given_model"] = (None,)
        return state

    @property
    def path_gradient(self) -> bool:
        """Whether the guide's posteriors drop the score term from the ELBO's gradient."""
        return self._path_gradient

    def _setup_prototype(self, *args, **kwargs) -> None:
        super()._setup_prototype(*args, **kwargs)
        if self._amortised is not None:
            self._split_local_sites(self._amortised.plate)
        self._refuse_subsampled_locals()
        if self.latent_dim:
            self._setup_global_posterior(*args, **kwargs)
        if self._local_sites:
            self._setup_local_posterior(*args, **kwargs)

    def _setup_global_posterior(self, *args, **kwargs) -> None:
        init_loc = self._init_loc()
        if self._summary is None:
            self.loc = PyroParam(init_loc, constraint=constraints.real)
            self.scale = PyroParam(
                torch.full_like(init_loc, self._init_scale), constraint=self.scale_constraint
            )
            if self._base_covariance == "full":
                self.shear = PyroParam(
                    torch.eye(init_loc.shape[-1], dtype=init_loc.dtype, device=init_loc.device),
                    constraint=constraints.unit_lower_cholesky,
                )
            layers = flows.stack(self._flow_spec, self.latent_dim, self._num_flows, **self._flow_options)
            self.flow = layers.to(device=init_loc.device, dtype=init_loc.dtype)
        else:
            example = self._summary.inputs(*args, **kwargs)
            self.global_posterior = self._amortised_flow(self._summary, example, init_loc, items=False)

    def _setup_local_posterior(self, *args, **kwargs) -> None:
        spec = self._amortised
        per_item = [
            biject_to(site["fn"].support).inv(site["value"].detach()).reshape(site["value"].shape[0], -1)
            for site, _ in self._local_sites.values()
        ]
        init_loc = torch.cat(per_item, dim=-1).mean(0)
        example = self._encoder_inputs(spec, *args, **kwargs)[:8]
        self.local_posterior = self._amortised_flow(spec, example, init_loc, items=True)

    def _amortised_flow(self, spec, example: Tensor, init_loc: Tensor, *, items: bool) -> AmortisedFlow:
        owner = f"AutoFlowGuide({type(spec).__name__})"
        encoder = build_encoder(spec, example, items=items)
        if spec.encoder is None:
            encoder.to(device=init_loc.device, dtype=init_loc.dtype)
        with torch.no_grad():
            h = encoder(example)
        if not isinstance(h, Tensor) or h.dim() < 1 or h.dtype != init_loc.dtype:
            got = f"{h.dtype} {tuple(h.shape)}" if isinstance(h, Tensor) else type(h).__name__
            raise ValueError(
                f"{owner}: the encoder must return a {init_loc.dtype} tensor of shape (..., H) for "
                f"inputs of shape {tuple(example.shape)}, got {got}; move it with "
                f"encoder.to({init_loc.dtype}) or fix its output"
            )
        guide_flow, guide_num_flows = (
            (self._flow_spec, self._num_flows)
            if self._named_flow
            else (DEFAULT_AMORTISED_FLOW, DEFAULT_NUM_FLOWS)
        )
        flow = spec.flow if spec.flow is not None else guide_flow
        if not isinstance(flow, str) and callable(flow):
            raise ValueError(f"{owner}: the guide's flow is a callable; give the amortised flow by name")
        num_flows = spec.num_flows if spec.num_flows is not None else guide_num_flows
        options = {**self._flow_options, **spec.flow_options}
        if num_flows:
            options = resolve_conditioning(flow, spec.conditioning, options)
        posterior = AmortisedFlow(
            encoder,
            h.shape[-1],
            init_loc,
            self._init_scale,
            flow,
            num_flows,
            head_init=spec.head_init,
            centred=spec.centred,
            path_gradient=self._path_gradient,
            **options,
        )
        for part in (posterior.base, posterior.layers):
            part.to(device=init_loc.device, dtype=init_loc.dtype)
        return posterior

    def _split_local_sites(self, plate: str) -> None:
        """Take the latents local to ``plate`` out of the packed global vector."""
        for name, site in list(self.prototype_trace.iter_stochastic_nodes()):
            frames = [f for f in site["cond_indep_stack"] if f.vectorized]
            if plate not in [f.name for f in frames]:
                continue
            batch_shape = site["fn"].batch_shape
            if len(frames) != 1 or frames[0].dim != -1 or len(batch_shape) != 1:
                raise ValueError(
                    f"AutoFlowGuide(amortised): latent site {name!r} must sit in plate {plate!r} alone, "
                    f"with the plate at dim=-1 and batch shape (items,); got plates "
                    f"{[(f.name, f.dim) for f in frames]} and batch shape {tuple(batch_shape)}. Declare "
                    f"per-item dimensions as event dimensions (.to_event) and the plate with dim=-1"
                )
            self._local_sites[name] = (site, self._unconstrained_shapes.pop(name)[1:])
            del self._cond_indep_stacks[name]
            self.prototype_trace.remove_node(name)
        if not self._local_sites:
            plates = sorted(self._prototype_frames)
            raise ValueError(
                f"AutoFlowGuide(amortised): no latent site of the model is in plate {plate!r}; "
                f"plates with latent sites: {plates or 'none'}"
            )
        self.latent_dim = sum(shape.numel() for shape in self._unconstrained_shapes.values())

    def _refuse_subsampled_locals(self) -> None:
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            for frame in site["cond_indep_stack"]:
                if frame.vectorized and frame.full_size is not None and frame.full_size != frame.size:
                    raise ValueError(
                        f"AutoFlowGuide: latent site {name!r} is local to the subsampled plate "
                        f"{frame.name!r} (subsample {frame.size} of {frame.full_size}); one flow over "
                        f"all latents would tie its values to minibatch positions. Amortise it "
                        f"(amortised=Amortised(plate={frame.name!r}, inputs=...): an encoder gives "
                        f"each data point its posterior), or hide the site with poutine.block and "
                        f"give it a guide of its own."
                    )

    def forward(self, *args, **kwargs) -> dict[str, Tensor]:
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        result = {}
        if self.latent_dim:
            latent = self.sample_latent(*args, **kwargs)
            for site, unconstrained in self._unpack_latent(latent):
                with ExitStack() as stack:
                    for frame in self._cond_indep_stacks[site["name"]]:
                        stack.enter_context(plates[frame.name])
                    result[site["name"]] = self._sample_site(site, unconstrained)
        if self._local_sites:
            inputs = self._encoder_inputs(self._amortised, *args, **kwargs)
            with plates[self._amortised.plate] as indices:
                posterior = self._registered("local_posterior")(self._rows_at(inputs, indices))
                latent = pyro.sample(
                    f"_{self._pyro_name}_local_latent", posterior, infer={"is_auxiliary": True}
                )
                for site, unconstrained in self._unpack_local(latent):
                    result[site["name"]] = self._sample_site(site, unconstrained)
        return result

    @staticmethod
    def _sample_site(site: dict, unconstrained: Tensor) -> Tensor:
        """Sample ``site`` at ``biject_to(support)(unconstrained)``, with the Jacobian as its density."""
        support = site["fn"].support
        event_dim = site["fn"].event_dim
        while isinstance(support, constraints.independent):
            support = support.base_constraint
        if support is constraints.real:  # the identity: no transform, no Jacobian
            return pyro.sample(site["name"], dist.Delta(unconstrained, event_dim=event_dim))
        transform = biject_to(site["fn"].support)
        value = transform(unconstrained)
        if poutine.get_mask() is False:
            log_density = 0.0
        else:
            log_density = transform.inv.log_abs_det_jacobian(value, unconstrained)
            log_density = sum_rightmost(log_density, log_density.dim() - value.dim() + event_dim)
        return pyro.sample(site["name"], dist.Delta(value, log_density=log_density, event_dim=event_dim))

    @staticmethod
    def _encoder_inputs(spec, *args, **kwargs) -> Tensor:
        inputs = spec.inputs(*args, **kwargs)
        if not isinstance(inputs, Tensor):
            raise TypeError(
                f"AutoFlowGuide({type(spec).__name__}): inputs(*args, **kwargs) must return a tensor, "
                f"got {type(inputs).__name__}"
            )
        return inputs

    def _create_plates(self, *args, **kwargs) -> dict[str, pyro.plate]:
        """The model's plates. The amortised plate subsamples as the model's did when ``inputs``
        returns the data set the guide was built on; for other rows (a minibatch argument of any
        size, or new data) it is a plate over exactly those items. Pass ``create_plates`` for
        anything else, as to Pyro's autoguides."""
        spec, frames = self._amortised, self._prototype_frames
        if spec is None or self.master is not None or self.create_plates is not None:
            return super()._create_plates(*args, **kwargs)
        frame = frames[spec.plate]
        items = self._encoder_inputs(spec, *args, **kwargs).shape[0]
        if frame.full_size not in (None, frame.size) and items == frame.full_size:
            return super()._create_plates(*args, **kwargs)
        frames[spec.plate] = frame._replace(size=items, full_size=items)
        try:
            return super()._create_plates(*args, **kwargs)
        finally:
            frames[spec.plate] = frame

    def _rows_at(self, inputs: Tensor, indices: Tensor) -> Tensor:
        """The encoder inputs of the items at ``indices``: ``inputs`` holds either those items or
        the whole plate."""
        if inputs.shape[0] == indices.shape[0]:
            return inputs
        frame = self._prototype_frames[self._amortised.plate]
        full_size = frame.full_size or frame.size
        if inputs.shape[0] != full_size:
            raise ValueError(
                f"AutoFlowGuide(Amortised): inputs has {inputs.shape[0]} rows, but plate "
                f"{frame.name!r} has {full_size} items (subsample {indices.shape[0]}); inputs must "
                f"return one row per item of the plate, or per item of the subsample"
            )
        return inputs.index_select(0, indices.to(inputs.device))

    def _unpack_local(self, latent: Tensor) -> Iterator[tuple[dict, Tensor]]:
        """``(site, unconstrained value)`` per local site from per-item latents ``(..., items, D)``."""
        pos = 0
        for site, event_shape in self._local_sites.values():
            size = event_shape.numel()
            yield site, latent[..., pos : pos + size].reshape(latent.shape[:-1] + event_shape)
            pos += size

    def get_base_dist(self) -> dist.Distribution:
        """The Gaussian that the guide is with identity layers."""
        if self._base_covariance == "full":
            return dist.MultivariateNormal(self.loc, scale_tril=self.scale.unsqueeze(-1) * self.shear)
        return dist.Normal(self.loc, self.scale).to_event(1)

    def get_posterior(self, *args, **kwargs) -> FlowDistribution:
        """The flow posterior over the packed unconstrained global latents."""
        if self._summary is not None:
            return self._posterior_given(self._encoder_inputs(self._summary, *args, **kwargs))
        shear = self.shear if self._base_covariance == "full" else None
        # loc, scale and shear are PyroParams held in their supports by their constraints; checking
        # them every step costs more than a flow layer (a NaN still reaches the loss, and fit()).
        return FlowDistribution(
            self.loc,
            self.scale,
            self._registered("flow"),
            shear=shear,
            standardised=shear is not None,
            path_gradient=self._path_gradient,
            validate_args=False,
        )

    def _posterior_given(self, summary_inputs: Tensor) -> FlowDistribution:
        """The global posterior conditioned on the data-set summary's ``inputs``."""
        return self._registered("global_posterior")(summary_inputs)

    def local_posterior_for(self, *args, **kwargs) -> FlowDistribution:
        """The amortised posterior of every item's packed unconstrained local latents, batch shape
        ``(items,)``, for the model's arguments (all rows that ``inputs`` returns)."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        if not self._local_sites:
            raise ValueError("AutoFlowGuide: this guide has no amortised local latents")
        with self._pyro_context:
            return self._registered("local_posterior")(self._encoder_inputs(self._amortised, *args, **kwargs))

    def _registered(self, name: str) -> torch.nn.Module:
        """Submodule ``name``, registered with Pyro's param store.

        ``self.<name>`` would register it without taking values loaded into the store (by
        ``ParamStore.load``); this registration copies those in. Not under JIT tracing, where
        the parameters are the trace's inputs.
        """
        module = self._modules[name]
        if self._pyro_context.active:
            full_name = self._pyro_get_fullname(name)
            if torch._C._get_tracing_state() is None:
                self._check_store_shapes(full_name, module)
                pyro.module(full_name, module, update_module_params=True)
            else:
                pyro.module(full_name, module)
        return module

    def _check_store_shapes(self, name: str, module: torch.nn.Module) -> None:
        store = pyro.get_param_store()
        for param_name, param in module.named_parameters():
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
        base distribution's centre maps to. For marginal medians use ``quantiles([0.5])``. Local
        latents get one value per item that ``inputs`` returns for these arguments.
        """
        result = {}
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        if self.latent_dim:
            result.update(
                self._constrain(self._unpack_latent(self._current_posterior(*args, **kwargs).median_point()))
            )
        if self._local_sites:
            result.update(
                self._constrain(self._unpack_local(self.local_posterior_for(*args, **kwargs).median_point()))
            )
        return result

    @torch.no_grad()
    def quantiles(self, quantiles: list[float] | Tensor, *args, num_samples: int = 4000, **kwargs) -> dict:
        """Marginal quantiles per site, estimated from ``num_samples`` draws of the flow."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        draws = {}
        if self.latent_dim:
            posterior = self._current_posterior(*args, **kwargs)
            draws.update(self._constrain(self._unpack_latent(posterior.rsample((num_samples,)))))
        if self._local_sites:
            posterior = self.local_posterior_for(*args, **kwargs)
            draws.update(self._constrain(self._unpack_local(posterior.rsample((num_samples,)))))
        like = next(iter(draws.values()))
        q = torch.as_tensor(quantiles, dtype=like.dtype, device=like.device)
        if q.dim() != 1 or not ((q >= 0) & (q <= 1)).all():
            raise ValueError(f"quantiles must be a list of numbers in [0, 1], got {quantiles!r}")
        return {name: torch.quantile(value, q, dim=0) for name, value in draws.items()}

    def _current_posterior(self, *args, **kwargs) -> FlowDistribution:
        """The global posterior with the param store's current values (also those loaded into it)."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        with self._pyro_context:
            return self.get_posterior(*args, **kwargs)

    @staticmethod
    def _constrain(pairs: Iterator[tuple[dict, Tensor]]) -> dict[str, Tensor]:
        return {site["name"]: biject_to(site["fn"].support)(unconstrained) for site, unconstrained in pairs}
