"""Did the variational fit work? Importance-sampling diagnostics for any Pyro guide.

With draws ``z_s ~ q`` and log-ratios ``r_s = log p(x, z_s) - log q(z_s)``:

- ELBO ``= mean_s r_s``; the importance-weighted bound ``log (1/S) Σ_s exp(r_s)`` estimates
  ``log p(x)`` (Burda et al. 2016), with a delta-method standard error.
- Pareto k-hat of the ratios (Yao et al. 2018, "Yes, but did it work?"): < 0.5 good, 0.5-0.7
  usable, > 0.7 the approximation is unreliable. PSIS (Vehtari et al. 2024) smooths the weights;
  resampling the draws with them corrects the posterior.
- LOO cross-validation from an approximate posterior (Magnusson et al. 2019): PSIS-LOO with the
  log-ratios ``r_s - log p(x_i | z_s)`` per observation.
- The log evidence per item of a plate, for models whose latents are all local to it (a VAE).

k-hat and smoothing use ArviZ's ``psislw`` (0.x takes log-ratios; 1.x smooths its negated argument).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from pyro.distributions.util import scale_and_mask
from scipy.special import logsumexp
from torch import Tensor

from .arviz_export import arviz_major, guide_name
from .draws import PARTICLE_PLATE, PosteriorDraws, draw_posterior, fix_subsamples, max_plate_nesting

#: Yao et al. (2018): k-hat below ``GOOD_KHAT`` is good, up to ``USABLE_KHAT`` usable, above it unreliable
GOOD_KHAT, USABLE_KHAT = 0.5, 0.7


def khat_reading(k_hat: float) -> str:
    """Yao et al.'s reading of a Pareto k-hat: < 0.5 good, 0.5-0.7 usable, > 0.7 unreliable.

    >>> [khat_reading(k) for k in (0.2, 0.5, 0.7, 0.9)]
    ['good', 'usable', 'usable', 'unreliable']
    """
    return "good" if k_hat < GOOD_KHAT else "usable" if k_hat <= USABLE_KHAT else "unreliable"


def psis(log_ratios: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pareto-smoothed importance sampling along the last axis: ``(log weights, k-hat)``.

    The smoothed log weights are normalised (``logsumexp = 0`` along the last axis); equal
    log-ratios (``q ∝ p``) give uniform weights and ``k = -inf``. ArviZ 0.x's
    ``psislw`` takes the log-ratios; ArviZ 1.x's (``arviz_stats``) smooths its negated argument.

    >>> log_w, k = psis(np.random.default_rng(0).normal(size=(2, 1000)) * [[0.1], [3.0]])
    >>> bool(np.allclose(np.exp(log_w).sum(-1), 1)), [khat_reading(value) for value in k]
    (True, ['good', 'unreliable'])
    """
    log_ratios = np.asarray(log_ratios, dtype=np.float64)
    if arviz_major() >= 1:
        from arviz_stats.base import array_stats

        log_weights, k_hat = array_stats.psislw(-log_ratios, r_eff=1.0, axis=-1)
    else:
        import arviz as az

        log_weights, k_hat = az.psislw(log_ratios, reff=1.0)
    # equal ratios (q ∝ p) leave no tail to fit: uniform weights, bounded, so k-hat = -inf
    equal = np.ptp(log_ratios, axis=-1) == 0
    log_weights = np.where(equal[..., None], 0.0, log_weights)
    log_weights = log_weights - logsumexp(log_weights, axis=-1, keepdims=True)
    return log_weights, np.where(equal, -np.inf, k_hat)


def log_mean_exp(log_sum: Tensor, log_sum_sq: Tensor, num_samples: int) -> tuple[Tensor, Tensor]:
    """``log mean_s w_s`` and its delta-method standard error ``sd(w) / (sqrt(S) mean(w))``, from
    ``log_sum = logsumexp_s log w_s`` and ``log_sum_sq = logsumexp_s 2 log w_s``.

    >>> log_w = torch.tensor([0.0, 0.0, 0.0])
    >>> log_mean_exp(log_w.logsumexp(0), (2 * log_w).logsumexp(0), 3)
    (tensor(0.), tensor(0.))
    """
    estimate = log_sum - math.log(num_samples)
    # var(w) / mean(w)^2 = S/(S-1) (mean(w^2) / mean(w)^2 - 1)
    second_moment_ratio = torch.exp(log_sum_sq - 2 * log_sum + math.log(num_samples))
    relative_var = (second_moment_ratio - 1).clamp(min=0) * num_samples / max(num_samples - 1, 1)
    return estimate, (relative_var / num_samples).sqrt()


