"""Reward model: a GPT with reward heads, trained on preference pairs with the Bradley-Terry loss
(Ouyang et al. 2022, eq. 1):

    L = −mean log σ(r(x, y_w) − r(x, y_l))

For each step: draw a batch of pairs, score chosen and rejected responses in one pass, each pair's
prompt through the trunk once (per-token scores of the response plus a head on its last token,
<|im_end|>; see :class:`minirlhf.model.RewardModel`), take the loss, step. The learning rate decays along a cosine
(``min_lr``): labels are noisy, and a decaying step size settles the fit.
Evaluation: pair accuracy, the share of pairs ordered as the hidden gold score orders them.
"""
from dataclasses import dataclass

import numpy as np

from .. import backend, losses
from ..model import RewardModel
from ..padding import pad_prompt_response
from ..rollout import from_pairs, response_hidden
from ..tensor import no_grad
from ..validation import is_positive_int, require
from .config import TrainConfig
from .run import PAIRS, Run, check_not_empty, draw_rows


@dataclass
class RewardConfig(TrainConfig):
    steps: int = 2500
    lr: float = 1e-3
    min_lr: float = 1e-4
    batch_size: int = 64           # pairs per step

    def check(self):
        super().check()
        require(self, "batch_size", is_positive_int, "a positive integer")


def pair_batch(pairs, pad_id):
    """Chosen rows then rejected rows: ids, attention mask and response mask, each (2B, T), right-padded.

    ``pairs``: (prompt_ids, chosen_ids, rejected_ids) triples of token lists.
    """
    return pad_prompt_response([(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs], pad_id)


def rollout_scores(reward_model, rollout):
    """r(x, y) of each row of a :class:`~minirlhf.rollout.Rollout`, (B,), with gradient.

    The same r as ``reward_model(ids, mask, response)`` on [prompt | response], from the trunk's states
    on columns T−1 … T+N−1 (:func:`~minirlhf.rollout.response_hidden`), so that a prompt shared by
    several rows (a pair's chosen and rejected responses) goes through the trunk once.
    """
    h = response_hidden(reward_model.transformer, rollout, last=True)  # (B, N + 1, C)
    on = h.device
    tokens, mask = backend.to_device(rollout.tokens, on), backend.to_device(rollout.mask, on)
    last = mask.sum(axis=1).astype(np.int64)  # the state on the last response token is column `length`
    return reward_model.score(h[:, :-1], tokens, mask, h[h.xp.arange(len(last)), last])


def pair_scores(reward_model, pairs, pad_id):
    """(r(x, y_w), r(x, y_l)), each (B,), each pair's prompt computed once."""
    scores = rollout_scores(reward_model, from_pairs(pairs, pad_id))
    B = len(pairs)
    return scores[:B], scores[B:]


def train_reward_model(reward_model, pairs, config, pad_id, out_dir=None, resume=False, log=None, progress=True):
    """Fit ``reward_model`` (a :class:`minirlhf.model.RewardModel`) to ``pairs`` of (prompt, chosen,
    rejected) token lists; returns the per-step metrics."""
    check_not_empty(pairs, "pairs", "train_reward_model")
    run = Run("rm", reward_model, config, out_dir, resume, log, progress)
    for step in run.steps():
        lr = run.lr
        drawn = draw_rows(len(pairs), config.batch_size, config.seed, step, PAIRS)
        picked = drawn[run.split(len(drawn))]  # this rank's pairs (all of them in one process)
        r_chosen, r_rejected = pair_scores(reward_model, [pairs[i] for i in picked], pad_id)
        loss, accuracy = losses.bradley_terry_loss(r_chosen, r_rejected)
        grad_norm = run.optimizer_step(loss, len(picked) / len(drawn))
        run.end_step(step, {"loss": run.loss, **run.mean({"accuracy": float(accuracy),
                            "margin": float((r_chosen.data - r_rejected.data).mean())}, len(picked)),
                            "learning_rate": lr, "grad_norm": grad_norm}, shown=("loss", "accuracy"))
    return run.history


def score_sequences(reward_model, ids, mask, response, rows=512):
    """r(x, y) for full sequences (B, T) under no_grad, in chunks; (B,) array.

    mask: the attention mask; response: 1 on the response tokens (both (B, T)).
    """
    with no_grad():
        return np.concatenate([reward_model(ids[s:s + rows], mask[s:s + rows], response[s:s + rows]).data
                               for s in range(0, len(ids), rows)])


def score_rollout(reward_model, rollout, rows=512):
    """r(x, y) of each response of a :class:`~minirlhf.rollout.Rollout`, (B,) array, under no_grad.

    A :class:`~minirlhf.model.RewardModel` scores it by :func:`rollout_scores`, in chunks of ``rows``:
    its trunk skips in its last block the prompt columns that no term reads, and reads a prompt shared
    by several rows once. Any other ``reward_model(ids, mask, response)`` sees [prompt | response].
    """
    if not isinstance(reward_model, RewardModel):
        ids = np.concatenate([rollout.prompt_ids, rollout.tokens], axis=1)
        mask = np.concatenate([rollout.prompt_mask, rollout.mask], axis=1)
        response = np.concatenate([np.zeros_like(rollout.prompt_mask), rollout.mask], axis=1)
        return score_sequences(reward_model, ids, mask, response, rows)
    with no_grad():
        return np.concatenate([rollout_scores(reward_model, rollout.rows(slice(s, s + rows))).data
                               for s in range(0, len(rollout), rows)])


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
