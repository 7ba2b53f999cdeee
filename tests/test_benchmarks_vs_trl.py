"""benchmarks/vs_trl.py: minirlhf's side runs without TRL and reports one row per step; TRL's side,
where it is installed, starts from the same weights and reads the same token ids."""
import json
import math
import os
import sys

import numpy as np
import pytest

BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "benchmarks")


@pytest.fixture(scope="module")
def vs_trl():
    sys.path.insert(0, os.path.abspath(BENCHMARKS))  # the side processes import the script by this name too
    try:
        import vs_trl
        yield vs_trl
    finally:
        sys.path.remove(os.path.abspath(BENCHMARKS))


def trl_or_skip(vs_trl):
    missing = vs_trl.trl_missing()
    if missing:
        pytest.skip(f"TRL's side: {missing}")


@pytest.mark.parametrize("algorithm", ["grpo", "dpo", "ppo", "rloo", "ppo_distinct"])
def test_minirlhf_side_times_one_step_at_the_tiny_size(vs_trl, algorithm):
    row = vs_trl.measure(algorithm, vs_trl.SIZES["2x64"], steps=1, with_trl=False)
    assert row["algorithm"] == algorithm and (row["n_layer"], row["n_embd"]) == (2, 64)
    assert row["vocab_size"] == 276 and row["context"] == vs_trl.CONTEXT
    assert len(row["minirlhf_ms"]) == 1
    assert math.isfinite(row["minirlhf_median_ms"]) and row["minirlhf_median_ms"] > 0
    assert "trl_ms" not in row and "ratio" not in row
    lines = vs_trl.table([row]).splitlines()
    assert lines[0].startswith("| step | model | minirlhf | TRL |") and len(lines) == 3
    label = "PPO 128×1" if algorithm == "ppo_distinct" else algorithm.upper()
    assert lines[2].startswith(f"| {label} | 2L/64d | ") and "—" in lines[2]


@pytest.mark.parametrize("algorithm, prompts, samples", [("ppo", 64, 2), ("ppo_distinct", 128, 1)])
def test_the_ppo_rows_take_128_rollouts_a_step(vs_trl, monkeypatch, algorithm, prompts, samples):
    """The PPO row samples TRL's batch, 64 prompts × 2; ppo_distinct, 128 distinct prompts × 1."""
    seen = {}
    monkeypatch.setattr(vs_trl, "train_ppo", lambda *args, **kwargs: seen.update(config=args[4]))
    task = vs_trl.addition_task()
    models = vs_trl.minirlhf_models(algorithm, vs_trl.SIZES["2x64"], task)
    vs_trl.minirlhf_train(algorithm, models, task, 1)(lambda: None)
    assert (seen["config"].prompts_per_step, seen["config"].samples_per_prompt) == (prompts, samples)


@pytest.mark.parametrize("algorithm", ["dpo", "grpo"])
def test_minirlhf_side_as_two_replicas_times_each_step(vs_trl, algorithm):
    row = vs_trl.measure(algorithm, vs_trl.SIZES["2x64"], steps=2, with_trl=False, replicas=2)
    assert row["replicas"] == 2 and len(row["minirlhf_ms"]) == 2
    assert all(math.isfinite(t) and t > 0 for t in row["minirlhf_ms"])


def test_replicas_must_be_positive(vs_trl):
    with pytest.raises(SystemExit):
        vs_trl.main(["--replicas", "0"])


def test_a_failing_side_raises_with_its_traceback(vs_trl):
    with pytest.raises(RuntimeError, match="minirlhf side failed"):
        vs_trl.measure("grpo", vs_trl.Size("bad", 2, 3, 64, 1), steps=1, with_trl=False)  # 64 % 3 heads


def test_without_trl_the_script_says_what_to_install(vs_trl, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "trl", None)  # makes `import trl` fail
    assert vs_trl.main(["--sizes", "2x64", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'minirlhf[bench]'" in err and "trl==1.16.0" in err


def test_steps_must_be_positive(vs_trl):
    with pytest.raises(SystemExit):
        vs_trl.main(["--steps", "0"])


def test_pairs_put_the_right_answer_over_a_near_miss(vs_trl):
    task = vs_trl.addition_task(n_pairs=20)
    eos = task.env.eos_id
    for (prompt, chosen, rejected), problem in zip(task.pairs, task.env.train):
        assert chosen[-1] == eos and rejected[-1] == eos
        assert task.env.text(chosen) == str(problem.answer) and task.env.text(rejected) != str(problem.answer)


def test_trl_side_reads_the_same_ids_and_starts_from_the_same_weights(vs_trl, tmp_path):
    trl_or_skip(vs_trl)
    import torch
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel
    task = vs_trl.addition_task(n_pairs=4)
    tokenizer = vs_trl.hf_tokenizer(task.env.tokenizer, str(tmp_path / "tokenizer"))
    vs_trl.check_same_ids(tokenizer, task)
    assert tokenizer.eos_token_id == task.env.eos_id and tokenizer.pad_token_id == task.env.pad_id
    policy, _, reward_model = vs_trl.minirlhf_models("ppo", vs_trl.SIZES["2x64"], task)
    ids = np.array(task.env.train_prompts[:3])
    theirs = GPT2LMHeadModel.from_pretrained(vs_trl.hf_gpt2_folder(policy, str(tmp_path / "policy"), task))
    with torch.no_grad():
        logits = theirs(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(logits, policy(ids).data, rtol=1e-4, atol=1e-4)
    scorer = GPT2ForSequenceClassification.from_pretrained(vs_trl.hf_gpt2_folder(
        reward_model.transformer, str(tmp_path / "reward"), task, head=reward_model.reward_head))
    with torch.no_grad():
        scores = scorer(torch.from_numpy(ids)).logits.numpy()[:, 0]
    last = reward_model.transformer.hidden(ids).data[:, -1]  # the last-token head alone
    np.testing.assert_allclose(scores, last @ reward_model.reward_head.weight.data[0], rtol=1e-4, atol=1e-4)


def test_one_grpo_row_against_trl(vs_trl):
    trl_or_skip(vs_trl)
    row = vs_trl.measure("grpo", vs_trl.SIZES["2x64"], steps=1)
    assert row["trl_trainer"] == "GRPOTrainer" and len(row["trl_ms"]) == 1 and row["trl_median_ms"] > 0
    assert row["ratio"] == pytest.approx(row["minirlhf_median_ms"] / row["trl_median_ms"])
    json.dumps(row)  # what --json writes
