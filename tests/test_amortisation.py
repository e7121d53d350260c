"""Amortised AutoFlowGuide: local latents in (subsampled) plates, and data-set summaries."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, JitTrace_ELBO, Predictive, Trace_ELBO
from torch import nn

from pyro_flowguides import Amortised, AutoFlowGuide, MLPEncoder

# z_i ~ N(0, I), x_i ~ N(z_i, NOISE^2 I): p(z_i | x_i) = N(x_i / (1 + NOISE^2), NOISE^2 / (1 + NOISE^2))
NOISE = 0.5
POST_SCALE = NOISE / math.sqrt(1 + NOISE**2)


def local_model(x, batch_size=None):
    with pyro.plate("data", x.shape[0], subsample_size=batch_size) as idx:
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([x.shape[-1]]).to_event(1))
        pyro.sample("x", dist.Normal(z, NOISE).to_event(1), obs=x[idx])


def rows(x, batch_size=None):
    return x


def train(model, guide, *args, steps, lr=0.02, loss=None):
    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), loss or Trace_ELBO())
    return [svi.step(*args) for _ in range(steps)]


@pytest.mark.parametrize(
    "flow, conditioning",
    [("orthogonal_sylvester", "heads"), ("planar", "context"), ("affine_coupling", "context")],
)
def test_subsampled_conjugate_local_posterior_is_learned(flow, conditioning):
    x = 2 * torch.randn(500, 2)
    spec = Amortised(plate="data", inputs=rows, hidden_dims=[32], conditioning=conditioning)
    guide = AutoFlowGuide(local_model, flow=flow, num_flows=2, amortised=spec)
    elbo = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(local_model, guide, pyro.optim.ClippedAdam({"lr": 0.01, "lrd": 0.1**0.001}), elbo)
    for _ in range(2000):  # uncentred Sylvester-heads needs more than 1000 (median off by 0.094)
        svi.step(x, 64)
    x_new = torch.linspace(-3, 3, 7).unsqueeze(-1).expand(7, 2)
    median = guide.median(x_new)["z"]
    torch.testing.assert_close(median, x_new / (1 + NOISE**2), atol=0.08, rtol=0)
    lo, hi = guide.quantiles([0.1587, 0.8413], x_new, num_samples=20000)["z"]
    torch.testing.assert_close((hi - lo) / 2, torch.full_like(lo, POST_SCALE), atol=0.06, rtol=0)


class RecordingEncoder(nn.Module):
    def __init__(self, item_dim):
        super().__init__()
        self.net = MLPEncoder(item_dim, [8])
        self.seen = []

    def forward(self, rows):
        self.seen.append(rows)
        return self.net(rows)


def test_num_flows_zero_is_the_plain_vae_gaussian():
    spec = Amortised(plate="data", inputs=rows, num_flows=0)
    guide = AutoFlowGuide(local_model, flow="planar", amortised=spec)
    x = torch.randn(20, 3)
    posterior = guide.local_posterior_for(x)
    assert posterior.layers == [] and posterior.batch_shape == (20,)
    z = posterior.rsample()
    expected = dist.Normal(posterior.loc, posterior.scale).log_prob(z).sum(-1)
    torch.testing.assert_close(posterior.log_prob(z.clone()), expected)


def test_encoder_reads_the_rows_at_the_plates_subsample_indices():
    x = torch.randn(100, 3)
    encoder = RecordingEncoder(3)
    guide = AutoFlowGuide(
        local_model, flow="planar", amortised=Amortised(plate="data", inputs=rows, encoder=encoder)
    )
    guide(x, 10)  # set up
    encoder.seen.clear()
    guide_trace = poutine.trace(guide).get_trace(x, 10)
    model_trace = poutine.trace(poutine.replay(local_model, trace=guide_trace)).get_trace(x, 10)
    indices = model_trace.nodes["data"]["value"]
    assert indices.shape == (10,)
    assert len(encoder.seen) == 1 and torch.equal(encoder.seen[0], x[indices])  # O(minibatch) work
    assert guide_trace.nodes["z"]["value"].shape == (10, 3)
    assert guide_trace.nodes["_AutoFlowGuide_local_latent"]["scale"] == 10.0  # N / B, as the model's


def minibatch_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        pyro.sample("x", dist.Normal(z, NOISE).to_event(1), obs=x)


def test_guide_trained_on_a_subsampled_plate_runs_on_new_data():
    guide = AutoFlowGuide(local_model, flow="planar", amortised=Amortised(plate="data", inputs=rows))
    train(local_model, guide, torch.randn(200, 2), 16, steps=2)
    new = torch.randn(7, 2)  # the model on new data, not subsampling
    guide_trace = poutine.trace(guide).get_trace(new)
    model_trace = poutine.trace(poutine.replay(local_model, trace=guide_trace)).get_trace(new)
    assert guide_trace.nodes["z"]["value"].shape == (7, 2)
    assert model_trace.nodes["x"]["fn"].batch_shape == (7,)


def test_create_plates_sets_the_subsample_indices():
    indices = torch.tensor([3, 1, 4])
    guide = AutoFlowGuide(
        local_model,
        flow="planar",
        amortised=Amortised(plate="data", inputs=rows),
        create_plates=lambda x, b: pyro.plate("data", x.shape[0], subsample=indices),
    )
    x = torch.randn(10, 2)
    trace = poutine.trace(guide).get_trace(x, 3)
    assert torch.equal(trace.nodes["data"]["value"], indices)
    torch.testing.assert_close(
        trace.nodes["z"]["value"], guide.local_posterior_for(x[indices]).loc, rtol=1, atol=10
    )


def test_minibatches_passed_as_arguments_of_any_size():
    model = minibatch_model
    spec = Amortised(plate="data", inputs=lambda x: x)
    guide = AutoFlowGuide(model, flow="householder_sylvester", amortised=spec)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    for batch in torch.randn(70, 2).split(32):  # 32, 32, 6
        assert math.isfinite(svi.step(batch))
    assert guide(torch.randn(6, 2))["z"].shape == (6, 2)


def mixed_model(x):
    """A global scale, and two local sites (one positive) per data point."""
    tau = pyro.sample("tau", dist.LogNormal(0.0, 0.5))
    with pyro.plate("data", x.shape[0], subsample_size=16) as idx:
        z = pyro.sample("z", dist.Normal(torch.zeros(2), tau.unsqueeze(-1)).to_event(1))
        s = pyro.sample("s", dist.LogNormal(0.0, 0.3))
        pyro.sample("x", dist.Normal(z, s.unsqueeze(-1)).to_event(1), obs=x[idx])


def mixed_guide():
    return AutoFlowGuide(mixed_model, flow="planar", amortised=Amortised(plate="data", inputs=lambda x: x))


def test_defaults_with_global_and_local_latents():
    """No flow named: the global latent gets the default stack on a full-rank base, the amortised
    locals IAF x 4 (the global default's full base is for the guide's own parameters only)."""
    x = torch.randn(64, 2)
    guide = AutoFlowGuide(mixed_model, amortised=Amortised(plate="data", inputs=lambda x: x))
    losses = train(mixed_model, guide, x, steps=20, lr=0.005)
    assert all(math.isfinite(v) for v in losses)
    assert [type(layer).__name__ for layer in guide.flow] == ["LULinear", "IAF", "LULinear", "IAF"]
    assert guide.shear.shape == (1, 1)
    local = [type(layer).__name__ for layer in guide.local_posterior.layers]
    assert local.count("ConditionalIAF") == 4 and "ConditionalLULinear" not in local, local


def test_global_and_several_constrained_local_sites_in_one_guide():
    x = torch.randn(64, 2)
    guide = mixed_guide()
    losses = train(mixed_model, guide, x, steps=300, lr=0.005)  # amortised heads want VAE-like rates
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-50:]) < sum(losses[:50])
    sample = guide(x)
    assert sample["tau"].shape == () and sample["z"].shape == (16, 2) and sample["s"].shape == (16,)
    assert (sample["s"] > 0).all()
    median = guide.median(x)  # every item of the data set
    assert median["z"].shape == (64, 2) and median["s"].shape == (64,) and median["tau"].shape == ()
    assert guide.latent_dim == 1  # only tau is packed into the global flow


def test_log_density_of_constrained_local_site_includes_its_jacobian():
    x = torch.randn(64, 2)
    trace = poutine.trace(mixed_guide()).get_trace(x)
    trace.compute_log_prob()
    s = trace.nodes["s"]
    assert s["scale"] == 64 / 16  # Pyro's traces scale log-probs by the plate's N / B
    torch.testing.assert_close(s["log_prob"], -s["value"].log() * s["scale"])  # log|d log(s)/ds|


def test_predictive_and_vectorised_particles_with_an_amortised_guide():
    x = torch.randn(40, 2)
    guide = mixed_guide()
    elbo = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    assert all(math.isfinite(v) for v in train(mixed_model, guide, x, steps=5, loss=elbo))
    samples = Predictive(mixed_model, guide=guide, num_samples=7, parallel=True)(x)
    assert samples["z"].shape == (7, 16, 2) and samples["x"].shape == (7, 16, 2)
    samples = Predictive(mixed_model, guide=guide, num_samples=3)(x)
    assert samples["s"].shape == (3, 16)


def test_jit_trace_elbo_with_an_amortised_guide():
    x = torch.randn(40, 2)  # JIT traces tensor arguments only: minibatches as arguments
    spec = Amortised(plate="data", inputs=lambda x: x)
    guide = AutoFlowGuide(minibatch_model, flow="planar", amortised=spec)
    losses = train(minibatch_model, guide, x, steps=5, loss=JitTrace_ELBO())
    assert all(math.isfinite(v) for v in losses)


@pytest.mark.parametrize(
    "spec, message",
    [
        (Amortised(plate="nope", inputs=rows), "no latent site of the model is in plate 'nope'"),
        (Amortised(plate="data", inputs=rows, conditioning="heads", flow="iaf"), "conditioning='context'"),
        (Amortised(plate="data", inputs=rows, encoder=MLPEncoder(3, [4]).double()), "encoder must return"),
    ],
)
def test_bad_amortisation_gets_a_clear_error(spec, message):
    guide = AutoFlowGuide(local_model, flow="planar", amortised=spec)
    with pytest.raises(ValueError, match=message):
        guide(torch.randn(50, 3), 5)


def test_local_site_outside_dim_minus_one_is_refused():
    def model(x):
        with pyro.plate("data", x.shape[0], dim=-2):
            pyro.sample("z", dist.Normal(0.0, 1.0).expand([x.shape[0], 1]))

    guide = AutoFlowGuide(model, flow="planar", amortised=Amortised(plate="data", inputs=lambda x: x))
    with pytest.raises(ValueError, match="dim=-1"):
        guide(torch.randn(5, 2))


def test_spec_validation():
    with pytest.raises(TypeError, match="inputs must be a function"):
        Amortised(plate="data", inputs=torch.zeros(3))
    with pytest.raises(ValueError, match="conditioning must be"):
        Amortised(plate="data", inputs=rows, conditioning="linear")
    with pytest.raises(ValueError, match="num_flows must be an integer >= 0"):
        Amortised(plate="data", inputs=rows, num_flows=-1)
    with pytest.raises(TypeError, match="amortised must be an Amortised"):
        AutoFlowGuide(local_model, amortised="data")
