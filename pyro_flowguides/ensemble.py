r"""Ensembles of flow guides: the equal mixture of ``M`` independently trained posteriors.

Trainings of one flow from different seeds can miss the posterior in different directions: on
amortised eight schools a training tended to shift the means one way (one seed put all ten too
high, by up to 0.25 posterior sd; another nine of ten too low), and the direction changed from
seed to seed. Their equal mixture
``q(z) = (1/M) Σ_m q_m(z)`` averages such errors out, and it is still a density: its importance
weights ``p(x, z) / q(z)``, and so Pareto k-hat, PSIS and the importance-weighted bounds, are
exact for it (``docs/amortisation_datasets.md``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from pyro.distributions import TorchDistribution
from pyro.nn.module import PyroModuleList
from torch import Tensor
from torch.distributions import constraints

from .guide import AutoFlowGuide, init_to_feasible_point

_NO_SAMPLE_DIMS = torch.Size()


class EqualMixture(TorchDistribution):
    r"""``q(z) = (1/M) Σ_m q_m(z)``: the equal-weight mixture of ``M`` distributions over the same
    real vectors (flows with different layers, which ``MixtureSameFamily`` cannot hold).

    ``rsample`` draws from every component and keeps, for each draw and batch element, the draw of
    a uniformly chosen component: ``M`` times one component's cost. The choice has no parameters,
    so a draw is reparameterised given it and gradients of expectations stay unbiased.
    ``log_prob(z) = logsumexp_m log q_m(z) - log M`` scores ``z`` under every component (a flow
    inverts its layers).

    >>> import torch, pyro.distributions as dist
    >>> left = dist.Normal(-torch.ones(2), 1.0).to_event(1)
    >>> right = dist.Normal(torch.ones(2), 1.0).to_event(1)
    >>> q, z = EqualMixture([left, right]), torch.tensor([0.5, -2.0])
    >>> density = (left.log_prob(z).exp() + right.log_prob(z).exp()) / 2
    >>> q.rsample((5,)).shape, torch.allclose(q.log_prob(z), density.log())
    (torch.Size([5, 2]), True)
    """

    arg_constraints: ClassVar[dict] = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, components: Sequence[TorchDistribution], validate_args: bool | None = None) -> None:
        self.components = list(components)
        if not self.components:
            raise ValueError("EqualMixture: give at least one component distribution")
        event_shapes = {component.event_shape for component in self.components}
        if len(event_shapes) != 1 or len(next(iter(event_shapes))) != 1:
            raise ValueError(
                f"EqualMixture: every component must be a distribution over vectors of one size, got "
                f"event shapes {sorted(tuple(shape) for shape in event_shapes)}"
            )
        batch_shape = torch.broadcast_shapes(*(component.batch_shape for component in self.components))
        super().__init__(batch_shape, next(iter(event_shapes)), validate_args=validate_args)

    def expand(self, batch_shape: torch.Size, _instance: EqualMixture | None = None) -> EqualMixture:
        return EqualMixture([component.expand(batch_shape) for component in self.components])

    def rsample(self, sample_shape: torch.Size = _NO_SAMPLE_DIMS) -> Tensor:
        shape = self._extended_shape(sample_shape)
        draws = torch.stack(
            [component.expand(self.batch_shape).rsample(sample_shape) for component in self.components]
        )
        choice = torch.randint(len(self.components), (1, *shape[:-1], 1), device=draws.device)
        return draws.gather(0, choice.expand((1, *shape))).squeeze(0)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        log_q = torch.stack([component.log_prob(value) for component in self.components])
        return log_q.logsumexp(0) - math.log(len(self.components))


class AutoFlowEnsemble(AutoFlowGuide):
    r"""The equal mixture of ``M`` flow guides of one model, ``q(z) = (1/M) Σ_m q_m(z)``, each
    trained on its own; with data-set summaries, ``q(z | x) = (1/M) Σ_m q_m(z | x)``.

    Build the members (unused), make the ensemble, then train each member alone, with its own
    seed: ``fit(model, ensemble.members[m], ...)``. The ensemble names its members' parameters
    (``AutoFlowEnsemble.members.<m>.…``), so they never share a name in Pyro's param store, and a
    store saved from the trainings (in one process or several) loads into an ensemble built the
    same way. The ensemble is then a guide like any other: ``draw_posterior``, ``diagnose``
    (Pareto k-hat of the mixture's own density), ``draw_for_datasets``,
    ``simulation_based_calibration`` and ``Predictive`` take it as they take one member. A draw
    costs ``M`` members' draws, its log-density ``M`` passes through the layers' inverses.

    Members may be plain guides (one data set) or conditioned on a data-set summary, all alike;
    amortised local latents are not supported. With summaries the members read the first
    member's ``inputs``: the inputs of every member must agree (checked on the first data set).
    Fitting the ensemble itself (``fit(model, ensemble, ...)``) trains the mixture as one
    variational family, a different objective from independent trainings.

    :param members: ``AutoFlowGuide`` instances of one model, not yet run.

    >>> import pyro, pyro.distributions as dist
    >>> pyro.clear_param_store()
    >>> def model():
    ...     pyro.sample("x", dist.Normal(0.0, 1.0))
    >>> ensemble = AutoFlowEnsemble([AutoFlowGuide(model, "planar", 2) for _ in range(3)])
    >>> sorted(ensemble())
    ['x']
    >>> [name for name in pyro.get_param_store() if name.endswith(".loc")]  # doctest: +NORMALIZE_WHITESPACE
    ['AutoFlowEnsemble.members.0.loc', 'AutoFlowEnsemble.members.1.loc',
     'AutoFlowEnsemble.members.2.loc']
    """

    def __init__(self, members: Sequence[AutoFlowGuide]) -> None:
        members = list(members)
        if not members:
            raise ValueError("AutoFlowEnsemble: give at least one member guide")
        first = members[0]
        for i, member in enumerate(members):
            if not isinstance(member, AutoFlowGuide) or isinstance(member, AutoFlowEnsemble):
                raise TypeError(
                    f"AutoFlowEnsemble: member {i} is a {type(member).__name__}, not an AutoFlowGuide"
                )
            if member.prototype_trace is not None or member._pyro_context.used:
                raise ValueError(
                    f"AutoFlowEnsemble: member {i} has already run, under its own parameter names. Build "
                    f"the members, make the ensemble, then train each as ensemble.members[m]: its "
                    f"parameters are then named AutoFlowEnsemble.members.<m>.…"
                )
            if member._given_model[0] is not first._given_model[0]:
                raise ValueError(f"AutoFlowEnsemble: member {i} guides another model than member 0")
            if member._amortised is not None:
                raise ValueError(
                    f"AutoFlowEnsemble: member {i} amortises local latents (Amortised(...)), which an "
                    f"ensemble does not support; use members with global latents only"
                )
            if (member._summary is None) != (first._summary is None):
                raise ValueError(
                    f"AutoFlowEnsemble: member {i} has {_conditioning(member)} and member 0 has "
                    f"{_conditioning(first)}; the members must be conditioned alike"
                )
        super().__init__(
            first._given_model[0],
            summary=first._summary,
            init_loc_fn=init_to_feasible_point,  # the ensemble has no parameters to initialise
            create_plates=first.create_plates,
        )
        self.members = PyroModuleList(members)

    def _setup_global_posterior(self, *args, **kwargs) -> None:
        if self._summary is not None:
            inputs = self._encoder_inputs(self._summary, *args, **kwargs)
        for i, member in enumerate(self.members):
            if member.prototype_trace is None:
                member._setup_prototype(*args, **kwargs)
            if list(member._unconstrained_shapes.items()) != list(self._unconstrained_shapes.items()):
                raise ValueError(
                    f"AutoFlowEnsemble: member {i} packs the latents as "
                    f"{dict(member._unconstrained_shapes)}, the model as {dict(self._unconstrained_shapes)}; "
                    f"were the members set up on other arguments?"
                )
            if self._summary is not None and not torch.equal(
                member._encoder_inputs(member._summary, *args, **kwargs), inputs
            ):
                raise ValueError(
                    f"AutoFlowEnsemble: member {i}'s DataSummary inputs differ from member 0's on the same "
                    f"data set; the ensemble gives every member member 0's inputs, so build the members "
                    f"with the same inputs function"
                )
        owners: dict[int, int] = {}
        for i, member in enumerate(self.members):
            for parameter in member.parameters():
                if owners.setdefault(id(parameter), i) != i:
                    raise ValueError(
                        f"AutoFlowEnsemble: members {owners[id(parameter)]} and {i} share a parameter (an "
                        f"encoder module given to both DataSummary specifications?); the members must be "
                        f"trained independently: give each its own encoder"
                    )

    def get_posterior(self, *args, **kwargs) -> EqualMixture:
        """The equal mixture of the members' posteriors over the packed unconstrained latents."""
        if self._summary is None:
            return EqualMixture([member.get_posterior(*args, **kwargs) for member in self.members])
        inputs = self._encoder_inputs(self._summary, *args, **kwargs)
        return EqualMixture([member._posterior_given(inputs) for member in self.members])

    @torch.no_grad()
    def median(self, *args, num_samples: int = 4000, **kwargs) -> dict[str, Tensor]:
        """Marginal medians per site, from ``num_samples`` draws of the mixture (which, unlike one
        flow, has no single image of its base distribution's centre)."""
        quantiles = self.quantiles([0.5], *args, num_samples=num_samples, **kwargs)
        return {name: value[0] for name, value in quantiles.items()}


def _conditioning(guide: AutoFlowGuide) -> str:
    return "no data-set summary" if guide._summary is None else "a data-set summary"
