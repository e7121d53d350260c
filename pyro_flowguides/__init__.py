"""Normalizing-flow posteriors for Pyro models."""

from . import flows, supports  # supports: registers biject_to for lower_cholesky
from .amortisation import Amortised, DataSummary
from .encoders import MLPEncoder, PoolingEncoder
from .flow_distribution import FlowDistribution
from .guide import AutoFlowGuide, init_to_feasible_point, init_to_median_or_feasible

__all__ = [
    "Amortised",
    "AutoFlowGuide",
    "DataSummary",
    "FlowDistribution",
    "MLPEncoder",
    "PoolingEncoder",
    "flows",
    "init_to_feasible_point",
    "init_to_median_or_feasible",
    "supports",
]
__version__ = "0.1.0"
