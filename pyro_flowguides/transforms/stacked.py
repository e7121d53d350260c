"""Many layers of one family evaluated as one transform, parameters stacked on a layer dimension."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import torch
from torch import Tensor

from .base import ConditionalFlowModule, FlowModule, FlowTransform, check_positive_int


class StackedTransform(FlowTransform):
    r"""``f_K ∘ … ∘ f_1`` for ``K = num_layers`` layers of one family ``layer``.

    Every raw parameter of shape ``s`` is stored once with shape ``(K, *s)`` (for conditional
    layers ``batch + (K, *s)``), so an optimiser sees a handful of tensors instead of ``K`` times
    as many; families with a ``constrain`` classmethod have it computed once for all ``K`` layers
    per call; families that also define ``forward_and_log_det_input`` and ``log_det_terms`` (planar)
    have all ``K`` log-dets computed in one vectorised call after the layers have run; and a
    conditioner can emit all layers' parameters at once (the amortised Sylvester flows of van den
    Berg et al. 2018, Section 4). ``log|det J| = Σ_k log|det J_k|``. For families
    that need permutations (triangular Sylvester), coordinates are reversed between layers and
    once more at the end when the number of reversals is odd, so the stack keeps their order.

    >>> import torch
    >>> from pyro_flowguides.transforms.planar import PlanarTransform
    >>> shapes = StackedTransform.param_shapes(3, layer=PlanarTransform, num_layers=4)
    >>> shapes["u"]
    (4, 3)
    """

    @classmethod
    def resolve_options(cls, options: Mapping[str, object]) -> dict[str, object]:
        options = dict(options)
        layer = options.pop("layer", None)
        if not (isinstance(layer, type) and issubclass(layer, FlowTransform)):
            raise ValueError(f"StackedTransform: option layer must be a FlowTransform class, got {layer!r}")
        num_layers = check_positive_int(options.pop("num_layers", None), "num_layers", cls.__name__)
        return {"layer": layer, "num_layers": num_layers, **layer.resolve_options(options)}

    @classmethod
    def preserves_volume(cls, options: Mapping[str, object]) -> bool:
        return options["layer"].volume_preserving

    @classmethod
    def param_shapes(cls, dim: int, *, layer: type[FlowTransform], num_layers: int, **options: object):
        return {name: (num_layers, *shape) for name, shape in layer.param_shapes(dim, **options).items()}

    @classmethod
    def initial_params(cls, dim: int, *, layer: type[FlowTransform], num_layers: int, **options: object):
        starts = [layer.initial_params(dim, **options) for _ in range(num_layers)]
        return {name: torch.stack([start[name] for start in starts]) for name in starts[0]}

    def __init__(self, params, dim: int, *, layer: type[FlowTransform], num_layers: int, **options: object):
        super().__init__(params, dim, layer=layer, num_layers=num_layers, **options)
        self.volume_preserving = layer.volume_preserving
        self._ranks = {name: len(shape) for name, shape in layer.param_shapes(dim, **options).items()}
        self.layers = [layer(partial(self._layer_params, k), dim, **options) for k in range(num_layers)]
        self._reverses = layer.needs_permutation
        self._constrain_once = hasattr(layer, "constrain")
        self._log_dets_at_end = self._constrain_once and hasattr(layer, "log_det_terms")
        self._raw_slices: list[dict[str, Tensor]] | None = None
        self._constrained_stack: tuple[Tensor, ...] | None = None

    def _layer_params(self, k: int) -> dict[str, Tensor]:
        if self._raw_slices is None:  # a layer used on its own, outside forward/inverse
            self._hand_out_params()
        return self._raw_slices[k]

    def _hand_out_params(self) -> None:
        """Give each layer its slice of the stacked parameters, constrained in one vectorised call
        when the family has ``constrain``. ``unbind`` is one op per parameter (one ``stack`` in the
        backward pass), where slicing per layer would be one op per parameter and layer."""
        raw = self.raw_params()
        name, rank = next(iter(self._ranks.items()))
        layer_dim = raw[name].dim() - rank - 1  # after any batch (context) dimensions
        if self._constrain_once:
            self._constrained_stack = self.layers[0].constrain(raw)
            slices = [c.unbind(layer_dim) for c in self._constrained_stack]
            for layer, given in zip(self.layers, zip(*slices, strict=True), strict=True):
                layer.given_constrained = given
        else:
            unbound = {name: p.unbind(layer_dim) for name, p in raw.items()}
            self._raw_slices = [{name: p[k] for name, p in unbound.items()} for k in range(len(self.layers))]

    def _reversals(self) -> list[bool]:
        """Whether to reverse the coordinates after each layer."""
        flags = [self._reverses and k + 1 < len(self.layers) for k in range(len(self.layers))]
        if sum(flags) % 2:
            flags[-1] = True
        return flags

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._hand_out_params()
        at_end = self._log_dets_at_end
        parts = []  # per layer: its log-det, or what its log-det needs when they are computed at the end
        for layer, reverse in zip(self.layers, self._reversals(), strict=False):
            x, part = layer.forward_and_log_det_input(x) if at_end else layer.forward_and_log_det(x)
            parts.append(part)
            if reverse:
                x = x.flip(-1)
        if at_end:  # one vectorised call on (..., K, m), not a handful of autograd nodes per layer
            terms = self.layers[0].log_det_terms(self._constrained_stack, torch.stack(parts, -2))
            return x, terms.sum((-2, -1))  # the layers broadcast x against their parameters already
        log_det = torch.stack(torch.broadcast_tensors(*parts)).sum(0)  # one sum, not K - 1 adds
        return x, log_det.expand(x.shape[:-1])

    def inverse_map(self, y: Tensor) -> Tensor:
        self._hand_out_params()
        for layer, reverse in zip(reversed(self.layers), reversed(self._reversals()), strict=False):
            if reverse:
                y = y.flip(-1)
            y = layer.inverse_map(y)
        return y


class FlowStack(FlowModule):
    """``num_layers`` learnable layers of family ``layer`` as one module (see :class:`StackedTransform`).

    >>> import torch
    >>> from pyro_flowguides.transforms.planar import PlanarTransform
    >>> stack = FlowStack(3, layer=PlanarTransform, num_layers=8)
    >>> [tuple(p.shape) for p in stack.parameters()]
    [(8, 3), (8, 3), (8, 1)]
    """

    transform = StackedTransform


class ConditionalFlowStack(ConditionalFlowModule):
    """``num_layers`` layers whose parameters are all one network's output for a context vector."""

    transform = StackedTransform
