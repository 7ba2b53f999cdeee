"""DPO: direct preference optimisation (Rafailov et al. 2023), offline on preference pairs.

    L = −mean log σ(β [log π(y_w|x)/π_ref(y_w|x) − log π(y_l|x)/π_ref(y_l|x)])        (eq. 7)

The reference log-probs log π_ref(y|x) never change, so they are computed once, before training.
Each step: draw pairs, sequence log-probs of chosen and rejected under π in one pass (a pair's
prompt computed once for both responses), the loss (losses.dpo_loss, where β·h is formed), a step.
The implicit rewards β log π/π_ref are logged: their margin (chosen − rejected) and the share of
pairs where the chosen one's is higher.
"""
from dataclasses import dataclass

import numpy as np

from .. import losses
from ..rollout import from_pairs, sequence_logprobs
from ..tensor import no_grad
from ..validation import is_positive_int, require
from .config import TrainConfig, check_with
from .run import PAIRS, Run, check_not_empty, draw_rows


@dataclass
class DPOConfig(TrainConfig):
    steps: int = 400
    lr: float = 1e-4
    batch_size: int = 64           # pairs per step
    beta: float = 0.5              # β: the KL weight; the implicit reward is β log π/π_ref
    loss_type: str = "sigmoid"     # sigmoid | ipo | hinge | robust | cdpo (see losses.dpo_loss)
    label_smoothing: float = 0.0   # ε, the assumed label-flip rate (robust and cdpo only)

    def check(self):
        super().check()
        require(self, "batch_size", is_positive_int, "a positive integer")
        zero = np.zeros(1)
        check_with(self, losses.dpo_loss, zero, zero, zero, zero, beta=self.beta, loss_type=self.loss_type,
                   label_smoothing=self.label_smoothing)


def pair_logprobs(model, pairs, pad_id):
    """(log π(y_w|x), log π(y_l|x)), each (B,), from one pass over chosen and rejected rows (each pair's
    prompt computed once)."""
    logp = sequence_logprobs(model, from_pairs(pairs, pad_id))
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
    run = Run("dpo", policy, config, out_dir, resume, log, progress)
    for step in run.steps():
        lr = run.lr
        drawn = draw_rows(len(pairs), config.batch_size, config.seed, step, PAIRS)
        picked = drawn[run.split(len(drawn))]  # this rank's pairs (all of them in one process)
        pi_chosen, pi_rejected = pair_logprobs(policy, [pairs[i] for i in picked], pad_id)
        loss, chosen_rewards, rejected_rewards = losses.dpo_loss(
            pi_chosen, pi_rejected, ref_chosen[picked], ref_rejected[picked], beta=config.beta,
            loss_type=config.loss_type, label_smoothing=config.label_smoothing)
        grad_norm = run.optimizer_step(loss, len(picked) / len(drawn))
        margin = chosen_rewards.data - rejected_rewards.data
        run.end_step(step, {"loss": run.loss, **run.mean({
                            "rewards/chosen": float(chosen_rewards.data.mean()),
                            "rewards/rejected": float(rejected_rewards.data.mean()),
                            "rewards/margins": float(margin.mean()), "rewards/accuracies": float((margin > 0).mean()),
                            "logps/chosen": float(pi_chosen.data.mean()),
                            "logps/rejected": float(pi_rejected.data.mean())}, len(picked)),
                            "learning_rate": lr, "grad_norm": grad_norm}, shown=("loss", "rewards/margins"))
    return run.history
