"""Benchmark: GRPO, DPO, PPO and RLOO steps of minirlhf against TRL's trainers, side by side on a CPU.

Both sides train the same random-init GPT-2-shaped model (minirlhf's GPT, and ``transformers``'
GPT2LMHeadModel loaded with the same weights) on the addition task's prompts
(``minirlhf.tasks``), tokenized by the task's byte-level BPE: 276 tokens, every prompt 17 of them.
TRL reads that vocabulary through a ``tokenizers`` BPE, checked to give the same ids. Context 32,
float32, no dropout. A row is one step of each trainer, all the work between two optimizer steps:

    row   minirlhf                    TRL                 one step, both sides
    GRPO  train.grpo.train_grpo       GRPOTrainer         16 prompts × 8 samples, 5 new tokens; rule reward;
                                                          log π_ref (β = 0.04); one pass (num_iterations=1)
    DPO   train.dpo.train_dpo         DPOTrainer          64 pairs (chosen and rejected in one pass);
                                                          log π_ref precomputed before training
    PPO   train.ppo.train_ppo         RLOOTrainer         64 prompts × 2 samples, 5 new tokens; a reward
                                                          model's score; log π_ref (β = 0.04); one pass
    RLOO  train.rloo.train_rloo       RLOOTrainer         16 prompts × 8 samples, 5 new tokens; rule reward;
                                                          log π_ref (β = 0.04); one pass

TRL 1.x removed PPOTrainer (moved to trl.experimental in 1.10, deleted after), so the PPO row's peer
is TRL's nearest on-policy trainer with a reference model and a reward model, RLOOTrainer, with
k = 2 samples per prompt (its fewest) over 64 prompts; minirlhf's PPO takes the same batch
(``samples_per_prompt=2``), and like its GRPO and RLOO it runs a prompt's positions once for the rows
that answer it, where TRL runs every row whole. It has no value model: minirlhf's PPO step does more
(a value head on the shared trunk, GAE, whitening, the value loss; with one minibatch, log π_old and
V_old come from the update's own forward), so that row is not like for like. The RLOO row is: the same
algorithm on both sides. ``--algorithms ppo_distinct`` adds the row as it was measured before PPO could
sample more than once per prompt: minirlhf's PPO on 128 distinct prompts × 1 against the same TRL step.

Each step is the trainer's own loop, timed from inside: each side runs in a process of its own
(spawned, so minirlhf's never imports torch) and stops at the end of every step (minirlhf: the
``log`` callback, after AdamW; TRL: a TrainerCallback's ``on_step_end``, after the optimizer and
scheduler) until the main process tells it to take the next one. A step's time runs from that word to
the end of the step: all the loop does in between (draw the batch, generate, score, log-probs, loss,
backward, clip, AdamW). The sides take turns one step at a time (minirlhf, TRL, minirlhf, ...), so
drift in the machine's load hits both; the first ``WARMUP`` steps of each side (setup, the
precomputed reference log-probs) are not timed. Medians are reported, with the load average.

Threads: NumPy's BLAS and torch's intra-op pool each default to the core count; both are printed.
Memory: minirlhf's side keeps freed memory for reuse (``backend.keep_freed_memory``, as the ``minirlhf``
command does); TRL's side runs with glibc's default malloc settings, as TRL does.
TRL's settings that would add work minirlhf does not do are turned off and named in
:func:`trl_settings` (no gradient checkpointing, no bf16, no logging, evaluation or saving).

    pip install 'minirlhf[bench]'        # trl==1.16.0 and the torch, transformers it needs
    python benchmarks/vs_trl.py [--sizes 2x64 4x256 12x768] [--steps N] [--json PATH]
"""
import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import minirlhf  # noqa: E402
from minirlhf.distributed import replicas as replicas_of, world  # noqa: E402
from minirlhf.model import GPT, GPTConfig, RewardModel  # noqa: E402
from minirlhf.tasks import Problem, perturbations, rule_reward  # noqa: E402
from minirlhf.tasks.environment import AdditionEnvironment, TaskConfig  # noqa: E402
from minirlhf.tokenizer import SPECIAL_TOKENS  # noqa: E402
from minirlhf.train.dpo import DPOConfig, train_dpo  # noqa: E402
from minirlhf.train.grpo import GRPOConfig, train_grpo  # noqa: E402
from minirlhf.train.ppo import PPOConfig, train_ppo, with_value_head  # noqa: E402
from minirlhf.train.rloo import RLOOConfig, train_rloo  # noqa: E402
from train_step import SETTLE, blas_thread_count, cpu_info  # noqa: E402  (benchmarks/, this script's folder)


