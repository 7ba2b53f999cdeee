"""Tensor and autograd: backends and devices, dtypes, the graph walk, freeing, versions, no_grad,
detach, truth values."""
import gc
import subprocess
import sys
import threading
import weakref

import numpy as np
import pytest

import minirlhf
import minirlhf.functional as F
from minirlhf import Tensor, backend, no_grad

needs_gpu = pytest.mark.skipif(not backend.gpu_available(), reason="needs cupy and a CUDA GPU")


# ----------------------------------------------------------- backends
def test_import_works_without_cupy():
    script = r"""
import sys

class BlockCupy:
    def find_spec(self, name, path=None, target=None):
        if name == "cupy" or name.startswith(("cupy.", "cupyx")):
            raise ImportError(f"{name} is blocked for this test")
        return None

sys.meta_path.insert(0, BlockCupy())
import numpy as np
import minirlhf
from minirlhf import Tensor, backend
import minirlhf.functional as F

x = Tensor(np.arange(6.0).reshape(2, 3), requires_grad=True)
F.log_softmax(x, axis=-1).sum().backward()
assert x.grad.shape == (2, 3) and x.xp is np
assert not backend.gpu_available()
try:
    x.to("cuda")
except RuntimeError as e:
    assert "cupy" in str(e), e
else:
    raise AssertionError("x.to('cuda') without cupy did not raise")
assert "cupy" not in sys.modules
print("ok")
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "ok"


def test_tensor_knows_its_array_module(device):
    xp = backend.xp_for(device)
    x = Tensor([1.0, 2.0], device=device)
    assert x.xp is xp
    assert backend.get_array_module(x) is xp
    assert backend.get_array_module(x.data) is xp
    assert x.device == device
    assert (x * 2 + 1).xp is xp


def test_keep_freed_memory_applies_on_glibc_and_is_harmless_elsewhere():
    import platform
    applied = minirlhf.backend.keep_freed_memory()
    assert isinstance(applied, bool)
    if platform.libc_ver()[0] == "glibc":
        assert applied
    x = Tensor(np.arange(6.0).reshape(2, 3), requires_grad=True)
    (x * x).sum().backward()
    np.testing.assert_array_equal(x.grad, 2 * x.data)


@pytest.mark.skipif(backend.gpu_available(), reason="this machine has a GPU")
def test_to_cuda_without_a_gpu_says_what_is_missing():
    with pytest.raises(RuntimeError, match="cupy is not installed or sees no GPU"):
        Tensor([1.0]).to("cuda")
    with pytest.raises(RuntimeError, match="cuda"):
        Tensor([1.0], device="cuda")


def test_to_an_unknown_device_names_the_choices():
    with pytest.raises(ValueError, match=r"expected 'cpu' or 'cuda', got 'gpu'"):
        Tensor([1.0]).to("gpu")


def test_to_the_same_device_returns_the_tensor_itself():
    x = Tensor([1.0])
    assert x.to("cpu") is x


@needs_gpu
def test_to_moves_data_and_gradient_between_devices():
    x = Tensor(np.array([1.0, -2.0, 3.0]), requires_grad=True, dtype=np.float64)
    y = x.to("cuda")
    assert y.device == "cuda" and backend.is_cupy_array(y.data)
    (y * y).sum().backward()
    assert isinstance(x.grad, np.ndarray)
    np.testing.assert_allclose(x.grad, 2 * x.data)
    back = y.to("cpu")
    assert back.device == "cpu"
    np.testing.assert_array_equal(back.numpy(), x.numpy())


@needs_gpu
def test_mixing_devices_in_one_op_is_an_error():
    a = Tensor(np.ones(3))
    b = Tensor(np.ones(3), device="cuda")
    with pytest.raises(RuntimeError, match=r"add: inputs are on different devices \(cuda and cpu\)"):
        b + a
    with pytest.raises(RuntimeError, match=r"mul: got a cpu array with a cuda tensor"):
        b * np.ones(3)
    with pytest.raises(RuntimeError, match=r"embedding: ids are on cpu, weight on cuda"):
        F.embedding(np.array([0, 1]), Tensor(np.ones((3, 2)), device="cuda"))
    with pytest.raises(RuntimeError, match=r"matmul: inputs are on different devices"):
        a.reshape(1, 3) @ b.reshape(3, 1)
    q = b.reshape(1, 3)
    with pytest.raises(RuntimeError, match=r"scaled_dot_product_attention: attn_mask is on cpu, q on cuda"):
        F.scaled_dot_product_attention(q, q, q, attn_mask=np.ones((1, 1), dtype=bool))
    with pytest.raises(RuntimeError, match=r"cross_entropy: targets are on cpu, logits on cuda"):
        F.cross_entropy(q, np.array([0]))
    with pytest.raises(RuntimeError, match=r"backward: grad is on cpu, tensor on cuda"):
        Tensor(np.ones(3), requires_grad=True, device="cuda").backward(np.ones(3))


# ------------------------------------------------------------- dtypes
def test_float_data_defaults_to_float32():
    assert Tensor([1.0, 2.0]).dtype == np.float32
    assert Tensor(np.ones(2, dtype=np.float64)).dtype == np.float32
    assert Tensor(3.5).dtype == np.float32
    assert minirlhf.DEFAULT_DTYPE == np.float32


def test_float64_is_available_on_request():
    x = Tensor([1.0, 2.0], dtype=np.float64, requires_grad=True)
    y = (x * 0.1 + 1).exp().sum()
    assert y.dtype == np.float64
    y.backward()
    assert x.grad.dtype == np.float64


def test_integer_and_boolean_data_keep_their_dtype():
    assert Tensor(np.array([1, 2], dtype=np.int32)).dtype == np.int32
    assert Tensor([1, 2]).dtype.kind == "i"
    assert Tensor(np.array([True, False])).dtype == np.bool_


def test_requires_grad_needs_a_floating_dtype():
    with pytest.raises(TypeError, match="requires_grad needs a floating dtype, got int64"):
        Tensor(np.array([1, 2], dtype=np.int64), requires_grad=True)


def test_python_numbers_take_the_tensors_dtype():
    x64 = Tensor([1.0], dtype=np.float64)
    x32 = Tensor([1.0])
    assert (x64 * 0.1).dtype == np.float64
    assert (x32 * np.float64(0.1)).dtype == np.float32
    assert (2.0 - x32).dtype == np.float32
    assert (x32 / np.ones(1, dtype=np.float64)).dtype == np.float32


def test_a_float32_input_of_a_float64_op_gets_a_float32_gradient():
    a = Tensor([1.0, 2.0], requires_grad=True)
    b = Tensor([3.0, 4.0], requires_grad=True, dtype=np.float64)
    (a * b).sum().backward()
    assert a.grad.dtype == np.float32 and b.grad.dtype == np.float64
    np.testing.assert_allclose(a.grad, [3.0, 4.0])


def test_op_outputs_hold_arrays_not_numpy_scalars():
    x = Tensor([1.0, 2.0], requires_grad=True)
    for out in (x.sum(), x[0], x @ x, x.max()):
        assert isinstance(out.data, np.ndarray) and out.shape == ()
    x0 = Tensor(2.0, requires_grad=True, dtype=np.float64)
    (x0 * x0).backward()
    assert isinstance(x0.grad, np.ndarray) and x0.grad == 4.0


# ------------------------------------------------------------- autograd
def test_a_20000_op_chain_backpropagates_without_recursion():
    x = Tensor(1.0, requires_grad=True, dtype=np.float64)
    y = x
    for _ in range(10_000):             # two ops per step
        y = (y * 1.0001) + 0.5
    y.backward()
    np.testing.assert_allclose(x.grad, 1.0001 ** 10_000, rtol=1e-10)


def test_gradients_accumulate_into_a_tensor_used_twice():
    x = Tensor([1.0, -2.0, 3.0], requires_grad=True, dtype=np.float64)
    (x * x + x).sum().backward()                    # d/dx (x² + x) = 2x + 1
    np.testing.assert_allclose(x.grad, [3.0, -3.0, 7.0])


def test_gradients_accumulate_across_backward_calls():
    x = Tensor([1.0, 2.0], requires_grad=True, dtype=np.float64)
    (x * 3).sum().backward()
    (x * x).sum().backward()
    np.testing.assert_allclose(x.grad, [3 + 2, 3 + 4])


def test_slices_of_one_tensor_sum_into_its_gradient_whatever_the_order():
    # the q, k, v of a fused projection, overlapping slices, and the whole tensor used besides
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((3, 4, 5)), requires_grad=True, dtype=np.float64)
    c = [rng.standard_normal(s) for s in [(4, 5), (4, 5), (4, 5), (2, 4, 3), (3, 4, 5)]]
    parts = [x[0], x[1], x[2], x[1:, :, ::2], x]
    out = sum(((p * w).sum() for p, w in zip(parts, c)), Tensor(0.0, dtype=np.float64))
    out.backward()
    want = c[4].copy()
    want[0] += c[0]
    want[1] += c[1]
    want[2] += c[2]
    want[1:, :, ::2] += c[3]
    np.testing.assert_allclose(x.grad, want, rtol=1e-15)
    s = Tensor(1.5, requires_grad=True, dtype=np.float64)   # a 0-d tensor: its summed gradient stays an array
    t = s * 2.0
    (t + t + t[()]).backward()
    assert isinstance(s.grad, np.ndarray) and s.grad == 6.0


def test_backward_never_writes_into_a_gradient_it_did_not_make():
    # add passes the caller's gradient array on to both inputs as it is; the slice's gradient must then go
    # into a buffer of the engine's own, not into the caller's array
    x = Tensor(np.ones((2, 3)), requires_grad=True, dtype=np.float64)
    b = x * 2.0
    out = b + b[0:2]
    g = np.arange(6.0).reshape(2, 3)
    out.backward(g)
    np.testing.assert_array_equal(g, np.arange(6.0).reshape(2, 3))
    np.testing.assert_allclose(x.grad, 4 * g)
    y = Tensor(np.ones((2, 3)), requires_grad=True, dtype=np.float64)
    c = y * 2.0
    (c + c + c).backward(g)                                 # c gets the caller's array twice over, then once more
    np.testing.assert_array_equal(g, np.arange(6.0).reshape(2, 3))
    np.testing.assert_allclose(y.grad, 6 * g)


def test_diamond_graph_sums_both_paths():
    x = Tensor(np.array([0.5, 1.5]), requires_grad=True, dtype=np.float64)
    h = x.exp()
    (h * h.log() + h.sqrt()).sum().backward()       # h log h + √h with h = eˣ: d/dx = eˣ(x + 1) + ½ e^{x/2}
    expected = np.exp(x.data) * (x.data + 1) + 0.5 * np.exp(x.data / 2)
    np.testing.assert_allclose(x.grad, expected, rtol=1e-12)


def test_broadcast_gradients_are_summed_back_to_each_input_shape():
    a = Tensor(np.arange(3.0).reshape(3, 1), requires_grad=True, dtype=np.float64)
    b = Tensor(np.arange(4.0), requires_grad=True, dtype=np.float64)
    c = Tensor(2.0, requires_grad=True, dtype=np.float64)
    (a * b * c).sum().backward()
    assert a.grad.shape == (3, 1) and b.grad.shape == (4,) and c.grad.shape == ()
    np.testing.assert_allclose(a.grad[:, 0], 2 * b.data.sum() * np.ones(3))
    np.testing.assert_allclose(b.grad, 2 * a.data.sum() * np.ones(4))
    np.testing.assert_allclose(c.grad, (a.data * b.data).sum())


def test_backward_twice_through_a_freed_graph_is_an_error():
    x = Tensor([1.0, 2.0], requires_grad=True)
    loss = (x * x).sum()
    loss.backward()
    with pytest.raises(RuntimeError, match=r"backward: the graph behind this tensor \(op sum\) was already freed.*"
                                           r"retain_graph=True"):
        loss.backward()


def test_backward_into_a_freed_intermediate_is_an_error():
    x = Tensor([1.0, 2.0], requires_grad=True)
    y = x * 2
    y.sum().backward()
    with pytest.raises(RuntimeError, match=r"reached a freed part of the graph \(op mul\)"):
        (y * 3).sum().backward()


def test_retain_graph_allows_a_second_backward_that_doubles_the_gradient():
    x = Tensor([1.0, 2.0], requires_grad=True, dtype=np.float64)
    loss = (x * x).sum()
    loss.backward(retain_graph=True)
    np.testing.assert_allclose(x.grad, [2.0, 4.0])
    loss.backward()
    np.testing.assert_allclose(x.grad, [4.0, 8.0])


def test_backward_of_a_non_scalar_needs_a_grad_argument():
    x = Tensor(np.ones((2, 3)), requires_grad=True)
    with pytest.raises(RuntimeError, match=r"backward: grad can be implicit only for a one-element output; "
                                           r"got shape \(2, 3\)"):
        (x * 2).backward()


def test_backward_with_an_explicit_cotangent():
    x = Tensor(np.ones((2, 3)), requires_grad=True, dtype=np.float64)
    c = np.arange(6.0).reshape(2, 3)
    (x * 2).backward(c)
    np.testing.assert_allclose(x.grad, 2 * c)


def test_backward_with_a_wrongly_shaped_cotangent_names_both_shapes():
    x = Tensor(np.ones((2, 3)), requires_grad=True)
    with pytest.raises(ValueError, match=r"grad has shape \(3, 2\), expected the tensor's shape \(2, 3\)"):
        (x * 2).backward(np.ones((3, 2)))


def test_backward_on_a_tensor_without_grad_is_an_error():
    with pytest.raises(RuntimeError, match="does not require grad"):
        Tensor([1.0]).sum().backward()


def test_inputs_without_requires_grad_get_no_gradient():
    x = Tensor([1.0, 2.0], requires_grad=True)
    w = Tensor([3.0, 4.0])
    (x * w).sum().backward()
    assert w.grad is None and x.grad is not None


def test_leaf_gradients_are_writable_arrays_of_their_own():
    x = Tensor(np.ones((2, 3)), requires_grad=True)
    x.sum().backward()                      # sum's backward broadcasts a read-only view
    x.grad += 1
    np.testing.assert_array_equal(x.grad, 2 * np.ones((2, 3)))


# ------------------------------------------------------ graph lifetime
def _chain_with_weakrefs(x, n=50):
    refs, y = [], x
    for _ in range(n):
        y = (y * 1.01).tanh()
        refs.append(weakref.ref(y))
    return y.sum(), refs


def test_no_graph_is_kept_alive_after_backward():
    gc.collect()
    gc.disable()            # anything still alive below would be held by references, not awaiting collection
    try:
        x = Tensor(np.ones(4), requires_grad=True)
        loss, refs = _chain_with_weakrefs(x)
        loss.backward()
        assert loss._prev == () and loss._backward is None
        alive = sum(r() is not None for r in refs)
        assert alive == 0, f"{alive} of {len(refs)} intermediate tensors are still alive after backward"
    finally:
        gc.enable()


def test_retain_graph_keeps_the_graph_until_the_output_is_dropped():
    gc.disable()
    try:
        x = Tensor(np.ones(4), requires_grad=True)
        loss, refs = _chain_with_weakrefs(x)
        loss.backward(retain_graph=True)
        assert all(r() is not None for r in refs)
        del loss
        assert sum(r() is not None for r in refs) == 0
    finally:
        gc.enable()


# ------------------------------------------------------ no_grad, detach
def test_no_grad_builds_no_graph_and_restores_the_mode():
    x = Tensor([1.0, 2.0], requires_grad=True)
    with no_grad():
        assert not minirlhf.is_grad_enabled()
        y = x * 2
        with no_grad():
            pass
        assert not minirlhf.is_grad_enabled()
    assert minirlhf.is_grad_enabled()
    assert not y.requires_grad and y._prev == ()
    assert (x * 2).requires_grad


def test_no_grad_restores_the_mode_after_an_exception():
    with pytest.raises(ZeroDivisionError):
        with no_grad():
            1 / 0
    assert minirlhf.is_grad_enabled()


def test_no_grad_in_another_thread_leaves_this_thread_recording():
    """no_grad was process-wide: a rollout thread's no_grad() turned off gradients in the trainer."""
    entered, release = threading.Event(), threading.Event()

    def rollout():
        with no_grad():
            entered.set()
            release.wait(10)
    worker = threading.Thread(target=rollout)
    worker.start()
    try:
        assert entered.wait(10)
        assert minirlhf.is_grad_enabled()
        assert (Tensor([1.0], requires_grad=True) * 2).requires_grad
    finally:
        release.set()
        worker.join()


