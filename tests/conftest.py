import pytest
import torch

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def jacobian_blocks(transform, x):
    """Per-row Jacobians ∂y_i/∂x_i of a row-wise map, shape (N, D, D), by autograd."""
    full = torch.autograd.functional.jacobian(lambda v: transform(v), x)
    idx = torch.arange(x.shape[0])
    return full[idx, :, idx, :]
