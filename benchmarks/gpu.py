"""Benchmark the GPU backend: the fused kernels against naive CuPy and PyTorch, and a GPT-2-small step.

    python benchmarks/gpu.py [--only attention,attention_forward,logprobs,train_step] [--repeats 20]
                             [--quick] [--out benchmarks/results]

Writes ``<out>/<device>.json`` (the GPU's name as CuPy reports it, made safe for a file name;
``<device>.quick.json`` for a --quick smoke run, so it never overwrites real measurements): a
list of records ``{"benchmark", "impl", "shape", "median_ms", "peak_mem_mb", "device", ...}``;
records of the benchmarks not run this time are kept. Then prints a table.

* attention: causal attention forward + backward, B=4, H=12, d=64, T in {256, 1024, 2048, 4096};
  "fused" (minirlhf.kernels.attention, SIMT fp32), "fused_tf32x3" (its 3xTF32 tensor-core kernels),
  "naive" (CuPy matmul + softmax, the formula of F.scaled_dot_product_attention's plain path),
  "torch" (torch SDPA, fp32, same GPU).
* attention_forward: the same, forward only, with "tflops" = causal FLOPs 4·B·H·T²·d/2 per second.
* logprobs: log-probs of B=8 × T=1024 targets over V=50257, forward + backward: "fused",
  "naive" (CuPy log-softmax + take_along_axis), "torch"; and from hidden states (C=768) through
  the LM head: "chunked_linear" (F.linear_token_logprobs' GPU path) against "naive_linear" (full
  logits, then the naive log-probs).
* train_step: GPT-2 small (12 layers, 768 wide, vocab 50257), B=8 × T=512, forward + backward +
  AdamW: minirlhf on CuPy, minirlhf on NumPy (this machine's CPU cores; fewer repeats, recorded),
  and PyTorch CUDA fp32 (transformers' GPT2LMHeadModel, or a plain module).

Timing: CUDA events around each call after warm-up, the median of ``--repeats`` (>= 20 unless
--quick). peak_mem_mb: the most GPU memory the call held at once beyond what was allocated
before it (inputs excluded), from a CuPy memory-pool hook (torch: max_memory_allocated), one
extra untimed call after freeing the pool's cached blocks. CUPY_TF32=1 in the environment turns
on TF32 for CuPy's matrix products; torch gets the same setting, and "tf32" records it.

Without cupy or a CUDA GPU the script prints why on stderr and exits with status 1: nothing
was measured, so it does not pretend to succeed.
"""
import argparse
import json
import math
import os
import re
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minirlhf import backend  # noqa: E402

TF32 = os.environ.get("CUPY_TF32", "0") == "1"


# ------------------------------------------------------------- measuring
class PoolPeak:
    """Peak bytes held from CuPy's memory pool inside ``with``, beyond what was held on entry."""

    def __init__(self, cp):
        hook_base = cp.cuda.MemoryHook

        class Hook(hook_base):
            name = "PoolPeak"

            def __init__(self):
                self.current = self.peak = 0

            def malloc_postprocess(self, **kw):
                self.current += kw["mem_size"]
                self.peak = max(self.peak, self.current)

            def free_postprocess(self, **kw):
                self.current -= kw["mem_size"]
        self.hook = Hook()

    def __enter__(self):
        self.hook.__enter__()
        return self

    def __exit__(self, *exc):
        self.hook.__exit__(*exc)

    @property
    def peak_mb(self):
        return self.hook.peak / 2 ** 20


def cupy_measure(cp, fn, repeats, warmup=3):
    """(median ms over ``repeats`` CUDA-event-timed calls, peak MB of one more call)."""
    for _ in range(warmup):
        fn()
    cp.cuda.Device().synchronize()
    times = []
    for _ in range(repeats):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end))
    cp.get_default_memory_pool().free_all_blocks()
    with PoolPeak(cp) as peak:
        fn()
        cp.cuda.Device().synchronize()
    return statistics.median(times), peak.peak_mb


