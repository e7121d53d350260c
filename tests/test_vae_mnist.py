"""The Sylvester-flow VAE example (examples/vae_mnist.py) and its benchmark's hand-written guide."""

import dataclasses
import doctest
import importlib.util
import json
import math
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.infer import Trace_ELBO

from pyro_flowguides import Amortised, AutoFlowGuide, MLPEncoder, fit
from pyro_flowguides.amortisation import AmortisedFlow, randomise_heads

ROOT = Path(__file__).resolve().parents[1]


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


example = load("vae_mnist_example", "examples/vae_mnist.py")
benchmark = load("vae_mnist_benchmark", "benchmarks/vae_mnist.py")
DATA = example.DEFAULT_DATA
needs_data = pytest.mark.skipif(not DATA.is_file(), reason=f"binarized MNIST not found at {DATA}")
TINY = example.Protocol("tiny", 2, 1, 1, "adam", 1e-3, 50, 2, 128, 8, 0)


def binary_images(n, seed=0):
    return (torch.rand(n, 784, generator=torch.Generator().manual_seed(seed)) < 0.3).float()


def test_example_doctests():
    assert doctest.testmod(example, raise_on_error=True).attempted > 0


@pytest.mark.parametrize("key", list(example.FLOWS))
def test_hand_written_guide_has_the_autoguides_elbo_and_gradients(key):
    """Same encoder and flows, same noise: the autoguide adds nothing to the ELBO or its gradient."""
    x = binary_images(6)
    pyro.set_rng_seed(0)
    encoder, decoder = example.networks("mlp")
    model = example.bernoulli_vae(decoder)
    guide = AutoFlowGuide(model, amortised=example.amortised(key, encoder, TINY))
    guide(x)
    with torch.no_grad():  # away from the identity flows of initialisation
        for p in guide.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hand = benchmark.hand_written_guide(guide.local_posterior)
    params = list(guide.local_posterior.parameters())
    losses, grads = [], []
    for g in (guide, hand):
        pyro.set_rng_seed(1)
        loss = Trace_ELBO().differentiable_loss(model, g, x)
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, params, allow_unused=True))
    torch.testing.assert_close(losses[0], losses[1])
    assert all(g is not None for g in grads[0][:2])  # the encoder's first layer
    for auto_grad, hand_grad in zip(*grads, strict=True):
        torch.testing.assert_close(auto_grad, hand_grad)


def test_elbo_per_image_sums_to_pyros_elbo():
    x = binary_images(12)
    pyro.set_rng_seed(0)
    encoder, decoder = example.networks("mlp")
    model = example.bernoulli_vae(decoder)
    guide = AutoFlowGuide(model, amortised=example.amortised("planar", encoder, TINY))
    guide(x)
    pyro.set_rng_seed(3)
    per_image = example.elbo_per_image(model, guide, x, batch_size=12)
    pyro.set_rng_seed(3)
    total = -Trace_ELBO().loss(model, guide, x)
    assert per_image.shape == (12,)
    assert math.isclose(float(per_image.sum()), total, rel_tol=1e-5)


def test_nll_per_image_matches_the_exact_evidence_of_a_linear_gaussian_model():
    """z ~ N(0, I_2), x | z ~ N(W z, s² I_3): p(x) = N(0, W Wᵀ + s² I), known exactly."""
    torch.manual_seed(0)
    weight, noise = torch.randn(3, 2), 0.5

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ weight.T, noise).to_event(1), obs=x)

    x = dist.MultivariateNormal(torch.zeros(3), weight @ weight.T + noise**2 * torch.eye(3)).sample((7,))
    exact = -dist.MultivariateNormal(torch.zeros(3), weight @ weight.T + noise**2 * torch.eye(3)).log_prob(x)
    spec = Amortised(plate="data", inputs=lambda x: x, encoder=MLPEncoder(3, [8]), num_flows=0)
    guide = AutoFlowGuide(model, amortised=spec, init_scale=1.0)  # q(z | x) = N(0, I): the prior
    nll, se = example.nll_per_image(model, guide, x, num_samples=4000, batch_size=3, chunk_size=1000)
    assert nll.shape == se.shape == (7,)
    assert (se > 0).all() and ((nll - exact).abs() < 5 * se + 1e-3).all()


