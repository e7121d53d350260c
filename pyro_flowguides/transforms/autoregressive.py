"""Inverse autoregressive flow (Kingma et al. 2016): an affine autoregressive layer on a MADE.

Pyro's ``AffineAutoregressive`` is not reused: its inverse builds its starting point with
``torch.zeros`` in the default dtype (so it fails for float64 layers), and it bounds the
log-scales with a hard clamp whose gradient is passed straight through (the gradient then does not
match the value). The network is Pyro's MADE (:class:`pyro.nn.AutoRegressiveNN`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from pyro.nn import AutoRegressiveNN, ConditionalAutoRegressiveNN
from torch import Tensor, nn

from .base import check_positive_int
from .coupling import (
    ConditionalNetworkFlowModule,
    NetworkFlowModule,
    NetworkFlowTransform,
    cat_context,
    check_hidden_dims,
    check_positive_float,
    soft_clamp,
)


class MadeConditioner:
    """``x -> (μ, s̃)``: the forward pass of Pyro's (Conditional)AutoRegressiveNN, written out.

    Same parameters, masks and maths as the module's own forward (``cat(context, x)`` into the first
    masked layer), with less overhead per call, and a ``(B, C)`` context broadcast against
    ``(S, B, D)`` inputs (and the other way round).
    """

    def __init__(self, made: ConditionalAutoRegressiveNN, context: Tensor | None = None) -> None:
        self.made = made
        self.context = context

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]:
        made = self.made
        h = x if self.context is None else cat_context(self.context, x)
        layers = made.layers
        last = len(layers) - 1
        for i in range(last):
            layer = layers[i]
            h = torch.relu(F.linear(h, layer.weight * layer.mask, layer.bias))
        layer = layers[last]
        h = F.linear(h, layer.weight * layer.mask, layer.bias)
        mean, raw = h.unflatten(-1, (2, made.input_dim)).unbind(-2)
        return mean, raw


class AffineAutoregressiveTransform(NetworkFlowTransform):
    r"""IAF layer: ``y = μ(x) + exp(s) ⊙ x`` with ``s = c · tanh(s̃(x) / c)``; ``log|det J| = Σ s``.

    ``(μ_i, s̃_i)`` depend on ``x_1..x_{i-1}`` only (a MADE with the natural order), so the Jacobian
    is lower triangular with diagonal ``exp(s)``. Sampling (the forward map) is one network pass;
    the inverse ``x = (y - μ(x)) ⊙ exp(-s(x))`` is solved coordinate by coordinate, at most ``dim``
    passes (it stops as soon as a pass changes nothing). The log-scales are soft-clamped to
    ``(-c, c)``, ``c = max_log_scale`` (default 3).

    Kingma, Salimans, Jozefowicz, Chen, Sutskever & Welling, "Improved Variational Inference with
    Inverse Autoregressive Flow", NeurIPS 2016, Eq. (10); MADE: Germain et al., ICML 2015.

    >>> import torch
    >>> made = lambda x: (torch.cumsum(x, -1) - x, torch.zeros_like(x))  # μ_i = x_1 + ... + x_{i-1}
    >>> t = AffineAutoregressiveTransform(made, dim=3)
    >>> y = t(torch.tensor([1.0, 2.0, 3.0]))
    >>> y
    tensor([1., 3., 6.])
    >>> t.inv(y.clone())
    tensor([1., 2., 3.])
    """

    option_defaults: ClassVar[dict[str, object]] = {"hidden_dims": None, "max_log_scale": 3.0}

    @classmethod
    def check_options(cls, dim: object, layer: str, options: Mapping[str, object]) -> dict[str, object]:
        """Default ``hidden_dims=[2 * dim]``; each width must be ``>= dim`` (a MADE)."""
        dim = check_positive_int(dim, "dim", layer)
        options = cls.resolve_options(options)
        if options["hidden_dims"] is None:
            options["hidden_dims"] = [2 * dim]
        hidden = check_hidden_dims(options["hidden_dims"], layer)
        if min(hidden) < dim:
            raise ValueError(
                f"{layer}: option hidden_dims={hidden!r} has a layer narrower than dim={dim}; a MADE needs "
                f"every hidden width >= dim (e.g. hidden_dims=[{2 * dim}])"
            )
        options["hidden_dims"] = hidden
        options["max_log_scale"] = check_positive_float(options["max_log_scale"], "max_log_scale", layer)
        return options

    @classmethod
    def build_net(cls, dim: int, context_dim: int, options: Mapping[str, object]) -> nn.Module:
        """Pyro's MADE in the natural order, last layer zero: ``μ = 0, s = 0`` (the identity) at start."""
        hidden: list[int] = options["hidden_dims"]  # type: ignore[assignment]
        order = torch.arange(dim)
        with warnings.catch_warnings():  # dim = 1 ("consider an affine transformation") is fine here
            warnings.simplefilter("ignore", UserWarning)
            if context_dim:
                made: nn.Module = ConditionalAutoRegressiveNN(dim, context_dim, hidden, permutation=order)
            else:
                made = AutoRegressiveNN(dim, hidden, permutation=order)
        last = made.layers[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        return made

    @staticmethod
    def bind_context(net: nn.Module, context: Tensor | None) -> MadeConditioner:
        return MadeConditioner(net, context)  # type: ignore[arg-type]

    def _log_scale(self, raw: Tensor) -> Tensor:
        return soft_clamp(raw, self.options["max_log_scale"])  # type: ignore[arg-type]

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, raw = self.conditioner(x)
        log_scale = self._log_scale(raw)
        return mean + torch.exp(log_scale) * x, log_scale.sum(-1)

    def inverse_map(self, y: Tensor) -> Tensor:
        # after pass k, x_1..x_k are exact; a pass that changes nothing has reached the fixed point
        # (its result is kept: it carries the graph to the parameters, which y alone does not).
        # A trace cannot stop on the values: traced, all D passes run.
        may_stop = not torch.jit.is_tracing()
        x = y
        for _ in range(self.dim):
            mean, raw = self.conditioner(x)
            x_next = (y - mean) * torch.exp(-self._log_scale(raw))
            converged = may_stop and x_next.shape == x.shape and torch.equal(x_next, x)
            x = x_next
            if converged:
                break
        return x


class IAF(NetworkFlowModule):
    """Learnable inverse autoregressive flow layer; see :class:`AffineAutoregressiveTransform`.

    Options: ``hidden_dims`` (MADE widths, each ``>= dim``; default ``[2 * dim]``, two thirds of Pyro's
    ``3 * dim + 1``, for speed) and ``max_log_scale`` (soft bound on the log-scales, default 3).

    >>> import torch
    >>> layer = IAF(4)
    >>> x = torch.randn(5, 4)
    >>> torch.allclose(layer(x), x)  # starts as the identity
    True
    """

    transform = AffineAutoregressiveTransform
    autoregressive = True


class ConditionalIAF(ConditionalNetworkFlowModule):
    """IAF layer whose MADE also takes a context vector (every output may depend on all of it).

    >>> import torch
    >>> layer = ConditionalIAF(4, context_dim=3)
    >>> layer.condition(torch.randn(5, 3))(torch.zeros(2, 5, 4)).shape
    torch.Size([2, 5, 4])
    """

    transform = AffineAutoregressiveTransform
