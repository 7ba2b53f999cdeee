"""Compile a .cu source for the CPU execution harness (cuda_cpu.h) into a shared library.

The source is compiled unmodified by the system C++ compiler, after cuda_cpu.h, in a small
wrapper that defines its dynamic shared-memory array and exports each ``__global__`` function as
``launch_<name>``. Libraries are cached under the temp directory, keyed by the hash of the source,
the header and the flags, so a test session compiles each source once.

``MINIRLHF_CUDA_CPU_SANITIZE=1`` builds with AddressSanitizer and UndefinedBehaviorSanitizer (the
Python process must then preload libasan: see ``sanitizer_env``).
"""
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

HEADER = Path(__file__).resolve().parent / "cuda_cpu.h"
# hidden symbols: each library keeps its own block, shared memory and scheduler (only launch_* are exported)
FLAGS = ["-std=c++17", "-O1", "-g0", "-fPIC", "-shared", "-fvisibility=hidden", "-fno-strict-aliasing",
         "-ffp-contract=off"]
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]


def compiler():
    """The C++ compiler, or None."""
    return shutil.which(os.environ.get("CXX", "g++"))


def sanitizing():
    return os.environ.get("MINIRLHF_CUDA_CPU_SANITIZE") == "1"


def sanitizer_env():
    """Environment for a Python process that loads sanitized libraries."""
    libasan = subprocess.run([compiler(), "-print-file-name=libasan.so"], capture_output=True, text=True,
                             check=True).stdout.strip()
    return dict(os.environ, MINIRLHF_CUDA_CPU_SANITIZE="1", LD_PRELOAD=libasan,
                ASAN_OPTIONS="detect_leaks=0:abort_on_error=1", UBSAN_OPTIONS="print_stacktrace=1")


def kernels_of(code):
    """(name, launch-bounds expression or None) of each ``__global__`` function, after the preprocessor
    (the entry points may come from a macro)."""
    expanded = subprocess.run([compiler(), "-E", "-P", "-x", "c++", "-DCUDA_CPU_HARNESS", "-"], input=code,
                              capture_output=True, text=True, check=True).stdout
    return re.findall(r"__global__\s+void\s+(?:__launch_bounds__\s*\(([^)]*)\)\s*)?(\w+)\s*\(", expanded)


def dynamic_shared_array(code):
    """(type, name) of the source's ``extern __shared__`` array (one name per source, as the GPU has one)."""
    found = set(re.findall(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?(\w+)\s+(\w+)\s*\[\s*\]", code))
    if len(found) > 1:
        raise ValueError(f"cuda_cpu: one extern __shared__ array per source, found {sorted(found)}")
    return found.pop() if found else ("float", "cuda_cpu_unused_shared")


def build(code):
    """Path of the shared library of ``code`` (cached) and the names of its kernels."""
    if compiler() is None:
        raise RuntimeError("cuda_cpu: no C++ compiler (set CXX or install g++)")
    flags = FLAGS + (SANITIZE_FLAGS if sanitizing() else [])
    key = hashlib.sha256("\0".join([code, HEADER.read_text(), *flags]).encode()).hexdigest()[:24]
    directory = Path(tempfile.gettempdir()) / "minirlhf-cuda-cpu" / key
    library = directory / "kernels.so"
    kernels = kernels_of(code)
    if not library.exists():
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "source.cu").write_text(code)
        shared_type, shared_name = dynamic_shared_array(code)
        wrapper = [f'#include "{HEADER}"', '#include "source.cu"',
                   f"CUDA_CPU_DYNAMIC_SHARED({shared_type}, {shared_name})"]
        wrapper += [f"CUDA_CPU_EXPORT({name}, {bounds or 'cuda_cpu::MAX_THREADS'})" for bounds, name in kernels]
        (directory / "wrapper.cpp").write_text("\n".join(wrapper) + "\n")
        partial = directory / f"kernels.{os.getpid()}.so"
        result = subprocess.run([compiler(), *flags, "wrapper.cpp", "-o", partial.name], cwd=directory,
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"cuda_cpu: compiling the kernels failed:\n{result.stderr[-4000:]}")
        partial.replace(library)  # atomic: a concurrent session sees a whole library or none
    return library, [name for _, name in kernels]
