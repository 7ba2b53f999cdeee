"""REINFORCE with a leave-one-out baseline (RLOO; Kool et al. 2019, Ahmadian et al. 2024): the plain
policy gradient, for comparison with PPO and GRPO.

For each step:

    1. draw prompts; sample k responses per prompt from the current policy
    2. score them: R_i = r(x, y_i) − β · Σ_t log(π(y_it)/π_ref(y_it))     (the rule reward, KL-shaped)
    3. baseline b_i = mean of the other k−1 returns of the same prompt
    4. one gradient step on L = −mean_i (R_i − b_i) · log π(y_i | x)     (losses.reinforce_loss)

No clipping, no ratio, no value network: every rollout is used for exactly one on-policy step.
"""
from dataclasses import dataclass

import numpy as np

from .. import losses
from ..tensor import no_grad
from .common import (TrainConfig, begin_run, check_not_empty, is_positive, is_positive_int, maybe_checkpoint,
                     optimizer_step, require, response_logprobs, step_rollout)


@dataclass
class RLOOConfig(TrainConfig):
    lr: float = 1e-4
    prompts_per_step: int = 16
    group_size: int = 8            # k samples per prompt
    beta: float = 0.04             # KL coefficient in the return
    temperature: float = 1.0
    max_new_tokens: int = 8

    def check(self):
        super().check()
        require(self, "prompts_per_step", is_positive_int, "a positive integer")
        require(self, "group_size", lambda v: is_positive_int(v) and v >= 2,
                "an integer >= 2 (leave-one-out needs another sample)")
        require(self, "beta", is_positive, "> 0")
        require(self, "temperature", is_positive, "> 0")
        require(self, "max_new_tokens", is_positive_int, "a positive integer")


def train_rloo(policy, reference, prompts, reward_fn, config, eos_id, pad_id, out_dir=None, resume=False,
               log=None, progress=True):
    """Train ``policy`` in place with RLOO; arguments as :func:`minirlhf.train.grpo.train_grpo`."""
    check_not_empty(prompts, "prompts", "train_rloo")
    optimizer, start, _, write, bar = begin_run("train_rloo", "rloo", policy, config, out_dir, resume, log,
                                                progress)
    history = []
    for step in range(start, config.steps):
        batch = step_rollout(policy, prompts, config, step, config.group_size, eos_id, pad_id)
        scores = np.asarray(reward_fn(batch.index, batch.responses()), dtype=np.float32)
        args = batch.inputs
        logp = response_logprobs(policy, *args)
        with no_grad():
            ref_logp = response_logprobs(reference, *args).data
        kl = (losses.kl_estimate(logp.data, ref_logp, "k1").data * batch.mask).sum(axis=1)
        returns = scores - config.beta * kl
        loss = losses.reinforce_loss(logp, returns, batch.mask, baseline="rloo", group_size=config.group_size)
        grad_norm = optimizer_step(policy, optimizer, loss, config.clip)
        metrics = {"step": step + 1, "reward": float(scores.mean()), "loss": float(loss.item()),
                   "kl": float(kl.mean()), "grad_norm": grad_norm,
                   "response_length": float(batch.mask.sum(axis=1).mean())}
        history.append(metrics)
        write(metrics)
        bar.update(step + 1, reward=metrics["reward"], kl=metrics["kl"])
        maybe_checkpoint(out_dir, policy, optimizer, step + 1, config)
    return history
