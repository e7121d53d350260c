"""Time to a posterior for a new data set: an amortised guide's forward pass against a fresh fit.

Trains the data-set-amortised eight schools guide of ``examples/amortised_eight_schools.py`` once
(over simulated data sets: an ensemble of ``--members`` guides, each trained alone, ``--workers``
at a time), then for the real eight schools data compares, against posteriordb's reference draws
(``eight_schools-eight_schools_noncentered``):

- amortised: one encoder pass per member and ``--num-draws`` draws (``draw_posterior``: draws,
  deterministic ``theta`` and importance log-weights under the mixture's density);
- amortised + PSIS: the same draws resampled with Pareto-smoothed importance weights (``diagnose``);
- amortised + fine-tuning: ``fine_tune`` (the mixture's ELBO) for ``--fine-tune-steps`` steps on
  the real data, then draws;
- fresh fit: a new ``AutoFlowGuide`` (the same flow) fitted to the real data by SVI, then draws.

Each row gives the seconds to the posterior, the largest standardised mean error
``|E_q - E_ref| / sd_ref`` and sd error ``|sd_q - sd_ref| / sd_ref`` over mu, tau and theta[1..8],
and the Pareto k-hat; then the ranges of those figures over ``--draw-sets`` sets of draws, and the
moments of the amortised posterior itself from ``--moment-draws`` raw draws (a sd from 20000 draws
of eight schools' heavy-tailed ``tau`` is noisy). Simulation-based calibration of the amortised
guides (eight schools and the regression of the example) is run and saved too. One thread per
process (``--parallel``: the regression in a second process meanwhile); results in
``benchmarks/results/amortised_speed.{json,md}``. ``--params FILE`` saves the trained ensemble,
or, when the file exists, evaluates it without training (its training time is read from it).

    python benchmarks/amortised_speed.py --reference ../shared/data/posteriordb --workers 2 \\
        --params ensemble.pt
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
from pyro_flowguides.datasets import draw_for_datasets, fine_tune, stack_datasets
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
    return worst_errors(signed_errors(posteriordb_models.flatten_draws(draws, list(reference)), reference))


def worst_errors(signed: dict[str, list[float]]) -> dict[str, float]:
    """The largest absolute mean and sd errors of :func:`signed_errors`, and where they are."""
    mean_error = {n: abs(mean) for n, (mean, _) in signed.items()}
    sd_error = {n: abs(sd) for n, (_, sd) in signed.items()}
    return {
        "max_std_mean_error": float(max(mean_error.values())),
        "max_std_sd_error": float(max(sd_error.values())),
        "worst_mean": max(mean_error, key=mean_error.get),
        "worst_sd": max(sd_error, key=sd_error.get),
    }


@torch.no_grad()
def raw_draws(example, guide: Callable, total: int, chunk: int = 100_000) -> dict[str, torch.Tensor]:
    """``total`` draws of the amortised posterior for the real data, without weights, in chunks
    (one encoder pass each): ``mu``, ``tau`` and ``theta = mu + tau theta_tilde``."""
    batch = stack_datasets([{"sigma": example.SIGMA, "y": example.Y}])
    parts = []
    for start in range(0, total, chunk):
        parts.append(
            draw_for_datasets(example.eight_schools, guide, batch, min(chunk, total - start)).samples
        )
    samples = {name: torch.cat([part[name][:, 0] for part in parts]) for name in parts[0]}
    theta = samples["mu"].unsqueeze(-1) + samples["tau"].unsqueeze(-1) * samples["theta_tilde"]
    return {"mu": samples["mu"], "tau": samples["tau"], "theta": theta}


def sd_error_ranges(
    draws: dict[str, np.ndarray], reference: dict[str, np.ndarray], size: int
) -> dict[str, list[float]]:
    """Per name, the smallest and largest sd error among consecutive chunks of ``size`` draws."""
    ranges = {}
    for name, ref in reference.items():
        chunks = draws[name][: len(draws[name]) // size * size].reshape(-1, size)
        sd_errors = (chunks.std(1) - ref.std()) / ref.std()
        ranges[name] = [float(sd_errors.min()), float(sd_errors.max())]
    return ranges


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
    parser.add_argument("--num-draws", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0, help="member m of the ensemble trains from seed + m")
    parser.add_argument("--members", type=int, default=6, help="the amortised ensemble's size")
    parser.add_argument("--workers", type=int, default=1, help="members trained at once")
    parser.add_argument(
        "--parallel", action="store_true", help="train the regression in a second process meanwhile"
    )
    parser.add_argument(
        "--draw-sets", type=int, default=5, help="sets of draws whose errors and k-hat are reported as ranges"
    )
    parser.add_argument(
        "--moment-draws", type=int, default=2_000_000, help="raw draws for the moments of q itself"
    )
    parser.add_argument(
        "--params", type=Path, default=None, help="load the trained ensemble from here, or save it here"
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
    if args.params and args.params.exists():  # a trained ensemble saved by an earlier run
        saved = torch.load(args.params, weights_only=False)
        pyro.clear_param_store()
        pyro.get_param_store().set_state(saved["param_store"])
        guide, train_seconds = example.amortised_ensemble("eight_schools", args.members), saved["seconds"]
    else:
        guide, train_seconds = timed(
            lambda: example.train_ensemble(
                "eight_schools", args.members, args.seed, args.workers, args.elbo_steps, args.forward_kl_steps
            )
        )
        if args.params:
            state = {"param_store": pyro.get_param_store().get_state(), "seconds": train_seconds}
            torch.save(state, args.params)
    print(f"amortised ensemble trained in {train_seconds:.0f} s", flush=True)

    with torch.no_grad():
        amortised, seconds = timed(lambda: draw_posterior(model, guide, num_samples=draws_n, **data), 5)
        report, psis_seconds = timed(lambda: diagnose(guide, model, num_samples=draws_n, **data), 5)
        draw_sets = [(amortised.samples, report)] + [
            (
                draw_posterior(model, guide, num_samples=draws_n, **data).samples,
                diagnose(guide, model, num_samples=draws_n, **data),
            )
            for _ in range(args.draw_sets - 1)
        ]
        many, many_seconds = timed(lambda: raw_draws(example, guide, args.moment_draws))
    flat = posteriordb_models.flatten_draws(many, list(reference))
    signed = signed_errors(flat, reference)
    moments = {
        "draws": args.moment_draws,
        "seconds": many_seconds,
        **worst_errors(signed),
        "signed": signed,
        "sd_error_range_per_20000": sd_error_ranges(flat, reference, 20000),
    }
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
        fresh = AutoFlowGuide(model, flow=example.SCHOOLS_FLOW)
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
        "moments_of_q": moments,
        "draw_sets": [
            {"raw": errors(raw, reference), "psis": errors(r.resampled, reference), "k_hat": r.k_hat}
            for raw, r in draw_sets
        ],
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
        f"An ensemble of {settings['members']} guides, each trained once over simulated data sets "
        f"({settings['elbo_steps']} ELBO steps + {settings['forward_kl_steps']} forward-KL steps, 128 "
        f"data sets each), in {summary['train_seconds']:.0f} s wall ({settings['workers']} at a time); "
        f"one thread per process ({settings['cpu']}), torch {settings['torch']}, "
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
    sets = summary["draw_sets"]

    def span(kind: str, key: str) -> str:
        values = [d[kind][key] for d in sets]
        return f"{min(values):.3f}-{max(values):.3f}"

    k_hats = [d["k_hat"] for d in sets]
    lines += [
        f"Over {len(sets)} sets of {settings['num_draws']} draws (the first is the table's): raw max mean "
        f"error {span('raw', 'max_std_mean_error')}, raw max sd error {span('raw', 'max_std_sd_error')}; "
        f"PSIS {span('psis', 'max_std_mean_error')} / {span('psis', 'max_std_sd_error')}; k-hat "
        f"{min(k_hats):.2f}-{max(k_hats):.2f}.",
        "",
    ]
    q = summary["moments_of_q"]
    spans = q["sd_error_range_per_20000"]
    noisiest = max(spans, key=lambda name: spans[name][1] - spans[name][0])
    lines += [
        f"The moments of the amortised posterior itself, from {q['draws']} raw draws ({q['seconds']:.0f} s): "
        f"max mean error {q['max_std_mean_error']:.3f} ({q['worst_mean']}), max sd error "
        f"{q['max_std_sd_error']:.3f} ({q['worst_sd']}). Among chunks of 20000 of those draws, the sd "
        f"error of {noisiest} ranges from {spans[noisiest][0]:+.3f} to {spans[noisiest][1]:+.3f}.",
        "",
    ]
    within = max(q["max_std_mean_error"], q["max_std_sd_error"]) < 0.1
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
