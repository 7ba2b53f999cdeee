"""The KL estimators, exactly: their values' bias and variance, and which gradient each one gives.

On the exact testbed (minirlhf/exact.py) every expectation over responses is a finite sum, so
nothing here is Monte Carlo. With log r = log π(y) − log π_ref(y) (Schulman 2020, "Approximating
KL divergence"):

    k1 = log r            k2 = ½ (log r)²            k3 = 1/r − 1 + log r

k1 and k3 are unbiased for KL(π ‖ π_ref), k2 is not. What matters in training is the gradient an
estimator gives once it is part of the objective, and that depends on where it is put:

* **in the loss** (GRPO's β·k3 term): samples y ~ π are fixed, the gradient flows through log π
  inside k. For one token, E_π[∇k1] = E_π[∇log π] = 0; E_π[∇k2] = E_π[log r ∇log π] = ∇KL(π ‖ π_ref);
  E_π[∇k3] = E_π[(1 − π_ref/π) ∇log π] = −Σ_v π_ref(v) ∇log π(v) = ∇KL(π_ref ‖ π).
* **in the reward** (PPO's r_t = −β k_t): k is a detached number and the score function carries
  it, E_π[k(y) ∇log π(y)]. For k1 that is exactly ∇KL(π ‖ π_ref) (the REINFORCE form of its
  gradient), per token with rewards-to-go as well; for k3 it is ∇KL(π‖π_ref) − ∇KL(π_ref‖π).

For a response of several tokens the per-token estimators summed over the response
(Σ_t k(y_t), what trainers compute) give, in the loss, Σ_t E[∇ of the KL at step t given the
prefix] — the prefixes' own dependence on θ is missing — so neither k2 nor k3 summed per token
gives the response-level gradient; k2 and k3 of the *response* ratio π(y)/π_ref(y) do.

Off-policy (y ~ μ, e.g. π_old): the response-level importance weight π(y)/μ(y) recovers the
on-policy expectation exactly; per-token weights π(y_t)/μ(y_t) do not (the prefixes stay drawn
from μ), and no weight at all (what a k3 term on an old rollout does) does not either.

Every number is averaged over ``draws`` random pairs (π, π_ref) of tabular policies.
"""
import time
from dataclasses import asdict, dataclass

import numpy as np

from .. import exact as E
from .. import losses
from ..tensor import Tensor
from ..train.stages import prepare_folder
from . import report

ESTIMATORS = ("k1", "k2", "k3")
GRANULARITIES = ("token", "sequence")   # Σ_t k(log r_t)  vs  k(Σ_t log r_t)
PLACEMENTS = ("loss", "reward")
WEIGHTINGS = ("none", "token", "sequence")  # off-policy importance weights


@dataclass
class KLConfig:
    vocab_size: int = 3            # tokens of the testbed, EOS included
    max_len: int = 3               # longest response of the several-token language
    draws: int = 200               # random (π, π_ref) pairs every number is averaged over
    distance: float = 1.0          # std of the logit offset between π and π_ref
    behaviour_distance: float = 0.5  # std of the logit offset between μ (the sampler) and π, off-policy
    scales: tuple = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0)  # logit offsets of the value sweep


QUICK = {"draws": 10, "scales": (0.25, 1.0, 4.0)}


# ------------------------------------------------------------------ values
def estimator_values(token_log_ratio, mask, estimator, granularity):
    """k of each response (S,): Σ_t k(log r_t) ("token") or k(Σ_t log r_t) ("sequence")."""
    if granularity == "token":
        return (losses.kl_estimate(token_log_ratio, np.zeros_like(token_log_ratio), estimator).numpy()
                * mask).sum(axis=1)
    seq = (token_log_ratio * mask).sum(axis=1)
    return losses.kl_estimate(seq, np.zeros_like(seq), estimator).numpy()


def value_moments(policy, reference):
    """{estimator/granularity: (mean, std)} of each estimator's value under y ~ π, and the exact KL."""
    lang = policy.language
    logp, ref_logp = policy.token_logprobs().numpy(), reference.token_logprobs().numpy()
    p = np.exp(logp.sum(axis=1))
    out = {}
    for granularity in GRANULARITIES:
        for estimator in ESTIMATORS:
            k = estimator_values(logp - ref_logp, lang.mask, estimator, granularity)
            mean = float(p @ k)
            out[f"{estimator}/{granularity}"] = (mean, float(np.sqrt(max(p @ (k - mean) ** 2, 0.0))))
    return out, E.sequence_kl(logp.sum(axis=1), ref_logp.sum(axis=1))


