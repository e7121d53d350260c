"""Normalizing-flow posteriors for Pyro models.

Plots live in :mod:`pyro_flowguides.plots` (imported on demand: it needs matplotlib).
"""

from . import flows, supports  # supports: registers biject_to for lower_cholesky
from .amortisation import Amortised, DataSummary
from .arviz_export import to_inference_data
from .checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from .diagnostics import Diagnosis, LooResult, diagnose, log_evidence_per_item, loo
from .encoders import MLPEncoder, PoolingEncoder
from .flow_distribution import FlowDistribution
from .guide import AutoFlowGuide, init_to_feasible_point, init_to_median_or_feasible
from .training import (
    FitHistory,
    ModelStructureError,
    NonFiniteLossError,
    ScaleLatents,
    SyncFreeTrace_ELBO,
    fit,
    kl_warmup_weight,
)

__all__ = [
    "Amortised",
    "AutoFlowGuide",
    "CheckpointError",
    "CheckpointMismatchError",
    "DataSummary",
    "Diagnosis",
    "FitHistory",
    "FlowDistribution",
    "LooResult",
    "MLPEncoder",
    "ModelStructureError",
    "NonFiniteLossError",
    "PoolingEncoder",
    "ScaleLatents",
    "SyncFreeTrace_ELBO",
    "diagnose",
    "fit",
    "flows",
    "init_to_feasible_point",
    "init_to_median_or_feasible",
    "kl_warmup_weight",
    "load_checkpoint",
    "log_evidence_per_item",
    "loo",
    "read_checkpoint",
    "save_checkpoint",
    "supports",
    "to_inference_data",
]
__version__ = "0.1.0"
