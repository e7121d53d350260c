"""Which flow, and how much it varies from one training to the next: amortised eight schools.

Trains the data-set-amortised eight schools guide of ``examples/amortised_eight_schools.py`` (its
``train``: ELBO, then ``ForwardKL``) with a given flow, once per seed, and for the real data reports
the raw amortised draws' errors against posteriordb's reference draws
(``eight_schools-eight_schools_noncentered``, in reference sds): per parameter, the signed mean and
sd errors, and the worst of each; the same for the PSIS-resampled draws and the Pareto k-hat. Then
the same errors for the pooled draws of all seeds (an equal mixture of the trained guides: how much
of the error is the variation between trainings). One thread per process; ``--workers`` seeds at
once.

    python benchmarks/amortised_flow_choice.py --reference ../shared/data/posteriordb \\
        --flow neural_spline+neural_spline+neural_spline+neural_spline+iaf --seeds 0 1 --workers 2
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import posteriordb_models
import pyro
import torch
from amortised_speed import POSTERIOR, load_example, signed_errors

from pyro_flowguides.diagnostics import diagnose
from pyro_flowguides.draws import draw_posterior

ROOT = Path(__file__).resolve().parents[1]


def worst(signed: dict[str, list[float]]) -> tuple[float, float]:
    """The largest absolute mean error and sd error."""
    return max(abs(m) for m, _ in signed.values()), max(abs(s) for _, s in signed.values())


def train_and_draw(args: argparse.Namespace, seed: int) -> dict:
    """One training from ``seed``; the real data's raw and PSIS-resampled draws, flattened."""
    torch.set_num_threads(1)
    example = load_example()
    names = args.flow.split("+")
    flow, num_flows = (names[0], args.num_flows) if len(names) == 1 else (names, 1)
    options = {"hidden_dims": args.hidden_dims} if args.hidden_dims else {}
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = example.amortised_guide("eight_schools", flow, num_flows, **options)
    start = time.perf_counter()
    example.train("eight_schools", guide, args.elbo_steps, args.forward_kl_steps)
    seconds = time.perf_counter() - start
    data = {"sigma": example.SIGMA, "y": example.Y}
    reference = reference_draws(args)
    with torch.no_grad():
        raw = draw_posterior(example.eight_schools, guide, num_samples=args.num_draws, **data).samples
        report = diagnose(guide, example.eight_schools, num_samples=args.num_draws, **data)
    return {
        "seed": seed,
        "train_seconds": seconds,
        "k_hat": report.k_hat,
        "raw": posteriordb_models.flatten_draws(raw, list(reference)),
        "psis": posteriordb_models.flatten_draws(report.resampled, list(reference)),
    }


def reference_draws(args: argparse.Namespace) -> dict[str, np.ndarray]:
    return posteriordb_models.load(args.reference / POSTERIOR)[2]


def summarise(run: dict, reference: dict[str, np.ndarray]) -> dict:
    raw = signed_errors(run["raw"], reference)
    psis_mean, psis_sd = worst(signed_errors(run["psis"], reference))
    return {
        "seed": run["seed"],
        "train_seconds": run["train_seconds"],
        "k_hat": run["k_hat"],
        "raw_max_mean_error": worst(raw)[0],
        "raw_max_sd_error": worst(raw)[1],
        "psis_max_mean_error": psis_mean,
        "psis_max_sd_error": psis_sd,
        "raw_signed": raw,
    }


def markdown(args: argparse.Namespace, rows: list[dict], pooled: dict) -> str:
    settings = (
        f"flow {args.flow}"
        + (f" x{args.num_flows}" if "+" not in args.flow else "")
        + (f", hidden_dims {args.hidden_dims}" if args.hidden_dims else "")
        + f"; {args.elbo_steps} ELBO + {args.forward_kl_steps} ForwardKL steps; {args.num_draws} draws; "
        f"one thread ({platform.processor() or platform.machine()}), torch {torch.__version__}"
    )
    lines = [
        "# Amortised eight schools: raw errors per training (reference sds)",
        "",
        settings,
        "",
        "| seed | train s | raw max mean | raw max sd | PSIS max mean | PSIS max sd | k-hat |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['train_seconds']:.0f} | {r['raw_max_mean_error']:.3f} | "
            f"{r['raw_max_sd_error']:.3f} | {r['psis_max_mean_error']:.3f} | {r['psis_max_sd_error']:.3f} | "
            f"{r['k_hat']:.2f} |"
        )
    lines.append(
        f"| pooled ({len(rows)} guides) | | {pooled['max_mean_error']:.3f} | "
        f"{pooled['max_sd_error']:.3f} | | | |"
    )
    names = list(rows[0]["raw_signed"])
    lines += ["", "Signed raw errors, mean / sd:", "", "| seed | " + " | ".join(names) + " |"]
    lines.append("|---" * (len(names) + 1) + "|")
    for r in rows:
        cells = [f"{m:+.2f} / {s:+.2f}" for m, s in r["raw_signed"].values()]
        lines.append(f"| {r['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reference", type=Path, required=True, help="posteriordb folder of the shared data")
    parser.add_argument("--flow", default="neural_spline", help="a layer name, or names joined by '+'")
    parser.add_argument("--num-flows", type=int, default=4, help="repeats of a single layer name")
    parser.add_argument("--hidden-dims", type=int, nargs="*", default=None, help="every layer's widths")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--elbo-steps", type=int, default=3000)
    parser.add_argument("--forward-kl-steps", type=int, default=4000)
    parser.add_argument("--num-draws", type=int, default=20000)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "amortised_flow_choice")
    args = parser.parse_args(argv)
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers) as pool:
            runs = list(pool.map(train_and_draw, [args] * len(args.seeds), args.seeds))
    else:
        runs = [train_and_draw(args, seed) for seed in args.seeds]
    reference = reference_draws(args)
    rows = [summarise(run, reference) for run in runs]
    pooled_draws = {n: np.concatenate([run["raw"][n] for run in runs]) for n in reference}
    pooled_mean, pooled_sd = worst(signed_errors(pooled_draws, reference))
    pooled = {"max_mean_error": pooled_mean, "max_sd_error": pooled_sd}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result = {"settings": settings, "rows": rows, "pooled": pooled}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    args.out.with_suffix(".md").write_text(markdown(args, rows, pooled))
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
