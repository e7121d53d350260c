"""The arithmetic behind ``benchmarks/amortised_flow_choice.py``: signed errors, worst errors, table."""

import argparse
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import amortised_flow_choice as choice


def test_signed_errors_are_in_reference_sds_and_worst_takes_absolute_values():
    reference = {"a": np.array([0.0, 2.0, 4.0]), "b": np.array([10.0, 10.0, 13.0, 13.0])}
    draws = {"a": np.array([1.0, 3.0, 5.0]), "b": np.array([9.0, 12.0])}
    signed = choice.signed_errors(draws, reference)
    sd_a, sd_b = reference["a"].std(), reference["b"].std()
    assert signed["a"] == pytest.approx([1.0 / sd_a, 0.0])
    assert signed["b"] == pytest.approx([-1.0 / sd_b, 0.0])
    assert choice.worst({"a": [0.2, -0.5], "b": [-0.3, 0.1]}) == (0.3, 0.5)


def test_summary_and_table_report_each_seed_and_the_pooled_guides():
    rng = np.random.default_rng(0)
    reference = {"mu": rng.normal(size=4000), "tau": rng.gamma(2.0, size=4000)}
    runs = [
        {
            "seed": s,
            "train_seconds": 1.0,
            "k_hat": 0.3,
            "raw": {n: v + 0.1 * s for n, v in reference.items()},
            "psis": reference,
        }
        for s in (0, 1)
    ]
    rows = [choice.summarise(run, reference) for run in runs]
    assert rows[0]["raw_max_mean_error"] == pytest.approx(0.0)
    assert rows[1]["raw_max_mean_error"] == pytest.approx(0.1 / reference["mu"].std())
    assert rows[1]["raw_signed"]["tau"][1] == pytest.approx(0.0, abs=1e-12)
    args = argparse.Namespace(
        flow="a+b", num_flows=1, hidden_dims=None, elbo_steps=1, forward_kl_steps=2, num_draws=3
    )
    table = choice.markdown(args, rows, {"max_mean_error": 0.05, "max_sd_error": 0.01})
    assert "| pooled (2 guides) | | 0.050 | 0.010 |" in table
    signed_rows = table.split("| seed | mu | tau |")[1].splitlines()[2:4]
    assert signed_rows[0] == "| 0 | +0.00 / +0.00 | +0.00 / +0.00 |"
    assert signed_rows[1].startswith("| 1 | +0.")
