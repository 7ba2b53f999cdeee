"""Sampling and training disagree: the sampler's log-probs against the trainer's, and truncated
importance sampling.

An RL step samples y ~ μ with one code path (the KV-cached, float32 sampler, which reports
log μ(y_t)) and differentiates log π(y_t) with another (a full forward, here also in float64).
On paper μ = π; in the machine the per-token ratio

    ρ_t = π(y_t | x, y_<t) / μ(y_t | x, y_<t)

is not exactly 1, and a trainer that forgets to divide its logits by the sampling temperature τ
has π = softmax(ℓ) against μ = softmax(ℓ/τ): ρ far from 1 from the first token on.

Truncated importance sampling (TIS; Yao et al. 2025, "Your efficient RL framework secretly brings
you off-policy RL training") weights each token's policy-gradient term by the detached

    w_t = min(ρ_t, C),        ∇ ≈ E_{y~μ}[ Σ_t w_t · A · ∇log π(y_t | x, y_<t) ],

which removes most of the mismatch's bias while bounding the variance that the full ratio brings.
On the exact testbed (exact.py) we compute, for a sampler μ ≠ π, the expected gradient and the
per-sample variance of the plain, TIS (per token and per response) and full-IS estimators,
against the exact ∇E_π[r].
"""
import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from .. import exact as E
from ..losses import MAX_LOG_RATIO, rollout_correction_weights
from ..rollout import response_logprobs, sample
from ..tensor import Tensor, no_grad
from ..train.stages import prepare_folder
from . import report
from .starting_point import starting_point


@dataclass
class MismatchConfig:
    prompts: int = 200             # held-out prompts sampled
    samples_per_prompt: int = 8    # responses per prompt
    temperature: float = 0.7       # the sampling temperature of the τ ≠ 1 cases
    caps: tuple = (1.0, 1.5, 2.0, 5.0, 10.0, 100.0)  # TIS caps C of the exact sweep
    draws: int = 200               # random (π, μ, r) of the exact sweep
    noise: float = 0.05            # std of the logit noise of the "numerics" sampler of the exact sweep


HISTOGRAM_BINS = 55  # of log10 |log ρ_t| over [-10, 1]
QUICK = {"prompts": 40, "samples_per_prompt": 4, "draws": 20}


def tis_weights(logp, sampler_logp, mask, cap):
    """w_t = min(π(y_t)/μ(y_t), C) per token, 0 under the mask: ``losses.rollout_correction_weights``'s
    "tis"; cap=None or ∞: the full ratio π/μ, which that function (a truncation) does not offer."""
    mask = np.broadcast_to(np.asarray(mask, dtype=np.float64), np.shape(logp))
    if cap is not None and cap < np.inf:
        return rollout_correction_weights(logp, sampler_logp, mask, mode="tis", high=cap).data
    return np.exp(np.clip((np.asarray(logp) - np.asarray(sampler_logp)) * mask, -MAX_LOG_RATIO, MAX_LOG_RATIO)) * mask


# ----------------------------------------------------------- the GPT policy
def ratio_stats(logp, sampler_logp, mask):
    """Per-token log ρ = log π − log μ: its spread, the first token's against the rest's."""
    m = mask > 0
    log_ratio = (logp - sampler_logp)[m]
    first = (logp - sampler_logp)[:, 0][m[:, 0]]
    later = (logp - sampler_logp)[:, 1:][m[:, 1:]]
    q = np.quantile(log_ratio, [0.001, 0.01, 0.5, 0.99, 0.999])
    return {"tokens": int(m.sum()), "mean": float(log_ratio.mean()), "std": float(log_ratio.std()),
            "max_abs": float(np.abs(log_ratio).max()), "quantiles_0.1_1_50_99_99.9%": [float(v) for v in q],
            "mean_abs_first_token": float(np.abs(first).mean()),
            "mean_abs_later_tokens": float(np.abs(later).mean()) if later.size else 0.0,
            "share_outside_1pct": float((np.abs(np.expm1(log_ratio)) > 0.01).mean()),
            "share_truncated_at_2": float((log_ratio > np.log(2.0)).mean())}


