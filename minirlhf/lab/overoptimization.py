"""Reward over-optimisation (Gao, Schulman & Hilton 2022, "Scaling Laws for Reward Model
Overoptimization"), on the addition task, whose hidden gold score makes the true reward observable.

    gold      g(y), the hidden rater's graded score (tasks/preferences.py); never trained on
    proxies   reward models r_k: the SFT trunk trained with the Bradley-Terry loss on the first k
              labelled pairs, for each k in ``proxy_pairs`` (fewer pairs: a worse proxy)
    d         √KL(π ‖ π_SFT), the distance the optimisation travelled

Best-of-n. Draw y_1..y_n from π_SFT, keep the one the proxy scores highest. On a finite support
the distribution of the pick is exact: with F(s) = P_π(r ≤ s) and F⁻(s) = P_π(r < s),

    P(pick = y) = π(y) / π(r = r_y) · (F(r_y)ⁿ − F⁻(r_y)ⁿ)                  (ties shared in proportion to π)

and KL(π_BoN ‖ π) = Σ_y P(pick = y) log(P(pick = y)/π(y)). The often-quoted log n − (n−1)/n
(as Stiennon et al. 2020 and Gao et al. 2022 use it) is an upper bound of it, approached only when
the n draws are almost surely distinct (Beirami et al. 2024, "Theoretical guarantees on the
best-of-n alignment policy"). The support of π_SFT is the distinct responses among
``support_samples`` samples per prompt, their probabilities π(y|x) exact and renormalised over it.

RL. PPO from SFT against each proxy, at each KL coefficient in ``rl_betas``, evaluated along
training (the trainer's ``log`` hook) on held-out prompts: gold, proxy and rule reward of
temperature-1 samples and the exact per-token KL summed over the response
(train.evaluate.evaluate_policy). GRPO and RLOO with the best proxy as their reward, at the same
coefficients, and DPO on the same labelled pairs at ``dpo_betas``, evaluated the same way.

Fits (Gao et al. 2022, eq. 1 and 2), of the gold score's gain over SFT, R = g − g_SFT:

    best-of-n   R(d) = d (α − β d)
    RL          R(d) = d (α − β log d)

both linear in (α, β), so least squares solves them exactly.

Frontier. The rule reward (held-out pass@1) against KL, for best-of-n, PPO, GRPO, RLOO (all three
against the best proxy) and DPO (on the same labelled pairs) at their β sweeps.
"""
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from ..model import RewardModel
from ..rollout import from_responses, sample, sequence_logprobs
from ..tasks.environment import AdditionEnvironment
from ..tensor import no_grad
from ..train.dpo import train_dpo
from ..train.evaluate import evaluate_policy
from ..train.grpo import train_grpo
from ..train.ppo import train_ppo, with_value_head
from ..train.reward import normalize_reward_model, pair_accuracy, pair_batch, score_rollout, train_reward_model
from ..train.rloo import train_rloo
from ..train.stages import STAGES, Inputs, prepare_folder, prepare_out, run_stage, stage_settings, write_json
from ..validation import is_nonnegative, is_positive_int, require
from .report import NO_MATPLOTLIB, markdown_table, pyplot


@dataclass
class OveroptimizationConfig:
    """The experiment's own settings; the trainers' other settings are their stages' (``--quick``: QUICK)."""
    proxy_pairs: tuple = (250, 1000, 4000)  # labelled pairs of each proxy, weakest first
    bon_n: tuple = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # n of best-of-n
    support_samples: int = 512     # SFT samples per prompt whose distinct responses make π_SFT's support
    bon_prompts: int = 200         # held-out prompts of the best-of-n curves
    rl_betas: tuple = (0.0, 0.02, 0.1, 0.5)  # KL coefficients of PPO, GRPO and RLOO
    dpo_betas: tuple = (0.05, 0.1, 0.5, 2.0)  # DPO's β
    rl_steps: int = 24             # optimizer steps of each PPO, GRPO and RLOO run
    dpo_steps: int = 48            # optimizer steps of each DPO run
    eval_every: int = 6            # steps between evaluations along training
    eval_prompts: int = 60         # held-out prompts of each evaluation
    eval_samples: int = 4          # samples per prompt of each evaluation

    def __post_init__(self):
        for name in ("proxy_pairs", "bon_n"):
            require(self, name, lambda v: len(v) > 0 and all(is_positive_int(x) for x in v),
                    "a non-empty list of integers >= 1")
        require(self, "proxy_pairs", lambda v: len(v) >= 2 and list(v) == sorted(set(v)),
                "at least two increasing pair counts")
        for name in ("rl_betas", "dpo_betas"):
            require(self, name, lambda v: len(v) > 0 and all(is_nonnegative(x) for x in v),
                    "a non-empty list of finite numbers >= 0")
        require(self, "dpo_betas", lambda v: all(x > 0 for x in v), "numbers > 0 (DPO divides by β)")
        for name in ("support_samples", "bon_prompts", "rl_steps", "dpo_steps", "eval_every", "eval_prompts",
                     "eval_samples"):
            require(self, name, is_positive_int, "a positive integer")


