"""The registry of flow layers: ``available()``, ``make(...)``, ``stack(...)`` and ``option_names(...)``.

>>> from pyro_flowguides import flows
>>> layer = flows.make("planar", 3)
>>> conditional = flows.make("planar", 3, context_dim=5)
>>> [type(m).__name__ for m in flows.stack("affine_coupling", 4, num_flows=2)]
['AffineCoupling', 'Reverse', 'AffineCoupling', 'Reverse']
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from importlib import import_module

from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.torch_transform import TransformModule
from torch import nn

from .transforms.base import ConditionalFlowModule, FlowModule
from .transforms.permutation import Reverse
from .transforms.stacked import ConditionalFlowStack, FlowStack

Layer = TransformModule | ConditionalTransformModule
FlowSpec = str | Sequence[str] | Callable[[int], Layer]

# name -> (module under pyro_flowguides.transforms, unconditional class, conditional class)
_REGISTRY: dict[str, tuple[str, str, str]] = {
    "planar": ("planar", "Planar", "ConditionalPlanar"),
    "radial": ("radial", "Radial", "ConditionalRadial"),
    "orthogonal_sylvester": ("sylvester", "OrthogonalSylvester", "ConditionalOrthogonalSylvester"),
    "householder_sylvester": ("sylvester", "HouseholderSylvester", "ConditionalHouseholderSylvester"),
    "triangular_sylvester": ("sylvester", "TriangularSylvester", "ConditionalTriangularSylvester"),
    "generalized_planar": ("generalized_planar", "GeneralizedPlanar", "ConditionalGeneralizedPlanar"),
    "householder": ("householder", "Householder", "ConditionalHouseholder"),
    "additive_coupling": ("coupling", "AdditiveCoupling", "ConditionalAdditiveCoupling"),
    "affine_coupling": ("coupling", "AffineCoupling", "ConditionalAffineCoupling"),
    "lu_linear": ("lu_linear", "LULinear", "ConditionalLULinear"),
    "iaf": ("autoregressive", "IAF", "ConditionalIAF"),
    "neural_spline": ("spline", "NeuralSpline", "ConditionalNeuralSpline"),
}
_USER_LAYERS: dict[str, tuple[Callable[..., TransformModule], Callable[..., ConditionalTransformModule]]] = {}


def available() -> list[str]:
    """Names of the registered layers, sorted."""
    return sorted([*_REGISTRY, *_USER_LAYERS])


def register(
    name: str,
    unconditional: Callable[..., TransformModule],
    conditional: Callable[..., ConditionalTransformModule],
) -> None:
    """Add a layer family.

    ``unconditional(dim, **options)`` and ``conditional(dim, context_dim, **options)`` build its layers.
    In a list of names a layer gets only the options its family takes when the family declares them
    (classes whose ``transform`` has ``option_defaults``); a plain factory gets every option.
    """
    if name in _REGISTRY or name in _USER_LAYERS:
        raise ValueError(f"flow layer {name!r} is already registered")
    _USER_LAYERS[name] = (unconditional, conditional)


def make(name: str, dim: int, *, context_dim: int | None = None, **options: object) -> Layer:
    """One layer of family ``name`` on ``dim`` coordinates; conditional when ``context_dim`` is given."""
    unconditional, conditional = _classes(name)
    if context_dim is None:
        return unconditional(dim, **options)
    return conditional(dim, context_dim=context_dim, **options)


def parameters_from_context(name: str) -> bool:
    """Whether family ``name``'s conditional layers compute all their parameters from the context
    alone (planar, radial, Sylvester, …: a network ``context -> parameters``), rather than feeding the
    context into a network that also reads the layer's inputs (coupling, IAF, spline).

    >>> parameters_from_context("orthogonal_sylvester"), parameters_from_context("affine_coupling")
    (True, False)
    """
    _, conditional = _classes(name)
    return isinstance(conditional, type) and issubclass(conditional, ConditionalFlowModule)


def _make_each(
    names: list[str], dim: int, context_dim: int | None, options: dict[str, object]
) -> list[Layer]:
    """The layers of a list of names, each given the options its family takes, so that
    ``["lu_linear", "iaf"]`` takes the IAF's ``hidden_dims``; an option that no family in the list
    takes is an error. A family that does not declare its options (:func:`option_names`) gets all."""
    takes = {name: option_names(name, conditional=context_dim is not None) for name in dict.fromkeys(names)}
    if all(t is not None for t in takes.values()):
        unknown = sorted(set(options).difference(*takes.values()))
        if unknown:
            they_take = "; ".join(f"{name}: {', '.join(sorted(t)) or 'none'}" for name, t in takes.items())
            raise ValueError(
                f"flow {names}: unknown option(s) {', '.join(unknown)}; options the layers take: {they_take}"
            )
    return [
        make(
            name,
            dim,
            context_dim=context_dim,
            **{k: v for k, v in options.items() if takes[name] is None or k in takes[name]},
        )
        for name in names
    ]


def option_names(name: str, *, conditional: bool = False) -> set[str] | None:
    """The options family ``name``'s layers take; None for a layer registered with a factory
    that does not declare them (a class whose ``transform`` has ``option_defaults`` does).

    >>> sorted(option_names("iaf")), option_names("lu_linear")
    (['hidden_dims', 'max_log_scale'], set())
    >>> option_names("lu_linear", conditional=True)  # the widths of its context network
    {'hidden_dims'}
    """
    factory = _classes(name)[conditional]
    declared = getattr(getattr(factory, "transform", None), "option_defaults", None)
    if declared is None:
        return None
    names = set(declared)
    if isinstance(factory, type) and issubclass(factory, ConditionalFlowModule):
        names.add("hidden_dims")  # the widths of the network from the context to the parameters
    return names


def _classes(name: str) -> tuple[Callable[..., TransformModule], Callable[..., ConditionalTransformModule]]:
    if name in _USER_LAYERS:
        unconditional, conditional = _USER_LAYERS[name]
    elif name in _REGISTRY:
        module, unconditional_name, conditional_name = _REGISTRY[name]
        classes = import_module(f"pyro_flowguides.transforms.{module}")
        unconditional = getattr(classes, unconditional_name)
        conditional = getattr(classes, conditional_name)
    else:
        raise ValueError(f"unknown flow layer {name!r}; available: {', '.join(available())}")
    return unconditional, conditional


def stack(
    flow: FlowSpec,
    dim: int,
    num_flows: int = 1,
    *,
    context_dim: int | None = None,
    fuse: bool = True,
    **options: object,
) -> nn.ModuleList:
    """A list of layers applied in order.

    ``flow`` is a registered name (repeated ``num_flows`` times), a list of names (used as given;
    ``num_flows`` must then be 1) or a callable ``dim -> layer`` (called ``num_flows`` times).
    A :class:`~pyro_flowguides.transforms.permutation.Reverse` goes between two consecutive coupling
    or autoregressive layers, so that no coordinate is left untransformed, and one more at the end
    when their number is odd, so that the stack keeps the coordinates' order.
    """
    if isinstance(num_flows, bool) or not isinstance(num_flows, int) or num_flows < 1:
        raise ValueError(f"num_flows must be an integer >= 1, got {num_flows!r}")
    if isinstance(flow, str):
        unconditional, conditional = _classes(flow)
        if (
            fuse
            and num_flows > 1
            and isinstance(unconditional, type)
            and issubclass(unconditional, FlowModule)
        ):
            if context_dim is None:
                fused = FlowStack(dim, layer=unconditional.transform, num_layers=num_flows, **options)
            else:
                assert issubclass(conditional, ConditionalFlowModule)
                fused = ConditionalFlowStack(
                    dim, context_dim, layer=conditional.transform, num_layers=num_flows, **options
                )
            return nn.ModuleList([fused])
        names: list[str] | None = [flow] * num_flows
    elif callable(flow):
        names = None
    else:
        names = list(flow)
        if not names or not all(isinstance(n, str) for n in names):
            raise ValueError(
                f"flow must be a layer name, a non-empty list of names or a callable; got {flow!r}"
            )
        if num_flows != 1:
            raise ValueError("num_flows applies to a single flow name; a list of names is used as given")
    if names is None:
        layers = [flow(dim) for _ in range(num_flows)]
    elif isinstance(flow, str):
        layers = [make(name, dim, context_dim=context_dim, **options) for name in names]
    else:
        layers = _make_each(names, dim, context_dim, options)
    out: list[nn.Module] = []
    for layer in layers:
        if (
            out
            and getattr(out[-1], "needs_permutation", False)
            and getattr(layer, "needs_permutation", False)
        ):
            out.append(Reverse(dim))
        out.append(layer)
    if sum(isinstance(layer, Reverse) for layer in out) % 2:
        out.append(Reverse(dim))  # end in the original coordinate order
    return nn.ModuleList(out)
