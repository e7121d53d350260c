"""``path_gradient=True`` ("sticking the landing", Roeder et al. 2017): the gradient of ``log q`` at a
draw reaches the parameters only through the draw."""

import math
import pickle
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, JitTrace_ELBO, Trace_ELBO

from pyro_flowguides import AutoFlowGuide, FlowDistribution, flows
from pyro_flowguides.guide import DEFAULT_FLOW

DIM = 4


def random_flow(spec, seed=0, initial=False):
    """A stack on ``DIM`` coordinates with every parameter drawn from N(0, 0.5²) (or as initialised)."""
    torch.manual_seed(seed)
    layers = flows.stack(spec, DIM, 1 if isinstance(spec, list) else 2).double()
    with torch.no_grad():
        for p in layers.parameters():
            if not initial:
                p.normal_(0, 0.5)
    return layers


def random_distribution(spec, *, path_gradient, seed=0, initial=False):
    """A distribution on a full-rank base and its leaves: ``loc``, ``scale``, the shear's strictly
    lower part and the layers' parameters."""
    torch.manual_seed(seed + 1)
    leaves = {
        "loc": torch.randn(DIM, dtype=torch.float64),
        "scale": torch.rand(DIM, dtype=torch.float64).add(0.5),
        "shear": torch.randn(DIM, DIM, dtype=torch.float64),
    }
    for leaf in leaves.values():
        leaf.requires_grad_()
    layers = random_flow(spec, seed, initial)
    return build(leaves, layers, path_gradient), {**leaves, **dict(layers.named_parameters())}


def build(leaves, layers, path_gradient):
    shear = torch.eye(DIM, dtype=torch.float64) + leaves["shear"].tril(-1)  # unit lower triangular
    return FlowDistribution(
        leaves["loc"], leaves["scale"], layers, shear=shear, standardised=True, path_gradient=path_gradient
    )


def grads(output, params):
    return torch.autograd.grad(output, list(params), allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("initial", [False, True], ids=["random", "initial"])
@pytest.mark.parametrize("spec", [*flows.available(), list(DEFAULT_FLOW)], ids=str)
def test_path_gradient_is_the_total_gradient_less_the_score(spec, initial):
    """For one draw ``z_θ``: ``d/dθ log q_θ(z_θ) = ∂_θ log q_θ(z)|_z + ∂_z log q · dz/dθ``; the path
    gradient is the second term. The score ``∂_θ log q_θ(z)|_z``, by autograd through the inverse,
    is checked against central differences of the density along a random direction of all
    parameters. Random (and initial) layer parameters, float64; the value is the ordinary density."""
    torch.manual_seed(3)
    q, params = random_distribution(spec, path_gradient=False, initial=initial)
    z = q.rsample((5,))
    total = grads(q.log_prob(z).sum(), params.values())
    score = grads(q.log_prob(z.detach()).sum(), params.values())

    direction = [torch.randn_like(p) for p in params.values()]
    step = 1e-6
    with torch.no_grad():
        ends = []
        for sign in (1, -1):
            for p, d in zip(params.values(), direction, strict=True):
                p.add_(sign * step * d)
            ends.append(build(params, q.layers, False).log_prob(z.detach()).sum())
            for p, d in zip(params.values(), direction, strict=True):
                p.sub_(sign * step * d)
    along = sum((g * d).sum() for g, d in zip(score, direction, strict=True))
    torch.testing.assert_close(along, (ends[0] - ends[1]) / (2 * step), rtol=1e-4, atol=1e-6)

    torch.manual_seed(3)
    q_path, params_path = random_distribution(spec, path_gradient=True, initial=initial)
    z_path = q_path.rsample((5,))
    log_q = q_path.log_prob(z_path)
    torch.testing.assert_close(z_path, z, rtol=0, atol=0)
    torch.testing.assert_close(log_q, q.log_prob(z))
    path = grads(log_q.sum(), params_path.values())
    for name, t, s, p in zip(params, total, score, path, strict=True):
        torch.testing.assert_close(
            p, t - s, rtol=1e-6, atol=1e-8, msg=lambda m, name=name: f"{spec} {name}: {m}"
        )


def test_without_gradients_nothing_is_inverted():
    q, _ = random_distribution("iaf", path_gradient=True)
    with torch.no_grad():
        z = q.rsample((3,))
        assert q.log_prob(z) is q._drawn[1]


def test_conditional_layers_get_the_path_gradient_of_their_network():
    """With a context, the score is taken through the conditioned layers and the network."""
    torch.manual_seed(0)
    layers = flows.stack("iaf", DIM, 2, context_dim=3).double()
    with torch.no_grad():
        for p in layers.parameters():
            p.normal_(0, 0.5)
    context = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    loc, scale = torch.zeros(DIM, dtype=torch.float64), torch.ones(DIM, dtype=torch.float64)
    params = [context, *layers.parameters()]
    parts = {}
    for path_gradient in (False, True):
        torch.manual_seed(1)
        q = FlowDistribution(loc, scale, layers, context, path_gradient=path_gradient)
        z = q.rsample()
        parts[path_gradient] = grads(q.log_prob(z).sum(), params)
        if not path_gradient:
            score = grads(q.log_prob(z.detach()).sum(), params)
    for t, s, p in zip(parts[False], score, parts[True], strict=True):
        torch.testing.assert_close(p, t - s, rtol=1e-6, atol=1e-8)


def gaussian_model():
    cov = torch.tensor([[1.0, 0.8, 0.1], [0.8, 2.0, 0.3], [0.1, 0.3, 0.5]], dtype=torch.float64)
    pyro.sample(
        "z",
        dist.MultivariateNormal(torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64), covariance_matrix=cov),
    )