@dataclass(frozen=True)
class Diagnosis:
    """What :func:`diagnose` found; ``print`` it for a summary.

    ``resampled`` holds PSIS-resampled draws (site -> ``(num_resampled, ...)``): draws from ``q``
    resampled with the smoothed importance weights, a corrected posterior when k-hat is small.
    """

    guide: str
    num_samples: int
    elbo: float
    elbo_se: float
    log_evidence: float
    log_evidence_se: float
    k_hat: float
    ess: float
    resampled: dict[str, Tensor] = field(repr=False)
    log_weights: Tensor = field(repr=False)

    @property
    def reading(self) -> str:
        """Yao et al.'s reading of ``k_hat``: ``"good"``, ``"usable"`` or ``"unreliable"``."""
        return khat_reading(self.k_hat)

    def __str__(self) -> str:
        caveat = (
            "  (k-hat > 0.7: the evidence estimate and its standard error are not to be trusted)\n"
            if self.reading == "unreliable"
            else ""
        )
        return (
            f"Diagnosis of {self.guide} from {self.num_samples} draws\n"
            f"  ELBO                    {self.elbo:12.4f} ± {self.elbo_se:.4f}\n"
            f"  log evidence (IW bound) {self.log_evidence:12.4f} ± {self.log_evidence_se:.4f}\n"
            f"{caveat}"
            f"  Pareto k-hat            {self.k_hat:12.3f}   {self.reading} "
            f"(< 0.5 good, 0.5-0.7 usable, > 0.7 unreliable; Yao et al. 2018)\n"
            f"  importance-sampling ESS {self.ess:12.1f}   of {self.num_samples}"
        )


@torch.no_grad()
def diagnose(
    guide: Callable,
    model: Callable,
    *args,
    num_samples: int = 4000,
    num_resampled: int | None = None,
    **kwargs,
) -> Diagnosis:
    """ELBO, log evidence, Pareto k-hat, ESS and PSIS-resampled draws of ``guide`` for ``model``.

    ``num_resampled`` (default ``num_samples``) draws are resampled with replacement with the
    PSIS-smoothed weights; the ESS is ``1 / Σ_s w̃_s²`` of the normalised smoothed weights.

    >>> import pyro, pyro.distributions as dist
    >>> def model():
    ...     pyro.sample("z", dist.Normal(0.0, 1.0))
    >>> def exact(): # the posterior itself: every weight is 1
    ...     pyro.sample("z", dist.Normal(0.0, 1.0))
    >>> report = diagnose(exact, model, num_samples=500)
    >>> round(report.log_evidence, 6), report.reading, round(report.ess)
    (0.0, 'good', 500)
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 10:
        raise ValueError(f"num_samples must be an integer >= 10 (PSIS fits a tail), got {num_samples!r}")
    draws = draw_posterior(model, guide, *args, num_samples=num_samples, **kwargs)
    log_w = draws.log_weights.double()
    if not torch.isfinite(log_w).all():
        raise ValueError(
            f"{int((~torch.isfinite(log_w)).sum())} of {num_samples} log-weights log p(x, z) - log q(z) are "
            f"not finite: the guide puts mass where the model has none (check supports and constraints)"
        )
    log_evidence, log_evidence_se = log_mean_exp(log_w.logsumexp(0), (2 * log_w).logsumexp(0), num_samples)
    smoothed, k_hat = psis(log_w.cpu().numpy())
    weights = torch.as_tensor(np.exp(smoothed))
    picks = torch.multinomial(weights, num_resampled or num_samples, replacement=True)
    return Diagnosis(
        guide=guide_name(guide),
        num_samples=num_samples,
        elbo=float(log_w.mean()),
        elbo_se=float(log_w.std() / math.sqrt(num_samples)),
        log_evidence=float(log_evidence),
        log_evidence_se=float(log_evidence_se),
        k_hat=float(k_hat),
        ess=float(1 / (weights**2).sum()),
        resampled={name: value[picks.to(value.device)] for name, value in draws.samples.items()},
        log_weights=draws.log_weights,
    )


@dataclass(frozen=True)
class LooResult:
    """PSIS-LOO from approximate-posterior draws: ``elpd`` (± ``se``), ``p_loo``, and per observation
    ``elpd_i`` and ``pareto_k``. ``good_k = min(1 - 1/log10(S), 0.7)`` as in ArviZ."""

    elpd: float
    se: float
    p_loo: float
    elpd_i: np.ndarray = field(repr=False)
    pareto_k: np.ndarray = field(repr=False)
    n_samples: int
    good_k: float

    @property
    def warning(self) -> bool:
        """Whether some observation's k-hat exceeds ``good_k`` (its LOO estimate is unreliable)."""
        return bool((self.pareto_k > self.good_k).any())

    def __str__(self) -> str:
        bad = int((self.pareto_k > self.good_k).sum())
        return (
            f"PSIS-LOO (approximate-posterior correction) from {self.n_samples} draws and "
            f"{self.elpd_i.size} observations\n"
            f"  elpd_loo {self.elpd:10.2f} ± {self.se:.2f}\n"
            f"  p_loo    {self.p_loo:10.2f}\n"
            f"  pareto k > {self.good_k:.2f}: {bad} of {self.pareto_k.size} observations"
        )


