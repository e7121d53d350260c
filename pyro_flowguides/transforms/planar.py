"""Planar flow (Rezende & Mohamed 2015)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import ConditionalFlowModule, FlowModule, FlowTransform, RawParams, scalar
from .numerical_inverse import solve_increasing

_SOFTPLUS_INV_ONE = math.log(math.e - 1)


class PlanarTransform(FlowTransform):
    r"""``y = z + û tanh(wᵀz + b)``, ``log|det J| = log(1 + ûᵀw · tanh'(wᵀz + b))``.

    Invertible because ``û = u + (m(wᵀu) - wᵀu) w / ‖w‖²`` with ``m(s) = -1 + softplus(s + log(e - 1))``
    makes ``ûᵀw > -1`` (and ``û = u`` when ``wᵀu = 0``). The inverse solves the scalar equation
    ``wᵀy = a + ûᵀw tanh(a + b)`` for ``a = wᵀz``, then ``z = y - û tanh(a + b)``. Cost O(D).

    Rezende & Mohamed, "Variational Inference with Normalizing Flows", ICML 2015, Appendix A.1.

    >>> import torch
    >>> t = PlanarTransform({"u": torch.ones(2), "w": torch.ones(2), "b": torch.zeros(1)}, dim=2)
    >>> z = torch.tensor([0.5, -1.0])
    >>> torch.allclose(t.inv(t(z)), z)
    True
    """

    @classmethod
    def param_shapes(cls, dim: int, **options: object) -> dict[str, tuple[int, ...]]:
        return {"u": (dim,), "w": (dim,), "b": (1,)}

    @classmethod
    def initial_params(cls, dim: int, **options: object) -> dict[str, Tensor]:
        return {"u": torch.zeros(dim), "w": torch.randn(dim) / math.sqrt(dim), "b": torch.zeros(1)}

    @classmethod
    def constrain(cls, raw: RawParams) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(û, w, b, ûᵀw, 1 + ûᵀw)``; ``1 + ûᵀw = softplus(·)`` without cancellation."""
        u, w, b = raw["u"], raw["w"], raw["b"]
        wu = (w * u).sum(-1, keepdim=True)
        one_plus_wu_hat = F.softplus(wu + scalar(_SOFTPLUS_INV_ONE, wu.dtype))
        wu_hat = one_plus_wu_hat - scalar(1.0, wu.dtype)
        w_sq = (w * w).sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
        u_hat = u + w * ((wu_hat - wu) / w_sq)
        return u_hat, w, b, wu_hat, one_plus_wu_hat

    def forward_and_log_det_input(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``y`` and ``tanh(wᵀx + b)`` (shape ``(..., 1)``), from which :meth:`log_det_terms` gives the
        log-det; a stack runs its layers first and computes all their log-dets in one call."""
        return self._map(x, self.constrained())

    @staticmethod
    def _map(x: Tensor, constrained: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        u_hat, w, b, _, _ = constrained
        act = torch.tanh(torch.linalg.vecdot(x, w).unsqueeze(-1) + b)
        return x + u_hat * act, act

    @staticmethod
    def _slope(wu_hat: Tensor, one_plus_wu_hat: Tensor, act: Tensor) -> Tensor:
        """``1 + ûᵀw (1 - act²)`` as ``(1 + ûᵀw) - ûᵀw act²``: ``1 + ûᵀw`` would round to zero where
        ``ûᵀw`` is near -1."""
        return one_plus_wu_hat - wu_hat * act.square()

    @classmethod
    def log_det_terms(cls, constrained: tuple[Tensor, ...], act: Tensor) -> Tensor:
        """``log(1 + ûᵀw (1 - act²))`` elementwise: one layer's ``act`` ``(..., 1)`` with its
        parameters, or a stack's ``(..., K, 1)`` with its stacked parameters."""
        _, _, _, wu_hat, one_plus_wu_hat = constrained
        return torch.log(cls._slope(wu_hat, one_plus_wu_hat, act))

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        constrained = self.constrained()  # computed once: a layer outside a stack constrains per call
        y, act = self._map(x, constrained)
        return y, self.log_det_terms(constrained, act).squeeze(-1)

    def inverse_map(self, y: Tensor) -> Tensor:
        u_hat, w, b, wu_hat, one_plus_wu_hat = self.constrained()
        target = torch.linalg.vecdot(y, w).unsqueeze(-1)

        def reduced(a: Tensor) -> tuple[Tensor, Tensor]:
            act = torch.tanh(a + b)
            return a + wu_hat * act, self._slope(wu_hat, one_plus_wu_hat, act)

        reach = wu_hat.abs()
        a = solve_increasing(reduced, target, target - reach, target + reach)
        return y - u_hat * torch.tanh(a + b)


class Planar(FlowModule):
    """Learnable planar layer; see :class:`PlanarTransform` for the map.

    >>> import torch
    >>> layer = Planar(3)
    >>> layer(torch.zeros(5, 3)).shape
    torch.Size([5, 3])
    """

    transform = PlanarTransform


class ConditionalPlanar(ConditionalFlowModule):
    """Planar layer whose ``u, w, b`` are an MLP's output for a context vector.

    >>> import torch
    >>> layer = ConditionalPlanar(3, context_dim=4)
    >>> layer.condition(torch.randn(5, 4))(torch.zeros(5, 3)).shape
    torch.Size([5, 3])
    """

    transform = PlanarTransform