def torch_measure(torch, fn, repeats, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def numpy_measure(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    fn()
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return statistics.median(times), peak / 2 ** 20


def torch_cuda():
    """torch, if it is installed with CUDA, set to the same TF32 choice as CuPy; else None."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    torch.backends.cuda.matmul.allow_tf32 = TF32
    torch.backends.cudnn.allow_tf32 = TF32
    return torch


def guarded(cp, measure):
    """Run ``measure()``; an out-of-memory error becomes a record note instead of ending the run."""
    try:
        return measure(), None
    except Exception as e:  # cupy's and torch's out-of-memory errors have no common base
        if "out of memory" not in str(e).lower() and "OutOfMemory" not in type(e).__name__:
            raise
        return (None, None), "out of memory"
    finally:
        cp.get_default_memory_pool().free_all_blocks()


# ------------------------------------------------------------ benchmarks
def naive_attention(cp, q, k, v, dout, scale):
    """Causal attention forward + backward with whole (T, T) matrices: F's plain path, in CuPy."""
    T = q.shape[-2]
    i, j = cp.arange(T)[:, None], cp.arange(T)[None, :]
    s = cp.matmul(q, cp.swapaxes(k, -1, -2)) * scale + cp.where(j <= i, 0.0, -cp.inf).astype(q.dtype)
    e = cp.exp(s - s.max(axis=-1, keepdims=True))
    p = e / e.sum(axis=-1, keepdims=True)
    out = cp.matmul(p, v)
    if dout is None:
        return out
    dv = cp.matmul(cp.swapaxes(p, -1, -2), dout)
    dp = cp.matmul(dout, cp.swapaxes(v, -1, -2))
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))
    return out, cp.matmul(ds, k) * scale, cp.matmul(cp.swapaxes(ds, -1, -2), q) * scale, dv


def bench_attention(cp, torch, repeats, quick, forward_only):
    from minirlhf.kernels import attention
    B, H, d = (1, 2, 64) if quick else (4, 12, 64)
    records = []
    for T in ((64, 130) if quick else (256, 1024, 2048, 4096)):
        rng = cp.random.default_rng(0)
        q, k, v, dout = (rng.standard_normal((B, H, T, d), dtype=cp.float32) for _ in range(4))
        scale = 1.0 / math.sqrt(d)
        shape = {"B": B, "H": H, "T": T, "d": d, "causal": True}

        def fused(tensor_cores):
            out, lse = attention.forward(q, k, v, None, True, tensor_cores=tensor_cores)
            if not forward_only:
                attention.backward(q, k, v, out, lse, dout, None, True, tensor_cores=tensor_cores)

        impls = {"fused": lambda: cupy_measure(cp, lambda: fused(False), repeats),
                 "fused_tf32x3": lambda: cupy_measure(cp, lambda: fused(True), repeats),
                 "naive": lambda: cupy_measure(cp, lambda: naive_attention(cp, q, k, v, None if forward_only
                                                                           else dout, scale), repeats)}
        if torch is not None:
            tq, tk, tv, tdo = (torch.from_dlpack(a) for a in (q, k, v, dout))
            leaves = [a.clone().requires_grad_(not forward_only) for a in (tq, tk, tv)]

            def torch_sdpa():
                if forward_only:
                    with torch.no_grad():
                        torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=True)
                    return
                for a in leaves:
                    a.grad = None
                torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=True).backward(tdo)
            impls["torch"] = lambda: torch_measure(torch, torch_sdpa, repeats)
        for impl, measure in impls.items():
            (ms, mb), note = guarded(cp, measure)
            rec = {"benchmark": "attention_forward" if forward_only else "attention", "impl": impl,
                   "shape": shape, "median_ms": ms, "peak_mem_mb": mb}
            if forward_only and ms is not None:
                rec["tflops"] = 4 * B * H * T * T * d / 2 / (ms * 1e-3) / 1e12
            if note:
                rec["note"] = note
            records.append(rec)
        del q, k, v, dout
        cp.get_default_memory_pool().free_all_blocks()
    return records


