"""Time to a posterior for a new data set: an amortised guide's forward pass against a fresh fit.

Trains the data-set-amortised eight schools guide of ``examples/amortised_eight_schools.py`` once
(over simulated data sets), then for the real eight schools data compares, against posteriordb's
reference draws (``eight_schools-eight_schools_noncentered``):

- amortised: one encoder pass and 4000 draws (``draw_posterior``: draws, deterministic ``theta``
  and importance log-weights);
- amortised + PSIS: the same draws resampled with Pareto-smoothed importance weights (``diagnose``);
- amortised + fine-tuning: ``fine_tune`` for ``--fine-tune-steps`` steps on the real data, then draws;
- fresh fit: a new ``AutoFlowGuide`` (the same flow) fitted to the real data by SVI, then draws.

Each row gives the seconds to the posterior, the largest standardised mean error
``|E_q - E_ref| / sd_ref`` and sd error ``|sd_q - sd_ref| / sd_ref`` over mu, tau and theta[1..8],
and the Pareto k-hat. Simulation-based calibration of the amortised guides (eight schools and the
regression of the example) is run and saved too. One thread per process (``--parallel``: the
regression in a second process meanwhile); results in
``benchmarks/results/amortised_speed.{json,md}``.

    python benchmarks/amortised_speed.py --reference ../shared/data/posteriordb --parallel
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
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import posteriordb_models
import pyro
import torch
from pyro.infer import Trace_ELBO

from pyro_flowguides import AutoFlowGuide
from pyro_flowguides.calibration import SBCResult
from pyro_flowguides.datasets import fine_tune
from pyro_flowguides.diagnostics import diagnose
from pyro_flowguides.draws import draw_posterior
from pyro_flowguides.training import fit

ROOT = Path(__file__).resolve().parents[1]
POSTERIOR = "eight_schools-eight_schools_noncentered"


def load_example():
    path = ROOT / "examples" / "amortised_eight_schools.py"
    spec = importlib.util.spec_from_file_location("amortised_eight_schools", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def timed(fn: Callable, repeats: int = 1):
    """``(result of the last call, median seconds)``."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - start)
    return result, statistics.median(seconds)


def signed_errors(draws: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, list[float]]:
    """``name -> [(E_q - E_ref) / sd_ref, (sd_q - sd_ref) / sd_ref]`` for flattened draws."""
    return {
        n: [
            float((draws[n].mean() - ref.mean()) / ref.std()),
            float((draws[n].std() - ref.std()) / ref.std()),
        ]
        for n, ref in reference.items()
    }


def errors(draws: dict[str, torch.Tensor], reference: dict[str, np.ndarray]) -> dict[str, float]:
    signed = signed_errors(posteriordb_models.flatten_draws(draws, list(reference)), reference)
    mean_error = {n: abs(mean) for n, (mean, _) in signed.items()}
    sd_error = {n: abs(sd) for n, (_, sd) in signed.items()}
    return {
        "max_std_mean_error": float(max(mean_error.values())),
        "max_std_sd_error": float(max(sd_error.values())),
        "worst_mean": max(mean_error, key=mean_error.get),
        "worst_sd": max(sd_error, key=sd_error.get),
    }


