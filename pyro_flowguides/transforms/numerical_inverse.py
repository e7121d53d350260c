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

    The iteration runs without autograd. One more Newton step, with it, gives the root the
    implicit-function derivative: ``∂a/∂target = 1 / fn'(a)`` and ``∂a/∂θ = -(∂fn/∂θ) / fn'(a)``
    for whatever ``fn`` reads (first derivatives; a derivative backpropagated through the loop is
    only as good as its last step, and is zero where that step bisected). The step's value is
    kept only inside the final bracket; outside it (a slope that rounds to zero) the root keeps the
    loop's value, with the same derivative. Under ``torch.jit.trace`` the loop runs all
    ``max_iter`` iterations: a trace cannot stop on the values.
    """
    tiny = torch.finfo(target.dtype).tiny
    with torch.no_grad():
        a, lower, upper = _bracketed_newton(
            fn, target.detach(), lower.detach(), upper.detach(), max_iter, tiny
        )
    value, slope = fn(a)
    newton = a - (value - target) / slope.detach().clamp_min(tiny)
    inside = (newton >= lower) & (newton <= upper)
    return torch.where(inside, newton, a + (newton - newton.detach()))


def _bracketed_newton(
    fn: Callable[[Tensor], tuple[Tensor, Tensor]],
    target: Tensor,
    lower: Tensor,
    upper: Tensor,
    max_iter: int,
    tiny: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """The root and its final bracket."""
    tol = 4 * torch.finfo(target.dtype).eps
    may_stop = not torch.jit.is_tracing()
    lower, upper = torch.broadcast_tensors(lower, upper)
    lower, upper = lower.clone(), upper.clone()
    a = 0.5 * (lower + upper)
    for _ in range(max_iter):
        value, slope = fn(a)
        residual = value - target
        scale = 1 + a.abs()
        if may_stop and bool((residual.abs() <= tol * scale).all()):
            break
        below = residual < 0
        lower = torch.where(below, a, lower)
        upper = torch.where(below, upper, a)
        newton = a - residual / slope.clamp_min(tiny)
        inside = (newton >= lower) & (newton <= upper)
        a = torch.where(inside, newton, 0.5 * (lower + upper))
        if may_stop and bool(((upper - lower) <= tol * scale).all()):
            break
    return a, lower, upper
