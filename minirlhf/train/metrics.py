"""The metrics trainers log, named as TRL names the same quantity (README: "Metrics" gives each
one's formula, estimator and unit). One name means one quantity in every trainer.
"""
import numpy as np

from .. import losses
from ..backend import to_numpy

# name: (formula, estimator, unit) — the README's metric table is this dict
METRICS = {
    "step": ("optimizer steps done", "exact", "steps"),
    "loss": ("the objective minimised this step (the trainer's loss; SFT: Σ over micro-batches)", "exact", "nats"),
    "learning_rate": ("AdamW's learning rate of the step (warmup + cosine)", "exact", "—"),
    "grad_norm": ("‖∇L‖₂ over all parameters, before clipping", "exact", "—"),
    "num_tokens": ("response tokens in the SFT step (the loss's normaliser)", "exact", "tokens"),
    "reward": ("mean_i r(x_i, y_i) of the step's responses (PPO: the reward model; GRPO, RLOO: the rule)",
               "sample mean", "reward"),
    "reward_std": ("std_i r(x_i, y_i) over the step's responses", "sample std (biased)", "reward"),
    "frac_reward_zero_std": ("share of prompt groups whose G rewards are all equal (their advantages are 0)",
                             "exact on the batch", "fraction"),
    "completions/mean_length": ("mean response length in tokens, <|im_end|> included", "exact on the batch", "tokens"),
    "completions/min_length": ("shortest response length", "exact on the batch", "tokens"),
    "completions/max_length": ("longest response length", "exact on the batch", "tokens"),
    "objective/kl": ("mean_i Σ_t log π_old(y_t)/π_ref(y_t): KL(π ‖ π_ref) per response", "k1 on the rollout's samples",
                     "nats/response"),
    "kl": ("Σ m·k3 / Σ m with k3 = π_ref/π − 1 − log(π_ref/π): GRPO's KL term, per token", "k3, last epoch",
           "nats/token"),
    "entropy": ("mean over response tokens of the entropy of π(·; x, y_<t)", "exact over the vocabulary, sampled states",
                "nats/token"),
    "clip_ratio/region_mean": ("share of response tokens where the clipped branch of the surrogate is taken",
                               "exact on the batch, last minibatch", "fraction"),
    "clip_ratio/low_mean": ("share of response tokens with ρ < 1 − ε and A < 0", "exact on the batch, last minibatch",
                            "fraction"),
    "clip_ratio/high_mean": ("share of response tokens with ρ > 1 + ε_high and A > 0",
                             "exact on the batch, last minibatch", "fraction"),
    "beta": ("PPO's KL coefficient this step (moves with adaptive_kl)", "exact", "—"),
    "loss/policy_avg": ("PPO's clipped surrogate, token mean", "last minibatch", "—"),
    "loss/value_avg": ("PPO's clipped value loss, ½ token mean of squared error", "last minibatch", "reward²"),
    "accuracy": ("reward model: share of pairs with r(x, y_w) > r(x, y_l)", "batch", "fraction"),
    "margin": ("reward model: mean r(x, y_w) − r(x, y_l)", "batch", "reward"),
    "rewards/chosen": ("DPO: mean β log π(y_w|x)/π_ref(y_w|x)", "batch", "nats·β"),
    "rewards/rejected": ("DPO: mean β log π(y_l|x)/π_ref(y_l|x)", "batch", "nats·β"),
    "rewards/margins": ("DPO: mean of chosen − rejected implicit rewards", "batch", "nats·β"),
    "rewards/accuracies": ("DPO: share of pairs whose chosen implicit reward is higher", "batch", "fraction"),
    "logps/chosen": ("DPO: mean log π(y_w|x)", "batch", "nats/response"),
    "logps/rejected": ("DPO: mean log π(y_l|x)", "batch", "nats/response"),
}


def rollout_metrics(rollout, rewards, group_size=None):
    """What a batch of sampled responses and their rewards (B,) look like.

    reward                   mean reward of the responses
    reward_std               standard deviation of the rewards over the batch
    frac_reward_zero_std     share of prompt groups whose G rewards are all equal (they get A = 0)
    completions/mean_length  mean response length in tokens (<|im_end|> included); also min and max
    """
    rewards = to_numpy(rewards).astype(np.float64)
    lengths = to_numpy(rollout.lengths())
    metrics = {"reward": float(rewards.mean()), "reward_std": float(rewards.std())}
    if group_size is not None:
        groups = rewards.reshape(-1, group_size)
        metrics["frac_reward_zero_std"] = float((groups.max(axis=1) == groups.min(axis=1)).mean())
    metrics.update({"completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
                    "completions/max_length": float(lengths.max())})
    return metrics


def kl_metrics(logp, ref_logp, mask):
    """objective/kl: mean over responses of Σ_t log(π(y_t)/π_ref(y_t)) (k1, nats per response), on the
    rollout's samples; nothing when there is no reference pass."""
    if ref_logp is None:
        return {}
    return {"objective/kl": float(losses.response_kl(logp, ref_logp, mask, "k1").data.mean())}


def clip_metrics(stats):
    """clip_ratio/region_mean: share of response tokens where the clipped branch of the surrogate is the
    one taken (ρ > 1 + ε_high with A > 0, or ρ < 1 − ε with A < 0); low/high split it by side."""
    names = {"clip_fraction": "clip_ratio/region_mean", "clip_low": "clip_ratio/low_mean",
             "clip_high": "clip_ratio/high_mean"}
    return {names[k]: float(v) for k, v in stats.items() if k in names}
