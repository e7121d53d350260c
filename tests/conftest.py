import pyro
import pytest
import torch
from pyro.distributions.conditional import ConditionalTransformModule

# The tests run small models, where thread start-up and, on a shared machine, oversubscribed cores
# cost far more than parallel kernels save (a tiny triu took 15 ms with 2 threads under load).
torch.set_num_threads(1)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def fresh_param_store():
    """Every test starts from an empty param store and seed 0, and leaves the store empty."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


def jacobian_blocks(transform, x):
    """Per-row Jacobians ∂y_i/∂x_i of a row-wise map, shape (N, D, D), by autograd."""
    full = torch.autograd.functional.jacobian(lambda v: transform(v), x)
    idx = torch.arange(x.shape[0])
    return full[idx, :, idx, :]


def condition_rows(layer, x, context_scale=1.0, seed=1):
    """The layer itself, or a conditional layer conditioned on one random context per row of ``x``."""
    if isinstance(layer, ConditionalTransformModule):
        g = torch.Generator().manual_seed(seed)
        shape = (*x.shape[:-1], layer.context_dim)
        # drawn in one dtype and cast, so float32 and float64 copies of a layer see the same contexts
        return layer.condition((context_scale * torch.randn(shape, generator=g)).to(x.dtype))
    return layer
