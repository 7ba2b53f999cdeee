"""DPO: direct preference optimisation (Rafailov et al. 2023), offline on preference pairs.

    L = −mean log σ(β [log π(y_w|x)/π_ref(y_w|x) − log π(y_l|x)/π_ref(y_l|x)])        (eq. 7)

The reference log-probs log π_ref(y|x) never change, so they are computed once, before training.
Each step: draw pairs, sequence log-probs of chosen and rejected under π in one forward pass,
the loss (losses.dpo_loss), a step. The implicit rewards β log π/π_ref are logged: their margin
(chosen − rejected) and the share of pairs where the chosen one's is higher (the accuracy).
"""
from dataclasses import dataclass

import numpy as np

from .. import losses
from ..model import pad_batch
from ..tensor import no_grad
from .common import (TrainConfig, begin_run, check_not_empty, is_positive, is_positive_int, maybe_checkpoint,
                     optimizer_step, pad_responses, require, sequence_logprobs)


@dataclass
class DPOConfig(TrainConfig):
    lr: float = 1e-4
    batch_size: int = 32           # pairs per step
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0

    def check(self):
        super().check()
        require(self, "batch_size", is_positive_int, "a positive integer")
        require(self, "beta", is_positive, "> 0")
        require(self, "loss_type", lambda v: v in losses.DPO_LOSS_TYPES, f"one of {losses.DPO_LOSS_TYPES}")
        require(self, "label_smoothing", lambda v: 0 <= v < 0.5, "in [0, 0.5)")


def pair_logprobs(model, pairs, pad_id):
    """(log π(y_w|x), log π(y_l|x)), each (B,), from one forward pass over chosen and rejected rows."""
    prompt_ids, prompt_mask = pad_batch([p for p, _, _ in pairs] * 2, pad_id, side="left")
    tokens, mask = pad_responses([c for _, c, _ in pairs] + [r for _, _, r in pairs], pad_id)
    logp = sequence_logprobs(model, prompt_ids, prompt_mask, tokens, mask)
    B = len(pairs)
    return logp[:B], logp[B:]


def reference_logprobs(reference, pairs, pad_id, rows=256):
    """log π_ref of every chosen and rejected response, (N,) each, computed once without gradient."""
    chosen, rejected = [], []
    with no_grad():
        for s in range(0, len(pairs), rows):
            c, r = pair_logprobs(reference, pairs[s:s + rows], pad_id)
            chosen.append(c.data)
            rejected.append(r.data)
    return np.concatenate(chosen), np.concatenate(rejected)


def train_dpo(policy, reference, pairs, config, pad_id, out_dir=None, resume=False, log=None, progress=True):
    """Train ``policy`` in place on ``pairs`` of (prompt, chosen, rejected) token lists; returns the metrics."""
    check_not_empty(pairs, "pairs", "train_dpo")
    ref_chosen, ref_rejected = reference_logprobs(reference, pairs, pad_id)
    optimizer, start, _, write, bar = begin_run("train_dpo", "dpo", policy, config, out_dir, resume, log,
                                                progress)
    history = []
    for step in range(start, config.steps):
        picked = np.random.default_rng([config.seed, step]).choice(len(pairs), min(config.batch_size, len(pairs)),
                                                                   replace=False)
        pi_chosen, pi_rejected = pair_logprobs(policy, [pairs[i] for i in picked], pad_id)
        loss, chosen_rewards, rejected_rewards = losses.dpo_loss(
            pi_chosen, pi_rejected, ref_chosen[picked], ref_rejected[picked], beta=config.beta,
            loss_type=config.loss_type, label_smoothing=config.label_smoothing)
        grad_norm = optimizer_step(policy, optimizer, loss, config.clip)
        margin = chosen_rewards.data - rejected_rewards.data
        metrics = {"step": step + 1, "loss": float(loss.item()), "reward_margin": float(margin.mean()),
                   "reward_accuracy": float((margin > 0).mean()), "chosen_reward": float(chosen_rewards.data.mean()),
                   "rejected_reward": float(rejected_rewards.data.mean()), "grad_norm": grad_norm}
        history.append(metrics)
        write(metrics)
        bar.update(step + 1, loss=metrics["loss"], margin=metrics["reward_margin"])
        maybe_checkpoint(out_dir, policy, optimizer, step + 1, config)
    return history
