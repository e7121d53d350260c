"""Generalized planar flow: a planar layer with an ``M``-dimensional bottleneck."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from .base import ConditionalFlowModule, FlowModule, FlowTransform, RawParams, check_positive_int
from .numerical_inverse import solve_increasing

_LAYER = "GeneralizedPlanar"
_DEFAULT_BOTTLENECK = 8


def _matvec(mat: Tensor, vec: Tensor) -> Tensor:
    """``mat @ vec`` over the last dimension, broadcasting ``mat``'s batch dims against ``vec``'s."""
    if mat.dim() == 2:  # one parameter set for all inputs: a plain matmul
        return vec @ mat.mT
    return (mat @ vec.unsqueeze(-1)).squeeze(-1)


def _spectral_norm(mat: Tensor) -> Tensor:
    """Largest singular value of each ``M x M`` matrix (``|k|`` when ``M = 1``)."""
    if mat.shape[-1] == 1:
        return mat[..., 0, 0].abs()
    return torch.linalg.matrix_norm(mat, ord=2)


def _newton_step(k: Tensor, deriv: Tensor, residual: Tensor) -> Tensor:
    """``(I + K diag(h'))⁻¹ r``: the Newton step for ``v + K h(v) = c``."""
    if k.shape[-1] == 1:
        return residual / (1 + k[..., 0] * deriv)
    eye = torch.eye(k.shape[-1], dtype=k.dtype, device=k.device)
    jac = eye + k * deriv.unsqueeze(-2)
    return torch.linalg.solve(jac, residual.unsqueeze(-1)).squeeze(-1)


class GeneralizedPlanarTransform(FlowTransform):
    r"""``y = z + A tanh(Bz + b)`` with ``A ∈ R^{D×M}``, ``B ∈ R^{M×D}``, ``b ∈ R^M``.

    By Sylvester's determinant identity ``log|det J| = log det(I_M + diag(h'(v)) K)`` with
    ``v = Bz + b`` and ``K = BA``: one ``M x M`` determinant per sample, never a ``D x D`` one;
    ``K`` is formed once per call (O(DM²)). Option ``bottleneck`` is ``M`` (``1 <= M <= D``; the
    default ``None`` means ``min(D, 8)``); ``M = 1`` is the planar flow without its ``ûᵀw`` trick.

    **Invertibility.** ``A = Ã · min(1, c / ‖BÃ‖₂)`` with ``c = 0.99`` (spectral-norm clipping of the
    raw ``Ã``), so ``‖K‖₂ <= c < 1``. Then ``v ↦ v + K tanh(v)`` is a bijection of ``R^M``
    (``K tanh`` is a ``c``-contraction, Banach), and so is the layer: if ``y = f(z)`` then ``v = Bz + b``
    solves ``v + K tanh(v) = By + b`` (apply ``B``), which has exactly one root, and ``z = y - A tanh(v)``;
    conversely that ``z`` maps to ``y``. Since ``‖diag(h')K‖₂ <= c`` (``0 < h' <= 1``), every eigenvalue of
    ``I + diag(h')K`` lies in the disc of radius ``c`` around 1, so ``det > 0`` everywhere:
    ``log|det| >= M log(1 - c)`` and the Jacobian never changes sign.
    The inverse solves the ``M``-dimensional equation by Newton steps (``M x M`` solves), each
    safeguarded by damped steps and the fixed-point step ``v ← By + b - K tanh(v)``, which shrinks the
    residual by ``c`` (bracketed Newton-bisection when ``M = 1``); a final differentiable Newton step
    gives implicit-function gradients.

    van den Berg et al., "Sylvester Normalizing Flows for Variational Inference", UAI 2018
    (the map with unstructured ``A, B`` and the determinant identity); Behrmann et al., "Invertible
    Residual Networks", ICML 2019 (invertibility by a spectral-norm bound).

    >>> import torch
    >>> params = {"A": torch.ones(3, 2), "B": torch.eye(2, 3), "b": torch.zeros(2)}
    >>> t = GeneralizedPlanarTransform(params, dim=3)
    >>> z = torch.tensor([0.5, -1.0, 2.0])
    >>> torch.allclose(t.inv(t(z).clone()), z, atol=1e-6)
    True
    """

    option_defaults: ClassVar[dict[str, object]] = {"bottleneck": None}
    #: Bound ``c`` on ``‖BA‖₂``.
    max_contraction: ClassVar[float] = 0.99

    @classmethod
    def resolve_bottleneck(cls, dim: int, bottleneck: object = None) -> int:
        if bottleneck is None:
            return min(dim, _DEFAULT_BOTTLENECK)
        return check_positive_int(bottleneck, "bottleneck", _LAYER, upper=dim)

    @classmethod
    def param_shapes(cls, dim: int, **options: object) -> dict[str, tuple[int, ...]]:
        m = cls.resolve_bottleneck(dim, options.get("bottleneck"))
        return {"A": (dim, m), "B": (m, dim), "b": (m,)}

    @classmethod
    def initial_params(cls, dim: int, **options: object) -> dict[str, Tensor]:
        m = cls.resolve_bottleneck(dim, options.get("bottleneck"))
        return {"A": torch.zeros(dim, m), "B": torch.randn(m, dim) / math.sqrt(dim), "b": torch.zeros(m)}

    @classmethod
    def constrain(cls, raw: RawParams) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(A, B, b, K = BA)`` with ``A`` rescaled so that ``‖K‖₂ <= max_contraction``."""
        a_raw, b_mat, bias = raw["A"], raw["B"], raw["b"]
        k_raw = b_mat @ a_raw
        c = cls.max_contraction
        scale = (c / _spectral_norm(k_raw).clamp_min(c))[..., None, None]
        return a_raw * scale, b_mat, bias, k_raw * scale

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        a, b_mat, bias, k = self.constrained()
        act = torch.tanh(_matvec(b_mat, x) + bias)
        y = x + _matvec(a, act)
        deriv = 1 - act * act
        if k.shape[-1] == 1:
            log_det = torch.log1p(deriv[..., 0] * k[..., 0, 0])
        else:
            eye = torch.eye(k.shape[-1], dtype=k.dtype, device=k.device)
            log_det = torch.linalg.slogdet(eye + deriv.unsqueeze(-1) * k).logabsdet
        return y, log_det

    def inverse_map(self, y: Tensor) -> Tensor:
        a, b_mat, bias, k = self.constrained()
        target = _matvec(b_mat, y) + bias
        with torch.no_grad():
            v = self._solve_reduced(k.detach(), target.detach())
        # One more Newton step, differentiable: at the root it moves v by rounding only, and
        # it gives the implicit-function gradient -J⁻¹ ∂r/∂θ without backpropagating the loop.
        act = torch.tanh(v)
        v = v - _newton_step(k, 1 - act * act, v + _matvec(k, act) - target)
        return y - _matvec(a, torch.tanh(v))

    @staticmethod
    def _solve_reduced(k: Tensor, target: Tensor, max_iter: int = 100) -> Tensor:
        """Root of ``v + K tanh(v) = target``.

        ``M = 1``: the function is increasing and the root lies within ``|k|`` of the target, so
        bracketed Newton-bisection. ``M > 1``: per sample, the best of the Newton step, the damped
        Newton steps (½, ¼) and the fixed-point step ``v ← v - r``; the last shrinks ``‖r‖₂`` by
        the factor ``‖K‖₂ < 1`` (``r(v - r) = K (tanh(v - r) - tanh(v))``), so ``‖r‖₂`` always decreases.
        """
        if k.shape[-1] == 1:
            k1 = k[..., 0]

            def scalar(v: Tensor) -> tuple[Tensor, Tensor]:
                act = torch.tanh(v)
                return v + k1 * act, 1 + k1 * (1 - act * act)

            return solve_increasing(scalar, target, target - k1.abs(), target + k1.abs())

        def residual(v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            act = torch.tanh(v)
            r = v + _matvec(k, act) - target
            return act, r, torch.linalg.vector_norm(r, dim=-1)

        tol = 8 * torch.finfo(target.dtype).eps * (1 + torch.linalg.vector_norm(target, dim=-1))
        v = target - _matvec(k, torch.tanh(target))
        act, r, size = residual(v)
        for _ in range(max_iter):
            if bool((size <= tol).all()):
                break
            step = _newton_step(k, 1 - act * act, r)
            improved = torch.zeros_like(size, dtype=torch.bool)
            best_v, best_act, best_r, best_size = v, act, r, size
            for candidate in (v - step, v - 0.5 * step, v - 0.25 * step, v - r):
                c_act, c_r, c_size = residual(candidate)
                take = c_size < best_size
                improved |= take
                keep = take.unsqueeze(-1)
                best_v = torch.where(keep, candidate, best_v)
                best_act = torch.where(keep, c_act, best_act)
                best_r = torch.where(keep, c_r, best_r)
                best_size = torch.where(take, c_size, best_size)
            if not bool(improved.any()):
                break  # at rounding level everywhere
            v, act, r, size = best_v, best_act, best_r, best_size
        return v


class GeneralizedPlanar(FlowModule):
    """Learnable generalized planar layer; see :class:`GeneralizedPlanarTransform` for the map.

    >>> import torch
    >>> layer = GeneralizedPlanar(4, bottleneck=2)
    >>> layer(torch.zeros(5, 4)).shape
    torch.Size([5, 4])
    """

    transform = GeneralizedPlanarTransform


class ConditionalGeneralizedPlanar(ConditionalFlowModule):
    """Generalized planar layer whose ``A, B, b`` are an MLP's output for a context vector.

    >>> import torch
    >>> layer = ConditionalGeneralizedPlanar(4, context_dim=3, bottleneck=2)
    >>> layer.condition(torch.randn(5, 3))(torch.zeros(5, 4)).shape
    torch.Size([5, 4])
    """

    transform = GeneralizedPlanarTransform
