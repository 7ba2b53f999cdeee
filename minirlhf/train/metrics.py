"""The metrics trainers log, named as TRL names the same quantity (README: "Metrics" gives each
one's formula, estimator and unit). One name means one quantity in every trainer.
"""
import numpy as np

from .. import losses


def rollout_metrics(rollout, rewards, group_size=None):
    """What a batch of sampled responses and their rewards (B,) look like.

    reward                   mean reward of the responses
    reward_std               standard deviation of the rewards over the batch
    frac_reward_zero_std     share of prompt groups whose G rewards are all equal (they get A = 0)
    completions/mean_length  mean response length in tokens (<|im_end|> included); also min and max
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    lengths = np.asarray(rollout.lengths())
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
