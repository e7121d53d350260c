"""Radial flow (Rezende & Mohamed 2015)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import ConditionalFlowModule, FlowModule, FlowTransform, RawParams


class RadialTransform(FlowTransform):
    r"""``y = z + β h(α, r)(z - z₀)`` with ``h = 1 / (α + r)``, ``r = ‖z - z₀‖``.

    ``α = softplus(α̃) > 0`` and ``β = softplus(β̃) - α > -α``, which makes the map invertible; at
    ``α̃ = β̃ = 0`` it is the identity (``β = 0``).
    ``log|det J| = (D - 1) log(1 + βh) + log(1 + βh - βhr/(α + r))``.
    The inverse is closed form: ``r`` solves ``r² + (α + β - r_y) r - α r_y = 0`` with ``r_y = ‖y - z₀‖``.

    Rezende & Mohamed, "Variational Inference with Normalizing Flows", ICML 2015, Appendix A.2.

    >>> import torch
    >>> t = RadialTransform({"z0": torch.zeros(2), "alpha": torch.zeros(1), "beta": torch.ones(1)}, dim=2)
    >>> z = torch.tensor([0.5, -1.0])
    >>> torch.allclose(t.inv(t(z)), z)
    True
    """

    @classmethod
    def param_shapes(cls, dim: int, **options: object) -> dict[str, tuple[int, ...]]:
        return {"z0": (dim,), "alpha": (1,), "beta": (1,)}

    @classmethod
    def initial_params(cls, dim: int, **options: object) -> dict[str, Tensor]:
        return {"z0": torch.randn(dim) / math.sqrt(dim), "alpha": torch.zeros(1), "beta": torch.zeros(1)}

    @classmethod
    def constrain(cls, raw: RawParams) -> tuple[Tensor, Tensor, Tensor]:
        """``(z₀, α, β)``."""
        alpha = F.softplus(raw["alpha"])
        return raw["z0"], alpha, F.softplus(raw["beta"]) - alpha

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z0, alpha, beta = self.constrained()
        diff = x - z0
        r = torch.linalg.vector_norm(diff, dim=-1, keepdim=True)  # one pass over (..., D)
        h = (alpha + r).reciprocal()
        beta_h = beta * h
        y = torch.addcmul(x, beta_h, diff)
        # 1 + βh + βh'r with h' = -h²: the derivative along the radius
        log_det = (self.dim - 1) * torch.log1p(beta_h) + torch.log1p(beta_h * alpha * h)
        return y, log_det.squeeze(-1)

    def inverse_map(self, y: Tensor) -> Tensor:
        z0, alpha, beta = self.constrained()
        diff = y - z0
        r_y = diff.norm(dim=-1, keepdim=True)
        c = alpha + beta - r_y
        root = torch.sqrt(c * c + 4 * alpha * r_y)
        # the positive root (root - c) / 2, written without cancellation for either sign of c
        r = torch.where(c > 0, 2 * alpha * r_y / (root + c), (root - c) / 2)
        return z0 + diff / (1 + beta / (alpha + r))


class Radial(FlowModule):
    """Learnable radial layer; see :class:`RadialTransform` for the map."""

    transform = RadialTransform


class ConditionalRadial(ConditionalFlowModule):
    """Radial layer whose ``z₀, α, β`` are an MLP's output for a context vector."""

    transform = RadialTransform
