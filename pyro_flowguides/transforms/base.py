"""The three pieces every flow family is built from.

* :class:`FlowTransform`: the parameter-free maths of one layer, a ``torch`` ``Transform`` whose
  raw (unconstrained) parameters come from a callable or a mapping. Parameters may carry leading
  batch dimensions (one set per context); inputs broadcast against them like torch tensors do.
* :class:`FlowModule`: a Pyro ``TransformModule`` that owns the raw parameters as ``nn.Parameter``.
* :class:`ConditionalFlowModule`: a Pyro ``ConditionalTransformModule`` whose raw parameters are the
  output of a small network of a context vector; ``condition(context)`` returns a :class:`FlowTransform`.

This is Pyro's ``ConditionedPlanar`` / ``Planar`` / ``ConditionalPlanar`` pattern written once.
"""

from __future__ import annotations

import itertools
import math
from abc import ABCMeta, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from typing import ClassVar

import torch
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor, nn
from torch.distributions import Transform, constraints

RawParams = Mapping[str, Tensor]
ParamSource = Callable[[], RawParams] | RawParams


def check_event_dim(x: Tensor, dim: int, layer: str, what: str = "input") -> None:
    """Raise a ``ValueError`` naming the layer when ``x``'s last dimension is not ``dim``."""
    if torch.jit.is_tracing():  # shapes are fixed by the trace; a check would only warn
        return
    if x.dim() == 0 or x.shape[-1] != dim:
        raise ValueError(
            f"{layer}: expected {what} with last dimension {dim}, got shape {tuple(x.shape)}; "
            f"the layer was built with dim={dim}"
        )