# --------------------------------------------------------------- gradients
def _gradient(policy, objective):
    policy.zero_grad()
    objective(policy).backward()
    return policy.logits.grad.copy()


def exact_gradients(policy, reference):
    """(∇KL(π ‖ π_ref), ∇KL(π_ref ‖ π)) with respect to π's logits, by autograd through the exact sums."""
    ref_logp = reference.sequence_logprobs().numpy()
    forward = _gradient(policy, lambda pi: (pi.sequence_logprobs().exp() * (pi.sequence_logprobs() - ref_logp)).sum())
    reverse = _gradient(policy, lambda pi: -(pi.sequence_logprobs() * np.exp(ref_logp)).sum())
    return forward, reverse


def expected_gradient(policy, reference, estimator, granularity, placement, behaviour=None, weighting="none"):
    """E_{y~q}[∇ of the estimator's term], q = π (on-policy) or ``behaviour`` μ, with importance weights
    ``weighting`` (off-policy only): "none", "token" (π(y_t)/μ(y_t) on each token's term) or "sequence"
    (π(y)/μ(y) on the response's).

    placement "loss": the term is k itself, differentiated through log π;
    placement "reward": k is a detached reward and the gradient is k·∇log π (per token with the
    reward-to-go Σ_{s>=t} k_s for granularity "token", k(y)·∇log π(y) for "sequence").
    """
    lang = policy.language
    mask = lang.mask
    ref_logp = reference.token_logprobs().numpy()
    sampler = policy if behaviour is None else behaviour
    q = np.exp(sampler.sequence_logprobs().numpy())           # (S,) where the samples come from
    mu_logp = sampler.token_logprobs().numpy()

    def objective(pi):
        logp = pi.token_logprobs()                            # (S, L)
        w_token = np.exp((logp.numpy() - mu_logp) * mask)     # π(y_t)/μ(y_t), detached; 1 on-policy
        if behaviour is None or weighting == "none":
            w_token = np.ones_like(w_token)
        if weighting == "sequence":
            w_token = np.repeat(np.prod(w_token, axis=1, keepdims=True), lang.max_len, axis=1)
        if placement == "loss":
            if granularity == "token":
                k = losses.kl_estimate(logp, ref_logp, estimator) * Tensor(mask * w_token, dtype=np.float64)
                return (k.sum(axis=1) * q).sum()
            k = losses.kl_estimate(logp.sum(axis=1), ref_logp.sum(axis=1), estimator)
            return (k * (q * w_token[:, 0])).sum()
        if granularity == "token":
            per_token = losses.kl_estimate(logp.numpy(), ref_logp, estimator).numpy() * mask
            to_go = np.cumsum(per_token[:, ::-1], axis=1)[:, ::-1] * mask
        else:
            k_seq = estimator_values(logp.numpy() - ref_logp, mask, estimator, "sequence")
            to_go = k_seq[:, None] * mask
        return ((logp * Tensor(to_go * w_token, dtype=np.float64)).sum(axis=1) * q).sum()

    return _gradient(policy, objective)


def relative_error(g, target):
    """‖g − g*‖ / ‖g*‖."""
    return float(np.linalg.norm(g - target) / max(np.linalg.norm(target), 1e-300))


# --------------------------------------------------------------- experiment
def random_pair(lang, rng, distance):
    """(π, π_ref): π_ref's logits N(0, 1), π's the same plus N(0, distance²)."""
    ref = rng.normal(size=(lang.num_prefixes, lang.vocab_size))
    return E.TabularPolicy(lang, ref + distance * rng.normal(size=ref.shape)), E.TabularPolicy(lang, ref)


def gradient_table(lang, config, rng):
    """Mean (and max) relative error of each expected gradient to ∇KL(π‖π_ref) and ∇KL(π_ref‖π)."""
    errors = {}
    for _ in range(config.draws):
        policy, reference = random_pair(lang, rng, config.distance)
        forward, reverse = exact_gradients(policy, reference)
        for placement in PLACEMENTS:
            for granularity in GRANULARITIES:
                for estimator in ESTIMATORS:
                    g = expected_gradient(policy, reference, estimator, granularity, placement)
                    row = errors.setdefault(f"{estimator}/{granularity}/{placement}", {"forward": [], "reverse": [],
                                                                                       "norm": []})
                    row["forward"].append(relative_error(g, forward))
                    row["reverse"].append(relative_error(g, reverse))
                    row["norm"].append(float(np.linalg.norm(g) / np.linalg.norm(forward)))
    return {name: {f"{key}_mean": float(np.mean(v)) for key, v in row.items()} |
            {f"{key}_max": float(np.max(v)) for key, v in row.items()} for name, row in errors.items()}


