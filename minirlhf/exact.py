"""An exact testbed: a language small enough to list every response, a tabular policy over it,
and the KL-regularised RLHF objective, its gradient and its optimum computed by enumeration.

Responses are token strings over 0..V−1 of length at most ``max_len``; token 0 (EOS) ends a
response and is part of it. With V = 3 and max_len = 3 there are 15 responses:

    (0,) (1,0) (2,0) (1,1,0) (1,2,0) (2,1,0) (2,2,0) (1,1,1) (1,1,2) ... (2,2,2)

The policy is tabular: one row of logits per non-terminal prefix (7 of them here), so
π(y_t | y_<t) = softmax(logits[prefix])[y_t] and π(y) = Π_t π(y_t | y_<t). Every
expectation over responses is a finite sum, so the lectures' KL-regularised objective

    J(π) = E_{y~π}[r(y)] − β KL(π ‖ π_ref)

and its gradient (by autograd through the sum) are exact, and so is the optimum
(Rafailov et al. 2023, eq. 4):

    π*(y) = π_ref(y) exp(r(y)/β) / Z,   Z = Σ_y π_ref(y) exp(r(y)/β),   J(π*) = β log Z,

which gives back the reward as r(y) = β log(π*(y)/π_ref(y)) + β log Z (eq. 5).
Stochastic estimators (REINFORCE, PPO, GRPO, k1/k3) are checked against these numbers.
"""
import numpy as np

from . import functional as F
from . import losses
from .nn import Module, Parameter
from .tensor import Tensor

EOS = 0


class TabularLanguage:
    """Every response of length <= max_len over tokens 0..vocab_size−1, EOS = 0 ending a response.

    Attributes (S responses, P prefixes, L = max_len):
      prefixes      list of the P non-terminal prefixes (tuples), () first
      responses     list of the S responses (tuples)
      tokens        (S, L) int: response tokens, 0 after the end
      prefix_ids    (S, L) int: index of the prefix each token is drawn from, 0 after the end
      mask          (S, L) float64: 1 on response tokens
    """

    def __init__(self, vocab_size=3, max_len=3):
        if vocab_size < 2:
            raise ValueError(f"vocab_size: needs EOS and at least one other token, got {vocab_size}")
        if max_len < 1:
            raise ValueError(f"max_len: must be >= 1, got {max_len}")
        self.vocab_size, self.max_len = vocab_size, max_len
        self.prefixes = [()]
        for prefix in self.prefixes:  # grows while we walk it: breadth-first
            if len(prefix) + 1 < max_len:
                self.prefixes.extend(prefix + (v,) for v in range(1, vocab_size))
        self.prefix_index = {p: i for i, p in enumerate(self.prefixes)}
        self.responses = [p + (v,) for p in self.prefixes for v in range(vocab_size)
                          if v == EOS or len(p) + 1 == max_len]
        S, L = len(self.responses), max_len
        self.tokens = np.zeros((S, L), dtype=np.int64)
        self.prefix_ids = np.zeros((S, L), dtype=np.int64)
        self.mask = np.zeros((S, L), dtype=np.float64)
        for s, y in enumerate(self.responses):
            for t, v in enumerate(y):
                self.tokens[s, t] = v
                self.prefix_ids[s, t] = self.prefix_index[y[:t]]
                self.mask[s, t] = 1.0

    @property
    def num_responses(self):
        return len(self.responses)

    @property
    def num_prefixes(self):
        return len(self.prefixes)


class TabularPolicy(Module):
    """π(v | prefix) = softmax(logits[prefix])[v]: one free row of logits per prefix (float64)."""

    def __init__(self, language, logits=None):
        self.language = language
        shape = (language.num_prefixes, language.vocab_size)
        logits = np.zeros(shape) if logits is None else np.asarray(logits, dtype=np.float64)
        if logits.shape != shape:
            raise ValueError(f"logits: expected shape {shape} (prefixes, vocab), got {logits.shape}")
        self.logits = Parameter(logits, dtype=np.float64)

    def forward(self, response_ids=None):
        """log π(y_t | y_<t) of the given responses (all if None), 0 after each one ends: (n, L)."""
        return tabular_token_logprobs(self.language, self.logits, response_ids)

    token_logprobs = forward

    def sequence_logprobs(self, response_ids=None):
        """log π(y) of the given responses (all if None): (n,)."""
        return losses.sequence_logprobs(*_next_token_logits(self.language, self.logits, response_ids))

    def probs(self):
        """π(y) of every response as a NumPy array (S,); it sums to 1."""
        return np.exp(self.sequence_logprobs().numpy())

    def sample(self, n, rng):
        """Indices of n responses drawn i.i.d. from π (exactly as sampling token by token would)."""
        p = self.probs()
        return rng.choice(len(p), size=n, p=p / p.sum())


