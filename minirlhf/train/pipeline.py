"""The whole RLHF pipeline on the shipped addition task: ``minirlhf demo``.

    tokenizer ─▶ SFT on demonstrations (a budget that leaves the model partly right)
              ─▶ preference pairs: SFT samples + perturbed answers, labelled by a hidden rater (Bradley-Terry)
              ─▶ reward model (BT loss)       ─▶ PPO against the reward model, KL to SFT
              ─▶ GRPO on the rule reward       (groups of G samples, k3 KL to SFT)
              ─▶ DPO on the preference pairs   (offline, reference = SFT)
              ─▶ RLOO on the rule reward       (the plain policy-gradient baseline)

Every policy is evaluated on held-out problems that no stage trains on: pass@1 accuracy (samples
at temperature 1), greedy accuracy, the hidden gold reward, and KL to the SFT model.
"""
import dataclasses
import json
import os
import sys
import time

import numpy as np

from .. import backend
from ..model import GPT, GPTConfig, RewardModel
from ..tasks import AdditionTask, gold_score, label_pairs, perturbations, rule_reward, task_tokenizer
from .common import evaluate_policy, load_config, rollout
from .dpo import DPOConfig, train_dpo
from .grpo import GRPOConfig, train_grpo
from .ppo import PPOConfig, train_ppo, with_value_head
from .reward import RewardConfig, normalize_reward_model, pair_accuracy, pair_batch, train_reward_model
from .rloo import RLOOConfig, train_rloo
from .sft import SFTConfig, train_sft

POLICY_STAGES = ("sft", "ppo", "grpo", "dpo", "rloo")


def demo_settings(quick=False):
    """The demo's defaults; ``quick`` runs the same stages at the size a test can afford."""
    if quick:
        return {
            "task": {"digits": 2, "n_heldout": 100, "n_train_prompts": 1000},
            "model": {"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 32},
            "sft": {"steps": 400, "lr": 3e-3, "batch_size": 64, "warmup": 20, "min_lr": 3e-3},
            "preferences": {"prompts": 400, "samples": 4, "perturbations": 2, "pairs_per_prompt": 6,
                            "heldout_prompts": 100, "temperature": 0.05},
            "rm": {"steps": 400, "lr": 1e-3, "min_lr": 1e-4, "batch_size": 32},
            "ppo": {"steps": 50, "lr": 1e-4, "prompts_per_step": 64, "beta": 0.5, "epochs": 2},
            "grpo": {"steps": 80, "lr": 3e-4, "prompts_per_step": 16, "group_size": 8},
            "dpo": {"steps": 120, "lr": 1e-4, "batch_size": 32, "beta": 0.5},
            "rloo": {"steps": 80, "lr": 3e-4, "prompts_per_step": 16, "group_size": 8},
            "eval_samples": 4,
        }
    return {
        "task": {"digits": 2, "n_heldout": 200, "n_train_prompts": 4000},
        "model": {"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 32},
        "sft": {"steps": 400, "lr": 3e-3, "batch_size": 64, "warmup": 20, "min_lr": 3e-3},
        "preferences": {"prompts": 3000, "samples": 8, "perturbations": 2, "pairs_per_prompt": 6,
                        "heldout_prompts": 200, "temperature": 0.05},
        "rm": {"steps": 4000, "lr": 1e-3, "min_lr": 1e-4, "batch_size": 64},
        "ppo": {"steps": 400, "lr": 1e-4, "prompts_per_step": 128, "beta": 0.5, "epochs": 2},
        "grpo": {"steps": 300, "lr": 3e-4, "prompts_per_step": 16, "group_size": 8},
        "dpo": {"steps": 400, "lr": 3e-4, "batch_size": 64, "beta": 0.5},
        "rloo": {"steps": 300, "lr": 3e-4, "prompts_per_step": 16, "group_size": 8},
        "eval_samples": 4,
    }


class AdditionEnvironment:
    """The task, its tokenizer and prompts, and the two scores as functions of (prompt index, response ids)."""

    def __init__(self, digits, n_heldout, n_train_prompts, seed):
        self.task = AdditionTask(digits, n_heldout, seed=seed)
        self.tokenizer = task_tokenizer(self.task)
        self.train = self.task.train_problems(n_train_prompts, np.random.default_rng([seed, 1]))
        self.heldout = self.task.heldout
        self.train_prompts = [self.task.prompt_ids(self.tokenizer, p) for p in self.train]
        self.heldout_prompts = [self.task.prompt_ids(self.tokenizer, p) for p in self.heldout]
        self.eos_id, self.pad_id = self.tokenizer.eos_id, self.tokenizer.pad_id
        self.max_new_tokens = digits + 3  # the answer has at most digits + 1 digits, then <|im_end|>

    def text(self, response):
        if response and response[-1] == self.eos_id:
            response = response[:-1]
        return self.tokenizer.decode(response)

    def scorer(self, problems, score):
        return lambda index, responses: [score(self.text(r), problems[i]) for i, r in zip(index, responses)]

    def demonstrations(self, n, seed):
        problems = self.task.train_problems(n, np.random.default_rng([seed, 2]))
        return [self.task.demonstration(self.tokenizer, p) for p in problems]


def preference_pairs(env, policy, problems, prompts, settings, seed):
    """Labelled (prompt, chosen, rejected) token triples, and the (better, worse) triples by the gold order.

    Candidates per prompt: samples of the SFT policy at temperature 1, the right answer, and
    perturbations of it; the hidden rater labels each pair by one Bradley-Terry draw.
    """
    batch = rollout(policy, prompts, np.arange(len(prompts)), settings["samples"], 1.0, env.max_new_tokens,
                    env.eos_id, env.pad_id, seed)
    sampled = batch.responses()
    rng = np.random.default_rng([seed, 3])
    labelled, gold_ordered = [], []
    k = settings["samples"]
    for i, problem in enumerate(problems):
        ids = {env.text(r): r for r in sampled[i * k:(i + 1) * k]}  # samples keep their own tokens
        wrong = perturbations(problem.answer, rng)
        wrong = [wrong[j] for j in rng.permutation(len(wrong))[:settings["perturbations"]]]
        for text in [str(problem.answer)] + wrong:
            ids.setdefault(text, env.task.answer_ids(env.tokenizer, text))
        for pair in label_pairs(problem, list(ids), settings["pairs_per_prompt"], rng, settings["temperature"]):
            chosen, rejected = ids[pair.chosen], ids[pair.rejected]
            labelled.append((prompts[i], chosen, rejected))
            gold_ordered.append((prompts[i], chosen, rejected) if pair.gold_chosen > pair.gold_rejected
                                else (prompts[i], rejected, chosen))
    return labelled, gold_ordered


def stage_dir(out, name):
    path = os.path.join(out, name)
    os.makedirs(path, exist_ok=True)
    return path


def evaluate(env, policy, sft, samples, seed):
    """The held-out metrics of ``policy`` (see :func:`minirlhf.train.common.evaluate_policy`)."""
    return evaluate_policy(policy, sft, env.heldout_prompts, env.scorer(env.heldout, rule_reward),
                           env.scorer(env.heldout, gold_score), env.eos_id, env.pad_id, env.max_new_tokens,
                           samples, seed=seed + 17)


def sft_stage(env, model_settings, settings, seed, out_dir, resume=False):
    """A fresh GPT fine-tuned on demonstrations of the training problems; returns (model, history)."""
    backend.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=env.tokenizer.vocab_size, **model_settings))
    config = load_config(SFTConfig, defaults=settings, seed=seed, pad_id=env.pad_id)
    demos = env.demonstrations(config.steps * config.batch_size, seed)
    log = os.path.join(out_dir, "metrics.jsonl")
    if not resume and os.path.exists(log):
        os.remove(log)
    history = train_sft(model, demos, config, out_dir=out_dir, resume=resume, log=log)
    return model, history