def row(key, nll, elbo):
    return {
        "key": key,
        "label": example.FLOWS[key][0],
        "elbo": torch.as_tensor(elbo, dtype=torch.float64),
        "nll": torch.as_tensor(nll, dtype=torch.float64),
        "nll_se": torch.full((len(nll),), 0.1, dtype=torch.float64),
        "epochs": 1,
        "best_epoch": 1,
        "train_seconds": 1.0,
        "train_images_per_second": 1.0,
        "nll_seconds": 1.0,
        "val_neg_elbo_per_epoch": [],
    }


def test_summary_reports_paired_differences_and_the_papers_ordering():
    vae = row("vae", [90.0, 80.0, 100.0], [-95.0, -85.0, -104.0])
    snf = row("o-snf", [89.0, 79.5, 98.5], [-93.0, -84.0, -103.0])
    iaf = row("iaf", [89.5, 80.5, 99.0], [-94.0, -84.0, -103.5])
    summary = example.summarise([vae, snf, iaf], TINY, "mlp", nll_items=3)
    models = summary["models"]
    assert models["o-snf"]["nll_minus_vae"][0] == pytest.approx(-1.0)  # mean of (-1, -0.5, -1.5)
    assert models["o-snf"]["nll_minus_vae"][1] == pytest.approx(0.5 / math.sqrt(3))
    assert models["iaf"]["neg_elbo_minus_vae"][0] == pytest.approx(-2.5 / 3)
    assert models["o-snf"]["paper_nll"] == example.PAPER_TABLE1["o-snf"][1]
    assert summary["ordering"] == {
        "every_flow_beats_vae_nll": True,
        "best_nll": "O-SNF",
        "sylvester_best_nll": True,
        "every_flow_beats_vae_neg_elbo": True,
        "best_neg_elbo": "O-SNF",
        "sylvester_best_neg_elbo": True,
    }
    assert summary["baseline"] == "VAE"
    better_vae = row("vae-s1", [89.0, 80.0, 99.0], [-95.0, -85.0, -104.0])  # the baseline to beat
    summary = example.summarise([vae, better_vae, snf, iaf], TINY, "mlp", nll_items=3)
    assert summary["baseline"] == "VAE, init scale 1"
    assert summary["models"]["o-snf"]["nll_minus_vae"][0] == pytest.approx(-1.0 / 3)
    assert not summary["ordering"]["every_flow_beats_vae_nll"]  # IAF: 89.67 > 89.33
    worse = row("planar", [95.0, 85.0, 105.0], [-96.0, -86.0, -106.0])
    ordering = example.summarise([vae, snf, worse], TINY, "mlp", nll_items=3)["ordering"]
    assert not ordering["every_flow_beats_vae_nll"] and ordering["sylvester_best_nll"]
    text = example.markdown(example.summarise([vae, snf, iaf], TINY, "mlp", nll_items=3))
    assert "| O-SNF |" in text and "83.32" in text and "-1.00 ± 0.29" in text


def test_random_heads_make_the_first_posterior_depend_on_the_data():
    torch.manual_seed(0)
    x = binary_images(5)
    zeros = AmortisedFlow(MLPEncoder(784, [16]), 16, torch.full((3,), 0.5), 0.1, "planar", 2)
    q = zeros(x)
    torch.testing.assert_close(q.loc, torch.full((5, 3), 0.5))  # the same start for every image
    torch.testing.assert_close(q.scale, torch.full((5, 3), 0.1))
    encoder = zeros.encoder.net[0]
    kept = encoder.weight.detach().clone()
    randomise_heads(zeros)
    torch.testing.assert_close(encoder.weight, kept)  # only zero-weight layers are touched
    q = zeros(x)
    assert q.loc.std(0).min() > 0  # each image its own start
    assert zeros.base.head.weight.abs().max() <= 1 / math.sqrt(16)  # PyTorch's U(±1/√fan_in)
    torch.testing.assert_close(zeros.base.head.bias[:3], torch.full((3,), 0.5))  # biases kept
    random = AmortisedFlow(MLPEncoder(784, [16]), 16, torch.zeros(3), 0.1, "iaf", 1, head_init="random")
    made_output = random.layers[0].net.layers[-1]  # IAF's last MADE layer: zero weights before
    assert made_output.weight.abs().min() > 0 and not made_output.bias.any()
    with pytest.raises(ValueError, match="head_init must be 'random' or 'zeros'"):
        AmortisedFlow(MLPEncoder(784, [16]), 16, torch.zeros(3), 0.1, "planar", 1, head_init="normal")
    with pytest.raises(ValueError, match="head_init must be 'random' or 'zeros'"):
        Amortised(plate="data", inputs=lambda x: x, head_init="normal")