def test_a_new_thread_starts_with_gradients_on_even_inside_no_grad():
    seen = []
    with no_grad():
        worker = threading.Thread(target=lambda: seen.append(minirlhf.is_grad_enabled()))
        worker.start()
        worker.join()
    assert seen == [True]


def test_no_grad_works_as_a_decorator():
    @no_grad()
    def double(t):
        return t * 2
    assert not double(Tensor([1.0], requires_grad=True)).requires_grad


def test_detach_cuts_the_graph_and_keeps_the_values():
    x = Tensor([1.0, 2.0], requires_grad=True, dtype=np.float64)
    y = x * x
    d = y.detach()
    assert not d.requires_grad and d.is_leaf and d.dtype == np.float64
    np.testing.assert_array_equal(d.numpy(), y.numpy())
    (d * x).sum().backward()                # only the direct path: d/dx (const · x) = const
    np.testing.assert_allclose(x.grad, [1.0, 4.0])


# ------------------------------------------------------ operator forms
def test_an_ndarray_on_the_left_defers_to_the_tensor():
    x = Tensor([1.0, 2.0], requires_grad=True)
    for out in (np.ones(2) + x, np.ones(2) - x, np.ones(2) * x, np.ones(2) / x, np.ones((1, 2)) @ x):
        assert isinstance(out, Tensor) and out.requires_grad


