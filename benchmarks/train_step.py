"""Benchmark: one training step (forward + backward + AdamW) of the same GPT in minirlhf (NumPy) and PyTorch.

GPT(n_layer=4, n_head=4, n_embd=128, vocab 512), batch 16 × T=128, next-token cross-entropy over
every position. PyTorch runs ``transformers``' GPT2LMHeadModel when installed, else an equivalent
small module; both start from the same weights. Steps alternate between the two (so drift in the
machine's speed hits both) and the median of ``--runs`` steps is reported, with the ratio.

torch.set_num_threads is set to the number of threads NumPy's BLAS uses (threadpoolctl's count
when installed, else OPENBLAS_NUM_THREADS / OMP_NUM_THREADS, else the core count).

With more than one thread, the script sleeps ``--settle`` seconds (``SETTLE`` by default, none with one
thread, ``SETTLE_REPLICAS`` with ``--replicas``) before every timed step, so that the other library's idle
workers have stopped spinning: after a matrix product OpenBLAS's workers busy-wait for about 0.1 s (2^28
cycles) before they sleep, and torch's OpenMP workers briefly after a parallel region. Without the pause
each library's step runs beside the other's spinning workers: on the project's 2-core machine, with two
threads, torch's step took 256–286 ms instead of 217–224 ms and minirlhf's 205–216 ms instead of 190–201
ms (two runs of each, one after the other), which made minirlhf look faster than it is (0.76x instead of
0.89x). In a real training loop a library's steps follow each other, and only its own workers spin.

With ``--replicas N`` minirlhf's step runs as N data-parallel threads of one BLAS thread each
(``minirlhf.distributed.replicas``), each on batch/N rows, the gradients summed: the whole batch's step.
Its pause is shorter, since no BLAS worker of minirlhf's spins: torch's step took the same time after
pauses of 0, 0.02 and 0.2 s (95.9, 97.0, 96.9 ms on the 2-core Intel machine), but after a pause of 0.1 s
or more with both cores idle the replicas' next step was 20-30 ms slower (alone: 99.9 ms after no pause,
104 after 0.02 s, 119 after 0.1 s, 127 after 0.2 s, 101 after 0.2 s with one core kept busy), which a
training loop, whose steps follow each other, never sees.

    python benchmarks/train_step.py [--runs 15] [--settle 0.2] [--replicas N] [--quick] [--profile]
    python benchmarks/train_step.py --breakdown [--runs 15]
    python benchmarks/train_step.py --floor [--runs 15]

``--breakdown`` times minirlhf's step alone (no torch in the process; freed memory kept for reuse, as
the ``minirlhf`` command does) and where it goes: the linear layers, attention, GELU and layer norm,
each timed in place, forward and backward, and the rest of the step (the autograd engine, AdamW,
cross-entropy, the embeddings and the reshapes between ops).

``--floor`` asks how far the step could go with faster attention, GELU and layer norm. It times, steps
alternating: minirlhf's step; the same step with those three ops costing nothing (each passes its input
through, attention passes v: the floor, what the linear layers, the embeddings, the loss, AdamW and the
engine take); PyTorch's step; and PyTorch's own kernels for the three ops on the step's shapes, forward and
backward (``scaled_dot_product_attention``, a fused tanh GELU, ``layer_norm``). The floor plus PyTorch's
kernels is the step minirlhf would take with kernels as fast as PyTorch's for those ops.

OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are set on some of this project's machines (older OpenBLAS
builds misbehave on their CPUs) and can slow NumPy's matrix products; the script prints them. To
measure without them, unset both for that one command:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/train_step.py
"""
import argparse
import contextlib
import cProfile
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import minirlhf  # noqa: E402
import minirlhf.functional as F  # noqa: E402
from minirlhf.distributed import replicas, share, world  # noqa: E402
from minirlhf.model import GPT, GPTConfig  # noqa: E402
from minirlhf.optim import AdamW  # noqa: E402
from minirlhf.tensor import Tensor  # noqa: E402

SETTLE = 0.2  # s of pause before a timed step, with more than one thread (vs_trl.py pauses as long between turns)
# with replicas minirlhf has no BLAS workers that spin, and torch's OpenMP workers stop within this
SETTLE_REPLICAS = 0.02


