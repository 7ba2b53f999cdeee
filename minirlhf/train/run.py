"""What a training run is made of besides its algorithm: the optimizer and its schedule, exact
resume from a checkpoint, the metrics log, the progress line.

Every draw of an RL or preference step (its prompts, its samples, its batch) is keyed by
(seed, step), never by how many draws came before, so a run resumed from the checkpoint of step k
redoes steps k+1... exactly as an uninterrupted run would have: the checkpoint needs only the
weights, AdamW's buffers and the step (SFT draws from one seeded stream and carries its state).
"""
import dataclasses
import json
import os
import sys
import time

import numpy as np

from ..checkpoint import finish_interrupted_save, load_checkpoint, save_checkpoint
from ..optim import AdamW, WarmupCosine, clip_grad_norm_
from ..rollout import sample


# what each keyed draw is for: the third word of its key (pairs use the bare (seed, step))
PAIRS, MINIBATCHES, PROMPTS, SAMPLES = None, 1, 104729, 15485863


def step_rng(seed, step, purpose):
    """The generator of one step's draws for ``purpose`` (one of the constants above)."""
    return np.random.default_rng([seed, step] if purpose is None else [seed, step, purpose])


def draw_rows(n, batch, seed, step, purpose):
    """``min(batch, n)`` distinct indices in [0, n) for one step (prompts, pairs or examples)."""
    return step_rng(seed, step, purpose).choice(n, size=min(batch, n), replace=False)


def step_seed(seed, step):
    """The sampling seed of one step."""
    return int(step_rng(seed, step, SAMPLES).integers(2 ** 31))


def step_rollout(policy, prompts, config, step, samples_per_prompt, eos_id, pad_id):
    """One step's rollout: ``config.prompts_per_step`` prompts and the sampling seed drawn from (seed, step)."""
    index = draw_rows(len(prompts), config.prompts_per_step, config.seed, step, PROMPTS)
    return sample(policy, prompts, index, samples_per_prompt, config.temperature, config.max_new_tokens,
                  eos_id, pad_id, step_seed(config.seed, step))


class Run:
    """One trainer's run: AdamW with warmup + cosine, resumed from ``out_dir/checkpoint`` when asked,
    a metrics log and a progress line.

    ``run.start``: the first step to do (the checkpoint's step when resuming, else 0);
    ``run.extra``: what the checkpoint carried besides weights (e.g. PPO's adaptive β).
    """

    def __init__(self, name, model, config, out_dir=None, resume=False, log=None, progress=True):
        self.name, self.model, self.config, self.out_dir = name, model, config, out_dir
        self.optimizer = AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay)
        self.start, self.extra = 0, {}
        if resume:
            if out_dir is None:
                raise ValueError(f"train_{name}: resume=True needs out_dir (where the checkpoint is)")
            path = self.checkpoint_dir
            finish_interrupted_save(path)  # a save killed between its renames leaves the old or new checkpoint
            if not os.path.exists(os.path.join(path, "config.json")):
                raise FileNotFoundError(f"train_{name}: resume=True but {path} holds no checkpoint; "
                                        "run without resume first")
            self.start, self.extra = load_checkpoint(path, model, self.optimizer)
        min_lr = config.lr if config.min_lr is None else config.min_lr
        self.schedule = WarmupCosine(self.optimizer, config.warmup, config.steps, min_lr, start=self.start)
        self.log = MetricsLog(log, self.start)
        self.progress = Progress(name, config.steps, progress)
        self.history = []

    @property
    def checkpoint_dir(self):
        return None if self.out_dir is None else os.path.join(self.out_dir, "checkpoint")

    @property
    def lr(self):
        return self.optimizer.param_groups[0]["lr"]

    def steps(self):
        return range(self.start, self.config.steps)

    def optimizer_step(self, loss=None):
        """[backward →] clip the global gradient norm → AdamW step → next lr; returns the norm before clipping.

        Without ``loss`` the gradients are already accumulated (SFT's micro-batches).
        """
        if loss is not None:
            self.optimizer.zero_grad()
            loss.backward()
        clip = self.config.clip
        grad_norm = clip_grad_norm_(self.model.parameters(), clip) if clip else 0.0
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.schedule.step()
        return float(grad_norm)

    def end_step(self, step, metrics, shown, extra=None):
        """Record step ``step``'s (0-based) metrics, update the progress line, checkpoint when due."""
        metrics = {"step": step + 1, **metrics}
        self.history.append(metrics)
        self.log(metrics)
        self.progress.update(step + 1, **{k: metrics[k] for k in shown})
        done = step + 1
        if self.out_dir is not None and (done == self.config.steps or
                                         (self.config.checkpoint_every and done % self.config.checkpoint_every == 0)):
            save_checkpoint(self.checkpoint_dir, self.model, self.optimizer, done,
                            extra={"config": dataclasses.asdict(self.config), **(extra or {})})


class MetricsLog:
    """Appends one JSON object per step to ``log`` (a path) or hands it to ``log`` (a callable).

    A run that starts at step k (0 for a fresh run, the checkpoint's step on resume) first drops
    the file's records of steps after k, which it is about to redo, so every step appears once.
    A torn last line (a crash or a full disk mid-write) is dropped with a warning.
    """

    def __init__(self, log, start_step):
        self.log = log
        if not isinstance(log, (str, os.PathLike)):
            return
        if os.path.dirname(log):
            os.makedirs(os.path.dirname(log), exist_ok=True)
        if os.path.exists(log):
            with open(log) as f:
                lines = [line for line in f if line.strip()]
            records = []
            for i, line in enumerate(lines):
                try:
                    records.append((json.loads(line), line))
                except json.JSONDecodeError as e:
                    if i < len(lines) - 1:
                        raise ValueError(f"metrics log {log}: line {i + 1} is not JSON ({e}); "
                                         "only a torn last line can be dropped") from None
                    print(f"warning: metrics log {log}: dropped a torn last line (not JSON: {line.strip()[:60]!r})",
                          file=sys.stderr)
            kept = [line if line.endswith("\n") else line + "\n" for record, line in records
                    if isinstance(record, dict) and record.get("step", 0) <= start_step]
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


def check_not_empty(items, what, name):
    if len(items) == 0:
        raise ValueError(f"{name}: {what} is empty; expected at least one")