@dataclass(frozen=True)
class Size:
    name: str
    n_layer: int
    n_head: int
    n_embd: int
    steps: int  # timed steps per side unless --steps says otherwise

    @property
    def label(self):
        return f"{self.n_layer}L/{self.n_embd}d"


SIZES = {s.name: s for s in (Size("2x64", 2, 4, 64, 10),
                             Size("4x256", 4, 4, 256, 6),
                             Size("12x768", 12, 12, 768, 3))}  # GPT-2 small's trunk: its steps take a minute here
ALGORITHMS = ("grpo", "dpo", "ppo", "rloo")  # the rows by default; ppo_distinct on request
TRL_TRAINERS = {"grpo": "GRPOTrainer", "dpo": "DPOTrainer", "ppo": "RLOOTrainer", "rloo": "RLOOTrainer",
                "ppo_distinct": "RLOOTrainer"}
LABELS = {"ppo_distinct": "PPO 128×1"}
PPO_SAMPLES = {"ppo": 2, "ppo_distinct": 1}  # minirlhf's samples per prompt; TRL's side is 64 prompts × 2 in both
WARMUP = 1        # untimed steps per side: the first builds the trainer (and DPO's reference log-probs)
CONTEXT = 32
LR = 1e-6         # small, so that the random policy keeps sampling full-length responses on both sides
PROMPTS, GROUP = 16, 8
PAIRS = 64
BETA_KL, BETA_DPO = 0.04, 0.1


# ------------------------------------------------------------ the task, both sides
@dataclass
class Task:
    """The addition task's tokenizer, prompts, rule reward and preference pairs (right answer over a
    near miss), as minirlhf's trainers take them."""
    env: AdditionEnvironment
    pairs: list   # (prompt ids, chosen ids, rejected ids)

    @property
    def vocab_size(self):
        return self.env.tokenizer.vocab_size


def addition_task(n_pairs=256, seed=0):
    env = AdditionEnvironment(TaskConfig(), seed=seed)
    rng = np.random.default_rng(seed)
    pairs = []
    for problem, prompt in zip(env.train[:n_pairs], env.train_prompts):
        wrong = perturbations(problem.answer, rng)
        pairs.append((prompt, env.task.answer_ids(env.tokenizer, str(problem.answer)),
                      env.task.answer_ids(env.tokenizer, wrong[rng.integers(len(wrong))])))
    return Task(env, pairs)


def gpt_config(size, task):
    return GPTConfig(n_layer=size.n_layer, n_head=size.n_head, n_embd=size.n_embd, vocab_size=task.vocab_size,
                     block_size=CONTEXT, dropout=0.0)


# ------------------------------------------------------------ minirlhf's side
def minirlhf_models(algorithm, size, task, seed=0):
    """(policy, reference, reward model or None), the reference a copy of the policy."""
    minirlhf.manual_seed(seed)
    cfg = gpt_config(size, task)
    policy = GPT(cfg)
    reference = GPT(cfg).load_state_dict(policy.state_dict())
    if algorithm not in PPO_SAMPLES:
        return policy, reference, None
    return with_value_head(policy), reference, RewardModel(cfg)


def minirlhf_replicas(algorithm, size, task, steps, replicas):
    """``train(on_step_end)``: minirlhf's trainer as ``replicas`` data-parallel threads
    (``minirlhf.distributed.replicas``), each with its own copy of the models; replica 0 calls back after
    each step and the others wait for it, so that no replica starts a step before the clock does."""
    def train(end):
        def replica():
            def step_end():
                if world().rank == 0:
                    end()
                world().barrier()
            minirlhf_train(algorithm, minirlhf_models(algorithm, size, task), task, steps)(step_end)
        replicas_of(replicas, replica)
    return train


