"""What a training run is made of besides its algorithm: the optimizer and its schedule, exact
resume from a checkpoint, the metrics log, the progress line, and the split of each step across
data-parallel ranks (see :mod:`minirlhf.distributed`).

Every draw of an RL or preference step (its prompts, its samples, its batch) is keyed by
(seed, step), never by how many draws came before, so a run resumed from the checkpoint of step k
redoes steps k+1... exactly as an uninterrupted run would have: the checkpoint needs only the
weights, AdamW's buffers and the step (SFT draws from one seeded stream and carries its state).

Data parallel, every rank draws the same global batch; a sampled row's generator is keyed by its
prompt slot and sample number, never by the rank, so N ranks sample what one process samples.
Each rank samples and trains on its share of the rows (:meth:`Run.split`), everyone holds the
gathered rollout (token ids: cheap), and a loss that averages over this rank's share of a count
enters the gradient with weight (its count)/(the global count) (:meth:`Run.optimizer_step`).
Rank 0 writes the metrics, the checkpoints and the progress line; every rank reads a checkpoint.
"""
import dataclasses
import json
import os
import sys
import time

import numpy as np

from ..backend import to_numpy
from ..checkpoint import finish_interrupted_save, load_checkpoint, save_checkpoint
from ..distributed import share, world
from ..optim import AdamW, WarmupCosine, clip_grad_norm_
from ..rollout import Rollout, sample


# what each keyed draw is for: the third word of its key (pairs use the bare (seed, step))
PAIRS, MINIBATCHES, PROMPTS, SAMPLES = None, 1, 104729, 15485863
EVALUATION = 32452843  # held-out samples: the second word, in place of a step


def step_rng(seed, step, purpose):
    """The generator of one step's draws for ``purpose`` (one of the constants above)."""
    return np.random.default_rng([seed, step] if purpose is None else [seed, step, purpose])


def draw_rows(n, batch, seed, step, purpose):
    """``min(batch, n)`` distinct indices in [0, n) for one step (prompts, pairs or examples)."""
    return step_rng(seed, step, purpose).choice(n, size=min(batch, n), replace=False)


def row_seeds(key, slots, samples_per_prompt):
    """The sampling seed of each row: sample k of prompt slot j draws from (*key, j, k)."""
    return [int(np.random.SeedSequence([*key, j, k]).generate_state(1)[0])
            for j in slots for k in range(samples_per_prompt)]


def step_rollout(policy, prompts, config, step, samples_per_prompt, eos_id, pad_id):
    """One step's rollout: ``config.prompts_per_step`` prompts drawn from (seed, step), each row sampled
    from its own generator keyed by (seed, step, prompt slot, sample) (:func:`row_seeds`). Data
    parallel, each rank samples its share of the prompt slots and every rank returns the whole
    gathered rollout."""
    index = draw_rows(len(prompts), config.prompts_per_step, config.seed, step, PROMPTS)
    ranks = world()
    if len(index) < ranks.size:
        raise ValueError(f"step_rollout: {len(index)} prompts per step for {ranks.size} ranks; every rank needs at "
                         "least one (more prompts_per_step, or fewer ranks)")
    mine = share(len(index), ranks.size, ranks.rank)
    seeds = row_seeds((config.seed, step, SAMPLES), range(len(index))[mine], samples_per_prompt)
    part = sample(policy, prompts, index[mine], samples_per_prompt, config.temperature, config.max_new_tokens,
                  eos_id, pad_id, seeds)
    return gather_rollout(part, pad_id)


def gather_rollout(part, pad_id):
    """The ranks' rollouts as one, in rank order: prompts left-padded and responses right-padded to the widest."""
    ranks = world()
    if ranks.size == 1:
        return part
    T, N = ranks.max(part.prompt_ids.shape[1]), ranks.max(part.tokens.shape[1])
    left, right = ((0, 0), (T - part.prompt_ids.shape[1], 0)), ((0, 0), (0, N - part.tokens.shape[1]))

    def widened(a, side, value=0):
        return ranks.gather(np.pad(to_numpy(a), side, constant_values=value))
    return Rollout(widened(part.prompt_ids, left, pad_id), widened(part.prompt_mask, left),
                   widened(part.tokens, right, pad_id), widened(part.mask, right), ranks.gather(part.index),
                   None if part.logprobs is None else widened(part.logprobs, right), part.temperature)


