"""What the RLHF trainers share: configs, rollouts, log-probs of responses, evaluation, logs, checkpoints.

A response is always kept next to the prompt it answers, in two blocks:

    prompt_ids (B, T)   left-padded,  prompt_mask (B, T)   1 on real prompt tokens
    tokens     (B, N)   right-padded, mask        (B, N)   1 up to and including <|im_end|>

so the model reads ``[prompt | response]`` and the logits at column T−1+t predict response token t:

    log π(y_t | x, y_<t) = log_softmax(h_{T−1+t} · Wᵀ)[y_t]          (W the tied embedding)
"""
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, fields

import numpy as np

from .. import functional as F
from .. import losses
from ..checkpoint import load_checkpoint, save_checkpoint
from ..model import pad_batch
from ..optim import AdamW, clip_grad_norm_
from ..sampling import generate
from ..tensor import no_grad


# ------------------------------------------------------------------ configs
@dataclass
class TrainConfig:
    """Settings every trainer has; each trainer's config adds its own and checks them in ``check``."""
    steps: int = 100
    lr: float = 1e-4
    clip: float = 1.0              # max global gradient norm; 0 turns clipping off
    seed: int = 0
    checkpoint_every: int = 0      # steps between checkpoints in out_dir (0: only at the end)

    def __post_init__(self):
        self.check()

    def check(self):
        require(self, "steps", is_positive_int, "a positive integer")
        require(self, "lr", is_positive, "> 0")
        require(self, "clip", lambda v: is_number(v) and v >= 0, ">= 0 (0 = no clipping)")
        require(self, "seed", lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer")
        require(self, "checkpoint_every", lambda v: isinstance(v, int) and v >= 0, "a non-negative integer")


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_positive(v):
    return is_number(v) and v > 0


def is_positive_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def is_clip_eps(v):
    return is_number(v) and 0 < v < 1


def require(config, name, ok, expected):
    """Raise ``ValueError("GRPOConfig: group_size must be an integer >= 2, got 1")`` unless ``ok(value)``."""
    value = getattr(config, name)
    if not ok(value):
        raise ValueError(f"{type(config).__name__}: {name} must be {expected}, got {value!r}")


def load_config(cls, path=None, defaults=None, **overrides):
    """A ``cls`` config: ``defaults``, then a JSON file (optional), then ``overrides`` (None values ignored).

    Unknown keys are an error that lists the known ones, so a typo never passes silently.
    """
    values = {}
    if path is not None:
        try:
            with open(path) as f:
                values = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {path} is not valid JSON: {e}") from None
        if not isinstance(values, dict):
            raise ValueError(f"config file {path} must hold a JSON object of settings, got {type(values).__name__}")
    values = {**(defaults or {}), **values, **{k: v for k, v in overrides.items() if v is not None}}
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown setting(s) {unknown}; known settings are {sorted(known)}")
    return cls(**values)


# ------------------------------------------------------------ batches and log-probs
def pad_responses(responses, pad_id):
    """Right-padded response ids (B, N) and mask (B, N) from a list of token lists."""
    return pad_batch(responses, pad_id, side="right")


def pad_prompt_response(rows, pad_id):
    """Right-padded prompt ⧺ response sequences: ids, attention mask and response mask, each (B, T).

    ``rows``: (prompt_ids, response_ids) pairs; the response mask is 1 exactly on the response tokens.
    """
    ids, mask = pad_batch([list(p) + list(y) for p, y in rows], pad_id, side="right")
    response = np.zeros_like(mask)
    for i, (p, y) in enumerate(rows):
        response[i, len(p):len(p) + len(y)] = 1
    return ids, mask, response


def response_logits(model, prompt_ids, prompt_mask, tokens, mask, return_values=False):
    """Logits (B, N, V) that score each response token [and values (B, N) of the states before them].

    Only the N response columns go through the LM head: the prompt's logits are never needed.
    The value head reads the hidden states without sending gradient back into them: a critic that
    regresses noisy returns through the shared trunk drags the policy away from where it was.
    """
    T = prompt_ids.shape[1]
    ids = np.concatenate([prompt_ids, tokens], axis=1)[:, :-1]
    attention = np.concatenate([prompt_mask, mask], axis=1)[:, :-1]
    h = model.hidden(ids, attention)[:, T - 1:]  # (B, N, C): the states that predict y_0 .. y_{N-1}
    logits = F.linear(h, model.wte.weight)
    if not return_values:
        return logits
    B, N, _ = h.shape
    return logits, model.value_head(h.detach()).reshape(B, N)


def response_logprobs(model, prompt_ids, prompt_mask, tokens, mask):
    """log π(y_t | x, y_<t) for every response token, (B, N); 0 under the mask."""
    logits = response_logits(model, prompt_ids, prompt_mask, tokens, mask)
    return F.where(np.asarray(mask) > 0, F.token_logprobs(logits, tokens), 0.0)


def sequence_logprobs(model, prompt_ids, prompt_mask, tokens, mask):
    """log π(y | x) = Σ_t log π(y_t | x, y_<t), (B,)."""
    return losses.sequence_logprobs(response_logits(model, prompt_ids, prompt_mask, tokens, mask), tokens, mask)


@dataclass
class Rollout:
    """Sampled responses with their prompts; ``index[i]`` is the prompt row i answers."""
    prompt_ids: np.ndarray
    prompt_mask: np.ndarray
    tokens: np.ndarray
    mask: np.ndarray
    index: np.ndarray

    @property
    def inputs(self):
        """(prompt_ids, prompt_mask, tokens, mask): what the response log-prob helpers take."""
        return self.prompt_ids, self.prompt_mask, self.tokens, self.mask

    def responses(self):
        """Each row's response tokens (up to and including <|im_end|>) as a list."""
        return [row[m > 0].tolist() for row, m in zip(self.tokens, self.mask)]

    def rows(self, picked):
        return Rollout(self.prompt_ids[picked], self.prompt_mask[picked], self.tokens[picked], self.mask[picked],
                       self.index[picked])


def rollout(model, prompts, index, samples_per_prompt, temperature, max_new_tokens, eos_id, pad_id, seed):
    """Sample ``samples_per_prompt`` responses for each of ``prompts[index]``, grouped in consecutive rows."""
    index = np.repeat(np.asarray(index), samples_per_prompt)
    out = generate(model, [prompts[i] for i in index], max_new_tokens, temperature=temperature,
                   eos_id=eos_id, pad_id=pad_id, seed=seed)
    return Rollout(out.prompt_ids, out.prompt_mask, out.tokens, out.mask, index)


def draw_prompts(n_prompts, batch, seed, step):
    """The prompt indices of one step: a fresh draw from (seed, step), so a resumed run draws the same."""
    return np.random.default_rng([seed, step, 104729]).choice(n_prompts, size=min(batch, n_prompts), replace=False)


def step_seed(seed, step):
    """The sampling seed of one step (depends only on seed and step, for exact resume)."""
    return int(np.random.default_rng([seed, step, 15485863]).integers(2 ** 31))


def step_rollout(policy, prompts, config, step, samples_per_prompt, eos_id, pad_id):
    """One training step's rollout: prompts and sampling seed drawn from (config.seed, step)."""
    index = draw_prompts(len(prompts), config.prompts_per_step, config.seed, step)
    return rollout(policy, prompts, index, samples_per_prompt, config.temperature, config.max_new_tokens,
                   eos_id, pad_id, step_seed(config.seed, step))


def make_optimizer(model, lr):
    return AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)


