"""Coordinate reversal, put between coupling and autoregressive layers."""

from __future__ import annotations

from torch import Tensor

from .base import FlowModule, FlowTransform


class ReverseTransform(FlowTransform):
    """``y = (z_D, ..., z_1)``; volume-preserving, its own inverse.

    >>> import torch
    >>> ReverseTransform({}, dim=3)(torch.tensor([1.0, 2.0, 3.0]))
    tensor([3., 2., 1.])
    """

    volume_preserving = True

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x.flip(-1), x.new_zeros(x.shape[:-1])

    def inverse_map(self, y: Tensor) -> Tensor:
        return y.flip(-1)


class Reverse(FlowModule):
    """Parameter-free layer reversing the coordinates (so every coordinate gets transformed)."""

    transform = ReverseTransform
