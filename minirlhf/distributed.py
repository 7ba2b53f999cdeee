"""Data parallelism: N processes (ranks) share each step's work and take the same optimizer step.

Launched as ``mpiexec -n N minirlhf grpo ...``, every rank builds the same model from the same
seed, takes its share of the step's global batch (prompt groups, pairs or examples), and
back-propagates its share of the *global* loss:

    L = (1/C) Σ_i ℓ_i = Σ_r (C_r/C) · L_r,     L_r = (1/C_r) Σ_{i on rank r} ℓ_i,     C = Σ_r C_r

where C counts what the loss averages over (tokens for a token mean, sequences for a sequence
mean). One allreduce sums the ranks' gradients, flattened into one buffer, so every rank holds
∇L of the global batch and takes the same AdamW step: the weights stay identical without ever
being sent. Averaging the ranks' own means instead, (1/N) Σ_r L_r, weighs a token of a rank with
few tokens more than a token of a rank with many: a biased gradient whenever the counts differ.

Without a launcher (none of its variables in the environment) the world is one process and
mpi4py is never imported. With CuPy, rank r uses GPU r mod (GPUs on its node) and the gradients
are summed by NCCL, whose id rank 0 makes and MPI broadcasts.
"""
import os
import sys
import traceback

import numpy as np

from .backend import cupy_or_none, is_cupy_array, to_numpy

# set by mpiexec / mpirun (MPICH's Hydra, Open MPI, PMIx, MVAPICH) in every process it starts
LAUNCHER_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")

_world = None


def world():
    """The processes of this job: an :class:`MPIWorld` under a launcher, else the :class:`SingleProcess`."""
    global _world
    if _world is None:
        _world = MPIWorld() if any(v in os.environ for v in LAUNCHER_VARIABLES) else SingleProcess()
    return _world


def share(n, size, rank):
    """The rows [lo, hi) of ``n`` that ``rank`` of ``size`` takes: consecutive blocks, sizes within one."""
    lo, hi = rank * n // size, (rank + 1) * n // size
    return slice(lo, hi)


class SingleProcess:
    """One process: every reduction is the identity."""
    size, rank = 1, 0

    def sum(self, values):
        """Σ over ranks of a float or a float array."""
        return values

    def max(self, value):
        return value

    def gather(self, rows):
        """The ranks' arrays concatenated along axis 0, in rank order (trailing shapes must agree)."""
        return rows if is_cupy_array(rows) else np.asarray(rows)

    def sum_gradients(self, parameters):
        """Replace each parameter's gradient by its sum over ranks (one allreduce over a flat buffer)."""

    def barrier(self):
        pass

    def abort(self, code=1):
        """End every rank of the job with exit ``code``."""
        sys.exit(code)


class MPIWorld(SingleProcess):
    """The ranks of ``MPI.COMM_WORLD``. An exception that reaches the top of any rank aborts the whole job
    (MPI_Abort) after printing its traceback: the other ranks would otherwise wait forever in the next
    collective."""

    def __init__(self):
        from mpi4py import MPI
        self.MPI, self.comm = MPI, MPI.COMM_WORLD
        self.size, self.rank = self.comm.Get_size(), self.comm.Get_rank()
        self.nccl = None
        sys.excepthook = self._abort_on_error
        cupy = cupy_or_none()
        if cupy is not None and self.size > 1:
            self._use_gpu(cupy)

    def _abort_on_error(self, kind, error, tb):
        sys.stderr.write(f"rank {self.rank} of {self.size}: " + "".join(traceback.format_exception(kind, error, tb)))
        sys.stderr.flush()
        self.comm.Abort(1)

    def _use_gpu(self, cupy):
        """Rank r → GPU r mod n on its node; an NCCL communicator over all ranks for the gradients."""
        from cupy.cuda import nccl
        local = self.comm.Split_type(self.MPI.COMM_TYPE_SHARED)
        cupy.cuda.Device(local.Get_rank() % cupy.cuda.runtime.getDeviceCount()).use()
        unique_id = self.comm.bcast(nccl.get_unique_id() if self.rank == 0 else None, root=0)
        self.nccl = nccl.NcclCommunicator(self.size, unique_id, self.rank)

    def sum(self, values):
        scalar = np.ndim(values) == 0
        send = np.ascontiguousarray(values, dtype=np.float64).reshape(-1)
        out = np.empty_like(send)
        self.comm.Allreduce(send, out, op=self.MPI.SUM)
        return float(out[0]) if scalar else out.reshape(np.shape(values))

    def max(self, value):
        return self.comm.allreduce(value, op=self.MPI.MAX)

    def gather(self, rows):
        rows = np.ascontiguousarray(to_numpy(rows))
        counts = self.comm.allgather(rows.shape[0])
        tail = rows.shape[1:]
        if len(set(self.comm.allgather(tail))) != 1:
            raise ValueError(f"gather: the ranks' rows have different trailing shapes; rank {self.rank} has {tail}")
        width = int(np.prod(tail, dtype=np.int64))
        out = np.empty((sum(counts),) + tail, dtype=rows.dtype)
        self.comm.Allgatherv(rows, (out, [c * width for c in counts]))
        return out

    def sum_gradients(self, parameters):
        parameters = list(parameters)
        if not parameters:
            return
        xp = cupy_or_none() if is_cupy_array(parameters[0].data) else np
        # a last entry per parameter says whether any rank has its gradient: a parameter no rank
        # reached keeps grad None, as in one process (AdamW skips it)
        flat = xp.concatenate([xp.zeros(p.data.size, dtype=np.float64) if p.grad is None
                               else p.grad.reshape(-1).astype(np.float64) for p in parameters]
                              + [xp.asarray([p.grad is not None for p in parameters], dtype=np.float64)])
        if self.nccl is not None and xp is not np:
            from cupy.cuda import nccl
            self.nccl.allReduce(flat.data.ptr, flat.data.ptr, flat.size, nccl.NCCL_FLOAT64, nccl.NCCL_SUM,
                                xp.cuda.get_current_stream().ptr)
        else:
            host = to_numpy(flat)
            self.comm.Allreduce(self.MPI.IN_PLACE, host, op=self.MPI.SUM)
            flat = xp.asarray(host)
        reached = to_numpy(flat[-len(parameters):]) > 0
        start = 0
        for p, has_grad in zip(parameters, reached):
            if has_grad:
                p.grad = flat[start:start + p.data.size].reshape(p.data.shape).astype(p.data.dtype)
            start += p.data.size

    def barrier(self):
        self.comm.Barrier()

    def abort(self, code=1):
        sys.stderr.flush()
        self.comm.Abort(code)
