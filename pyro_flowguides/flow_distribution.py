"""A flow posterior ``loc + f(scale ⊙ U ε)`` (or ``loc + scale ⊙ f(U ε)``), sampled and scored in one pass."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from pyro.distributions import TorchDistribution
from pyro.distributions.conditional import ConditionalTransformModule
from torch import Tensor
from torch.distributions import Transform, constraints

from .transforms.base import scalar

_HALF_LOG_TWO_PI = 0.5 * math.log(2 * math.pi)
_NO_SAMPLE_DIMS = torch.Size()


class FlowDistribution(TorchDistribution):
    r"""``z = loc + f_K ∘ … ∘ f_1(scale ⊙ U ε)``, ``ε ~ N(0, I)``, with density
    ``log q(z) = log N(ε; 0, I) - Σ log scale - Σ_k log|det ∂f_k/∂x_{k-1}|``;
    ``standardised=True`` gives ``z = loc + scale ⊙ f_K ∘ … ∘ f_1(U ε)`` with the same density.

    ``U`` (``shear``) is unit lower triangular (``det U = 1``), the identity when not given; with
    identity layers ``z ~ N(loc, diag(scale) U Uᵀ diag(scale))``, Pyro's ``AutoMultivariateNormal``.

    By default the layers act on the *centred* variable ``scale ⊙ U ε``, where layers with
    structure at the origin (radial centres, planar hyperplanes, Householder reflections) start in
    the middle of the mass whatever ``loc`` is. Standardised, they act on a unit-scale variable and
    ``scale`` comes last: a layer that mixes coordinates then mixes comparable scales, whatever the
    posterior's scales are (one of 1e-3 and one of 0.1 mixed by a rotation makes the small one's
    marginal a hundred times too wide), and a step of the layers' parameters moves ``z`` by an
    amount proportional to ``scale``.

    ``rsample`` computes the sample and its log-density together and keeps the log-density, so
    ``log_prob`` of the value just drawn costs nothing; ``log_prob`` of any other point inverts
    the layers (every layer of this library has an inverse). Conditional layers are conditioned
    on ``context`` first.

    ``path_gradient=True`` is "sticking the landing" (Roeder et al. 2017): ``log_prob`` of a value
    just drawn keeps its value, but its gradient reaches the parameters only through the value,
    ``∇_θ log q_θ'(z_θ)`` at ``θ' = θ``. The dropped score term has expectation zero, so the ELBO's
    gradient stays unbiased; where ``q`` equals the posterior it is zero for every draw, so the
    gradient noise vanishes as ``q`` approaches it. The score term is computed through the inverse
    at the detached draw and subtracted, which costs a pass through the inverse and its backward
    pass (IAF: ``D`` sequential network passes). It is for the ELBO
    (``Trace_ELBO`` and its variants): with importance-weighted objectives such as ``RenyiELBO``
    the same estimator is biased (Tucker et al. 2019).

    >>> import torch
    >>> from pyro_flowguides import flows
    >>> q = FlowDistribution(torch.zeros(2), torch.ones(2), flows.stack("planar", 2, num_flows=2))
    >>> z = q.rsample((3,))
    >>> torch.allclose(q.log_prob(z), q.log_prob(z.clone()))
    True
    """

    arg_constraints: ClassVar[dict] = {
        "loc": constraints.real_vector,
        "scale": constraints.independent(constraints.positive, 1),
    }
    support = constraints.real_vector
    has_rsample = True

    def __init__(
        self,
        loc: Tensor,
        scale: Tensor,
        layers: Sequence[Transform | ConditionalTransformModule],
        context: Tensor | None = None,
        *,
        shear: Tensor | None = None,
        standardised: bool = False,
        path_gradient: bool = False,
        validate_args: bool | None = None,
    ) -> None:
        self.loc, self.scale = torch.broadcast_tensors(loc, scale)
        self.shear, self.standardised, self.path_gradient = shear, standardised, path_gradient
        if context is not None:
            layers = [
                layer.condition(context) if isinstance(layer, ConditionalTransformModule) else layer
                for layer in layers
            ]
        self.layers = list(layers)
        self._drawn: tuple[Tensor, Tensor] | None = None
        batch_shape, event_shape = self.loc.shape[:-1], self.loc.shape[-1:]
        super().__init__(batch_shape, event_shape, validate_args=validate_args)

    def expand(self, batch_shape: torch.Size, _instance: FlowDistribution | None = None) -> FlowDistribution:
        batch_shape = torch.Size(batch_shape)
        shape = batch_shape + self.event_shape
        loc, scale = self.loc.expand(shape), self.scale.expand(shape)
        return FlowDistribution(  # checked when built
            loc,
            scale,
            self.layers,
            shear=self.shear,
            standardised=self.standardised,
            path_gradient=self.path_gradient,
            validate_args=False,
        )

    def _base_log_prob(self, eps: Tensor) -> Tensor:
        """``log N(ε; 0, I) - Σ log scale``: the standard normal and the final affine map's Jacobian."""
        return -(0.5 * eps * eps + self.scale.log() + _HALF_LOG_TWO_PI).sum(-1)

    def rsample(self, sample_shape: torch.Size = _NO_SAMPLE_DIMS) -> Tensor:
        shape = self._extended_shape(sample_shape)
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        # the same as _base_log_prob(eps), with the constant ε terms kept out of the autograd graph
        dtype = eps.dtype
        log_normal = eps.square().sum(-1) * scalar(-0.5, dtype) - scalar(_HALF_LOG_TWO_PI * shape[-1], dtype)
        x = eps if self.shear is None else eps @ self.shear.mT
        x, log_q = self._scaled(x, first=True), log_normal - self.scale.log().sum(-1)
        for layer in self.layers:
            x_next = layer(x)
            log_q = log_q - layer.log_abs_det_jacobian(x, x_next)
            x = x_next
        z = self.loc + self._scaled(x, first=False)
        self._drawn = (z, log_q)
        return z

    def log_prob(self, value: Tensor) -> Tensor:
        if self._drawn is not None and value is self._drawn[0]:
            log_q = self._drawn[1]
            if not (self.path_gradient and torch.is_grad_enabled()):
                return log_q
            # d/dθ log q_θ(z_θ) = ∂_θ log q_θ(z)|_z (the score) + ∂_z log q_θ(z) dz/dθ (the path);
            # the score through the inverse at the detached draw, subtracted: the value as drawn
            score = self._inverse_log_prob(value.detach())
            return log_q - (score - score.detach())
        if self._validate_args:
            self._validate_sample(value)
        return self._inverse_log_prob(value)

    def _inverse_log_prob(self, value: Tensor) -> Tensor:
        x, log_det = value - self.loc, value.new_zeros(())
        if self.standardised:
            x = x / self.scale
        for layer in reversed(self.layers):
            x_prev = layer.inv(x)
            log_det = log_det + layer.log_abs_det_jacobian(x_prev, x)
            x = x_prev
        if not self.standardised:
            x = x / self.scale
        if self.shear is not None:  # ε Uᵀ = x
            flat = x.reshape(-1, x.shape[-1])
            flat = torch.linalg.solve_triangular(
                self.shear.mT, flat, upper=True, left=False, unitriangular=True
            )
            x = flat.reshape(x.shape)
        return self._base_log_prob(x) - log_det

    def _scaled(self, x: Tensor, *, first: bool) -> Tensor:
        """``scale ⊙ x`` before the layers (``first``), or after them when standardised."""
        return self.scale * x if first != self.standardised else x

    def median_point(self) -> Tensor:
        """``loc + f(0)`` (``loc + scale ⊙ f(0)`` standardised): the image of the base's centre."""
        x = torch.zeros_like(self.loc)
        for layer in self.layers:
            x = layer(x)
        return self.loc + self._scaled(x, first=False)
