"""SVI steps per second on CPU and, where CUDA exists, on the GPU: a VAE and a D = 1000 posterior.

Problems:

* ``vae``: a VAE of the Sylvester-flows paper's size on 784-dimensional binary data (synthetic
  coin flips: the speed does not depend on the values), batch 100, MLP decoder 64 -> 300 -> 784,
  encoder 784 -> 300 giving loc, scale and a context for 4 conditional orthogonal-Sylvester layers
  over the 64-dimensional code (amortised; the encoder and decoder are trained together).
* ``posterior_d1000``: Bayesian logistic regression with D = 1000 weights and N = 200 data points,
  ``AutoFlowGuide`` with affine coupling x 4 (the default flow when these figures were measured).

Loops, each the same SVI step:

* ``svi_step``: Pyro's ``SVI.step`` with ``Trace_ELBO``;
* ``fit``: :func:`pyro_flowguides.training.fit` with its defaults (``Trace_ELBO``, the finiteness check);
* ``fit_sync_free``: ``fit`` with ``SyncFreeTrace_ELBO``, ``check_finite=False`` and Pyro's validation
  off: no host-device synchronisation inside a step.

    python benchmarks/svi_device_speed.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from torch import nn

from pyro_flowguides import flows
from pyro_flowguides.flow_distribution import FlowDistribution
from pyro_flowguides.guide import AutoFlowGuide
from pyro_flowguides.training import SyncFreeTrace_ELBO, fit

Z_DIM, HIDDEN, PIXELS, BATCH = 64, 300, 784, 100


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(Z_DIM, HIDDEN), nn.Softplus(), nn.Linear(HIDDEN, PIXELS))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class FlowEncoder(nn.Module):
    """``q(z | x)``: loc, scale and a context from an MLP of ``x``; conditional flow layers on top."""

    def __init__(self, flow: str, num_flows: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(PIXELS, HIDDEN), nn.Softplus())
        self.loc = nn.Linear(HIDDEN, Z_DIM)
        self.scale = nn.Linear(HIDDEN, Z_DIM)
        # linear heads on the encoder's hidden state, M = 32 orthogonal vectors, as in the paper
        self.layers = flows.stack(
            flow, Z_DIM, num_flows, context_dim=HIDDEN, hidden_dims=[], num_ortho_vecs=32
        )

    def forward(self, x: torch.Tensor) -> FlowDistribution:
        h = self.net(x)
        scale = nn.functional.softplus(self.scale(h)) + 1e-4
        return FlowDistribution(self.loc(h), scale, self.layers, context=h)


def vae(device: torch.device) -> tuple[Callable, Callable, tuple]:
    decoder, encoder = Decoder().to(device), FlowEncoder("orthogonal_sylvester", 4).to(device)

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(Z_DIM, device=x.device), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", encoder)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", encoder(x))

    g = torch.Generator().manual_seed(0)
    x = torch.bernoulli(torch.full((BATCH, PIXELS), 0.5), generator=g).to(device)
    return model, guide, (x,)


def posterior_d1000(device: torch.device) -> tuple[Callable, Callable, tuple]:
    def model(x, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(x.shape[-1], device=x.device), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Bernoulli(logits=x @ w), obs=y)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 1000, generator=g)
    y = torch.bernoulli(torch.sigmoid(x @ torch.randn(1000, generator=g) / 1000**0.5), generator=g)
    return model, AutoFlowGuide(model, flow="affine_coupling"), (x.to(device), y.to(device))


PROBLEMS = {"vae": vae, "posterior_d1000": posterior_d1000}
LOOPS = ("svi_step", "fit", "fit_sync_free")


def seconds_per_step(
    loop: str, model: Callable, guide: Callable, args: tuple, steps: int, warmup: int
) -> float:
    optim = pyro.optim.Adam({"lr": 1e-3})
    if loop == "svi_step":
        svi = SVI(model, guide, optim, Trace_ELBO())

        def run(n: int) -> None:
            for _ in range(n):
                svi.step(*args)
    else:
        options = {"optim": optim, "progress": False}
        if loop == "fit_sync_free":
            options.update(loss=SyncFreeTrace_ELBO(), check_finite=False)

        def run(n: int) -> None:
            with pyro.validation_enabled(loop != "fit_sync_free"):
                fit(model, guide, *args, num_steps=n, **options)

    run(warmup)
    synchronise = torch.cuda.synchronize if args[0].is_cuda else (lambda: None)
    synchronise()
    start = time.perf_counter()
    run(steps)
    synchronise()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the median is kept")
    parser.add_argument("--devices", nargs="*", default=["cpu", "cuda"], help="cuda is skipped where absent")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    devices = [d for d in args.devices if d != "cuda" or torch.cuda.is_available()]
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows = []
    for device_name in devices:
        device = torch.device(device_name)
        hardware = (
            torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
        )
        for problem, build in PROBLEMS.items():
            times: dict[str, list[float]] = {}
            for _ in range(args.repeats):  # interleaved, so that machine noise hits every loop alike
                for loop in LOOPS:
                    pyro.clear_param_store()
                    pyro.set_rng_seed(0)
                    model, guide, data = build(device)
                    times.setdefault(loop, []).append(
                        seconds_per_step(loop, model, guide, data, args.steps, args.warmup)
                    )
            for loop in LOOPS:
                seconds = sorted(times[loop])[len(times[loop]) // 2]
                row = {
                    "problem": problem,
                    "device": device_name,
                    "hardware": hardware,
                    "loop": loop,
                    "steps_per_s": 1 / seconds,
                    "ms_per_step": 1000 * seconds,
                    "ms_per_step_all_repeats": [1000 * t for t in times[loop]],
                    "cpu_threads": args.threads,
                    "steps": args.steps,
                }
                rows.append(row)
                print(
                    f"{problem:16s} {device_name:5s} {loop:14s} {row['steps_per_s']:8.1f} steps/s", flush=True
                )
    load = f"1-minute load average {load_before} before, {os.getloadavg()[0] if load_before else None} after"
    for row in rows:
        row["load"] = load
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "_".join(devices)
    (args.out / f"svi_device_speed_{suffix}.json").write_text(json.dumps(rows, indent=1))
    lines = [
        f"SVI steps per second; torch {torch.__version__}, pyro {pyro.__version__}, "
        f"{args.threads} CPU thread(s), {args.steps} timed steps after {args.warmup} warm-up steps, "
        f"median of {args.repeats} interleaved rounds; {load} on {os.cpu_count()} CPU cores (other jobs "
        f"running make the rounds differ: see ms_per_step_all_repeats in the JSON).",
        "",
        "| problem | device | hardware | loop | steps/s | ms/step |",
        "|---|---|---|---|---|---|",
        *(
            f"| {r['problem']} | {r['device']} | {r['hardware']} | {r['loop']} | {r['steps_per_s']:.1f} | "
            f"{r['ms_per_step']:.2f} |"
            for r in rows
        ),
    ]
    (args.out / f"svi_device_speed_{suffix}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