class Run:
    """One trainer's run: AdamW with warmup + cosine, resumed from ``out_dir/checkpoint`` when asked,
    a metrics log and a progress line.

    ``run.start``: the first step to do (the checkpoint's step when resuming, else 0);
    ``run.extra``: what the checkpoint carried besides weights (e.g. PPO's adaptive β);
    ``run.loss``: the global loss of the last :meth:`optimizer_step`.
    """

    def __init__(self, name, model, config, out_dir=None, resume=False, log=None, progress=True):
        self.name, self.model, self.config, self.out_dir = name, model, config, out_dir
        self.world = world()
        self.root = self.world.rank == 0
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
        # a path is rank 0's to write; a callable runs on every rank with the same metrics
        self.log = MetricsLog(log if self.root or callable(log) else None, self.start)
        self.progress = Progress(name, config.steps, progress and self.root)
        self.history = []
        self.loss = None

    @property
    def checkpoint_dir(self):
        return None if self.out_dir is None else os.path.join(self.out_dir, "checkpoint")

    @property
    def lr(self):
        return self.optimizer.param_groups[0]["lr"]

    def steps(self):
        return range(self.start, self.config.steps)

    def split(self, n, group=1):
        """This rank's rows of a global batch of ``n`` rows in groups of ``group`` consecutive rows
        (a prompt's samples stay on one rank), as a slice; the whole batch in one process."""
        if n // group < self.world.size:
            raise ValueError(f"train_{self.name}: a step's batch has {n // group} "
                             f"{'groups' if group > 1 else 'rows'}, fewer than the {self.world.size} ranks; "
                             "every rank needs at least one (a larger batch, or fewer ranks)")
        rows = share(n // group, self.world.size, self.world.rank)
        return slice(rows.start * group, rows.stop * group)

    def optimizer_step(self, loss=None, weight=1.0):
        """[backward →] sum the gradients over ranks → clip the global gradient norm → AdamW step → next lr;
        returns the norm before clipping.

        ``loss``: this rank's loss, a mean over its share of the count the global loss averages over;
        ``weight``: that share, (this rank's count)/(global count), so Σ_r weight_r · loss_r is the
        global loss. Without ``loss`` the gradients are already accumulated (SFT's micro-batches).
        """
        weight = float(weight)
        if loss is not None:
            self.optimizer.zero_grad()
            (loss if weight == 1 else loss * weight).backward()
            self.loss = self.world.sum(float(loss.item()) * weight)
        self.world.sum_gradients(self.model.parameters())
        clip = self.config.clip
        grad_norm = clip_grad_norm_(self.model.parameters(), clip) if clip else 0.0
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.schedule.step()
        return float(grad_norm)

    def mean(self, metrics, weight):
        """Metrics of this rank's rows averaged over ranks, each rank weighted by ``weight`` (its rows)."""
        if self.world.size == 1:
            return metrics
        names = sorted(metrics)
        sums = self.world.sum(np.array([weight] + [weight * metrics[k] for k in names], dtype=np.float64))
        return {k: float(v / sums[0]) for k, v in zip(names, sums[1:])}

    def end_step(self, step, metrics, shown, extra=None):
        """Record step ``step``'s (0-based) metrics, update the progress line, checkpoint when due
        (rank 0 writes it; the others wait until it is in place)."""
        metrics = {"step": step + 1, **metrics}
        self.history.append(metrics)
        self.log(metrics)
        self.progress.update(step + 1, **{k: metrics[k] for k in shown})
        done = step + 1
        if self.out_dir is not None and (done == self.config.steps or
                                         (self.config.checkpoint_every and done % self.config.checkpoint_every == 0)):
            if self.root:
                save_checkpoint(self.checkpoint_dir, self.model, self.optimizer, done,
                                extra={"config": dataclasses.asdict(self.config), **(extra or {})})
            self.world.barrier()


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
