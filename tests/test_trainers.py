"""The RLHF trainers on a toy problem: they learn, they resume exactly, and bad settings are named."""
import json

import numpy as np
import pytest

import minirlhf
import minirlhf.functional as F
from minirlhf.model import GPT, GPTConfig, RewardModel
from minirlhf.tensor import Tensor, no_grad
from minirlhf.rollout import response_logprobs, sample, sequence_logprobs
from minirlhf.train.config import load_config
from minirlhf.train.run import MetricsLog
from minirlhf.train.dpo import DPOConfig, reference_logprobs, train_dpo
from minirlhf.train.grpo import GRPOConfig, train_grpo
from minirlhf.train.ppo import PPOConfig, train_ppo, with_value_head
from minirlhf.train.reward import (RewardConfig, normalize_reward_model, pair_accuracy, pair_batch, pair_scores,
                                   score_sequences, train_reward_model)
from minirlhf.train.rloo import RLOOConfig, train_rloo

EOS, PAD, GOOD, BAD = 11, 0, 5, 6
PROMPTS = [[1, 2, 3], [2, 3], [3, 1, 4, 1], [4, 2], [1, 4], [2, 2, 3], [3, 3], [4, 1, 2]]


def tiny_gpt(seed=0, n_embd=16):
    minirlhf.manual_seed(seed)
    return GPT(GPTConfig(n_layer=1, n_head=2, n_embd=n_embd, vocab_size=12, block_size=16))


def first_token_is_good(index, responses):
    """The toy rule reward: 1 if the response starts with token GOOD."""
    return [1.0 if r and r[0] == GOOD else 0.0 for r in responses]


