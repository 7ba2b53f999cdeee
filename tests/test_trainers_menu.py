"""The loss menu's trainer options (minirlhf/train/grpo.py, ppo.py) on the toy problem of
test_trainers.py: each option runs, does what it names, and a config refuses what its loss refuses."""
import numpy as np
import pytest

from minirlhf import Tensor, losses
from minirlhf.train import grpo as grpo_module
from minirlhf.train.grpo import GRPOConfig, train_grpo
from minirlhf.train.ppo import PPOConfig, train_ppo, with_value_head
from test_trainers import EOS, PAD, PROMPTS, FirstTokenRewardModel, first_token_is_good, tiny_gpt

SMALL = dict(steps=2, lr=1e-2, prompts_per_step=2, group_size=4, max_new_tokens=3, beta=0.01)


def grpo(reward=first_token_is_good, **options):
    cfg = GRPOConfig(**{**SMALL, **options})
    return train_grpo(tiny_gpt(), tiny_gpt(), PROMPTS, reward, cfg, EOS, PAD, progress=False)


@pytest.mark.parametrize("loss_type", sorted(losses.POLICY_OBJECTIVES))
def test_grpo_trains_with_every_policy_objective(loss_type):
    history = grpo(loss_type=loss_type, epochs=2)
    assert all(np.isfinite(h["loss"]) and np.isfinite(h["grad_norm"]) for h in history)


@pytest.mark.parametrize("advantage", ["reinforce_pp_baseline", "remax", "pass_at_k"])
def test_grpo_trains_with_every_advantage_estimator(advantage):
    history = grpo(advantage=advantage, pass_k=2)
    assert all(np.isfinite(h["loss"]) for h in history)


def test_pass_at_k_advantage_needs_binary_rewards_at_run_time():
    with pytest.raises(ValueError, match="pass@k needs 0/1"):
        grpo(reward=lambda index, responses: [0.5] * len(responses), advantage="pass_at_k", pass_k=2)


@pytest.mark.parametrize("mode", losses.ROLLOUT_CORRECTIONS)
def test_rollout_correction_changes_almost_nothing_when_the_sampler_is_the_trainer(mode):
    """Our sampler and trainer are the same model, so every weight is 1 up to float32 rounding of
    the KV-cache forward against the full one."""
    plain, corrected = grpo(steps=1), grpo(steps=1, rollout_correction=mode)
    assert corrected[0]["loss"] == pytest.approx(plain[0]["loss"], abs=1e-4)


def test_ppo_trains_with_rollout_correction():
    cfg = PPOConfig(steps=2, lr=1e-2, prompts_per_step=4, max_new_tokens=3, rollout_correction="tis")
    history = train_ppo(with_value_head(tiny_gpt()), tiny_gpt(), FirstTokenRewardModel(3), [PROMPTS[0]] * 4, cfg,
                        EOS, PAD, progress=False)
    assert all(np.isfinite(h["loss/policy_avg"]) for h in history)


def test_overlong_penalty_is_added_to_the_reward_the_trainer_logs():
    history = grpo(reward=lambda index, responses: [0.0] * len(responses), overlong_buffer=3, overlong_penalty=1.0)
    for h in history:  # L_max − L_cache = 0: every response is penalised by its length / 3
        assert h["reward"] == pytest.approx(-h["completions/mean_length"] / 3, rel=1e-6)


def test_dynamic_sampling_trains_only_on_groups_whose_rewards_differ():
    seen = []

    def reward(index, responses):  # the first group always agrees (it must be dropped), the second never
        return [1.0] * 4 + [float(i % 2) for i in range(len(responses) - 4)]

    def recording(policy_loss):
        def wrapped(logp, old_logp, ref_logp, advantages, mask, **kw):
            seen.append(logp.shape[0])
            return policy_loss(logp, old_logp, ref_logp, advantages, mask, **kw)
        return wrapped

    cfg = GRPOConfig(**{**SMALL, "loss_type": "cispo", "dynamic_sampling": True, "steps": 3})
    original = losses.POLICY_OBJECTIVES["cispo"]
    losses.POLICY_OBJECTIVES["cispo"] = recording(original)
    try:
        history = train_grpo(tiny_gpt(), tiny_gpt(), PROMPTS, reward, cfg, EOS, PAD, progress=False)
    finally:
        losses.POLICY_OBJECTIVES["cispo"] = original
    assert len(seen) == len(history) == 3
    assert seen == [4, 4, 4]
    assert all(h["frac_reward_zero_std"] == 0.5 for h in history)  # measured on the sampled batch, before dropping