def loo(data, var_name: str | None = None) -> LooResult:
    """PSIS-LOO corrected for an approximate posterior (Magnusson et al. 2019), from the output of
    :func:`pyro_flowguides.arviz_export.to_inference_data`.

    With ``r_s = log p(x, z_s) - log q(z_s)`` (``sample_stats.log_weight``) and pointwise
    ``ll[s, i]``, the weights ``log w[s, i] = r_s - ll[s, i]`` are Pareto-smoothed per ``i`` and
    ``elpd_i = logsumexp_s(log w̃[s, i] + ll[s, i]) - logsumexp_s log w̃[s, i]``. With exact
    posterior draws (``r_s`` constant) this is ArviZ's ``loo``. ``p_loo = Σ_i lppd_i - elpd_i``,
    ``lppd_i`` self-normalised with the smoothed weights of ``r``.
    """
    log_lik = _log_likelihood(data, var_name)
    log_ratio = np.asarray(data["sample_stats"]["log_weight"].transpose("chain", "draw").values).reshape(-1)
    ll = log_lik.transpose("chain", "draw", ...).values.reshape(log_ratio.size, -1).T  # (n, S)
    loo_log_w, pareto_k = psis(log_ratio - ll)
    elpd_i = logsumexp(loo_log_w + ll, axis=1) - logsumexp(loo_log_w, axis=1)
    posterior_log_w, _ = psis(log_ratio)
    lppd_i = logsumexp(posterior_log_w + ll, axis=1)
    n, num_samples = ll.shape
    return LooResult(
        elpd=float(elpd_i.sum()),
        se=float(math.sqrt(n * np.var(elpd_i))),
        p_loo=float((lppd_i - elpd_i).sum()),
        elpd_i=elpd_i,
        pareto_k=np.atleast_1d(pareto_k),
        n_samples=num_samples,
        good_k=min(1 - 1 / math.log10(num_samples), 0.7),
    )


def _log_likelihood(data, var_name: str | None):
    groups = list(data.groups()) if callable(getattr(data, "groups", None)) else list(data.children)
    groups = [group.strip("/") for group in groups]
    missing = [group for group in ("log_likelihood", "sample_stats") if group not in groups]
    if missing:
        raise ValueError(
            f"loo needs the groups {missing} (found {groups}); build the data with "
            f"pyro_flowguides.arviz_export.to_inference_data(guide, model, *args)"
        )
    names = list(data["log_likelihood"].data_vars)
    if var_name is None and len(names) != 1:
        raise ValueError(f"the model has several observed sites {names}: pick one with var_name=")
    if var_name is not None and var_name not in names:
        raise ValueError(f"no observed site {var_name!r} in log_likelihood; observed sites: {names}")
    return data["log_likelihood"][var_name or names[0]]


