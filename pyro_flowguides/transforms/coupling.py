"""Coupling layers: additive (NICE, Dinh et al. 2014) and affine (RealNVP, Dinh et al. 2017).

A coupling layer splits ``x = (x_a, x_b)`` at ``split_dim``, keeps ``y_a = x_a`` and transforms
``x_b`` elementwise with parameters that are a network's output for ``x_a`` (and, in the conditional
forms, a context vector). The Jacobian is block triangular, so the log-determinant is the sum of
the elementwise log-derivatives and the inverse is one pass of the same network. Half of the
coordinates pass unchanged: stacks put a :class:`~pyro_flowguides.transforms.permutation.Reverse`
between two coupling layers (``needs_permutation = True``).

The networks here (:class:`CouplingNet`) start with a zero last layer, so every layer starts as
the identity map.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import ClassVar

import torch
from pyro.distributions.conditional import ConditionalTransformModule
from torch import Tensor, nn

from .base import FlowTransform, LayerModule, ZeroHeadMLP, check_event_dim, check_positive_int, scalar

#: ``x_a -> raw parameters`` (flat, ``batch + (out_dim,)``): what a coupling transform is given.
Conditioner = Callable[[Tensor], Tensor]


# -- option checks shared by the coupling, spline and autoregressive layers ----------------------
def check_hidden_dims(value: object, layer: str, minimum: int = 1) -> list[int]:
    """A non-empty list of integers ``>= minimum`` (the widths of the hidden layers)."""
    ok = (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) > 0
        and all(isinstance(h, int) and not isinstance(h, bool) and h >= minimum for h in value)
    )
    if not ok:
        raise ValueError(
            f"{layer}: option hidden_dims must be a non-empty list of integers >= {minimum} "
            f"(the widths of the hidden layers), got {value!r}"
        )
    return list(value)  # type: ignore[arg-type]


def check_positive_float(value: object, option: str, layer: str) -> float:
    """A finite number ``> 0``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
        raise ValueError(f"{layer}: option {option} must be a finite number > 0, got {value!r}")
    return float(value)


def soft_clamp(raw: Tensor, bound: float) -> Tensor:
    """``bound · tanh(raw / bound)``: the identity near 0, smoothly bounded by ``±bound``.

    >>> soft_clamp(torch.tensor([-100.0, 0.0, 0.5, 100.0]), 3.0)
    tensor([-3.0000,  0.0000,  0.4954,  3.0000])
    """
    return torch.tanh(raw * scalar(1.0 / bound, raw.dtype)) * scalar(bound, raw.dtype)


def cat_context(x: Tensor, context: Tensor) -> Tensor:
    """``cat(x, context)`` along the last dimension, the batch shapes broadcast against each other."""
    batch = torch.broadcast_shapes(x.shape[:-1], context.shape[:-1])
    return torch.cat([x.expand(batch + x.shape[-1:]), context.expand(batch + context.shape[-1:])], dim=-1)


class CouplingNet(ZeroHeadMLP):
    """MLP ``cat(x_a, context) -> raw parameters`` of a coupling layer, starting at ``initial`` for
    every input. ``context`` (conditional layers) broadcasts against ``x_a``'s batch shape."""

    def __init__(self, in_dim: int, context_dim: int, hidden_dims: Sequence[int], initial: Tensor) -> None:
        super().__init__(in_dim + context_dim, hidden_dims, initial)

    def forward(self, x_a: Tensor, context: Tensor | None = None) -> Tensor:  # type: ignore[override]
        return super().forward(x_a if context is None else cat_context(x_a, context))


class NetworkFlowTransform(FlowTransform):
    """A layer whose raw parameters are a network's output for (part of) its input.

    ``conditioner`` is that network as a callable (with any context bound to it). The family
    validates its options (:meth:`check_options`), builds the network (:meth:`build_net`) and binds
    a context (or none) to it (:meth:`bind_context`); :class:`NetworkFlowModule` and
    :class:`ConditionalNetworkFlowModule` own the network.
    """

    needs_permutation: ClassVar[bool] = True

    def __init__(self, conditioner: Callable, dim: int, **options: object) -> None:
        options = self.check_options(dim, type(self).__name__, options)
        super().__init__({}, dim, **options)
        self.conditioner = conditioner

    @classmethod
    @abstractmethod
    def check_options(cls, dim: object, layer: str, options: Mapping[str, object]) -> dict[str, object]:
        """Fill in the defaults of ``options`` and validate them; ``ValueError`` naming ``layer``."""

    @classmethod
    @abstractmethod
    def build_net(cls, dim: int, context_dim: int, options: Mapping[str, object]) -> nn.Module:
        """The network (taking a context of ``context_dim`` when it is > 0), starting at the identity."""

    @staticmethod
    @abstractmethod
    def bind_context(net: nn.Module, context: Tensor | None) -> Callable:
        """The conditioner callable for a fixed context (``None`` for an unconditional network)."""