def minirlhf_train(algorithm, models, task, steps):
    """``train(on_step_end)``: minirlhf's trainer for ``steps`` steps, calling back after each."""
    policy, reference, reward_model = models
    env = task.env
    if algorithm == "grpo":
        config = GRPOConfig(steps=steps, lr=LR, prompts_per_step=PROMPTS, group_size=GROUP, beta=BETA_KL, epochs=1,
                            loss_type="grpo", scale="group", temperature=1.0, max_new_tokens=env.max_new_tokens)
        return lambda end: train_grpo(policy, reference, env.train_prompts, env.rule_reward(), config, env.eos_id,
                                      env.pad_id, log=lambda metrics: end(), progress=False)
    if algorithm == "dpo":
        config = DPOConfig(steps=steps, lr=LR, batch_size=PAIRS, beta=BETA_DPO, loss_type="sigmoid")
        return lambda end: train_dpo(policy, reference, task.pairs, config, env.pad_id, log=lambda metrics: end(),
                                     progress=False)
    if algorithm == "rloo":
        config = RLOOConfig(steps=steps, lr=LR, prompts_per_step=PROMPTS, group_size=GROUP, beta=BETA_KL,
                            temperature=1.0, max_new_tokens=env.max_new_tokens)
        return lambda end: train_rloo(policy, reference, env.train_prompts, env.rule_reward(), config, env.eos_id,
                                      env.pad_id, log=lambda metrics: end(), progress=False)
    k = PPO_SAMPLES[algorithm]
    config = PPOConfig(steps=steps, lr=LR, prompts_per_step=PROMPTS * GROUP // k, samples_per_prompt=k, epochs=1,
                       minibatches=1, beta=BETA_KL, temperature=1.0, max_new_tokens=env.max_new_tokens)
    return lambda end: train_ppo(policy, reference, reward_model, env.train_prompts, config, env.eos_id, env.pad_id,
                                 log=lambda metrics: end(), progress=False)


# ------------------------------------------------------------ TRL's side
def trl_missing():
    """None when TRL and what it needs import, else the message to show."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
        import trl  # noqa: F401
        import datasets  # noqa: F401
        import tokenizers  # noqa: F401
    except ImportError as e:
        return (f"benchmarks/vs_trl.py: TRL's side needs trl, torch, transformers, datasets and tokenizers ({e}). "
                "Install them with: pip install 'minirlhf[bench]'  (trl==1.16.0)")
    return None


def hf_tokenizer(tokenizer, folder):
    """The task's BPE as a ``transformers`` tokenizer: the same vocab.json and merges.txt, the same
    special tokens, <|im_end|> ending a turn and <|endoftext|> padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tokenizer.save(folder)
    vocab, merges = models.BPE.read_file(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"))
    bpe = Tokenizer(models.BPE(vocab, merges))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=tokenizer.id_to_token[tokenizer.eos_id],
                                   pad_token=tokenizer.id_to_token[tokenizer.pad_id])


def check_same_ids(hf, task):
    """TRL must see exactly the prompts minirlhf sees."""
    for ids in task.env.train_prompts[:200]:
        theirs = hf(task.env.tokenizer.decode(ids), add_special_tokens=False)["input_ids"]
        if theirs != list(ids):
            raise RuntimeError(f"the transformers tokenizer reads a prompt as {theirs}, minirlhf's as {list(ids)}")