@pytest.mark.parametrize("flow", ["planar", "iaf"])
def test_uncentred_flow_maps_the_base_draw_and_scores_by_change_of_variables(flow):
    """centred=False: z = f(loc + scale ⊙ ε), log q(z) = log N(loc + scale ⊙ ε) - log|det ∂f|."""
    torch.manual_seed(0)
    posterior = AmortisedFlow(MLPEncoder(4, [8]), 8, torch.zeros(3), 0.5, flow, 2, head_init="random")
    posterior = posterior.double()
    posterior.centred = False
    with torch.no_grad():  # away from the identity flows of initialisation
        for p in posterior.layers.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, 4, dtype=torch.float64)
    q = posterior(x)
    torch.manual_seed(1)
    z = q.rsample()
    torch.manual_seed(1)
    eps = torch.randn(2, 3, dtype=torch.float64)
    h = posterior.encoder(x)
    layers = [t.condition(h) if isinstance(t, ConditionalTransformModule) else t for t in posterior.layers]

    def f(v):
        for layer in layers:
            v = layer(v)
        return v

    base = q.loc + q.scale * eps
    torch.testing.assert_close(z, f(base))
    jacobians = torch.stack(
        [torch.autograd.functional.jacobian(lambda v, i=i: f(v)[i], base)[:, i] for i in range(2)]
    )
    expected = dist.Normal(q.loc, q.scale).log_prob(base).sum(-1) - torch.linalg.slogdet(jacobians)[1]
    torch.testing.assert_close(q.log_prob(z), expected)  # the log-density kept from the draw
    torch.testing.assert_close(q.log_prob(z.clone()), expected)  # through the inverse


@pytest.mark.parametrize("arch", ["mlp", "paper"])
def test_networks_take_leading_sample_dims(arch):
    encoder, decoder = example.networks(arch)
    assert encoder(torch.zeros(2, 3, 784)).shape == (2, 3, 256)
    assert decoder(torch.zeros(4, 3, 64)).shape == (4, 3, 784)


def test_paper_architecture_trains_with_a_sylvester_flow():
    x = binary_images(8)
    pyro.set_rng_seed(0)
    encoder, decoder = example.networks("paper")
    model = example.bernoulli_vae(decoder)
    guide = AutoFlowGuide(model, amortised=example.amortised("t-snf", encoder, TINY))
    svi = pyro.infer.SVI(model, guide, example.optimiser(TINY), Trace_ELBO())
    losses = [svi.step(x) for _ in range(3)]
    assert all(math.isfinite(v) for v in losses)
    assert guide.median(x)["z"].shape == (8, 64)


def test_path_gradient_protocol_builds_guides_with_it():
    protocol = dataclasses.replace(TINY, path_gradient=True)
    x = binary_images(8)
    model, guide, _ = example.build("o-snf", protocol, "mlp", "cpu", 0, x[:1])
    assert guide.path_gradient and guide.local_posterior_for(x).path_gradient
    svi = pyro.infer.SVI(model, guide, example.optimiser(protocol), Trace_ELBO())
    assert all(math.isfinite(svi.step(x)) for _ in range(3))