def test_comparisons_give_boolean_tensors_without_a_graph():
    x = Tensor([1.0, 2.0, 3.0], requires_grad=True)
    assert (x > 1.5).tolist() == [False, True, True]
    assert (x <= 2).dtype == np.bool_ and not (x < 2).requires_grad
    assert (x >= Tensor([3.0, 2.0, 1.0])).tolist() == [False, True, True]


def test_method_forms_match_the_functions():
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((2, 3)), dtype=np.float64)
    np.testing.assert_array_equal(x.T.numpy(), x.numpy().T)
    np.testing.assert_array_equal(x.view(3, 2).numpy(), x.numpy().reshape(3, 2))
    np.testing.assert_array_equal(x.clamp(-0.1, 0.1).numpy(), np.clip(x.numpy(), -0.1, 0.1))
    assert x.float().dtype == np.float32 and x.float().double().dtype == np.float64
    assert x.sum().item() == pytest.approx(x.numpy().sum())
    assert len(x) == 2 and x.ndim == 2 and x.size == 6
    assert "requires_grad=True" in repr(Tensor([1.0], requires_grad=True))


# ------------------------------------------------------------ versions
def test_an_optimizer_step_between_forward_and_backward_is_refused():
    """PyTorch refuses with "modified by an inplace operation"; we gave gradients at the new weights."""
    w = minirlhf.nn.Parameter(np.ones(3))
    loss = (w * w).sum()
    opt = minirlhf.optim.SGD([w], lr=0.1)
    w.grad = np.ones(3, dtype=w.dtype)
    opt.step()
    with pytest.raises(RuntimeError, match=r"modified by an inplace operation.*version 1.*needs version 0"):
        loss.backward()


