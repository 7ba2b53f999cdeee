"""Modules: parameter discovery, state dicts, train/eval, and the layers against torch.nn."""
import numpy as np
import pytest

import minirlhf
from minirlhf import Tensor, nn


class Block(nn.Module):
    def __init__(self, d):
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return x + self.drop(self.fc(self.ln(x)))


class TinyLM(nn.Module):
    def __init__(self, vocab=10, d=4, n_blocks=2, tied=False):
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(n_blocks)])
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def test_named_parameters_walk_submodules_and_module_lists_in_order():
    names = [n for n, _ in TinyLM().named_parameters()]
    block = ["ln.weight", "ln.bias", "fc.weight", "fc.bias"]
    assert names == (["emb.weight"] + [f"blocks.0.{n}" for n in block] + [f"blocks.1.{n}" for n in block]
                     + ["head.weight"])
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in TinyLM().parameters())


def test_a_shared_parameter_is_listed_once():
    model = TinyLM(tied=True)
    names = [n for n, _ in model.named_parameters()]
    assert "head.weight" not in names and names.count("emb.weight") == 1
    assert model.num_parameters() == TinyLM().num_parameters() - 10 * 4
    assert len(model.state_dict()) == len(names)


def test_state_dict_round_trip_reproduces_the_model():
    minirlhf.manual_seed(0)
    a = TinyLM().eval()
    minirlhf.manual_seed(1)
    b = TinyLM().eval()
    ids = np.array([[1, 2, 3], [4, 5, 9]])
    assert not np.allclose(a(ids).numpy(), b(ids).numpy())
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(a(ids).numpy(), b(ids).numpy())


def test_state_dict_holds_copies_not_views():
    model = TinyLM()
    state = model.state_dict()
    before = state["emb.weight"].copy()
    model.emb.weight.data += 1
    np.testing.assert_array_equal(state["emb.weight"], before)
    model.load_state_dict(state)
    state["emb.weight"] += 1                # the model does not alias the loaded arrays either
    np.testing.assert_array_equal(model.emb.weight.data, before)


def test_strict_load_names_missing_and_unexpected_keys():
    model = TinyLM()
    state = model.state_dict()
    del state["head.weight"]
    state["head.bias"] = np.zeros(10, dtype=np.float32)
    with pytest.raises(KeyError, match=r"missing keys \['head.weight'\], unexpected keys \['head.bias'\]"):
        model.load_state_dict(state)
    model.load_state_dict(state, strict=False)   # loads what matches, skips the rest


def test_loading_a_wrongly_shaped_array_names_the_key_and_both_shapes():
    model = TinyLM()
    state = model.state_dict()
    state["blocks.1.fc.weight"] = np.zeros((4, 5), dtype=np.float32)
    for strict in (True, False):
        with pytest.raises(ValueError, match=r"blocks.1.fc.weight has shape \(4, 5\) in the state, \(4, 4\) in "
                                             r"the model"):
            model.load_state_dict(state, strict=strict)


def test_train_and_eval_toggle_dropout_in_every_submodule():
    model = TinyLM()
    ids = np.array([[1, 2, 3, 4]])
    model.eval()
    assert all(not m.training for _, m in model.named_modules())
    np.testing.assert_array_equal(model(ids).numpy(), model(ids).numpy())
    model.train()
    assert all(m.training for _, m in model.named_modules())
    assert not np.array_equal(model(ids).numpy(), model(ids).numpy())


def test_zero_grad_clears_every_gradient():
    model = TinyLM()
    model(np.array([[1, 2]])).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_to_a_dtype_casts_every_parameter():
    model = TinyLM().to(np.float64)
    assert all(p.dtype == np.float64 for p in model.parameters())
    assert model(np.array([1, 2])).dtype == np.float64


def test_initialisation_repeats_under_manual_seed_and_follows_torch_bounds():
    minirlhf.manual_seed(7)
    a = nn.Linear(16, 8)
    minirlhf.manual_seed(7)
    b = nn.Linear(16, 8)
    np.testing.assert_array_equal(a.weight.data, b.weight.data)
    assert a.weight.dtype == np.float32
    assert np.abs(a.weight.data).max() <= 1 / 4 and np.abs(a.bias.data).max() <= 1 / 4
    emb = nn.Embedding(1000, 16).weight.data
    assert abs(emb.mean()) < 0.05 and abs(emb.std() - 1) < 0.05     # N(0, 1)


def test_dropout_rejects_p_outside_0_1():
    with pytest.raises(ValueError, match=r"Dropout: p must be in \[0, 1\), got 1.5"):
        nn.Dropout(1.5)


def test_a_module_without_forward_says_so():
    with pytest.raises(NotImplementedError, match="Empty must define forward"):
        type("Empty", (nn.Module,), {})()(1)


# ---------------------------------------------------------- against torch
def _compare_with_torch(ours, theirs, x, rtol=1e-10):
    """Same output, input gradient and parameter gradients (float64) for (out · c).sum()."""
    torch = pytest.importorskip("torch")
    ours.to(np.float64)
    theirs.double()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            dict(theirs.named_parameters())[name].copy_(torch.from_numpy(p.data))
    floating = x.dtype.kind == "f"
    xt = Tensor(x, requires_grad=floating, dtype=np.float64 if floating else None)
    xt_torch = torch.tensor(x, requires_grad=floating) if floating else torch.from_numpy(x)
    out, out_t = ours(xt), theirs(xt_torch)
    c = np.random.default_rng(0).standard_normal(out.shape)
    (out * c).sum().backward()
    (out_t * torch.from_numpy(c)).sum().backward()
    np.testing.assert_allclose(out.numpy(), out_t.detach().numpy(), rtol=rtol, atol=1e-12)
    if floating:
        np.testing.assert_allclose(xt.grad, xt_torch.grad.numpy(), rtol=rtol, atol=1e-12)
    for name, p in ours.named_parameters():
        np.testing.assert_allclose(p.grad, dict(theirs.named_parameters())[name].grad.numpy(), rtol=rtol,
                                   atol=1e-12, err_msg=name)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_torch(bias):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).standard_normal((2, 3, 5))
    _compare_with_torch(nn.Linear(5, 4, bias=bias), torch.nn.Linear(5, 4, bias=bias), x)


def test_embedding_matches_torch_with_repeated_ids():
    torch = pytest.importorskip("torch")
    ids = np.array([[0, 3, 3], [6, 0, 3]])
    _compare_with_torch(nn.Embedding(7, 4), torch.nn.Embedding(7, 4), ids)


@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_matches_torch(bias):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    ours, theirs = nn.LayerNorm(6, bias=bias), torch.nn.LayerNorm(6, bias=bias)
    ours.weight.data = rng.standard_normal(6).astype(np.float32)
    if bias:
        ours.bias.data = rng.standard_normal(6).astype(np.float32)
    _compare_with_torch(ours, theirs, rng.standard_normal((3, 4, 6)) * 3 + 1)
