"""Gradient checks: central finite differences in float64, and CuPy against NumPy.

``check_grad(fn, *inputs)`` builds float64 leaf Tensors from ``inputs``, draws a random
cotangent ``c`` of the output's shape, and compares the gradient that ``backward`` puts
into each leaf for ``(fn(*leaves) * c).sum()`` with the central difference

    ∂/∂x_i ≈ [L(x + eps·e_i) − L(x − eps·e_i)] / (2·eps),   L(x) = Σ fn(x) · c.

``check_device(fn, *inputs, device="cuda")`` runs the same function on the device in
float32 and compares its value and gradients with the NumPy float64 run.

``fn`` takes Tensors and returns a Tensor; constant arrays it needs (indices, masks)
should be moved to its inputs' device with ``x.xp.asarray(...)``.
"""
import numpy as np

from minirlhf import Tensor, backend


def _cotangent(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape)


def _value_and_grads(fn, arrays, dtype, device, c=None, seed=0):
    """fn's output (NumPy) and the gradients of (out · c).sum() for each input (NumPy)."""
    leaves = [Tensor(a, requires_grad=True, dtype=dtype, device=device) for a in arrays]
    out = fn(*leaves)
    if c is None:
        c = _cotangent(out.shape, seed)
    (out * Tensor(c, dtype=out.dtype, device=device)).sum().backward()
    grads = []
    for i, leaf in enumerate(leaves):
        if leaf.grad is None:
            raise AssertionError(f"input {i} received no gradient")
        if leaf.grad.shape != leaf.shape:
            raise AssertionError(f"input {i}: gradient has shape {leaf.grad.shape}, input {leaf.shape}")
        if leaf.grad.dtype != leaf.dtype:
            raise AssertionError(f"input {i}: gradient has dtype {leaf.grad.dtype}, input {leaf.dtype}")
        grads.append(backend.to_numpy(leaf.grad))
    return out.numpy(), grads, c


def check_grad(fn, *inputs, eps=1e-6, atol=1e-6, rtol=1e-5, seed=0):
    """Assert that autograd's gradients of ``fn`` match central finite differences (float64, NumPy).

    Returns ``(out, grads)`` as NumPy arrays so a test can check them further.
    """
    arrays = [np.array(a, dtype=np.float64) for a in inputs]
    out, grads, c = _value_and_grads(fn, arrays, np.float64, "cpu", seed=seed)

    def loss(xs):
        with_no_graph = fn(*[Tensor(x, dtype=np.float64) for x in xs])
        return float((with_no_graph.numpy() * c).sum())

    for i, a in enumerate(arrays):
        numeric = np.zeros_like(a)
        flat = a.reshape(-1)
        for j in range(flat.size):
            saved = flat[j]
            flat[j] = saved + eps
            up = loss(arrays)
            flat[j] = saved - eps
            down = loss(arrays)
            flat[j] = saved
            numeric.reshape(-1)[j] = (up - down) / (2 * eps)
        np.testing.assert_allclose(grads[i], numeric, rtol=rtol, atol=atol,
                                   err_msg=f"gradient of input {i} (shape {a.shape}) differs from finite differences")
    return out, grads


def check_device(fn, *inputs, device="cuda", rtol=2e-4, atol=2e-4, seed=0):
    """Assert that ``fn`` in float32 on ``device`` gives the NumPy float64 value and gradients.

    Tolerances are relative to the largest magnitude of each compared array.
    """
    arrays = [np.array(a, dtype=np.float64) for a in inputs]
    ref_out, ref_grads, c = _value_and_grads(fn, arrays, np.float64, "cpu", seed=seed)
    out, grads, _ = _value_and_grads(fn, arrays, np.float32, device, c=c)
    for name, got, want in [("output", out, ref_out)] + [(f"gradient of input {i}", g, r)
                                                         for i, (g, r) in enumerate(zip(grads, ref_grads))]:
        scale = max(1.0, float(np.max(np.abs(want), initial=0.0)))
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * scale,
                                   err_msg=f"{name} on {device} differs from NumPy float64")
