"""Benchmark: minirlhf's BPETokenizer against Hugging Face `tokenizers` (and `tiktoken`, if it can load
GPT-2's files offline) on ~1 MB of English prose, the docstrings of CPython's standard library.

Reports training time to vocab 2048, compression (tokens per byte) of both trained tokenizers and
their relative difference, and encode throughput (MB/s, median of several runs) with the ratios.

    python benchmarks/tokenizer.py [--mb 1.0] [--vocab-size 2048] [--runs 5]
"""

import argparse
import ast
import os
import statistics
import sys
import sysconfig
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # one core for `tokenizers` too: a like-for-like comparison
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minirlhf.tokenizer import SPECIAL_TOKENS, BPETokenizer  # noqa: E402


def stdlib_docstrings(n_bytes):
    """The docstrings of the standard library's modules, in sorted file order, up to n_bytes of UTF-8:
    deterministic for a given Python, needs no download, and mostly English prose with some code."""
    parts, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "test" in path.parts or "site-packages" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    parts.append(doc + "\n\n")
                    size += len(parts[-1].encode("utf-8"))
                    if size >= n_bytes:
                        return "".join(parts)[:n_bytes]
    return "".join(parts)


def timed(f, runs):
    """Median wall time of f() over runs calls, after one warm-up call; returns (seconds, last result)."""
    result = f()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        result = f()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=1.0, help="megabytes of training text")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=5, help="encode runs; the median is reported")
    args = parser.parse_args()

    text = stdlib_docstrings(int(args.mb * 1e6))
    mb = len(text.encode("utf-8")) / 1e6
    print(f"text: {mb:.2f} MB of standard-library docstrings (Python {sys.version.split()[0]}), "
          f"vocab_size={args.vocab_size}, encode median of {args.runs} runs, one thread\n")
    rows = []  # (name, train s, encode MB/s cold, encode MB/s warm, tokens per byte)

    start = time.perf_counter()
    ours = BPETokenizer().train(text, args.vocab_size, special_tokens=SPECIAL_TOKENS)
    train_s = time.perf_counter() - start

    def encode_cold():
        ours._cache.clear()  # measure BPE itself, not the word cache
        return ours.encode(text)
    cold_s, ids = timed(encode_cold, args.runs)
    warm_s, _ = timed(lambda: ours.encode(text), args.runs)
    rows.append(("minirlhf", train_s, mb / cold_s, mb / warm_s, len(ids) / (mb * 1e6)))

    try:
        from tokenizers import ByteLevelBPETokenizer
    except ImportError:
        print("tokenizers not installed: skipping it")
    else:
        hf = ByteLevelBPETokenizer(add_prefix_space=False)
        start = time.perf_counter()
        hf.train_from_iterator([text], vocab_size=args.vocab_size, min_frequency=0,
                               special_tokens=list(SPECIAL_TOKENS), show_progress=False)
        hf_train_s = time.perf_counter() - start
        hf_s, enc = timed(lambda: hf.encode(text), args.runs)
        rows.append(("tokenizers", hf_train_s, mb / hf_s, None, len(enc.ids) / (mb * 1e6)))

    try:
        import tiktoken
        gpt2 = tiktoken.get_encoding("gpt2")  # downloads GPT-2's files unless they are cached
    except Exception as e:  # no tiktoken, or no network: which exception depends on the version
        print(f"tiktoken gpt2 unavailable ({type(e).__name__}): skipping it")
    else:
        tt_s, tt_ids = timed(lambda: gpt2.encode_ordinary(text), args.runs)
        rows.append(("tiktoken gpt2 (vocab 50257)", None, mb / tt_s, None, len(tt_ids) / (mb * 1e6)))

    def cell(x, width, decimals=2):
        return f"{x:{width}.{decimals}f}" if x is not None else f"{'-':>{width}}"

    print(f"{'tokenizer':<28} {'train s':>9} {'encode MB/s':>12} {'warm MB/s':>10} {'tokens/byte':>12}")
    for name, tr, cold, warm, tpb in rows:
        print(f"{name:<28} {cell(tr, 9)} {cell(cold, 12)} {cell(warm, 10)} {cell(tpb, 12, 4)}")
    print()
    for name, tr, cold, _, tpb in rows[1:]:
        if tr is not None:
            print(f"train time, minirlhf / {name}: {train_s / tr:.1f}x")
        print(f"encode throughput, minirlhf / {name}: {rows[0][2] / cold:.3f}x")
        print(f"tokens per byte, minirlhf vs {name}: {100 * (rows[0][4] / tpb - 1):+.2f}%")


if __name__ == "__main__":
    main()