def guide_at_the_posterior(path_gradient):
    """The default guide with its base set to the Gaussian posterior: ``q = p`` exactly."""
    pyro.clear_param_store()
    guide = AutoFlowGuide(gaussian_model, path_gradient=path_gradient)
    guide()
    cov = torch.tensor([[1.0, 0.8, 0.1], [0.8, 2.0, 0.3], [0.1, 0.3, 0.5]], dtype=torch.float64)
    chol = torch.linalg.cholesky(cov)
    guide.loc = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    guide.scale = chol.diagonal()
    guide.shear = chol / chol.diagonal()[:, None]
    return guide


@pytest.mark.parametrize("path_gradient", [False, True])
def test_the_gradient_vanishes_for_every_draw_where_q_is_the_posterior(path_gradient):
    guide = guide_at_the_posterior(path_gradient)
    elbo = Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=0)
    loss = elbo.differentiable_loss(gaussian_model, guide)
    assert abs(loss.item()) < 1e-10  # log p(x, z) - log q(z) = log evidence = 0 for every draw
    largest = max(g.abs().max().item() for g in grads(loss, list(guide.parameters())))
    if path_gradient:
        assert largest < 1e-10
    else:
        assert largest > 1e-2  # the score term's noise


def test_guide_option_is_checked_and_survives_pickling_and_jit():
    with pytest.raises(TypeError, match="path_gradient must be True or False"):
        AutoFlowGuide(gaussian_model, path_gradient="yes")
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoFlowGuide(gaussian_model, path_gradient=True)
    svi = SVI(gaussian_model, guide, pyro.optim.Adam({"lr": 0.01}), JitTrace_ELBO(max_plate_nesting=0))
    losses = [svi.step() for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    copy = pickle.loads(pickle.dumps(guide))
    assert copy.get_posterior().path_gradient
    torch.testing.assert_close(copy.median()["z"], guide.median()["z"])


def test_amortised_local_latents_take_the_path_gradient():
    """A VAE-like model: the local posterior is built with the option, and training runs."""
    from pyro_flowguides import Amortised

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 0.5).to_event(1), obs=x)

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    x = torch.randn(16, 2)
    guide = AutoFlowGuide(
        model, path_gradient=True, amortised=Amortised(plate="data", inputs=lambda x: x, flow="iaf")
    )
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    losses = [svi.step(x) for _ in range(20)]
    assert guide.local_posterior_for(x).path_gradient
    assert all(map(math.isfinite, losses))


@pytest.mark.parametrize("spec", ["iaf", "planar"])
def test_the_path_gradient_is_unbiased(spec):
    """Its mean over many draws is the ordinary gradient's: a Gaussian target, random layers (far
    from the target, where it is not less noisy than the ordinary gradient: both spreads are alike)."""
    target = dist.MultivariateNormal(
        torch.arange(DIM, dtype=torch.float64) / DIM, torch.eye(DIM, dtype=torch.float64) * 0.7 + 0.3
    )
    means, errors = [], []
    for path_gradient in (False, True):
        q, params = random_distribution(spec, path_gradient=path_gradient, seed=4)
        torch.manual_seed(5)
        rows = []
        for _ in range(200):  # gradients of the mean over 20 draws, 200 times
            z = q.rsample((20,))
            kl = (q.log_prob(z) - target.log_prob(z)).mean()
            rows.append(torch.cat([g.flatten() for g in grads(kl, params.values())]))
        rows = torch.stack(rows)
        means.append(rows.mean(0))
        errors.append(rows.std(0) / len(rows) ** 0.5)
    spread = torch.sqrt(errors[0] ** 2 + errors[1] ** 2) + 1e-12
    assert ((means[1] - means[0]).abs() / spread).max() < 5


@pytest.mark.parametrize("flow", [None, "planar"], ids=["default", "planar"])
def test_jit_traced_gradients_equal_eager_ones_after_the_parameters_move(flow):
    """The inverses stop on their values; traced at the initial parameters, they would keep the
    trace's number of passes. Traced, they run every pass."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    options = {} if flow is None else {"flow": flow, "num_flows": 2}
    guide = AutoFlowGuide(gaussian_model, path_gradient=True, **options)
    guide()
    params = dict(guide.named_parameters())
    jit, eager = JitTrace_ELBO(max_plate_nesting=0), Trace_ELBO(max_plate_nesting=0)

    def gradient(elbo):
        for p in params.values():
            p.grad = None
        elbo.loss_and_grads(gaussian_model, guide)
        return torch.cat([p.grad.flatten() for p in params.values()])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pyro.set_rng_seed(5)
        gradient(jit)  # traced at the initial parameters
        torch.manual_seed(1)
        with torch.no_grad():
            for name, p in params.items():
                if "flow" in name:
                    p.add_(0.3 * torch.randn_like(p))
        for seed in range(3):
            pyro.set_rng_seed(10 + seed)
            traced = gradient(jit)
            pyro.set_rng_seed(10 + seed)
            torch.testing.assert_close(traced, gradient(eager), rtol=1e-6, atol=1e-8)