def good_rate(model, n=64):
    batch = sample(model, PROMPTS, np.arange(len(PROMPTS)), n // len(PROMPTS), 1.0, 3, EOS, PAD, seed=123)
    return np.mean(first_token_is_good(batch.index, batch.responses()))


class FirstTokenRewardModel:
    """A stand-in reward model: +1 if the first response token is GOOD.

    It scores full sequences (prompt then response), as RewardModel does, and checks that the
    response mask starts right after the ``prompt_len`` prompt columns.
    """

    def __init__(self, prompt_len):
        self.prompt_len = prompt_len

    def __call__(self, ids, mask, response):
        response = np.asarray(response)
        assert not response[:, :self.prompt_len].any() and response[:, self.prompt_len].all()
        return Tensor((np.asarray(ids)[:, self.prompt_len] == GOOD).astype(np.float32))


# ---------------------------------------------------------------- log-probs
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_response_logprobs_match_the_samplers_logprobs(temperature):
    """The trainer's full-forward log-probs equal what the sampler (KV cache) reported, at the sampling
    temperature too (TRL #2681 and verl's temperature fixes: forgetting to divide the training logits by
    the temperature makes π/π_old far from 1 at the very first step)."""
    model = tiny_gpt()
    batch = sample(model, PROMPTS, np.arange(len(PROMPTS)), 1, temperature, 4, EOS, PAD, seed=1)
    with no_grad():
        logp = response_logprobs(model, batch).data
        seq = sequence_logprobs(model, batch).data
    np.testing.assert_allclose(logp, batch.logprobs * batch.mask, atol=1e-5)
    np.testing.assert_allclose(seq, (batch.logprobs * batch.mask).sum(axis=1), atol=1e-4)


# ----------------------------------------------------------------- learning
def test_grpo_raises_the_rule_reward():
    policy, reference = tiny_gpt(), tiny_gpt()
    before = good_rate(policy)
    cfg = GRPOConfig(steps=15, lr=1e-2, prompts_per_step=4, group_size=8, max_new_tokens=3, beta=0.01)
    history = train_grpo(policy, reference, PROMPTS, first_token_is_good, cfg, EOS, PAD, progress=False)
    assert len(history) == 15 and history[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert good_rate(policy) > before + 0.3


def test_rloo_raises_the_rule_reward():
    policy, reference = tiny_gpt(), tiny_gpt()
    before = good_rate(policy)
    cfg = RLOOConfig(steps=15, lr=1e-2, prompts_per_step=4, group_size=8, max_new_tokens=3, beta=0.01)
    train_rloo(policy, reference, PROMPTS, first_token_is_good, cfg, EOS, PAD, progress=False)
    assert good_rate(policy) > before + 0.3


def test_ppo_raises_the_reward_models_score():
    prompts = [p for p in PROMPTS if len(p) == 3] * 8  # one prompt length: the response starts at column 3
    reference = tiny_gpt()
    policy = with_value_head(reference)
    before = good_rate(policy)
    cfg = PPOConfig(steps=12, lr=1e-2, prompts_per_step=len(prompts), epochs=2, minibatches=1, max_new_tokens=3,
                    beta=0.05)
    history = train_ppo(policy, reference, FirstTokenRewardModel(3), prompts, cfg, EOS, PAD, progress=False)
    assert history[-1]["reward"] > history[0]["reward"]
    assert good_rate(policy) > before + 0.3


@pytest.mark.parametrize("target, grows", [(1e-3, True), (1e3, False)])
def test_ppo_adaptive_kl_raises_beta_above_the_target_and_lowers_it_below(target, grows):
    reference = tiny_gpt(seed=1)
    reference.wte.weight.data *= 100  # a sharp reference, far from the near-uniform policy: KL >> 1e-3
    policy = with_value_head(tiny_gpt())
    cfg = PPOConfig(steps=3, lr=1e-3, prompts_per_step=4, epochs=1, minibatches=1, max_new_tokens=3, beta=0.1,
                    adaptive_kl=True, kl_target=target, kl_horizon=10)
    history = train_ppo(policy, reference, FirstTokenRewardModel(3), [PROMPTS[0]] * 4, cfg, EOS, PAD,
                        progress=False)
    betas = [m["beta"] for m in history]
    assert betas[0] == 0.1
    assert (betas[-1] > betas[0]) == grows and betas[-1] != betas[0]


@pytest.mark.parametrize("minibatches", [1, 2])
def test_ppo_with_two_samples_per_prompt_computes_each_prompt_once_and_exactly(monkeypatch, minibatches):
    """samples_per_prompt = 2: each step draws prompts_per_step prompts and samples two responses for each,
    in consecutive rows; every forward of the step (the policy's log-probs and values, π_ref, the reward
    model) runs each prompt's positions once for both rows (PrefixCache), and the trained weights and
    metrics equal those of the same run with that sharing turned off (every row its whole sequence), in
    float64."""
    import minirlhf.rollout as rollout
    import minirlhf.train.ppo as ppo

    def run():
        reference = tiny_gpt().to(np.float64)
        policy = with_value_head(reference).to(np.float64)
        reward_model = RewardModel.from_gpt(tiny_gpt(1)).to(np.float64)
        cfg = PPOConfig(steps=2, lr=1e-2, prompts_per_step=3, samples_per_prompt=2, epochs=2,
                        minibatches=minibatches, max_new_tokens=3, beta=0.05)
        history = train_ppo(policy, reference, reward_model, PROMPTS, cfg, EOS, PAD, progress=False)
        return policy.state_dict(), history

    batches, caches = [], []
    step_rollout, hidden = ppo.step_rollout, GPT.hidden

    def recording_rollout(*args, **kwargs):
        batches.append(step_rollout(*args, **kwargs))
        return batches[-1]

    def recording_hidden(self, *args, **kwargs):
        caches.append(type(kwargs.get("cache")).__name__)
        return hidden(self, *args, **kwargs)
    monkeypatch.setattr(ppo, "step_rollout", recording_rollout)
    monkeypatch.setattr(GPT, "hidden", recording_hidden)
    shared_weights, shared_history = run()
    for batch in batches:
        assert len(batch) == 6 and np.array_equal(batch.index[0::2], batch.index[1::2])
    assert "PrefixCache" in caches  # a prompt's keys and values read by both of its rows

    monkeypatch.setattr(rollout, "shared_prompts", lambda r: (np.arange(len(r)), np.arange(len(r))))
    caches.clear()
    whole_weights, whole_history = run()
    assert "PrefixCache" not in caches
    for name, value in shared_weights.items():
        np.testing.assert_allclose(value, whole_weights[name], rtol=1e-9, atol=1e-11, err_msg=name)
    for got, want in zip(shared_history, whole_history):
        assert got.keys() == want.keys()
        for key in got:
            assert got[key] == pytest.approx(want[key], rel=1e-8, abs=1e-10), key


def test_ppo_needs_a_value_head():
    with pytest.raises(ValueError, match="value head"):
        train_ppo(tiny_gpt(), tiny_gpt(), FirstTokenRewardModel(3), PROMPTS, PPOConfig(steps=1), EOS, PAD)


def toy_pairs(n=32):
    rng = np.random.default_rng(0)
    return [(PROMPTS[int(rng.integers(len(PROMPTS)))], [GOOD, 7, EOS], [BAD, 7, EOS]) for _ in range(n)]


def test_reward_model_learns_the_preference():
    rm = RewardModel.from_gpt(tiny_gpt())
    pairs = toy_pairs()
    history = train_reward_model(rm, pairs, RewardConfig(steps=30, lr=1e-2, batch_size=16), PAD, progress=False)
    assert history[-1]["loss"] < history[0]["loss"]
    assert pair_accuracy(rm, pairs, PAD) == 1.0


@pytest.mark.parametrize("trunk", ["gpt", "llama"])
def test_pair_scores_with_each_prompt_computed_once_equal_the_reward_models_forward(trunk):
    """pair_scores reads each pair's prompt once (rollout_scores over a PrefixCache); the scores and every
    gradient equal those of rm(ids, mask, response) over the padded [prompt | response] rows."""
    if trunk == "llama":
        from minirlhf.llama import Llama, LlamaConfig, LlamaRewardModel
        minirlhf.manual_seed(0)
        rm = LlamaRewardModel.from_gpt(Llama(LlamaConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=16,
                                                         intermediate_size=32, vocab_size=12, block_size=16)))
    else:
        rm = RewardModel.from_gpt(tiny_gpt())
    rng = np.random.default_rng(0)
    for p in rm.parameters():  # heads away from their zero init, so that every term counts
        p.data = p.data + rng.normal(0, 0.05, p.shape).astype(p.dtype)
    pairs = toy_pairs(6) + [(PROMPTS[2], [7, 9, 9, EOS], [GOOD, EOS]), (PROMPTS[1], [EOS], [BAD, 7, 7, 7])]
    chosen, rejected = pair_scores(rm, pairs, PAD)
    forward = rm(*pair_batch(pairs, PAD))
    np.testing.assert_allclose(np.concatenate([chosen.data, rejected.data]), forward.data, atol=1e-5)
    weights = rng.standard_normal(2 * len(pairs)).astype(np.float32)
    grads = []
    for scores in (F.cat([chosen, rejected]), forward):
        rm.zero_grad()
        (scores * weights).sum().backward()
        grads.append({name: p.grad.copy() for name, p in rm.named_parameters()})
    for name in grads[1]:
        scale = max(1.0, np.abs(grads[1][name]).max())
        np.testing.assert_allclose(grads[0][name], grads[1][name], atol=2e-6 * scale, rtol=0, err_msg=name)


def test_normalized_reward_model_scores_have_mean_zero_and_std_one_in_the_same_order():
    rm = RewardModel.from_gpt(tiny_gpt())
    rm.token_scores.weight.data *= 50  # a scale far from 1, as training leaves it
    pairs = toy_pairs(8) + [(PROMPTS[1], [7, 9, 9, EOS], [GOOD, EOS])]
    batch = pair_batch(pairs, PAD)
    before = score_sequences(rm, *batch)
    normalize_reward_model(rm, *batch)
    after = score_sequences(rm, *batch)
    assert abs(after.mean()) < 1e-5 and abs(after.std() - 1) < 1e-4
    np.testing.assert_allclose(after, (before - before.mean()) / before.std(), atol=1e-4)


def test_dpo_starts_at_log_two_and_raises_the_chosen_over_the_rejected():
    policy, reference = tiny_gpt(), tiny_gpt()
    pairs = toy_pairs()
    history = train_dpo(policy, reference, pairs, DPOConfig(steps=20, lr=1e-2, batch_size=16, beta=0.5), PAD,
                        progress=False)
    assert history[0]["loss"] == pytest.approx(np.log(2), abs=1e-5)  # π = π_ref at the first step
    assert history[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert history[-1]["rewards/margins"] > 0.5 and history[-1]["rewards/accuracies"] == 1.0
    assert good_rate(policy) > good_rate(reference) + 0.3


def test_dpo_reference_logprobs_do_not_depend_on_the_chunking():
    ref = tiny_gpt()
    pairs = toy_pairs(10)
    a = reference_logprobs(ref, pairs, PAD, rows=3)
    b = reference_logprobs(ref, pairs, PAD, rows=100)
    np.testing.assert_allclose(a[0], b[0], atol=1e-5)
    np.testing.assert_allclose(a[1], b[1], atol=1e-5)


# ------------------------------------------------------------------ resume
class Interrupt(Exception):
    pass


def interrupt_after(step, path):
    log = MetricsLog(path, 0)

    def write(record):
        log(record)
        if record["step"] == step:
            raise Interrupt
    return write


@pytest.mark.parametrize("trainer", ["grpo", "dpo", "ppo"])
def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, trainer):
    def run(policy, out_dir, resume=False, log=None):
        reference = tiny_gpt()
        if trainer == "grpo":
            cfg = GRPOConfig(steps=4, lr=1e-2, prompts_per_step=2, group_size=4, max_new_tokens=3, checkpoint_every=1)
            return train_grpo(policy, reference, PROMPTS, first_token_is_good, cfg, EOS, PAD, out_dir=out_dir,
                              resume=resume, log=log, progress=False)
        if trainer == "dpo":
            cfg = DPOConfig(steps=4, lr=1e-2, batch_size=8, checkpoint_every=1)
            return train_dpo(policy, reference, toy_pairs(), cfg, PAD, out_dir=out_dir, resume=resume, log=log,
                             progress=False)
        cfg = PPOConfig(steps=4, lr=1e-2, prompts_per_step=4, epochs=1, minibatches=1, max_new_tokens=3,
                        adaptive_kl=True, kl_target=0.01, kl_horizon=10, checkpoint_every=1)
        return train_ppo(policy, reference, FirstTokenRewardModel(3), [PROMPTS[0]] * 4, cfg, EOS, PAD,
                         out_dir=out_dir, resume=resume, log=log, progress=False)

    make = (lambda: with_value_head(tiny_gpt())) if trainer == "ppo" else tiny_gpt
    straight = make()
    expected = run(straight, str(tmp_path / "straight"))

    out, log = str(tmp_path / "interrupted"), str(tmp_path / "interrupted.jsonl")
    with pytest.raises(Interrupt):
        run(make(), out, log=interrupt_after(3, log))  # step 3 is logged, not checkpointed
    resumed = make()
    history = run(resumed, out, resume=True, log=log)

    assert [m["step"] for m in history] == [3, 4]  # finished steps are not redone
    for name, value in straight.state_dict().items():
        np.testing.assert_array_equal(resumed.state_dict()[name], value, err_msg=name)
    with open(log) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[2:] == expected[2:]


def test_metrics_log_drops_steps_a_resumed_run_will_redo(tmp_path):
    path = str(tmp_path / "m.jsonl")
    log = MetricsLog(path, 0)
    for step in (1, 2, 3):
        log({"step": step})
    MetricsLog(path, 2)
    with open(path) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]


