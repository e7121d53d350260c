"""Root finding for the inverses of residual layers (planar, Sylvester, generalized planar)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def solve_increasing(
    fn: Callable[[Tensor], tuple[Tensor, Tensor]],
    target: Tensor,
    lower: Tensor,
    upper: Tensor,
    max_iter: int = 100,
) -> Tensor:
    """Solve ``fn(a) = target`` elementwise for an increasing scalar function on ``[lower, upper]``.

    ``fn`` returns the value and the derivative. Newton steps are taken where they stay inside
    the bracket, bisection elsewhere, so the iteration converges whenever the root is bracketed;
    it stops once the bracket or the residual is at the dtype's resolution.

    The iteration runs without autograd. One more Newton step, with it, moves the root by rounding
    only and gives it the implicit-function derivative: ``∂a/∂target = 1 / fn'(a)`` and
    ``∂a/∂θ = -(∂fn/∂θ) / fn'(a)`` for whatever ``fn`` reads, exact wherever the root is (a
    derivative backpropagated through the loop is only as good as its last step, and is zero
    where that step bisected).
    """
    tiny = torch.finfo(target.dtype).tiny
    with torch.no_grad():
        a = _bracketed_newton(fn, target.detach(), lower.detach(), upper.detach(), max_iter, tiny)
    value, slope = fn(a)
    return a - (value - target) / slope.detach().clamp_min(tiny)


def _bracketed_newton(
    fn: Callable[[Tensor], tuple[Tensor, Tensor]],
    target: Tensor,
    lower: Tensor,
    upper: Tensor,
    max_iter: int,
    tiny: float,
) -> Tensor:
    tol = 4 * torch.finfo(target.dtype).eps
    lower, upper = torch.broadcast_tensors(lower, upper)
    lower, upper = lower.clone(), upper.clone()
    a = 0.5 * (lower + upper)
    for _ in range(max_iter):
        value, slope = fn(a)
        residual = value - target
        scale = 1 + a.abs()
        if bool((residual.abs() <= tol * scale).all()):
            break
        below = residual < 0
        lower = torch.where(below, a, lower)
        upper = torch.where(below, upper, a)
        newton = a - residual / slope.clamp_min(tiny)
        inside = (newton >= lower) & (newton <= upper)
        a = torch.where(inside, newton, 0.5 * (lower + upper))
        if bool(((upper - lower) <= tol * scale).all()):
            break
    return a
