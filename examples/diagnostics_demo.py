"""Did the fit work? Diagnostics for a mean-field guide and a flow guide, side by side.

Part 1 (no data needed): a conjugate Gaussian model whose posterior is correlated,
x_i ~ N(A z, I), z ~ N(0, I_2). Fits AutoDiagonalNormal (mean-field) and AutoFlowGuide, prints
``diagnose`` for each (ELBO, log evidence, Pareto k-hat with Yao et al.'s reading, ESS) beside the
analytic log evidence, LOO with the approximate-posterior correction beside ArviZ's LOO on exact
posterior draws, and saves the ELBO traces, a k-hat summary, each guide's density against the
posterior, and a pair plot to ``--out``.

Part 2 (with ``--posteriordb``, the folder holding ``kidiq-kidscore_interaction``): the kidiq
regression, whose coefficients have posterior correlation about -0.99, with AutoNormal and
AutoFlowGuide; k-hat tells which fit to distrust.

    python examples/diagnostics_demo.py --out diagnostics_figures
    python examples/diagnostics_demo.py --posteriordb ../shared/data/posteriordb --steps 2000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import arviz as az
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal

from pyro_flowguides import AutoFlowGuide, init_to_median_or_feasible
from pyro_flowguides.arviz_export import to_inference_data
from pyro_flowguides.diagnostics import diagnose, loo
from pyro_flowguides.plots import plot_density_2d, plot_elbo_trace, plot_khat_summary, plot_pair

A = torch.tensor([[1.0, 1.0], [0.5, 0.6]], dtype=torch.float64)


def conjugate_model(x: torch.Tensor) -> None:
    z = pyro.sample("z", dist.Normal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1))
    with pyro.plate("obs", x.shape[0]):
        pyro.sample("x", dist.Normal(z @ A.T, 1.0).to_event(1), obs=x)


def conjugate_posterior(x: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    """``(log evidence, posterior mean, posterior covariance)``."""
    n = x.shape[0]
    cov_x = torch.ones(n, n, dtype=x.dtype).kron(A @ A.T) + torch.eye(2 * n, dtype=x.dtype)
    log_evidence = dist.MultivariateNormal(torch.zeros(2 * n, dtype=x.dtype), cov_x).log_prob(x.reshape(-1))
    cov = torch.linalg.inv(torch.eye(2, dtype=x.dtype) + n * A.T @ A)
    return float(log_evidence), cov @ A.T @ x.sum(0), cov


def fit(model, guide, steps: int, lr: float, **data) -> list[float]:
    optim = pyro.optim.ClippedAdam({"lr": lr, "lrd": 0.05 ** (1 / steps)})
    elbo = Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(model, guide, optim, elbo)
    return [svi.step(**data) for _ in range(steps)]


def conjugate_part(out: Path, steps: int) -> None:
    x = torch.randn(20, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 1.0
    log_evidence, mean, cov = conjugate_posterior(x)

    def exact_guide(x):
        pyro.sample("z", dist.MultivariateNormal(mean, cov))

    exact_loo = az.loo(to_inference_data(exact_guide, conjugate_model, x, num_samples=4000))
    print(f"Conjugate Gaussian, posterior correlation {float(cov[0, 1] / cov.diagonal().prod().sqrt()):.2f}")
    print(f"analytic log evidence {log_evidence:.4f}; ArviZ's LOO on exact draws {exact_loo.elpd_loo:.2f}\n")
    reports, loos = {}, {}
    for label, make in {"mean-field": AutoDiagonalNormal, "flow": AutoFlowGuide}.items():
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = make(conjugate_model)
        losses = fit(conjugate_model, guide, steps, 0.05, x=x)
        reports[label] = report = diagnose(guide, conjugate_model, x)
        data = to_inference_data(guide, conjugate_model, x, num_samples=4000)
        print(report)
        print(f"  error of the log evidence estimate: {report.log_evidence - log_evidence:+.4f}")
        loos[label] = loo(data)
        print(loos[label], "\n")
        plot_elbo_trace(losses, out / f"elbo_{label}.png", log_evidence=log_evidence)
        plot_density_2d(conjugate_model, guide, x, path=out / f"density_{label}.png")
        plot_pair(data, var_names=["z"], path=out / f"pair_{label}.png", kind="kde")
    plot_khat_summary(reports, loos["flow"], out / "khat.png")
    print(f"figures saved in {out}/")


def kidiq_part(folder: Path, steps: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import posteriordb_models

    torch.set_default_dtype(torch.float64)
    model, data, _ = posteriordb_models.load(folder / "kidiq-kidscore_interaction")
    print(f"\nkidiq (kid_score ~ mom_hs * mom_iq), {steps} steps each")
    guides = {
        "AutoNormal": lambda m: AutoNormal(m, init_loc_fn=init_to_median_or_feasible),  # flat priors
        "AutoFlowGuide": AutoFlowGuide,
    }
    for label, make in guides.items():
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = make(model)
        fit(model, guide, steps, 0.01, **data)
        report = diagnose(guide, model, **data)
        print(f"{label:14s} ELBO {report.elbo:10.2f}  k-hat {report.k_hat:5.2f} ({report.reading})")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("diagnostics_figures"))
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--posteriordb", type=Path, default=None, help="folder of posteriordb posteriors")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    conjugate_part(args.out, args.steps)
    if args.posteriordb is not None:
        kidiq_part(args.posteriordb, args.steps)


if __name__ == "__main__":
    main()