@pytest.mark.parametrize(
    "epochs, decay_epochs, expected",
    [(3, None, [1e-3, 10**-3.5, 1e-4]), (4, 2, [1e-3, 1e-3, 10**-3.5, 1e-4]), (3, 5, [1e-3, 10**-3.5, 1e-4])],
)
def test_the_learning_rate_falls_to_lr_final_in_the_last_epoch(epochs, decay_epochs, expected):
    protocol = dataclasses.replace(TINY, epochs=epochs, lr_final=1e-4, decay_epochs=decay_epochs)
    x = binary_images(8)
    model, guide, _ = example.build("planar", protocol, "mlp", "cpu", 0, x[:1])
    optim = example.optimiser(protocol)
    rates = []

    def record(history):
        rates.append({s.get_last_lr()[0] for s in optim.optim_objs.values()})

    fit(model, guide, data=[x], epochs=epochs, optim=optim, callbacks=[record], progress=False)
    assert all(len(r) == 1 for r in rates)  # one rate for every parameter
    assert [r.pop() for r in rates] == pytest.approx(expected)  # one step per epoch
    assert not isinstance(example.optimiser(TINY), pyro.optim.PyroLRScheduler)  # no lr_final: constant
    one_epoch = dataclasses.replace(TINY, epochs=1, lr_final=1e-4, decay_epochs=3)
    assert not isinstance(example.optimiser(one_epoch), pyro.optim.PyroLRScheduler)  # nothing to decay
    with pytest.raises(ValueError, match="decay_epochs must be at least 1"):
        example.optimiser(dataclasses.replace(TINY, lr_final=1e-4, decay_epochs=0))


def test_bad_choices_are_named():
    with pytest.raises(ValueError, match="unknown architecture 'resnet'"):
        example.networks("resnet")
    with pytest.raises(ValueError, match="unknown flow 'nice'"):
        example.amortised("nice", MLPEncoder(784, [8]), TINY)
    with pytest.raises(FileNotFoundError, match="pass --data"):
        example.load_binarized_mnist("/nonexistent/binarized_mnist.npz")


@needs_data
def test_table_on_a_slice_of_mnist(tmp_path):
    data = example.load_binarized_mnist(DATA)
    assert {k: tuple(v.shape) for k, v in data.items()} == {
        "train": (50000, 784),
        "valid": (10000, 784),
        "test": (10000, 784),
    }
    assert set(data["test"].unique().tolist()) == {0.0, 1.0}
    data = {"train": data["train"][:200], "valid": data["valid"][:100], "test": data["test"][:40]}
    protocol = example.Protocol("tiny", 2, 1, 1, "adam", 1e-3, 50, 2, 128, 8, 10)
    torch.manual_seed(0)
    summary = example.run_table(data, protocol, ["vae", "h-snf"], tmp_path, progress=False)
    saved = json.loads((tmp_path / "vae_mnist.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert (tmp_path / "vae_mnist.png").stat().st_size > 0
    for m in saved["models"].values():
        assert m["epochs"] == 2 and m["best_epoch"] in (1, 2)
        assert len(m["val_neg_elbo_per_epoch"]) == 2
        # Bernoulli likelihoods: log p(x) < 0, and -ELBO = -E log p(x | z) + KL > 0
        assert 0 < m["nll"] < math.inf and 0 < m["neg_elbo"] < math.inf
    assert saved["test_images_nll"] == 10 and saved["test_images_elbo"] == 40
    assert "H-SNF" in (tmp_path / "vae_mnist.md").read_text()
    # runs saved in one process and loaded in another give the same table and figure
    runs = tmp_path / "runs"
    torch.manual_seed(0)
    first = example.run_table(data, protocol, ["vae", "h-snf"], tmp_path / "a", progress=False, runs=runs)
    assert sorted(p.name for p in runs.iterdir()) == ["h-snf.pt", "vae.pt"]
    again = example.run_table(data, protocol, ["vae", "h-snf"], tmp_path / "b", progress=False, runs=runs)
    assert again == first
    assert (tmp_path / "b" / "vae_mnist.png").stat().st_size > 0
    other = example.Protocol("other", 1, 1, 1, "adam", 1e-3, 50, 2, 128, 8, 10)
    with pytest.raises(ValueError, match="was made with protocol"):
        example.run_table(data, other, ["vae"], tmp_path / "c", progress=False, runs=runs)