def _next_token_logits(language, logits, response_ids):
    """(logits (n, L, V), tokens (n, L), mask (n, L)) of the given responses (all if None): each
    position's row of ``logits`` is the one of the prefix before it."""
    ids = np.arange(language.num_responses) if response_ids is None else np.asarray(response_ids)
    return F.embedding(language.prefix_ids[ids], logits), language.tokens[ids], language.mask[ids]


def tabular_token_logprobs(language, logits, response_ids=None):
    """log π(y_t | y_<t) = log softmax(logits[prefix of y_<t])[y_t] for the given responses (all if
    None), 0 after each one ends: (n, L). ``logits`` is a (prefixes, vocab) Tensor."""
    return losses.masked_token_logprobs(*_next_token_logits(language, logits, response_ids))


def policy_from_sequence_logprobs(language, seq_logp):
    """The tabular policy whose response distribution is exp(seq_logp) (which must sum to 1):
    logits[prefix, v] = log π(responses through prefix+v) − log π(responses through prefix)."""
    seq_logp = np.asarray(seq_logp, dtype=np.float64)
    through = {}  # log of the mass of every response that starts with a given prefix
    for y, lp in zip(language.responses, seq_logp):
        for t in range(len(y) + 1):
            through.setdefault(y[:t], []).append(lp)
    through = {k: np.logaddexp.reduce(v) for k, v in through.items()}
    logits = np.full((language.num_prefixes, language.vocab_size), -np.inf)
    for i, prefix in enumerate(language.prefixes):
        for v in range(language.vocab_size):
            if prefix + (v,) in through:
                logits[i, v] = through[prefix + (v,)] - through[prefix]
    return TabularPolicy(language, logits)


def rlhf_objective(logp, ref_logp, rewards, beta):
    """J = Σ_y π(y) r(y) − β Σ_y π(y) (log π(y) − log π_ref(y)), exactly, as a Tensor.

    logp (S,) Tensor: log π of every response (e.g. policy.sequence_logprobs());
    ref_logp (S,), rewards (S,): arrays; beta >= 0. J.backward() gives the exact ∇J.
    """
    ref_logp = Tensor(np.asarray(ref_logp, dtype=np.float64), dtype=logp.dtype)
    p = logp.exp()
    return (p * np.asarray(rewards)).sum() - beta * (p * (logp - ref_logp)).sum()


def sequence_kl(logp, ref_logp):
    """KL(π ‖ π_ref) = Σ_y π(y) log(π(y)/π_ref(y)) over every response (arrays (S,) in, float out)."""
    logp, ref_logp = np.asarray(logp, dtype=np.float64), np.asarray(ref_logp, dtype=np.float64)
    return float((np.exp(logp) * (logp - ref_logp)).sum())


def optimal_policy(ref_logp, rewards, beta):
    """(log π*, log Z) with π* = π_ref exp(r/β) / Z, the maximiser of J (Rafailov et al. 2023, eq. 4)."""
    if not beta > 0:
        raise ValueError(f"beta: must be > 0, got {beta}")
    a = np.asarray(ref_logp, dtype=np.float64) + np.asarray(rewards, dtype=np.float64) / beta
    log_Z = float(np.logaddexp.reduce(a))
    return a - log_Z, log_Z


def bradley_terry_probabilities(rewards):
    """P[i, j] = P(y_i ≻ y_j) = σ(r_i − r_j) (Bradley & Terry 1952)."""
    r = np.asarray(rewards, dtype=np.float64)
    d = r[:, None] - r[None, :]
    return np.where(d >= 0, 1 / (1 + np.exp(-np.abs(d))), np.exp(-np.abs(d)) / (1 + np.exp(-np.abs(d))))


def expected_dpo_loss(logp, ref_logp, rewards, beta):
    """The population DPO loss when every unordered pair {y_i, y_j} is compared equally often and
    labelled by the Bradley-Terry model of ``rewards``:

        L = Σ_{i≠j} P(y_i ≻ y_j) · −log σ(β[log π(y_i)/π_ref(y_i) − log π(y_j)/π_ref(y_j)]) / C(S, 2)

    logp (S,) Tensor, ref_logp and rewards (S,) arrays. Its minimiser over π is π* (the
    partition function cancels in every difference).
    """
    S = logp.shape[0]
    h = logp - Tensor(np.asarray(ref_logp, dtype=np.float64), dtype=logp.dtype)
    z = beta * (h.reshape(S, 1) - h.reshape(1, S))
    P = bradley_terry_probabilities(rewards)
    off_diagonal = 1.0 - np.eye(S)
    return -(F.log_sigmoid(z) * (P * off_diagonal)).sum() / (S * (S - 1) / 2)