def naive_logprobs(cp, x, t, g):
    """log_softmax + take_along_axis, and the backward g · (onehot − softmax): CuPy, whole (N, V) arrays."""
    z = x - x.max(axis=-1, keepdims=True)
    logp_all = z - cp.log(cp.exp(z).sum(axis=-1, keepdims=True))
    out = cp.take_along_axis(logp_all, t[:, None], axis=1)[:, 0]
    grad = -cp.exp(logp_all) * g[:, None]
    grad[cp.arange(x.shape[0]), t] += g
    return out, grad


def bench_logprobs(cp, torch, repeats, quick):
    from minirlhf.kernels import logprobs
    B, T, V, C = (2, 8, 1000, 64) if quick else (8, 1024, 50257, 768)
    N, chunk = B * T, (4 if quick else 1024)
    rng = cp.random.default_rng(0)
    x = rng.standard_normal((N, V), dtype=cp.float32) * 2
    t = rng.integers(0, V, N)
    g = rng.standard_normal(N, dtype=cp.float32)
    shape = {"B": B, "T": T, "V": V}
    records = []

    def fused():
        _, lse = logprobs.forward(x, t)
        logprobs.backward(x, t, lse, g)

    impls = {"fused": lambda: cupy_measure(cp, fused, repeats),
             "naive": lambda: cupy_measure(cp, lambda: naive_logprobs(cp, x, t, g), repeats)}
    if torch is not None:
        tx = torch.from_dlpack(x).clone().requires_grad_()
        tt, tg = torch.from_dlpack(t), torch.from_dlpack(g)

        def torch_logprobs():
            tx.grad = None
            torch.log_softmax(tx, -1).gather(-1, tt[:, None])[:, 0].backward(tg)
        impls["torch"] = lambda: torch_measure(torch, torch_logprobs, repeats)
    for impl, measure in impls.items():
        (ms, mb), note = guarded(cp, measure)
        records.append({"benchmark": "logprobs", "impl": impl, "shape": shape, "median_ms": ms, "peak_mem_mb": mb,
                        **({"note": note} if note else {})})
    del x
    cp.get_default_memory_pool().free_all_blocks()

    h = rng.standard_normal((N, C), dtype=cp.float32)
    w = rng.standard_normal((V, C), dtype=cp.float32) * 0.02

    def chunked():
        _, lse = logprobs.linear_logprobs_forward(h, w, t, chunk)
        logprobs.linear_logprobs_backward(h, w, t, lse, g, chunk)

    def naive_linear():
        logits = cp.matmul(h, w.T)
        _, dlogits = naive_logprobs(cp, logits, t, g)
        return cp.matmul(dlogits, w), cp.matmul(dlogits.T, h)

    for impl, fn in (("chunked_linear", chunked), ("naive_linear", naive_linear)):
        (ms, mb), note = guarded(cp, lambda: cupy_measure(cp, fn, repeats))
        rec = {"benchmark": "logprobs", "impl": impl, "shape": {**shape, "C": C}, "median_ms": ms, "peak_mem_mb": mb}
        if impl == "chunked_linear":
            rec["chunk_size"] = chunk
        if note:
            rec["note"] = note
        records.append(rec)
    return records


