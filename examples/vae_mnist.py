"""The Sylvester-flows VAE on static binarized MNIST (van den Berg et al. 2018, Table 1).

A VAE with a 64-d latent per image, ``z_i ~ N(0, I)``, ``x_i ~ Bernoulli(decoder(z_i))``, whose
posterior ``q(z_i | x_i)`` is an amortised :class:`~pyro_flowguides.AutoFlowGuide`: no flow (the
plain VAE), planar, IAF, orthogonal, Householder and triangular Sylvester flows, every flow
parameter an output of the encoder. Trained by SVI on minibatches with KL warm-up and early stopping
on the validation split; reports the test -ELBO and the importance-weighted NLL (Burda et al. 2016)
in nats beside the paper's Table 1, saved as JSON and markdown, with a figure of reconstructions
and samples.

    python examples/vae_mnist.py                  # CPU budget: MLP, 10 epochs, every flow
    python examples/vae_mnist.py --flows vae t-snf --epochs 2
    python examples/vae_mnist.py --flows vae o-snf --epochs 3 --train-items 10000 --path-gradient
    python examples/vae_mnist.py --protocol paper --arch paper --device cuda

Protocols (``--protocol``):

- ``cpu``: 10 epochs, Adam 1e-3 for 7 of them, then falling by a constant factor per epoch to 1e-4
  in the last (at a constant rate the Sylvester flows' encoders do not settle in 10 epochs),
  batch 100, KL warm-up over 3 epochs, patience 3 epochs, K = 4 flows (the reference code's
  default), NLL from 1000 importance samples on 1000 test images. With ``--epochs`` the rate falls
  over the last 3 epochs, or every epoch after the first if there are fewer than 4.
- ``paper``: the paper's protocol: up to 2000 epochs, Adamax 5e-4, batch 100, warm-up over 100
  epochs, early stopping after 100 epochs without improvement, K = 16 flows, NLL from 5000
  samples on all 10 000 test images. For a GPU.

Flows as in the paper: O-SNF with M = 32 orthogonal vectors, H-SNF with 8 Householder reflections
per ``Q``, T-SNF with M = z = 64; IAF layers read the encoder's hidden state as a context with their
inputs (MADE width 320 on the CPU protocol, 1280 on the paper's).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch import Tensor, nn
from torch.utils.data import DataLoader

from pyro_flowguides import Amortised, AutoFlowGuide, MLPEncoder
from pyro_flowguides.diagnostics import log_evidence_per_item
from pyro_flowguides.training import fit

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared/data/binarized_mnist/binarized_mnist.npz"
Z_DIM = 64
IMAGE_SHAPE = (1, 28, 28)
VALID_BATCH = 1000  # fit records the validation loss as a mean over batches

#: van den Berg et al. (2018), Table 1, static MNIST: (-ELBO, NLL) in nats
PAPER_TABLE1 = {
    "vae": (86.55, 82.14),
    "planar": (86.06, 81.91),
    "iaf": (84.20, 80.79),
    "o-snf": (83.32, 80.22),
    "h-snf": (83.40, 80.29),
    "t-snf": (83.40, 80.28),
}
PAPER_TABLE1["vae-s1"] = PAPER_TABLE1["vae"]
#: key -> (label, flow layer name; None for the plain VAE)
FLOWS = {
    "vae": ("VAE", None),
    "vae-s1": ("VAE, init scale 1", None),
    "planar": ("Planar", "planar"),
    "iaf": ("IAF", "iaf"),
    "o-snf": ("O-SNF", "orthogonal_sylvester"),
    "h-snf": ("H-SNF", "householder_sylvester"),
    "t-snf": ("T-SNF", "triangular_sylvester"),
}
SYLVESTER = ("o-snf", "h-snf", "t-snf")
#: The plain VAE twice: with the guide's default initial scale 0.1 (as every flow) and with 1, near
#: the paper's initialisation (softplus of a random linear layer, variance about 0.7). With random
#: output heads the two ended 0.3 nats of NLL apart on the CPU protocol; the flows are compared with
#: the better of the two.
BASELINES = ("vae", "vae-s1")
INIT_SCALES = {"vae-s1": 1.0}
DEFAULT_INIT_SCALE = 0.1  # AutoFlowGuide's default


@dataclass(frozen=True)
class Protocol:
    """How the table is made: training budget, optimiser, flow sizes and the NLL estimate."""

    name: str
    epochs: int
    kl_warmup: int  # epochs over which β rises linearly to 1
    patience: int  # validations without improvement (counted after the warm-up) before stopping
    optimiser: str  # "adam" or "adamax"
    lr: float
    batch_size: int
    num_flows: int
    iaf_width: int
    nll_samples: int
    nll_items: int  # test images for the NLL (a fixed random subset); 0 for all
    ortho_vecs: int = 32
    householder: int = 8
    path_gradient: bool = False  # AutoFlowGuide(path_gradient=True): drop the ELBO gradient's score term
    lr_final: float | None = None  # the last epoch's rate, reached by exponential decay per epoch
    decay_epochs: int | None = None  # the epochs of decay, at the end (None: every epoch after the first)


PROTOCOLS = {
    "cpu": Protocol("cpu", 10, 3, 3, "adam", 1e-3, 100, 4, 320, 1000, 1000, lr_final=1e-4, decay_epochs=3),
    "paper": Protocol("paper", 2000, 100, 100, "adamax", 5e-4, 100, 16, 1280, 5000, 0),
}


# -- data -------------------------------------------------------------------------------------------


def load_binarized_mnist(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """The splits ``train`` (50 000), ``valid`` (10 000) and ``test`` (10 000) as float tensors of
    shape ``(n, 784)`` with values in {0, 1}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no binarized MNIST at {path}; pass --data with the path of binarized_mnist.npz "
            f"(arrays train, valid, test of shape (n, 784), uint8 in {{0, 1}})"
        )
    with np.load(path) as arrays:
        return {
            split: torch.from_numpy(arrays[split]).to(device=device, dtype=torch.float32)
            for split in ("train", "valid", "test")
        }