def preference_stage(env, sft, settings, seed):
    """Labelled pairs on training prompts, and gold-ordered pairs on held-out prompts (for evaluation)."""
    n, m = settings["prompts"], settings["heldout_prompts"]
    train_pairs, _ = preference_pairs(env, sft, env.train[:n], env.train_prompts[:n], settings, seed + 1)
    _, heldout_pairs = preference_pairs(env, sft, env.heldout[:m], env.heldout_prompts[:m], settings, seed + 2)
    return train_pairs, heldout_pairs


def reward_stage(env, sft, train_pairs, heldout_pairs, config, out_dir, resume=False, progress=True):
    """A reward model from the SFT trunk, trained with BT and normalised; returns (rm, history, metrics)."""
    rm = RewardModel.from_gpt(sft)
    history = train_reward_model(rm, train_pairs, config, env.pad_id, out_dir=out_dir, resume=resume,
                                 log=os.path.join(out_dir, "metrics.jsonl"), progress=progress)
    normalize_reward_model(rm, *pair_batch(train_pairs, env.pad_id))
    metrics = {"pair_accuracy": pair_accuracy(rm, heldout_pairs, env.pad_id),
               "train_pairs": len(train_pairs), "heldout_pairs": len(heldout_pairs)}
    return rm, history, metrics


def policy_stage(name, env, sft, config, out_dir, resume=False, progress=True, reward_model=None, pairs=None):
    """Train a copy of the SFT model with trainer ``name`` (ppo, grpo, dpo, rloo); returns (policy, history)."""
    log = os.path.join(out_dir, "metrics.jsonl")
    common = dict(out_dir=out_dir, resume=resume, log=log, progress=progress)
    if name == "dpo":
        policy = sft.copy()
        return policy, train_dpo(policy, sft, pairs, config, env.pad_id, **common)
    common.update(eos_id=env.eos_id, pad_id=env.pad_id)
    if name == "ppo":
        policy = with_value_head(sft)
        return policy, train_ppo(policy, sft, reward_model, env.train_prompts, config, **common)
    policy = sft.copy()
    train = {"grpo": train_grpo, "rloo": train_rloo}[name]
    return policy, train(policy, sft, env.train_prompts, env.scorer(env.train, rule_reward), config, **common)


