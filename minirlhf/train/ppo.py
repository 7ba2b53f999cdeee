"""PPO for RLHF (Ziegler et al. 2019; Ouyang et al. 2022; the PPO lecture), with a learned reward model.

For each step:

    1. draw prompts; sample ``samples_per_prompt`` responses per prompt (one by default) from π_old (the
       current policy); the rows that answer one prompt go through its positions once in every forward
       below (rollout.response_hidden)
    2. score: s = r_φ(x, y), the reward model's score of the whole response
    3. log-probs and values without gradient: log π_old(y_t), log π_ref(y_t), V_old(s_t) (with one
       minibatch, π_old and V_old are the first update's forward, detached: the policy has not moved yet)
    4. per-token rewards r_t = −β log(π_old/π_ref)(y_t) + [t last] · s          (losses.kl_penalty)
    5. advantages and returns by GAE(γ, λ) over the response tokens, advantages whitened
       (losses.gae, losses.whiten)
    6. for each epoch and minibatch:  L = clipped surrogate(ρ, A) + c_v · clipped value loss
       (losses.ppo_policy_loss, losses.ppo_value_loss), ρ = π/π_old; backward, step
    7. with ``adaptive_kl``, move β toward the target KL (losses.AdaptiveKLController)

With ``rollout_correction``, step 6 weights each token's surrogate by losses.rollout_correction_weights
of π_old against the sampler's own log-probs (the same as weighting its advantage, the weights being >= 0).

The policy and the value function share the trunk: the policy model carries a value head.
"""
from dataclasses import dataclass

import numpy as np

from .. import backend, losses
from ..backend import to_numpy
from ..rollout import response_logprobs
from ..tensor import no_grad
from ..validation import is_number, is_positive, is_positive_int, require
from .config import TrainConfig, check_with, one_token_batch
from .metrics import clip_metrics, kl_metrics, rollout_metrics
from .reward import score_rollout
from .run import MINIBATCHES, Run, check_not_empty, step_rng, step_rollout


@dataclass
class PPOConfig(TrainConfig):
    steps: int = 400
    prompts_per_step: int = 128    # prompts drawn per step
    samples_per_prompt: int = 1    # responses per prompt (OpenRLHF's n_samples_per_prompt); they share its forward
    epochs: int = 2                # passes over each rollout batch
    minibatches: int = 2           # minibatches per pass
    beta: float = 0.5              # KL coefficient of the per-token reward (the initial one with adaptive_kl)
    adaptive_kl: bool = False      # move beta toward kl_target (Ziegler et al. 2019)
    kl_target: float = 1.0         # nats per response, for adaptive_kl
    kl_horizon: int = 10000        # samples, for adaptive_kl
    clip_eps: float = 0.2          # policy ratio clip
    value_clip: float = 0.2        # value clip, in units of value
    vf_coef: float = 0.1           # weight of the value loss
    gamma: float = 1.0             # discount of GAE
    lam: float = 0.95              # λ of GAE
    temperature: float = 1.0       # sampling temperature (the log-probs use the same)
    max_new_tokens: int = 5        # longest response in tokens
    rollout_correction: str = None # None | tis | tis_seq | mis | icepop: weights for the sampler's log-probs (losses.rollout_correction_weights)

    def check(self):
        super().check()
        require(self, "rollout_correction", lambda v: v is None or v in losses.ROLLOUT_CORRECTIONS,
                f"None or one of {', '.join(losses.ROLLOUT_CORRECTIONS)}")
        for name in ("prompts_per_step", "samples_per_prompt", "epochs", "minibatches", "max_new_tokens",
                     "kl_horizon"):
            require(self, name, is_positive_int, "a positive integer")
        rollouts = self.prompts_per_step * self.samples_per_prompt
        require(self, "minibatches", lambda v: v <= rollouts,
                f"<= the rollouts per step, prompts_per_step × samples_per_prompt ({rollouts})")
        require(self, "adaptive_kl", lambda v: isinstance(v, bool), "true or false")
        require(self, "temperature", is_positive, "a finite number > 0")
        require(self, "vf_coef", lambda v: is_number(v) and v >= 0, "a finite number >= 0")
        logp, old_logp, ref_logp, advantages, mask = one_token_batch()
        check_with(self, losses.kl_penalty, logp, ref_logp, mask, np.zeros(1), self.beta)
        check_with(self, losses.AdaptiveKLController, self.beta if self.beta > 0 else 1.0, self.kl_target,
                   self.kl_horizon)
        check_with(self, losses.gae, logp, logp, mask, gamma=self.gamma, lam=self.lam)
        check_with(self, losses.ppo_policy_loss, logp, old_logp, advantages, mask, clip_eps=self.clip_eps)
        check_with(self, losses.ppo_value_loss, logp, old_logp, logp, mask, clip_eps=self.value_clip)
        if self.rollout_correction is not None:
            check_with(self, losses.rollout_correction_weights, logp, logp, mask, self.rollout_correction)


