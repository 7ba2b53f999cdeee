import json

import numpy as np
import pytest

import minirlhf
from minirlhf import no_grad
from minirlhf.model import GPT, GPTConfig
from minirlhf.sampling import generate
from minirlhf.losses import sft_loss
from minirlhf.train.sft import SFTConfig, sft_batch, train_sft

CFG = GPTConfig(n_layer=2, n_head=4, n_embd=32, vocab_size=64, block_size=32)


def reverse_task(n=32, seed=0):
    """Prompt: a few tokens and a separator (1); response: the tokens reversed, then eos (2)."""
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(n):
        xs = rng.integers(3, 12, rng.integers(2, 5)).tolist()
        examples.append((xs + [1], xs[::-1] + [2]))
    return examples


def fresh(seed=0, dropout=0.0):
    minirlhf.manual_seed(seed)
    return GPT(GPTConfig(**{**CFG.__dict__, "dropout": dropout}))


def test_sft_batch_targets_only_response_tokens():
    ids, targets, loss_mask = sft_batch([([10, 11, 12], [20, 21]), ([13], [22, 23, 24])], pad_id=0)
    np.testing.assert_array_equal(ids, [[10, 11, 12, 20], [13, 22, 23, 24]])
    np.testing.assert_array_equal(targets, [[11, 12, 20, 21], [22, 23, 24, 0]])
    np.testing.assert_array_equal(loss_mask, [[0, 0, 1, 1], [1, 1, 1, 0]])


def test_sft_loss_is_mean_negative_logprob_of_response_tokens(rng):
    model = fresh()
    ids, targets, loss_mask = sft_batch([([10, 11, 12], [20, 21]), ([13], [22, 23, 24])])
    with no_grad():
        logits = model(ids).data
        loss = sft_loss(model(ids), targets, loss_mask).item()
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    assert loss == pytest.approx(-(picked * loss_mask).sum() / loss_mask.sum(), rel=1e-5)


def test_prompt_targets_do_not_count():
    model = fresh()
    ids, targets, loss_mask = sft_batch([([10, 11, 12], [20, 21])])
    other = targets.copy()
    other[0, :2] = [40, 41]  # positions whose targets are prompt tokens
    with no_grad():
        assert sft_loss(model(ids), targets, loss_mask).item() == sft_loss(model(ids), other, loss_mask).item()
        other[0, 2] = 42  # a response target does count
        assert sft_loss(model(ids), targets, loss_mask).item() != sft_loss(model(ids), other, loss_mask).item()


def test_sft_learns_to_answer_each_prompt():
    examples = [([3, 4, 1], [7, 8, 9, 2]), ([5, 1], [10, 2]), ([6, 6, 1], [11, 12, 13, 14, 2]),
                ([4, 3, 1], [9, 8, 7, 2])]
    model = fresh()
    history = train_sft(model, examples, SFTConfig(lr=1e-2, steps=120, batch_size=4, warmup=5))
    assert history[-1]["loss"] < 0.05 < 3.0 < history[0]["loss"]
    out = generate(model, [p for p, _ in examples], 6, temperature=0, eos_id=2)
    for i, (_, response) in enumerate(examples):
        assert out.tokens[i].tolist()[:len(response)] == response


def test_learning_rate_warms_up_then_decays():
    config = SFTConfig(lr=1e-3, steps=20, batch_size=4, warmup=5, min_lr=0.0)
    lrs = [m["learning_rate"] for m in train_sft(fresh(), reverse_task(8), config, progress=False)]
    assert lrs[:5] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3])
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] < 1e-4


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    examples = reverse_task(16)
    config = SFTConfig(lr=3e-3, steps=6, batch_size=4, grad_accum=2, warmup=2, checkpoint_every=3, seed=1)
    straight = fresh(dropout=0.1)
    train_sft(straight, examples, config)

    class Crash(Exception):
        pass

    def crash_after_step_3(metrics):
        if metrics["step"] == 4:
            raise Crash
    with pytest.raises(Crash):
        train_sft(fresh(dropout=0.1), examples, config, out_dir=tmp_path, log=crash_after_step_3)

    resumed = fresh(seed=7, dropout=0.1)  # fresh objects: other weights, other RNG state
    minirlhf.backend.generator("cpu").random(5)
    history = train_sft(resumed, examples, config, out_dir=tmp_path, resume=True)
    assert [m["step"] for m in history] == [4, 5, 6]
    for name, p in straight.named_parameters():
        np.testing.assert_array_equal(dict(resumed.named_parameters())[name].data, p.data, err_msg=name)


