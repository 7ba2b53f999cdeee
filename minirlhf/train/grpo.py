"""GRPO: group relative policy optimisation with a rule-based reward (Shao et al. 2024, DeepSeekMath §4).

For each step:

    1. draw prompts x_1..x_P; sample a group of G responses per prompt from π_old (the current policy)
    2. score each response with the reward r (here: is the answer right?)
    3. advantages A_i = (r_i − mean_group r) / std_group r              (losses.grpo_advantages)
    4. log-probs of the sampled tokens under π_ref, once, without gradient
    5. for each epoch: ℓ = −min(ρ A, clip(ρ, 1−ε, 1+ε_high) A) + β k3(π ‖ π_ref), ρ = π/π_old   (losses.grpo_loss)
       then backward and an AdamW step

Options from the loss menu: ``advantage`` picks step 3's estimator (REINFORCE++-baseline, ReMax's
greedy baseline, pass@k); ``loss_type`` picks step 5's objective (grpo_loss's aggregations, or CISPO,
GMPO, SAPO, Clip-Cov, KL-Cov, GSPO); ``rollout_correction`` weights each token by
losses.rollout_correction_weights of the trainer's π_old against the sampler's log-probs;
``overlong_buffer`` adds DAPO's overlong penalty to the reward and ``dynamic_sampling`` drops the groups
whose rewards are all equal (DAPO).

There is no value network: the group is the baseline. A group whose answers all score the same
teaches nothing (A = 0) and only the KL term moves the policy there. π_old is the policy as it was
at the rollout, which is the policy of the first epoch's forward (no step has been taken yet): its
log-probs are that forward's, detached, and need no pass of their own.
"""
from dataclasses import dataclass

import numpy as np

from .. import losses
from ..rollout import response_logprobs, sample
from ..tensor import no_grad
from ..validation import is_nonnegative, is_nonnegative_int, is_positive, is_positive_int, require
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
    loss_type: str = "grpo"        # grpo | bnpo | dr_grpo | dapo (grpo_loss's aggregations, with the clip_eps above), or cispo | gmpo | sapo | clip_cov | kl_cov | gspo (their papers' clip settings)
    scale: str = "group"           # advantage scaling of "grpo" and "pass_at_k": group | batch | none (Dr. GRPO)
    advantage: str = "grpo"        # grpo | reinforce_pp_baseline | remax (greedy baseline) | pass_at_k (0/1 rewards)
    pass_k: int = 4                # the k of advantage pass_at_k, at most group_size
    rollout_correction: str = None # None | tis | tis_seq | mis | icepop: weights for the sampler's log-probs (losses.rollout_correction_weights)
    dynamic_sampling: bool = False # drop the groups whose rewards are all equal (DAPO)
    overlong_buffer: int = 0       # DAPO's overlong penalty over the last this many tokens before max_new_tokens (0: off)
    overlong_penalty: float = 1.0  # the overlong penalty at max_new_tokens

    def check(self):
        super().check()
        require(self, "prompts_per_step", is_positive_int, "a positive integer")
        require(self, "group_size", lambda v: is_positive_int(v) and v >= 2,
                "an integer >= 2 (a group of one has no baseline)")
        require(self, "epochs", is_positive_int, "a positive integer")
        require(self, "temperature", is_positive, "a finite number > 0")
        require(self, "max_new_tokens", is_positive_int, "a positive integer")
        objectives = losses.GRPO_LOSS_TYPES + tuple(losses.POLICY_OBJECTIVES)
        require(self, "loss_type", lambda v: v in objectives, f"one of {', '.join(objectives)}")
        require(self, "advantage", lambda v: v in ADVANTAGES, f"one of {', '.join(ADVANTAGES)}")
        require(self, "dynamic_sampling", lambda v: isinstance(v, bool), "true or false")
        require(self, "overlong_buffer", is_nonnegative_int, "a non-negative integer")
        require(self, "overlong_penalty", is_nonnegative, "a finite number >= 0")
        logp, old_logp, ref_logp, advantages, mask = one_token_batch()
        require(self, "rollout_correction", lambda v: v is None or v in losses.ROLLOUT_CORRECTIONS,
                f"None or one of {', '.join(losses.ROLLOUT_CORRECTIONS)}")
        if self.rollout_correction is not None:
            check_with(self, losses.rollout_correction_weights, logp, logp, mask, self.rollout_correction)
            require(self, "rollout_correction", lambda v: self.loss_type not in ("gspo", "gmpo"),
                    f"None with loss_type {self.loss_type!r} (one ratio per sequence, no per-token weights)")
            advantages = np.zeros((1, 1))
        if self.loss_type in losses.POLICY_OBJECTIVES:
            check_with(self, losses.POLICY_OBJECTIVES[self.loss_type], logp, old_logp, ref_logp, advantages, mask,
                       beta=self.beta)
        else:
            check_with(self, losses.grpo_loss, logp, old_logp, ref_logp, advantages, mask, beta=self.beta,
                       clip_eps=self.clip_eps, clip_eps_high=self.clip_eps_high, loss_type=self.loss_type)
        check_with(self, losses.grpo_advantages, np.zeros(2), 2, scale=self.scale)
        if self.advantage == "pass_at_k":
            check_with(self, losses.pass_at_k_advantages, np.zeros(self.group_size), self.group_size, self.pass_k,
                       scale=self.scale)
        if self.overlong_buffer:
            check_with(self, losses.overlong_penalty, [1], self.max_new_tokens, self.overlong_buffer,
                       self.overlong_penalty)