def blas_thread_count():
    """(threads, where the count comes from): NumPy's BLAS threads as threadpoolctl reads them from the
    loaded library, else the environment's OPENBLAS_NUM_THREADS or OMP_NUM_THREADS, else the core count.
    (``minirlhf.backend.blas_threads(n)`` is another thing: it sets a limit.)"""
    try:
        from threadpoolctl import threadpool_info
        counts = [p["num_threads"] for p in threadpool_info() if p.get("user_api") == "blas"]
        if counts:
            return max(counts), "threadpoolctl"
    except ImportError:
        pass
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        if os.environ.get(var):
            return int(os.environ[var]), var
    return os.cpu_count(), "core count"


def cpu_info():
    """(model name as lscpu shows it, whether the CPU has AVX-512) from /proc/cpuinfo where there is one.

    The figures depend on both: OpenBLAS picks its kernels by CPU.
    """
    import platform
    name, flags = platform.processor() or platform.machine() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return name, "avx512f" in flags


def cpu_name():
    """The CPU's model name, with ", AVX-512" when it has it."""
    name, avx512 = cpu_info()
    return name + (", AVX-512" if avx512 else "")


def minirlhf_step(batch, seq):
    """(config, model, ids, step): the benchmark's GPT with AdamW, a fixed batch of token ids, and
    ``step()``, one training step on it (next-token cross-entropy at every position) returning the loss.

    In a replica of ``minirlhf.distributed.replicas`` the step trains on the replica's share of the rows,
    weighted by that share, and sums the gradients over replicas: the whole batch's step, data parallel.
    """
    cfg = GPTConfig(n_layer=4, n_head=4, n_embd=128, vocab_size=512, block_size=seq, dropout=0.0)
    minirlhf.manual_seed(0)
    model = GPT(cfg)
    opt = AdamW(model.parameters(), lr=1e-4)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq))
    ranks = world()
    mine = ids[share(batch, ranks.size, ranks.rank)]
    weight = len(mine) / batch  # every row has seq - 1 targets: the share of the tokens

    def step():
        logits = model(mine)
        loss = F.cross_entropy(logits[:, :-1], mine[:, 1:])
        (loss * weight if ranks.size > 1 else loss).backward()
        ranks.sum_gradients(model.parameters())
        opt.step()
        opt.zero_grad()
        return ranks.sum(loss.item() * weight)
    return cfg, model, ids, step


def settle_for(threads, asked=None, replicas=1):
    """The pause before a timed turn: ``asked`` when given; else with replicas SETTLE_REPLICAS, with more
    than one BLAS thread SETTLE, with one thread none."""
    if asked is not None:
        return asked
    if replicas > 1:
        return SETTLE_REPLICAS
    return SETTLE if threads > 1 else 0.0


TIMED_OPS = {"linear": "linear layers", "scaled_dot_product_attention": "attention", "gelu": "GELU",
             "layer_norm": "layer norm"}


def breakdown(step, runs):
    """(ms per step in each of TIMED_OPS, forward and backward; ms per step): ``step`` run ``runs`` times
    with each op of ``minirlhf.functional`` wrapped in a timer, its backward too."""
    spent = dict.fromkeys(TIMED_OPS, 0.0)
    originals = {name: getattr(F, name) for name in TIMED_OPS}

    def timed(name, op):
        def forward(*args, **kwargs):
            start = time.perf_counter()
            out = op(*args, **kwargs)
            spent[name] += time.perf_counter() - start
            backward = out._backward
            if backward is not None:
                def timed_backward(g):
                    start = time.perf_counter()
                    grads = backward(g)
                    spent[name] += time.perf_counter() - start
                    return grads
                out._backward = timed_backward
            return out
        return forward

    for name, op in originals.items():
        setattr(F, name, timed(name, op))
    try:
        step()  # warm-up
        for name in spent:
            spent[name] = 0.0
        start = time.perf_counter()
        for _ in range(runs):
            step()
        total = time.perf_counter() - start
    finally:
        for name, op in originals.items():
            setattr(F, name, op)
    return {name: t / runs * 1e3 for name, t in spent.items()}, total / runs * 1e3


