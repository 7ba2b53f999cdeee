"""Benchmark: GRPO steps per second with 1 and 2 MPI ranks (or replica threads), one BLAS thread per rank.

The same global batch (``--prompts`` prompts × ``--group`` samples) on a GPT(``--layers``, 4 heads,
``--width`` wide, vocab 64; default 2 layers, 64 wide) with a toy rule reward; each rank samples and
trains on its share. Reported: steps/s (median step time after ``--warmup`` steps), the scaling
efficiency (steps/s with N ranks) / (N × steps/s with 1), and the share of a step spent in the gradient
allreduce, waiting for the slower rank included.

    python benchmarks/data_parallel.py [--steps 12] [--warmup 2] [--ranks 1 2] [--threads] [--layers 4 --width 256]

MPI ranks need ``pip install -e ".[mpi]"``: the script launches itself under ``mpiexec -n N``. With
``--threads`` the ranks are replicas, threads of one process (``minirlhf.distributed.replicas``), and the
script launches itself without mpiexec.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def worker(args):
    import numpy as np

    import minirlhf
    from minirlhf.distributed import world
    from minirlhf.model import GPT, GPTConfig
    from minirlhf.train.grpo import GRPOConfig, train_grpo

    ranks = world()
    in_allreduce = []
    sum_gradients = ranks.sum_gradients

    def timed(parameters):
        start = time.perf_counter()
        sum_gradients(parameters)
        in_allreduce.append(time.perf_counter() - start)
    ranks.sum_gradients = timed

    minirlhf.manual_seed(0)
    config = GPTConfig(n_layer=args.layers, n_head=4, n_embd=args.width, vocab_size=64, block_size=32)
    policy, reference = GPT(config), GPT(config)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, 64, rng.integers(4, 12)).tolist() for _ in range(256)]

    def reward(index, responses):
        return [float(len(r) > 0 and r[0] % 2 == 0) for r in responses]

    stamps = []
    cfg = GRPOConfig(steps=args.steps, lr=1e-3, prompts_per_step=args.prompts, group_size=args.group,
                     max_new_tokens=args.new_tokens)
    train_grpo(policy, reference, prompts, reward, cfg, eos_id=1, pad_id=0, progress=False,
               log=lambda metrics: stamps.append(time.perf_counter()))
    step_times = np.diff(stamps)[args.warmup:]
    share = sum(in_allreduce[args.warmup + 1:]) / sum(step_times)
    share = ranks.sum(share) / ranks.size
    if ranks.rank == 0:
        print(json.dumps({"ranks": ranks.size, "step_s": float(statistics.median(step_times)),
                          "allreduce_share": share}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=16, help="prompts per step (the global batch)")
    parser.add_argument("--group", type=int, default=8, help="samples per prompt")
    parser.add_argument("--new-tokens", type=int, default=16, help="longest response")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", action="store_true",
                        help="ranks as replica threads of one process instead of MPI processes")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=64, help="model width (a multiple of 4 heads)")
    parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)  # replicas to run, 1 under MPI
    args = parser.parse_args()
    if min(args.ranks) < 1 or args.layers < 1 or args.width < 4 or args.width % 4:
        parser.error("--ranks and --layers must be positive, --width a positive multiple of 4")
    if args.worker:
        from minirlhf.backend import keep_freed_memory
        from minirlhf.distributed import replicas
        keep_freed_memory()  # as the minirlhf command does
        return replicas(args.worker, worker, args)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    if mpiexec is None and not args.threads:
        sys.exit("data_parallel.py: needs mpiexec and mpi4py (pip install -e '.[mpi]'), or --threads")
    results = []
    for n in args.ranks:
        me = [sys.executable, __file__, *sys.argv[1:]]
        command = me + ["--worker", str(n)] if args.threads else [mpiexec, "-n", str(n)] + me + ["--worker", "1"]
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    base = 1 / results[0]["step_s"]
    print(f"GRPO, {args.prompts} prompts x {args.group} samples per step, {args.new_tokens} new tokens, "
          f"GPT({args.layers}, 4, {args.width}), one BLAS thread per rank "
          f"({'replica threads of one process' if args.threads else 'MPI processes'}), "
          f"median of {args.steps - args.warmup} steps")
    print(f"{'ranks':>5} {'steps/s':>8} {'speed-up':>8} {'efficiency':>10} {'allreduce':>9}")
    for r in results:
        speed = 1 / r["step_s"]
        print(f"{r['ranks']:>5} {speed:>8.2f} {speed / base:>8.2f} {speed / base / r['ranks']:>10.0%} "
              f"{r['allreduce_share']:>9.1%}")


if __name__ == "__main__":
    main()