def optimizer_step(model, optimizer, loss, clip):
    """backward → clip the global gradient norm → AdamW step; returns the norm before clipping."""
    optimizer.zero_grad()
    loss.backward()
    grad_norm = clip_grad_norm_(model.parameters(), clip) if clip else 0.0
    optimizer.step()
    optimizer.zero_grad()
    return float(grad_norm)


# ------------------------------------------------------------------- evaluation
def evaluate_policy(policy, reference, prompts, reward_fn, gold_fn, eos_id, pad_id, max_new_tokens,
                    samples_per_prompt=4, seed=0):
    """Held-out metrics of a policy (all on ``prompts``, which training never sees):

    accuracy         pass@1: mean rule reward of ``samples_per_prompt`` samples per prompt at temperature 1
    greedy_accuracy  rule reward of the greedy answer
    gold_reward      mean hidden gold score of the temperature-1 samples
    kl_to_sft        KL(π ‖ π_ref) per response, Σ_t KL(π(·|x, y_<t) ‖ π_ref(·|x, y_<t)): exact over the
                     vocabulary at each step, averaged over the temperature-1 samples (Monte Carlo over y)
    """
    index = np.arange(len(prompts))
    sampled = rollout(policy, prompts, index, samples_per_prompt, 1.0, max_new_tokens, eos_id, pad_id, seed)
    greedy = rollout(policy, prompts, index, 1, 0.0, max_new_tokens, eos_id, pad_id, seed)
    with no_grad():
        kl = kl_to_reference(policy, reference, sampled)
    return {"accuracy": float(np.mean(reward_fn(sampled.index, sampled.responses()))),
            "greedy_accuracy": float(np.mean(reward_fn(greedy.index, greedy.responses()))),
            "gold_reward": float(np.mean(gold_fn(sampled.index, sampled.responses()))),
            "kl_to_sft": kl}


