"""Mutation check of the CPU execution harness: each mutant of minirlhf/kernels/*.cu removes one
``__syncthreads()`` or raises one ``cp_async_wait_group<N>`` to N + 1 (waits for one group fewer), and
the kernel tests run against it (the "cuda_cpu" cases of tests/test_kernels.py). A mutant no test
kills is a defect the harness would not see. (Lowering a wait count only waits longer: still correct.)

    python tests/cuda_cpu/mutate.py          # from the repository root; prints one line per mutant

Exit status 1 if any mutant survives. About 20 s per mutant on two cores.
"""
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ROOT / "minirlhf" / "kernels"
PATTERN = re.compile(r"__syncthreads\(\);|cp_async_wait_group<(\d+)>\(\);")


def mutants(text):
    """(description, mutated text) for every barrier and every wait of ``text``."""
    for match in PATTERN.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        if match.group(1) is None:
            yield f"line {line}: __syncthreads() removed", text[:match.start()] + text[match.end():]
        else:
            n = int(match.group(1))
            changed = f"cp_async_wait_group<{n + 1}>();"
            yield f"line {line}: wait_group<{n}> -> <{n + 1}>", text[:match.start()] + changed + text[match.end():]


def main():
    survivors = 0
    for source in sorted(SOURCES.glob("*.cu")):
        text = source.read_text()
        for description, mutated in mutants(text):
            with tempfile.TemporaryDirectory() as directory:
                for other in SOURCES.glob("*.cu"):
                    shutil.copy(other, directory)
                (Path(directory) / source.name).write_text(mutated)
                result = subprocess.run(
                    [sys.executable, "-m", "pytest", "tests/test_kernels.py", "-x", "-q", "-k", "cuda_cpu",
                     "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True,
                    env={**__import__("os").environ, "MINIRLHF_KERNEL_SOURCES": directory})
            killed = result.returncode != 0
            survivors += not killed
            print(f"{source.name} {description}: {'killed' if killed else 'SURVIVED'}", flush=True)
    print(f"{survivors} survivor(s)")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