def off_policy_table(lang, config, rng):
    """Relative error of each off-policy expected gradient (y ~ μ) to the on-policy one (y ~ π)."""
    errors = {}
    for _ in range(config.draws):
        policy, reference = random_pair(lang, rng, config.distance)
        behaviour = E.TabularPolicy(lang, policy.logits.numpy() + config.behaviour_distance *
                                    rng.normal(size=policy.logits.shape))
        for placement in PLACEMENTS:
            for granularity in GRANULARITIES:
                for estimator in ("k2", "k3"):
                    on = expected_gradient(policy, reference, estimator, granularity, placement)
                    for weighting in WEIGHTINGS:
                        off = expected_gradient(policy, reference, estimator, granularity, placement, behaviour,
                                                weighting)
                        errors.setdefault(f"{estimator}/{granularity}/{placement}/{weighting}", []).append(
                            relative_error(off, on))
    return {name: {"mean": float(np.mean(v)), "max": float(np.max(v))} for name, v in errors.items()}


def value_sweep(lang, config, rng):
    """For each logit offset: the exact KL, and each estimator's bias and std (means over the draws)."""
    sweep = []
    for scale in config.scales:
        kls, moments = [], {}
        for _ in range(config.draws):
            policy, reference = random_pair(lang, rng, scale)
            m, kl = value_moments(policy, reference)
            kls.append(kl)
            for name, (mean, std) in m.items():
                moments.setdefault(name, []).append((mean - kl, std))
        sweep.append({"scale": scale, "kl": float(np.mean(kls)),
                      **{name: {"bias": float(np.mean([b for b, _ in v])), "std": float(np.mean([s for _, s in v]))}
                         for name, v in moments.items()}})
    return sweep


def run(out, quick=False, seed=0, progress=True, overwrite=False, **overrides):
    """Write ``out/results.json`` and ``out/kl_estimators.png``; returns the results."""
    config = KLConfig(**{**(QUICK if quick else {}), **overrides})
    prepare_folder(out, overwrite, "lab run")
    start = time.time()
    rng = np.random.default_rng([seed, 14, 4])
    one_token = E.TabularLanguage(config.vocab_size, 1)
    response = E.TabularLanguage(config.vocab_size, config.max_len)
    results = {"experiment": "kl", "seed": seed, "quick": quick, "settings": asdict(config),
               "one_token": gradient_table(one_token, config, rng),
               "response": gradient_table(response, config, rng),
               "off_policy": off_policy_table(response, config, rng),
               "values": value_sweep(response, config, rng)}
    return report.finish(out, results, start, plot)


def plot(results, out):
    plt = report.pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    ax = axes[0]
    kl = [s["kl"] for s in results["values"]]
    for name, style in (("k1/sequence", "C0"), ("k2/sequence", "C1"), ("k3/sequence", "C2"), ("k3/token", "C3")):
        ax.plot(kl, [abs(s[name]["bias"]) for s in results["values"]], "-o", color=style, label=f"|bias| {name}")
        ax.plot(kl, [s[name]["std"] for s in results["values"]], "--", color=style, label=f"std {name}")
    ax.plot(kl, kl, ":", color="gray", label="KL itself")
    ax.set(xscale="log", yscale="log", ylim=(1e-4, None), xlabel="exact KL(π‖π_ref) of a response",
           title="values (y ~ π): k1, k3 have bias 0 (below the axis)")
    ax.legend(fontsize=7)
    for ax, lang in zip(axes[1:], ("one_token", "response")):
        table = results[lang]
        names = list(table)
        y = np.arange(len(names))
        ax.barh(y - 0.2, [table[n]["forward_mean"] for n in names], 0.4, label="to ∇KL(π‖π_ref)")
        ax.barh(y + 0.2, [table[n]["reverse_mean"] for n in names], 0.4, label="to ∇KL(π_ref‖π)")
        ax.set_yticks(y, names, fontsize=8)
        ax.set_xscale("symlog", linthresh=1e-3)
        ax.axvline(0, color="k", lw=0.5)
        ax.set(xlabel="relative error of E[gradient] (0 = that gradient exactly)",
               title=f"{'one token' if lang == 'one_token' else 'responses of several tokens'}: "
                     "estimator/granularity/placement")
        ax.legend(fontsize=8)
    return report.save(fig, out, "kl_estimators.png")