def check_positive_int(value: object, option: str, layer: str, upper: int | None = None) -> int:
    """Validate an integer option such as the number of reflections or the bottleneck size."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{layer}: option {option} must be an integer >= 1, got {value!r}")
    if upper is not None and value > upper:
        raise ValueError(
            f"{layer}: option {option}={value} is larger than the dimension {upper}; "
            f"choose {option} <= {upper}"
        )
    return value


@cache
def scalar(value: float, dtype: torch.dtype) -> Tensor:
    """``value`` as a 0-dim CPU tensor of ``dtype``, for arithmetic in hot paths.

    A Python number is wrapped into a float64 tensor and converted to the operand's dtype by every
    op, and again by its backward; a 0-dim tensor of the right dtype is not (0-dim CPU tensors
    also take part in CUDA ops).

    >>> scalar(0.5, torch.float32)
    tensor(0.5000)
    """
    return torch.tensor(value, dtype=dtype)


class FlowTransform(Transform, metaclass=ABCMeta):
    """Parameter-free maths of one invertible layer ``y = f(x; θ)`` with an exact log-determinant.

    Subclasses define :meth:`param_shapes`, :meth:`initial_params` (raw values at which the
    layer is the identity, or close to it), :meth:`forward_and_log_det` and :meth:`inverse_map`.
    The log-determinant computed with the forward pass is kept until
    :meth:`log_abs_det_jacobian` asks for it, so a sample and its density cost one pass.
    """

    domain = constraints.independent(constraints.real, 1)
    codomain = constraints.independent(constraints.real, 1)
    bijective = True
    volume_preserving: ClassVar[bool] = False
    #: True for coupling and autoregressive layers: stacks put a :class:`Reverse` between them.
    needs_permutation: ClassVar[bool] = False
    #: Options the layer takes, with their defaults.
    option_defaults: ClassVar[dict[str, object]] = {}

    def __init__(self, params: ParamSource, dim: int, **options: object) -> None:
        super().__init__(cache_size=1)
        self.dim = dim
        self.options = options
        self._param_source = params
        self._kept: tuple[Tensor, Tensor, Tensor] | None = None
        self.given_constrained: tuple[Tensor, ...] | None = None

    @classmethod
    def resolve_options(cls, options: Mapping[str, object]) -> dict[str, object]:
        """Fill in defaults; reject options the layer does not take, naming those it does."""
        unknown = sorted(set(options) - set(cls.option_defaults))
        if unknown:
            takes = ", ".join(sorted(cls.option_defaults)) or "none"
            raise ValueError(
                f"{cls.__name__}: unknown option(s) {', '.join(unknown)}; options it takes: {takes}"
            )
        return {**cls.option_defaults, **options}

    @classmethod
    def preserves_volume(cls, options: Mapping[str, object]) -> bool:
        """Whether the layer built with ``options`` has log-determinant 0."""
        return cls.volume_preserving

    # -- what a family defines ------------------------------------------------------------
    @classmethod
    def param_shapes(cls, dim: int, **options: object) -> dict[str, tuple[int, ...]]:
        """Shapes of the raw parameters; also validates ``options``. None by default (a parameter-free
        layer, or one whose parameters are a network's output)."""
        return {}

    @classmethod
    def initial_params(cls, dim: int, **options: object) -> dict[str, Tensor]:
        """Raw parameter values to start from: the identity map, symmetry broken where needed."""
        return {name: torch.zeros(shape) for name, shape in cls.param_shapes(dim, **options).items()}

    @abstractmethod
    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``y = f(x)`` and ``log|det ∂y/∂x|`` (shape ``x.shape[:-1]``)."""

    @abstractmethod
    def inverse_map(self, y: Tensor) -> Tensor:
        """Return ``x = f^{-1}(y)``."""

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor | None]:
        """``x = f^{-1}(y)`` and, for families whose inverse yields it (couplings), the forward
        ``log|det ∂y/∂x|`` at ``x``, which then costs no second pass; ``None`` otherwise."""
        return self.inverse_map(y), None

    # -- shared machinery -----------------------------------------------------------------
    def constrained(self) -> tuple[Tensor, ...]:
        """The parameters the maths uses: ``type(self).constrain(raw_params())``, or those given.

        Families with a ``constrain(raw)`` classmethod (which must accept leading batch dimensions)
        let a fused stack compute it once for all its layers and hand each layer its slice.
        """
        if self.given_constrained is not None:
            return self.given_constrained
        return self.constrain(self.raw_params())  # type: ignore[attr-defined]

    def raw_params(self) -> RawParams:
        source = self._param_source
        return source() if callable(source) else source

    def _call(self, x: Tensor) -> Tensor:
        check_event_dim(x, self.dim, type(self).__name__)
        y, log_det = self.forward_and_log_det(x)
        self._kept = (x, y, log_det)
        return y

    def _inverse(self, y: Tensor) -> Tensor:
        check_event_dim(y, self.dim, type(self).__name__)
        x, log_det = self.inverse_and_log_det(y)
        if log_det is not None:
            self._kept = (x, y, log_det)
        return x

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        kept, self._kept = self._kept, None
        if kept is not None and kept[0] is x and kept[1] is y:
            return kept[2]
        check_event_dim(x, self.dim, type(self).__name__)
        return self.forward_and_log_det(x)[1]

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_kept"] = None
        state["given_constrained"] = None
        if "_raw_slices" in state:
            state["_raw_slices"] = None
            state["_constrained_stack"] = None
        state["_cached_x_y"] = None, None
        return state


class LayerModule(TransformModule):
    """A Pyro ``TransformModule`` that owns parameters and hands the maths to ``self.layer``,
    a :class:`FlowTransform` built in the subclass's ``__init__``."""

    domain = constraints.independent(constraints.real, 1)
    codomain = constraints.independent(constraints.real, 1)
    bijective = True
    layer: FlowTransform
    dim: int

    @property
    def volume_preserving(self) -> bool:
        return self.layer.volume_preserving

    @property
    def needs_permutation(self) -> bool:
        return self.layer.needs_permutation

    def _call(self, x: Tensor) -> Tensor:
        return self.layer._call(x)

    def _inverse(self, y: Tensor) -> Tensor:
        return self.layer._inverse(y)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return self.layer.log_abs_det_jacobian(x, y)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_cached_x_y"] = None, None  # tensors inside a graph can be neither copied nor pickled
        return state

    __repr__ = nn.Module.__repr__  # not Transform's bare class name

    def extra_repr(self) -> str:
        opts = "".join(f", {k}={getattr(v, '__name__', v)!r}" for k, v in self.layer.options.items())
        return f"dim={self.dim}{opts}"


class FlowModule(LayerModule):
    """A learnable layer: a :class:`FlowTransform` whose raw parameters are ``nn.Parameter``."""

    transform: ClassVar[type[FlowTransform]]

    def __init__(self, dim: int, **options: object) -> None:
        super().__init__(cache_size=1)
        layer = type(self).__name__
        check_positive_int(dim, "dim", layer)
        options = self.transform.resolve_options(options)
        shapes = self.transform.param_shapes(dim, **options)
        initial = self.transform.initial_params(dim, **options)
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(initial[name].reshape(shape).clone()))
        self.dim = dim
        self.layer = self.transform(self._raw_params, dim, **options)

    def _raw_params(self) -> dict[str, Tensor]:
        return dict(self.named_parameters(recurse=False))


