"""The Sylvester-flow VAE (examples/vae_mnist.py) as a benchmark: the table, the cost of the
abstraction, and the cost of a step against the data set's size.

- ``table``: every flow on the CPU budget (MLP networks, 10 epochs); the table as JSON and
  markdown, with the paper's Table 1 beside it, and a figure of reconstructions and samples.
- ``abstraction``: training images per second over one epoch with ``AutoFlowGuide`` against a
  hand-written Pyro guide with the same encoder and flows (:func:`hand_written_guide`), the two
  timed in interleaved blocks of steps in one process, so that load on the machine hits both alike.
- ``scaling``: time and memory allocated per SVI step for a model that subsamples ``N`` images
  with ``pyro.plate(..., subsample_size=B)``, at fixed ``B``, for growing ``N``.

Results go to ``benchmarks/results/vae_mnist*.{json,md,png}``.

    python benchmarks/vae_mnist.py table
    python benchmarks/vae_mnist.py abstraction --flows vae planar o-snf
    python benchmarks/vae_mnist.py scaling --sizes 1000 10000 50000
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from torch import Tensor, nn
from torch.profiler import profile

from pyro_flowguides import AutoFlowGuide

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


def load_example() -> ModuleType:
    """``examples/vae_mnist.py`` as a module (the examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("vae_mnist_example", ROOT / "examples" / "vae_mnist.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def hand_written_guide(posterior: nn.Module, name: str = "posterior") -> Callable[[Tensor], None]:
    """The guide a Pyro user writes by hand for the VAE: ``posterior(x)`` (an encoder and its flows,
    returning a distribution over each row's ``z``) as the distribution of site ``z``.

    With ``posterior = guide.local_posterior`` of an amortised ``AutoFlowGuide`` it is the same
    posterior as the autoguide's, without the autoguide's machinery.
    """

    def guide(x: Tensor) -> None:
        pyro.module(name, posterior)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", posterior(x))

    return guide


def twin_guides(example: ModuleType, key: str, seed: int = 0) -> dict[str, tuple[Callable, Callable]]:
    """``{"auto": (model, guide), "hand": (model, guide)}``: an amortised ``AutoFlowGuide`` for
    flow ``key`` (CPU protocol, MLP networks), and a hand-written guide on a copy of its encoder and
    flows, each with its own copy of the decoder (distinct param-store names)."""
    pyro.set_rng_seed(seed)
    encoder, decoder = example.networks("mlp")
    auto_model = example.bernoulli_vae(decoder, name="decoder_auto")
    auto_guide = AutoFlowGuide(
        auto_model, amortised=example.amortised(key, encoder, example.PROTOCOLS["cpu"])
    )
    auto_guide(torch.zeros(2, 784))  # builds the encoder's flows
    hand_model = example.bernoulli_vae(copy.deepcopy(decoder), name="decoder_hand")
    hand_guide = hand_written_guide(copy.deepcopy(auto_guide.local_posterior), name="posterior_hand")
    return {"auto": (auto_model, auto_guide), "hand": (hand_model, hand_guide)}


def abstraction_cost(
    example: ModuleType, train: Tensor, flows: Sequence[str], batch_size: int, block: int, seed: int
) -> dict:
    """Images per second over one pass through ``train`` for each guide of :func:`twin_guides`,
    timed in alternating blocks of ``block`` steps (the order within a round alternates too)."""
    results = {}
    for key in flows:
        pyro.clear_param_store()
        svis = {
            name: SVI(model, guide, pyro.optim.Adam({"lr": 1e-3, "fused": True}), Trace_ELBO())
            for name, (model, guide) in twin_guides(example, key, seed).items()
        }
        batches = train[torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed))]
        batches = batches.split(batch_size)
        for svi in svis.values():  # warm-up
            for batch in batches[:3]:
                svi.step(batch)
        seconds = {name: 0.0 for name in svis}
        ratios = []
        for r, start in enumerate(range(0, len(batches), block)):
            chunk = batches[start : start + block]
            block_seconds = {}
            for name in sorted(svis, reverse=r % 2 == 1):
                t = time.perf_counter()
                for batch in chunk:
                    svis[name].step(batch)
                block_seconds[name] = time.perf_counter() - t
                seconds[name] += block_seconds[name]
            ratios.append(block_seconds["auto"] / block_seconds["hand"])
        images = sum(len(b) for b in batches)
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        results[key] = {
            "label": example.FLOWS[key][0],
            "images": images,
            "auto_images_per_second": images / seconds["auto"],
            "hand_images_per_second": images / seconds["hand"],
            "time_ratio_auto_over_hand": seconds["auto"] / seconds["hand"],
            "block_ratio_quartiles": quartiles,
        }
        print(f"{key}: {json.dumps(results[key])}", flush=True)
    return results


