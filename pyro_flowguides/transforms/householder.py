"""Householder flow (Tomczak & Welling 2016): a product of reflections, volume-preserving."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from .base import ConditionalFlowModule, FlowModule, FlowTransform, check_positive_int

_LAYER = "Householder"


def _matvec(mat: Tensor, vec: Tensor) -> Tensor:
    """``mat @ vec`` over the last dimension, broadcasting ``mat``'s batch dims against ``vec``'s."""
    if mat.dim() == 2:  # one parameter set for all inputs: a plain matmul
        return vec @ mat.mT
    return (mat @ vec.unsqueeze(-1)).squeeze(-1)


class HouseholderTransform(FlowTransform):
    r"""``y = H_K ⋯ H_1 z`` with reflections ``H_k = I - 2 v_k v_kᵀ / ‖v_k‖²``; ``log|det J| = 0``.

    Orthogonal, so volume-preserving (the log-determinant is exactly zero) and its inverse is
    ``H_1 ⋯ H_K``. The product is applied in compact WY form, ``H_K ⋯ H_1 = I - Vᵀ Tᵀ V`` with the
    unit vectors as the rows of ``V`` and ``T⁻¹ = ½ I + striu(V Vᵀ)`` (the UT transform,
    Joffrain et al. 2006): two ``N x D x K`` matmuls per call, O(DK) per sample, plus O(K²D) once;
    no ``D x D`` matrix is formed. Option ``num_reflections`` is ``K >= 1`` (default 4; any orthogonal
    map of ``R^D`` is a product of at most ``D`` reflections, so ``K > D`` adds nothing). The initial
    vectors come in equal pairs, ``v_{2j} = v_{2j+1}``, so an even ``K`` starts at the identity
    (an odd ``K`` cannot: its determinant is ``-1``); a zero ``v_k`` acts as the identity.

    Tomczak & Welling, "Improving Variational Auto-Encoders using Householder Flow", 2016
    (arXiv:1611.09630).

    >>> import torch
    >>> t = HouseholderTransform({"v": torch.tensor([[1.0, 0.0], [1.0, 1.0]])}, dim=2)
    >>> z = torch.tensor([1.0, 2.0])
    >>> y = t(z)
    >>> torch.allclose(y, torch.tensor([-2.0, 1.0]))  # reflect in the y-axis, then in the line y = -x
    True
    >>> t.log_abs_det_jacobian(z, y)
    tensor(0.)
    """

    volume_preserving = True
    option_defaults: ClassVar[dict[str, object]] = {"num_reflections": 4}

    @classmethod
    def param_shapes(cls, dim: int, **options: object) -> dict[str, tuple[int, ...]]:
        k = check_positive_int(options.get("num_reflections", 4), "num_reflections", _LAYER)
        return {"v": (k, dim)}

    @classmethod
    def initial_params(cls, dim: int, **options: object) -> dict[str, Tensor]:
        k = cls.param_shapes(dim, **options)["v"][0]
        pairs = torch.randn((k + 1) // 2, dim) / math.sqrt(dim)
        return {"v": pairs.repeat_interleave(2, dim=0)[:k]}

    def compact_form(self) -> tuple[Tensor, Tensor]:
        """``(V, C)`` with ``H_K ⋯ H_1 = I - Cᵀ V`` (rows of ``V``: the unit vectors; ``C = T V``)."""
        v = self.raw_params()["v"]
        u = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)
        eye = torch.eye(u.shape[-2], dtype=u.dtype, device=u.device)
        # UT transform: H_1 ⋯ H_K = I - Vᵀ T V with T⁻¹ = ½ I + striu(V Vᵀ); transposed, ours
        t_inv = (u @ u.mT).triu(1) + 0.5 * eye
        return u, torch.linalg.solve_triangular(t_inv, u, upper=True)

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        u, c = self.compact_form()
        y = x - _matvec(c.mT, _matvec(u, x))
        return y, y.new_zeros(y.shape[:-1])

    def inverse_map(self, y: Tensor) -> Tensor:
        u, c = self.compact_form()
        return y - _matvec(u.mT, _matvec(c, y))


class Householder(FlowModule):
    """Learnable Householder layer; see :class:`HouseholderTransform` for the map.

    >>> import torch
    >>> layer = Householder(3, num_reflections=2)
    >>> torch.allclose(layer(torch.ones(5, 3)), torch.ones(5, 3))  # equal pairs: identity at start
    True
    """

    transform = HouseholderTransform


class ConditionalHouseholder(ConditionalFlowModule):
    """Householder layer whose vectors ``v_k`` are an MLP's output for a context vector.

    >>> import torch
    >>> layer = ConditionalHouseholder(3, context_dim=4)
    >>> layer.condition(torch.randn(5, 4))(torch.zeros(5, 3)).shape
    torch.Size([5, 3])
    """

    transform = HouseholderTransform