# -- networks ---------------------------------------------------------------------------------------


class Gated(nn.Module):
    """A gated layer ``h(x) ⊙ σ(g(x))`` with ``h``, ``g`` two convolutions of the same shape
    (Dauphin et al. 2017; the Sylvester paper's GatedConv2d / GatedConvTranspose2d)."""

    def __init__(self, conv: type[nn.Conv2d] | type[nn.ConvTranspose2d], *args: int) -> None:
        super().__init__()
        self.h, self.g = conv(*args), conv(*args)

    def forward(self, x: Tensor) -> Tensor:
        return self.h(x) * torch.sigmoid(self.g(x))


class ConvEncoder(nn.Module):
    """The paper's gated convolutional encoder (MNIST): flat images ``(..., 784)`` to ``h`` of
    shape ``(..., 256)``."""

    def __init__(self) -> None:
        super().__init__()
        channels = [(1, 32, 5, 1, 2), (32, 32, 5, 2, 2), (32, 64, 5, 1, 2), (64, 64, 5, 2, 2)]
        channels += [(64, 64, 5, 1, 2), (64, 256, 7, 1, 0)]
        self.net = nn.Sequential(*(Gated(nn.Conv2d, *c) for c in channels))

    def forward(self, x: Tensor) -> Tensor:
        batch = x.shape[:-1]
        return self.net(x.reshape(-1, *IMAGE_SHAPE)).reshape(*batch, 256)


