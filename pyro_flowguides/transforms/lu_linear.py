"""Invertible linear layer in LU form (Kingma & Dhariwal 2018, Glow)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from .base import ConditionalFlowModule, FlowModule, FlowTransform


def _matvec(mat: Tensor, vec: Tensor) -> Tensor:
    """``mat @ vec`` for batched ``mat`` (one matrix per context), broadcasting against ``vec``."""
    return (mat @ vec.unsqueeze(-1)).squeeze(-1)


class LULinearTransform(FlowTransform):
    r"""``y = L diag(d) U z + β``; ``log|det J| = Σ_i log d_i`` (independent of ``z``).

    ``L`` is unit lower and ``U`` unit upper triangular: Glow's ``W = P L (U' + diag(s))`` with
    ``U' + diag(s) = diag(d) U``. One raw ``D x D`` matrix ``R`` holds everything: ``L_ij = c tanh(R_ij)``
    below the diagonal, ``U_ij = c tanh(R_ij)`` above it (``c = max_shear = 0.5``) and
    ``log d_i = s tanh(R_ii / s)`` (``s = max_log_scale = 3``), so ``d > 0`` and ``det W > 0`` always.
    The bounds keep ``W`` well conditioned at any raw value, ``cond(W) <= e^{2s} (D² (1 + c)^{D-1})²``
    (``|(L⁻¹)_ij| <= (1 + c)^{D-1}``), so the inverse stays accurate in float32 (without them a
    conditioner's output easily gives ``cond(W) ~ 1e15``); a stack composes larger scales and shears.
    The inverse is two triangular solves and a division. Glow's permutation ``P`` is the
    identity: a fixed permutation is a stack-level choice (put a
    :class:`~pyro_flowguides.transforms.permutation.Reverse` beside this layer), and products of
    such ``W`` reach every matrix with positive determinant. All-zero raw values give the identity.
    Cost O(D²) per sample; without a context it is two matmuls (or one, with ``W`` formed, when
    there are more samples than coordinates).

    Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", NeurIPS 2018, Sec. 3.2.

    >>> import torch
    >>> raw = torch.tensor([[0.0, 2.0], [-3.0, 0.5]])
    >>> t = LULinearTransform({"lu": raw, "bias": torch.zeros(2)}, dim=2)
    >>> z = torch.tensor([1.0, -1.0])
    >>> torch.allclose(t.inv(t(z).clone()), z)
    True
    """

    #: Bound on ``|log d_i|``.
    max_log_scale: ClassVar[float] = 3.0
    #: Bound on the off-diagonal entries of ``L`` and ``U``.
    max_shear: ClassVar[float] = 0.5

    @classmethod
    def param_shapes(cls, dim: int, **options: object) -> dict[str, tuple[int, ...]]:
        return {"lu": (dim, dim), "bias": (dim,)}

    @classmethod
    def initial_params(cls, dim: int, **options: object) -> dict[str, Tensor]:
        return {"lu": torch.zeros(dim, dim), "bias": torch.zeros(dim)}

    def factors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(T, log d, d, β)``: ``T = tanh(R)`` holds ``L - I`` below and ``U - I`` above its diagonal."""
        p = self.raw_params()
        lu = p["lu"]
        s = self.max_log_scale
        log_d = s * torch.tanh(lu.diagonal(dim1=-2, dim2=-1) / s)
        return self.max_shear * torch.tanh(lu), log_d, torch.exp(log_d), p["bias"]

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        t, log_d, d, bias = self.factors()
        lower, upper = t.tril(-1), t.triu(1)
        if t.dim() == 2:  # one W for all inputs: plain matmuls
            if x.numel() > t.shape[-1] ** 2:  # more samples than coordinates: form W once
                eye = torch.eye(t.shape[-1], dtype=t.dtype, device=t.device)
                weight = ((lower + eye) * d) @ (upper + eye)
                y = x @ weight.mT + bias
            else:
                h = (x + x @ upper.mT) * d
                y = h + h @ lower.mT + bias
        else:
            h = (x + _matvec(upper, x)) * d
            y = h + _matvec(lower, h) + bias
        return y, log_d.sum(-1).expand(y.shape[:-1])

    def inverse_map(self, y: Tensor) -> Tensor:
        t, _, d, bias = self.factors()
        h = y - bias
        if t.dim() == 2:
            flat = h.reshape(-1, h.shape[-1])
            # rows: X Lᵀ = H, then Z Uᵀ = X / d (solve_triangular reads the strict triangles only)
            flat = torch.linalg.solve_triangular(t.mT, flat, upper=True, left=False, unitriangular=True)
            flat = torch.linalg.solve_triangular(t.mT, flat / d, upper=False, left=False, unitriangular=True)
            return flat.reshape(h.shape)
        h = torch.linalg.solve_triangular(t, h.unsqueeze(-1), upper=False, unitriangular=True)
        h = torch.linalg.solve_triangular(t, h / d.unsqueeze(-1), upper=True, unitriangular=True)
        return h.squeeze(-1)


class LULinear(FlowModule):
    """Learnable LU-parameterised linear layer; see :class:`LULinearTransform` for the map.

    >>> import torch
    >>> layer = LULinear(3)
    >>> x = torch.randn(5, 3)
    >>> torch.allclose(layer(x), x)  # the identity at the start
    True
    """

    transform = LULinearTransform


class ConditionalLULinear(ConditionalFlowModule):
    """LU linear layer whose ``L, d, U, β`` are an MLP's output for a context vector.

    >>> import torch
    >>> layer = ConditionalLULinear(3, context_dim=4)
    >>> layer.condition(torch.randn(5, 4))(torch.zeros(5, 3)).shape
    torch.Size([5, 3])
    """

    transform = LULinearTransform