def hf_gpt2_folder(trunk, folder, task, head=None):
    """Save minirlhf's GPT ``trunk`` as a transformers GPT-2 directory: a GPT2LMHeadModel, or with ``head``
    (the reward model's last-token head) a GPT2ForSequenceClassification with one label."""
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel
    cfg = trunk.config
    hc = GPT2Config(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, vocab_size=cfg.vocab_size,
                    n_positions=cfg.block_size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                    summary_first_dropout=0.0, layer_norm_epsilon=cfg.layer_norm_eps, activation_function="gelu_new",
                    bos_token_id=task.env.eos_id, eos_token_id=task.env.eos_id, pad_token_id=task.env.pad_id,
                    num_labels=1)
    model = GPT2LMHeadModel(hc) if head is None else GPT2ForSequenceClassification(hc)
    conv1d = ("c_attn.weight", "c_proj.weight", "c_fc.weight")  # HF's Conv1D stores (in, out)
    state = {"transformer." + k: torch.from_numpy(np.ascontiguousarray(v.T) if k.endswith(conv1d) else v.copy())
             for k, v in trunk.state_dict().items() if k.split(".")[0] in ("wte", "wpe", "h", "ln_f")}
    if head is not None:
        state["score.weight"] = torch.from_numpy(head.weight.data.reshape(1, -1).copy())
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"weights for transformers' GPT-2: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.save_pretrained(folder)
    return folder


def trl_settings(algorithm, steps, folder):
    """TRL's config for one row: the batch and loss of minirlhf's side, and nothing TRL would add on top."""
    from trl import DPOConfig as TRLDPOConfig
    from trl import GRPOConfig as TRLGRPOConfig
    from trl import RLOOConfig as TRLRLOOConfig
    common = dict(output_dir=folder, max_steps=steps, learning_rate=LR, lr_scheduler_type="constant",
                  weight_decay=0.0, max_grad_norm=1.0, gradient_accumulation_steps=1, seed=0,
                  gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True, dataloader_num_workers=0,
                  logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True)
    if algorithm == "dpo":
        return TRLDPOConfig(**common, per_device_train_batch_size=PAIRS, beta=BETA_DPO, loss_type=["sigmoid"],
                            precompute_ref_log_probs=True, max_length=None)
    on_policy = dict(per_device_train_batch_size=PROMPTS * GROUP, steps_per_generation=1, num_iterations=1,
                     beta=BETA_KL, epsilon=0.2, temperature=1.0, top_p=1.0, top_k=0, max_completion_length=5,
                     log_completions=False)
    if algorithm == "grpo":
        return TRLGRPOConfig(**common, **on_policy, num_generations=GROUP, loss_type="grpo", scale_rewards="group")
    return TRLRLOOConfig(**common, **on_policy, num_generations=2 if algorithm in PPO_SAMPLES else GROUP)


def addition_reward(completions, a, b, **columns):
    """The rule reward of the addition task (the same function minirlhf's side scores with)."""
    return [rule_reward(text, Problem(x, y)) for text, x, y in zip(completions, a, b)]


def trl_train(algorithm, models, task, steps, folder):
    """``train(on_step_end)``: TRL's trainer for ``steps`` steps from minirlhf's weights, calling back after each."""
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import DPOTrainer, GRPOTrainer, RLOOTrainer
    policy, _, reward_model = models
    env = task.env
    tokenizer = hf_tokenizer(env.tokenizer, os.path.join(folder, "tokenizer"))
    check_same_ids(tokenizer, task)
    model = hf_gpt2_folder(policy, os.path.join(folder, "policy"), task)
    args = trl_settings(algorithm, steps, os.path.join(folder, "out"))
    decode = env.tokenizer.decode
    if algorithm == "dpo":
        data = Dataset.from_dict({"prompt": [decode(p) for p, _, _ in task.pairs],
                                  "chosen": [decode(c) for _, c, _ in task.pairs],
                                  "rejected": [decode(r) for _, _, r in task.pairs]})
    else:
        data = Dataset.from_dict({"prompt": [decode(p) for p in env.train_prompts],
                                  "a": [p.a for p in env.train], "b": [p.b for p in env.train]})

    class StepEnd(TrainerCallback):
        def __init__(self, end):
            self.end = end

        def on_step_end(self, args, state, control, **kwargs):
            self.end()

    def train(end):
        kwargs = dict(model=model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[StepEnd(end)])
        if algorithm == "grpo":
            trainer = GRPOTrainer(reward_funcs=[addition_reward], **kwargs)
        elif algorithm == "dpo":
            trainer = DPOTrainer(**kwargs)
        elif algorithm == "rloo":
            trainer = RLOOTrainer(reward_funcs=[addition_reward], **kwargs)
        else:
            scorer = hf_gpt2_folder(reward_model.transformer, os.path.join(folder, "reward"), task,
                                    head=reward_model.reward_head)
            trainer = RLOOTrainer(reward_funcs=[scorer], reward_processing_classes=[tokenizer], **kwargs)
        trainer.remove_callback(PrinterCallback)  # it prints the run's summary
        trainer.train()
    return train