# the trainers' settings the experiment changes from their stages' defaults (``--quick``: from their QUICK)
TRAINERS = {"RewardConfig": {"steps": 600}, "PPOConfig": {"prompts_per_step": 64}}
# ``--quick``: the experiment at the size the test suite affords (overrides of the defaults above)
QUICK = {"proxy_pairs": (75, 300, 1200), "support_samples": 128, "bon_prompts": 60, "rl_steps": 8, "dpo_steps": 16,
         "eval_every": 4, "eval_prompts": 30}
QUICK_TRAINERS = {"RewardConfig": {"steps": 100}, "PPOConfig": {"prompts_per_step": 32},
                  "GRPOConfig": {"prompts_per_step": 8}, "RLOOConfig": {"prompts_per_step": 8}}


# ------------------------------------------------------------------ the math of best-of-n
def best_of_n_kl_bound(n):
    """log n − (n−1)/n: the analytic KL(π_BoN ‖ π), an upper bound of the true one (Beirami et al. 2024)."""
    if not is_positive_int(n):
        raise ValueError(f"best_of_n_kl_bound: n must be an integer >= 1, got {n!r}")
    return math.log(n) - (n - 1) / n


def best_of_n_probabilities(probs, scores, n):
    """P(pick = y) of best-of-n over a finite support (the module docstring's formula), (K,).

    probs: π(y) of each response (K,), positive, renormalised to sum to 1; scores: r(y) (K,).
    """
    if not is_positive_int(n):
        raise ValueError(f"best_of_n_probabilities: n must be an integer >= 1, got {n!r}")
    probs, scores = np.asarray(probs, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    if probs.ndim != 1 or probs.shape != scores.shape or len(probs) == 0:
        raise ValueError(f"best_of_n_probabilities: probs and scores must be non-empty 1-d arrays of one length, "
                         f"got shapes {probs.shape} and {scores.shape}")
    if not (np.all(probs > 0) and np.all(np.isfinite(probs)) and np.all(np.isfinite(scores))):
        raise ValueError("best_of_n_probabilities: probs must be positive and finite, scores finite")
    probs = probs / probs.sum()
    levels, level_of = np.unique(scores, return_inverse=True)           # ascending distinct scores
    mass = np.bincount(level_of, weights=probs, minlength=len(levels))  # π(r = s)
    below = np.concatenate([[0.0], np.cumsum(mass)[:-1]])               # F⁻(s)
    at_or_below = np.minimum(below + mass, 1.0)                         # F(s)
    best_is_level = at_or_below ** n - below ** n                       # P(max of n scores = s)
    return probs * (best_is_level / mass)[level_of]


def kl_divergence(p, q):
    """KL(p ‖ q) = Σ p log(p/q) over the support of p (>= 0; a rounding error below 0 is returned as 0)."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    q = q / q.sum()
    on = p > 0
    return max(0.0, float(np.sum(p[on] * np.log(p[on] / q[on]))))


@dataclass
class Support:
    """π_SFT's distinct responses to each prompt: ``rows[i]`` the rows of prompt i in ``responses``."""
    responses: list                # token lists
    index: np.ndarray              # which prompt each response answers
    probs: np.ndarray              # π_SFT(y|x), exact
    rows: list                     # per prompt, its rows
    covered: np.ndarray            # per prompt, Σ π_SFT(y|x) over its support


def enumerate_support(sft, prompts, samples, env, seed, chunk=512):
    """The distinct responses among ``samples`` SFT samples per prompt, with their exact probabilities."""
    drawn = sample(sft, prompts, np.arange(len(prompts)), samples, 1.0, env.max_new_tokens, env.eos_id, env.pad_id,
                   seed)
    responses, index, rows = [], [], []
    for i, start in enumerate(range(0, len(drawn), samples)):
        distinct = sorted({tuple(r) for r in drawn.rows(slice(start, start + samples)).responses()})
        rows.append(np.arange(len(responses), len(responses) + len(distinct)))
        responses += [list(r) for r in distinct]
        index += [i] * len(distinct)
    index = np.asarray(index)
    logp = []
    with no_grad():
        for s in range(0, len(responses), chunk):
            part = from_responses([prompts[i] for i in index[s:s + chunk]], responses[s:s + chunk], env.pad_id)
            logp.append(sequence_logprobs(sft, part).data.astype(np.float64))
    probs = np.exp(np.concatenate(logp))
    return Support(responses, index, probs, rows, np.array([probs[r].sum() for r in rows]))


def best_of_n_curve(support, selector, values, ns):
    """For each n: the mean over prompts of KL(π_BoN ‖ π_SFT) and of each of ``values`` (name → per-response
    array) under π_BoN, where the pick maximises ``selector`` (per-response array)."""
    curve = []
    for n in ns:
        kls, means = [], {name: [] for name in values}
        for rows in support.rows:
            p_bon = best_of_n_probabilities(support.probs[rows], selector[rows], n)
            kls.append(kl_divergence(p_bon, support.probs[rows]))
            for name, v in values.items():
                means[name].append(float(p_bon @ v[rows]))
        curve.append({"n": n, "kl": float(np.mean(kls)), "kl_analytic": best_of_n_kl_bound(n),
                      **{name: float(np.mean(m)) for name, m in means.items()}})
    return curve


# ------------------------------------------------------------------ fits
FORMS = {
    "bon": lambda d: np.stack([d, -d * d], axis=1),                                 # d(α − β d)
    "rl": lambda d: np.stack([d, -d * np.log(np.where(d > 0, d, 1.0))], axis=1),    # d(α − β log d)
}


def fit_gain(d, gain, form):
    """Least-squares α, β of ``form`` ("bon" or "rl") to the gold gain R over d = √KL, and R² of the fit."""
    if form not in FORMS:
        raise ValueError(f"fit_gain: form must be one of {sorted(FORMS)}, got {form!r}")
    d, gain = np.asarray(d, dtype=np.float64), np.asarray(gain, dtype=np.float64)
    if d.shape != gain.shape or d.ndim != 1 or not np.all(d >= 0) or not np.all(np.isfinite(gain)):
        raise ValueError(f"fit_gain: d must be a 1-d array of finite values >= 0 and gain finite, of one shape; "
                         f"got shapes {d.shape}, {gain.shape}")
    X = FORMS[form](d)
    (alpha, beta), *_ = np.linalg.lstsq(X, gain, rcond=None)
    residual = float(np.sum((gain - X @ np.array([alpha, beta])) ** 2))
    total = float(np.sum((gain - gain.mean()) ** 2))
    return {"form": form, "alpha": float(alpha), "beta": float(beta),
            "r2": 1.0 - residual / total if total > 0 else float("nan"), "points": int(len(d))}


def fitted(fit, d):
    d = np.asarray(d, dtype=np.float64)
    return FORMS[fit["form"]](d) @ np.array([fit["alpha"], fit["beta"]])


# ------------------------------------------------------------------ RL, evaluated along training
class Evaluation:
    """The held-out scores of a policy: rule, gold, a proxy's score and the exact KL to SFT.

    evaluate_policy gives rule, gold and KL; the proxy scores the same samples (the same seed draws them).
    """

    def __init__(self, env, sft, config, seed):
        self.env, self.sft, self.seed = env, sft, seed
        self.prompts = env.heldout_prompts[:config.eval_prompts]
        self.samples = config.eval_samples

    def __call__(self, policy, proxy):
        env = self.env
        metrics = evaluate_policy(policy, self.sft, self.prompts, env.rule_reward("heldout"),
                                  env.gold_score("heldout"), env.eos_id, env.pad_id, env.max_new_tokens,
                                  self.samples, seed=self.seed)
        drawn = sample(policy, self.prompts, np.arange(len(self.prompts)), self.samples, 1.0, env.max_new_tokens,
                       env.eos_id, env.pad_id, self.seed)
        return {"kl": metrics["kl_to_sft"], "gold": metrics["gold_reward"], "rule": metrics["accuracy"],
                "proxy": float(score_rollout(proxy, drawn).mean())}

    def along(self, policy, proxy, every, points):
        """A trainer's ``log`` hook: appends an evaluation to ``points`` every ``every`` steps."""
        def log(metrics):
            if metrics["step"] % every == 0:
                points.append({"step": metrics["step"], **self(policy, proxy)})
        return log


def proxy_reward(proxy, prompts, pad_id):
    """The proxy as a reward function of (prompt index, responses), for GRPO and RLOO."""
    def reward(index, responses):
        return score_rollout(proxy, from_responses([prompts[i] for i in index], responses, pad_id))
    return reward


def rl_run(method, beta, proxy, inputs, trainer_config, config, evaluation, start_point, progress, pairs=None):
    """One PPO / GRPO / RLOO run against ``proxy`` (DPO: on the labelled ``pairs``), evaluated along training."""
    env, sft = inputs.env, inputs.sft
    points = [{"step": 0, **start_point}]
    steps = config.dpo_steps if method == "dpo" else config.rl_steps
    trainer_config = replace(trainer_config, beta=beta, steps=steps)
    if method == "ppo":
        policy = with_value_head(sft)
        log = evaluation.along(policy, proxy, config.eval_every, points)
        train_ppo(policy, sft, proxy, env.train_prompts, trainer_config, env.eos_id, env.pad_id, log=log,
                  progress=progress)
    elif method == "dpo":
        policy = sft.copy()
        train_dpo(policy, sft, pairs, trainer_config, env.pad_id,
                  log=evaluation.along(policy, proxy, config.eval_every, points), progress=progress)
    else:
        policy = sft.copy()
        train = {"grpo": train_grpo, "rloo": train_rloo}[method]
        train(policy, sft, env.train_prompts, proxy_reward(proxy, env.train_prompts, env.pad_id), trainer_config,
              env.eos_id, env.pad_id, log=evaluation.along(policy, proxy, config.eval_every, points),
              progress=progress)
    return {"method": method, "beta": beta, "points": points}


# ------------------------------------------------------------------ the experiment
def run_overoptimization(out, quick=False, seed=0, progress=True, overwrite=False, stream=None, **settings):
    """Run the experiment into ``out``: results.json, report.md and (with matplotlib) the two figures.

    ``settings``: fields of :class:`OveroptimizationConfig` (over the defaults, or QUICK with ``quick``).
    """
    stream = stream if stream is not None else sys.stdout
    config = OveroptimizationConfig(**{**(QUICK if quick else {}), **settings})
    prepare_folder(out, overwrite, "lab run")
    started, timings = time.time(), {}

    def say(text):
        stream.write(f"[{time.time() - started:5.0f}s] {text}\n")
        stream.flush()

    def trainer_config(stage_name):
        configs = stage_settings(STAGES[stage_name], quick,
                                 inherited={"seed": seed, "max_new_tokens": inputs.env.max_new_tokens})
        overrides = (QUICK_TRAINERS if quick else TRAINERS).get(type(configs[0]).__name__, {})
        return [replace(configs[0], **overrides), *configs[1:]]

    # SFT, as the sft stage runs it
    sft_stage = STAGES["sft"]
    sft_configs = stage_settings(sft_stage, quick, inherited={"seed": seed})
    inputs = Inputs(AdditionEnvironment(sft_configs[1], seed), seed)
    env = inputs.env
    prepare_out(os.path.join(out, "sft"), "sft", overwrite=True)
    _, _, sft_eval = run_stage(sft_stage, os.path.join(out, "sft"), inputs, sft_configs, progress=progress)
    sft = inputs.sft
    timings["sft"] = round(time.time() - started, 1)
    say(f"sft: held-out pass@1 {sft_eval['accuracy']:.3f}, gold {sft_eval['gold_reward']:.3f}")

    # proxies: the same trunk and steps, more or fewer labelled pairs
    t = time.time()
    rm_config, preference_config = trainer_config("rm")
    train_pairs, heldout_pairs = inputs.preference_pairs(preference_config)
    if config.proxy_pairs[-1] > len(train_pairs):
        raise ValueError(f"OveroptimizationConfig: proxy_pairs asks for {config.proxy_pairs[-1]} pairs but the "
                         f"preference data has {len(train_pairs)}; lower it or raise pair_prompts")
    proxies, proxy_info = [], []
    for k in config.proxy_pairs:
        proxy = RewardModel.from_gpt(sft)
        train_reward_model(proxy, train_pairs[:k], rm_config, env.pad_id, progress=progress)
        normalize_reward_model(proxy, *pair_batch(train_pairs[:k], env.pad_id))
        proxies.append(proxy)
        proxy_info.append({"pairs": k, "pair_accuracy": pair_accuracy(proxy, heldout_pairs, env.pad_id)})
        say(f"proxy on {k} pairs: held-out pair accuracy {proxy_info[-1]['pair_accuracy']:.3f}")
    timings["proxies"] = round(time.time() - t, 1)

    # best-of-n, exact over the enumerated support of π_SFT
    t = time.time()
    bon_prompts = env.heldout_prompts[:config.bon_prompts]
    support = enumerate_support(sft, bon_prompts, config.support_samples, env, seed + 31)
    gold = np.asarray(env.gold_score("heldout")(support.index, support.responses), dtype=np.float64)
    rule = np.asarray(env.rule_reward("heldout")(support.index, support.responses), dtype=np.float64)
    proxy_scores = [score_rollout(p, from_responses([bon_prompts[i] for i in support.index], support.responses,
                                                    env.pad_id)).astype(np.float64) for p in proxies]
    bon = [best_of_n_curve(support, s, {"proxy": s, "gold": gold, "rule": rule}, config.bon_n)
           for s in proxy_scores]
    bon_rule = best_of_n_curve(support, rule, {"gold": gold, "rule": rule}, config.bon_n)
    timings["best_of_n"] = round(time.time() - t, 1)
    say(f"best-of-n: {len(support.responses)} distinct responses on {len(bon_prompts)} prompts, "
        f"π_SFT mass covered {support.covered.mean():.3f} (min {support.covered.min():.3f})")

    # PPO against each proxy; GRPO, RLOO and DPO (the frontier) against the best one
    t = time.time()
    evaluation = Evaluation(env, sft, config, seed + 17)
    sft_points = [evaluation(sft, p) for p in proxies]
    rl = []
    configs = {m: trainer_config(m)[0] for m in ("ppo", "grpo", "rloo", "dpo")}
    best = len(proxies) - 1
    runs = [("ppo", k, beta) for k in range(len(proxies)) for beta in config.rl_betas]
    runs += [(m, best, beta) for m in ("grpo", "rloo") for beta in config.rl_betas]
    runs += [("dpo", best, beta) for beta in config.dpo_betas]
    for method, k, beta in runs:
        run = rl_run(method, beta, proxies[k], inputs, configs[method], config, evaluation, sft_points[k], progress,
                     pairs=train_pairs[:config.proxy_pairs[best]])
        rl.append({"proxy": k, **run})
        last = run["points"][-1]
        say(f"{method} β={beta}, proxy on {config.proxy_pairs[k]} pairs: KL {last['kl']:.2f}, proxy "
            f"{last['proxy']:.2f}, gold {last['gold']:.3f}, rule {last['rule']:.3f}")
    timings["rl"] = round(time.time() - t, 1)

    fits = []
    for k in range(len(proxies)):
        d = np.sqrt([b["kl"] for b in bon[k]])
        fits.append({"proxy": k, "method": "bon",
                     **fit_gain(d, np.array([b["gold"] for b in bon[k]]) - bon[k][0]["gold"], "bon")})
        for method in ("ppo", "grpo"):
            points = [p for r in rl if r["proxy"] == k and r["method"] == method for p in r["points"]]
            if points:
                d = np.sqrt(np.maximum([p["kl"] for p in points], 0.0))
                fits.append({"proxy": k, "method": method,
                             **fit_gain(d, np.array([p["gold"] for p in points]) - sft_points[k]["gold"], "rl")})

    timings["total"] = round(time.time() - started, 1)
    results = {"experiment": "overoptimization", "seed": seed, "quick": quick, "seconds": timings["total"],
               "timings": timings, "config": asdict(config),
               "trainer_configs": {m: asdict(c) for m, c in configs.items()}, "sft": sft_eval,
               "proxies": [{**info, "gold_peak": gold_peak(k, bon, rl)} for k, info in enumerate(proxy_info)],
               "support": {"responses": len(support.responses), "prompts": len(bon_prompts),
                           "samples_per_prompt": config.support_samples,
                           "covered_mean": float(support.covered.mean()), "covered_min": float(support.covered.min())},
               "dpo_pairs": min(config.proxy_pairs[best], len(train_pairs)),
               "bon": bon, "bon_rule": bon_rule, "rl": rl, "fits": fits}
    write_json(os.path.join(out, "results.json"), results)
    figures = save_figures(results, out)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(format_report(results, figures))
    say(f"done: {out}/results.json, report.md" + ("" if figures else f"; {NO_MATPLOTLIB}"))
    return results


def gold_peak(k, bon, rl):
    """The highest mean gold score proxy k reached, by best-of-n and by RL."""
    return {"bon": max(b["gold"] for b in bon[k]),
            "rl": max(p["gold"] for r in rl if r["proxy"] == k and r["method"] in ("ppo", "grpo")
                      for p in r["points"])}


# ------------------------------------------------------------------ figures and report
def save_figures(results, out):
    """overoptimization.png (one panel per proxy) and frontier.png; [] without matplotlib."""
    plt = pyplot()
    if plt is None:
        return []
    proxies, bon, rl, fits = results["proxies"], results["bon"], results["rl"], results["fits"]
    fig, axes = plt.subplots(1, len(proxies), figsize=(4.6 * len(proxies), 4.0), sharey=True, squeeze=False)
    for k, ax in enumerate(axes[0]):
        d_bon = np.sqrt([b["kl"] for b in bon[k]])
        ax.plot(d_bon, [b["gold"] for b in bon[k]], "o", color="C0", label="best-of-n gold")
        ax.plot(d_bon, [b["proxy"] for b in bon[k]], "o", color="C0", mfc="none", label="best-of-n proxy")
        ax.plot(np.sqrt([b["kl_analytic"] for b in bon[k]]), [b["gold"] for b in bon[k]], "x", color="C0",
                alpha=0.4, label="best-of-n gold at analytic KL")
        points = [p for r in rl if r["proxy"] == k and r["method"] == "ppo" for p in r["points"]]
        d_rl = np.sqrt(np.maximum([p["kl"] for p in points], 0.0))
        ax.plot(d_rl, [p["gold"] for p in points], "s", color="C3", ms=4, label="PPO gold")
        ax.plot(d_rl, [p["proxy"] for p in points], "s", color="C3", ms=4, mfc="none", label="PPO proxy")
        grpo = [p for r in rl if r["proxy"] == k and r["method"] == "grpo" for p in r["points"]]
        ax.plot(np.sqrt(np.maximum([p["kl"] for p in grpo], 0.0)), [p["gold"] for p in grpo], "^", color="C2",
                ms=4, label="GRPO gold")
        for fit, color, top in ((f, c, m) for f in fits if f["proxy"] == k
                                for m, c in (("bon", "C0"), ("ppo", "C3")) if f["method"] == m):
            d_max, g0 = (d_bon.max(), bon[k][0]["gold"]) if top == "bon" else (max(d_rl.max(), 1e-3), points[0]["gold"])
            grid = np.linspace(0, d_max, 100)
            ax.plot(grid, g0 + fitted(fit, grid), "-", color=color, lw=1,
                    label=f"fit {top}: α={fit['alpha']:.2f} β={fit['beta']:.2f} R²={fit['r2']:.2f}")
        ax.set_title(f"proxy on {proxies[k]['pairs']} pairs (pair acc. {proxies[k]['pair_accuracy']:.2f})",
                     fontsize=9)
        ax.set_xlabel("d = √KL(π ‖ π_SFT)  (nats^½)")
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("score (gold in [0, 1]; proxy normalised)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "overoptimization.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    best = len(proxies) - 1
    ax.plot(np.sqrt([b["kl"] for b in bon[best]]), [b["rule"] for b in bon[best]], "o-", color="C0",
            label="best-of-n (best proxy picks)")
    ax.plot(np.sqrt([b["kl"] for b in results["bon_rule"]]), [b["rule"] for b in results["bon_rule"]], "o--",
            color="C7", label="best-of-n (rule reward picks)")
    for method, color, marker in (("ppo", "C3", "s"), ("grpo", "C2", "^"), ("rloo", "C1", "v"), ("dpo", "C4", "D")):
        runs = [r for r in rl if r["proxy"] == best and r["method"] == method]
        for j, r in enumerate(runs):
            ax.plot(np.sqrt(np.maximum([p["kl"] for p in r["points"]], 0.0)), [p["rule"] for p in r["points"]],
                    marker=marker, color=color, ms=4, lw=0.8, alpha=0.35 + 0.65 * (j + 1) / len(runs),
                    label=f"{method} (β = {', '.join(str(x['beta']) for x in runs)}; darker = larger β)"
                    if j == 0 else None)
    ax.set_xlabel("√KL(π ‖ π_SFT)  (nats^½)")
    ax.set_ylabel("rule reward (held-out pass@1)")
    ax.set_title(f"reward–KL frontier (best-of-n, PPO, GRPO, RLOO: proxy on {proxies[best]['pairs']} pairs; "
                 f"DPO on {results.get('dpo_pairs', 'all the labelled')} pairs)", fontsize=8)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "frontier.png"), dpi=110)
    plt.close(fig)
    return ["overoptimization.png", "frontier.png"]