@torch.no_grad()
def log_evidence_per_item(
    model: Callable,
    guide: Callable,
    *args,
    plate: str,
    num_samples: int = 5000,
    chunk_size: int = 500,
    **kwargs,
) -> tuple[Tensor, Tensor]:
    """Per item ``i`` of ``plate``, the estimate and its delta-method standard error of

        log p(x_i) ≈ logsumexp_s [log p(x_i, z_i,s) - log q(z_i,s | x_i)] - log S.

    For models whose latents are all local to ``plate`` (a VAE; the test-set NLL of Burda et al.
    2016 is ``-estimate``). Every site's log-prob is summed over all dims but the particle and
    plate dims; the ``num_samples`` draws come in chunks of ``chunk_size`` (other plates' subsamples
    fixed across chunks) to bound memory. A subsampled ``plate`` is refused: the estimates would
    belong to items the caller does not know.
    """
    if chunk_size < 1 or num_samples < 2:
        raise ValueError(f"need num_samples >= 2 and chunk_size >= 1, got {num_samples}, {chunk_size}")
    model, guide, _ = fix_subsamples(model, guide, *args, **kwargs)
    nesting = max_plate_nesting(model, guide, *args, **kwargs)
    log_sum = log_sum_sq = None
    for start in range(0, num_samples, chunk_size):
        size = min(chunk_size, num_samples - start)
        draws = draw_posterior(model, guide, *args, num_samples=size, plate_nesting=nesting, **kwargs)
        log_w = _log_weights_per_item(draws, plate)
        chunk_sum, chunk_sum_sq = log_w.logsumexp(0), (2 * log_w).logsumexp(0)
        log_sum = chunk_sum if log_sum is None else torch.logaddexp(log_sum, chunk_sum)
        log_sum_sq = chunk_sum_sq if log_sum_sq is None else torch.logaddexp(log_sum_sq, chunk_sum_sq)
    return log_mean_exp(log_sum, log_sum_sq, num_samples)


def _log_weights_per_item(draws: PosteriorDraws, plate: str) -> Tensor:
    """``log p(x_i, z_i,s) - log q(z_i,s | x_i)``, shape ``(S, items)``; unscaled (no subsample scale)."""
    num_samples, nesting = draws.log_weights.shape[0], draws.plate_nesting
    total = 0.0
    for role, trace, sign in (("model", draws.model_trace, 1), ("guide", draws.guide_trace, -1)):
        for name, site in trace.nodes.items():
            if site["type"] != "sample":
                continue
            frame = next((f for f in site["cond_indep_stack"] if f.name == plate and f.vectorized), None)
            if frame is None:
                plates = sorted(
                    {f.name for s in trace.nodes.values() for f in s.get("cond_indep_stack", ())}
                    - {PARTICLE_PLATE}
                )
                raise ValueError(
                    f"log_evidence_per_item: {role} site {name!r} is outside plate {plate!r} "
                    f"(plates: {plates}); the evidence per item needs every latent and observation "
                    f"local to the plate. With global latents the items are coupled: estimate the "
                    f"joint log evidence with diagnose() instead."
                )
            if frame.full_size is not None and frame.full_size != frame.size:
                raise ValueError(
                    f"log_evidence_per_item: plate {plate!r} is subsampled ({frame.size} of "
                    f"{frame.full_size}); run the model on the items to evaluate with the whole plate "
                    f"(subsample_size=None), so the estimates belong to known items"
                )
            log_prob = scale_and_mask(site["unscaled_log_prob"], mask=site["mask"])
            log_prob = log_prob.reshape((1,) * (nesting + 1 - log_prob.dim()) + tuple(log_prob.shape))
            moved = log_prob.movedim(frame.dim, 1)
            per_item = moved.reshape(*moved.shape[:2], -1).sum(-1)
            total = total + sign * per_item.expand(num_samples, frame.size)
    return total