ADVANTAGES = ("grpo", "reinforce_pp_baseline", "remax", "pass_at_k")


def step_rewards(reward_fn, rollout, config):
    """The rule reward of each response, with DAPO's overlong penalty when ``overlong_buffer`` is set."""
    rewards = np.asarray(reward_fn(rollout.index, rollout.responses()), dtype=np.float32)
    if config.overlong_buffer:
        rewards += losses.overlong_penalty(rollout.lengths(), config.max_new_tokens, config.overlong_buffer,
                                           config.overlong_penalty).astype(np.float32)
    return rewards


def informative_rows(batch, rewards, group_size):
    """DAPO's dynamic sampling: the rows of the groups whose rewards are not all equal (every row when
    no group qualifies: the step then moves the policy by the KL term alone)."""
    keep = np.flatnonzero(losses.informative_groups(rewards, group_size))
    return (batch.rows(keep), rewards[keep]) if keep.size else (batch, rewards)


def step_advantages(policy, prompts, batch, rewards, reward_fn, config, eos_id, pad_id):
    """Step 3 with the estimator ``config.advantage`` names; ReMax samples each prompt's greedy response."""
    G = config.group_size
    if config.advantage == "reinforce_pp_baseline":
        return losses.reinforce_pp_baseline_advantages(rewards, G)
    if config.advantage == "pass_at_k":
        return losses.pass_at_k_advantages(rewards, G, config.pass_k, scale=config.scale)
    if config.advantage == "remax":
        greedy = sample(policy, prompts, batch.index[::G], 1, 0.0, config.max_new_tokens, eos_id, pad_id, seed=0)
        return losses.remax_advantages(rewards, np.repeat(step_rewards(reward_fn, greedy, config), G))
    return losses.grpo_advantages(rewards, G, scale=config.scale)


# objectives that average over the batch's tokens: a rank's loss enters the sum with its share of the tokens
TOKEN_MEANS = ("bnpo", "dapo", "cispo")


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
        rewards = step_rewards(reward_fn, batch, config)
        sampled = rollout_metrics(batch, rewards, config.group_size)
        if config.dynamic_sampling:
            batch, rewards = informative_rows(batch, rewards, config.group_size)
        advantages = step_advantages(policy, prompts, batch, rewards, reward_fn, config, eos_id, pad_id)
        rows = run.split(len(batch), config.group_size)
        mine = batch.rows(rows)  # this rank's prompt groups (all of them in one process)
        advantages = advantages.data[rows]
        tokens = float(mine.mask.sum())
        weight = tokens / float(batch.mask.sum()) if config.loss_type in TOKEN_MEANS else len(mine) / len(batch)
        ref_logp = None
        if config.beta != 0:
            with no_grad():
                ref_logp = response_logprobs(reference, mine).data
        old_logp = None  # the first epoch's log-probs: the policy has not moved since the rollout yet
        for _ in range(config.epochs):
            logp, entropy = response_logprobs(policy, mine, entropy=True)
            if old_logp is None:
                old_logp = logp.data
            A = advantages
            if config.rollout_correction is not None:
                A = advantages[:, None] * losses.rollout_correction_weights(
                    old_logp, mine.logprobs, mine.mask, config.rollout_correction).data
            if config.loss_type in losses.POLICY_OBJECTIVES:
                loss, stats = losses.POLICY_OBJECTIVES[config.loss_type](logp, old_logp, ref_logp, A, mine.mask,
                                                                         beta=config.beta)
            else:
                loss, stats = losses.grpo_loss(logp, old_logp, ref_logp, A, mine.mask, beta=config.beta,
                                               clip_eps=config.clip_eps, clip_eps_high=config.clip_eps_high,
                                               loss_type=config.loss_type)
            grad_norm = run.optimizer_step(loss, weight)
        token_means = {"entropy": float(entropy), **clip_metrics(stats)}
        if "kl" in stats:
            token_means["kl"] = float(stats["kl"])
        metrics = {"loss": run.loss, **sampled,
                   **run.mean(kl_metrics(old_logp, ref_logp, mine.mask), len(mine)), **run.mean(token_means, tokens),
                   "learning_rate": lr, "grad_norm": grad_norm}
        run.end_step(step, metrics, shown=("reward", "kl") if "kl" in metrics else ("reward",))
    return run.history