def bench_train_step(cp, torch, repeats, quick, numpy_repeats):
    import minirlhf
    import minirlhf.functional as F
    from minirlhf.model import GPT, GPTConfig
    from minirlhf.optim import AdamW
    if quick:
        cfg = GPTConfig(n_layer=1, n_head=2, n_embd=64, vocab_size=128, block_size=16, dropout=0.0)
        B, T = 2, 16
    else:
        cfg = GPTConfig(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=512, dropout=0.0)
        B, T = 8, 512
    shape = {"n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head, "vocab_size": cfg.vocab_size,
             "B": B, "T": T}
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T))
    minirlhf.manual_seed(0)
    cpu_model = GPT(cfg)
    state = {k: v.copy() for k, v in cpu_model.state_dict().items()}
    records = []

    def minirlhf_step(model, opt, ids):
        def step():
            logits = model(ids)
            loss = F.cross_entropy(logits[:, :-1], ids[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad()
        return step

    gpu_model = GPT(cfg)
    gpu_model.load_state_dict(state)
    gpu_model.to("cuda")
    step = minirlhf_step(gpu_model, AdamW(gpu_model.parameters(), lr=1e-4), cp.asarray(ids))
    (ms, mb), note = guarded(cp, lambda: cupy_measure(cp, step, repeats, warmup=2))
    records.append({"benchmark": "train_step", "impl": "cupy", "shape": shape, "median_ms": ms, "peak_mem_mb": mb,
                    "repeats": repeats, **({"note": note} if note else {})})
    del gpu_model, step
    cp.get_default_memory_pool().free_all_blocks()

    ms, mb = numpy_measure(minirlhf_step(cpu_model, AdamW(cpu_model.parameters(), lr=1e-4), ids), numpy_repeats)
    records.append({"benchmark": "train_step", "impl": "numpy", "shape": shape, "median_ms": ms, "peak_mem_mb": mb,
                    "repeats": numpy_repeats, "cpu_cores": os.cpu_count(),
                    "note": f"NumPy on the host CPU: median of {numpy_repeats} steps (fewer than the GPU's "
                            f"{repeats}); peak_mem_mb is host memory (tracemalloc)"})
    del cpu_model

    if torch is not None:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from train_step import torch_model  # GPT2LMHeadModel loaded with the same weights
        tmodel, tname = torch_model(cfg, state)
        tmodel = tmodel.to("cuda")
        topt = torch.optim.AdamW(tmodel.parameters(), lr=1e-4)
        tids = torch.from_numpy(ids).to("cuda")

        def torch_step():
            tmodel(tids, labels=tids).loss.backward()
            topt.step()
            topt.zero_grad()
        (ms, mb), note = guarded(cp, lambda: torch_measure(torch, torch_step, repeats, warmup=2))
        records.append({"benchmark": "train_step", "impl": "torch", "shape": shape, "median_ms": ms,
                        "peak_mem_mb": mb, "repeats": repeats, "model": tname, **({"note": note} if note else {})})
    return records


def bench_llama_step(cp, torch, repeats, quick):
    """Forward + backward + AdamW of a SmolLM2-135M-shaped Llama (grouped-query attention: 9 query heads on 3
    K/V heads), minirlhf on CuPy against transformers' LlamaForCausalLM on CUDA with the same weights."""
    import tempfile
    import minirlhf.functional as F
    from minirlhf.llama import Llama
    from minirlhf.optim import AdamW
    transformers = None
    try:
        import transformers
    except ImportError:
        pass
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from llama import SMOLLM2_135M
    shape = dict(SMOLLM2_135M, num_hidden_layers=2, vocab_size=512) if quick else SMOLLM2_135M
    B, T = (2, 16) if quick else (8, 512)
    record_shape = {"n_layer": shape["num_hidden_layers"], "n_embd": shape["hidden_size"],
                    "n_head": shape["num_attention_heads"], "n_kv_head": shape["num_key_value_heads"],
                    "vocab_size": shape["vocab_size"], "B": B, "T": T}
    if transformers is None or torch is None:
        return [{"benchmark": "llama_step", "impl": "cupy", "shape": record_shape, "median_ms": None,
                 "peak_mem_mb": None, "note": "needs transformers and torch to make the weights"}]
    ids = np.random.default_rng(0).integers(0, shape["vocab_size"], (B, T))
    torch.manual_seed(0)
    theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape, bos_token_id=None, eos_token_id=None,
                                                                    pad_token_id=None))
    with tempfile.TemporaryDirectory() as path:
        theirs.save_pretrained(path)
        ours = Llama.from_pretrained(path)
    ours.to("cuda")
    opt = AdamW(ours.parameters(), lr=1e-4)
    gids = cp.asarray(ids)

    def ours_step():
        loss = F.cross_entropy(ours(gids[:, :-1]), gids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    records = []
    (ms, mb), note = guarded(cp, lambda: cupy_measure(cp, ours_step, repeats, warmup=2))
    records.append({"benchmark": "llama_step", "impl": "cupy", "shape": record_shape, "median_ms": ms,
                    "peak_mem_mb": mb, "repeats": repeats, **({"note": note} if note else {})})
    del ours, opt
    cp.get_default_memory_pool().free_all_blocks()
    theirs = theirs.to("cuda")
    topt = torch.optim.AdamW(theirs.parameters(), lr=1e-4)
    tids = torch.from_numpy(ids).to("cuda")

    def torch_step():
        theirs(tids, labels=tids).loss.backward()
        topt.step()
        topt.zero_grad()
    (ms, mb), note = guarded(cp, lambda: torch_measure(torch, torch_step, repeats, warmup=2))
    records.append({"benchmark": "llama_step", "impl": "torch", "shape": record_shape, "median_ms": ms,
                    "peak_mem_mb": mb, "repeats": repeats, **({"note": note} if note else {})})
    return records


# ---------------------------------------------------------------- output
def result_path(out_dir, device, quick):
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", device).strip("_")
    return Path(out_dir) / (name + (".quick" if quick else "") + ".json")


def print_table(records):
    baseline = {(r["benchmark"], json.dumps(r["shape"], sort_keys=True)): r["median_ms"]
                for r in records if r["impl"] in ("naive", "numpy")}
    print(f"{'benchmark':<18} {'impl':<15} {'shape':<48} {'median ms':>10} {'peak MB':>9} {'speedup':>9}  extra")
    for r in records:
        shape = " ".join(f"{k}={v}" for k, v in r["shape"].items() if k != "causal")
        base = baseline.get((r["benchmark"], json.dumps(r["shape"], sort_keys=True)))
        if r["impl"] == "chunked_linear":
            base = next((x["median_ms"] for x in records if x["impl"] == "naive_linear"), None)
        ratio = f"{base / r['median_ms']:.2f}x" if base and r["median_ms"] else ""
        ms = f"{r['median_ms']:.3f}" if r["median_ms"] is not None else "-"
        mb = f"{r['peak_mem_mb']:.1f}" if r["peak_mem_mb"] is not None else "-"
        extra = f"{r['tflops']:.1f} TFLOP/s" if "tflops" in r else r.get("note", "")
        print(f"{r['benchmark']:<18} {r['impl']:<15} {shape:<48} {ms:>10} {mb:>9} {ratio:>9}  {extra}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="attention,attention_forward,logprobs,train_step,llama_step",
                        help="comma-separated benchmarks to run")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per measurement (>= 20)")
    parser.add_argument("--numpy-repeats", type=int, default=3, help="timed NumPy training steps")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 3 repeats: a smoke run, not a benchmark")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    if not backend.gpu_available():
        print("benchmarks/gpu.py: needs cupy and a CUDA GPU (pip install 'minirlhf[gpu]' on a machine with an "
              "NVIDIA GPU); nothing was measured.", file=sys.stderr)
        sys.exit(1)
    if args.quick:
        args.repeats = args.numpy_repeats = 3
    elif args.repeats < 20:
        parser.error("--repeats must be at least 20 (use --quick for a smoke run)")
    import cupy as cp
    device = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    torch = torch_cuda()
    chosen = [b.strip() for b in args.only.split(",") if b.strip()]
    records = []
    for name in chosen:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        if name in ("attention", "attention_forward"):
            records += bench_attention(cp, torch, args.repeats, args.quick, forward_only=name == "attention_forward")
        elif name == "logprobs":
            records += bench_logprobs(cp, torch, args.repeats, args.quick)
        elif name == "train_step":
            records += bench_train_step(cp, torch, args.repeats, args.quick, args.numpy_repeats)
        elif name == "llama_step":
            records += bench_llama_step(cp, torch, args.repeats, args.quick)
        else:
            parser.error(f"--only: unknown benchmark {name!r}")
    for r in records:
        r.update(device=device, tf32=TF32, quick=args.quick)
    path = result_path(args.out, device, args.quick)
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = [r for r in json.loads(path.read_text()) if r["benchmark"] not in chosen] if path.exists() else []
    path.write_text(json.dumps(kept + records, indent=1) + "\n")
    print(f"wrote {path} ({len(records)} records; CUPY_TF32={'1' if TF32 else '0'}, "
          f"torch {'with CUDA' if torch is not None else 'not available'})")
    print_table(kept + records)


if __name__ == "__main__":
    main()
