"""Reward model: a GPT with reward heads, trained on preference pairs with the Bradley-Terry loss
(Ouyang et al. 2022, eq. 1):

    L = −mean log σ(r(x, y_w) − r(x, y_l))

For each step: draw a batch of pairs, score chosen and rejected responses in one forward pass
(per-token scores of the response plus a head on its last token, <|im_end|>; see
:class:`minirlhf.model.RewardModel`), take the loss, step.
Evaluation: pair accuracy, the share of pairs ordered as the hidden gold score orders them.
"""
from dataclasses import dataclass

import numpy as np

from .. import losses
from ..tensor import no_grad
from ..optim import cosine_lr
from .common import (TrainConfig, begin_run, check_not_empty, is_number, is_positive_int, maybe_checkpoint,
                     optimizer_step, pad_prompt_response, require)


@dataclass
class RewardConfig(TrainConfig):
    lr: float = 3e-4
    steps: int = 200
    batch_size: int = 32           # pairs per step
    min_lr: float = 0.0            # the learning rate decays from lr to min_lr along a cosine

    def check(self):
        super().check()
        require(self, "batch_size", is_positive_int, "a positive integer")
        require(self, "min_lr", lambda v: is_number(v) and 0 <= v <= self.lr, f"in [0, lr={self.lr}]")


def pair_batch(pairs, pad_id):
    """Chosen rows then rejected rows: ids, attention mask and response mask, each (2B, T), right-padded.

    ``pairs``: (prompt_ids, chosen_ids, rejected_ids) triples of token lists.
    """
    return pad_prompt_response([(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs], pad_id)


def pair_scores(reward_model, pairs, pad_id):
    """(r(x, y_w), r(x, y_l)), each (B,)."""
    scores = reward_model(*pair_batch(pairs, pad_id))
    B = len(pairs)
    return scores[:B], scores[B:]


def train_reward_model(reward_model, pairs, config, pad_id, out_dir=None, resume=False, log=None, progress=True):
    """Fit ``reward_model`` (a :class:`minirlhf.model.RewardModel`) to ``pairs`` of (prompt, chosen,
    rejected) token lists; returns the per-step metrics."""
    check_not_empty(pairs, "pairs", "train_reward_model")
    optimizer, start, _, write, bar = begin_run("train_reward_model", "rm", reward_model, config, out_dir, resume, log,
                                                progress)
    history = []
    for step in range(start, config.steps):
        for group in optimizer.param_groups:  # labels are noisy: a decaying step size settles the fit
            group["lr"] = cosine_lr(step, config.lr, 0, config.steps, config.min_lr)
        picked = np.random.default_rng([config.seed, step]).choice(len(pairs), min(config.batch_size, len(pairs)),
                                                                   replace=False)
        r_chosen, r_rejected = pair_scores(reward_model, [pairs[i] for i in picked], pad_id)
        loss, accuracy = losses.bradley_terry_loss(r_chosen, r_rejected)
        grad_norm = optimizer_step(reward_model, optimizer, loss, config.clip)
        metrics = {"step": step + 1, "loss": float(loss.item()), "accuracy": float(accuracy),
                   "margin": float((r_chosen.data - r_rejected.data).mean()), "grad_norm": grad_norm}
        history.append(metrics)
        write(metrics)
        bar.update(step + 1, loss=metrics["loss"], acc=metrics["accuracy"])
        maybe_checkpoint(out_dir, reward_model, optimizer, step + 1, config)
    return history


def score_sequences(reward_model, ids, mask, response, rows=512):
    """r(x, y) for full sequences (B, T) under no_grad, in chunks; (B,) array.

    mask: the attention mask; response: 1 on the response tokens (both (B, T)).
    """
    with no_grad():
        return np.concatenate([reward_model(ids[s:s + rows], mask[s:s + rows], response[s:s + rows]).data
                               for s in range(0, len(ids), rows)])


def pair_accuracy(reward_model, pairs, pad_id):
    """Share of (prompt, better, worse) triples with r(better) > r(worse)."""
    check_not_empty(pairs, "pairs", "pair_accuracy")
    scores = score_sequences(reward_model, *pair_batch(pairs, pad_id))
    B = len(pairs)
    return float((scores[:B] > scores[B:]).mean())


def normalize_reward_model(reward_model, ids, mask, response):
    """Rescale the heads so that scores on (ids, mask, response) have mean 0 and standard deviation 1.

    Bradley-Terry fixes rewards only up to a shift (and the scale is whatever training reached);
    fixing both keeps the KL coefficient of PPO meaningful from one run to the next. r is linear
    in (u, w, b), so (r − mean)/std is u/std, w/std, (b − mean)/std.
    """
    scores = score_sequences(reward_model, ids, mask, response)
    mean, std = float(scores.mean()), float(scores.std()) + 1e-6
    for p in (reward_model.token_scores.weight, reward_model.reward_head.weight):
        p.data = (p.data / std).astype(p.dtype)
    bias = reward_model.reward_head.bias
    bias.data = ((bias.data - mean) / std).astype(bias.dtype)
    return mean, std