def format_report(results, figures):
    """report.md: the figures, the numbers, and what they show (each claim with its paper)."""
    proxies, bon, fits = results["proxies"], results["bon"], results["fits"]
    lines = [f"# Reward over-optimisation on the addition task (seed {results['seed']}"
             f"{', --quick' if results['quick'] else ''}, {results['seconds']:.0f} s)", ""]
    if figures:
        lines += [f"![{f}]({f})" for f in figures] + [""]
    else:
        lines += [NO_MATPLOTLIB, ""]
    lines += ["## Proxies", "", markdown_table(
        ["pairs", "held-out pair accuracy", "gold peak, best-of-n", "gold peak, RL"],
        [[p["pairs"], p["pair_accuracy"], p["gold_peak"]["bon"], p["gold_peak"]["rl"]] for p in proxies]), ""]
    s = results["support"]
    lines += ["## Best-of-n", "",
              f"Support of π_SFT: {s['responses']} distinct responses on {s['prompts']} held-out prompts from "
              f"{s['samples_per_prompt']} samples each; they carry {s['covered_mean']:.3f} of π_SFT's mass on "
              f"average (min {s['covered_min']:.3f}), renormalised to 1.", ""]
    header = ["n", "KL analytic", "KL measured"] + [f"gold ({p['pairs']} pairs)" for p in proxies]
    rows = [[b["n"], b["kl_analytic"], bon[-1][i]["kl"]] + [bon[k][i]["gold"] for k in range(len(proxies))]
            for i, b in enumerate(bon[0])]
    lines += [markdown_table(header, rows), "",
              "KL measured is for the best proxy's picks; every proxy's measured KL is at or below the analytic "
              f"value at every n (largest ratio measured/analytic over all proxies and n > 1: "
              f"{max_kl_ratio(bon):.3f}).", ""]
    lines += ["## Fits of the gold gain R = g − g_SFT, d = √KL", "", markdown_table(
        ["proxy pairs", "points", "form", "α", "β", "R²"],
        [[proxies[f["proxy"]]["pairs"], f"{f['method']} ({f['points']})",
          "d(α − β d)" if f["form"] == "bon" else "d(α − β log d)", f["alpha"], f["beta"], f["r2"]]
         for f in fits]), ""]
    lines += ["## What the run shows", "",
              f"Best-of-n values are exact expectations over the first {s['prompts']} held-out prompts; RL and DPO "
              f"points are {results['config']['eval_samples']} samples on each of the first "
              f"{results['config']['eval_prompts']} held-out prompts, so the two start (d = 0, the SFT policy) "
              "at slightly different values. Each fit is of the gain over its own start.", ""]
    lines += findings(results) + [""]
    return "\n".join(lines)


