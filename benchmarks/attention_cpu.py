"""Benchmark: causal attention on the CPU, forward + backward, at several sequence lengths.

q, k and v of shape (B=16, H=4, T, d=32), float32, as the model passes them (views of one fused
(B, T, 3, H, d) projection), causal, backward with a random output gradient. Three ways:

    blocks     minirlhf as it runs: blocks of 64 queries, each over only the keys it can see
    one block  minirlhf with every query in one block (all T keys for every query, masked)
    torch      torch.nn.functional.scaled_dot_product_attention(is_causal=True) (when torch is installed)

The three alternate, each first in turn (so drift in the machine's speed, and whatever the call before
leaves in the caches, hit each alike), the median of ``--runs`` calls is reported, and the outputs are
checked to agree. torch.set_num_threads is set to the number of threads
NumPy's BLAS uses (as in train_step.py); freed memory is kept for reuse as the ``minirlhf`` command does.
With more than one thread each turn starts with a pause of ``--settle`` seconds (train_step.py's
``SETTLE`` by default, none with one thread), so that no call runs beside the other library's idle
workers, which spin for a while before they sleep (see train_step.py); then one untimed call, which
wakes the turn's own workers, and the timed call right after it, as calls follow each other in a
training loop. (A pause alone would time each call with sleeping workers: at T = 64 torch's call took
12.2 ms that way, against 5.0 ms with one thread.)

    python benchmarks/attention_cpu.py [--lengths 64 128 256 512] [--runs 20] [--settle 0.2]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import minirlhf  # noqa: E402
import minirlhf.functional as F  # noqa: E402
from minirlhf import Tensor  # noqa: E402
from train_step import SETTLE, blas_thread_count, cpu_name, settle_for  # noqa: E402  (its folder is on sys.path)

B, H, D = 16, 4, 32


def ours(qkv, g, block):
    """Forward + backward through minirlhf's attention with ``block`` queries per block; the output."""
    saved, F._QUERY_BLOCK = F._QUERY_BLOCK, block
    try:
        x = Tensor(qkv, requires_grad=True)
        heads = x.permute(2, 0, 3, 1, 4)  # (3, B, H, T, d)
        out = F.scaled_dot_product_attention(heads[0], heads[1], heads[2], is_causal=True)
        out.backward(g)
        return out.data
    finally:
        F._QUERY_BLOCK = saved


def theirs(qkv, g):
    import torch
    x = torch.from_numpy(qkv).requires_grad_()
    heads = x.permute(2, 0, 3, 1, 4)
    out = torch.nn.functional.scaled_dot_product_attention(heads[0], heads[1], heads[2], is_causal=True)
    out.backward(torch.from_numpy(g))
    return out.detach().numpy()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--settle", type=float, default=None,
                        help=f"seconds to sleep before each turn (default: {SETTLE} with more than one thread, "
                             "else 0)")
    args = parser.parse_args()
    if any(T < 1 for T in args.lengths) or args.runs < 1:
        parser.error(f"--lengths and --runs must be positive; got {args.lengths} and {args.runs}")
    if args.settle is not None and args.settle < 0:
        parser.error(f"--settle must be at least 0 seconds; got {args.settle}")
    try:
        import torch
    except ImportError:
        torch = None
    threads, source = blas_thread_count()
    if torch is not None:
        torch.set_num_threads(threads)
    settle = settle_for(threads, args.settle)
    minirlhf.backend.keep_freed_memory()

    print(f"causal attention forward + backward, q/k/v ({B}, {H}, T, {D}) float32, median of {args.runs} "
          f"alternating turns (a pause of {settle} s, an untimed call, the timed one)\n"
          f"CPU: {cpu_name()}; BLAS threads {threads} ({source})")
    print(f"{'T':>5} {'blocks (ms)':>12} {'one block (ms)':>15} {'torch (ms)':>11} {'one block/blocks':>17} "
          f"{'blocks/torch':>13}")
    rng = np.random.default_rng(0)
    for T in args.lengths:
        qkv = rng.standard_normal((B, T, 3, H, D)).astype(np.float32)
        g = rng.standard_normal((B, H, T, D)).astype(np.float32)
        ways = {"blocks": lambda: ours(qkv, g, F._QUERY_BLOCK), "one block": lambda: ours(qkv, g, T)}
        if torch is not None:
            ways["torch"] = lambda: theirs(qkv, g)
        outs = {name: f() for name, f in ways.items()}  # warm-up, and the outputs agree
        for name, out in outs.items():
            np.testing.assert_allclose(out, outs["blocks"], rtol=1e-4, atol=1e-5, err_msg=name)
        times = {name: [] for name in ways}
        names = list(ways)
        for run in range(args.runs):
            for name in names[run % len(names):] + names[:run % len(names)]:  # each way first in turn
                time.sleep(settle)
                ways[name]()
                start = time.perf_counter()
                ways[name]()
                times[name].append(time.perf_counter() - start)
        ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        torch_ms = ms.get("torch", float("nan"))
        print(f"{T:>5} {ms['blocks']:>12.2f} {ms['one block']:>15.2f} {torch_ms:>11.2f} "
              f"{ms['one block'] / ms['blocks']:>16.2f}x {ms['blocks'] / torch_ms:>12.2f}x")


if __name__ == "__main__":
    main()
