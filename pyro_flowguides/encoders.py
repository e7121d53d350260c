"""Encoders: networks from observations to the hidden vector ``h`` that amortised flows condition on."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor, nn


def _check_widths(hidden_dims: Sequence[int], owner: str) -> list[int]:
    widths = list(hidden_dims)
    if not widths or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths):
        raise ValueError(
            f"{owner}: hidden_dims must be a non-empty list of integers >= 1, got {hidden_dims!r}"
        )
    return widths


def _mlp(widths: Sequence[int]) -> nn.Sequential:
    """``Linear → ReLU`` for each consecutive pair of ``widths``."""
    layers: list[nn.Module] = []
    for n_in, n_out in itertools.pairwise(widths):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    return nn.Sequential(*layers)


class MLPEncoder(nn.Module):
    """``h = ReLU MLP(flatten(x))``: each item's observation (any shape ``item_shape``) to a vector.

    ``x`` has shape ``batch + item_shape``; ``h`` has shape ``batch + (hidden_dims[-1],)``. Inputs of
    any dtype (binary pixels as ``uint8``, counts) are cast to the encoder's dtype.

    >>> import torch
    >>> encoder = MLPEncoder((28, 28), hidden_dims=[64, 32])
    >>> encoder(torch.zeros(5, 28, 28)).shape
    torch.Size([5, 32])
    """

    def __init__(self, item_shape: Sequence[int] | int, hidden_dims: Sequence[int] = (256,)) -> None:
        super().__init__()
        self.item_shape = torch.Size([item_shape] if isinstance(item_shape, int) else item_shape)
        self.output_dim = _check_widths(hidden_dims, "MLPEncoder")[-1]
        self.net = _mlp([self.item_shape.numel(), *hidden_dims])

    def forward(self, x: Tensor) -> Tensor:
        rank = len(self.item_shape)
        if x.shape[x.dim() - rank :] != self.item_shape:
            raise ValueError(
                f"MLPEncoder: expected inputs of shape (..., {', '.join(map(str, self.item_shape))}), "
                f"got {tuple(x.shape)}; the encoder was built for items of shape {tuple(self.item_shape)}"
            )
        weight = self.net[0].weight
        return self.net(x.reshape(*x.shape[: x.dim() - rank], -1).to(weight.dtype))


class PoolingEncoder(nn.Module):
    r"""A permutation-invariant summary of a set of rows (Deep Sets, Zaheer et al. 2017):
    ``h = ρ(mean_i φ(x_i) ⊕ log n)``.

    ``x`` has shape ``batch + (n, row_dim)`` (``n`` exchangeable rows, any ``n``); ``h`` has shape
    ``batch + (hidden_dims[-1],)``. ``log n`` lets ``ρ`` tell a large data set from a small one.

    >>> import torch
    >>> encoder = PoolingEncoder(2, hidden_dims=[16])
    >>> x = torch.randn(8, 2)
    >>> torch.allclose(encoder(x), encoder(x.flip(0)), atol=1e-6)
    True
    """

    def __init__(self, row_dim: int, hidden_dims: Sequence[int] = (64, 64)) -> None:
        super().__init__()
        widths = _check_widths(hidden_dims, "PoolingEncoder")
        self.row_dim = row_dim
        self.output_dim = widths[-1]
        self.phi = _mlp([row_dim, *widths])
        self.rho = _mlp([widths[-1] + 1, *widths])

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[-1] != self.row_dim:
            raise ValueError(
                f"PoolingEncoder: expected rows of shape (..., n, {self.row_dim}), got {tuple(x.shape)}"
            )
        weight = self.rho[0].weight
        pooled = self.phi(x.to(weight.dtype)).mean(-2)
        log_n = pooled.new_full((*pooled.shape[:-1], 1), float(x.shape[-2])).log()
        return self.rho(torch.cat([pooled, log_n], -1))
