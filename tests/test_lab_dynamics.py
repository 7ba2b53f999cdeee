"""The lab's training-dynamics experiments at --quick size: each writes its results and figure, and
the findings asserted here are the ones that hold robustly at that size (exact ones for ``kl``)."""
import inspect
import json
import os

import numpy as np
import pytest

from minirlhf.cli import main
from minirlhf.lab import EXPERIMENTS

EXACT = 1e-10


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_every_experiment_takes_what_the_command_passes(experiment):
    inspect.signature(EXPERIMENTS[experiment]).bind(out="x", quick=True, seed=0, progress=False, overwrite=False)


@pytest.fixture(scope="module")
def kl(tmp_path_factory):
    """The kl experiment run as a user runs it, through ``minirlhf lab kl --quick``."""
    out = tmp_path_factory.mktemp("kl")
    assert main(["lab", "kl", "--quick", "--out", str(out), "--overwrite", "--no-progress"]) == 0
    return out, json.load(open(os.path.join(out, "results.json")))


def test_a_finished_run_is_not_overwritten_without_overwrite(kl, capsys):
    out = kl[0]
    assert main(["lab", "kl", "--quick", "--out", str(out), "--no-progress"]) == 2
    assert "is not empty" in capsys.readouterr().err and os.path.exists(os.path.join(out, "results.json"))


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


# ------------------------------------------------------------- experiments that start from an SFT model
@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    from minirlhf.lab.starting_point import starting_point
    out = tmp_path_factory.mktemp("start")
    starting_point(str(out), seed=0, quick=True, progress=False)
    return str(out / "sft")


@pytest.fixture(scope="module")
def mismatch(sft, tmp_path_factory):
    out = tmp_path_factory.mktemp("mismatch")
    return out, EXPERIMENTS["mismatch"](out=str(out), quick=True, seed=0, sft=sft, progress=False)


def test_mismatch_numerics_alone_leave_the_ratio_within_float32_round_off(mismatch):
    gpt = mismatch[1]["gpt"]
    for name in ("float32 trainer, τ=1", "float64 trainer, τ=1", "τ=0.7, applied"):
        assert gpt[name]["max_abs"] < 1e-3, name
        assert gpt[name]["gradient"]["tis"]["cosine_to_plain"] > 0.999


def test_mismatch_forgetting_the_temperature_moves_the_ratio_far_from_one(mismatch):
    forgotten = mismatch[1]["gpt"]["τ=0.7, forgotten"]
    assert forgotten["max_abs"] > 0.1 and forgotten["share_outside_1pct"] > 0.1


def test_mismatch_response_importance_weight_is_exact_and_truncation_trades_bias_for_variance(mismatch):
    exact = mismatch[1]["exact"]
    for kind in ("numerics", "temperature"):
        assert exact[f"{kind}/sequence/inf"]["bias"] < 1e-10
        assert exact[f"{kind}/plain/inf"]["bias"] > 1e-3
        assert exact[f"{kind}/token/inf"]["bias"] > 1e-3  # per-token ratios leave the prefixes uncorrected
    assert exact["temperature/sequence/1.0"]["bias"] > exact["temperature/sequence/inf"]["bias"]
    assert exact["temperature/sequence/1.0"]["variance"] < exact["temperature/sequence/inf"]["variance"]
    if __import__("importlib").util.find_spec("matplotlib"):
        assert os.path.getsize(os.path.join(mismatch[0], "mismatch.png")) > 10_000


@pytest.fixture(scope="module")
def dpo(sft, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo")
    return out, EXPERIMENTS["dpo"](out=str(out), quick=True, seed=0, sft=sft, progress=False)


def test_dpo_pushes_the_rejected_likelihood_down_and_the_margin_up(dpo):
    for name, run in dpo[1]["runs"].items():
        start, end = run["logps_rejected_start_end"]
        assert end < start, name
        assert run["margin_end"] > 0, name
        assert all(np.isfinite(e["kl_to_sft"]) and e["kl_to_sft"] >= 0 for e in run["evaluations"])
    assert dpo[1]["runs"]["sigmoid, β=0.1"]["evaluations"][0]["kl_to_sft"] == 0.0


@pytest.fixture(scope="module")
def entropy(sft, tmp_path_factory):
    out = tmp_path_factory.mktemp("entropy")
    return out, EXPERIMENTS["entropy"](out=str(out), quick=True, seed=0, sft=sft, progress=False)


def test_entropy_runs_record_entropy_reward_clipping_and_the_fit(entropy):
    runs = entropy[1]["runs"]
    assert set(runs) == {"ε_high=0.2, β=0.04", "ε_high=0.28, β=0.04", "ε_high=0.2, β=0", "ε_high=0.28, β=0"}
    for name, run in runs.items():
        assert all(h["entropy"] > 0 for h in run["history"]), name
        assert 0 <= run["high_mean"] + run["low_mean"] <= run["region_mean"] + 1e-6 <= 1 + 1e-6, name  # float32 shares
        assert all(np.isfinite(v) for v in run["fit"].values())
    assert any(run["region_mean"] > 0 for run in runs.values())  # two epochs per rollout: ρ leaves 1


def test_entropy_law_fit_recovers_a_known_law():
    from minirlhf.lab.entropy import fit_entropy_law
    H = np.linspace(0.1, 1.5, 30)
    a, b, r2 = fit_entropy_law(H, -0.3 * np.exp(H) + 1.2)
    assert (a, b, r2) == pytest.approx((0.3, 1.2, 1.0))


@pytest.fixture(scope="module")
def length(tmp_path_factory):
    out = tmp_path_factory.mktemp("length")
    return out, EXPERIMENTS["length"](out=str(out), quick=True, seed=0, progress=False)


def test_length_records_lengths_of_correct_and_wrong_responses_for_every_loss_type(length):
    runs = length[1]["runs"]
    assert set(runs) == {"grpo", "bnpo", "dr_grpo", "dapo"}
    for name, run in runs.items():
        assert len(run["steps"]) == length[1]["settings"]["steps"]
        for s in run["steps"]:
            for key in ("length_correct", "length_wrong"):
                assert s[key] is None or 2 <= s[key] <= length[1]["max_new_tokens"]
