r"""Sylvester normalizing flows (van den Berg, Hasenclever, Tomczak & Welling 2018).

One layer is ``y = z + Q R h(R̃ Qᵀz + b)`` with ``h = tanh``, ``Q ∈ ℝ^{D×M}`` with orthonormal
columns, ``R, R̃`` upper triangular ``M×M`` and ``b ∈ ℝ^M``. By Sylvester's determinant identity

    ``log|det ∂y/∂z| = Σᵢ log(1 + h'((R̃Qᵀz + b)ᵢ) rᵢᵢ r̃ᵢᵢ)``,

an O(M) sum once the O(DM) projection is done; no ``D×D`` determinant is ever formed. The diagonals
are ``rᵢᵢ = tanh(ρᵢ)`` and ``r̃ᵢᵢ = tanh(ρ̃ᵢ)``, so ``rᵢᵢ r̃ᵢᵢ ∈ (-1, 1)`` and, with ``h' ∈ (0, 1]``,
every factor is positive: the map is invertible and its Jacobian determinant is always positive.

The three families differ only in ``Q``:

* :class:`OrthogonalSylvester` (O-SNF): ``M ≤ D`` orthonormal columns from a QR factorisation;
* :class:`HouseholderSylvester` (H-SNF): ``Q = H₁⋯H_K`` a product of Householder reflections, ``M = D``;
* :class:`TriangularSylvester` (T-SNF): ``Q = I``, ``M = D``.

Pyro's own ``pyro.distributions.transforms.Sylvester`` is not used: with its row-vector matrix
products it computes ``z + Rᵀ Qᵀ tanh(Q R̃ᵀ z + b)`` (column form) yet reports the log-determinant
above, which is not that map's. The layers here implement the paper's map.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import ClassVar

import torch
from torch import Tensor

from .base import ConditionalFlowModule, FlowModule, FlowTransform, RawParams, check_positive_int
from .numerical_inverse import solve_increasing


def _matmul(x: Tensor, a: Tensor) -> Tensor:
    """Row vectors times matrices, ``x @ a``, with ``a``'s leading dimensions batched against ``x``'s.

    Unconditional parameters (``a`` 2-D) take the plain, fast ``x @ a``; conditional ones
    (``a`` of shape ``batch + (n, m)``, ``x`` of shape ``(..., *batch, n)``) a batched product.
    """
    if a.dim() == 2:
        return x @ a
    return (x.unsqueeze(-2) @ a).squeeze(-2)


def _matmul_add(c: Tensor, x: Tensor, a: Tensor) -> Tensor:
    """``c + x @ a`` as :func:`_matmul`, in one fused ``addmm`` when ``x`` and ``a`` are matrices."""
    if a.dim() == 2 and x.dim() == 2:
        return torch.addmm(c, x, a)
    return c + _matmul(x, a)


_SIGNS = torch.tensor([2.0, -2.0])  # σ(±2ρ) from one sigmoid
_TWOS = torch.tensor([2.0, 2.0])  # 2(a₊b₊ + a₋b₋) as one product with a vector
_FOLD_MAX_M = 64  # largest M for which Q is folded into R and R̃ once per call


class SylvesterTransform(FlowTransform):
    r"""Shared maths of the Sylvester layers: ``y = z + Q R tanh(R̃ Qᵀz + b)``.

    Subclasses say how ``Q`` is parameterised through :meth:`basis_shapes` / :meth:`initial_basis`
    and apply it through :meth:`basis` (whatever is computed once per call), :meth:`project`
    (``Qᵀz``) and :meth:`lift` (``Qv``). Raw parameters shared by all of them: ``r`` and ``r_tilde``
    (``M×M``; strictly upper parts used as they are, diagonals through ``tanh``) and ``b`` (``M``).

    ``log|det J| = Σᵢ log(1 + h'ᵢ dᵢ)`` with ``dᵢ = rᵢᵢr̃ᵢᵢ`` is evaluated as
    ``log(tanh²(aᵢ) + h'ᵢ(1 + dᵢ))`` (``aᵢ`` the pre-activation), a sum of non-negative terms with
    ``1 + dᵢ = 2(σ(2ρᵢ)σ(2ρ̃ᵢ) + σ(-2ρᵢ)σ(-2ρ̃ᵢ))``, also a sum of positive terms, so it stays finite
    and accurate when ``dᵢ`` rounds to ``-1`` at saturated parameters.

    Inverse: with ``c = Qᵀy`` and ``v = Qᵀz``, the component of ``z`` orthogonal to ``Q``'s columns
    is left unchanged, and ``v`` solves ``v + R h(R̃v + b) = c``. Row ``i`` of that system involves
    only ``vᵢ, …, v_M`` and is increasing in ``vᵢ``, so back-substitution from ``i = M`` down to
    ``1`` solves one bracketed increasing scalar equation per row (:func:`solve_increasing`),
    vectorised over the batch. Then ``z = y - Q(c - v)``.

    van den Berg, Hasenclever, Tomczak & Welling, "Sylvester Normalizing Flows for Variational
    Inference", UAI 2018.
    """

    # -- what a Q family defines ----------------------------------------------------------
    @classmethod
    @abstractmethod
    def basis_shapes(cls, dim: int, **options: object) -> tuple[int, dict[str, tuple[int, ...]]]:
        """``(M, shapes of Q's raw parameters)``; validates ``options``."""

    @classmethod
    def initial_basis(cls, dim: int, **options: object) -> dict[str, Tensor]:
        """Initial raw parameters of ``Q`` (random, so that the columns differ)."""
        return {}

    def basis(self, params: RawParams) -> tuple[Tensor, ...]:
        """What :meth:`project` and :meth:`lift` need, computed once per call."""
        return ()

    @abstractmethod
    def project(self, basis: tuple[Tensor, ...], z: Tensor) -> Tensor:
        """``Qᵀz`` for row vectors ``z`` of shape ``(..., D)``; returns ``(..., M)``."""

    @abstractmethod
    def lift(self, basis: tuple[Tensor, ...], v: Tensor) -> Tensor:
        """``Qv`` for row vectors ``v`` of shape ``(..., M)``; returns ``(..., D)``."""

    # -- shared -----------------------------------------------------------------------------
    @classmethod
    def param_shapes(cls, dim: int, **options: object) -> dict[str, tuple[int, ...]]:
        m, shapes = cls.basis_shapes(dim, **options)
        return {**shapes, "r": (m, m), "r_tilde": (m, m), "b": (m,)}

    @classmethod
    def initial_params(cls, dim: int, **options: object) -> dict[str, Tensor]:
        # R = 0 (diagonal tanh(0) = 0 included) makes the layer the identity; R̃ and Q random so
        # that the first gradient step gives every column of R a different direction.
        m, _ = cls.basis_shapes(dim, **options)
        return {
            **cls.initial_basis(dim, **options),
            "r": torch.zeros(m, m),
            "r_tilde": torch.randn(m, m) / math.sqrt(m),
            "b": torch.zeros(m),
        }

    @staticmethod
    def diagonal_factors(rho: Tensor) -> tuple[Tensor, Tensor]:
        """``(tanh ρ, 1 + tanh ρ₁ tanh ρ₂)`` for the raw diagonals ``ρ = [ρ₁; ρ₂]``, shape ``(..., 2, M)``.

        ``1 + tanh ρ₁ tanh ρ₂ = 2(σ(2ρ₁)σ(2ρ₂) + σ(-2ρ₁)σ(-2ρ₂))``: positive terms, no cancellation
        when the product rounds to ``-1``.
        """
        sig_r, sig_rt = torch.sigmoid(rho.unsqueeze(-1) * _SIGNS.to(rho)).unbind(-3)  # (..., M, ±)
        return torch.tanh(rho), (sig_r * sig_rt) @ _TWOS.to(rho)

    def triangular(self, params: RawParams) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(strictly upper R, strictly upper R̃, diag R, diag R̃, 1 + diag R ⊙ diag R̃)``.

        The diagonals are kept apart (applied elementwise) so that no further ``M×M`` matrix
        is built per call; at ``M = D = 1000`` those cost as much as the products themselves.
        """
        r_raw, rt_raw = params["r"], params["r_tilde"]
        rho = torch.stack(
            [torch.diagonal(r_raw, dim1=-2, dim2=-1), torch.diagonal(rt_raw, dim1=-2, dim2=-1)], -2
        )
        diag, one_plus_d = self.diagonal_factors(rho)
        return torch.triu(r_raw, diagonal=1), torch.triu(rt_raw, diagonal=1), *diag.unbind(-2), one_plus_d

    def triangular_dense(self, params: RawParams) -> tuple[Tensor, Tensor, Tensor]:
        """``(R, R̃, 1 + diag R ⊙ diag R̃)`` with the diagonals in place, for small ``M``.

        ``R`` and ``R̃`` are built stacked, one operation for both at each step: at small ``M`` the
        cost is per operation, not per element.
        """
        raw = torch.stack([params["r"], params["r_tilde"]], dim=-3)
        diag, one_plus_d = self.diagonal_factors(torch.diagonal(raw, dim1=-2, dim2=-1))
        r, r_tilde = torch.diagonal_scatter(torch.triu(raw, diagonal=1), diag, dim1=-2, dim2=-1).unbind(-3)
        return r, r_tilde, one_plus_d

    @staticmethod
    def _slope(act: Tensor, one_plus_d: Tensor) -> Tensor:
        """``1 + h'(a) d = lerp(1 + d, 1, tanh²(a))``, ``h' = 1 - tanh²``: a sum of non-negative terms
        when ``d < 0`` and at least 1 when ``d ≥ 0``, so no cancellation either way."""
        return torch.lerp(one_plus_d, torch.ones_like(one_plus_d), act * act)

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        p = self.raw_params()
        basis = self.basis(p)
        if len(basis) == 1 and p["r"].shape[-1] <= _FOLD_MAX_M:
            # an explicit Q and a small M: fold it into Aᵀ = (QR)ᵀ and Bᵀ = QR̃ᵀ once per call
            # (O(DM²)), so that each sample costs two products, y = z + tanh(zBᵀ + b)Aᵀ
            q = basis[0]
            r, r_tilde, one_plus_d = self.triangular_dense(p)
            act = torch.tanh(_matmul_add(p["b"], x, q @ r_tilde.mT))
            y = _matmul_add(x, act, (q @ r).mT)
        else:
            r, r_tilde, r_diag, rt_diag, one_plus_d = self.triangular(p)
            v = self.project(basis, x)
            act = torch.tanh(_matmul(v, r_tilde.mT) + rt_diag * v + p["b"])
            y = x + self.lift(basis, _matmul(act, r.mT) + r_diag * act)
        return y, torch.log(self._slope(act, one_plus_d)).sum(-1)

    def inverse_map(self, y: Tensor) -> Tensor:
        p = self.raw_params()
        basis = self.basis(p)
        r, r_tilde, r_diag, rt_diag, one_plus_d = self.triangular(p)
        c = self.project(basis, y)
        # Columns of the strictly upper parts as contiguous rows, for the updates below.
        r_cols, rt_cols = r.mT.contiguous(), r_tilde.mT.contiguous()
        # Rows 0..i still to solve: row j reads v_j + r_jj h(r̃_jj v_j + shift_j) = rest_j, where
        # shift_j = b_j + Σ_{k>i} R̃_jk v_k and rest_j = c_j - Σ_{k>i} R_jk h_k; both shrink as i falls.
        shift = p["b"] + torch.zeros_like(c)
        rest = c
        solved: list[Tensor] = []
        for i in range(c.shape[-1] - 1, -1, -1):
            rt_ii, r_ii, s_i, opd_i = rt_diag[..., i], r_diag[..., i], shift[..., i], one_plus_d[..., i]

            def row(v: Tensor, rt_ii=rt_ii, r_ii=r_ii, s_i=s_i, opd_i=opd_i) -> tuple[Tensor, Tensor]:
                act = torch.tanh(rt_ii * v + s_i)
                return v + r_ii * act, self._slope(act, opd_i)

            target = rest[..., i]
            reach = r_ii.abs()
            v_i = solve_increasing(row, target, target - reach, target + reach)
            solved.append(v_i)
            if i > 0:
                act_i = torch.tanh(rt_ii * v_i + s_i).unsqueeze(-1)
                shift = shift[..., :i] + rt_cols[..., i, :i] * v_i.unsqueeze(-1)
                rest = rest[..., :i] - r_cols[..., i, :i] * act_i
        solved.reverse()
        v = torch.stack(solved, dim=-1)
        return y - self.lift(basis, c - v)


class OrthogonalSylvesterTransform(SylvesterTransform):
    r"""O-SNF: ``y = z + Q R tanh(R̃ Qᵀz + b)`` with ``Q ∈ ℝ^{D×M}``, ``QᵀQ = I``.

    ``Q`` is the orthonormal factor of the QR factorisation of a raw ``D×M`` matrix ``q``, with the
    signs fixed so that the triangular factor has a positive diagonal (the Gram–Schmidt basis of
    ``q``'s columns, a smooth function of ``q``). This is exact, differentiable and batched; the
    paper's iterative orthogonalisation converges to the same kind of matrix. Cost per call
    O(DM²) for the factorisation, per sample O(DM). Option ``num_ortho_vecs`` (``M``,
    ``1 ≤ M ≤ D``; default ``min(D, 32)``).

    van den Berg et al., "Sylvester Normalizing Flows for Variational Inference", UAI 2018.

    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> params = {"q": torch.randn(3, 2), "r": torch.randn(2, 2), "r_tilde": torch.randn(2, 2)}
    >>> params["b"] = torch.zeros(2)
    >>> t = OrthogonalSylvesterTransform(params, dim=3)
    >>> z = torch.tensor([0.5, -1.0, 2.0])
    >>> torch.allclose(t.inv(t(z)), z, atol=1e-5)
    True
    """

    option_defaults: ClassVar[dict[str, object]] = {"num_ortho_vecs": None}

    @classmethod
    def basis_shapes(cls, dim: int, **options: object) -> tuple[int, dict[str, tuple[int, ...]]]:
        m = options.get("num_ortho_vecs")
        m = min(dim, 32) if m is None else check_positive_int(m, "num_ortho_vecs", cls.__name__, upper=dim)
        return m, {"q": (dim, m)}

    @classmethod
    def initial_basis(cls, dim: int, **options: object) -> dict[str, Tensor]:
        m, _ = cls.basis_shapes(dim, **options)
        return {"q": torch.randn(dim, m)}

    def basis(self, params: RawParams) -> tuple[Tensor, ...]:
        return (self.orthonormal(params["q"]),)

    @staticmethod
    def orthonormal(raw: Tensor) -> Tensor:
        """The ``D×M`` orthonormal factor of ``raw`` with a positive-diagonal triangular factor."""
        q, tri = torch.linalg.qr(raw)
        flip = torch.diagonal(tri, dim1=-2, dim2=-1) < 0
        return torch.where(flip.unsqueeze(-2), -q, q)

    def project(self, basis: tuple[Tensor, ...], z: Tensor) -> Tensor:
        return _matmul(z, basis[0])

    def lift(self, basis: tuple[Tensor, ...], v: Tensor) -> Tensor:
        return _matmul(v, basis[0].mT)


class HouseholderSylvesterTransform(SylvesterTransform):
    r"""H-SNF: ``y = z + Q R tanh(R̃ Qᵀz + b)`` with ``Q = H₁⋯H_K``, ``H_k = I - 2 v_k v_kᵀ / ‖v_k‖²``.

    ``Q`` is ``D×D`` (``M = D``). For ``D > 4K`` it is never formed: with ``U`` the ``K×D`` matrix
    of the raw vectors ``v_k``, the compact WY form ``Q = I - Uᵀ T U`` has
    ``T = (striu(UUᵀ) + diag(UUᵀ)/2)⁻¹`` (``K×K``, computed once per call), so ``Qᵀz`` and ``Qv``
    cost O(DK) per sample as a few matrix products instead of ``K`` sequential reflections. For
    ``D ≤ 4K`` the dense ``Q`` costs no more per sample (O(D²) ≤ O(4DK)) and is multiplied out
    once per call, ``K - 1`` products of ``D×D`` reflections (no triangular solve, and exactly
    orthogonal however many reflections there are). Option ``num_householder`` (``K ≥ 1``; default
    ``min(D, 8)``: more than ``D`` reflections add nothing, since ``D`` of them reach every
    orthogonal matrix up to column signs, which ``R`` and ``R̃`` absorb; ``K > D`` is allowed but
    redundant).

    van den Berg et al., "Sylvester Normalizing Flows for Variational Inference", UAI 2018;
    Joffrain et al., "Accumulating Householder transformations, revisited", ACM TOMS 2006.

    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> params = {"v": torch.randn(2, 3), "r": torch.randn(3, 3), "r_tilde": torch.randn(3, 3)}
    >>> params["b"] = torch.zeros(3)
    >>> t = HouseholderSylvesterTransform(params, dim=3)
    >>> z = torch.tensor([0.5, -1.0, 2.0])
    >>> torch.allclose(t.inv(t(z)), z, atol=1e-5)
    True
    """

    option_defaults: ClassVar[dict[str, object]] = {"num_householder": None}

    @classmethod
    def basis_shapes(cls, dim: int, **options: object) -> tuple[int, dict[str, tuple[int, ...]]]:
        k = options.get("num_householder")
        k = min(dim, 8) if k is None else check_positive_int(k, "num_householder", cls.__name__)
        return dim, {"v": (k, dim)}

    @classmethod
    def initial_basis(cls, dim: int, **options: object) -> dict[str, Tensor]:
        _, shapes = cls.basis_shapes(dim, **options)
        return {"v": torch.randn(shapes["v"])}

    def basis(self, params: RawParams) -> tuple[Tensor, ...]:
        u = params["v"]
        tiny = torch.finfo(u.dtype).tiny
        if self.dim <= 4 * u.shape[-2]:
            # a dense Q costs no more per sample than the WY products: multiply the reflections out
            w = u / (torch.linalg.vector_norm(u, dim=-1, keepdim=True) + tiny)  # H = I - 2wwᵀ
            eye = torch.eye(self.dim, dtype=u.dtype, device=u.device)
            reflections = torch.addcmul(eye, w.unsqueeze(-1), w.unsqueeze(-2), value=-2).unbind(-3)
            q = reflections[0]
            for h in reflections[1:]:
                q = q @ h
            return (q,)
        gram = u @ u.mT
        sq_norms = torch.diagonal(gram, dim1=-2, dim2=-1).clamp_min(tiny)
        s = torch.triu(gram, diagonal=1) + torch.diag_embed(sq_norms / 2)
        eye = torch.eye(s.shape[-1], dtype=s.dtype, device=s.device)
        return u, torch.linalg.solve_triangular(s, eye, upper=True)

    def project(self, basis: tuple[Tensor, ...], z: Tensor) -> Tensor:
        if len(basis) == 1:
            return _matmul(z, basis[0])  # (zᵀQ)ᵀ = Qᵀz
        u, t = basis  # Qᵀz = z - Uᵀ Tᵀ U z
        return z - _matmul(_matmul(_matmul(z, u.mT), t), u)

    def lift(self, basis: tuple[Tensor, ...], v: Tensor) -> Tensor:
        if len(basis) == 1:
            return _matmul(v, basis[0].mT)
        u, t = basis  # Qv = v - Uᵀ T U v
        return v - _matmul(_matmul(_matmul(v, u.mT), t.mT), u)


class TriangularSylvesterTransform(SylvesterTransform):
    r"""T-SNF: ``y = z + R tanh(R̃ z + b)`` (``Q = I``, ``M = D``), ``R, R̃`` upper triangular.

    The paper alternates ``Q = I`` with the reversal permutation between layers. Here every layer
    uses ``Q = I`` and ``needs_permutation = True`` makes :func:`pyro_flowguides.flows.stack` put a
    :class:`~pyro_flowguides.transforms.permutation.Reverse` between consecutive triangular layers;
    ``Reverse ∘ T_I ∘ Reverse`` is exactly the paper's layer with ``Q`` the reversal, so a stack
    spans the same family. Per sample O(D²), like ``R`` itself.

    van den Berg et al., "Sylvester Normalizing Flows for Variational Inference", UAI 2018.

    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> params = {"r": torch.randn(3, 3), "r_tilde": torch.randn(3, 3), "b": torch.zeros(3)}
    >>> t = TriangularSylvesterTransform(params, dim=3)
    >>> z = torch.tensor([0.5, -1.0, 2.0])
    >>> torch.allclose(t.inv(t(z)), z, atol=1e-5)
    True
    """

    needs_permutation = True

    @classmethod
    def basis_shapes(cls, dim: int, **options: object) -> tuple[int, dict[str, tuple[int, ...]]]:
        return dim, {}

    def project(self, basis: tuple[Tensor, ...], z: Tensor) -> Tensor:
        return z

    def lift(self, basis: tuple[Tensor, ...], v: Tensor) -> Tensor:
        return v


class OrthogonalSylvester(FlowModule):
    """Learnable O-SNF layer; see :class:`OrthogonalSylvesterTransform` for the map.

    >>> import torch
    >>> layer = OrthogonalSylvester(4, num_ortho_vecs=2)
    >>> layer(torch.zeros(5, 4)).shape
    torch.Size([5, 4])
    """

    transform = OrthogonalSylvesterTransform


class ConditionalOrthogonalSylvester(ConditionalFlowModule):
    """O-SNF layer whose ``q, R, R̃, b`` are an MLP's output for a context vector.

    >>> import torch
    >>> layer = ConditionalOrthogonalSylvester(4, context_dim=3, num_ortho_vecs=2)
    >>> layer.condition(torch.randn(5, 3))(torch.zeros(5, 4)).shape
    torch.Size([5, 4])
    """

    transform = OrthogonalSylvesterTransform


class HouseholderSylvester(FlowModule):
    """Learnable H-SNF layer; see :class:`HouseholderSylvesterTransform` for the map.

    >>> import torch
    >>> layer = HouseholderSylvester(4, num_householder=3)
    >>> layer(torch.zeros(5, 4)).shape
    torch.Size([5, 4])
    """

    transform = HouseholderSylvesterTransform


class ConditionalHouseholderSylvester(ConditionalFlowModule):
    """H-SNF layer whose reflection vectors, ``R, R̃, b`` are an MLP's output for a context vector.

    >>> import torch
    >>> layer = ConditionalHouseholderSylvester(4, context_dim=3)
    >>> layer.condition(torch.randn(5, 3))(torch.zeros(5, 4)).shape
    torch.Size([5, 4])
    """

    transform = HouseholderSylvesterTransform


class TriangularSylvester(FlowModule):
    """Learnable T-SNF layer; see :class:`TriangularSylvesterTransform` for the map.

    >>> import torch
    >>> layer = TriangularSylvester(4)
    >>> layer(torch.zeros(5, 4)).shape
    torch.Size([5, 4])
    """

    transform = TriangularSylvesterTransform


class ConditionalTriangularSylvester(ConditionalFlowModule):
    """T-SNF layer whose ``R, R̃, b`` are an MLP's output for a context vector.

    >>> import torch
    >>> layer = ConditionalTriangularSylvester(4, context_dim=3)
    >>> layer.condition(torch.randn(5, 3))(torch.zeros(5, 4)).shape
    torch.Size([5, 4])
    """

    transform = TriangularSylvesterTransform