class CouplingTransform(NetworkFlowTransform):
    """Shared maths of a coupling layer; subclasses define :meth:`couple` and :meth:`uncouple`.

    ``conditioner`` maps ``x_a`` (``batch + (split_dim,)``) to the flat raw parameters
    ``batch' + (n,)``, where ``batch'`` may be larger than ``batch`` (a batch of contexts); the
    output then has shape ``batch' + (dim,)``. :meth:`param_shapes` gives the per-sample shapes of
    the raw parameters the flat output is cut into.
    """

    option_defaults: ClassVar[dict[str, object]] = {"split_dim": None, "hidden_dims": None}

    def __init__(self, conditioner: Conditioner, dim: int, **options: object) -> None:
        super().__init__(conditioner, dim, **options)
        self.split_dim: int = self.options["split_dim"]  # type: ignore[assignment]
        shapes = self.param_shapes(dim, **self.options)
        self._shapes = list(shapes.items())
        self._sizes = [math.prod(s) for s in shapes.values()]

    # -- options --------------------------------------------------------------------------
    @classmethod
    def default_hidden_dims(cls, dim: int, **options: object) -> list[int]:
        return [max(64, 2 * dim)]

    @classmethod
    def check_options(cls, dim: object, layer: str, options: Mapping[str, object]) -> dict[str, object]:
        """Fill in defaults and validate; ``split_dim`` defaults to ``dim // 2``."""
        dim = check_positive_int(dim, "dim", layer)
        options = cls.resolve_options(options)
        if dim == 1:  # nothing to condition on: an elementwise map with learned parameters
            if options["split_dim"] not in (None, 0):
                raise ValueError(f"{layer}: with dim=1 there is nothing to split; leave split_dim unset")
            options["split_dim"] = 0
        else:
            if options["split_dim"] is None:
                options["split_dim"] = dim // 2
            split = check_positive_int(options["split_dim"], "split_dim", layer)
            if split >= dim:
                raise ValueError(
                    f"{layer}: option split_dim={split} must be < dim={dim} (coordinates split_dim.. are "
                    f"transformed); choose 1 <= split_dim <= {dim - 1}"
                )
        if options["hidden_dims"] is None:
            options["hidden_dims"] = cls.default_hidden_dims(dim, **options)
        options["hidden_dims"] = check_hidden_dims(options["hidden_dims"], layer)
        return options

    @classmethod
    def initial_params(cls, dim: int, **options: object) -> dict[str, Tensor]:
        return {name: torch.zeros(shape) for name, shape in cls.param_shapes(dim, **options).items()}

    @classmethod
    def build_net(cls, dim: int, context_dim: int, options: Mapping[str, object]) -> nn.Module:
        """The conditioner network, starting at :meth:`initial_params` for every input."""
        initial = cls.initial_params(dim, **options)
        flat = torch.cat([initial[name].reshape(-1) for name in cls.param_shapes(dim, **options)])
        return CouplingNet(options["split_dim"], context_dim, options["hidden_dims"], flat)  # type: ignore[arg-type]

    @staticmethod
    def bind_context(net: nn.Module, context: Tensor | None) -> Conditioner:
        """The conditioner ``x_a -> raw parameters`` for a fixed context."""
        if context is None:
            return net
        return partial(net, context=context)

    # -- what a coupling family defines ------------------------------------------------------
    @abstractmethod
    def couple(self, x_b: Tensor, params: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``y_b`` and the log-determinant (summed over the last dimension)."""

    @abstractmethod
    def uncouple(self, y_b: Tensor, params: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``x_b`` from ``y_b``, and the forward log-determinant at ``x_b`` (as :meth:`couple`'s)."""

    # -- shared machinery -------------------------------------------------------------------
    def _split(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        k = self.split_dim
        x_a, x_b = x[..., :k], x[..., k:]
        flat = self.conditioner(x_a)
        batch = flat.shape[:-1]
        if batch != x.shape[:-1]:  # a batch of contexts larger than x's batch
            x_a = x_a.expand(batch + x_a.shape[-1:])
            x_b = x_b.expand(batch + x_b.shape[-1:])
        params = {
            name: chunk.reshape(batch + shape)
            for (name, shape), chunk in zip(self._shapes, flat.split(self._sizes, dim=-1), strict=True)
        }
        return x_a, x_b, params

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x_a, x_b, params = self._split(x)
        y_b, log_det = self.couple(x_b, params)
        return torch.cat([x_a, y_b], dim=-1), log_det

    def inverse_map(self, y: Tensor) -> Tensor:
        return self.inverse_and_log_det(y)[0]

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        y_a, y_b, params = self._split(y)
        x_b, log_det = self.uncouple(y_b, params)
        return torch.cat([y_a, x_b], dim=-1), log_det


class AdditiveCouplingTransform(CouplingTransform):
    r"""``y_a = x_a``, ``y_b = x_b + m(x_a)``; ``log|det J| = 0`` exactly (volume preserving).

    Dinh, Krueger & Bengio, "NICE: Non-linear Independent Components Estimation", 2014 (arXiv:1410.8516),
    Section 3.2.

    >>> import torch
    >>> t = AdditiveCouplingTransform(lambda x_a: 2 * x_a, dim=2)
    >>> t(torch.tensor([1.0, 0.5]))
    tensor([1.0000, 2.5000])
    """

    volume_preserving: ClassVar[bool] = True

    @classmethod
    def param_shapes(cls, dim: int, **options: object) -> dict[str, tuple[int, ...]]:
        return {"shift": (dim - options["split_dim"],)}  # type: ignore[operator]

    def couple(self, x_b: Tensor, params: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return x_b + params["shift"], x_b.new_zeros(x_b.shape[:-1])

    def uncouple(self, y_b: Tensor, params: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return y_b - params["shift"], y_b.new_zeros(y_b.shape[:-1])


class AffineCouplingTransform(CouplingTransform):
    r"""``y_a = x_a``, ``y_b = x_b · exp(s) + t`` with ``s = c · tanh(s̃(x_a) / c)``; ``log|det J| = Σ s``.

    ``(s̃, t)`` is the conditioner's output; the smooth soft clamp bounds the log-scales by
    ``c = max_log_scale`` (default 3) without cutting their gradients, as a hard clamp would.
    Inverse: ``x_b = (y_b - t) · exp(-s)``.

    Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", ICLR 2017, Section 3.

    >>> import torch
    >>> net = lambda x_a: torch.cat([x_a, torch.ones_like(x_a)], -1)  # (log-scale, shift)
    >>> t = AffineCouplingTransform(net, dim=2)
    >>> y = t(torch.tensor([0.0, 2.0]))
    >>> y
    tensor([0., 3.])
    >>> t.inv(y.clone())
    tensor([0., 2.])
    """

    option_defaults: ClassVar[dict[str, object]] = {**CouplingTransform.option_defaults, "max_log_scale": 3.0}

    @classmethod
    def check_options(cls, dim: object, layer: str, options: Mapping[str, object]) -> dict[str, object]:
        options = super().check_options(dim, layer, options)
        options["max_log_scale"] = check_positive_float(options["max_log_scale"], "max_log_scale", layer)
        return options

    @classmethod
    def param_shapes(cls, dim: int, **options: object) -> dict[str, tuple[int, ...]]:
        n = dim - options["split_dim"]  # type: ignore[operator]
        return {"log_scale": (n,), "shift": (n,)}

    def couple(self, x_b: Tensor, params: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        log_scale = soft_clamp(params["log_scale"], self.options["max_log_scale"])  # type: ignore[arg-type]
        return params["shift"] + torch.exp(log_scale) * x_b, log_scale.sum(-1)

    def uncouple(self, y_b: Tensor, params: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        log_scale = soft_clamp(params["log_scale"], self.options["max_log_scale"])  # type: ignore[arg-type]
        return (y_b - params["shift"]) * torch.exp(-log_scale), log_scale.sum(-1)


# -- modules --------------------------------------------------------------------------------------
class NetworkFlowModule(LayerModule):
    """A learnable layer whose parameters are a network of its input (coupling, autoregressive).

    The transform class builds the network (``build_net``) and validates the options
    (``check_options``); the module owns the network and hands it to the transform as a callable.
    """

    transform: ClassVar[type[NetworkFlowTransform]]

    def __init__(self, dim: int, **options: object) -> None:
        super().__init__(cache_size=1)
        options = self.transform.check_options(dim, type(self).__name__, options)
        self.dim = dim
        self.net = self.transform.build_net(dim, 0, options)
        self.layer = self.transform(self.transform.bind_context(self.net, None), dim, **options)


class ConditionalNetworkFlowModule(ConditionalTransformModule):
    """A layer whose network also takes a context; ``condition(context)`` gives the map.

    ``context`` has shape ``batch + (context_dim,)`` and broadcasts against the inputs' batch shape
    (e.g. context ``(B, C)`` with inputs ``(S, B, D)``).
    """

    transform: ClassVar[type[NetworkFlowTransform]]
    needs_permutation = True

    def __init__(self, dim: int, context_dim: int, **options: object) -> None:
        super().__init__()
        layer = type(self).__name__
        options = self.transform.check_options(dim, layer, options)
        self.dim = dim
        self.context_dim = check_positive_int(context_dim, "context_dim", layer)
        self.options = options
        self.net = self.transform.build_net(dim, context_dim, options)

    @property
    def volume_preserving(self) -> bool:
        return self.transform.volume_preserving

    def condition(self, context: Tensor) -> FlowTransform:
        check_event_dim(context, self.context_dim, type(self).__name__, what="context")
        return self.transform(self.transform.bind_context(self.net, context), self.dim, **self.options)

    def extra_repr(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"dim={self.dim}, context_dim={self.context_dim}{opts}"


class AdditiveCoupling(NetworkFlowModule):
    """Learnable additive coupling layer (NICE); see :class:`AdditiveCouplingTransform` for the map.

    Options: ``split_dim`` (default ``dim // 2``; coordinates ``split_dim..`` are shifted) and
    ``hidden_dims`` (widths of the ReLU MLP ``m``, default ``[max(64, 2 * dim)]``). With ``dim = 1``
    nothing is split off and the shift is a learned constant.

    >>> import torch
    >>> layer = AdditiveCoupling(4)
    >>> x = torch.randn(5, 4)
    >>> y = layer(x)
    >>> torch.equal(layer.log_abs_det_jacobian(x, y), torch.zeros(5))
    True
    """

    transform = AdditiveCouplingTransform


class ConditionalAdditiveCoupling(ConditionalNetworkFlowModule):
    """Additive coupling whose shift ``m(x_a, context)`` also sees a context vector.

    >>> import torch
    >>> layer = ConditionalAdditiveCoupling(4, context_dim=3)
    >>> layer.condition(torch.randn(5, 3))(torch.zeros(2, 5, 4)).shape
    torch.Size([2, 5, 4])
    """

    transform = AdditiveCouplingTransform


class AffineCoupling(NetworkFlowModule):
    """Learnable affine coupling layer (RealNVP); see :class:`AffineCouplingTransform` for the map.

    Options: ``split_dim`` (default ``dim // 2``), ``hidden_dims`` (ReLU MLP widths, default
    ``[max(64, 2 * dim)]``) and ``max_log_scale`` (bound ``c`` of the soft-clamped log-scales,
    default 3). With ``dim = 1`` nothing is split off and the
    log-scale and shift are learned constants.

    >>> import torch
    >>> layer = AffineCoupling(4)
    >>> x = torch.randn(5, 4)
    >>> torch.allclose(layer.inv(layer(x).clone()), x)
    True
    """

    transform = AffineCouplingTransform


class ConditionalAffineCoupling(ConditionalNetworkFlowModule):
    """Affine coupling whose log-scales and shifts are an MLP of ``cat(x_a, context)``.

    >>> import torch
    >>> layer = ConditionalAffineCoupling(4, context_dim=3)
    >>> layer.condition(torch.randn(5, 3))(torch.zeros(2, 5, 4)).shape
    torch.Size([2, 5, 4])
    """

    transform = AffineCouplingTransform
