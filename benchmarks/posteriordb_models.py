"""Pyro versions of the seven posteriordb posteriors in ``../shared/data/posteriordb``.

Each entry builds ``(model, data)`` from a posterior folder; ``model(**data)`` conditions on the
observations and records, with ``pyro.deterministic``, every quantity the reference draws hold
(``theta`` for the non-centred eight schools, ``f`` for the GP), so draws from any guide can be
compared with the reference by name. Stan's flat priors are ``ImproperUniform``; ``<lower=0>``
scale parameters with Cauchy/Normal priors are half-distributions.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints


def _tensor(values) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.get_default_dtype())


def eight_schools_noncentered(J, y, sigma):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", J):
        theta_trans = pyro.sample("theta_trans", dist.Normal(0.0, 1.0))
        theta = pyro.deterministic("theta", mu + tau * theta_trans)
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def eight_schools_centered(J, y, sigma):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", J):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def ark(K, T, y):
    alpha = pyro.sample("alpha", dist.Normal(0.0, 10.0))
    beta = pyro.sample("beta", dist.Normal(0.0, 10.0).expand([K]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfCauchy(2.5))
    lags = torch.stack([y[K - k : T - k] for k in range(1, K + 1)], dim=-1)  # y[t-k], t = K..T-1
    with pyro.plate("time", T - K):
        pyro.sample("y", dist.Normal(alpha + (lags * beta).sum(-1), sigma), obs=y[K:])


def gp_pois_regr(N, x, k):
    rho = pyro.sample("rho", dist.Gamma(25.0, 4.0))
    alpha = pyro.sample("alpha", dist.HalfNormal(2.0))
    f_tilde = pyro.sample("f_tilde", dist.Normal(0.0, 1.0).expand([N]).to_event(1))
    sq_dist = (x.unsqueeze(-1) - x.unsqueeze(-2)) ** 2
    cov = alpha[..., None, None] ** 2 * torch.exp(-sq_dist / (2 * rho[..., None, None] ** 2))
    chol = torch.linalg.cholesky(cov + 1e-10 * torch.eye(N))
    f = pyro.deterministic("f", (chol @ f_tilde.unsqueeze(-1)).squeeze(-1), event_dim=1)
    pyro.sample("k", dist.Poisson(f.exp()).to_event(1), obs=k)


def kidscore_interaction(N, kid_score, mom_hs, mom_iq):
    beta = pyro.sample("beta", dist.ImproperUniform(constraints.real, (), (4,)))
    sigma = pyro.sample("sigma", dist.HalfCauchy(2.5))
    mean = beta[..., 0] + beta[..., 1] * mom_hs + beta[..., 2] * mom_iq + beta[..., 3] * mom_hs * mom_iq
    with pyro.plate("obs", N):
        pyro.sample("kid_score", dist.Normal(mean, sigma), obs=kid_score)


def blr(N, D, X, y):
    beta = pyro.sample("beta", dist.Normal(0.0, 10.0).expand([D]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(10.0))
    with pyro.plate("obs", N):
        pyro.sample("y", dist.Normal((X * beta).sum(-1), sigma), obs=y)


def low_dim_gauss_mix(N, y):
    # Stan: ordered[2] mu; mu ~ normal(0, 2): a N(0, 2) density restricted to mu1 < mu2
    mu = pyro.sample("mu", dist.ImproperUniform(constraints.ordered_vector, (), (2,)))
    pyro.factor("mu_prior", dist.Normal(0.0, 2.0).log_prob(mu).sum(-1))
    sigma = pyro.sample("sigma", dist.HalfNormal(2.0).expand([2]).to_event(1))
    theta = pyro.sample("theta", dist.Beta(5.0, 5.0))
    log_mix = torch.stack([theta.log(), torch.log1p(-theta)], dim=-1)
    components = dist.Normal(mu, sigma)
    with pyro.plate("obs", N):
        pyro.sample(
            "y",
            dist.MixtureSameFamily(dist.Categorical(logits=log_mix), components),
            obs=y,
        )


def _eight_schools_data(raw):
    return {"J": raw["J"], "y": _tensor(raw["y"]), "sigma": _tensor(raw["sigma"])}


POSTERIORS: dict[str, tuple[Callable, Callable[[dict], dict]]] = {
    "eight_schools-eight_schools_noncentered": (eight_schools_noncentered, _eight_schools_data),
    "eight_schools-eight_schools_centered": (eight_schools_centered, _eight_schools_data),
    "arK-arK": (ark, lambda r: {"K": r["K"], "T": r["T"], "y": _tensor(r["y"])}),
    "gp_pois_regr-gp_pois_regr": (
        gp_pois_regr,
        lambda r: {"N": r["N"], "x": _tensor(r["x"]), "k": _tensor(r["k"])},
    ),
    "kidiq-kidscore_interaction": (
        kidscore_interaction,
        lambda r: {
            "N": r["N"],
            "kid_score": _tensor(r["kid_score"]),
            "mom_hs": _tensor(r["mom_hs"]),
            "mom_iq": _tensor(r["mom_iq"]),
        },
    ),
    "sblrc-blr": (blr, lambda r: {"N": r["N"], "D": r["D"], "X": _tensor(r["X"]), "y": _tensor(r["y"])}),
    "low_dim_gauss_mix-low_dim_gauss_mix": (low_dim_gauss_mix, lambda r: {"N": r["N"], "y": _tensor(r["y"])}),
}


def load(folder: Path) -> tuple[Callable, dict, dict[str, np.ndarray]]:
    """``(model, data, reference)``: reference maps each parameter (``"theta[1]"``...) to its draws."""
    model, convert = POSTERIORS[folder.name]
    data = convert(json.loads((folder / "data.json").read_text()))
    chains = json.loads((folder / "reference_draws.json").read_text())
    reference = {name: np.concatenate([np.asarray(c[name]) for c in chains]) for name in chains[0]}
    return model, data, reference


def flatten_draws(samples: dict[str, torch.Tensor], names: list[str]) -> dict[str, np.ndarray]:
    """Pick the reference's scalar names (``"beta[2]"`` is element 1 of ``beta``) from Predictive draws."""
    out = {}
    for name in names:
        site, _, index = name.partition("[")
        value = samples[site].detach().cpu().numpy()
        value = value.reshape(value.shape[0], -1)
        out[name] = value[:, int(index[:-1]) - 1] if index else value[:, 0]
    return out
