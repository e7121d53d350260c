"""fit, every flow layer and AutoFlowGuide on CUDA, with no host-device synchronisation in a step.

Marked ``cuda``: deselected by default, run with ``pytest -m cuda`` where a CUDA device exists.
"""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import CUDA
from pyro.infer.util import zero_grads

from pyro_flowguides import flows
from pyro_flowguides.checkpoint import read_checkpoint
from pyro_flowguides.flow_distribution import FlowDistribution
from pyro_flowguides.guide import AutoFlowGuide
from pyro_flowguides.training import NonFiniteLossError, SyncFreeTrace_ELBO, fit

pytestmark = [pytest.mark.cuda, CUDA]

DIM, CONTEXT = 4, 3


@pytest.fixture(autouse=True)
def default_sync_debug_mode():
    yield
    torch.cuda.set_sync_debug_mode("default")


def gaussian_model(x):
    mu = pyro.sample("mu", dist.Normal(torch.zeros(x.shape[-1], device=x.device), 2.0).to_event(1))
    sigma = pyro.sample("sigma", dist.LogNormal(torch.zeros((), device=x.device), 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(mu, sigma).to_event(1), obs=x)


def data(n=32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, DIM, generator=g) + torch.arange(DIM)).cuda()


def store_params():
    return [p for _, p in pyro.get_param_store().named_parameters()]


@pytest.mark.parametrize("flow", flows.available())
def test_fit_trains_every_flow_on_cuda(flow):
    x = data()
    guide = AutoFlowGuide(gaussian_model, flow=flow, num_flows=2)
    history = fit(gaussian_model, guide, x, num_steps=50, optim=pyro.optim.Adam({"lr": 0.02}), progress=False)
    assert all(math.isfinite(v) for v in history.loss)
    assert history.loss[-1] < history.loss[0]
    assert all(p.device.type == "cuda" for p in store_params())
    median = guide.median()
    assert median["mu"].device.type == "cuda" and torch.isfinite(median["mu"]).all()


@pytest.mark.parametrize("flow", flows.available())
def test_conditional_layers_on_cuda_match_cpu(flow):
    torch.manual_seed(1)
    layers = flows.stack(flow, DIM, num_flows=2, context_dim=CONTEXT)
    with torch.no_grad():  # away from the identity, so that the layers do something
        for p in layers.parameters():
            p.add_(0.1 * torch.randn_like(p))
    context = torch.randn(16, CONTEXT)
    value = torch.randn(16, DIM)
    on_cpu = FlowDistribution(torch.zeros(DIM), torch.ones(DIM), layers, context=context).log_prob(value)
    layers = layers.cuda()
    q = FlowDistribution(
        torch.zeros(16, DIM).cuda(), torch.ones(16, DIM).cuda(), layers, context=context.cuda()
    )
    on_cuda = q.log_prob(value.cuda())
    torch.testing.assert_close(on_cuda.cpu(), on_cpu, rtol=1e-4, atol=1e-4)
    z = q.rsample((8,))
    ((z**2).sum() + q.log_prob(z).sum()).backward()
    grads = [p.grad for p in layers.parameters() if p.grad is not None]
    assert grads and all(g.device.type == "cuda" and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("flow", flows.available())
def test_an_svi_step_has_no_host_device_synchronisation(flow):
    """Guide, layers, a device-side ELBO and Adam: a whole step under sync-debug mode "error"."""
    x = data()
    guide = AutoFlowGuide(gaussian_model, flow=flow, num_flows=2)
    optim = pyro.optim.Adam({"lr": 0.01})
    fit(gaussian_model, guide, x, num_steps=2, optim=optim, progress=False)  # set-up may synchronise
    elbo = SyncFreeTrace_ELBO()
    with pyro.validation_enabled(False):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                loss = elbo.loss_and_grads(gaussian_model, guide, x)
                params = store_params()
                optim(params)
                zero_grads(params)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert math.isfinite(loss.item())


def count_synchronisations(num_steps):
    x = data()
    pyro.clear_param_store()
    guide = AutoFlowGuide(gaussian_model, flow="planar", num_flows=2)
    options = {"optim": pyro.optim.Adam({"lr": 0.01}), "loss": SyncFreeTrace_ELBO(), "progress": False}
    with pyro.validation_enabled(False):
        fit(gaussian_model, guide, x, num_steps=2, check_finite=False, **options)  # set-up
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                history = fit(gaussian_model, guide, x, num_steps=num_steps, check_finite=False, **options)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    assert history.steps == num_steps
    return sum("synchroniz" in str(w.message) for w in caught)


def test_fit_adds_no_synchronisation_per_step():
    """Without the finiteness check, the only synchronisation is reading the losses at the end."""
    assert count_synchronisations(5) == count_synchronisations(25) <= 1


def test_the_finiteness_check_works_on_cuda():
    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros((), device="cuda"), 1.0))
        u = torch.where(z > 1.0, z - z.detach(), torch.ones((), device="cuda"))
        pyro.factor("kink", u.sqrt())  # an infinite gradient once z > 1
        pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(5.0, device="cuda"))

    def guide():
        pyro.sample("z", dist.Delta(pyro.param("loc", torch.zeros((), device="cuda"))))

    with pytest.raises(
        NonFiniteLossError, match=r"step 4 is not finite: non-finite gradients of parameter\(s\) 'loc'"
    ):
        fit(model, guide, num_steps=10, optim=pyro.optim.SGD({"lr": 0.1}), progress=False)
    assert pyro.param("loc").item() == pytest.approx(1.22)


def test_resuming_on_cuda(tmp_path):
    x = data()

    def run(num_steps, **options):
        pyro.clear_param_store()
        guide = AutoFlowGuide(gaussian_model, flow="affine_coupling", num_flows=2)
        return fit(gaussian_model, guide, x, num_steps=num_steps, progress=False, **options)

    pyro.set_rng_seed(4)
    full = run(12)
    pyro.set_rng_seed(4)
    run(6, checkpoint=tmp_path / "run.pt")
    assert read_checkpoint(tmp_path / "run.pt").rng.get("cuda") is not None
    resumed = run(12, resume_from=tmp_path / "run.pt")
    assert all(p.device.type == "cuda" for p in store_params())
    # CUDA reductions need not be bit-for-bit reproducible; the draws are
    assert resumed.loss == pytest.approx(full.loss, rel=1e-5)