def gradient_comparison(model, rollout, sampler_logp, advantages, cap=2.0):
    """The policy gradient −E[A Σ_t w_t ∇log π(y_t)] with w = 1 (plain), min(ρ, C) (TIS), ρ (IS):
    cosine of TIS's and IS's to the plain one, and the norms' ratios."""
    def grad(weights):
        model.zero_grad()
        logp = response_logprobs(model, rollout)
        loss = -(logp * Tensor(weights * advantages[:, None], dtype=logp.dtype)).sum() / len(rollout)
        loss.backward()
        return np.concatenate([np.asarray(p.grad, dtype=np.float64).ravel() for p in model.parameters()])
    with no_grad():
        logp = response_logprobs(model, rollout).data
    mask = np.asarray(rollout.mask)
    plain = grad(mask.astype(np.float64))
    out = {}
    for name, c in (("tis", cap), ("is", None)):
        g = grad(tis_weights(logp, sampler_logp, mask, c))
        out[name] = {"cosine_to_plain": float(g @ plain / (np.linalg.norm(g) * np.linalg.norm(plain) + 1e-300)),
                     "norm_ratio_to_plain": float(np.linalg.norm(g) / (np.linalg.norm(plain) + 1e-300))}
    model.zero_grad()
    return out


def gpt_cases(inputs, config, seed):
    """The four sampler/trainer pairings on held-out prompts, with ratio statistics and gradients."""
    env = inputs.env
    model32 = inputs.sft
    model64 = model32.copy()
    model64.to(np.float64)
    prompts = env.heldout_prompts[:config.prompts]
    index = np.arange(len(prompts))
    reward = env.rule_reward("heldout")
    cases = {}
    for tau in (1.0, config.temperature):
        rollout = sample(model32, prompts, index, config.samples_per_prompt, tau, env.max_new_tokens, env.eos_id,
                         env.pad_id, seed)
        r = np.asarray(reward(rollout.index, rollout.responses()), dtype=np.float64)
        group = r.reshape(-1, config.samples_per_prompt)
        advantages = (group - group.mean(axis=1, keepdims=True)).ravel()
        pairings = ([("float32 trainer, τ=1", model32, rollout), ("float64 trainer, τ=1", model64, rollout)]
                    if tau == 1.0 else
                    [(f"τ={tau}, applied", model64, rollout),
                     (f"τ={tau}, forgotten", model64, replace(rollout, temperature=1.0))])
        for name, model, scored in pairings:
            with no_grad():
                logp = np.asarray(response_logprobs(model, scored).data, dtype=np.float64)
            sampler_logp = np.asarray(rollout.logprobs, dtype=np.float64)
            mask = np.asarray(rollout.mask, dtype=np.float64)
            cases[name] = {**ratio_stats(logp, sampler_logp, mask),
                           "histogram_log10_abs": np.histogram(
                               np.clip(np.log10(np.abs(logp - sampler_logp)[mask > 0] + 1e-12), -10, 1),
                               bins=HISTOGRAM_BINS, range=(-10, 1))[0].tolist(),
                           "gradient": gradient_comparison(model, scored, sampler_logp, advantages),
                           "reward": float(r.mean())}
    return cases


# ---------------------------------------------------------- the exact testbed
def per_response_gradients(policy):
    """∇_θ log π(y_t | y_<t) for every response and position: (S, L, P·V), 0 after each response ends."""
    lang = policy.language
    S, L = lang.tokens.shape
    out = np.zeros((S, L, policy.logits.numpy().size))
    for s in range(S):
        for t in range(int(lang.mask[s].sum())):
            policy.zero_grad()
            policy.token_logprobs([s])[0, t].backward()
            out[s, t] = policy.logits.grad.ravel()
    return out


def estimator_moments(policy, sampler, rewards, per_token_grads, weighting, cap):
    """(E_μ[g], E_μ‖g − E g‖²) of g(y) = r(y) Σ_t w_t ∇log π(y_t), y ~ μ (exact sums over responses).

    weighting "plain": w = 1; "token": w_t = min(ρ_t, C); "sequence": w_t = min(Π_s ρ_s, C) on every token.
    """
    lang = policy.language
    logp, mu_logp = policy.token_logprobs().numpy(), sampler.token_logprobs().numpy()
    mu = np.exp(mu_logp.sum(axis=1))
    if weighting == "plain":
        w = lang.mask
    elif weighting == "token":
        w = tis_weights(logp, mu_logp, lang.mask, cap)
    else:
        seq = tis_weights(logp.sum(axis=1, keepdims=True), mu_logp.sum(axis=1, keepdims=True), 1.0, cap)
        w = seq * lang.mask
    g = rewards[:, None] * np.einsum("sl,slp->sp", w, per_token_grads)
    mean = mu @ g
    return mean, float(mu @ ((g - mean) ** 2).sum(axis=1))


