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
    (["grpo", "--beta", "-1"], "beta"),
    (["grpo", "--lr", "inf"], "lr"),
    (["dpo", "--label-smoothing", "0.1"], "label_smoothing"),
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


# ------------------------------------------------------------- help and settings
def help_defaults(stage):
    """{setting: the default its --help line states}, from the help text of each setting's flag."""
    from minirlhf.cli import build_parser
    from minirlhf.train.stages import STAGES
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[stage]
    settings = {f.name for cls in STAGES[stage].configs for f in __import__("dataclasses").fields(cls)}
    stated = {}
    for action in sub._actions:
        if action.dest in settings:
            stated[action.dest] = action.help.rsplit("; default", 1)[1].lstrip(": ").strip()
    return stated


@pytest.mark.parametrize("stage", ["grpo", "rloo", "dpo", "rm"])
def test_help_states_the_value_a_run_without_flags_uses(sft_dir, tmp_path, stage):
    """Every setting's --help default is what run.json records for a run given only --steps 1 (and the
    size flags a test needs), so the help never promises another value than the run uses."""
    import ast
    out = str(tmp_path / stage)
    given = {"steps": "1"} if stage != "rm" else {"steps": "1", "pair_prompts": "4", "pair_heldout_prompts": "4"}
    argv = [stage, "--sft", sft_dir, "--out", out, "--no-progress"]
    for k, v in given.items():
        argv += ["--" + k.replace("_", "-"), v]
    assert main(argv) == 0
    with open(os.path.join(out, "run.json")) as f:
        run = json.load(f)
    used = {k: v for settings in run["settings"].values() for k, v in settings.items()}
    with open(os.path.join(sft_dir, "run.json")) as f:
        sft_run = json.load(f)
    stated = help_defaults(stage)
    assert set(stated) == set(used)
    for name, text in stated.items():
        if name in given:
            continue
        if name == "seed":
            assert text == "the --sft run's seed" and used[name] == sft_run["seed"]
        elif name == "max_new_tokens":
            assert text.startswith("the task's answer length") and used[name] == 2 + 3
        else:
            assert ast.literal_eval(text) == used[name], name


def test_sft_help_states_the_defaults_of_a_plain_run():
    import ast
    from minirlhf.train.stages import STAGES
    configs = STAGES["sft"].configs
    defaults = {f.name: f.default for cls in configs for f in __import__("dataclasses").fields(cls)}
    assert {k: ast.literal_eval(v) for k, v in help_defaults("sft").items()} == defaults


# ------------------------------------------------------------ output folders
def test_a_stage_refuses_an_out_that_holds_another_run(sft_dir, tmp_path, capsys):
    out = str(tmp_path / "g")
    base = ["grpo", "--sft", sft_dir, "--out", out, "--steps", "1", "--prompts-per-step", "2", "--group-size", "2",
            "--no-progress"]
    assert main(base) == 0
    before = os.path.getmtime(os.path.join(out, "model", "model.safetensors"))
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "holds a grpo run" in err and "--resume" in err and "--overwrite" in err
    assert os.path.getmtime(os.path.join(out, "model", "model.safetensors")) == before
    assert main(["rloo", "--sft", sft_dir, "--out", out, "--steps", "1", "--resume", "--no-progress"]) == 2
    assert "holds a grpo run, not a rloo run" in capsys.readouterr().err
    assert main(base + ["--overwrite"]) == 0


def test_a_stage_never_writes_into_the_folder_it_reads(sft_dir, capsys):
    with open(os.path.join(sft_dir, "run.json")) as f:
        before = f.read()
    for extra in ([], ["--overwrite"], ["--resume"]):
        assert main(["grpo", "--sft", sft_dir, "--out", sft_dir, "--steps", "1", "--no-progress", *extra]) == 2
        assert "the --sft folder this stage reads" in capsys.readouterr().err
    with open(os.path.join(sft_dir, "run.json")) as f:
        assert f.read() == before


def test_an_out_holding_other_files_or_naming_a_file_is_refused(sft_dir, tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    assert main(["grpo", "--sft", sft_dir, "--out", str(tmp_path / "notes"), "--steps", "1", "--no-progress"]) == 2
    assert "not a minirlhf run" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["grpo", "--sft", sft_dir, "--out", str(tmp_path / "file"), "--steps", "1", "--no-progress"]) == 2
    assert "is a file" in capsys.readouterr().err
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"