def in_batch_order(world, rows, *arrays):
    """Each rank's ``arrays`` for its ``rows`` of the batch, gathered over the ranks and put back in the
    batch's row order."""
    order = world.gather(np.asarray(rows))
    placed = []
    for values in arrays:
        values = world.gather(values)
        out = values.copy()
        out[backend.to_device(order, backend.device_of(out))] = values
        placed.append(out)
    return placed


def with_value_head(model):
    """A copy of ``model`` that also predicts values V(s_t); the value head starts at the GPT-2 init."""
    policy = type(model)(model.config, value_head=True)
    policy.load_state_dict(model.state_dict(), strict=False)
    return policy


def train_ppo(policy, reference, reward_model, prompts, config, eos_id, pad_id, out_dir=None, resume=False,
              log=None, progress=True):
    """Train ``policy`` (a GPT with a value head, see :func:`with_value_head`) in place; returns the metrics.

    reference: the frozen SFT model; reward_model: a trained RewardModel; prompts: prompt token lists.
    """
    check_not_empty(prompts, "prompts", "train_ppo")
    if policy.value_head is None:
        raise ValueError("train_ppo: policy needs a value head; pass with_value_head(model)")
    run = Run("ppo", policy, config, out_dir, resume, log, progress)
    kl_control = losses.AdaptiveKLController(run.extra.get("beta", config.beta), config.kl_target,
                                             config.kl_horizon) if config.adaptive_kl else None
    for step in run.steps():
        lr = run.lr
        beta = kl_control.beta if config.adaptive_kl else config.beta
        batch = step_rollout(policy, prompts, config, step, config.samples_per_prompt, eos_id, pad_id)
        # this rank's rollouts, a prompt's samples together (all of them in one process)
        mine = batch.rows(run.split(len(batch), config.samples_per_prompt))
        scores = run.world.gather(score_rollout(reward_model, mine))
        rng = step_rng(config.seed, step, MINIBATCHES)
        plan = [np.array_split(rng.permutation(len(batch)), config.minibatches) for _ in range(config.epochs)]
        tokens = to_numpy(batch.mask.sum(axis=1))  # read back once: every token count below comes from it
        first = None
        if config.minibatches == 1:
            # the first update's forward sees the policy of the rollout (no step taken yet): detached, it is
            # π_old and V_old, and the update keeps its graph, one pass fewer (as GRPO's first epoch)
            rows = plan[0][0][run.split(len(batch))]
            first = response_logprobs(policy, batch.rows(rows), values=True, entropy=True)
            old_logp, old_values, entropy = first
            old_logp, old_values = in_batch_order(run.world, rows, old_logp.data, old_values.data)
        else:
            rows = run.split(len(batch), config.samples_per_prompt)  # this rank's rollouts, `mine`
            with no_grad():
                old_logp, old_values, entropy = response_logprobs(policy, mine, values=True, entropy=True)
            old_logp, old_values = run.world.gather(old_logp.data), run.world.gather(old_values.data)
        entropy_tokens = float(tokens[rows].sum())  # the entropy is a token mean over these rows
        old_values = old_values * batch.mask
        with no_grad():
            ref_logp = run.world.gather(response_logprobs(reference, mine).data)
        rewards = losses.kl_penalty(old_logp, ref_logp, batch.mask, scores, beta).data
        advantages, returns = losses.gae(rewards, old_values, batch.mask, gamma=config.gamma, lam=config.lam)
        advantages = losses.whiten(advantages, batch.mask).data
        if config.rollout_correction is not None:
            advantages = advantages * losses.rollout_correction_weights(old_logp, batch.logprobs, batch.mask,
                                                                        config.rollout_correction).data
        for minibatches in plan:
            for minibatch in minibatches:
                rows = minibatch[run.split(len(minibatch))]
                mb = batch.rows(rows)
                if first is not None:
                    (logp, values, _), first = first, None  # its graph is used once, by this update
                else:
                    logp, values = response_logprobs(policy, mb, values=True)
                policy_loss, stats = losses.ppo_policy_loss(logp, old_logp[rows], advantages[rows], mb.mask,
                                                            clip_eps=config.clip_eps)
                value_loss = losses.ppo_value_loss(values, old_values[rows], returns.data[rows], mb.mask,
                                                   clip_eps=config.value_clip)
                weight = float(tokens[rows].sum()) / float(tokens[minibatch].sum())  # both losses are token means
                grad_norm = run.optimizer_step(policy_loss + config.vf_coef * value_loss, weight)
        kl = kl_metrics(old_logp, ref_logp, batch.mask)
        if config.adaptive_kl:
            kl_control.update(kl["objective/kl"], len(batch))
        last_minibatch = run.mean({"loss/policy_avg": float(policy_loss.item()),
                                   "loss/value_avg": float(value_loss.item()), **clip_metrics(stats)},
                                  float(tokens[rows].sum()))  # token means, as is the entropy
        metrics = {**rollout_metrics(batch, scores), **kl,
                   **run.mean({"entropy": float(entropy)}, entropy_tokens), "beta": beta, **last_minibatch,
                   "learning_rate": lr, "grad_norm": grad_norm}
        run.end_step(step, metrics, shown=("reward", "objective/kl"),
                     extra={"beta": kl_control.beta} if config.adaptive_kl else None)
    return run.history