def exact_sweep(config, rng):
    """Bias (relative error of E_μ[g] to ∇E_π[r]) and variance (÷‖∇E_π[r]‖²) of each estimator and cap,
    for a sampler with small logit noise ("numerics") and one at temperature τ ("temperature")."""
    lang = E.TabularLanguage(3, 3)
    rows = {}
    for _ in range(config.draws):
        logits = rng.normal(size=(lang.num_prefixes, lang.vocab_size))
        policy = E.TabularPolicy(lang, logits)
        rewards = rng.normal(size=lang.num_responses)
        grads = per_response_gradients(policy)
        truth = np.exp(policy.sequence_logprobs().numpy()) @ (rewards[:, None] * grads.sum(axis=1))
        scale = np.linalg.norm(truth) + 1e-300
        samplers = {"numerics": E.TabularPolicy(lang, logits + config.noise * rng.normal(size=logits.shape)),
                    "temperature": E.TabularPolicy(lang, logits / config.temperature)}
        for kind, sampler in samplers.items():
            for weighting in ("plain", "token", "sequence"):
                for cap in ((None,) if weighting == "plain" else config.caps + (None,)):
                    mean, var = estimator_moments(policy, sampler, rewards, grads, weighting, cap)
                    key = f"{kind}/{weighting}/{'inf' if cap is None else cap}"
                    rows.setdefault(key, []).append((np.linalg.norm(mean - truth) / scale, var / scale ** 2))
    return {k: {"bias": float(np.mean([b for b, _ in v])), "variance": float(np.mean([s for _, s in v]))}
            for k, v in rows.items()}


def run(out, quick=False, seed=0, sft=None, progress=True, overwrite=False, **overrides):
    """Write ``out/results.json`` and ``out/mismatch.png``; returns the results."""
    config = MismatchConfig(**{**(QUICK if quick else {}), **overrides})
    prepare_folder(out, overwrite, "lab run")
    start = time.time()
    inputs = starting_point(out, seed, quick, sft, progress)
    results = {"experiment": "mismatch", "seed": seed, "quick": quick, "settings": asdict(config),
               "gpt": gpt_cases(inputs, config, seed),
               "exact": exact_sweep(config, np.random.default_rng([seed, 14, 5]))}
    return report.finish(out, results, start, plot)


def plot(results, out):
    plt = report.pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    ax = axes[0]
    edges = np.linspace(-10, 1, HISTOGRAM_BINS + 1)
    for name, case in results["gpt"].items():
        ax.stairs(case["histogram_log10_abs"], edges, label=f"{name} (max |log ρ| {case['max_abs']:.2g})")
    ax.set(xlabel="log10 |log ρ_t|,  log ρ_t = log π_trainer(y_t) − log μ_sampler(y_t)  (0 → −10)",
           ylabel="tokens", title="per-token ratio, sampler vs trainer")
    ax.legend(fontsize=7)
    ax = axes[1]
    names = list(results["gpt"])
    y = np.arange(len(names))
    ax.barh(y - 0.2, [results["gpt"][n]["mean_abs_first_token"] for n in names], 0.4, label="first token")
    ax.barh(y + 0.2, [results["gpt"][n]["mean_abs_later_tokens"] for n in names], 0.4, label="later tokens")
    ax.set_yticks(y, names, fontsize=8)
    ax.set(xscale="log", xlabel="mean |log ρ_t|", title="where the ratio moves")
    ax.legend(fontsize=8)
    ax = axes[2]
    caps = results["settings"]["caps"]
    exact = results["exact"]
    for kind, style in (("numerics", "-"), ("temperature", "--")):
        for weighting, color in (("token", "C0"), ("sequence", "C1")):
            ax.plot(caps, [exact[f"{kind}/{weighting}/{c}"]["bias"] for c in caps], style + "o", color=color,
                    label=f"{kind}: bias, TIS per {weighting}")
            ax.plot(caps, [exact[f"{kind}/{weighting}/{c}"]["variance"] for c in caps], style + "x", color=color,
                    alpha=0.5, label=f"{kind}: variance, TIS per {weighting}")
        ax.axhline(exact[f"{kind}/plain/inf"]["bias"], ls=style, color="gray", label=f"{kind}: bias, no weight")
    ax.set(xscale="log", yscale="log", xlabel="TIS cap C", ylabel="relative to ‖∇E_π[r]‖ (²)",
           title="exact testbed: what the cap does to the gradient")
    ax.legend(fontsize=6)
    return report.save(fig, out, "mismatch.png")