def test_resume_without_a_checkpoint_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_grpo(tiny_gpt(), tiny_gpt(), PROMPTS, first_token_is_good, GRPOConfig(steps=1), EOS, PAD,
                   out_dir=str(tmp_path), resume=True)


def test_a_checkpoint_of_another_architecture_is_refused_naming_the_setting(tmp_path):
    cfg = GRPOConfig(steps=1, prompts_per_step=2, group_size=2, max_new_tokens=2)
    train_grpo(tiny_gpt(), tiny_gpt(), PROMPTS, first_token_is_good, cfg, EOS, PAD, out_dir=str(tmp_path),
               progress=False)
    other = tiny_gpt(n_embd=32)
    with pytest.raises(ValueError, match="n_embd"):
        train_grpo(other, tiny_gpt(), PROMPTS, first_token_is_good, GRPOConfig(steps=2), EOS, PAD,
                   out_dir=str(tmp_path), resume=True, progress=False)


# --------------------------------------------------------------- bad input
@pytest.mark.parametrize("cls, setting, value", [
    (GRPOConfig, "group_size", 1), (GRPOConfig, "beta", -0.1), (GRPOConfig, "beta", float("inf")),
    (GRPOConfig, "clip_eps", 0.0), (GRPOConfig, "clip_eps", 1.0), (GRPOConfig, "loss_type", "nope"),
    (GRPOConfig, "clip_eps_high", -0.2), (GRPOConfig, "scale", "rows"),
    (PPOConfig, "clip_eps", 1.5), (PPOConfig, "beta", -1.0), (PPOConfig, "lam", 1.2), (PPOConfig, "epochs", 0),
    (PPOConfig, "samples_per_prompt", 0), (PPOConfig, "samples_per_prompt", 1.5),
    (DPOConfig, "beta", 0.0), (DPOConfig, "beta", -1.0), (DPOConfig, "loss_type", "x"),
    (RLOOConfig, "group_size", 1), (RLOOConfig, "beta", -0.5), (RewardConfig, "batch_size", 0),
    (RewardConfig, "lr", 0.0), (GRPOConfig, "steps", 2.5), (GRPOConfig, "lr", float("inf")),
    (GRPOConfig, "clip", float("nan")), (GRPOConfig, "weight_decay", float("nan")),
    (GRPOConfig, "weight_decay", -0.1), (RewardConfig, "min_lr", 1.0),
])
def test_bad_settings_raise_an_error_naming_the_setting(cls, setting, value):
    with pytest.raises(ValueError, match=f"{cls.__name__}: {setting}:? (must|unknown value)"):
        cls(**{setting: value})