FLOOR_OPS = ("scaled_dot_product_attention", "gelu", "layer_norm")


def _passed_through(x, *args, **kwargs):
    """x as it is, gradient g → g: GELU or layer norm costing nothing (``--floor``)."""
    return Tensor._from_op(x.data, (x,), lambda g: (g,), "passed through")


def _v_passed_through(q, k, v, **kwargs):
    """v as it is, gradient g → g to v alone: attention costing nothing (``--floor``)."""
    return Tensor._from_op(v.data, (q, k, v), lambda g: (None, None, g), "passed through")


@contextlib.contextmanager
def without_ops():
    """While the block runs, ``minirlhf.functional``'s attention, GELU and layer norm pass their input
    through; put back afterwards, also when the block fails."""
    originals = {name: getattr(F, name) for name in FLOOR_OPS}
    F.scaled_dot_product_attention, F.gelu, F.layer_norm = _v_passed_through, _passed_through, _passed_through
    try:
        yield
    finally:
        for name, op in originals.items():
            setattr(F, name, op)


def torch_kernels(cfg, batch, seq):
    """``run()``: PyTorch's own attention, fused tanh GELU and layer norm, forward and backward, on the step's
    shapes and as many times as the step runs each (n_layer attentions and GELUs, 2·n_layer + 1 layer norms).
    Gradients come from ``torch.autograd.grad`` with a given output gradient: nothing accumulates."""
    import torch
    gen = torch.Generator().manual_seed(0)
    C, H = cfg.n_embd, cfg.n_head

    def leaf(*shape):
        return torch.randn(*shape, generator=gen, requires_grad=True)

    q, k, v = (leaf(batch, H, seq, C // H) for _ in range(3))
    h, x, w, b = leaf(batch, seq, 4 * C), leaf(batch, seq, C), leaf(C), leaf(C)
    dq, dh, dx = (torch.randn(a.shape, generator=gen) for a in (q, h, x))

    def run():
        for _ in range(cfg.n_layer):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            torch.autograd.grad(out, (q, k, v), dq)
            torch.autograd.grad(torch.nn.functional.gelu(h, approximate="tanh"), h, dh)
        for _ in range(2 * cfg.n_layer + 1):
            torch.autograd.grad(torch.nn.functional.layer_norm(x, (C,), w, b), (x, w, b), dx)
    return run


def torch_model(cfg, state):
    """GPT2LMHeadModel from transformers (or a plain torch GPT-2 if it is missing), loaded with ``state``."""
    import torch
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return _plain_torch_gpt(cfg, state), "torch (plain module)"
    hc = GPT2Config(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, vocab_size=cfg.vocab_size,
                    n_positions=cfg.block_size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                    attn_implementation="sdpa")
    model = GPT2LMHeadModel(hc)
    conv1d = ("c_attn.weight", "c_proj.weight", "c_fc.weight")
    hf_state = {("transformer." + k): torch.from_numpy(v.T.copy() if k.endswith(conv1d) else v)
                for k, v in state.items()}
    model.load_state_dict(hf_state, strict=False)
    model.tie_weights()
    return model, "transformers GPT2LMHeadModel"


def torch_step(cfg, model, ids):
    """(step, name): ``step()`` trains PyTorch's copy of ``model`` (``torch_model``) with AdamW on the token ids
    ``ids`` and returns the loss."""
    import torch
    tmodel, name = torch_model(cfg, {k: v.copy() for k, v in model.state_dict().items()})
    opt = torch.optim.AdamW(tmodel.parameters(), lr=1e-4)
    tids = torch.from_numpy(ids)

    def step():
        loss = tmodel(tids, labels=tids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.item()
    return step, name


def _plain_torch_gpt(cfg, state):
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            C = cfg.n_embd
            self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
            self.c_attn, self.attn_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
            self.c_fc, self.mlp_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

        def forward(self, x):
            B, T, C = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).view(B, T, 3, cfg.n_head, -1).permute(2, 0, 3, 1, 4)
            y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.attn_proj(y.transpose(1, 2).reshape(B, T, C))
            return x + self.mlp_proj(nn.functional.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class GPT2(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
            self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
            self.h = nn.ModuleList(Block() for _ in range(cfg.n_layer))
            self.ln_f = nn.LayerNorm(cfg.n_embd)

        def forward(self, ids, labels=None):
            x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))
            for block in self.h:
                x = block(x)
            logits = self.ln_f(x) @ self.wte.weight.T
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
            return type("Out", (), {"loss": loss})

    model = GPT2()
    renamed = {k.replace("attn.c_proj", "attn_proj").replace("mlp.c_proj", "mlp_proj")
               .replace("attn.c_attn", "c_attn").replace("mlp.c_fc", "c_fc"): torch.from_numpy(v.copy())
               for k, v in state.items()}
    model.load_state_dict(renamed)
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--settle", type=float, default=None,
                        help="seconds to sleep before each timed step, so the other library's workers stop spinning "
                             f"(default: {SETTLE} with more than one thread, else 0)")
    parser.add_argument("--replicas", type=int, default=1, metavar="N",
                        help="minirlhf's step as N data-parallel threads of one BLAS thread each "
                             "(minirlhf.distributed.replicas), each on batch/N rows; default 1")
    parser.add_argument("--quick", action="store_true", help="3 timed steps of batch 4 (a smoke run)")
    parser.add_argument("--floor", action="store_true",
                        help="time minirlhf's step with attention, GELU and layer norm costing nothing, beside "
                             "PyTorch's step and PyTorch's kernels for those ops")
    parser.add_argument("--profile", action="store_true", help="cProfile 5 minirlhf steps and print the top")
    parser.add_argument("--breakdown", action="store_true",
                        help="time minirlhf's step alone, and in place its linear layers, attention, GELU and "
                             "layer norm")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.batch = 3, 4
    threads, source = blas_thread_count()
    if args.breakdown:
        if args.runs < 1:
            parser.error(f"--runs must be at least 1; got {args.runs}")
        return print_breakdown(args, threads, source)
    import torch
    torch.set_num_threads(threads)
    args.settle = settle_for(threads, args.settle, args.replicas)
    if args.runs < 1 or args.settle < 0:
        parser.error(f"--runs must be at least 1 and --settle at least 0 seconds; got {args.runs} and {args.settle}")
    if args.replicas < 1 or args.replicas > args.batch:
        parser.error(f"--replicas must be between 1 and --batch ({args.batch}); got {args.replicas}")
    if args.floor:
        if args.replicas > 1 or args.profile:
            parser.error("--floor runs one process without --profile; drop --replicas / --profile")
        return print_floor(args, threads, source)
    if args.replicas > 1:
        # minirlhf's side as replica threads of one BLAS thread each; torch's steps run in replica 0's
        # thread while the other replicas wait (asleep) at a barrier. Freed memory is kept, as the minirlhf
        # command does: without it the replicas' page faults contend for the kernel's lock on the address
        # space (train step 126 ms without, 96 ms with, replicas alone on the 2-core Intel machine)
        minirlhf.backend.keep_freed_memory()
        replicas(args.replicas, compare, args, threads, source)
    else:
        compare(args, threads, source)


def alternating(turns, runs, settle):
    """{name: median seconds}: ``runs`` rounds, each calling every turn of ``turns`` ({name: f}) once in
    order, each after a pause of ``settle`` seconds."""
    times = {name: [] for name in turns}
    for _ in range(runs):
        for name, f in turns.items():
            time.sleep(settle)
            start = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def compare(args, threads, source):
    """The side-by-side run: alternating steps, medians, the ratio (on replica 0 with --replicas)."""
    import torch
    ranks = world()
    cfg, model, ids, ours = minirlhf_step(args.batch, args.seq)
    if ranks.rank != 0:  # another replica: one step each time replica 0 takes one
        for _ in range(1 + (5 if args.profile else 0) + args.runs):
            ranks.barrier()
            ours()
        return

    def ours_together():
        ranks.barrier()
        return ours()

    theirs, tname = torch_step(cfg, model, ids)
    l0, t0 = ours_together(), theirs()  # warm-up; the losses agree since the weights do
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(5):
            ours_together()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    ours_t, torch_t = alternating({"minirlhf": ours_together, "torch": theirs}, args.runs, args.settle).values()

    print(f"GPT n_layer=4 n_head=4 n_embd=128 vocab=512, batch {args.batch} x T={args.seq}, float32; "
          f"median of {args.runs} interleaved steps, each after a pause of {args.settle} s")
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores")
    mine = (f"minirlhf {ranks.size} replicas (threads) of numpy BLAS {blas_thread_count()[0]} thread"
            if ranks.size > 1 else f"numpy BLAS {threads} ({source})")
    print(f"threads: {mine}, torch.set_num_threads({threads}) (torch sees {torch.get_num_threads()}); "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')} "
          f"OPENBLAS_L2_SIZE={os.environ.get('OPENBLAS_L2_SIZE', '(unset)')}")
    print(f"first-step loss: minirlhf {l0:.5f}, torch {t0:.5f}")
    print(f"{'implementation':<40} {'step (ms)':>10}")
    label = f"minirlhf (numpy {np.__version__}{f', {ranks.size} replicas' if ranks.size > 1 else ''})"
    print(f"{label:<40} {ours_t * 1e3:>10.1f}")
    print(f"{tname + ' (torch ' + torch.__version__ + ')':<40} {torch_t * 1e3:>10.1f}")
    print(f"ratio minirlhf / torch: {ours_t / torch_t:.2f}x")


def print_floor(args, threads, source):
    """``--floor``: four turns alternating, each after the pause, medians; see the module docstring."""
    import torch
    cfg, model, ids, ours = minirlhf_step(args.batch, args.seq)
    floor_step = minirlhf_step(args.batch, args.seq)[-1]  # a model of its own, which the floor's steps train
    theirs, tname = torch_step(cfg, model, ids)

    def floor():
        with without_ops():
            return floor_step()

    turns = {"minirlhf step": ours, "minirlhf floor: attention, GELU, layer norm passed through": floor,
             "PyTorch's attention, GELU (fused tanh), layer norm": torch_kernels(cfg, args.batch, args.seq),
             f"PyTorch step ({tname})": theirs}
    for f in turns.values():  # warm-up
        f()
    ms = {name: t * 1e3 for name, t in alternating(turns, args.runs, args.settle).items()}
    _, floor_ms, kernels, torch_ms = ms.values()
    ms["floor + PyTorch's kernels for the three ops"] = floor_ms + kernels
    print(f"GPT n_layer={cfg.n_layer} n_head={cfg.n_head} n_embd={cfg.n_embd} vocab={cfg.vocab_size}, batch "
          f"{args.batch} x T={args.seq}, float32; median of {args.runs} turns of each, alternating, each after a "
          f"pause of {args.settle} s")
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; numpy BLAS threads {threads} ({source}), "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'':<60} {'ms':>8} {'x torch step':>13}")
    for name, t in ms.items():
        print(f"{name:<60} {t:>8.1f} {t / torch_ms:>12.2f}x")


def print_breakdown(args, threads, source):
    minirlhf.backend.keep_freed_memory()
    step = minirlhf_step(args.batch, args.seq)[-1]
    spent, total = breakdown(step, args.runs)
    print(f"minirlhf's step alone: GPT n_layer=4 n_head=4 n_embd=128 vocab=512, batch {args.batch} x T={args.seq}, "
          f"float32; mean of {args.runs} steps after one untimed")
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; numpy BLAS threads {threads} ({source})")
    print(f"{'part of the step (forward + backward)':<44} {'ms':>8} {'share':>7}")
    for name, label in TIMED_OPS.items():
        print(f"{label:<44} {spent[name]:>8.1f} {spent[name] / total:>7.0%}")
    rest = total - sum(spent.values())
    print(f"{'the rest (engine, AdamW, loss, embeddings)':<44} {rest:>8.1f} {rest / total:>7.0%}")
    print(f"{'step':<44} {total:>8.1f}")


if __name__ == "__main__":
    main()