class ConvDecoder(nn.Module):
    """The paper's gated transposed-convolutional decoder (MNIST): ``z`` of shape ``(..., 64)`` to
    Bernoulli logits ``(..., 784)``."""

    def __init__(self, z_dim: int = Z_DIM) -> None:
        super().__init__()
        channels = [(z_dim, 64, 7, 1, 0), (64, 64, 5, 1, 2), (64, 32, 5, 2, 2, 1), (32, 32, 5, 1, 2)]
        channels += [(32, 32, 5, 2, 2, 1), (32, 32, 5, 1, 2)]
        self.net = nn.Sequential(*(Gated(nn.ConvTranspose2d, *c) for c in channels), nn.Conv2d(32, 1, 1))
        self.z_dim = z_dim

    def forward(self, z: Tensor) -> Tensor:
        batch = z.shape[:-1]
        return self.net(z.reshape(-1, self.z_dim, 1, 1)).reshape(*batch, 784)


def mlp_decoder(z_dim: int = Z_DIM, hidden_dims: Sequence[int] = (256, 512)) -> nn.Sequential:
    """``z -> Bernoulli logits``: a ReLU MLP ``z_dim -> hidden_dims -> 784``."""
    widths = [z_dim, *hidden_dims]
    layers: list[nn.Module] = []
    for n_in, n_out in itertools.pairwise(widths):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(widths[-1], 784))


def networks(arch: str, z_dim: int = Z_DIM) -> tuple[nn.Module, nn.Module]:
    """``(encoder, decoder)``: ``"mlp"`` (784-512-256 and 64-256-512-784) or ``"paper"`` (gated
    convolutions, 256-d hidden state).

    >>> encoder, decoder = networks("mlp")
    >>> encoder(torch.zeros(3, 784)).shape, decoder(torch.zeros(2, 3, 64)).shape
    (torch.Size([3, 256]), torch.Size([2, 3, 784]))
    """
    if arch == "mlp":
        return MLPEncoder(784, [512, 256]), mlp_decoder(z_dim)
    if arch == "paper":
        return ConvEncoder(), ConvDecoder(z_dim)
    raise ValueError(f"unknown architecture {arch!r}; choose 'mlp' or 'paper'")


# -- model and guide --------------------------------------------------------------------------------


