"""Guide accuracy on posteriordb posteriors against gold-standard reference draws.

For each posterior in ``--data`` (default ``../shared/data/posteriordb``), fits Pyro's AutoNormal,
AutoMultivariateNormal, AutoIAFNormal and AutoNormalizingFlow (BNAF x 2, Pyro's documented
example) and AutoFlowGuide with each flow family, all with the same optimiser and number of
steps, in float64. Reports per posterior and guide: the largest standardised mean error
``|E_q - E_ref| / sd_ref``, the worst ``|log(sd_q / sd_ref)|``, the Pareto k-hat of
``log p(x, z) - log q(z)`` and the fit time. Saves JSON and a markdown table.

    python benchmarks/posteriordb.py --steps 2000 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro.distributions.transforms import block_autoregressive, iterated
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal, AutoMultivariateNormal, AutoNormal, AutoNormalizingFlow
from pyro.infer.importance import psis_diagnostic, vectorized_importance_weights

sys.path.insert(0, str(Path(__file__).parent))
import posteriordb_models

from pyro_flowguides import AutoFlowGuide, flows, init_to_median_or_feasible

PYRO_GUIDES = {
    "AutoNormal": lambda m: AutoNormal(m, init_loc_fn=init_to_median_or_feasible),
    "AutoMultivariateNormal": lambda m: AutoMultivariateNormal(m, init_loc_fn=init_to_median_or_feasible),
    "AutoIAFNormal": lambda m: AutoIAFNormal(m, init_loc_fn=init_to_median_or_feasible),
    "AutoNormalizingFlow(BNAF x2)": lambda m: AutoNormalizingFlow(
        m, partial(iterated, 2, block_autoregressive)
    ),
}


def flow_guides(num_flows: int) -> dict:
    return {
        f"AutoFlowGuide({name} x{num_flows})": partial(AutoFlowGuide, flow=name, num_flows=num_flows)
        for name in flows.available()
    }


def evaluate(model, guide, data, reference, num_draws: int) -> dict:
    with torch.no_grad():
        _, model_trace, _ = vectorized_importance_weights(
            model, guide, num_samples=num_draws, max_plate_nesting=1, **data
        )
        samples = {
            name: site["value"] for name, site in model_trace.nodes.items() if site["type"] == "sample"
        }
        draws = posteriordb_models.flatten_draws(samples, list(reference))
        k_hat = float(psis_diagnostic(model, guide, num_particles=num_draws, max_plate_nesting=1, **data))
    mean_err, log_sd = [], []
    for name, ref in reference.items():
        q = draws[name]
        mean_err.append(abs(q.mean() - ref.mean()) / ref.std())
        log_sd.append(abs(math.log(q.std() / ref.std())))
    return {
        "max_std_mean_error": float(max(mean_err)),
        "max_abs_log_sd_ratio": float(max(log_sd)),
        "k_hat": k_hat,
    }


def fit(model, guide, data, steps: int, lr: float) -> tuple[float, float]:
    optim = pyro.optim.ClippedAdam({"lr": lr, "lrd": 0.1 ** (1 / steps), "clip_norm": 100.0})
    svi = SVI(model, guide, optim, Trace_ELBO(max_plate_nesting=1))
    start = time.perf_counter()
    losses = [svi.step(**data) for _ in range(steps)]
    return time.perf_counter() - start, float(np.mean(losses[-100:]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path(__file__).parents[2] / "shared/data/posteriordb")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--num-flows", type=int, default=4)
    parser.add_argument("--draws", type=int, default=4000)
    parser.add_argument("--posteriors", nargs="*", default=None)
    parser.add_argument("--guides", nargs="*", default=None, help="substrings of guide names to run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"posteriordb folder not found: {args.data} (pass --data)")
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    guides = {**PYRO_GUIDES, **flow_guides(args.num_flows)}
    if args.guides:
        guides = {k: v for k, v in guides.items() if any(s in k for s in args.guides)}
    folders = sorted(p for p in args.data.iterdir() if p.name in posteriordb_models.POSTERIORS)
    if args.posteriors:
        folders = [p for p in folders if p.name in args.posteriors]
    results = []
    for folder in folders:
        model, data, reference = posteriordb_models.load(folder)
        for guide_name, make_guide in guides.items():
            pyro.clear_param_store()
            pyro.set_rng_seed(args.seed)
            row = {"posterior": folder.name, "guide": guide_name, "steps": args.steps}
            try:
                guide = make_guide(model)
                row["fit_seconds"], row["final_loss"] = fit(model, guide, data, args.steps, args.lr)
                row.update(evaluate(model, guide, data, reference, args.draws))
            except Exception as error:  # a guide that cannot fit a posterior is a result, not a crash
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
            results.append(row)
            print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "posteriordb.json").write_text(json.dumps(results, indent=1))
    (args.out / "posteriordb.md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: list[dict]) -> str:
    lines = [
        "| posterior | guide | max std. mean error | max abs log sd ratio | k-hat | fit s |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['posterior']} | {r['guide']} | failed: {r['error']} | | | |")
        else:
            lines.append(
                f"| {r['posterior']} | {r['guide']} | {r['max_std_mean_error']:.3f} | "
                f"{r['max_abs_log_sd_ratio']:.3f} | {r['k_hat']:.2f} | {r['fit_seconds']:.1f} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