@pytest.mark.parametrize("cls, settings", [
    (DPOConfig, {"label_smoothing": 0.1}),               # the sigmoid loss takes no smoothing
    (DPOConfig, {"loss_type": "robust", "label_smoothing": 0.5}),
    (GRPOConfig, {"clip_eps_high": 0.0}),
])
def test_a_config_refuses_what_its_loss_refuses_before_any_work(cls, settings):
    with pytest.raises(ValueError, match=cls.__name__):
        cls(**settings)


@pytest.mark.parametrize("cls, settings", [
    (GRPOConfig, {"beta": 0.0}),                          # Dr. GRPO and DAPO train without a KL term
    (GRPOConfig, {"loss_type": "dapo", "clip_eps_high": 0.28}),
    (DPOConfig, {"loss_type": "robust", "label_smoothing": 0.1}),
    (PPOConfig, {"beta": 0.0}), (RLOOConfig, {"beta": 0.0}),
])
def test_a_config_accepts_what_its_loss_accepts(cls, settings):
    config = cls(**settings)
    assert all(getattr(config, k) == v for k, v in settings.items())


def test_config_loads_from_json_with_flags_on_top_and_refuses_unknown_keys(tmp_path):
    path = tmp_path / "grpo.json"
    path.write_text(json.dumps({"group_size": 4, "lr": 0.001}))
    cfg = load_config(GRPOConfig, str(path), lr=0.01, beta=None)
    assert cfg.group_size == 4 and cfg.lr == 0.01 and cfg.beta == GRPOConfig().beta
    path.write_text(json.dumps({"group_sise": 4}))
    with pytest.raises(ValueError, match="unknown setting.*group_sise"):
        load_config(GRPOConfig, str(path))
    path.write_text(json.dumps({"group_size": 1}))
    with pytest.raises(ValueError, match="group_size"):
        load_config(GRPOConfig, str(path))