def abstraction_markdown(results: dict, meta: dict) -> str:
    lines = [
        "# Cost of the abstraction: AutoFlowGuide against a hand-written guide (VAE, MNIST)",
        "",
        f"Training images per second over one epoch ({meta['batch_size']}-image minibatches, "
        f"Trace_ELBO, fused Adam), MLP networks, K = {meta['num_flows']} flows; both guides run the "
        f"same encoder and flow modules (the hand-written guide on a copy of the autoguide's), "
        f"timed in interleaved blocks of {meta['block']} steps in one process. {meta['threads']} torch "
        f"thread(s), {meta['machine']}. Block ratios: quartiles of the per-block time ratio.",
        "",
        f"    {meta['command']}",
        "",
        "| posterior | AutoFlowGuide img/s | hand-written img/s | time ratio auto/hand | block ratio "
        "quartiles |",
        "|---|---|---|---|---|",
    ]
    for r in results.values():
        q = ", ".join(f"{v:.3f}" for v in r["block_ratio_quartiles"])
        lines.append(
            f"| {r['label']} | {r['auto_images_per_second']:.0f} | {r['hand_images_per_second']:.0f} | "
            f"{r['time_ratio_auto_over_hand']:.3f} | {q} |"
        )
    return "\n".join(lines) + "\n"


def subsampled_vae(decoder: nn.Module, batch_size: int, z_dim: int = 64) -> Callable[[Tensor], None]:
    """The VAE over a whole data set ``x``, subsampling ``batch_size`` images per step."""

    def model(x: Tensor) -> None:
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0], subsample_size=batch_size) as index:
            z = pyro.sample("z", dist.Normal(x.new_zeros(z_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x[index])

    return model


def bytes_allocated(step: Callable[[], object]) -> int:
    """Bytes that ``step()`` allocates on the CPU (the sum over operators of their allocations)."""
    with profile(profile_memory=True) as prof:
        step()
    return sum(max(event.self_cpu_memory_usage, 0) for event in prof.key_averages())


def scaling(
    example: ModuleType, train: Tensor, sizes: Sequence[int], key: str, batch_size: int, steps: int
) -> dict:
    """Median time and bytes allocated per SVI step at fixed ``batch_size`` for data sets of each
    size in ``sizes`` (the first ``N`` training images)."""
    protocol = example.PROTOCOLS["cpu"]
    results = {}
    for n in sizes:
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        encoder, decoder = example.networks("mlp")
        model = subsampled_vae(decoder, batch_size)
        guide = AutoFlowGuide(model, amortised=example.amortised(key, encoder, protocol))
        x = train[:n]
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3, "fused": True}), Trace_ELBO())
        for _ in range(3):
            svi.step(x)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            svi.step(x)
            times.append(time.perf_counter() - t)
        results[str(n)] = {
            "N": n,
            "median_ms_per_step": 1000 * statistics.median(times),
            "bytes_allocated_per_step": bytes_allocated(lambda x=x, svi=svi: svi.step(x)),
        }
        print(f"N = {n}: {json.dumps(results[str(n)])}", flush=True)
    return results


def scaling_markdown(results: dict, meta: dict) -> str:
    lines = [
        "# Cost of a step against the data set's size (VAE, MNIST, subsampled plate)",
        "",
        f"`pyro.plate('data', N, subsample_size={meta['batch_size']})` over the first N training "
        f"images, {meta['label']} posterior (MLP networks), Trace_ELBO, fused Adam. Median of "
        f"{meta['steps']} steps; bytes allocated: the sum of every operator's CPU allocations in one "
        f"step (torch profiler). {meta['threads']} torch thread(s), {meta['machine']}.",
        "",
        f"    {meta['command']}",
        "",
        "| N | ms per step | MB allocated per step |",
        "|---|---|---|",
    ]
    for r in results.values():
        lines.append(
            f"| {r['N']} | {r['median_ms_per_step']:.1f} | {r['bytes_allocated_per_step'] / 1e6:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _save(stem: str, payload: dict, text: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / f"{stem}.md").write_text(text)
    print(text, flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["table", "abstraction", "scaling"])
    parser.add_argument("--data", default=None, help="path of binarized_mnist.npz (default: the example's)")
    parser.add_argument("--flows", nargs="+", default=None, help="flows (default: all for table/abstraction)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--block", type=int, default=25, help="abstraction: steps per interleaved block")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    parser.add_argument("--steps", type=int, default=30, help="scaling: timed steps per size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--runs", type=Path, help="table: folder to save trained models in and load them from"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    example = load_example()
    data = example.load_binarized_mnist(args.data or example.DEFAULT_DATA)
    flows = args.flows or list(example.FLOWS)
    meta = {
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "machine": f"torch {torch.__version__}, pyro {pyro.__version__}, {platform.machine()}",
        "command": "python benchmarks/vae_mnist.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    if args.what == "table":
        protocol = example.PROTOCOLS["cpu"]
        example.run_table(data, protocol, flows, args.out, seed=args.seed, progress=True, runs=args.runs)
    elif args.what == "abstraction":
        meta.update(block=args.block, num_flows=example.PROTOCOLS["cpu"].num_flows)
        results = abstraction_cost(example, data["train"], flows, args.batch_size, args.block, args.seed)
        _save(
            "vae_mnist_abstraction",
            {"meta": meta, "results": results},
            abstraction_markdown(results, meta),
            args.out,
        )
    else:
        key = flows[0] if args.flows else "o-snf"
        meta.update(steps=args.steps, label=example.FLOWS[key][0])
        results = scaling(example, data["train"], args.sizes, key, args.batch_size, args.steps)
        _save(
            "vae_mnist_scaling", {"meta": meta, "results": results}, scaling_markdown(results, meta), args.out
        )


if __name__ == "__main__":
    main()
