"""Normalizing-flow posteriors for Pyro models.

Plots live in :mod:`pyro_flowguides.plots` (imported on demand: it needs matplotlib).
"""

from . import flows, supports  # supports: registers biject_to for lower_cholesky
from .amortisation import Amortised, DataSummary
from .arviz_export import to_inference_data
from .calibration import SBCResult, simulation_based_calibration
from .checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from .datasets import (
    DatasetBatch,
    DatasetELBO,
    DatasetLoader,
    ForwardKL,
    PriorPredictive,
    draw_for_datasets,
    fine_tune,
    posterior_log_density,
    simulate_datasets,
    stack_datasets,
)
from .diagnostics import Diagnosis, LooResult, diagnose, log_evidence_per_item, loo
from .encoders import MLPEncoder, PoolingEncoder
from .ensemble import AutoFlowEnsemble, EqualMixture
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
    "AutoFlowEnsemble",
    "AutoFlowGuide",
    "CheckpointError",
    "CheckpointMismatchError",
    "DataSummary",
    "DatasetBatch",
    "DatasetELBO",
    "DatasetLoader",
    "Diagnosis",
    "EqualMixture",
    "FitHistory",
    "FlowDistribution",
    "ForwardKL",
    "LooResult",
    "MLPEncoder",
    "ModelStructureError",
    "NonFiniteLossError",
    "PoolingEncoder",
    "PriorPredictive",
    "SBCResult",
    "ScaleLatents",
    "SyncFreeTrace_ELBO",
    "diagnose",
    "draw_for_datasets",
    "fine_tune",
    "fit",
    "flows",
    "init_to_feasible_point",
    "init_to_median_or_feasible",
    "kl_warmup_weight",
    "load_checkpoint",
    "log_evidence_per_item",
    "loo",
    "posterior_log_density",
    "read_checkpoint",
    "save_checkpoint",
    "simulate_datasets",
    "simulation_based_calibration",
    "stack_datasets",
    "supports",
    "to_inference_data",
]
__version__ = "0.1.0"
