"""Neural spline coupling layer (Durkan et al. 2019): monotone rational-quadratic splines."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor

from .base import check_positive_int
from .coupling import (
    ConditionalNetworkFlowModule,
    CouplingTransform,
    NetworkFlowModule,
    check_positive_float,
)

MIN_BIN_WIDTH = 1e-3
#: Bin slopes are ``σ_k / Σ_j w_j σ_j`` with ``σ_k = exp(1.5 tanh(raw))``: within ``[e^-3, e^3]``.
LOG_SLOPE_BOUND = 1.5


def _spline_params(
    widths: Tensor, slopes: Tensor, derivatives: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The spline on the unit square, with heights left unnormalised (they sum to ``z``).

    Returns bin widths ``w`` and their cumulative sums, heights ``w σ`` and their cumulative sums,
    the ``K + 1`` knot derivatives (unnormalised: ``z`` at both ends) and ``z = Σ w σ`` (``(..., 1)``).
    The rational-quadratic map is homogeneous in (heights, slopes, derivatives), so dividing its
    output by ``z`` at the end gives the normalised spline without normalising every bin.
    """
    num_bins = widths.shape[-1]
    w = torch.softmax(widths, dim=-1) * (1 - MIN_BIN_WIDTH * num_bins) + MIN_BIN_WIDTH
    sigma = torch.exp(torch.tanh(slopes) * LOG_SLOPE_BOUND)
    heights = w * sigma
    cum_heights = torch.cumsum(heights, dim=-1)
    z = cum_heights[..., -1:]
    left, right = sigma[..., :-1], sigma[..., 1:]
    # harmonic mean of the adjacent slopes (≤ twice the smaller one) times a factor in [1/e, e]
    inner = left * right / (left + right) * torch.exp(torch.tanh(derivatives) + math.log(2))
    d = torch.cat([z, inner, z], dim=-1)
    return w, torch.cumsum(w, dim=-1), heights, cum_heights, d, z