# ------------------------------------------------------------ timing
class StepClock:
    """The end-of-step callback of a side's process: it reports the step's wall time to the main process
    and waits for the word to take the next step, whose clock starts then."""

    def __init__(self, conn):
        self.conn = conn
        self.start = None

    def wait_for_go(self):
        if self.conn.recv() != "go":
            raise RuntimeError("the benchmark stopped this side early")
        self.start = time.perf_counter()

    def end_of_step(self):
        self.conn.send(("step", time.perf_counter() - self.start))
        self.wait_for_go()


def side_process(conn, side, algorithm, size_name, steps, replicas=1):
    """One side of one row in its own process: set up, say "ready", then one trainer step per "go"."""
    try:
        quiet_libraries()
        if side == "minirlhf":
            minirlhf.backend.keep_freed_memory()  # as the minirlhf command does; TRL's side keeps glibc's defaults
        task = addition_task()
        size = SIZES[size_name]
        with tempfile.TemporaryDirectory() as folder:
            if side == "trl":  # TRL's model loads minirlhf's weights
                train = trl_train(algorithm, minirlhf_models(algorithm, size, task), task, steps, folder)
            elif replicas > 1:  # each replica builds its own models
                train = minirlhf_replicas(algorithm, size, task, steps, replicas)
            else:
                train = minirlhf_train(algorithm, minirlhf_models(algorithm, size, task), task, steps)
            clock = StepClock(conn)
            conn.send(("ready", task.vocab_size))
            clock.wait_for_go()
            train(clock.end_of_step)
        conn.send(("done", None))
    except BaseException:
        conn.send(("error", traceback.format_exc()))


def quiet_libraries():
    """No progress bars or notices from TRL, datasets and transformers between the steps."""
    os.environ["TQDM_DISABLE"] = "1"
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        import datasets
        import transformers
    except ImportError:
        return
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def receive(conn, expected, side):
    kind, value = conn.recv()
    if kind == "error":
        raise RuntimeError(f"{side} side failed:\n{value}")
    if kind != expected:
        raise RuntimeError(f"{side} side: expected {expected!r}, got {kind!r}")
    return value


def measure(algorithm, size, steps, with_trl=True, replicas=1):
    """One row: each side in its own process, ``steps`` timed steps after WARMUP untimed ones, the sides
    taking turns one step at a time; times in ms."""
    total = WARMUP + steps
    names = ("minirlhf", "trl") if with_trl else ("minirlhf",)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch in minirlhf's process
    pipes, processes = {}, []
    try:
        for name in names:
            pipes[name], child = context.Pipe()
            processes.append(context.Process(target=side_process, daemon=True,
                                             args=(child, name, algorithm, size.name, total, replicas)))
            processes[-1].start()
        vocab_size = [receive(pipes[name], "ready", name) for name in names][0]
        times = {name: [] for name in names}
        for i in range(total):
            for name in names:
                time.sleep(SETTLE)
                pipes[name].send("go")
                elapsed = receive(pipes[name], "step", name)
                if i >= WARMUP:
                    times[name].append(elapsed * 1e3)
        for name in names:
            pipes[name].send("go")  # past the last step: the trainer finishes its run
            receive(pipes[name], "done", name)
    finally:
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.terminate()
    row = {"algorithm": algorithm, "size": size.name, "n_layer": size.n_layer, "n_head": size.n_head,
           "n_embd": size.n_embd, "vocab_size": vocab_size, "context": CONTEXT, "warmup": WARMUP,
           "load_average": os.getloadavg()[0], "replicas": replicas,
           "steps": steps, "minirlhf_ms": times["minirlhf"],
           "minirlhf_median_ms": statistics.median(times["minirlhf"])}
    if with_trl:
        row.update(trl_trainer=TRL_TRAINERS[algorithm], trl_ms=times["trl"],
                   trl_median_ms=statistics.median(times["trl"]),
                   ratio=statistics.median(times["minirlhf"]) / statistics.median(times["trl"]))
    return row


