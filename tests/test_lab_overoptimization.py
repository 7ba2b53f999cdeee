"""The over-optimisation lab: the exact best-of-n distribution and its KL, the fits, the command's
errors, and what the --quick run shows (only what it shows robustly; see docs/overoptimization/report.md)."""
import io
import json
import math
import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minirlhf.cli import main
from minirlhf.lab import EXPERIMENTS
from minirlhf.lab.overoptimization import (OveroptimizationConfig, best_of_n_kl_bound, best_of_n_probabilities,
                                           fit_gain, fitted, kl_divergence, run_overoptimization)


# ------------------------------------------------------------------ best-of-n, exact
def simulate_best_of_n(probs, scores, n, draws, rng):
    """Frequencies of the pick of best-of-n by brute force: n draws from probs, the first highest score wins."""
    picks = rng.choice(len(probs), size=(draws, n), p=probs / probs.sum())
    first_best = np.argmax(scores[picks], axis=1)
    return np.bincount(picks[np.arange(draws), first_best], minlength=len(probs)) / draws


@pytest.mark.parametrize("n", [1, 2, 5, 32])
def test_best_of_n_probabilities_match_brute_force_sampling_with_ties(n):
    rng = np.random.default_rng(n)
    probs = rng.dirichlet(np.ones(9) * 0.7)
    scores = np.array([0.0, 1.0, 1.0, 2.0, -1.0, 2.0, 0.5, 1.0, -3.0])  # ties at 1.0 and at the top, 2.0
    exact = best_of_n_probabilities(probs, scores, n)
    draws = 200_000
    empirical = simulate_best_of_n(probs, scores, n, draws, rng)
    sigma = np.sqrt(exact * (1 - exact) / draws) + 1e-9
    assert np.all(np.abs(empirical - exact) < 5 * sigma + 1e-4), (exact, empirical)


def test_best_of_one_is_the_reference_and_best_of_many_is_the_top_level():
    probs = np.array([0.5, 0.2, 0.2, 0.1])
    scores = np.array([0.0, 3.0, 3.0, 1.0])
    np.testing.assert_allclose(best_of_n_probabilities(probs, scores, 1), probs)
    # the two tied best responses share the pick in proportion to π, and take all of it as n grows
    np.testing.assert_allclose(best_of_n_probabilities(probs, scores, 400), [0, 0.5, 0.5, 0], atol=1e-12)


@given(st.lists(st.floats(0.01, 1.0), min_size=1, max_size=12), st.integers(0, 2 ** 31 - 1),
       st.integers(1, 512), st.booleans())
def test_best_of_n_is_a_distribution_and_its_kl_never_exceeds_log_n_minus_n_minus_1_over_n(weights, seed, n, ties):
    rng = np.random.default_rng(seed)
    probs = np.array(weights)
    scores = rng.integers(0, 3, len(probs)).astype(float) if ties else rng.normal(size=len(probs))
    p_bon = best_of_n_probabilities(probs, scores, n)
    assert np.all(p_bon >= 0) and math.isclose(p_bon.sum(), 1.0, rel_tol=1e-9)
    assert kl_divergence(p_bon, probs) <= best_of_n_kl_bound(n) + 1e-9


def test_the_analytic_kl_is_reached_by_a_uniform_support_much_larger_than_n():
    # with K distinct, equally likely responses and K >> n the exact KL tends to log n − (n−1)/n
    K, n = 200_000, 8
    probs, scores = np.ones(K), np.arange(K, dtype=float)
    assert kl_divergence(best_of_n_probabilities(probs, scores, n), probs) == pytest.approx(best_of_n_kl_bound(n),
                                                                                             rel=1e-3)


@pytest.mark.parametrize("n", [0, -1, 2.0, True])
def test_n_below_one_or_not_an_integer_is_refused(n):
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        best_of_n_kl_bound(n)
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        best_of_n_probabilities(np.ones(2), np.zeros(2), n)


# ------------------------------------------------------------------ fits
@pytest.mark.parametrize("form", ["bon", "rl"])
def test_fit_recovers_alpha_and_beta_of_its_form(form):
    d = np.linspace(0, 3, 20)
    truth = {"form": form, "alpha": 0.7, "beta": 0.25}
    fit = fit_gain(d, fitted(truth, d), form)
    assert fit["alpha"] == pytest.approx(0.7) and fit["beta"] == pytest.approx(0.25)
    assert fit["r2"] == pytest.approx(1.0)
    noisy = fit_gain(d, fitted(truth, d) + np.random.default_rng(0).normal(0, 0.05, len(d)), form)
    assert 0 < noisy["r2"] < 1