def _broadcast(v: Tensor, params: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
    shape = torch.broadcast_shapes(v.shape, params[0].shape[:-1])
    if v.shape != shape:
        v = v.expand(shape)
    if params[0].shape[:-1] != shape:
        params = tuple(p.expand(shape + p.shape[-1:]) for p in params)
    return v, params


def _gather(idx: Tensor, *tables: Tensor) -> list[Tensor]:
    return [t.gather(-1, idx).squeeze(-1) for t in tables]


def rational_quadratic_spline(
    x: Tensor, widths: Tensor, slopes: Tensor, derivatives: Tensor, bound: float
) -> tuple[Tensor, Tensor]:
    r"""Monotone rational-quadratic spline on ``[-B, B]``, identity outside; elementwise.

    ``widths``, ``slopes`` (``x.shape + (K,)``) and ``derivatives`` (``x.shape + (K - 1,)``) are
    unconstrained; all zeros give the identity. Bin widths ``w_k`` are a softmax (each at least 1e-3
    of the interval); bin slopes are ``s_k = σ_k / Σ_j w_j σ_j`` with ``σ_k = exp(1.5 tanh(·))``, so
    ``s_k ∈ [e^-3, e^3]`` and the heights ``h_k = w_k s_k`` fill the interval; the interior knot
    derivatives are the harmonic mean of the adjacent bin slopes times ``exp(tanh(·)) ∈ [1/e, e]``
    and the boundary derivatives are 1 (so the identity tails join smoothly). These bounds keep the
    spline's derivative within about ``[4e-3, 60]``: the map stays well conditioned, and its inverse
    accurate in float32, for any parameter values. Returns ``y`` and ``log dy/dx`` (0 outside).
    In bin ``k`` with ``ξ = (x - x_k) / w_k``:

    ``y = y_k + h_k (s_k ξ² + d_k ξ(1-ξ)) / (s_k + (d_k + d_{k+1} - 2 s_k) ξ(1-ξ))``,
    ``dy/dx = s_k² (d_{k+1} ξ² + 2 s_k ξ(1-ξ) + d_k (1-ξ)²) / (s_k + (d_k + d_{k+1} - 2 s_k) ξ(1-ξ))²``.

    The inputs are clamped into ``[-B, B]`` before the spline maths and the identity is selected
    outside with ``torch.where``, so values and gradients are finite for any input.

    Durkan, Bekasov, Murray & Papamakarios, "Neural Spline Flows", NeurIPS 2019, Section 3.1 (the
    function); the slope and derivative parametrisation (bounded, derivatives as in Fritsch & Butland's
    monotone interpolation) is this library's.

    >>> import torch
    >>> x = torch.tensor([-7.0, -1.0, 0.5, 7.0])
    >>> zeros = torch.zeros(4, 8)
    >>> y, log_det = rational_quadratic_spline(x, zeros, zeros, torch.zeros(4, 7), bound=5.0)
    >>> torch.allclose(y, x), torch.allclose(log_det, torch.zeros(4), atol=1e-6)
    (True, True)
    """
    u, params = _broadcast((x.clamp(-bound, bound) + bound) / (2 * bound), (widths, slopes, derivatives))
    w, cum_w, heights, cum_heights, d, z = _spline_params(*params)
    idx = (u.unsqueeze(-1) >= cum_w[..., :-1]).sum(-1, keepdim=True)  # bin 0..K-1, also at u = 0, 1
    width, right_x, height, right_y, d0 = _gather(idx, w, cum_w, heights, cum_heights, d)
    (d1,) = _gather(idx + 1, d)
    s = height / width
    xi = ((u - right_x + width) / width).clamp(0, 1)
    xi1 = xi * (1 - xi)
    denom = s + (d0 + d1 - 2 * s) * xi1
    v = right_y - height + height * (s * xi * xi + d0 * xi1) / denom
    z = z.squeeze(-1)
    y = v * (2 * bound) / z - bound
    log_det = _log_slope(xi, xi1, denom, s, d0, d1, z)
    inside = (x >= -bound) & (x <= bound)
    return torch.where(inside, y, x), torch.where(inside, log_det, torch.zeros_like(log_det))


def _log_slope(
    xi: Tensor, xi1: Tensor, denom: Tensor, s: Tensor, d0: Tensor, d1: Tensor, z: Tensor
) -> Tensor:
    """``log dy/dx`` at the point ``ξ`` of its bin (``xi1 = ξ(1-ξ)``, ``denom`` the rational
    function's denominator there, slope ``s``, knot derivatives ``d0, d1``), ``z`` the heights'
    normaliser."""
    numer = d1 * xi * xi + 2 * s * xi1 + d0 * (1 - xi) * (1 - xi)
    return 2 * torch.log(s) + torch.log(numer) - 2 * torch.log(denom) - torch.log(z)


def rational_quadratic_spline_inverse(
    y: Tensor, widths: Tensor, slopes: Tensor, derivatives: Tensor, bound: float
) -> tuple[Tensor, Tensor]:
    r"""Inverse of :func:`rational_quadratic_spline`: the root in ``[0, 1]`` of ``a ξ² + b ξ + c = 0``.

    ``ξ = 2c / (-b - √(b² - 4ac))``, the cancellation-free form (Durkan et al. 2019, Appendix A.3).
    Returns ``x`` and the *forward* ``log dy/dx`` at ``x`` (0 outside), from the same bin tables,
    so a density evaluated through the inverse does not compute them twice.

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.linspace(-6, 6, 7, dtype=torch.float64)
    >>> w, h, d = (torch.randn(7, k, generator=g, dtype=torch.float64) for k in (8, 8, 7))
    >>> y, log_det = rational_quadratic_spline(x, w, h, d, bound=5.0)
    >>> x_back, log_det_back = rational_quadratic_spline_inverse(y, w, h, d, bound=5.0)
    >>> torch.allclose(x_back, x, atol=1e-5), torch.allclose(log_det_back, log_det, atol=1e-5)
    (True, True)
    """
    u, params = _broadcast((y.clamp(-bound, bound) + bound) / (2 * bound), (widths, slopes, derivatives))
    w, cum_w, heights, cum_heights, d, z = _spline_params(*params)
    v = u * z.squeeze(-1)
    idx = (v.unsqueeze(-1) >= cum_heights[..., :-1]).sum(-1, keepdim=True)
    width, right_x, height, right_y, d0 = _gather(idx, w, cum_w, heights, cum_heights, d)
    (d1,) = _gather(idx + 1, d)
    s = height / width
    dv = v - right_y + height
    slope_sum = d0 + d1 - 2 * s
    a = height * (s - d0) + dv * slope_sum
    b = height * d0 - dv * slope_sum
    c = -s * dv
    root = torch.sqrt((b * b - 4 * a * c).clamp_min(0))
    xi = (2 * c / (-b - root)).clamp(0, 1)
    x = (right_x - width + xi * width) * (2 * bound) - bound
    xi1 = xi * (1 - xi)
    log_det = _log_slope(xi, xi1, s + slope_sum * xi1, s, d0, d1, z.squeeze(-1))
    inside = (y >= -bound) & (y <= bound)
    return torch.where(inside, x, y), torch.where(inside, log_det, torch.zeros_like(log_det))


class NeuralSplineTransform(CouplingTransform):
    r"""Rational-quadratic spline coupling: ``y_a = x_a``, ``y_b = RQS(x_b; θ(x_a))`` elementwise.

    Each transformed coordinate gets a monotone rational-quadratic spline with ``K = num_bins`` bins
    on ``[-B, B]`` (``B = bound``) and the identity outside (linear tails: the boundary derivatives
    are 1). Bin slopes are bounded to ``[e^-3, e^3]`` and the knot derivatives follow the adjacent
    slopes, which keeps every slope of the spline within about ``[4e-3, 60]`` (see
    :func:`rational_quadratic_spline`). ``log|det J| = Σ log RQS'(x_b)``; the inverse is closed form.

    Durkan, Bekasov, Murray & Papamakarios, "Neural Spline Flows", NeurIPS 2019 (arXiv:1906.04032).

    >>> import torch
    >>> t = NeuralSplineTransform(lambda x_a: x_a.new_zeros(x_a.shape[:-1] + (23,)), dim=2)
    >>> x = torch.tensor([0.3, -1.2])
    >>> torch.allclose(t(x), x)  # zero raw parameters: the identity spline
    True
    """

    option_defaults: ClassVar[dict[str, object]] = {
        **CouplingTransform.option_defaults,
        "num_bins": 8,
        "bound": 5.0,
    }

    @classmethod
    def default_hidden_dims(cls, dim: int, **options: object) -> list[int]:
        return [max(64, min(2 * dim, 512))]

    @classmethod
    def check_options(cls, dim: object, layer: str, options: Mapping[str, object]) -> dict[str, object]:
        options = super().check_options(dim, layer, options)
        bins = check_positive_int(options["num_bins"], "num_bins", layer)
        if bins < 2:
            raise ValueError(f"{layer}: option num_bins must be an integer >= 2, got {bins!r}")
        options["bound"] = check_positive_float(options["bound"], "bound", layer)
        return options

    @classmethod
    def param_shapes(cls, dim: int, **options: object) -> dict[str, tuple[int, ...]]:
        n = dim - options["split_dim"]  # type: ignore[operator]
        k: int = options["num_bins"]  # type: ignore[assignment]
        return {"widths": (n, k), "slopes": (n, k), "derivatives": (n, k - 1)}

    def couple(self, x_b: Tensor, params: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        y_b, log_det = rational_quadratic_spline(
            x_b, params["widths"], params["slopes"], params["derivatives"], self.options["bound"]
        )
        return y_b, log_det.sum(-1)

    def uncouple(self, y_b: Tensor, params: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        x_b, log_det = rational_quadratic_spline_inverse(
            y_b, params["widths"], params["slopes"], params["derivatives"], self.options["bound"]
        )
        return x_b, log_det.sum(-1)


class NeuralSpline(NetworkFlowModule):
    """Learnable rational-quadratic spline coupling layer; see :class:`NeuralSplineTransform`.

    Options: ``num_bins`` (default 8), ``bound`` (spline interval ``[-bound, bound]``, default 5;
    identity outside), ``split_dim`` (default ``dim // 2``) and ``hidden_dims`` (ReLU MLP widths,
    default ``[max(64, min(2 * dim, 512))]``). With ``dim = 1`` nothing is split off and the
    spline's knots are learned constants.

    >>> import torch
    >>> layer = NeuralSpline(4)
    >>> x = torch.randn(5, 4)
    >>> torch.allclose(layer(x), x, atol=1e-6)  # starts as the identity (up to float32 rounding)
    True
    """

    transform = NeuralSplineTransform


class ConditionalNeuralSpline(ConditionalNetworkFlowModule):
    """Spline coupling whose spline parameters are an MLP of ``cat(x_a, context)``.

    >>> import torch
    >>> layer = ConditionalNeuralSpline(4, context_dim=3)
    >>> layer.condition(torch.randn(5, 3))(torch.zeros(2, 5, 4)).shape
    torch.Size([2, 5, 4])
    """

    transform = NeuralSplineTransform