@pytest.mark.parametrize("options, message", [
    ({"loss_type": "ppo"}, "loss_type must be one of .*cispo"),
    ({"advantage": "gae"}, "advantage must be one of grpo, reinforce_pp_baseline, remax, pass_at_k"),
    ({"advantage": "pass_at_k", "pass_k": 5}, r"k: must be an integer in \[1, 4\]"),
    ({"advantage": "pass_at_k", "scale": "batch"}, "scale.*'group', 'none'"),
    ({"rollout_correction": "is"}, "rollout_correction must be None or one of tis"),
    ({"rollout_correction": "tis", "loss_type": "gspo"}, "rollout_correction must be None with loss_type 'gspo'"),
    ({"overlong_buffer": 4}, r"buffer_length: must be an integer in \[1, 3\]"),
    ({"overlong_buffer": 2, "overlong_penalty": -1.0}, "overlong_penalty must be a finite number >= 0"),
    ({"dynamic_sampling": 1}, "dynamic_sampling must be true or false"),
])
def test_grpo_config_refuses_what_its_losses_refuse(options, message):
    with pytest.raises(ValueError, match="GRPOConfig: " + message):
        GRPOConfig(**{**SMALL, **options})


def test_ppo_config_refuses_an_unknown_rollout_correction():
    with pytest.raises(ValueError, match="PPOConfig: rollout_correction must be None or one of tis"):
        PPOConfig(rollout_correction="truncate")


def record_losses_and_passes(monkeypatch, loss_name, trainer_module):
    """Spy on ``losses.<loss_name>`` (each call's logp and π_old, copied) and on the trainer module's
    ``response_logprobs`` (the model of each pass); returns the two lists they fill."""
    seen, passes = [], []
    real_loss, real_forward = getattr(losses, loss_name), trainer_module.response_logprobs

    def loss(logp, old_logp, *args, **kwargs):
        if isinstance(logp, Tensor):  # not the config's check on a one-token batch
            seen.append((logp.data.copy(), np.array(old_logp, copy=True)))
        return real_loss(logp, old_logp, *args, **kwargs)

    def forward(model, *args, **kwargs):
        passes.append(model)
        return real_forward(model, *args, **kwargs)
    monkeypatch.setattr(losses, loss_name, loss)
    monkeypatch.setattr(trainer_module, "response_logprobs", forward)
    return seen, passes


@pytest.mark.parametrize("minibatches, policy_passes", [(1, 3), (2, 1 + 3 * 2)])
def test_ppo_with_one_minibatch_takes_pi_old_from_the_first_updates_forward(monkeypatch, minibatches,
                                                                            policy_passes):
    """With one minibatch the first update's forward is the policy of the rollout: detached it is π_old
    and V_old (the first ratio exactly 1), and no pass of its own is made; with more minibatches the
    policy moves within the epoch, so π_old has its own pass before the updates."""
    from minirlhf.train import ppo as ppo_module
    seen, passes = record_losses_and_passes(monkeypatch, "ppo_policy_loss", ppo_module)
    policy = with_value_head(tiny_gpt())
    cfg = PPOConfig(steps=1, lr=1e-2, prompts_per_step=4, epochs=3, minibatches=minibatches, max_new_tokens=3)
    train_ppo(policy, tiny_gpt(), FirstTokenRewardModel(3), [p for p in PROMPTS if len(p) == 3][:4], cfg, EOS, PAD,
              progress=False)
    on_policy = sum(model is policy for model in passes)
    assert on_policy == policy_passes and len(passes) - on_policy == 1  # and the reference's one pass
    assert len(seen) == 3 * minibatches
    if minibatches == 1:
        (first_logp, first_old), *later = seen
        np.testing.assert_array_equal(first_old, first_logp)
        for logp, old in later:  # each epoch draws its own order of the rows
            assert sorted(map(tuple, old.tolist())) == sorted(map(tuple, first_old.tolist()))
            assert sorted(map(tuple, logp.tolist())) != sorted(map(tuple, first_logp.tolist()))


def test_grpo_old_logprobs_are_the_policy_at_the_rollout_in_every_epoch(monkeypatch):
    """π_old is the first epoch's forward, detached (no step has been taken yet): the first ratio is
    exactly 1, and later epochs keep that π_old while π moves."""
    seen, passes = record_losses_and_passes(monkeypatch, "grpo_loss", grpo_module)
    grpo(steps=1, epochs=3)
    assert len(seen) == 3
    assert len(passes) == 3 + 1  # one per epoch and the reference's: π_old needs no pass of its own
    (first_logp, first_old), *later = seen
    np.testing.assert_array_equal(first_old, first_logp)
    for logp, old in later:
        np.testing.assert_array_equal(old, first_old)
        assert np.abs(logp - first_logp).max() > 0