class ZeroHeadMLP(nn.Module):
    """ReLU MLP ``in_dim -> len(initial)`` whose last layer starts at zero weight and bias ``initial``,
    so every input gives ``initial`` (a flow layer starts as the identity); with no input at all
    (``in_dim = 0``) the output is a learned constant."""

    def __init__(self, in_dim: int, hidden_dims: Sequence[int], initial: Tensor) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        self.head: nn.Linear | None = None
        if in_dim == 0:
            self.constant = nn.Parameter(initial.reshape(-1).clone())
            return
        widths = [in_dim, *hidden_dims]
        self.layers.extend(nn.Linear(n_in, n_out) for n_in, n_out in itertools.pairwise(widths))
        self.head = nn.Linear(widths[-1], initial.numel())
        nn.init.zeros_(self.head.weight)
        with torch.no_grad():
            self.head.bias.copy_(initial.reshape(-1))

    def forward(self, h: Tensor) -> Tensor:
        if self.head is None:
            return self.constant.expand(h.shape[:-1] + self.constant.shape)
        for layer in self.layers:
            h = torch.relu(layer(h))
        return self.head(h)


class Conditioner(ZeroHeadMLP):
    """MLP ``context -> raw parameters`` (a dict shaped by ``shapes``), starting at ``initial``."""

    def __init__(
        self,
        context_dim: int,
        shapes: Mapping[str, tuple[int, ...]],
        initial: Mapping[str, Tensor],
        hidden_dims: Sequence[int],
    ) -> None:
        super().__init__(context_dim, hidden_dims, torch.cat([initial[name].reshape(-1) for name in shapes]))
        self.shapes = dict(shapes)
        self.sizes = [math.prod(s) for s in self.shapes.values()]

    def forward(self, context: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        out = super().forward(context)
        batch = out.shape[:-1]
        return {
            name: chunk.reshape(batch + shape)
            for (name, shape), chunk in zip(self.shapes.items(), out.split(self.sizes, dim=-1), strict=True)
        }


class ConditionalFlowModule(ConditionalTransformModule):
    """A layer whose raw parameters are a network's output for a context vector.

    ``condition(context)`` with ``context`` of shape ``batch + (context_dim,)`` returns a
    :class:`FlowTransform` with parameters of batch shape ``batch``.
    """

    transform: ClassVar[type[FlowTransform]]

    def __init__(
        self,
        dim: int,
        context_dim: int,
        hidden_dims: Sequence[int] | None = None,
        **options: object,
    ) -> None:
        super().__init__()
        layer = type(self).__name__
        check_positive_int(dim, "dim", layer)
        check_positive_int(context_dim, "context_dim", layer)
        options = self.transform.resolve_options(options)
        shapes = self.transform.param_shapes(dim, **options)
        if hidden_dims is None:
            hidden_dims = [max(32, 2 * context_dim)]
        self.dim = dim
        self.context_dim = context_dim
        self.options = options
        self.conditioner = Conditioner(
            context_dim, shapes, self.transform.initial_params(dim, **options), hidden_dims
        )

    @property
    def volume_preserving(self) -> bool:
        return self.transform.preserves_volume(self.options)

    @property
    def needs_permutation(self) -> bool:
        return self.transform.needs_permutation

    def extra_repr(self) -> str:
        opts = "".join(f", {k}={getattr(v, '__name__', v)!r}" for k, v in self.options.items())
        return f"dim={self.dim}, context_dim={self.context_dim}{opts}"

    def condition(self, context: Tensor) -> FlowTransform:
        check_event_dim(context, self.context_dim, type(self).__name__, what="context")
        return self.transform(self.conditioner(context), self.dim, **self.options)