def bernoulli_vae(decoder: nn.Module, z_dim: int = Z_DIM, name: str = "decoder") -> Callable[[Tensor], None]:
    """The model: ``z_i ~ N(0, I_{z_dim})``, ``x_i ~ Bernoulli(σ(decoder(z_i)))`` per row of ``x``."""

    def model(x: Tensor) -> None:
        pyro.module(name, decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(z_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    return model


def amortised(key: str, encoder: nn.Module, protocol: Protocol) -> Amortised:
    """The amortised posterior of flow ``key`` (see :data:`FLOWS`) on ``encoder``'s output."""
    if key not in FLOWS:
        raise ValueError(f"unknown flow {key!r}; choose from {', '.join(FLOWS)}")
    flow = FLOWS[key][1]
    if flow is None:
        return Amortised(plate="data", inputs=lambda x: x, encoder=encoder, num_flows=0)
    options = {
        "iaf": {"hidden_dims": [protocol.iaf_width]},
        "orthogonal_sylvester": {"num_ortho_vecs": protocol.ortho_vecs},
        "householder_sylvester": {"num_householder": protocol.householder},
    }.get(flow, {})
    return Amortised(
        plate="data",
        inputs=lambda x: x,
        encoder=encoder,
        flow=flow,
        num_flows=protocol.num_flows,
        flow_options=options,
    )


def build(
    key: str, protocol: Protocol, arch: str, device: str | torch.device, seed: int, example: Tensor
) -> tuple:
    """``(model, guide, decoder)`` for flow ``key``, networks initialised from ``seed`` (the same
    encoder and decoder weights for every flow), the guide set up on the images ``example`` with
    :class:`~pyro_flowguides.Amortised`'s defaults: random output heads
    (:func:`~pyro_flowguides.amortisation.randomise_heads`) and flows on the base draw
    ``loc + scale ⊙ ε`` (``centred=False``), as in the paper."""
    pyro.set_rng_seed(seed)
    encoder, decoder = networks(arch)
    encoder.to(device)
    decoder.to(device)
    model = bernoulli_vae(decoder)
    init_scale = INIT_SCALES.get(key, DEFAULT_INIT_SCALE)
    guide = AutoFlowGuide(
        model,
        amortised=amortised(key, encoder, protocol),
        init_scale=init_scale,
        path_gradient=protocol.path_gradient,
    )
    guide(example)
    return model, guide, decoder


def decay_span(epochs: int, decay_epochs: int | None) -> int:
    """How many of the last epochs run at a falling rate: ``decay_epochs``, at most every epoch
    but the first (all of them but the first when None).

    >>> decay_span(10, 3), decay_span(3, 3), decay_span(10, None), decay_span(1, 3)
    (3, 2, 9, 0)
    """
    if decay_epochs is not None and decay_epochs < 1:
        raise ValueError(
            f"decay_epochs must be at least 1 (or None: every epoch after the first), got {decay_epochs}"
        )
    return epochs - 1 if decay_epochs is None else min(decay_epochs, epochs - 1)


def optimiser(protocol: Protocol) -> pyro.optim.PyroOptim:
    """Adam (fused, one kernel per parameter) or the paper's Adamax (ε = 1e-7). With
    ``protocol.lr_final`` the rate holds at ``lr``, then falls by a constant factor in each of the
    last :func:`decay_span` epochs to ``lr_final`` in the last one
    (:func:`~pyro_flowguides.training.fit` steps the scheduler after every epoch).

    >>> [round(optimiser(PROTOCOLS["cpu"]).kwargs["lr_lambda"](epoch), 3) for epoch in range(10)]
    [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.464, 0.215, 0.1]
    """
    if protocol.optimiser == "adam":
        optim, args = torch.optim.Adam, {"lr": protocol.lr, "fused": True}
    else:
        optim, args = torch.optim.Adamax, {"lr": protocol.lr, "eps": 1e-7}
    decay = decay_span(protocol.epochs, protocol.decay_epochs)
    if protocol.lr_final is None or decay == 0:
        return pyro.optim.PyroOptim(optim, args)
    gamma = (protocol.lr_final / protocol.lr) ** (1 / decay)
    first = protocol.epochs - decay  # the first epoch at a lower rate

    def factor(epoch: int) -> float:
        return gamma ** max(0, epoch - first + 1)

    return pyro.optim.LambdaLR({"optimizer": optim, "optim_args": args, "lr_lambda": factor})


# -- evaluation -------------------------------------------------------------------------------------


@torch.no_grad()
def elbo_per_image(model: Callable, guide: Callable, x: Tensor, batch_size: int = 500) -> Tensor:
    """One-sample ``log p(x_i, z) - log q(z | x_i)``, ``z ~ q(z | x_i)``, for every row of ``x``
    (as the paper evaluates the test ELBO), computed on batches of ``batch_size`` rows."""
    values = []
    for batch in x.split(batch_size):
        guide_trace = poutine.trace(guide).get_trace(batch)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(batch)
        values.append(_log_density_per_item(model_trace) - _log_density_per_item(guide_trace))
    return torch.cat(values)


def _log_density_per_item(trace: poutine.Trace) -> Tensor:
    """The sum of the sample sites' log-densities, per item of the model's one plate."""
    trace.compute_log_prob()
    sites = [s for s in trace.nodes.values() if s["type"] == "sample" and not site_is_subsample(s)]
    return sum(site["log_prob"] for site in sites)


@torch.no_grad()
def nll_per_image(
    model: Callable,
    guide: Callable,
    x: Tensor,
    num_samples: int,
    batch_size: int = 100,
    chunk_size: int = 100,
) -> tuple[Tensor, Tensor]:
    """The importance-weighted NLL ``-log p(x_i)`` from ``num_samples`` draws of ``q(z | x_i)``,
    and its delta-method standard error, per row of ``x``
    (:func:`~pyro_flowguides.diagnostics.log_evidence_per_item` on batches of rows; memory
    ``batch_size × chunk_size × 784``)."""
    estimates, errors = [], []
    for batch in x.split(batch_size):
        log_px, se = log_evidence_per_item(
            model, guide, batch, plate="data", num_samples=num_samples, chunk_size=chunk_size
        )
        estimates.append(-log_px)
        errors.append(se)
    return torch.cat(estimates), torch.cat(errors)


def mean_and_se(values: Tensor) -> tuple[float, float]:
    """Mean and standard error of the mean.

    >>> mean_and_se(torch.tensor([1.0, 3.0]))
    (2.0, 1.0)
    """
    values = values.double()
    return float(values.mean()), float(values.std() / math.sqrt(values.numel()))


# -- one model --------------------------------------------------------------------------------------


def train_and_evaluate(
    key: str,
    data: dict[str, Tensor],
    protocol: Protocol,
    arch: str = "mlp",
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
    nll_index: Tensor | None = None,
) -> dict:
    """Train flow ``key`` under ``protocol`` and evaluate it on the test split.

    Returns a row of the table with per-image test values (``elbo``, ``nll``, ``nll_se``) as
    tensors, the guide, the decoder and ``params``, the model's own param-store state (use it with
    ``pyro.get_param_store().scope(params)``); ``nll_index`` picks the test images of the NLL
    (default: all).
    """
    with pyro.get_param_store().scope() as params:  # each model its own store
        row = _train_and_evaluate(key, data, protocol, arch, device, seed, progress, nll_index)
    return {**row, "params": params}


def _train_and_evaluate(
    key: str,
    data: dict[str, Tensor],
    protocol: Protocol,
    arch: str,
    device: str | torch.device,
    seed: int,
    progress: bool,
    nll_index: Tensor | None,
) -> dict:
    """:func:`train_and_evaluate` in the param store in use."""
    model, guide, decoder = build(key, protocol, arch, device, seed, data["train"][:1])
    train = DataLoader(data["train"], batch_size=protocol.batch_size, shuffle=True)
    valid = DataLoader(data["valid"], batch_size=VALID_BATCH)
    print(f"\n{FLOWS[key][0]}: {arch} networks, protocol {protocol.name}", flush=True)
    start = time.perf_counter()
    history = fit(
        model,
        guide,
        data=train,
        epochs=protocol.epochs,
        optim=optimiser(protocol),
        kl_warmup=protocol.kl_warmup,
        val_data=valid,
        patience=protocol.patience,
        progress=progress,
        log_every=50,
    )
    seconds = time.perf_counter() - start
    test = data["test"]
    elbo = elbo_per_image(model, guide, test)
    nll_rows = test if nll_index is None else test[nll_index]
    start_nll = time.perf_counter()
    nll, nll_se = nll_per_image(model, guide, nll_rows, protocol.nll_samples)
    return {
        "key": key,
        "label": FLOWS[key][0],
        "epochs": len(history.epoch_loss),
        "best_epoch": None if history.best_step is None else history.best_step // len(train),
        "val_neg_elbo_per_epoch": [v / VALID_BATCH for v in history.val_loss],
        "train_seconds": seconds,
        "train_images_per_second": history.steps * protocol.batch_size / seconds,
        "nll_seconds": time.perf_counter() - start_nll,
        "elbo": elbo.cpu(),
        "nll": nll.cpu(),
        "nll_se": nll_se.cpu(),
        "device": str(device),
        "guide": guide,
        "decoder": decoder,
    }


# -- the table --------------------------------------------------------------------------------------


def summarise(rows: Sequence[dict], protocol: Protocol, arch: str, nll_items: int) -> dict:
    """The table as plain numbers: per model -ELBO and NLL (mean ± s.e. over test images), the
    paper's values, and paired differences from the better plain VAE (by NLL) on the same images."""
    baselines = [row for row in rows if row["key"] in BASELINES]
    base = min(baselines, key=lambda row: float(row["nll"].mean())) if baselines else None
    models = {}
    for row in rows:
        neg_elbo, neg_elbo_se = mean_and_se(-row["elbo"])
        nll, nll_se = mean_and_se(row["nll"])
        entry = {
            "label": row["label"],
            "neg_elbo": neg_elbo,
            "neg_elbo_se": neg_elbo_se,
            "nll": nll,
            "nll_se": nll_se,
            "nll_importance_se": float(row["nll_se"].double().pow(2).mean().sqrt() / math.sqrt(nll_items)),
            "paper_neg_elbo": PAPER_TABLE1[row["key"]][0],
            "paper_nll": PAPER_TABLE1[row["key"]][1],
            "epochs": row["epochs"],
            "best_epoch": row["best_epoch"],
            "train_seconds": row["train_seconds"],
            "train_images_per_second": row["train_images_per_second"],
            "nll_seconds": row["nll_seconds"],
            "val_neg_elbo_per_epoch": row["val_neg_elbo_per_epoch"],
        }
        if base is not None and row["key"] not in BASELINES:
            entry["neg_elbo_minus_vae"] = mean_and_se(base["elbo"] - row["elbo"])
            entry["nll_minus_vae"] = mean_and_se(row["nll"] - base["nll"])
        models[row["key"]] = entry
    return {
        "protocol": asdict(protocol),
        "arch": arch,
        "z_dim": Z_DIM,
        "test_images_elbo": int(rows[0]["elbo"].numel()),
        "test_images_nll": nll_items,
        "device": rows[0].get("device", "cpu"),
        "torch_threads": torch.get_num_threads(),
        "baseline": None if base is None else base["label"],
        "models": models,
        "ordering": ordering(models),
    }


def ordering(models: dict) -> dict:
    """Does the paper's ordering hold: every flow better (lower NLL and -ELBO) than the better plain
    VAE, and a Sylvester flow best?"""
    result = {}
    baselines = [k for k in models if k in BASELINES]
    for metric in ("nll", "neg_elbo"):
        if baselines:
            base = min(models[k][metric] for k in baselines)
            flows = [k for k in models if k not in BASELINES]
            result[f"every_flow_beats_vae_{metric}"] = all(models[k][metric] < base for k in flows)
        best = min(models, key=lambda k: models[k][metric])
        result[f"best_{metric}"] = models[best]["label"]
        result[f"sylvester_best_{metric}"] = best in SYLVESTER
    return result


def markdown(summary: dict) -> str:
    """The table in markdown, the paper's Table 1 beside it."""
    p = summary["protocol"]
    nll_images = summary["test_images_nll"]
    lines = [
        f"# Sylvester-flow VAE on static binarized MNIST ({summary['arch']} networks, protocol {p['name']})",
        "",
        f"{p['epochs']} epochs max, batch {p['batch_size']}, {p['optimiser']} lr {p['lr']}"
        f"{_decay(p)}, KL warm-up "
        f"{p['kl_warmup']} epochs, patience {p['patience']}, "
        f"{'path gradients, ' if p.get('path_gradient') else ''}K = {p['num_flows']} flows (O-SNF M = "
        f"{p['ortho_vecs']}, H-SNF {p['householder']} reflections, T-SNF M = {summary['z_dim']}, IAF "
        f"MADE width {p['iaf_width']}), z = {summary['z_dim']}. -ELBO: one sample per image on "
        f"{summary['test_images_elbo']} test images. NLL: {p['nll_samples']} importance samples on "
        f"{nll_images} test images. ± is the standard error over test images; Δ columns are paired "
        f"differences from the better plain VAE ({summary['baseline']}) on the same images (negative: "
        f"better than the VAE). Flows and the first VAE start at the guide's default scale "
        f"{DEFAULT_INIT_SCALE}; the output heads (loc, scale, flow parameters, IAF's last MADE layer) "
        f"start at PyTorch's default random weights, and the flows map the base draw loc + scale ⊙ ε "
        f"(as in the paper). Train img/s: the whole fit, validation included, under whatever load "
        f"the machine had (not a speed comparison). Device "
        f"{summary['device']}, {summary['torch_threads']} torch thread(s).",
        "",
        "| model | -ELBO | NLL | Δ -ELBO vs VAE | Δ NLL vs VAE | paper -ELBO | paper NLL | epochs (best) "
        "| train img/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in summary["models"].values():
        delta_elbo = _delta(m.get("neg_elbo_minus_vae"))
        delta_nll = _delta(m.get("nll_minus_vae"))
        lines.append(
            f"| {m['label']} | {m['neg_elbo']:.2f} ± {m['neg_elbo_se']:.2f} | {m['nll']:.2f} ± "
            f"{m['nll_se']:.2f} | {delta_elbo} | {delta_nll} | {m['paper_neg_elbo']:.2f} | "
            f"{m['paper_nll']:.2f} | {m['epochs']} ({m['best_epoch']}) | "
            f"{m['train_images_per_second']:.0f} |"
        )
    o = summary["ordering"]
    lines += [""]
    if "every_flow_beats_vae_nll" in o:
        lines.append(
            f"Every flow better than the better plain VAE: NLL {_yes(o['every_flow_beats_vae_nll'])}, "
            f"-ELBO {_yes(o['every_flow_beats_vae_neg_elbo'])}."
        )
    lines.append(
        f"Best: NLL {o['best_nll']} ({'a' if o['sylvester_best_nll'] else 'not a'} Sylvester flow), "
        f"-ELBO {o['best_neg_elbo']} ({'a' if o['sylvester_best_neg_elbo'] else 'not a'} Sylvester flow)."
    )
    return "\n".join(lines) + "\n"


def _decay(protocol: dict) -> str:
    """How the learning rate falls, for the table's header (protocols saved before ``lr_final``
    existed have none)."""
    decay = decay_span(protocol["epochs"], protocol.get("decay_epochs"))
    if protocol.get("lr_final") is None or decay == 0:
        return ""
    return f" (falling by a constant factor per epoch over the last {decay} to {protocol['lr_final']})"


def _delta(pair: Sequence[float] | None) -> str:
    return "—" if pair is None else f"{pair[0]:+.2f} ± {pair[1]:.2f}"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def save_table(summary: dict, out: Path, stem: str = "vae_mnist") -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(summary, indent=2) + "\n")
    md_path.write_text(markdown(summary))
    return json_path, md_path


@torch.no_grad()
def save_figure(
    rows: Sequence[dict], images: Tensor, path: Path, num_samples: int = 8, seed: int = 0
) -> Path:
    """A figure: ``images`` (top row), each model's reconstructions of them (decoder means at the
    guide's median code) and decoder means of ``num_samples`` codes from the prior."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    generator = torch.Generator().manual_seed(seed)
    prior_z = torch.randn(num_samples, Z_DIM, generator=generator).to(images.device)
    grid = [("data", images)]
    for row in rows:
        with pyro.get_param_store().scope(row["params"]):
            z = row["guide"].median(images)["z"]
        grid.append((f"{row['label']} recon.", torch.sigmoid(row["decoder"](z))))
    for row in rows:
        grid.append((f"{row['label']} sample", torch.sigmoid(row["decoder"](prior_z))))
    width = max(len(images), num_samples)
    fig, axes = plt.subplots(len(grid), width, figsize=(width * 0.8, len(grid) * 0.85), squeeze=False)
    for r, (label, pictures) in enumerate(grid):
        for c in range(width):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(pictures):
                ax.imshow(pictures[c].reshape(28, 28).cpu().numpy(), cmap="gray", vmin=0, vmax=1)
        axes[r][0].set_title(label, fontsize=7, loc="left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_run(row: dict, path: Path) -> Path:
    """Write one trained model's row of :func:`train_and_evaluate` (per-image results, history,
    the posterior's and decoder's weights) to ``path``, for :func:`load_run`."""
    saved = {k: v for k, v in row.items() if k not in ("guide", "decoder", "params")}
    saved["posterior_state"] = row["guide"].local_posterior.state_dict()
    saved["decoder_state"] = row["decoder"].state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(saved, path)
    return path


def load_run(path: Path, protocol: Protocol, arch: str, device: str | torch.device, example: Tensor) -> dict:
    """A row saved by :func:`save_run`, its guide and decoder rebuilt with the saved weights; the
    run must have been made with the same protocol and architecture."""
    saved = torch.load(path, map_location=device)
    made_with = (saved.get("protocol"), saved.get("arch"))
    if made_with != (asdict(protocol), arch):
        raise ValueError(
            f"{path} was made with protocol {made_with[0]} and arch {made_with[1]!r}, not "
            f"{asdict(protocol)} and {arch!r}; delete it (or choose another --runs folder) to retrain"
        )
    with pyro.get_param_store().scope() as params:
        _, guide, decoder = build(saved["key"], protocol, arch, device, 0, example)
        guide.local_posterior.load_state_dict(saved.pop("posterior_state"))
        decoder.load_state_dict(saved.pop("decoder_state"))
    return {**saved, "guide": guide, "decoder": decoder, "params": params}


def run_table(
    data: dict[str, Tensor],
    protocol: Protocol,
    flows: Sequence[str],
    out: Path,
    arch: str = "mlp",
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
    stem: str = "vae_mnist",
    runs: Path | None = None,
) -> dict:
    """Train and evaluate every flow in ``flows``; save the table (JSON, markdown) and the figure.

    With ``runs`` (a folder), each trained model is saved there as ``<key>.pt`` and a model already
    saved there is loaded instead of trained, so a table can be made from runs in several processes
    (delete a model's file to retrain it)."""
    test = data["test"]
    items = protocol.nll_items or test.shape[0]
    # the test split is sorted by digit: a random subset (the same for every model)
    order = torch.randperm(test.shape[0], generator=torch.Generator().manual_seed(seed))
    nll_index = order[:items].to(test.device)
    rows = []
    for key in flows:
        path = None if runs is None else runs / f"{key}.pt"
        if path is not None and path.is_file():
            rows.append(load_run(path, protocol, arch, device, data["train"][:1]))
            print(f"\n{FLOWS[key][0]}: loaded from {path}", flush=True)
        else:
            row = train_and_evaluate(key, data, protocol, arch, device, seed, progress, nll_index)
            rows.append({**row, "protocol": asdict(protocol), "arch": arch})
            if path is not None:
                save_run(rows[-1], path)
        summary = summarise(rows, protocol, arch, items)
        save_table(summary, out, stem)  # after every model, so a long run can be read as it goes
        print(markdown(summary), flush=True)
    save_figure(rows, test[order[:8].to(test.device)], out / f"{stem}.png")
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="path of binarized_mnist.npz")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="cpu")
    parser.add_argument("--arch", choices=["mlp", "paper"], default="mlp")
    parser.add_argument("--flows", nargs="+", choices=list(FLOWS), default=list(FLOWS))
    parser.add_argument("--epochs", type=int, help="override the protocol's number of epochs")
    parser.add_argument("--nll-samples", type=int, help="override the protocol's importance samples")
    parser.add_argument("--nll-items", type=int, help="override the protocol's NLL test images (0: all)")
    parser.add_argument("--train-items", type=int, help="train on the first N training images only")
    parser.add_argument(
        "--path-gradient", action="store_true", help="AutoFlowGuide(path_gradient=True) for every model"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="vae_mnist_results", help="folder for JSON, markdown, figure")
    parser.add_argument("--runs", help="folder to save each trained model in, and to load saved models from")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    protocol = PROTOCOLS[args.protocol]
    overrides = {"epochs": args.epochs, "nll_samples": args.nll_samples, "nll_items": args.nll_items}
    overrides["path_gradient"] = args.path_gradient or None
    protocol = replace(protocol, **{k: v for k, v in overrides.items() if v is not None})
    data = load_binarized_mnist(args.data, args.device)
    if args.train_items:
        data["train"] = data["train"][: args.train_items]
    runs = None if args.runs is None else Path(args.runs)
    run_table(
        data,
        protocol,
        args.flows,
        Path(args.out),
        args.arch,
        args.device,
        args.seed,
        not args.no_progress,
        runs=runs,
    )


if __name__ == "__main__":
    main()
