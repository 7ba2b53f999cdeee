"""GRPO: group relative policy optimisation with a rule-based reward (Shao et al. 2024, DeepSeekMath §4).

For each step:

    1. draw prompts x_1..x_P; sample a group of G responses per prompt from π_old (the current policy)
    2. score each response with the reward r (here: is the answer right?)
    3. advantages A_i = (r_i − mean_group r) / std_group r              (losses.grpo_advantages)
    4. log-probs of the sampled tokens under π_ref, once, without gradient
    5. for each epoch: ℓ = −min(ρ A, clip(ρ, 1−ε, 1+ε_high) A) + β k3(π ‖ π_ref), ρ = π/π_old   (losses.grpo_loss)
       then backward and an AdamW step

There is no value network: the group is the baseline. A group whose answers all score the same
teaches nothing (A = 0) and only the KL term moves the policy there. With one epoch, π_old is the
policy itself: its log-probs are the first forward's, detached, and need no pass of their own.
"""
from dataclasses import dataclass

import numpy as np

from .. import losses
from ..rollout import response_logprobs
from ..tensor import no_grad
from ..validation import is_positive, is_positive_int, require
from .config import TrainConfig, check_with, one_token_batch
from .metrics import clip_metrics, kl_metrics, rollout_metrics
from .run import Run, check_not_empty, step_rollout


@dataclass
class GRPOConfig(TrainConfig):
    steps: int = 300
    lr: float = 3e-4
    prompts_per_step: int = 16     # prompts drawn per step
    group_size: int = 8            # G responses per prompt
    beta: float = 0.04             # weight of the k3 KL to the reference (0: no reference pass)
    clip_eps: float = 0.2          # lower clip: ρ >= 1 − clip_eps
    clip_eps_high: float = None    # upper clip: ρ <= 1 + clip_eps_high (DAPO's clip-higher; None: clip_eps)
    epochs: int = 1                # optimisation passes over each rollout batch
    temperature: float = 1.0       # sampling temperature (the log-probs use the same)
    max_new_tokens: int = 5        # longest response in tokens
    loss_type: str = "grpo"        # token aggregation: grpo | bnpo | dr_grpo | dapo (see losses.grpo_loss)
    scale: str = "group"           # advantage scaling: group | batch | none (Dr. GRPO)

    def check(self):
        super().check()
        require(self, "prompts_per_step", is_positive_int, "a positive integer")
        require(self, "group_size", lambda v: is_positive_int(v) and v >= 2,
                "an integer >= 2 (a group of one has no baseline)")
        require(self, "epochs", is_positive_int, "a positive integer")
        require(self, "temperature", is_positive, "a finite number > 0")
        require(self, "max_new_tokens", is_positive_int, "a positive integer")
        check_with(self, losses.grpo_loss, *one_token_batch(), beta=self.beta, clip_eps=self.clip_eps,
                   clip_eps_high=self.clip_eps_high, loss_type=self.loss_type)
        check_with(self, losses.grpo_advantages, np.zeros(2), 2, scale=self.scale)


def train_grpo(policy, reference, prompts, reward_fn, config, eos_id, pad_id, out_dir=None, resume=False,
               log=None, progress=True):
    """Train ``policy`` in place with GRPO; returns the per-step metrics.

    prompts: list of prompt token lists; reward_fn(index, responses) -> rewards, where ``index[i]``
    is the prompt that response i (a token list) answers; reference: the frozen SFT model.
    Checkpoints go to ``out_dir/checkpoint``; ``resume=True`` continues from there.
    """
    check_not_empty(prompts, "prompts", "train_grpo")
    run = Run("grpo", policy, config, out_dir, resume, log, progress)
    for step in run.steps():
        lr = run.lr
        batch = step_rollout(policy, prompts, config, step, config.group_size, eos_id, pad_id)
        rows = run.split(len(batch), config.group_size)
        mine = batch.rows(rows)  # this rank's prompt groups (all of them in one process)
        rewards = run.world.gather(np.asarray(reward_fn(mine.index, mine.responses()), dtype=np.float32))
        advantages = losses.grpo_advantages(rewards, config.group_size, scale=config.scale).data[rows]
        tokens = float(mine.mask.sum())
        weight = tokens / float(batch.mask.sum()) if config.loss_type in ("bnpo", "dapo") else len(mine) / len(batch)
        ref_logp = None
        if config.beta != 0:
            with no_grad():
                ref_logp = response_logprobs(reference, mine).data
        old_logp = None
        if config.epochs > 1:
            with no_grad():
                old_logp = response_logprobs(policy, mine).data
        for _ in range(config.epochs):
            logp, entropy = response_logprobs(policy, mine, entropy=True)
            if old_logp is None:
                old_logp = logp.data
            loss, stats = losses.grpo_loss(logp, old_logp, ref_logp, advantages, mine.mask, beta=config.beta,
                                           clip_eps=config.clip_eps, clip_eps_high=config.clip_eps_high,
                                           loss_type=config.loss_type)
            grad_norm = run.optimizer_step(loss, weight)
        token_means = {"entropy": float(entropy), **clip_metrics(stats)}
        if "kl" in stats:
            token_means["kl"] = float(stats["kl"])
        metrics = {"loss": run.loss, **rollout_metrics(batch, rewards, config.group_size),
                   **run.mean(kl_metrics(old_logp, ref_logp, mine.mask), len(mine)), **run.mean(token_means, tokens),
                   "learning_rate": lr, "grad_norm": grad_norm}
        run.end_step(step, metrics, shown=("reward", "kl") if "kl" in metrics else ("reward",))
    return run.history
