"""Benchmark: a 135M-parameter Llama (SmolLM2-135M's shape) in minirlhf (NumPy) against transformers (PyTorch CPU).

The model: 30 layers, 576 wide, 9 query heads sharing 3 K/V heads, SwiGLU 1536 wide, vocab 49152, tied
embeddings, rope_theta 100000; random weights made by transformers, written with save_pretrained and
read by ``Llama.from_pretrained``, so both run the same weights.

    train step   forward + backward of next-token cross-entropy, batch × seq tokens; the two
                 alternate (drift in the machine's speed hits both); median of --runs each
    generation   greedy decoding with the KV cache, --new-tokens after 16-token prompts, ours
                 (minirlhf.sampling.generate) against transformers' generate; both must give the
                 same tokens; new tokens per second, median of --gen-runs

torch.set_num_threads is set to the number of threads NumPy's BLAS uses (as in train_step.py).

    python benchmarks/llama.py [--runs 3] [--batch 4] [--seq 64] [--quick]
"""
import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import minirlhf.functional as F  # noqa: E402
from minirlhf.llama import Llama  # noqa: E402
from minirlhf.sampling import generate  # noqa: E402
from train_step import blas_thread_count  # noqa: E402  (this script's folder is on sys.path)

SMOLLM2_135M = dict(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
                    tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 100000.0})


def cpu_model():
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def timed(f):
    start = time.perf_counter()
    out = f()
    return time.perf_counter() - start, out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--gen-batch", type=int, default=4)
    parser.add_argument("--gen-runs", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2 layers, 1 run each (a smoke run)")
    args = parser.parse_args()

    import torch
    import transformers
    shape = dict(SMOLLM2_135M, num_hidden_layers=2) if args.quick else SMOLLM2_135M
    if args.quick:
        args.runs, args.gen_runs, args.new_tokens = 1, 1, 8
    threads, source = blas_thread_count()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape, bos_token_id=None, eos_token_id=None,
                                                                    pad_token_id=None)).eval()
    with tempfile.TemporaryDirectory() as path:
        theirs.save_pretrained(path)
        ours = Llama.from_pretrained(path)
    n_params = ours.num_parameters()
    print(f"CPU: {cpu_model()}; {threads} BLAS/torch threads ({source}); numpy {np.__version__}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"model: Llama {shape['num_hidden_layers']} layers, {n_params / 1e6:.1f}M parameters")

    rng = np.random.default_rng(0)
    ids = rng.integers(0, shape["vocab_size"], (args.batch, args.seq + 1))
    t_ids = torch.from_numpy(ids)

    def ours_step():
        ours.zero_grad()
        loss = F.cross_entropy(ours(ids[:, :-1]), ids[:, 1:])
        loss.backward()
        return loss.item()

    def theirs_step():
        theirs.zero_grad()
        logits = theirs(t_ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), t_ids[:, 1:].reshape(-1))
        loss.backward()
        return loss.item()

    ours_step(), theirs_step()  # warm-up
    times = {"minirlhf": [], "torch": []}
    for _ in range(args.runs):
        t, loss_ours = timed(ours_step)
        times["minirlhf"].append(t)
        t, loss_theirs = timed(theirs_step)
        times["torch"].append(t)
    assert abs(loss_ours - loss_theirs) < 1e-3, (loss_ours, loss_theirs)
    mine, ref = statistics.median(times["minirlhf"]), statistics.median(times["torch"])
    print(f"\nforward + backward, batch {args.batch} x {args.seq} tokens, median of {args.runs} (interleaved):")
    print(f"  minirlhf   {mine * 1000:9.0f} ms")
    print(f"  torch      {ref * 1000:9.0f} ms   (transformers LlamaForCausalLM)")
    print(f"  ratio      {mine / ref:9.2f}x torch's time   (loss {loss_ours:.5f} vs {loss_theirs:.5f})")

    prompts = rng.integers(0, shape["vocab_size"], (args.gen_batch, 16))
    N = args.new_tokens

    def ours_generate():
        return generate(ours, prompts, max_new_tokens=N, temperature=0).tokens

    def theirs_generate():
        with torch.no_grad():
            out = theirs.generate(torch.from_numpy(prompts), attention_mask=torch.ones(prompts.shape, dtype=torch.long),
                                  max_new_tokens=N, do_sample=False, pad_token_id=0)
        return out[:, prompts.shape[1]:].numpy()

    gen = {"minirlhf": [], "torch": []}
    for _ in range(args.gen_runs):
        t, tokens_ours = timed(ours_generate)
        gen["minirlhf"].append(t)
        t, tokens_theirs = timed(theirs_generate)
        gen["torch"].append(t)
    same = np.array_equal(tokens_ours, tokens_theirs)
    rate = {k: args.gen_batch * N / statistics.median(v) for k, v in gen.items()}
    print(f"\ngreedy generation with the KV cache, batch {args.gen_batch}, {N} new tokens, "
          f"median of {args.gen_runs}:")
    print(f"  minirlhf   {rate['minirlhf']:9.1f} tok/s")
    print(f"  torch      {rate['torch']:9.1f} tok/s   (transformers generate)")
    print(f"  ratio      {rate['minirlhf'] / rate['torch']:9.2f}x torch's speed   (same tokens: {same})")


if __name__ == "__main__":
    main()
