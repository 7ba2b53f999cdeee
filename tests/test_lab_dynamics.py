"""The lab's training-dynamics experiments at --quick size: each writes its results and figure, and
the findings asserted here are the ones that hold robustly at that size (exact ones for ``kl``)."""
import json
import os

import numpy as np
import pytest

from minirlhf.lab import EXPERIMENTS

EXACT = 1e-10


@pytest.fixture(scope="module")
def kl(tmp_path_factory):
    out = tmp_path_factory.mktemp("kl")
    results = EXPERIMENTS["kl"](out=str(out), quick=True, seed=0)
    return out, results


def test_kl_writes_results_and_figure(kl):
    out, results = kl
    assert json.load(open(os.path.join(out, "results.json")))["experiment"] == "kl"
    pytest.importorskip("matplotlib")
    assert os.path.getsize(os.path.join(out, "kl_estimators.png")) > 10_000


def test_kl_one_token_k1_gives_zero_k2_forward_k3_reverse_gradient_in_the_loss(kl):
    table = kl[1]["one_token"]
    assert table["k1/token/loss"]["norm_max"] < EXACT
    assert table["k2/token/loss"]["forward_max"] < EXACT
    assert table["k3/token/loss"]["reverse_max"] < EXACT
    assert table["k3/token/loss"]["forward_mean"] > 0.05 and table["k2/token/loss"]["reverse_mean"] > 0.05


def test_kl_k1_in_the_reward_gives_the_exact_gradient_per_token_and_per_response(kl):
    for lang in ("one_token", "response"):
        for granularity in ("token", "sequence"):
            assert kl[1][lang][f"k1/{granularity}/reward"]["forward_max"] < EXACT


def test_kl_per_token_sums_lose_the_response_gradient_that_response_ratios_keep(kl):
    table = kl[1]["response"]
    assert table["k2/sequence/loss"]["forward_max"] < EXACT
    assert table["k3/sequence/loss"]["reverse_max"] < EXACT
    assert table["k2/token/loss"]["forward_mean"] > 0.05
    assert table["k3/token/loss"]["reverse_mean"] > 0.05


def test_kl_off_policy_only_the_response_importance_weight_recovers_the_on_policy_gradient(kl):
    table = kl[1]["off_policy"]
    for name, row in table.items():
        if name.endswith("/sequence"):
            assert row["max"] < EXACT, name
        else:
            assert row["mean"] > 0.05, name


def test_kl_k1_and_k3_values_are_unbiased_and_k2_is_not(kl):
    for point in kl[1]["values"][:-1]:  # the largest offset hits the |log r| <= 20 clip of k3
        assert abs(point["k1/sequence"]["bias"]) < EXACT and abs(point["k3/token"]["bias"]) < EXACT
        assert abs(point["k3/sequence"]["bias"]) < EXACT
        assert point["k2/sequence"]["bias"] != pytest.approx(0, abs=1e-6)