# ------------------------------------------------------------------ bad arguments
@pytest.mark.parametrize("field, value, match", [
    ("rl_betas", (0.0, -0.1), "rl_betas must be a non-empty list of finite numbers >= 0"),
    ("dpo_betas", (0.1, -1.0), "dpo_betas must be a non-empty list of finite numbers >= 0"),
    ("bon_n", (1, 2, 0), "bon_n must be a non-empty list of integers >= 1"),
    ("proxy_pairs", (400, 100), "proxy_pairs must be at least two increasing pair counts"),
])
def test_bad_settings_are_named(field, value, match):
    with pytest.raises(ValueError, match=match):
        OveroptimizationConfig(**{field: value})


def test_unknown_experiment_is_a_clear_error(tmp_path, capsys):
    assert main(["lab", "no-such-experiment", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "unknown experiment 'no-such-experiment'" in err and "overoptimization" in err


def test_the_command_dispatches_through_the_registry():
    assert EXPERIMENTS["overoptimization"] is run_overoptimization


# ------------------------------------------------------------------ the --quick run
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("lab") / "overoptimization")
    results = run_overoptimization(out, quick=True, seed=0, progress=False, stream=io.StringIO())
    return out, results


def test_quick_run_writes_results_report_and_figures(quick_run):
    out, results = quick_run
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f) == json.loads(json.dumps(results))
    report = open(os.path.join(out, "report.md")).read()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib" in report and not os.path.exists(os.path.join(out, "overoptimization.png"))
        return
    for figure in ("overoptimization.png", "frontier.png"):
        assert os.path.getsize(os.path.join(out, figure)) > 10_000 and f"]({figure})" in report
    assert all(r["points"][0] == {"step": 0, **r["points"][0]} and r["points"][0]["kl"] == 0.0 for r in results["rl"])
    assert {r["method"] for r in results["rl"]} == {"ppo", "grpo", "rloo", "dpo"}
    assert len({r["beta"] for r in results["rl"] if r["method"] == "ppo"}) >= 4


def test_measured_best_of_n_kl_never_exceeds_the_analytic_value(quick_run):
    _, results = quick_run
    for curve in results["bon"] + [results["bon_rule"]]:
        for b in curve:
            assert b["kl"] <= b["kl_analytic"] + 1e-12, b


def test_the_proxy_score_of_best_of_n_rises_with_n_and_kl(quick_run):
    _, results = quick_run
    for curve in results["bon"]:
        kl, proxy = [b["kl"] for b in curve], [b["proxy"] for b in curve]
        assert all(a <= b + 1e-12 for a, b in zip(kl, kl[1:]))
        assert all(a <= b + 1e-9 for a, b in zip(proxy, proxy[1:]))
        assert proxy[-1] > proxy[0] + 0.1


def test_the_gold_score_of_the_weakest_proxy_peaks_then_falls(quick_run):
    _, results = quick_run
    gold = [b["gold"] for b in results["bon"][0]]
    peak = int(np.argmax(gold))
    assert peak < len(gold) - 1 and gold[peak] - gold[-1] > 0.005, gold


def test_a_better_proxy_reaches_a_higher_gold_peak(quick_run):
    _, results = quick_run
    peaks = [max(p["gold_peak"].values()) for p in results["proxies"]]
    assert peaks[-1] > peaks[0], peaks


def test_frontier_shares_count_the_points_below_best_of_n():
    from minirlhf.lab.overoptimization import frontier_shares
    bon = [{"kl": 0.0, "rule": 0.5}, {"kl": 1.0, "rule": 0.7}]  # best-of-n gains 0.2 per nat here
    points = [{"kl": 0.0, "rule": 0.4}, {"kl": 0.5, "rule": 0.45}, {"kl": 0.5, "rule": 0.55}, {"kl": 2.0, "rule": 0.9}]
    results = {"proxies": [{}, {}], "bon": [bon, bon],
               "rl": [{"method": "ppo", "proxy": 1, "points": points},
                      {"method": "grpo", "proxy": 0, "points": points}]}  # not the best proxy: not counted
    # gains 0.05 (below 0.1) and 0.15 (above); KL 2.0 is beyond best-of-n's range
    assert frontier_shares(results) == "ppo 1/2, grpo 0/0, rloo 0/0, dpo 0/0"