def test_assigning_data_makes_a_new_version_and_a_fresh_forward_is_fine():
    w = Tensor(np.ones(3), requires_grad=True, dtype=np.float64)
    assert w._version == 0
    w.data -= 0.5
    w.data = w.data * 2
    assert w._version == 2
    loss = (w * w).sum()
    loss.backward()
    np.testing.assert_array_equal(w.grad, [2.0, 2.0, 2.0])


def test_an_input_without_grad_modified_in_place_is_refused_too():
    x = Tensor(np.ones(3), requires_grad=True, dtype=np.float64)
    c = Tensor(np.full(3, 2.0), dtype=np.float64)
    y = (x * c).sum()
    c.data *= 3
    with pytest.raises(RuntimeError, match="inplace"):
        y.backward()


def test_detach_shares_the_version_count():
    x = Tensor(np.ones(3), requires_grad=True, dtype=np.float64)
    y = (x * x).sum()
    x.detach().data += 1
    with pytest.raises(RuntimeError, match="inplace"):
        y.backward()


# ------------------------------------------------------- truth values
def test_bool_of_a_tensor_with_several_elements_is_ambiguous():
    for data in (np.ones(2), np.zeros((2, 2)), np.zeros(0)):
        with pytest.raises(RuntimeError, match="ambiguous"):
            bool(Tensor(data))


def test_bool_of_a_one_element_tensor_is_its_truth_value():
    assert bool(Tensor(1.0)) and not bool(Tensor(0.0))
    assert bool(Tensor(np.array([[2.0]]))) and not bool(Tensor(np.array([False])))
    with pytest.raises(RuntimeError, match="ambiguous"):
        if Tensor([1.0, 3.0]) > 2:
            pass
