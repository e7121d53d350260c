"""Eight schools, centred: a funnel where a mean-field guide fails and a flow guide does better.

Fits Pyro's AutoNormal and AutoFlowGuide with the same optimiser and number of steps and prints,
side by side, the final ELBO, the Pareto k-hat of the importance ratios (Yao et al. 2018: < 0.5
good, 0.5-0.7 usable, > 0.7 unreliable) and posterior moments of mu, tau and theta[1]. With
``--reference`` pointing at posteriordb's ``eight_schools-eight_schools_centered`` folder, the
gold-standard NUTS moments are printed beside them.

    python examples/eight_schools.py
    python examples/eight_schools.py \
        --reference ../shared/data/posteriordb/eight_schools-eight_schools_centered
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.infer.importance import psis_diagnostic

from pyro_flowguides import AutoFlowGuide
from pyro_flowguides.draws import draw_posterior

# Rubin (1981): estimated coaching effects and their standard errors in eight schools
Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def model(y: torch.Tensor, sigma: torch.Tensor) -> None:
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", y.shape[0]):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def fit(guide, steps: int, lr: float) -> tuple[float, float]:
    optim = pyro.optim.ClippedAdam({"lr": lr, "lrd": 0.1 ** (1 / steps)})
    svi = SVI(model, guide, optim, Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1))
    start = time.perf_counter()
    losses = [svi.step(Y, SIGMA) for _ in range(steps)]
    return -float(np.mean(losses[-200:])), time.perf_counter() - start


def summary(guide) -> dict[str, float]:
    draws = draw_posterior(model, guide, Y, SIGMA, num_samples=4000, plate_nesting=1).samples
    mu, tau, theta1 = draws["mu"].flatten(), draws["tau"].flatten(), draws["theta"][:, 0]
    k_hat = float(psis_diagnostic(model, guide, Y, SIGMA, num_particles=4000, max_plate_nesting=1))
    return {
        "k_hat": k_hat,
        "mu": (mu.mean(), mu.std()),
        "tau": (tau.mean(), tau.std()),
        "theta[1]": (theta1.mean(), theta1.std()),
    }


def reference_moments(folder: Path) -> dict[str, tuple[float, float]]:
    chains = json.loads((folder / "reference_draws.json").read_text())
    draws = {name: np.concatenate([c[name] for c in chains]) for name in ("mu", "tau", "theta[1]")}
    return {name: (v.mean(), v.std()) for name, v in draws.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--flow", default=None, help="layer name for AutoFlowGuide (default: the guide's)")
    parser.add_argument("--num-flows", type=int, default=None)
    parser.add_argument(
        "--reference", type=Path, default=None, help="posteriordb folder with reference_draws.json"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    options = {k: v for k, v in {"flow": args.flow, "num_flows": args.num_flows}.items() if v is not None}
    rows = {}
    for name, make in {
        "AutoNormal": AutoNormal,
        "AutoFlowGuide": lambda m: AutoFlowGuide(m, **options),
    }.items():
        pyro.clear_param_store()
        pyro.set_rng_seed(args.seed)
        guide = make(model)
        elbo, seconds = fit(guide, args.steps, args.lr)
        rows[name] = {"elbo": elbo, "seconds": seconds, **summary(guide)}
        print(f"fitted {name} in {seconds:.1f} s", flush=True)
    reference = reference_moments(args.reference) if args.reference else None

    names = list(rows)
    header = (
        f"{'':18s}" + "".join(f"{n:>22s}" for n in names) + (f"{'NUTS reference':>22s}" if reference else "")
    )
    print("\nEight schools (centred), " + f"{args.steps} steps each\n" + header)
    print(f"{'ELBO':18s}" + "".join(f"{rows[n]['elbo']:22.2f}" for n in names))
    print(f"{'Pareto k-hat':18s}" + "".join(f"{rows[n]['k_hat']:22.2f}" for n in names))
    for site in ("mu", "tau", "theta[1]"):
        line = f"{site + ' mean (sd)':18s}" + "".join(
            f"{float(rows[n][site][0]):14.2f} ({float(rows[n][site][1]):5.2f})" for n in names
        )
        if reference:
            line += f"{reference[site][0]:14.2f} ({reference[site][1]:5.2f})"
        print(line)
    print(
        "\nk-hat < 0.5: importance ratios well behaved; > 0.7: the approximation is unreliable"
        " (Yao et al. 2018)"
    )


if __name__ == "__main__":
    main()
