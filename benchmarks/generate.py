"""Benchmark: decoding speed of minirlhf's generate with and without the KV cache, and transformers' generate.

GPT(n_layer=4, n_head=4, n_embd=128, vocab 512, block 512), a batch of 8 prompts of 16 tokens,
256 new tokens each, greedy (so all three produce the same tokens, which is checked).

    without cache: every step runs the whole sequence so far through the model, O(T²) work per row
    with cache:    every step runs one token and attends over the cached keys and values

Reports new tokens per second (batch × steps / seconds, median of --runs) and the ratios.
torch.set_num_threads is set to the number of threads NumPy's BLAS uses (as in train_step.py).

    python benchmarks/generate.py [--runs 3] [--quick]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import minirlhf  # noqa: E402
from minirlhf import no_grad  # noqa: E402
from minirlhf.model import GPT, GPTConfig  # noqa: E402
from minirlhf.sampling import generate  # noqa: E402
from train_step import blas_thread_count  # noqa: E402  (this script's folder is on sys.path)


def generate_without_cache(model, ids, steps):
    """Greedy decoding that re-runs the full sequence every step (the baseline the cache removes)."""
    with no_grad():
        for _ in range(steps):
            logits = model(ids).data[:, -1]
            ids = np.concatenate([ids, logits.argmax(-1)[:, None]], axis=1)
    return ids


def median_time(f, runs):
    times, out = [], None
    for _ in range(runs):
        start = time.perf_counter()
        out = f()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="one run of 64 new tokens (a smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.new_tokens = 1, 64

    cfg = GPTConfig(n_layer=4, n_head=4, n_embd=128, vocab_size=512, block_size=512)
    minirlhf.manual_seed(0)
    model = GPT(cfg)
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, 16))
    N = args.new_tokens
    generate(model, prompts, 4, temperature=0)  # warm-up

    rows = []
    t_cache, out = median_time(lambda: generate(model, prompts, N, temperature=0), args.runs)
    rows.append(("minirlhf generate, KV cache", t_cache))
    t_plain, plain = median_time(lambda: generate_without_cache(model, prompts, N), args.runs)
    rows.append(("minirlhf, no cache (full forward/step)", t_plain))
    if not np.array_equal(plain[:, 16:], out.tokens):
        print("warning: cached and uncached greedy decoding disagree")

    t_hf = None
    try:
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        print("transformers not installed: skipping its generate")
    else:
        threads, source = blas_thread_count()
        torch.set_num_threads(threads)
        print(f"threads: numpy BLAS {threads} ({source}), torch.set_num_threads({threads})")
        hc = GPT2Config(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, vocab_size=cfg.vocab_size,
                        n_positions=cfg.block_size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=None, eos_token_id=None, pad_token_id=None)
        hf = GPT2LMHeadModel(hc).eval()
        conv1d = ("c_attn.weight", "c_proj.weight", "c_fc.weight")
        hf.load_state_dict({"transformer." + k: torch.from_numpy(v.T.copy() if k.endswith(conv1d) else v)
                            for k, v in model.state_dict().items()}, strict=False)
        hf.tie_weights()
        tids = torch.from_numpy(prompts)

        def hf_generate():
            with torch.no_grad():
                return hf.generate(tids, attention_mask=torch.ones_like(tids), max_new_tokens=N,
                                   min_new_tokens=N, do_sample=False, use_cache=True)
        hf_generate()
        t_hf, hf_out = median_time(hf_generate, args.runs)
        rows.append(("transformers generate, KV cache", t_hf))
        if not np.array_equal(hf_out[:, 16:].numpy(), out.tokens):
            print("note: transformers' greedy tokens differ from ours (float rounding near ties)")

    tokens = args.batch * N
    print(f"GPT n_layer=4 n_head=4 n_embd=128 vocab=512; batch {args.batch}, prompt 16, {N} new tokens, greedy; "
          f"median of {args.runs}")
    print(f"{'decoder':<42} {'seconds':>9} {'tokens/s':>10}")
    for name, t in rows:
        print(f"{name:<42} {t:>9.3f} {tokens / t:>10.0f}")
    print(f"KV cache speed-up over no cache: {t_plain / t_cache:.1f}x")
    if t_hf is not None:
        print(f"minirlhf (cache) / transformers time: {t_cache / t_hf:.2f}x")


if __name__ == "__main__":
    main()