@pytest.mark.parametrize("name", ["grpo", "rloo", "dpo", "rm", "ppo"])
def test_an_empty_dataset_is_refused(name):
    with pytest.raises(ValueError, match="is empty"):
        if name == "grpo":
            train_grpo(tiny_gpt(), tiny_gpt(), [], first_token_is_good, GRPOConfig(), EOS, PAD)
        elif name == "rloo":
            train_rloo(tiny_gpt(), tiny_gpt(), [], first_token_is_good, RLOOConfig(), EOS, PAD)
        elif name == "dpo":
            train_dpo(tiny_gpt(), tiny_gpt(), [], DPOConfig(), PAD)
        elif name == "rm":
            train_reward_model(RewardModel.from_gpt(tiny_gpt()), [], RewardConfig(), PAD)
        else:
            train_ppo(with_value_head(tiny_gpt()), tiny_gpt(), FirstTokenRewardModel(3), [], PPOConfig(), EOS, PAD)


def test_every_metric_a_trainer_logs_has_one_documented_meaning():
    """One name, one quantity: every key any trainer logs is in METRICS (the README's table), and the KL
    metrics start at 0 when the policy is the reference."""
    from minirlhf.train.metrics import METRICS
    logged = {}
    kwargs = dict(progress=False)
    logged["grpo"] = train_grpo(tiny_gpt(), tiny_gpt(), PROMPTS, first_token_is_good,
                                GRPOConfig(steps=1, prompts_per_step=2, group_size=2, max_new_tokens=3), EOS, PAD,
                                **kwargs)
    logged["rloo"] = train_rloo(tiny_gpt(), tiny_gpt(), PROMPTS, first_token_is_good,
                                RLOOConfig(steps=1, prompts_per_step=2, group_size=2, max_new_tokens=3), EOS, PAD,
                                **kwargs)
    logged["ppo"] = train_ppo(with_value_head(tiny_gpt()), tiny_gpt(), FirstTokenRewardModel(3), [PROMPTS[0]] * 2,
                              PPOConfig(steps=1, prompts_per_step=2, epochs=1, minibatches=1, max_new_tokens=3),
                              EOS, PAD, **kwargs)
    logged["dpo"] = train_dpo(tiny_gpt(), tiny_gpt(), toy_pairs(4), DPOConfig(steps=1, batch_size=4), PAD, **kwargs)
    logged["rm"] = train_reward_model(RewardModel.from_gpt(tiny_gpt()), toy_pairs(4),
                                      RewardConfig(steps=1, batch_size=4), PAD, **kwargs)
    for name, history in logged.items():
        assert set(history[0]) <= set(METRICS), (name, set(history[0]) - set(METRICS))
    for name in ("grpo", "rloo", "ppo"):
        assert logged[name][0]["objective/kl"] == pytest.approx(0.0, abs=1e-6), name
    assert logged["grpo"][0]["kl"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_a_grpo_step_whose_groups_all_score_alike_moves_only_through_the_kl_term(beta):
    """All-equal rewards give A = 0 (TRL's frac_reward_zero_std = 1): the surrogate contributes nothing, and at
    the first step π = π_ref, so the k3 term's gradient is 0 too; the policy must not move at all."""
    policy, reference = tiny_gpt(), tiny_gpt()
    before = {n: p.data.copy() for n, p in policy.named_parameters()}
    cfg = GRPOConfig(steps=1, lr=1e-2, prompts_per_step=4, group_size=4, max_new_tokens=3, beta=beta)
    history = train_grpo(policy, reference, PROMPTS, lambda index, responses: [1.0] * len(responses), cfg, EOS, PAD,
                         progress=False)
    assert history[0]["frac_reward_zero_std"] == 1.0 and history[0]["grad_norm"] == pytest.approx(0.0, abs=1e-7)
    for n, p in policy.named_parameters():
        np.testing.assert_array_equal(p.data, before[n], err_msg=n)


def test_resume_after_a_save_killed_between_its_renames_continues_from_a_complete_checkpoint(tmp_path):
    """A kill between the checkpoint swap's two renames leaves only .checkpoint.old and .checkpoint.new; resume
    must finish that save and continue, not say that there is no checkpoint."""
    import os
    from minirlhf.checkpoint import _swap_names
    cfg = GRPOConfig(steps=2, lr=1e-2, prompts_per_step=2, group_size=2, max_new_tokens=3, checkpoint_every=1)
    straight = tiny_gpt()
    train_grpo(straight, tiny_gpt(), PROMPTS, first_token_is_good, cfg, EOS, PAD, progress=False)

    out = tmp_path / "run"
    first = tiny_gpt()
    train_grpo(first, tiny_gpt(), PROMPTS, first_token_is_good, GRPOConfig(**{**cfg.__dict__, "steps": 1}), EOS,
               PAD, out_dir=str(out), progress=False)
    checkpoint = str(out / "checkpoint")
    new, old = _swap_names(os.path.realpath(checkpoint))
    import shutil
    shutil.copytree(checkpoint, new)        # the new checkpoint, complete (here: the same step-1 state)
    os.rename(checkpoint, old)              # killed after the first rename
    resumed = tiny_gpt(seed=5)
    with pytest.warns(UserWarning, match="interrupted between its renames"):
        history = train_grpo(resumed, tiny_gpt(), PROMPTS, first_token_is_good, cfg, EOS, PAD, out_dir=str(out),
                             resume=True, progress=False)
    assert [m["step"] for m in history] == [2]
    for name, value in straight.state_dict().items():
        np.testing.assert_array_equal(resumed.state_dict()[name], value, err_msg=name)
