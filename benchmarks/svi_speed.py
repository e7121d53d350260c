"""Milliseconds per SVI step: AutoFlowGuide against AutoNormal, AutoNormalizingFlow and AutoIAFNormal.

A Bayesian logistic regression with latent dimension D in {10, 100, 1000} (N = 200 data points),
one thread, Trace_ELBO with one particle; all guides timed side by side in one run, the same
number of steps each, after warm-up. Ratios are printed against AutoNormal and against Pyro's
AutoNormalizingFlow with the same flow (planar x 8). AutoFlowGuide's default (a full-rank base,
like AutoMultivariateNormal: O(D²) per step) is timed beside AutoMultivariateNormal.
``--path-gradient`` adds the planar stack and the default with ``path_gradient=True`` (a pass
through the inverse per step; the default's IAF layers invert in D sequential passes) and saves
``svi_speed_path_gradient.json`` instead.

    python benchmarks/svi_speed.py --out benchmarks/results
    python benchmarks/svi_speed.py --path-gradient --dims 10 100 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import planar
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal, AutoMultivariateNormal, AutoNormal, AutoNormalizingFlow

from pyro_flowguides import AutoFlowGuide


def logistic_regression(x, y):
    dim = x.shape[-1]
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([dim]).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=x @ w + b), obs=y)


def guides(num_flows: int, path_gradient: bool = False) -> dict:
    planar = f"planar x{num_flows}"
    pyro_planar = {
        f"AutoNormalizingFlow({planar})": lambda m: AutoNormalizingFlow(
            m, partial(_pyro_planar_module, num_flows)
        )
    }
    if path_gradient:
        ours = {planar: {"flow": "planar", "num_flows": num_flows}, "default": {}}
        return {
            "AutoNormal": AutoNormal,
            **pyro_planar,
            **{
                f"AutoFlowGuide({label}{suffix})": partial(AutoFlowGuide, **options, **extra)
                for label, options in ours.items()
                for suffix, extra in (("", {}), (", path gradient", {"path_gradient": True}))
            },
        }
    return {
        "AutoNormal": AutoNormal,
        "AutoMultivariateNormal": AutoMultivariateNormal,
        **pyro_planar,
        "AutoIAFNormal(x2)": lambda m: AutoIAFNormal(m, num_transforms=2),
        f"AutoFlowGuide({planar})": partial(AutoFlowGuide, flow="planar", num_flows=num_flows),
        "AutoFlowGuide(iaf x2)": partial(AutoFlowGuide, flow="iaf", num_flows=2),
        "AutoFlowGuide(orthogonal_sylvester x4)": partial(
            AutoFlowGuide, flow="orthogonal_sylvester", num_flows=4
        ),
        "AutoFlowGuide(affine_coupling x4)": partial(AutoFlowGuide, flow="affine_coupling", num_flows=4),
        "AutoFlowGuide(default: lu_linear+iaf+lu_linear+iaf, full-rank base)": AutoFlowGuide,
    }


def _pyro_planar_module(num_flows: int, dim: int):
    from pyro.distributions.transforms import ComposeTransformModule

    return ComposeTransformModule([planar(dim) for _ in range(num_flows)])


def time_steps(model, guide, data, steps: int, warmup: int) -> float:
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    for _ in range(warmup):
        svi.step(*data)
    start = time.perf_counter()
    for _ in range(steps):
        svi.step(*data)
    return 1000 * (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dims", type=int, nargs="*", default=[10, 100, 1000])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--num-flows", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the median is kept")
    parser.add_argument("--path-gradient", action="store_true", help="time path_gradient=True beside")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    for dim in args.dims:
        g = torch.Generator().manual_seed(dim)
        x = torch.randn(200, dim, generator=g)
        y = torch.bernoulli(torch.sigmoid(x @ torch.randn(dim, generator=g) / dim**0.5), generator=g)
        times: dict[str, list[float]] = {}
        for _ in range(args.repeats):  # interleave guides so machine noise hits all of them alike
            for name, make in guides(args.num_flows, args.path_gradient).items():
                pyro.clear_param_store()
                pyro.set_rng_seed(0)
                times.setdefault(name, []).append(
                    time_steps(
                        logistic_regression, make(logistic_regression), (x, y), args.steps, args.warmup
                    )
                )
        ms = {name: sorted(v)[len(v) // 2] for name, v in times.items()}
        base = ms["AutoNormal"]
        pyro_flow = ms[f"AutoNormalizingFlow(planar x{args.num_flows})"]
        for name, value in ms.items():
            row = {
                "dim": dim,
                "guide": name,
                "ms_per_step": value,
                "vs_AutoNormal": value / base,
                "vs_AutoNormalizingFlow_same_flow": value / pyro_flow,
            }
            results.append(row)
            print(
                f"D={dim:5d} {name:42s} {value:8.2f} ms  x{value / base:5.2f} AutoNormal  "
                f"x{value / pyro_flow:5.2f} AutoNormalizingFlow",
                flush=True,
            )
    args.out.mkdir(parents=True, exist_ok=True)
    name = "svi_speed_path_gradient.json" if args.path_gradient else "svi_speed.json"
    (args.out / name).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