def regression_sbc(args: argparse.Namespace) -> SBCResult:
    """The regression's amortised guide, trained as eight schools', and its SBC."""
    torch.set_num_threads(1)
    example = load_example()
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    guide = example.amortised_guide("regression")
    example.train("regression", guide, args.elbo_steps, args.forward_kl_steps)
    return example.calibrate("regression", guide)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reference", type=Path, required=True, help="posteriordb folder of the shared data")
    parser.add_argument("--elbo-steps", type=int, default=3000)
    parser.add_argument("--forward-kl-steps", type=int, default=4000)
    parser.add_argument("--fit-steps", type=int, default=3000, help="SVI steps of the fresh fit")
    parser.add_argument("--fine-tune-steps", type=int, default=500)
    parser.add_argument("--num-draws", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--parallel", action="store_true", help="train the regression in a second process meanwhile"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "amortised_speed")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    example = load_example()
    _, _, reference = posteriordb_models.load(args.reference / POSTERIOR)
    data = {"sigma": example.SIGMA, "y": example.Y}
    model, draws_n = example.eight_schools, args.num_draws

    regression = None
    if args.parallel:  # the regression's training and SBC in a second process, one thread each
        regression = ProcessPoolExecutor(1).submit(regression_sbc, args)
    rows, sbc = {}, {}
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    guide = example.amortised_guide("eight_schools")
    _, train_seconds = timed(
        lambda: example.train("eight_schools", guide, args.elbo_steps, args.forward_kl_steps)
    )
    print(f"amortised guide trained in {train_seconds:.0f} s", flush=True)

    with torch.no_grad():
        amortised, seconds = timed(lambda: draw_posterior(model, guide, num_samples=draws_n, **data), 5)
        report, psis_seconds = timed(lambda: diagnose(guide, model, num_samples=draws_n, **data), 5)
    rows["amortised"] = {"seconds": seconds, "k_hat": report.k_hat, **errors(amortised.samples, reference)}
    rows["amortised + PSIS"] = {
        "seconds": psis_seconds,
        "k_hat": report.k_hat,
        **errors(report.resampled, reference),
    }
    sbc["eight_schools"] = example.calibrate("eight_schools", guide)
    saved = copy.deepcopy(pyro.get_param_store().get_state())

    def fine_tuned():
        fine_tune(model, guide, data, num_steps=args.fine_tune_steps)
        return draw_posterior(model, guide, num_samples=draws_n, **data)

    tuned, tune_seconds = timed(fine_tuned)
    k_tuned = diagnose(guide, model, num_samples=draws_n, **data).k_hat
    rows["amortised + fine-tuning"] = {
        "seconds": tune_seconds,
        "k_hat": k_tuned,
        **errors(tuned.samples, reference),
    }
    pyro.get_param_store().set_state(saved)

    def fresh_fit():
        pyro.clear_param_store()
        fresh = AutoFlowGuide(model, flow="neural_spline", num_flows=4)
        elbo = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
        optim = pyro.optim.ClippedAdam({"lr": 0.01, "lrd": 0.1 ** (1 / args.fit_steps)})
        fit(model, fresh, num_steps=args.fit_steps, loss=elbo, optim=optim, model_kwargs=data, progress=False)
        return fresh, draw_posterior(model, fresh, num_samples=draws_n, **data)

    (fresh, fresh_draws), fit_seconds = timed(fresh_fit)
    k_fresh = diagnose(fresh, model, num_samples=draws_n, **data).k_hat
    rows["fresh AutoFlowGuide fit"] = {
        "seconds": fit_seconds,
        "k_hat": k_fresh,
        **errors(fresh_draws.samples, reference),
    }

    summary = {
        "train_seconds": train_seconds,
        "speedup_fresh_fit_over_amortised": fit_seconds / rows["amortised"]["seconds"],
        "speedup_fresh_fit_over_amortised_psis": fit_seconds / rows["amortised + PSIS"]["seconds"],
        "break_even_datasets": train_seconds / (fit_seconds - rows["amortised + PSIS"]["seconds"]),
    }
    save(args, rows, summary, sbc)  # eight schools' figures kept should the regression fail
    sbc["regression"] = regression.result() if regression else regression_sbc(args)
    save(args, rows, summary, sbc)
    print(args.out.with_suffix(".md").read_text())


def save(args: argparse.Namespace, rows: dict, summary: dict, sbc: dict) -> None:
    """Write the figures so far to ``args.out`` (``.json`` and ``.md``)."""
    settings = {
        **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    result = {
        "settings": settings,
        "rows": rows,
        "summary": summary,
        "sbc": {
            name: {
                "p_values": r.p_values(),
                "coverage": {k: {str(lv): c for lv, c in v.items()} for k, v in r.coverage().items()},
                "expected_coverage": {str(k): v for k, v in r.expected_coverage().items()},
            }
            for name, r in sbc.items()
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    args.out.with_suffix(".md").write_text(markdown(rows, summary, sbc, settings))


def markdown(rows: dict, summary: dict, sbc: dict, settings: dict) -> str:
    lines = [
        "# Amortised posteriors for a new data set: eight schools (real data)",
        "",
        f"Guide trained once over simulated data sets ({settings['elbo_steps']} ELBO steps + "
        f"{settings['forward_kl_steps']} forward-KL steps, 128 data sets each) in "
        f"{summary['train_seconds']:.0f} s; one thread ({settings['cpu']}), torch {settings['torch']}, "
        f"pyro {settings['pyro']}. Errors against posteriordb's reference draws, in reference sds, "
        f"over mu, tau, theta[1..8]; {settings['num_draws']} draws.",
        "",
        "| posterior | seconds | max mean error | max sd error | k-hat |",
        "|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['seconds']:.3f} | {row['max_std_mean_error']:.3f} ({row['worst_mean']}) | "
            f"{row['max_std_sd_error']:.3f} ({row['worst_sd']}) | {row['k_hat']:.2f} |"
        )
    lines += [
        "",
        f"Fresh fit / amortised: {summary['speedup_fresh_fit_over_amortised']:.0f}x "
        f"({summary['speedup_fresh_fit_over_amortised_psis']:.0f}x with PSIS); the training pays for "
        f"itself after {summary['break_even_datasets']:.1f} data sets.",
        "",
    ]
    raw = rows["amortised"]
    within = max(raw["max_std_mean_error"], raw["max_std_sd_error"]) < 0.1
    lines += [
        f"Issue 7's targets: the amortised posterior's raw moments within 0.1 reference sd: "
        f"{'met' if within else 'NOT met'}; SBC ranks pass the 1% uniformity test for every parameter: "
        + ", ".join(f"{name} {'met' if all(r.passed().values()) else 'NOT met'}" for name, r in sbc.items())
        + ".",
        "",
    ]
    for name, result in sbc.items():
        lines += [f"## SBC: {name}", "", "```", str(result), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