def test_metrics_are_appended_to_a_jsonl_file(tmp_path):
    config = SFTConfig(lr=1e-3, steps=3, batch_size=4, warmup=0)
    train_sft(fresh(), reverse_task(8), config, log=tmp_path / "m.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert {"loss", "learning_rate", "grad_norm", "num_tokens"} <= rows[0].keys()


def test_a_resumed_run_logs_each_step_once_and_the_log_folder_is_made(tmp_path):
    config = SFTConfig(lr=1e-3, steps=5, batch_size=4, warmup=0, checkpoint_every=2)
    log = tmp_path / "new" / "folder" / "m.jsonl"

    class Crash(Exception):
        pass

    def write_then_crash_after_step_3(metrics):
        with open(log, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if metrics["step"] == 3:
            raise Crash
    log.parent.mkdir(parents=True)
    with pytest.raises(Crash):
        train_sft(fresh(), reverse_task(8), config, out_dir=tmp_path, log=write_then_crash_after_step_3)
    log.unlink()
    log.parent.rmdir()
    train_sft(fresh(), reverse_task(8), SFTConfig(lr=1e-3, steps=3, batch_size=4, warmup=0), log=log)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]
    train_sft(fresh(), reverse_task(8), config, out_dir=tmp_path, resume=True, log=log)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_final_checkpoint_loads_as_a_model(tmp_path, rng):
    model = fresh()
    train_sft(model, reverse_task(8), SFTConfig(lr=1e-3, steps=2, batch_size=4, warmup=0), out_dir=tmp_path)
    ids = rng.integers(0, 64, (2, 5))
    np.testing.assert_array_equal(GPT.load(tmp_path / "checkpoint")(ids).data, model(ids).data)


@pytest.mark.parametrize("bad, match", [
    (dict(lr=0.0), "lr must be a finite number > 0"),
    (dict(lr=float("inf")), "lr must be"),
    (dict(weight_decay=float("nan")), "weight_decay"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(clip=float("nan")), "clip"),
    (dict(steps=0), "steps"),
    (dict(batch_size=-1), "batch_size"),
    (dict(grad_accum=1.5), "grad_accum"),
    (dict(clip=-1.0), "clip"),
])
def test_bad_config_is_a_clear_error(bad, match):
    with pytest.raises(ValueError, match=match):
        SFTConfig(**bad)


def test_bad_examples_are_clear_errors(tmp_path):
    config = SFTConfig(steps=1)
    with pytest.raises(ValueError, match="examples is empty"):
        train_sft(fresh(), [], config)
    with pytest.raises(ValueError, match="empty response"):
        train_sft(fresh(), [([1, 2], [])], config)
    with pytest.raises(ValueError, match="block_size"):
        train_sft(fresh(), [([1] * 30, [2] * 10)], config)
    with pytest.raises(ValueError, match="out_dir"):
        train_sft(fresh(), reverse_task(4), config, resume=True)


def test_accumulated_micro_batches_weigh_every_token_of_the_step_alike():
    """Micro-batches of different token counts are summed over the step's token count, so the step's loss
    (and so its gradient) is that of one batch of all their tokens; averaging per-micro-batch means is not
    (the gradient-accumulation bug transformers fixed in 2024, huggingface/transformers#34191)."""
    examples = [([3, 1], [4, 2]), ([5, 6, 7, 1], [8, 9, 10, 11, 12, 2])]  # 2 and 6 response tokens
    model = fresh()
    ids, targets, mask = sft_batch(examples)
    with no_grad():
        whole = sft_loss(model(ids), targets, mask).item()
        mean_of_means = np.mean([sft_loss(model(ids[r:r + 1]), targets[r:r + 1], mask[r:r + 1]).item()
                                 for r in range(2)])
    config = SFTConfig(lr=1e-2, steps=1, batch_size=1, grad_accum=2, warmup=0)
    history = train_sft(model, examples, config, progress=False)
    assert history[0]["num_tokens"] == 8
    assert history[0]["loss"] == pytest.approx(whole, rel=1e-5)
    assert abs(history[0]["loss"] - mean_of_means) > 0.01