def max_kl_ratio(bon):
    return max(b["kl"] / b["kl_analytic"] for curve in bon for b in curve if b["n"] > 1)


FALL = 0.005  # a drop of the mean gold score below this is not called a fall


def findings(results):
    """Sentences read off the numbers: what appeared and what did not, each with its source."""
    proxies, bon, rl = results["proxies"], results["bon"], results["rl"]
    out = []
    for k, p in enumerate(proxies):
        curve = bon[k]
        peak = max(range(len(curve)), key=lambda i: curve[i]["gold"])
        proxy_rise = curve[-1]["proxy"] - curve[0]["proxy"]
        drop = curve[peak]["gold"] - curve[-1]["gold"]
        if drop > FALL:
            verdict = (f"peaks at n = {curve[peak]['n']} ({curve[peak]['gold']:.3f}) and falls by {drop:.3f} to "
                       f"{curve[-1]['gold']:.3f} at n = {curve[-1]['n']}")
        else:
            verdict = (f"reaches {curve[peak]['gold']:.3f} at n = {curve[peak]['n']} and does not fall by more than "
                       f"{FALL} up to n = {curve[-1]['n']} ({curve[-1]['gold']:.3f})")
        out.append(f"- Best-of-n, proxy on {p['pairs']} pairs: the proxy score of the pick rises by "
                   f"{proxy_rise:.2f} from n = 1 to {curve[-1]['n']}, while the gold score "
                   f"(from {curve[0]['gold']:.3f}) {verdict}.")
        runs = [r for r in rl if r["proxy"] == k and r["method"] == "ppo" and r["beta"] == 0]
        for r in runs:
            pts = r["points"]
            top = max(range(len(pts)), key=lambda i: pts[i]["gold"])
            out.append(f"  PPO at β = 0: KL {pts[-1]['kl']:.2f}, proxy {pts[0]['proxy']:.2f} → "
                       f"{pts[-1]['proxy']:.2f}, "
                       f"gold {pts[0]['gold']:.3f} → peak {pts[top]['gold']:.3f} (step {pts[top]['step']}) → "
                       f"{pts[-1]['gold']:.3f} at the end.")
    out.append("- Over-optimisation, where it appears, is what Gao, Schulman & Hilton (2022) report: the proxy "
               "keeps rising with KL while the gold score turns over; the functional forms fitted above are their "
               "eq. 1 (best-of-n) and eq. 2 (RL).")
    peaks = [p["gold_peak"] for p in proxies]
    best_peaks = [max(x["bon"], x["rl"]) for x in peaks]
    if all(a < b for a, b in zip(best_peaks, best_peaks[1:])):
        verdict = "they increase with the proxy's data, as Gao et al. (2022) find with reward-model size and data"
    else:
        verdict = ("they do not increase strictly with the proxy's data here (Gao et al. 2022 find that larger "
                   "reward models and more data give higher peaks)")
    out.append(f"- Highest gold score reached with each proxy (fewer → more pairs): "
               f"{', '.join(f'{x:.3f}' for x in best_peaks)}; {verdict}.")
    out.append(f"- The measured KL of best-of-n stays below log n − (n−1)/n (largest ratio "
               f"{max_kl_ratio(bon):.3f}). "
               "The formula is exact when the n draws are almost surely distinct (a continuous distribution of "
               "scores); π_SFT puts most of its mass on a few responses, so draws repeat, and as n grows the pick "
               "settles on the proxy's favourite response y* and the KL levels off at −log π_SFT(y*) instead of "
               "growing like log n. Beirami et al. (2024) prove the formula is an upper bound and show this gap.")
    out.append("- Frontier: every method's rule reward against the same KL; RL points are checkpoints along "
               "training at several β, best-of-n is exact. Stiennon et al. (2020) and Gao et al. (2022) find "
               "best-of-n more KL-efficient than RL. In this run, the share of each method's points (KL > 0, "
               "within best-of-n's KL range) whose gain in rule reward over its own start is below best-of-n's "
               "gain at the same KL (best proxy, interpolated): " + frontier_shares(results) + ".")
    return out


def frontier_shares(results):
    """'method below/points' for each RL method and DPO, against best-of-n with the best proxy."""
    curve = results["bon"][-1]
    kl, gain = [b["kl"] for b in curve], [b["rule"] - curve[0]["rule"] for b in curve]
    shares = []
    for method in ("ppo", "grpo", "rloo", "dpo"):
        below = total = 0
        for r in results["rl"]:
            if r["method"] != method or r["proxy"] != len(results["proxies"]) - 1:
                continue
            start = r["points"][0]["rule"]
            for p in r["points"][1:]:
                if 0 < p["kl"] <= kl[-1]:
                    total += 1
                    below += p["rule"] - start < np.interp(p["kl"], kl, gain)
        shares.append(f"{method} {below}/{total}")
    return ", ".join(shares)
