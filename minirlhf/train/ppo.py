"""PPO for RLHF (Ziegler et al. 2019; Ouyang et al. 2022; the PPO lecture), with a learned reward model.

For each step:

    1. draw prompts; sample one response per prompt from π_old (the current policy)
    2. score: s = r_φ(x, y), the reward model's score of the whole response
    3. log-probs and values without gradient: log π_old(y_t), log π_ref(y_t), V_old(s_t)
    4. per-token rewards r_t = −β log(π_old/π_ref)(y_t) + [t last] · s          (losses.kl_penalty)
    5. advantages and returns by GAE(γ, λ) over the response tokens, advantages whitened  (losses.gae)
    6. for each epoch and minibatch:  L = clipped surrogate(ρ, A) + c_v · clipped value loss
       (losses.ppo_policy_loss, losses.ppo_value_loss), ρ = π/π_old; backward, step
    7. with ``adaptive_kl``, move β toward the target KL (losses.AdaptiveKLController)

The policy and the value function share the trunk: the policy model carries a value head.
"""
from dataclasses import dataclass

import numpy as np

from .. import functional as F
from .. import losses
from ..model import GPT
from ..tensor import no_grad
from .common import (TrainConfig, begin_run, check_not_empty, is_clip_eps, is_number, is_positive,
                     is_positive_int, maybe_checkpoint, optimizer_step, require, response_logits,
                     response_logprobs, step_rollout)
from .reward import score_sequences


@dataclass
class PPOConfig(TrainConfig):
    lr: float = 5e-5
    prompts_per_step: int = 64     # rollouts per step (one response per prompt)
    epochs: int = 4                # passes over each rollout batch
    minibatches: int = 2           # minibatches per pass
    beta: float = 0.05             # KL coefficient (the initial one with adaptive_kl)
    adaptive_kl: bool = False
    kl_target: float = 1.0         # nats per response, for adaptive_kl
    kl_horizon: int = 10000        # samples, for adaptive_kl
    clip_eps: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    temperature: float = 1.0
    max_new_tokens: int = 8

    def check(self):
        super().check()
        for name in ("prompts_per_step", "epochs", "minibatches", "max_new_tokens", "kl_horizon"):
            require(self, name, is_positive_int, "a positive integer")
        require(self, "minibatches", lambda v: v <= self.prompts_per_step, f"<= prompts_per_step "
                f"({self.prompts_per_step})")
        for name in ("beta", "kl_target", "value_clip", "temperature"):
            require(self, name, is_positive, "> 0")
        require(self, "adaptive_kl", lambda v: isinstance(v, bool), "true or false")
        require(self, "clip_eps", is_clip_eps, "in (0, 1)")
        require(self, "vf_coef", lambda v: is_number(v) and v >= 0, ">= 0")
        for name in ("gamma", "lam"):
            require(self, name, lambda v: is_number(v) and 0 <= v <= 1, "in [0, 1]")


def with_value_head(model):
    """A copy of ``model`` that also predicts values V(s_t); the value head starts at the GPT-2 init."""
    policy = GPT(model.config, value_head=True)
    policy.load_state_dict(model.state_dict(), strict=False)
    return policy


def whiten(x, mask):
    """(x − mean) / std over the masked-in entries: advantages on one scale whatever the reward's."""
    m = mask > 0
    mean, std = x[m].mean(), x[m].std()
    return np.where(m, (x - mean) / (std + 1e-8), 0.0).astype(x.dtype)


def reward_model_scores(reward_model, batch):
    ids = np.concatenate([batch.prompt_ids, batch.tokens], axis=1)
    mask = np.concatenate([batch.prompt_mask, batch.mask], axis=1)
    response = np.concatenate([np.zeros_like(batch.prompt_mask), batch.mask], axis=1)
    return score_sequences(reward_model, ids, mask, response)


def train_ppo(policy, reference, reward_model, prompts, config, eos_id, pad_id, out_dir=None, resume=False,
              log=None, progress=True):
    """Train ``policy`` (a GPT with a value head, see :func:`with_value_head`) in place; returns the metrics.

    reference: the frozen SFT model; reward_model: a trained RewardModel; prompts: prompt token lists.
    """
    check_not_empty(prompts, "prompts", "train_ppo")
    if policy.value_head is None:
        raise ValueError("train_ppo: policy needs a value head; pass with_value_head(model)")
    optimizer, start, extra, write, bar = begin_run("train_ppo", "ppo", policy, config, out_dir, resume, log,
                                                    progress)
    kl_control = losses.AdaptiveKLController(extra.get("beta", config.beta), config.kl_target, config.kl_horizon)
    history = []
    for step in range(start, config.steps):
        beta = kl_control.beta if config.adaptive_kl else config.beta
        batch = step_rollout(policy, prompts, config, step, 1, eos_id, pad_id)
        scores = reward_model_scores(reward_model, batch)
        args = batch.inputs
        with no_grad():
            logits, old_values = response_logits(policy, *args, return_values=True)
            old_logp = F.token_logprobs(logits, batch.tokens).data * batch.mask
            old_values = old_values.data * batch.mask
            ref_logp = response_logprobs(reference, *args).data
        rewards = losses.kl_penalty(old_logp, ref_logp, batch.mask, scores, beta).data
        advantages, returns = losses.gae(rewards, old_values, batch.mask, gamma=config.gamma, lam=config.lam)
        advantages = whiten(advantages.data, batch.mask)
        rng = np.random.default_rng([config.seed, step, 1])
        for _ in range(config.epochs):
            for rows in np.array_split(rng.permutation(len(batch.index)), config.minibatches):
                mb = (a[rows] for a in args)
                logits, values = response_logits(policy, *mb, return_values=True)
                logp = F.token_logprobs(logits, batch.tokens[rows])
                policy_loss, stats = losses.ppo_policy_loss(logp, old_logp[rows], advantages[rows],
                                                            batch.mask[rows], clip_eps=config.clip_eps)
                value_loss = losses.ppo_value_loss(values, old_values[rows], returns.data[rows], batch.mask[rows],
                                                   clip_eps=config.value_clip)
                grad_norm = optimizer_step(policy, optimizer, policy_loss + config.vf_coef * value_loss, config.clip)
        kl = float(((old_logp - ref_logp) * batch.mask).sum(axis=1).mean())
        if config.adaptive_kl:
            kl_control.update(kl, len(batch.index))
        metrics = {"step": step + 1, "reward": float(scores.mean()), "kl": kl, "beta": beta,
                   "policy_loss": float(policy_loss.item()), "value_loss": float(value_loss.item()),
                   "clip_fraction": float(stats["clip_fraction"]), "grad_norm": grad_norm,
                   "response_length": float(batch.mask.sum(axis=1).mean())}
        history.append(metrics)
        write(metrics)
        bar.update(step + 1, reward=metrics["reward"], kl=kl)
        maybe_checkpoint(out_dir, policy, optimizer, step + 1, config, extra={"beta": kl_control.beta})
    return history
