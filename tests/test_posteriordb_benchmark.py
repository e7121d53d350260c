"""The arithmetic behind ``benchmarks/posteriordb.py``'s verdict: medians over seeds, wins, k-hat."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import posteriordb


def run(posterior, guide, seed, mean, log_sd, k_hat):
    return {
        "posterior": posterior,
        "guide": guide,
        "seed": seed,
        "max_std_mean_error": mean,
        "max_abs_log_sd_ratio": log_sd,
        "k_hat": k_hat,
        "fit_seconds": 1.0,
    }


def failed(posterior, guide, seed):
    return {"posterior": posterior, "guide": guide, "seed": seed, "error": "ValueError: diverged"}


def test_over_seeds_takes_medians_and_fails_a_guide_that_fails_on_half_the_seeds():
    rows = [
        run("p", "AutoNormal", 0, 0.1, 0.5, 0.9),
        run("p", "AutoNormal", 1, 0.3, 0.1, 0.5),
        run("p", "AutoNormal", 2, 0.2, 0.3, 0.6),
        run("p", "AutoFlowGuide(a)", 0, 0.05, 0.05, 0.4),
        failed("p", "AutoFlowGuide(a)", 1),
        run("p", "AutoFlowGuide(a)", 2, 0.07, 0.01, 0.3),
        failed("p", "AutoFlowGuide(b)", 0),
        failed("p", "AutoFlowGuide(b)", 1),
        run("p", "AutoFlowGuide(b)", 2, 0.0, 0.0, 0.0),
    ]
    normal, a, b = posteriordb.over_seeds(rows)
    assert (normal["max_std_mean_error"], normal["max_abs_log_sd_ratio"], normal["k_hat"]) == (0.2, 0.3, 0.6)
    assert posteriordb.error(normal) == 0.5
    assert [round(e, 9) for e in normal["seed_errors"]] == [0.6, 0.4, 0.5]
    # one failed seed of three counts as infinite, and the median is the worse finished run
    assert (a["max_std_mean_error"], a["k_hat"]) == (0.07, 0.4) and math.isinf(a["seed_errors"][1])
    assert b["error"] == "ValueError: diverged (2 of 3 seeds)" and math.isinf(posteriordb.error(b))


def test_a_win_needs_a_lower_error_than_every_pyro_guide():
    rows = [
        run("p", "AutoNormal", 0, 0.5, 0.5, 0.9),
        run("p", "AutoMultivariateNormal", 0, 0.1, 0.1, 0.3),
        run("p", "AutoFlowGuide(a)", 0, 0.1, 0.05, 0.6),
        run("q", "AutoNormal", 0, 0.5, 0.5, 0.9),
        run("q", "AutoMultivariateNormal", 0, 0.1, 0.1, 0.3),
        run("q", "AutoFlowGuide(a)", 0, 0.05, 0.2, 0.8),
    ]
    summary = posteriordb.summarise(posteriordb.over_seeds(rows))
    config = summary["configs"]["AutoFlowGuide(a)"]
    assert config["wins"] == ["p"] and config["strict_wins"] == []  # p: 0.15 < 0.2, mean error tied
    assert config["k_hat_below_0.7"] == ["p"]
    assert config["ranks"] == [1, 2] and summary["best"] == "AutoFlowGuide(a)"
    assert summary["pyro_k_hat_below_0.7"] == {"AutoNormal": [], "AutoMultivariateNormal": ["p", "q"]}


def test_flow_configurations_are_named_by_their_layers_base_and_options():
    guides = posteriordb.flow_guides(
        ["planar", "full:lu_linear+iaf"], num_flows=3, init_scale=0.1, flow_options={"hidden_dims": [8]}
    )
    assert sorted(guides) == [
        "AutoFlowGuide(lu_linear+iaf, full-rank base, hidden_dims=[8])",
        "AutoFlowGuide(planar x3)",  # planar takes no hidden_dims: it is not given them
    ]
    stack = guides["AutoFlowGuide(lu_linear+iaf, full-rank base, hidden_dims=[8])"].keywords
    assert stack["flow"] == ["lu_linear", "iaf"] and stack["base_covariance"] == "full"
    assert stack["hidden_dims"] == [8] and stack["num_flows"] == 1
    assert "hidden_dims" not in guides["AutoFlowGuide(planar x3)"].keywords
    with pytest.raises(ValueError, match="--flow-options colour: no configuration's layers take it"):
        posteriordb.flow_guides(["planar"], num_flows=3, init_scale=0.1, flow_options={"colour": 1})


def test_flow_configurations_with_path_gradients():
    guides = posteriordb.flow_guides(["full:path:iaf", "path:planar"], num_flows=2, init_scale=0.1)
    assert sorted(guides) == [
        "AutoFlowGuide(iaf x2, full-rank base, path gradient)",
        "AutoFlowGuide(planar x2, path gradient)",
    ]
    full = guides["AutoFlowGuide(iaf x2, full-rank base, path gradient)"].keywords
    assert full["path_gradient"] is True and full["base_covariance"] == "full" and full["flow"] == "iaf"
    assert "base_covariance" not in guides["AutoFlowGuide(planar x2, path gradient)"].keywords
