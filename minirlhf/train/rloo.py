"""REINFORCE with a leave-one-out baseline (RLOO; Kool et al. 2019, Ahmadian et al. 2024): the plain
policy gradient, for comparison with PPO and GRPO.

For each step:

    1. draw prompts; sample k responses per prompt from the current policy
    2. score them: R_i = r(x, y_i) − β · Σ_t log(π(y_it)/π_ref(y_it))     (the rule reward, KL-shaped;
       losses.response_kl)
    3. baseline b_i = mean of the other k−1 returns of the same prompt
    4. one gradient step on L = −mean_i (R_i − b_i) · log π(y_i | x)     (losses.reinforce_loss)

No clipping, no ratio, no value network: every rollout is used for exactly one on-policy step.
"""
from dataclasses import dataclass

import numpy as np

from .. import losses
from ..rollout import response_logprobs
from ..tensor import no_grad
from ..validation import is_positive, is_positive_int, require
from .config import TrainConfig, check_with, one_token_batch
from .metrics import kl_metrics, rollout_metrics
from .run import Run, check_not_empty, step_rollout


@dataclass
class RLOOConfig(TrainConfig):
    steps: int = 300
    lr: float = 3e-4
    prompts_per_step: int = 16     # prompts drawn per step
    group_size: int = 8            # k samples per prompt
    beta: float = 0.04             # KL coefficient in the return
    temperature: float = 1.0       # sampling temperature (the log-probs use the same)
    max_new_tokens: int = 5        # longest response in tokens

    def check(self):
        super().check()
        require(self, "prompts_per_step", is_positive_int, "a positive integer")
        require(self, "group_size", lambda v: is_positive_int(v) and v >= 2,
                "an integer >= 2 (leave-one-out needs another sample)")
        require(self, "temperature", is_positive, "a finite number > 0")
        require(self, "max_new_tokens", is_positive_int, "a positive integer")
        logp, _, ref_logp, _, mask = one_token_batch()
        check_with(self, losses.kl_penalty, logp, ref_logp, mask, np.zeros(1), self.beta)


def train_rloo(policy, reference, prompts, reward_fn, config, eos_id, pad_id, out_dir=None, resume=False,
               log=None, progress=True):
    """Train ``policy`` in place with RLOO; arguments as :func:`minirlhf.train.grpo.train_grpo`."""
    check_not_empty(prompts, "prompts", "train_rloo")
    run = Run("rloo", policy, config, out_dir, resume, log, progress)
    for step in run.steps():
        lr = run.lr
        batch = step_rollout(policy, prompts, config, step, config.group_size, eos_id, pad_id)
        rows = run.split(len(batch), config.group_size)
        mine = batch.rows(rows)  # this rank's prompt groups (all of them in one process)
        scores = run.world.gather(np.asarray(reward_fn(mine.index, mine.responses()), dtype=np.float32))
        logp, entropy = response_logprobs(policy, mine, entropy=True)
        with no_grad():
            ref_logp = response_logprobs(reference, mine).data
        kl = losses.response_kl(logp.data, ref_logp, mine.mask, "k1").data
        returns = logp.xp.asarray(scores[rows]) - config.beta * kl  # the scores come from the host
        loss = losses.reinforce_loss(logp, returns, mine.mask, baseline="rloo", group_size=config.group_size)
        grad_norm = run.optimizer_step(loss, len(mine) / len(batch))
        run.end_step(step, {"loss": run.loss, **rollout_metrics(batch, scores, config.group_size),
                            **run.mean(kl_metrics(logp.data, ref_logp, mine.mask), len(mine)),
                            **run.mean({"entropy": float(entropy)}, float(mine.mask.sum())),
                            "learning_rate": lr, "grad_norm": grad_norm}, shown=("reward", "objective/kl"))
    return run.history