TRAINER_CONFIGS = {"rm": RewardConfig, "ppo": PPOConfig, "grpo": GRPOConfig, "dpo": DPOConfig, "rloo": RLOOConfig}


def stage_config(name, settings, env, seed, path=None, **overrides):
    """The config of stage ``name``: the demo's defaults, then a JSON file, then flags."""
    defaults = dict(settings[name], seed=seed)
    if "max_new_tokens" in {f.name for f in dataclasses.fields(TRAINER_CONFIGS[name])}:
        defaults["max_new_tokens"] = env.max_new_tokens
    return load_config(TRAINER_CONFIGS[name], path, defaults=defaults, **overrides)


def run_demo(out="minirlhf-demo", quick=False, seed=0, progress=True, stream=None):
    """Run every stage, write ``out/results.json`` (and a plot if matplotlib is there); return the results."""
    stream = stream if stream is not None else sys.stdout
    settings = demo_settings(quick)
    os.makedirs(out, exist_ok=True)
    started = time.time()
    env = AdditionEnvironment(**settings["task"], seed=seed)
    env.tokenizer.save(os.path.join(out, "tokenizer"))
    histories, stages, timings = {}, {}, {}

    def timed(name, fn):
        t = time.time()
        result = fn()
        timings[name] = round(time.time() - t, 1)
        return result

    sft, histories["sft"] = timed("sft", lambda: sft_stage(env, settings["model"], settings["sft"], seed,
                                                          stage_dir(out, "sft")))
    stages["sft"] = evaluate(env, sft, sft, settings["eval_samples"], seed)
    train_pairs, heldout_pairs = timed("preferences", lambda: preference_stage(env, sft, settings["preferences"],
                                                                              seed))
    rm, histories["rm"], stages["rm"] = timed("rm", lambda: reward_stage(
        env, sft, train_pairs, heldout_pairs, stage_config("rm", settings, env, seed), stage_dir(out, "rm"),
        progress=progress))
    for name in ("ppo", "grpo", "dpo", "rloo"):
        policy, histories[name] = timed(name, lambda: policy_stage(
            name, env, sft, stage_config(name, settings, env, seed), stage_dir(out, name), progress=progress,
            reward_model=rm, pairs=train_pairs))
        stages[name] = evaluate(env, policy, sft, settings["eval_samples"], seed)

    results = {"seconds": round(time.time() - started, 1), "seed": seed, "quick": quick,
               "kl_estimator": KL_ESTIMATOR, "stages": stages, "settings": settings}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(out, "timings.json"), "w") as f:
        json.dump({"seconds": results["seconds"], "stages": timings}, f, indent=2)
    stream.write(format_table(results) + "\n")
    stream.write(save_plot(histories, os.path.join(out, "training.png")) + "\n")
    return results


KL_ESTIMATOR = ("exact per-token KL(pi || pi_sft) over the vocabulary, summed over the response and averaged "
                "over held-out samples at temperature 1")


def format_table(results):
    """The results as a text table; a stage whose greedy accuracy is below the SFT model's is flagged."""
    stages = results["stages"]
    sft_greedy = stages["sft"]["greedy_accuracy"]
    lines = [f"{'stage':<6} {'pass@1':>7} {'greedy':>7} {'gold':>6} {'KL(sft)':>8}",
             "-" * 38]
    for name in POLICY_STAGES:
        if name not in stages:
            continue
        s = stages[name]
        flag = "  << greedy below SFT" if s["greedy_accuracy"] < sft_greedy else ""
        lines.append(f"{name:<6} {s['accuracy']:>7.3f} {s['greedy_accuracy']:>7.3f} {s['gold_reward']:>6.3f} "
                     f"{s['kl_to_sft']:>8.3f}{flag}")
    if "rm" in stages:
        lines.append(f"reward model: held-out pair accuracy {stages['rm']['pair_accuracy']:.3f} "
                     f"({stages['rm']['heldout_pairs']} pairs ordered by the gold score)")
    lines.append(f"pass@1 = mean rule reward of samples at temperature 1; KL = {results['kl_estimator']}")
    lines.append(f"total {results['seconds']:.0f} s")
    return "\n".join(lines)


def save_plot(histories, path):
    """Reward and KL against steps for each trainer (a PNG); says how to get matplotlib if it is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install matplotlib)"
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name in ("ppo", "grpo", "rloo"):
        steps = [m["step"] for m in histories.get(name, [])]
        axes[0].plot(steps, [m["reward"] for m in histories[name]], label=name)
        axes[1].plot(steps, [m["kl"] for m in histories[name]], label=name)
    dpo = histories.get("dpo", [])
    axes[2].plot([m["step"] for m in dpo], [m["reward_margin"] for m in dpo], label="dpo")
    titles = ("training reward (PPO: reward model; GRPO, RLOO: rule)", "KL to SFT per response (k1, rollouts)",
              "DPO implicit reward margin")
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"plot: {path}"
