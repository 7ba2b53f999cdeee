"""The ``minirlhf`` command: each stage runs from flags or a JSON config, resumes, and names bad settings."""
import json
import os

import pytest

from minirlhf.cli import main


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cli") / "sft")
    assert main(["sft", "--quick", "--out", out, "--steps", "30", "--no-progress"]) == 0
    return out


def test_sft_writes_model_tokenizer_metrics_and_heldout_eval(sft_dir):
    for name in ("model/config.json", "model/model.safetensors", "tokenizer/vocab.json", "run.json", "eval.json",
                 "checkpoint/trainer_state.json"):
        assert os.path.exists(os.path.join(sft_dir, name)), name
    assert [r["step"] for r in read_jsonl(os.path.join(sft_dir, "metrics.jsonl"))] == list(range(1, 31))
    with open(os.path.join(sft_dir, "eval.json")) as f:
        metrics = json.load(f)
    assert set(metrics) == {"accuracy", "greedy_accuracy", "gold_reward", "kl_to_sft"}
    assert metrics["kl_to_sft"] == 0.0


@pytest.mark.parametrize("stage", ["grpo", "rloo", "dpo"])
def test_policy_stages_run_from_flags_and_report_kl_to_sft(sft_dir, tmp_path, stage):
    out = str(tmp_path / stage)
    flags = ["--steps", "2", "--no-progress"]
    flags += ["--batch-size", "8"] if stage == "dpo" else ["--prompts-per-step", "2", "--group-size", "4"]
    assert main([stage, "--sft", sft_dir, "--out", out, *flags]) == 0
    with open(os.path.join(out, "eval.json")) as f:
        metrics = json.load(f)
    assert metrics["kl_to_sft"] >= 0 and 0 <= metrics["accuracy"] <= 1
    assert os.path.exists(os.path.join(out, "model", "model.safetensors"))


def test_rm_then_ppo(sft_dir, tmp_path):
    rm, ppo = str(tmp_path / "rm"), str(tmp_path / "ppo")
    assert main(["rm", "--sft", sft_dir, "--out", rm, "--steps", "3", "--batch-size", "8", "--no-progress"]) == 0
    with open(os.path.join(rm, "eval.json")) as f:
        assert 0 <= json.load(f)["pair_accuracy"] <= 1
    assert main(["ppo", "--sft", sft_dir, "--rm", rm, "--out", ppo, "--steps", "2", "--prompts-per-step", "8",
                 "--epochs", "1", "--adaptive-kl", "true", "--no-progress"]) == 0
    assert len(read_jsonl(os.path.join(ppo, "metrics.jsonl"))) == 2


def test_a_stage_resumes_from_its_checkpoint_without_redoing_steps(sft_dir, tmp_path):
    out = str(tmp_path / "grpo")
    base = ["grpo", "--sft", sft_dir, "--out", out, "--prompts-per-step", "2", "--group-size", "2",
            "--checkpoint-every", "1", "--no-progress"]
    assert main(base + ["--steps", "2"]) == 0
    assert main(base + ["--steps", "4", "--resume"]) == 0
    assert [r["step"] for r in read_jsonl(os.path.join(out, "metrics.jsonl"))] == [1, 2, 3, 4]


def test_a_json_config_is_read_and_flags_win(sft_dir, tmp_path):
    config = tmp_path / "rloo.json"
    config.write_text(json.dumps({"steps": 3, "group_size": 2, "prompts_per_step": 2}))
    out = str(tmp_path / "rloo")
    assert main(["rloo", "--sft", sft_dir, "--out", out, "--config", str(config), "--steps", "1",
                 "--no-progress"]) == 0
    assert len(read_jsonl(os.path.join(out, "metrics.jsonl"))) == 1


@pytest.mark.parametrize("argv, named", [
    (["grpo", "--group-size", "1"], "group_size"),
    (["grpo", "--beta", "0"], "beta"),
    (["grpo", "--clip-eps", "1.5"], "clip_eps"),
    (["ppo", "--clip-eps", "0", "--rm", "nowhere"], "clip_eps"),
    (["dpo", "--beta", "-0.1"], "beta"),
    (["rloo", "--group-size", "1"], "group_size"),
])
def test_bad_settings_exit_with_an_error_naming_the_setting(sft_dir, tmp_path, capsys, argv, named):
    assert main([argv[0], "--sft", sft_dir, "--out", str(tmp_path / "x"), *argv[1:]]) == 2
    assert named in capsys.readouterr().err


def test_unknown_config_key_is_named(sft_dir, tmp_path, capsys):
    config = tmp_path / "grpo.json"
    config.write_text(json.dumps({"group_sise": 4}))
    assert main(["grpo", "--sft", sft_dir, "--out", str(tmp_path / "g"), "--config", str(config)]) == 2
    assert "group_sise" in capsys.readouterr().err


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path, capsys):
    out = str(tmp_path / "sft")
    assert main(["sft", "--quick", "--out", out, "--steps", "1", "--no-progress"]) == 0
    assert main(["sft", "--quick", "--out", out, "--steps", "2", "--n-embd", "48", "--resume",
                 "--no-progress"]) == 2
    assert "n_embd" in capsys.readouterr().err


def test_a_missing_sft_folder_is_explained(tmp_path, capsys):
    assert main(["grpo", "--sft", str(tmp_path / "none"), "--out", str(tmp_path / "g")]) == 2
    assert "minirlhf sft" in capsys.readouterr().err