def kl_to_reference(policy, reference, batch, rows=512):
    """Mean over rows of Σ_t exact KL(π ‖ π_ref) at each response position (see evaluate_policy)."""
    if policy is reference:
        return 0.0
    total = 0.0
    for start in range(0, len(batch.index), rows):
        b = batch.rows(slice(start, start + rows))
        args = b.inputs
        per_token = losses.kl_exact(response_logits(policy, *args), response_logits(reference, *args).data, b.mask)
        total += float((per_token.data * b.mask).sum())
    return total / len(batch.index)


# ------------------------------------------------------------ logs and checkpoints
class MetricsLog:
    """Appends one JSON object per step to ``log`` (a path) or hands it to ``log`` (a callable).

    A run that starts at step k (0 for a fresh run, the checkpoint's step on resume) first drops
    the file's records of steps after k, which it is about to redo, so every step appears once.
    """

    def __init__(self, log, start_step):
        self.log = log
        if not isinstance(log, (str, os.PathLike)):
            return
        if os.path.dirname(log):
            os.makedirs(os.path.dirname(log), exist_ok=True)
        if os.path.exists(log):
            with open(log) as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= start_step]
            with open(log, "w") as f:
                f.writelines(kept)

    def __call__(self, record):
        if self.log is None:
            return
        if callable(self.log):
            self.log(record)
            return
        with open(self.log, "a") as f:
            f.write(json.dumps(record) + "\n")


class Progress:
    """A one-line progress bar on stderr: ``grpo  40/100 [########------------] 12s reward=0.512``."""

    def __init__(self, name, total, enabled=True, stream=None):
        self.name, self.total, self.enabled = name, total, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.start = time.time()
        self.last = 0.0

    def update(self, step, **metrics):
        if not self.enabled:
            return
        now = time.time()
        if step < self.total and now - self.last < 0.25:
            return
        self.last = now
        filled = int(20 * step / max(self.total, 1))
        shown = " ".join(f"{k}={v:.3f}" for k, v in metrics.items())
        self.stream.write(f"\r{self.name:<5} {step:>4}/{self.total} [{'#' * filled}{'-' * (20 - filled)}] "
                          f"{now - self.start:4.0f}s {shown}")
        if step >= self.total:
            self.stream.write("\n")
        self.stream.flush()


def checkpoint_dir(out_dir):
    return None if out_dir is None else os.path.join(out_dir, "checkpoint")


def resume_from(out_dir, model, optimizer, resume, name):
    """(first step, extra) to continue from: (0, {}) for a fresh run, else what the checkpoint holds."""
    if not resume:
        return 0, {}
    if out_dir is None:
        raise ValueError(f"{name}: resume=True needs out_dir (where the checkpoint is)")
    path = checkpoint_dir(out_dir)
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{name}: resume=True but {path} holds no checkpoint; run without resume first")
    return load_checkpoint(path, model, optimizer)


def begin_run(name, label, model, config, out_dir, resume, log, progress):
    """What every trainer starts with: AdamW, the first step (a checkpoint's when resuming) and the
    ``extra`` the checkpoint carried, the metrics log and the progress line."""
    optimizer = make_optimizer(model, config.lr)
    start, extra = resume_from(out_dir, model, optimizer, resume, name)
    return optimizer, start, extra, MetricsLog(log, start), Progress(label, config.steps, progress)


def maybe_checkpoint(out_dir, model, optimizer, step, config, extra=None):
    """Save after ``step`` (1-based) if it is a checkpoint step or the last step."""
    if out_dir is None:
        return
    if step == config.steps or (config.checkpoint_every and step % config.checkpoint_every == 0):
        save_checkpoint(checkpoint_dir(out_dir), model, optimizer, step,
                        extra={"config": dataclasses.asdict(config), **(extra or {})})


def check_not_empty(items, what, name):
    if len(items) == 0:
        raise ValueError(f"{name}: {what} is empty; expected at least one")