# ------------------------------------------------------------ the machine and the report
def machine():
    name, avx512 = cpu_info()
    cores = os.cpu_count()
    info = {"cpu": name, "avx512": avx512, "cores": cores, "numpy": np.__version__,
            "blas_threads": blas_thread_count()[0],
            "load_average": list(os.getloadavg())}
    try:
        import torch
        import transformers
        import trl
        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                    transformers=transformers.__version__, trl=trl.__version__)
    except ImportError:
        pass
    return info


def table(rows):
    lines = ["| step | model | minirlhf | TRL | TRL trainer | ratio |", "|---|---|---|---|---|---|"]
    for r in rows:
        size = SIZES[r["size"]]
        trl_ms = f"{r['trl_median_ms']:,.0f} ms" if "trl_median_ms" in r else "—"
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else "—"
        label = LABELS.get(r["algorithm"], r["algorithm"].upper())
        lines.append(f"| {label} | {size.label} | {r['minirlhf_median_ms']:,.0f} ms | {trl_ms} | "
                     f"{'`' + r['trl_trainer'] + '`' if 'trl_trainer' in r else '—'} | {ratio} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES),
                        help="model shapes, layers x width (default: all three)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per side and row (default: "
                        + ", ".join(f"{s.name}: {s.steps}" for s in SIZES.values()) + ")")
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(TRL_TRAINERS),
                        help="the rows' steps (default: " + " ".join(ALGORITHMS) + "); ppo_distinct: minirlhf's "
                        "PPO on 128 distinct prompts × 1 against the PPO row's TRL step")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the rows and the machine to PATH")
    parser.add_argument("--replicas", type=int, default=1, metavar="N",
                        help="run minirlhf's side as N data-parallel threads with one BLAS thread each "
                        "(minirlhf.distributed.replicas; default 1: one thread, BLAS with its own threads)")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be a positive integer, got {args.steps}")
    if args.replicas < 1:
        parser.error(f"--replicas must be a positive integer, got {args.replicas}")
    missing = trl_missing()
    if missing:
        print(missing, file=sys.stderr)
        return 2

    info = machine()
    print(f"CPU: {info['cpu']} ({info['cores']} cores, AVX-512: {'yes' if info['avx512'] else 'no'}); "
          f"load average {info['load_average'][0]:.2f}")
    mine = (f"minirlhf {args.replicas} replicas (threads) of 1 BLAS thread" if args.replicas > 1
            else f"NumPy BLAS {info['blas_threads']}")
    print(f"threads: {mine}, torch {info['torch_threads']}; numpy {info['numpy']}, "
          f"torch {info['torch']}, transformers {info['transformers']}, trl {info['trl']}")
    rows = []
    for name in args.sizes:
        size = SIZES[name]
        for algorithm in args.algorithms:
            rows.append(measure(algorithm, size, args.steps or size.steps, replicas=args.replicas))
            r = rows[-1]
            print(f"{algorithm:>4} {size.label:>8}: minirlhf {r['minirlhf_median_ms']:8.0f} ms, "
                  f"TRL {r['trl_median_ms']:8.0f} ms, {r['ratio']:.2f}x (load {r['load_average']:.1f})", flush=True)
            if args.json:  # after every row, so that a long run stopped early keeps what it measured
                with open(args.json, "w") as f:
                    json.dump({"machine": info, "rows": rows}, f, indent=1)
    print()
    print(f"median of {', '.join(sorted({str(r['steps']) for r in rows}))} interleaved steps per side "
          f"after {WARMUP} untimed; {info['cpu']}, {info['cores']} cores, AVX-512 "
          f"{'yes' if info['avx512'] else 'no'}")
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
