"""GRPO: group relative policy optimisation with a rule-based reward (Shao et al. 2024, DeepSeekMath §4).

For each step:

    1. draw prompts x_1..x_P; sample a group of G responses per prompt from π_old (the current policy)
    2. score each response with the reward r (here: is the answer right?)
    3. advantages A_i = (r_i − mean_group r) / std_group r              (losses.grpo_advantages)
    4. log-probs of the sampled tokens under π_old and π_ref, once, without gradient
    5. for each epoch: ℓ = −min(ρ A, clip(ρ, 1−ε, 1+ε) A) + β k3(π ‖ π_ref), ρ = π/π_old   (losses.grpo_loss)
       then backward and an AdamW step

There is no value network: the group is the baseline. A group whose answers all score the same
teaches nothing (A = 0) and only the KL term moves the policy there.
"""
from dataclasses import dataclass

import numpy as np

from .. import losses
from ..tensor import no_grad
from .common import (TrainConfig, begin_run, check_not_empty, is_clip_eps, is_positive, is_positive_int,
                     maybe_checkpoint, optimizer_step, require, response_logprobs, step_rollout)


@dataclass
class GRPOConfig(TrainConfig):
    lr: float = 1e-4
    prompts_per_step: int = 16
    group_size: int = 8            # G responses per prompt
    beta: float = 0.04             # weight of the k3 KL to the reference
    clip_eps: float = 0.2
    epochs: int = 1                # optimisation passes over each rollout batch
    temperature: float = 1.0
    max_new_tokens: int = 8
    loss_type: str = "grpo"
    scale: str = "group"           # advantage scaling: "group" | "batch" | "none" (Dr. GRPO)

    def check(self):
        super().check()
        require(self, "prompts_per_step", is_positive_int, "a positive integer")
        require(self, "group_size", lambda v: is_positive_int(v) and v >= 2,
                "an integer >= 2 (a group of one has no baseline)")
        require(self, "beta", is_positive, "> 0")
        require(self, "clip_eps", is_clip_eps, "in (0, 1)")
        require(self, "epochs", is_positive_int, "a positive integer")
        require(self, "temperature", is_positive, "> 0")
        require(self, "max_new_tokens", is_positive_int, "a positive integer")
        require(self, "loss_type", lambda v: v in losses.GRPO_LOSS_TYPES, f"one of {losses.GRPO_LOSS_TYPES}")
        require(self, "scale", lambda v: v in ("group", "batch", "none"), "one of ('group', 'batch', 'none')")


def train_grpo(policy, reference, prompts, reward_fn, config, eos_id, pad_id, out_dir=None, resume=False,
               log=None, progress=True):
    """Train ``policy`` in place with GRPO; returns the per-step metrics.

    prompts: list of prompt token lists; reward_fn(index, responses) -> rewards, where ``index[i]``
    is the prompt that response i (a token list) answers; reference: the frozen SFT model.
    Checkpoints go to ``out_dir/checkpoint``; ``resume=True`` continues from there.
    """
    check_not_empty(prompts, "prompts", "train_grpo")
    optimizer, start, _, write, bar = begin_run("train_grpo", "grpo", policy, config, out_dir, resume, log,
                                                progress)
    history = []
    for step in range(start, config.steps):
        batch = step_rollout(policy, prompts, config, step, config.group_size, eos_id, pad_id)
        rewards = np.asarray(reward_fn(batch.index, batch.responses()), dtype=np.float32)
        advantages = losses.grpo_advantages(rewards, config.group_size, scale=config.scale)
        args = batch.inputs
        with no_grad():
            old_logp = response_logprobs(policy, *args).data
            ref_logp = response_logprobs(reference, *args).data
        for _ in range(config.epochs):
            logp = response_logprobs(policy, *args)
            loss, stats = losses.grpo_loss(logp, old_logp, ref_logp, advantages, batch.mask, beta=config.beta,
                                           clip_eps=config.clip_eps, loss_type=config.loss_type)
            grad_norm = optimizer_step(policy, optimizer, loss, config.clip)
        metrics = {"step": step + 1, "reward": float(rewards.mean()), "loss": float(loss.item()),
                   "kl": float(stats["kl"]), "clip_fraction": float(stats["clip_fraction"]),
                   "grad_norm": grad_norm, "response_length": float(batch.mask.sum(axis=1).mean())}
        history.append(metrics)
        write(metrics)
        bar.update(step + 1, reward=metrics["reward"], kl=metrics["kl"])
        maybe_checkpoint(out_dir, policy, optimizer, step + 1, config)
    return history
