"""Bijections to supports that ``torch.distributions.biject_to`` lacks, registered on import.

``biject_to(constraints.lower_cholesky)`` raises ``NotImplementedError`` in torch, so a model with
a lower-Cholesky latent (for example an ``ImproperUniform`` over covariance factors) could not
be unconstrained by an autoguide. :class:`LowerCholeskyVectorTransform` fills that gap.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import Transform, biject_to, constraints


def _side(vector_size: int) -> int:
    n = round(((8 * vector_size + 1) ** 0.5 - 1) / 2)
    if n * (n + 1) // 2 != vector_size:
        raise ValueError(f"a vector of size {vector_size} is not the lower triangle of a square matrix")
    return n


class LowerCholeskyVectorTransform(Transform):
    r"""A vector of ``n(n+1)/2`` reals to an ``n × n`` lower-triangular matrix with positive diagonal.

    Off-diagonal entries are copied, diagonal entries exponentiated:
    ``log|det J| = Σ_i x_{ii}`` over the diagonal entries' unconstrained values.

    >>> import torch
    >>> t = LowerCholeskyVectorTransform()
    >>> t(torch.zeros(3))
    tensor([[1., 0.],
            [0., 1.]])
    """

    domain = constraints.independent(constraints.real, 1)
    codomain = constraints.lower_cholesky
    bijective = True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LowerCholeskyVectorTransform)

    @staticmethod
    def _indices(n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        return torch.tril_indices(n, n, device=device).unbind(0)

    def _call(self, x: Tensor) -> Tensor:
        n = _side(x.shape[-1])
        rows, cols = self._indices(n, x.device)
        values = torch.where(rows == cols, x.exp(), x)
        out = x.new_zeros((*x.shape[:-1], n, n))
        out[..., rows, cols] = values
        return out

    def _inverse(self, y: Tensor) -> Tensor:
        rows, cols = self._indices(y.shape[-1], y.device)
        values = y[..., rows, cols]
        return torch.where(rows == cols, values.log(), values)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        rows, cols = self._indices(_side(x.shape[-1]), x.device)
        return (x * (rows == cols)).sum(-1)

    def forward_shape(self, shape: torch.Size) -> torch.Size:
        n = _side(shape[-1])
        return (*torch.Size(shape[:-1]), n, n)

    def inverse_shape(self, shape: torch.Size) -> torch.Size:
        n = shape[-1]
        return (*torch.Size(shape[:-2]), n * (n + 1) // 2)


@biject_to.register(constraints.lower_cholesky)
def _lower_cholesky_vector(constraint: constraints.Constraint) -> Transform:
    return LowerCholeskyVectorTransform()
