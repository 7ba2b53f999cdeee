"""``minirlhf demo --quick``: every stage runs, improves on SFT, and the same seed gives the same numbers."""
import io
import json
import os

import pytest

from minirlhf.cli import main
from minirlhf.train.demo import POLICY_STAGES, format_table, run_demo, save_plot

POLICY_METRICS = {"accuracy", "greedy_accuracy", "gold_reward", "kl_to_sft"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The quick demo run twice with seed 0: once through the CLI, once through run_demo."""
    root = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--seed", "0", "--out", str(root / "cli"), "--no-progress"]) == 0
    with open(root / "cli" / "results.json") as f:
        from_cli = json.load(f)
    printed = io.StringIO()
    again = run_demo(str(root / "api"), quick=True, seed=0, progress=False, stream=printed)
    return from_cli, again, printed.getvalue(), root


def test_same_seed_gives_identical_results_except_seconds(quick):
    first, second, _, _ = quick
    first, second = dict(first), dict(second)
    first.pop("seconds")
    second.pop("seconds")
    assert first == second


def test_results_report_every_stage_with_its_metrics(quick):
    results = quick[0]
    assert set(results["stages"]) == set(POLICY_STAGES) | {"rm"}
    for name in POLICY_STAGES:
        assert set(results["stages"][name]) == POLICY_METRICS, name
    assert 0 <= results["stages"]["rm"]["pair_accuracy"] <= 1
    assert results["stages"]["sft"]["kl_to_sft"] == 0.0
    assert "exact" in results["kl_estimator"]
    assert results["seconds"] > 0


def test_every_trained_stage_improves_held_out_accuracy_over_sft(quick):
    stages = quick[0]["stages"]
    sft = stages["sft"]["accuracy"]
    for name in ("ppo", "grpo", "dpo", "rloo"):
        assert stages[name]["accuracy"] > sft + 0.02, (name, stages[name]["accuracy"], sft)
        assert stages[name]["kl_to_sft"] > 0, name


def test_reward_model_orders_held_out_pairs_better_than_chance(quick):
    assert quick[0]["stages"]["rm"]["pair_accuracy"] > 0.6


def test_demo_prints_the_table_and_writes_metrics_and_checkpoints(quick):
    _, _, printed, root = quick
    for name in POLICY_STAGES:
        assert f"\n{name} " in "\n" + printed
    for name in ("sft", "rm", "ppo", "grpo", "dpo", "rloo"):
        assert os.path.exists(root / "cli" / name / "metrics.jsonl"), name
        assert os.path.exists(root / "cli" / name / "checkpoint" / "model.safetensors"), name
    assert "plot: " in printed or "pip install matplotlib" in printed


def fake_results(greedy):
    stages = {name: {"accuracy": 0.5, "greedy_accuracy": g, "gold_reward": 0.6, "kl_to_sft": 0.1}
              for name, g in zip(POLICY_STAGES, greedy)}
    stages["rm"] = {"pair_accuracy": 0.9, "train_pairs": 10, "heldout_pairs": 10}
    return {"stages": stages, "seconds": 1.0, "kl_estimator": "exact"}


def test_table_flags_a_stage_whose_greedy_accuracy_falls_below_sfts():
    table = format_table(fake_results([0.5, 0.6, 0.4, 0.5, 0.7]))
    flagged = [line.split()[0] for line in table.splitlines() if "below SFT" in line]
    assert flagged == ["grpo"]


def test_plot_is_saved_or_the_message_says_how_to_get_matplotlib(tmp_path):
    history = {name: [{"step": 1, "reward": 0.1, "objective/kl": 0.0}, {"step": 2, "reward": 0.2, "objective/kl": 0.1}]
               for name in ("ppo", "grpo", "rloo")}
    history["dpo"] = [{"step": 1, "rewards/margins": 0.0}]
    message = save_plot(history, str(tmp_path / "plot.png"))
    try:
        import matplotlib  # noqa: F401
        assert os.path.exists(tmp_path / "plot.png")
    except ImportError:
        assert "pip install matplotlib" in message
