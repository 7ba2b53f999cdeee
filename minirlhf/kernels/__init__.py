"""Hand-written CUDA kernels for the GPU backend, and the NumPy references they are tested against.

Two ops dominate an RLHF step on long sequences with a big vocabulary, and both are
memory-bound when written with whole-array ops:

* attention (``attention.cu``, ``attention.py``): FlashAttention-2 forward and backward.
  softmax(q kᵀ) v is computed tile by tile with an online softmax, so the T×S matrix of scores
  is never stored; only the row log-sum-exp is kept for the backward, which recomputes the
  probabilities tile by tile. Grouped-query heads are read by index; a second set of kernels
  does the same on tensor cores (3xTF32 mma.sync).
* token log-probs (``logprobs.cu``, ``logprobs.py``): log softmax(logits)[target] with a
  streaming log-sum-exp that reads each logit once, and its one-pass backward
  g · (onehot − softmax). ``linear_logprobs_*`` chains it with the LM-head matrix product, a
  chunk of rows at a time, so the (N, V) logits never exist at once.

``reference.py`` runs the same algorithms (same tiles, same recurrences) in NumPy: it is what
the CPU test suite checks against the plain formulas, and what the GPU tests check the kernels
against. The .cu sources also run without a GPU, thread by thread, in the CPU execution
harness of ``tests/cuda_cpu``. ``minirlhf.functional`` dispatches to the kernels when its inputs
are CuPy arrays and the case is supported; the NumPy path stays the reference.

CuPy is imported only when a kernel is first launched, never when this package is imported.
"""
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
_modules = {}  # (device, filename) -> cupy.RawModule
_kernels = {}  # (device, filename, name) -> [cupy.RawKernel, dynamic shared memory it may use]


def cu_sources():
    """Paths of the CUDA sources of this package."""
    return sorted(SOURCE_DIR.glob("*.cu"))


def load_module(filename):
    """The ``cupy.RawModule`` of ``filename`` (in this directory) on the current device, compiled by
    NVRTC on first use there and cached (a module is loaded into one device's context)."""
    import cupy
    key = (cupy.cuda.runtime.getDevice(), filename)
    if key not in _modules:
        code = (SOURCE_DIR / filename).read_text()
        _modules[key] = cupy.RawModule(code=code, options=("-std=c++17",))
    return _modules[key]


def kernel(filename, name, shared_mem=0):
    """The kernel ``name`` of ``filename``'s module on the current device (cached), allowed
    ``shared_mem`` bytes of dynamic shared memory (above 48 KB a kernel must opt in, per device,
    before its launch)."""
    import cupy
    key = (cupy.cuda.runtime.getDevice(), filename, name)
    if key not in _kernels:
        _kernels[key] = [load_module(filename).get_function(name), 48 * 1024]
    entry = _kernels[key]
    if shared_mem > entry[1]:
        entry[0].max_dynamic_shared_size_bytes = shared_mem
        entry[1] = shared_mem
    return entry[0]
