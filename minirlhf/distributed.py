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

Without MPI, :func:`replicas` runs the same program as N threads of one process (``minirlhf grpo
--replicas 2``): each thread is a rank of a :class:`ThreadWorld`, with its own copy of the model and
of the random generators, and the collectives meet at a barrier instead of a network. NumPy releases
the GIL inside its array loops and BLAS calls, so two replicas with one BLAS thread each keep two cores
busy with everything a step does, where one process with two BLAS threads runs only the matrix
products on both (the elementwise work, layer norm, softmax, GELU, AdamW, stays on one core). The
replicas share one GIL, which MPI's processes do not: on 2 cores, against one process, two replicas ran
GRPO at 4 layers × 256 wide 1.43x as fast and two MPI ranks 1.79x; at 2 × 64, whose steps are mostly
Python, 0.67x and 1.74x (``benchmarks/data_parallel.py``). Replicas are for where no launcher is at hand.
"""
import os
import sys
import threading
import traceback

import numpy as np

from . import backend
from .backend import cupy_or_none, is_cupy_array, to_numpy

# set by mpiexec / mpirun (MPICH's Hydra, Open MPI, PMIx, MVAPICH) in every process it starts
LAUNCHER_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")

_world = None
_replica = threading.local()  # the ThreadWorld of a replica thread (see replicas)


def world():
    """The ranks of this job: in a replica thread its :class:`ThreadWorld`, else an :class:`MPIWorld` under
    a launcher, else the :class:`SingleProcess`."""
    global _world
    own = getattr(_replica, "world", None)
    if own is not None:
        return own
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


class ThreadWorld(SingleProcess):
    """Replica ``rank`` of ``size`` threads of one process, started by :func:`replicas`.

    A collective posts this replica's value in its slot of the shared ``meeting``, waits at the barrier
    until every replica has posted, computes the result from all slots in rank order (each replica
    itself, so all get the same bits: the sum of two replicas' gradients is g_0 + g_1 on both), and
    waits again, so that no replica changes what it posted, or posts the next value, while another
    still reads. A replica that raises, or returns while the others still meet, breaks the barrier:
    the others' next collective raises instead of waiting forever.
    """

    def __init__(self, meeting, rank):
        self.meeting, self.rank, self.size = meeting, rank, meeting.parties

    def _all(self, value, combine):
        """``combine(values)``, the replicas' ``value`` in rank order."""
        slots = self.meeting.slots
        slots[self.rank] = value
        try:
            self.meeting.wait()
            result = combine(list(slots))
            self.meeting.wait()
        except _Stopped:
            raise ReplicaStopped(f"replica {self.rank} of {self.size}: another replica stopped (it raised, or "
                                 "returned without this collective)") from None
        return result

    def sum(self, values):
        scalar = np.ndim(values) == 0

        def add(all_values):
            total = np.zeros(np.shape(values), dtype=np.float64)
            for v in all_values:
                total += np.asarray(v, dtype=np.float64)
            return float(total) if scalar else total
        return self._all(values, add)

    def max(self, value):
        return self._all(value, max)

    def gather(self, rows):
        rows = to_numpy(rows)

        def concatenate(all_rows):
            tails = {r.shape[1:] for r in all_rows}
            if len(tails) != 1:
                raise ValueError(f"gather: the ranks' rows have different trailing shapes; rank {self.rank} has "
                                 f"{rows.shape[1:]}")
            return np.concatenate(all_rows)
        return self._all(rows, concatenate)

    def sum_gradients(self, parameters):
        parameters = list(parameters)

        def add(all_grads):
            sums = []
            for grads in zip(*all_grads):  # one parameter's gradient on each replica
                reached = [g for g in grads if g is not None]  # no replica reached it: grad stays None
                total = None
                for g in reached:
                    total = g.astype(np.float64) if total is None else total + g
                sums.append(None if total is None else total.astype(reached[0].dtype))
            return sums
        for p, g in zip(parameters, self._all([p.grad for p in parameters], add)):
            p.grad = g

    def barrier(self):
        self._all(None, lambda _: None)

    def abort(self, code=1):
        """End this replica with exit ``code``; the others stop at their next collective."""
        self.meeting.leave()
        raise SystemExit(code)


class ReplicaStopped(RuntimeError):
    """Raised in a replica's collective when another replica has left: the symptom, not the cause."""


class _Stopped(Exception):
    pass


class _Meeting:
    """Where the replicas of one :func:`replicas` call meet: one slot per replica, and a barrier that a
    replica leaving (raising or returning) breaks for every wait not yet released."""

    def __init__(self, size):
        self.parties, self.slots = size, [None] * size
        self._condition = threading.Condition()
        self._arrived, self._round, self._left = 0, 0, False

    def wait(self):
        """Return once all replicas have called this as often as the caller; raise _Stopped if one has left."""
        with self._condition:
            if self._left:
                raise _Stopped
            this_round = self._round
            self._arrived += 1
            if self._arrived == self.parties:
                self._arrived, self._round = 0, self._round + 1
                self._condition.notify_all()
                return
            while this_round == self._round:  # a released round counts even if a replica leaves right after
                if self._left:
                    raise _Stopped
                self._condition.wait()

    def leave(self):
        with self._condition:
            self._left = True
            self._condition.notify_all()


def replicas(n, fn, *args, **kwargs):
    """Run ``fn(*args, **kwargs)`` as ``n`` data-parallel replicas, threads of this process; return what
    replica 0 returned.

    Replica r sees ``world()`` as rank r of n (a :class:`ThreadWorld`) and starts from a copy of the
    calling thread's random generators, as N processes forked from this one would. Replica 0 runs in
    the calling thread (Ctrl-C reaches it). NumPy's BLAS is limited to one thread meanwhile
    (:func:`backend.blas_threads`): n replicas with n BLAS threads each would run n² threads on n
    cores. An exception in any replica stops the others at their next collective and is raised here.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"replicas: n must be a positive int, got {n!r}")
    if n == 1:
        return fn(*args, **kwargs)
    if world().size > 1:
        raise ValueError(f"replicas: this thread is already rank {world().rank} of {world().size}; "
                         "run replicas or MPI ranks, not both")
    meeting, generators = _Meeting(n), backend.copy_generators()
    results, errors = [None] * n, [None] * n

    def run(rank):
        _replica.world = ThreadWorld(meeting, rank)
        backend.use_generators(backend.copy_generators(generators))
        try:
            results[rank] = fn(*args, **kwargs)
        except BaseException as e:  # KeyboardInterrupt and SystemExit too: the others must not wait
            errors[rank] = e
        finally:
            meeting.leave()  # a replica still in a collective now has no partner: it raises, not hangs
            _replica.world = None
            backend.use_generators(None)

    threads = [threading.Thread(target=run, args=(rank,), name=f"minirlhf replica {rank}", daemon=True)
               for rank in range(1, n)]
    with backend.blas_threads(1):
        for t in threads:
            t.start()
        run(0)
        for t in threads:
            t.join()
    raised = [e for e in errors if e is not None]
    if raised:
        raise next((e for e in raised if not isinstance(e, ReplicaStopped)), raised[0])  # the cause first
    return results[0]