@pytest.mark.parametrize("content, named", [
    ("[1, 2]", "must hold a JSON object"), ("{not json", "not valid JSON"), (None, "is a folder"),
])
def test_a_bad_config_file_is_named(sft_dir, tmp_path, capsys, content, named):
    path = tmp_path / "c.json"
    if content is None:
        path.mkdir()
    else:
        path.write_text(content)
    assert main(["grpo", "--sft", sft_dir, "--out", str(tmp_path / "g"), "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert named in err and "c.json" in err


@pytest.mark.parametrize("damage, named", [
    (lambda d: open(os.path.join(d, "run.json"), "w").close(), "run.json"),
    (lambda d: open(os.path.join(d, "run.json"), "w").write("[1]"), "run.json"),
    (lambda d: open(os.path.join(d, "model", "config.json"), "w").write("[1]"), "config.json"),
    (lambda d: os.remove(os.path.join(d, "model", "model.safetensors")), "model.safetensors"),
])
def test_a_damaged_sft_folder_is_explained_without_a_traceback(sft_dir, tmp_path, capsys, damage, named):
    import shutil
    copy = str(tmp_path / "sft")
    shutil.copytree(sft_dir, copy)
    damage(copy)
    assert main(["grpo", "--sft", copy, "--out", str(tmp_path / "g"), "--steps", "1", "--no-progress"]) == 2
    assert named in capsys.readouterr().err


def test_a_negative_seed_is_refused_by_name(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--seed", "-1", "--out", str(tmp_path / "d")])
    assert "non-negative integer" in capsys.readouterr().err
    assert main(["sft", "--quick", "--out", str(tmp_path / "s"), "--seed", "-1", "--steps", "1"]) == 2
    assert "seed must be a non-negative integer" in capsys.readouterr().err


def test_the_demo_refuses_a_folder_that_is_not_empty(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("x")
    assert main(["demo", "--quick", "--out", str(tmp_path / "d"), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err


# ------------------------------------------------------- pretrained models and user tasks
def test_every_stage_starts_from_a_pretrained_qwen2_folder_with_its_own_tokenizer(tmp_path, capsys):
    """`minirlhf sft --model DIR` loads a Hugging Face Qwen2 directory (weights and tokenizer.json, nothing
    downloaded); the later stages read the model and the tokenizer back from the sft folder."""
    pytest.importorskip("transformers")
    from hf_models import hf_model
    from test_tokenizer_json import family
    from minirlhf.tokenizer_json import HFTokenizer
    model_dir = tmp_path / "qwen"
    tokenizer = family("qwen2")
    hf_model("qwen2", vocab_size=tokenizer.get_vocab_size()).save_pretrained(model_dir)
    tokenizer.save(str(model_dir / "tokenizer.json"))
    sft, grpo, rm, ppo = (str(tmp_path / n) for n in ("sft", "grpo", "rm", "ppo"))
    small = ["--no-progress", "--steps", "2"]
    assert main(["sft", "--model", str(model_dir), "--out", sft, "--batch-size", "4", "--n-train-prompts", "16",
                 "--n-heldout", "4", "--eval-samples", "1", *small]) == 0
    with open(os.path.join(sft, "model", "config.json")) as f:
        assert json.load(f)["architecture"] == "Llama"
    ours = HFTokenizer.load(os.path.join(sft, "tokenizer"))
    assert ours.encode("What is 12+34?") == tokenizer.encode("What is 12+34?").ids
    assert main(["grpo", "--sft", sft, "--out", grpo, "--prompts-per-step", "2", "--group-size", "2", *small]) == 0
    assert main(["rm", "--sft", sft, "--out", rm, "--pair-prompts", "4", "--pair-heldout-prompts", "2",
                 "--batch-size", "4", *small]) == 0
    with open(os.path.join(rm, "model", "config.json")) as f:
        assert json.load(f)["architecture"] == "LlamaRewardModel"
    assert main(["ppo", "--sft", sft, "--rm", rm, "--out", ppo, "--prompts-per-step", "2", "--epochs", "1",
                 "--minibatches", "1", *small]) == 0


def test_a_task_comes_from_a_jsonl_file_of_questions_and_answers(tmp_path, capsys):
    path = tmp_path / "task.jsonl"
    rows = [{"question": f"What is {a} times {b}?", "answer": a * b} for a in range(2, 8) for b in range(2, 8)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    sft, grpo = str(tmp_path / "sft"), str(tmp_path / "grpo")
    assert main(["sft", "--task-file", str(path), "--n-heldout", "6", "--out", sft, "--steps", "2",
                 "--batch-size", "8", "--no-progress"]) == 0
    assert main(["grpo", "--sft", sft, "--out", grpo, "--steps", "1", "--prompts-per-step", "2", "--group-size", "2",
                 "--no-progress"]) == 0
    with open(os.path.join(grpo, "run.json")) as f:
        assert json.load(f)["settings"]["GRPOConfig"]["max_new_tokens"] == 2 + 2
    path.write_text('{"question": "What is 2 times 3?", "answer": "six"}\n')
    assert main(["sft", "--task-file", str(path), "--out", str(tmp_path / "bad"), "--steps", "1"]) == 2
    assert "line 1" in capsys.readouterr().err
