"""Guide accuracy on posteriordb posteriors against gold-standard reference draws (issue 3).

For each posterior in ``--data`` (default ``../shared/data/posteriordb``), fits Pyro's AutoNormal,
AutoMultivariateNormal, AutoIAFNormal and AutoNormalizingFlow (BNAF x 2, Pyro's documented
example) and AutoFlowGuide with each flow family, in float64, every guide with the same budget:
the same number of steps and of vectorised particles per ELBO estimate, the same optimiser
(``ClippedAdam``) and learning-rate schedule (a linear warm-up, then an exponential decay from
``--lr`` to ``--lr-final``), the same seed, and the same initial location
(``init_to_median_or_feasible``) and scale (``--init-scale``) wherever a guide has them. Pyro's
flow guides have neither: their base is ``N(0, I)`` in the unconstrained space and they trace the
model with ``init_to_feasible``, which samples the prior and fails on ``ImproperUniform``; they
are given a feasible point built without sampling (``init_to_feasible_point``) instead, which
changes nothing else about them.

Why the defaults (measured with ``--quick``): with one particle the gradient noise kept the
scales of arK and the GP from converging (16 vectorised particles cost about as much per step as
one: the step is overhead-bound); sblrc's posterior sds of 1e-3 need a final learning rate near
1e-4 and, from an initial scale of 0.1, a large enough early one (0.05) to shrink the scales by
250x; an early learning rate of 0.05 without warm-up made network flows diverge on the GP (NaN),
200 warm-up steps stop that. kidiq (raw covariates on large scales: intercept and slope correlated
at -0.99, posterior sds from 0.007 to 20 along the principal axes) does not converge for the
Gaussian guides at any of these budgets, 10000 steps included: the ridge is a conditioning
problem for Adam, and softplus-parameterised scales grow by at most about the learning rate per
step; guides whose layers scale by ``exp`` (affine coupling, IAF) get much closer.

Reported per posterior and guide, from ``--draws`` guide draws:

* ``max std. mean error``: the largest ``|E_q - E_ref| / sd_ref`` over the reference's parameters;
* ``max abs log sd ratio``: the largest ``|log(sd_q / sd_ref)|``;
* ``error``: their sum, a worst-case error in the first two moments (failed fits: infinite);
* ``k-hat``: Pareto k-hat of ``log p(x, z) - log q(z)`` (``pyro.infer.importance.psis_diagnostic``;
  Yao et al. 2018: below 0.7 importance sampling from the guide is reliable);
* the fit time in seconds (2 shared cores: compare within a run).

The summary then answers issue 3's goal. A guide *beats* another on a posterior when its
``error`` is lower. An AutoFlowGuide configuration (flow family and options) beats every Pyro
guide on a posterior when its ``error`` is below each of the four Pyro guides' there; the stricter
tally (lower on both error metrics than each Pyro guide) is printed too. The *best configuration*
is one configuration for the whole table: the one with the lowest mean rank of ``error`` among
all guides over the posteriors. Goal: it beats every Pyro guide on at least 5 of the 7 posteriors,
with k-hat below 0.7 on at least 5 of 7. With 4000 draws the errors of two guides that both fit a
posterior well differ by Monte Carlo noise of a few hundredths: such wins are coin flips.
``--seeds 0 1 2`` repeats every fit with each seed and compares medians over the seeds instead.

    python benchmarks/posteriordb.py                       # the full table (about 40 minutes)
    python benchmarks/posteriordb.py --quick --out /tmp/q  # 4 hard posteriors, 7 guides

Writes ``posteriordb.json`` (settings, one row per fit, the summary) and ``posteriordb.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro.distributions.transforms import block_autoregressive, iterated
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal, AutoMultivariateNormal, AutoNormal, AutoNormalizingFlow
from pyro.infer.autoguide.initialization import InitMessenger
from pyro.infer.importance import psis_diagnostic, vectorized_importance_weights
from pyro.optim.clipped_adam import ClippedAdam

sys.path.insert(0, str(Path(__file__).parent))
import posteriordb_models

from pyro_flowguides import AutoFlowGuide, flows, init_to_median_or_feasible
from pyro_flowguides.guide import init_to_feasible_point

GOAL_WINS, GOAL_KHAT, KHAT_OK = 5, 5, 0.7
QUICK_POSTERIORS = ["arK-arK", "gp_pois_regr-gp_pois_regr", "kidiq-kidscore_interaction", "sblrc-blr"]
QUICK_FLOWS = ["affine_coupling", "iaf", "lu_linear"]


def feasible_init(model: Callable) -> Callable:
    """``model`` traced at a feasible point built without sampling (for Pyro's flow guides)."""
    return InitMessenger(init_to_feasible_point)(model)


def pyro_guides(init_scale: float) -> dict[str, Callable]:
    return {
        "AutoNormal": lambda m: AutoNormal(m, init_loc_fn=init_to_median_or_feasible, init_scale=init_scale),
        "AutoMultivariateNormal": lambda m: AutoMultivariateNormal(
            m, init_loc_fn=init_to_median_or_feasible, init_scale=init_scale
        ),
        "AutoIAFNormal": lambda m: AutoIAFNormal(feasible_init(m)),
        "AutoNormalizingFlow(BNAF x2)": lambda m: AutoNormalizingFlow(
            feasible_init(m), partial(iterated, 2, block_autoregressive)
        ),
    }


def flow_guides(
    specs: list[str], num_flows: int, init_scale: float, flow_options: dict | None = None
) -> dict[str, Callable]:
    """AutoFlowGuide per spec: a layer name (``num_flows`` of it) or names joined by ``+`` (a stack),
    prefixed ``full:`` for ``base_covariance="full"``, then ``path:`` for ``path_gradient=True``.
    Each configuration gets those of the layer options ``flow_options`` that one of its layers
    takes (named in its label); an option that no configuration takes is an error."""
    guides = {}
    flow_options = flow_options or {}
    unused = set(flow_options)
    for spec in specs:
        options = {}
        for prefix, option, value in (("full:", "base_covariance", "full"), ("path:", "path_gradient", True)):
            if spec.startswith(prefix):
                options[option] = value
                spec = spec.removeprefix(prefix)
        if "+" in spec:
            label, flow, count = spec, spec.split("+"), 1
        else:
            label, flow, count = f"{spec} x{num_flows}", spec, num_flows
        if "base_covariance" in options:
            label = f"{label}, full-rank base"
        if "path_gradient" in options:
            label = f"{label}, path gradient"
        takes = [flows.option_names(name) for name in spec.split("+")]
        applied = {k: v for k, v in flow_options.items() if any(t is None or k in t for t in takes)}
        unused -= set(applied)
        options.update(applied)
        if applied:
            label = f"{label}, {', '.join(f'{k}={v}' for k, v in applied.items())}"
        guides[f"AutoFlowGuide({label})"] = partial(
            AutoFlowGuide, flow=flow, num_flows=count, init_scale=init_scale, **options
        )
    if unused:
        raise ValueError(f"--flow-options {', '.join(sorted(unused))}: no configuration's layers take it")
    return guides


def is_pyro_guide(name: str) -> bool:
    return not name.startswith("AutoFlowGuide")


def lr_factor(args: argparse.Namespace, step: int) -> float:
    """Learning rate / ``--lr`` at ``step``: a linear warm-up over ``--warmup`` steps, then an
    exponential decay that reaches ``--lr-final`` at the last step."""
    warm = min(1.0, (step + 1) / max(1, args.warmup))
    return warm * (args.lr_final / args.lr) ** (step / max(1, args.steps - 1))


def fit(model, guide, data, args: argparse.Namespace) -> dict:
    """SVI with the shared budget; the fit time and the mean loss over the last tenth of the steps."""
    optim = pyro.optim.LambdaLR(
        {
            "optimizer": ClippedAdam,
            "optim_args": {"lr": args.lr, "clip_norm": args.clip_norm},
            "lr_lambda": partial(lr_factor, args),
        }
    )
    elbo = Trace_ELBO(
        num_particles=args.particles, vectorize_particles=args.particles > 1, max_plate_nesting=1
    )
    svi = SVI(model, guide, optim, elbo)
    losses = []
    start = time.perf_counter()
    for _ in range(args.steps):
        losses.append(svi.step(**data))
        optim.step()  # the learning-rate schedule
    seconds = time.perf_counter() - start
    return {"fit_seconds": seconds, "final_loss": float(np.mean(losses[-max(1, args.steps // 10) :]))}


def evaluate(model, guide, data, reference: dict[str, np.ndarray], num_draws: int) -> dict:
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
    out = {
        "max_std_mean_error": float(max(mean_err)),
        "max_abs_log_sd_ratio": float(max(log_sd)),
        "k_hat": k_hat,
    }
    if not all(math.isfinite(v) for v in out.values()):
        raise FloatingPointError(f"non-finite evaluation {out}")
    return out


def over_seeds(rows: list[dict]) -> list[dict]:
    """One row per (posterior, guide): the median of each metric over the seeds (a failed seed counts
    as infinite), with the per-seed ``error`` beside it. Failed on half the seeds or more: failed."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["posterior"], r["guide"]), []).append(r)
    merged = []
    for (posterior, guide), runs in groups.items():
        row = {"posterior": posterior, "guide": guide, "seed_errors": [error(r) for r in runs]}
        failed = [r for r in runs if "error" in r]
        if 2 * len(failed) >= len(runs):
            row["error"] = failed[0]["error"] + (
                f" ({len(failed)} of {len(runs)} seeds)" if len(runs) > 1 else ""
            )
        else:
            for key in ("max_std_mean_error", "max_abs_log_sd_ratio", "k_hat", "fit_seconds"):
                row[key] = statistics.median(r.get(key, math.inf) for r in runs)
        merged.append(row)
    return merged


def error(row: dict) -> float:
    """The combined error ``max std. mean error + max |log sd ratio|`` (infinite for a failed fit)."""
    if "error" in row:
        return math.inf
    return row["max_std_mean_error"] + row["max_abs_log_sd_ratio"]


# -- the goal of issue 3 ---------------------------------------------------------------------------
def lower_on_both(row: dict, rival: dict) -> bool:
    """``row`` below ``rival`` on both error metrics (a failed rival is beaten by any finished fit)."""
    if "error" in row:
        return False
    if "error" in rival:
        return True
    return all(row[key] < rival[key] for key in ("max_std_mean_error", "max_abs_log_sd_ratio"))


def usable(row: dict) -> bool:
    """k-hat below 0.7 (Yao et al. 2018: importance sampling from the guide is reliable)."""
    return "error" not in row and row["k_hat"] < KHAT_OK


def summarise(rows: list[dict]) -> dict:
    """Per AutoFlowGuide configuration: mean rank of ``error`` among all guides, the posteriors where it
    beats every Pyro guide (``wins``; ``strict_wins``: lower on both metrics) and where k-hat < 0.7."""
    posteriors = sorted({r["posterior"] for r in rows})
    by = {(r["posterior"], r["guide"]): r for r in rows}
    guides = list(dict.fromkeys(r["guide"] for r in rows))
    pyro_names = [g for g in guides if is_pyro_guide(g)]
    configs = {}
    for g in guides:
        if is_pyro_guide(g):
            continue
        c = {"ranks": [], "wins": [], "strict_wins": [], "k_hat_below_0.7": []}
        for p in (p for p in posteriors if (p, g) in by):
            mine = by[(p, g)]
            c["ranks"].append(1 + sum(error(by[(p, h)]) < error(mine) for h in guides if (p, h) in by))
            rivals = [by[(p, h)] for h in pyro_names if (p, h) in by]
            if rivals and all(error(mine) < error(r) for r in rivals):
                c["wins"].append(p)
            if rivals and all(lower_on_both(mine, r) for r in rivals):
                c["strict_wins"].append(p)
            if usable(mine):
                c["k_hat_below_0.7"].append(p)
        c["mean_rank"] = statistics.mean(c["ranks"]) if c["ranks"] else math.inf
        configs[g] = c
    best = min(configs, key=lambda g: (configs[g]["mean_rank"], -len(configs[g]["wins"])), default=None)
    pyro_khat = {g: [p for p in posteriors if (p, g) in by and usable(by[(p, g)])] for g in pyro_names}
    return {"posteriors": posteriors, "configs": configs, "best": best, "pyro_k_hat_below_0.7": pyro_khat}


def goal_lines(summary: dict) -> list[str]:
    best, n = summary["best"], len(summary["posteriors"])
    if best is None:
        return ["no AutoFlowGuide configuration in this run"]
    c = summary["configs"][best]
    wins, strict, khat = c["wins"], c["strict_wins"], c["k_hat_below_0.7"]
    met = len(wins) >= GOAL_WINS and len(khat) >= GOAL_KHAT
    return [
        f"best configuration (lowest mean rank of error, {c['mean_rank']:.2f}): {best}",
        f"its error is below every Pyro guide's on {len(wins)}/{n}: {', '.join(wins) or '-'}",
        f"lower on both metrics than every Pyro guide on {len(strict)}/{n}: {', '.join(strict) or '-'}",
        f"k-hat < {KHAT_OK} on {len(khat)}/{n}: {', '.join(khat) or '-'}",
        f"goal (>= {GOAL_WINS} wins and >= {GOAL_KHAT} with k-hat < {KHAT_OK}, of 7): "
        + ("met" if met else "NOT met")
        + ("" if n == 7 else f" (only {n} posteriors in this run)"),
    ]


# -- output ----------------------------------------------------------------------------------------
def fmt(value: float, digits: int) -> str:
    return "inf" if math.isinf(value) else f"{value:.{digits}f}"


def result_row(r: dict) -> str:
    head = f"| {r['posterior']} | {r['guide']} |"
    seeds = " | " + ", ".join(fmt(e, 2) for e in r["seed_errors"]) if len(r["seed_errors"]) > 1 else ""
    if "error" in r:
        return f"{head} failed: {r['error']} | | inf{seeds} | | |"
    return (
        f"{head} {r['max_std_mean_error']:.3f} | {r['max_abs_log_sd_ratio']:.3f} | {error(r):.3f}{seeds} | "
        f"{r['k_hat']:.2f} | {r['fit_seconds']:.1f} |"
    )


def markdown(results: list[dict], summary: dict, settings: dict) -> str:
    n = len(summary["posteriors"])
    seeds = settings["seeds"]
    several = len(seeds) > 1
    seed_note = (
        f"seeds {', '.join(map(str, seeds))}: each metric is the median over the seeds, the error per "
        "seed is listed beside it"
        if several
        else f"seed {seeds[0]}"
    )
    lines = [
        "# Guide accuracy on posteriordb posteriors",
        "",
        "Same budget for every guide: {steps} steps of {particles} vectorised particles; ClippedAdam (clip "
        "norm {clip_norm}), lr warmed up linearly over {warmup} steps to {lr}, then decaying exponentially "
        "to {lr_final}; init scale {init_scale} where a guide has one; ".format(**settings)
        + seed_note
        + ". {draws} draws per guide to evaluate; float64, 1 thread, ".format(**settings)
        + f"{settings['minutes']:.0f} minutes in all "
        f"({settings['machine']}). error = max std. mean error + max abs log sd ratio; definitions in the "
        "docstring of `benchmarks/posteriordb.py`.",
        "",
        f"    {settings['command']}",
        "",
        "| posterior | guide | max std. mean error | max abs log sd ratio | error | "
        + ("error per seed | " if several else "")
        + "k-hat | fit s |",
        "|---|---|---|---|---|---|---|" + ("---|" if several else ""),
        *map(result_row, results),
        "",
        "## AutoFlowGuide configurations against the Pyro guides",
        "",
        "wins: posteriors where the configuration's error is below every Pyro guide's; strict: lower on "
        f"both metrics than every Pyro guide. The Pyro guides' k-hat < {KHAT_OK}: "
        + ", ".join(f"{g} {len(ps)}/{n}" for g, ps in summary["pyro_k_hat_below_0.7"].items())
        + ".",
        "",
        f"| configuration | mean rank of error | wins /{n} | strict wins /{n} | k-hat < {KHAT_OK} /{n} |",
        "|---|---|---|---|---|",
    ]
    for g, c in sorted(summary["configs"].items(), key=lambda item: item[1]["mean_rank"]):
        lines.append(
            f"| {g} | {fmt(c['mean_rank'], 2)} | {len(c['wins'])} | {len(c['strict_wins'])} | "
            f"{len(c['k_hat_below_0.7'])} |"
        )
    lines += ["", "## Goal of issue 3", "", *(f"- {line}" for line in goal_lines(summary))]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path(__file__).parents[2] / "shared/data/posteriordb")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--particles", type=int, default=16, help="vectorised particles per ELBO estimate")
    parser.add_argument("--lr", type=float, default=0.05, help="initial learning rate")
    parser.add_argument("--lr-final", type=float, default=0.0001, help="learning rate at the last step")
    parser.add_argument("--warmup", type=int, default=200, help="steps of linear learning-rate warm-up")
    parser.add_argument("--clip-norm", type=float, default=10.0, help="ClippedAdam's gradient norm clip")
    parser.add_argument("--init-scale", type=float, default=0.1, help="initial scale, guides that have one")
    parser.add_argument("--num-flows", type=int, default=4)
    parser.add_argument("--draws", type=int, default=4000, help="guide draws for the moments and k-hat")
    parser.add_argument(
        "--flows",
        nargs="+",
        default=None,
        help="AutoFlowGuide configurations: layer names, or stacks as names joined by '+'; "
        "prefix 'full:' for base_covariance='full', then 'path:' for path_gradient=True "
        "(default: every registered layer)",
    )
    parser.add_argument(
        "--flow-options",
        type=json.loads,
        default={},
        help="layer options as JSON ('{\"hidden_dims\": [8]}'), for each AutoFlowGuide configuration "
        "whose layers take them",
    )
    parser.add_argument("--posteriors", nargs="*", default=None)
    parser.add_argument("--guides", nargs="*", default=None, help="substrings of guide names to run")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"only {', '.join(QUICK_POSTERIORS)}; Pyro's guides, AutoFlowGuide({', '.join(QUICK_FLOWS)})",
    )
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[0], help="seeds: each fit is repeated; metrics are medians"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        sys.exit(f"posteriordb folder not found: {args.data} (pass --data)")
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="Encountered NaN")  # a diverged fit is reported as failed
    families = args.flows or (QUICK_FLOWS if args.quick else flows.available())
    guides = {
        **pyro_guides(args.init_scale),
        **flow_guides(families, args.num_flows, args.init_scale, args.flow_options),
    }
    if args.guides:
        guides = {k: v for k, v in guides.items() if any(s in k for s in args.guides)}
    folders = sorted(p for p in args.data.iterdir() if p.name in posteriordb_models.POSTERIORS)
    wanted = args.posteriors or (QUICK_POSTERIORS if args.quick else None)
    if wanted:
        folders = [p for p in folders if p.name in wanted]
    started = time.perf_counter()
    results = []
    for folder in folders:
        model, data, reference = posteriordb_models.load(folder)
        for guide_name, make_guide in guides.items():
            for seed in args.seeds:
                pyro.clear_param_store()
                pyro.set_rng_seed(seed)
                row = {"posterior": folder.name, "guide": guide_name, "seed": seed}
                try:
                    guide = make_guide(model)
                    row.update(fit(model, guide, data, args))
                    row.update(evaluate(model, guide, data, reference, args.draws))
                except Exception as exc:  # a guide that cannot fit a posterior is a result, not a crash
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                results.append(row)
                print(json.dumps(row), flush=True)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    settings["minutes"] = (time.perf_counter() - started) / 60
    settings["machine"] = f"{platform.machine()}, torch {torch.__version__}, pyro {pyro.__version__}"
    settings["command"] = "python benchmarks/posteriordb.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    merged = over_seeds(results)
    summary = summarise(merged)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "posteriordb.json").write_text(
        json.dumps({"settings": settings, "rows": results, "medians": merged, "summary": summary}, indent=1)
    )
    text = markdown(merged, summary, settings)
    (args.out / "posteriordb.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
