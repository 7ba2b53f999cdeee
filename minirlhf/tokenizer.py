"""Byte-level byte-pair encoding (BPE), as in GPT-2, with special tokens and a ChatML chat template.

BPE (Sennrich et al. 2016, after Gage 1994) builds a vocabulary bottom-up. Start from the 256 byte
values, so every string has an encoding; then repeatedly find the most frequent pair of adjacent
tokens in the training text and *merge* it into one new token, until the vocabulary has the size
asked for. The ordered list of merges is the tokenizer: to encode a string, apply the merges in the
order they were learned (lowest rank first) until none applies; to decode, concatenate the bytes of
the tokens.

GPT-2 (Radford et al. 2019) adds two things, both kept here so that files written by GPT-2 or by
Hugging Face `tokenizers` load and encode identically:

1. *Pre-tokenisation.* The text is first split by a regex into words, and merges never cross a word
   boundary, so " dog", " dog." and " dog!" share the token " dog" instead of learning "g." and
   "g!". The split is `'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+`
   (`GPT2_SPLIT_PATTERN`): contractions, letters, numbers, other symbols, each with at most one
   leading space, and runs of whitespace, whose last space stays for the next word.
2. *Printable bytes.* In `vocab.json` and `merges.txt` a token is written as a string of printable
   characters, one per byte (`bytes_to_unicode`): the printable bytes stand for themselves and the
   others (space, newline, ...) are moved to U+0100 and up, so space is written "Ġ".

Ids. A trained tokenizer numbers the 256 bytes in the order of their printable characters (GPT-2's
`encoder.json` order: "!" is 0), then the merges from 256 in the order learned, then the special
tokens last (GPT-2's `<|endoftext|>` is its last id, 50256). A loaded tokenizer keeps the file's ids.

Training counts the pre-tokenised words once, with their frequencies, and keeps for every adjacent
pair its count and the set of words containing it. A merge then only revisits the words that contain
the pair, updating the counts as it goes, instead of recounting the whole text; a heap, checked
lazily, finds the most frequent pair, ties going to the pair of smaller ids, as in `tokenizers`.

Special tokens (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`) have their own ids and are never
produced by the merges. Text that only *looks* like one is encoded as ordinary text unless the caller
allows it with `allowed_special`, so a user cannot inject "<|im_end|>" into a prompt.
"""

import functools
import heapq
import json
import numbers
import os
import re
import sys
import tempfile
import unicodedata

GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
CHAT_ROLES = ("system", "user", "assistant")
_CACHE_SIZE = 100_000  # encoded words kept per tokenizer; plenty for one language, bounded for all


@functools.cache
def bytes_to_unicode():
    """GPT-2's map from each byte (0..255) to a printable character that stands for it in files.

    The 188 printable bytes ("!".."~", "¡".."¬", "®".."ÿ") map to themselves; the other 68 (control
    characters, space, no-break space, soft hyphen) map, in byte order, to chr(256), chr(257), ...
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + n) for n, b in enumerate(moved)})
    return dict(sorted(table.items()))


@functools.cache
def _split_regex():
    r"""GPT2_SPLIT_PATTERN in the standard library's `re`, which has no \p{L} or \p{N}.

    The classes are built from `unicodedata`: \p{L} is every code point of category L*, \p{N} of
    category N*, and \s is what `tokenizers` (Oniguruma) means by it: \t \n \v \f \r, U+0085 and the
    separators Z* (Python's own \s differs: it also matches U+001C..U+001F). This matches `tokenizers`
    exactly for every character the interpreter's Unicode database knows; characters assigned in a
    newer Unicode version (Python 3.11 knows 14.0) count as symbols here. Built on first use
    (~0.1 s) so that importing stays fast.
    """
    major = "".join([unicodedata.category(chr(cp))[0] for cp in range(sys.maxunicode + 1)])

    def char_class(category):
        return "".join(f"\\U{m.start():08x}-\\U{m.end() - 1:08x}" for m in re.finditer(category + "+", major))

    L, N, S = char_class("L"), char_class("N"), r"\t\n\v\f\r\x85" + char_class("Z")
    return re.compile(rf"""'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+|[{S}]+(?![^{S}])|[{S}]+""")


def pretokenize(text):
    """Split text into the words that BPE merges within (GPT-2's pattern); "".join(words) == text."""
    return _split_regex().findall(text)


def merge(ids, pair, new_id):
    """Replace every occurrence of `pair` in `ids`, left to right and not overlapping, by `new_id`."""
    out, i, n = [], 0, len(ids)
    while i < n:
        if i + 1 < n and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _chat_segments(messages, add_generation_prompt):
    """ChatML as (text, is_special) pieces: the template's markers are special, the content is not."""
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    segments = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise TypeError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
        for key in ("role", "content"):
            if key not in message:
                raise ValueError(f"messages[{i}] has no {key!r} key; each message needs 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in CHAT_ROLES:
            raise ValueError(f"messages[{i}] has role {role!r}; expected one of {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise TypeError(f"messages[{i}]['content'] must be a str, got {type(content).__name__}")
        segments += [(IM_START, True), (f"{role}\n{content}", False), (IM_END, True), ("\n", False)]
    if add_generation_prompt:
        segments += [(IM_START, True), ("assistant\n", False)]
    return segments


def render_chat(messages, add_generation_prompt=True):
    """Qwen's ChatML: "<|im_start|>{role}\\n{content}<|im_end|>\\n" per message, then, to ask the
    model for the next turn, "<|im_start|>assistant\\n". Messages are {"role", "content"} dicts with
    role system, user or assistant."""
    return "".join(text for text, _ in _chat_segments(messages, add_generation_prompt))


class BPETokenizer:
    """Byte-level BPE. `BPETokenizer()` is the 256 bytes alone; `train` or `load` gives it merges.

    State: `merges` maps a pair of ids to the id it merges into, in rank order (first learned, first
    applied); `special_tokens` maps each special token's text to its id; every id has its bytes.
    """

    def __init__(self):
        self._set_vocab(*_byte_vocab(), merges={}, special_tokens={})

    def _set_vocab(self, id_to_bytes, byte_to_id, merges, special_tokens):
        self._id_to_bytes = id_to_bytes              # id -> bytes, special tokens included
        self._byte_to_id = [byte_to_id.get(b) for b in range(256)]
        self.merges = merges                         # (id, id) -> merged id, in rank order
        self._rank = {pair: rank for rank, pair in enumerate(merges)}
        self.special_tokens = special_tokens         # text -> id
        self._cache = {}                             # word -> its ids
        table = bytes_to_unicode()                   # as vocab.json writes them; special tokens verbatim
        self._id_to_token = {i: id_to_bytes[i].decode("utf-8") if i in special_tokens.values()
                             else "".join(table[b] for b in id_to_bytes[i]) for i in sorted(id_to_bytes)}
        self._token_to_id = {token: i for i, token in self._id_to_token.items()}

    # ----------------------------------------------------------------------------- training

    def train(self, text, vocab_size, special_tokens=SPECIAL_TOKENS):
        """Learn vocab_size - 256 - len(special_tokens) merges from text; returns self.

        Each step merges the most frequent adjacent pair (ties: smaller ids first), counting within
        pre-tokenised words and never across a special token. Stops early if no pair is left. As in
        `tokenizers`, a merge whose bytes already have an id (two ways to build the same string)
        reuses it, so it is added to `merges` without growing the vocabulary.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        special_tokens = list(special_tokens)
        if len(set(special_tokens)) != len(special_tokens) or not all(isinstance(s, str) and s for s in special_tokens):
            raise ValueError(f"special_tokens must be distinct non-empty strings, got {special_tokens!r}")
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral):
            raise TypeError(f"vocab_size must be an integer, got {vocab_size!r} ({type(vocab_size).__name__})")
        if vocab_size < 256 + len(special_tokens):
            raise ValueError(f"vocab_size must be at least 256 + {len(special_tokens)} special tokens "
                             f"= {256 + len(special_tokens)}, got vocab_size={vocab_size}")
        id_to_bytes, byte_to_id = _byte_vocab()
        bytes_to_id = {b: i for i, b in id_to_bytes.items()}

        word_counts = {}
        for chunk in _split_on(text, special_tokens)[::2]:
            for word in pretokenize(chunk):
                word_counts[word] = word_counts.get(word, 0) + 1
        words = [[byte_to_id[b] for b in word.encode("utf-8")] for word in word_counts]
        counts = list(word_counts.values())

        pair_counts, words_with = {}, {}  # pair -> its count in the text; pair -> indices of words holding it
        for w, ids in enumerate(words):
            for pair in zip(ids, ids[1:]):
                pair_counts[pair] = pair_counts.get(pair, 0) + counts[w]
                words_with.setdefault(pair, set()).add(w)
        heap = [(-count, pair) for pair, count in pair_counts.items()]
        heapq.heapify(heap)

        merges = {}
        while len(id_to_bytes) < vocab_size - len(special_tokens) and heap:
            negcount, pair = heapq.heappop(heap)
            count = pair_counts.get(pair, 0)
            if -negcount != count:  # stale entry: the count has changed since it was pushed
                if count > 0:
                    heapq.heappush(heap, (-count, pair))
                continue
            new_bytes = id_to_bytes[pair[0]] + id_to_bytes[pair[1]]
            new_id = bytes_to_id.setdefault(new_bytes, len(id_to_bytes))
            id_to_bytes[new_id] = new_bytes
            merges[pair] = new_id

            changed = set()  # pairs with new_id: new, or grown, so the heap needs their counts
            for w in words_with.pop(pair):
                old = words[w]
                new = merge(old, pair, new_id)
                if len(new) == len(old):  # an earlier merge already took this pair out of the word
                    continue
                for p in zip(old, old[1:]):
                    pair_counts[p] -= counts[w]
                for p in zip(new, new[1:]):
                    pair_counts[p] = pair_counts.get(p, 0) + counts[w]
                    if new_id in p:
                        words_with.setdefault(p, set()).add(w)
                        changed.add(p)
                words[w] = new
            for p in changed:
                heapq.heappush(heap, (-pair_counts[p], p))

        n = len(id_to_bytes)
        special = {s: n + k for k, s in enumerate(special_tokens)}
        id_to_bytes.update({i: s.encode("utf-8") for s, i in special.items()})
        self._set_vocab(id_to_bytes, byte_to_id, merges, special)
        return self

    # ----------------------------------------------------------------------------- encoding

    def _encode_word(self, word):
        """BPE on one pre-tokenised word: apply the lowest-ranked merge present until none is."""
        ids = self._cache.get(word)
        if ids is not None:
            return ids
        ids = [self._byte_to_id[b] for b in word.encode("utf-8")]
        if None in ids:
            raise ValueError(f"cannot encode {word!r}: the vocabulary has no token for one of its bytes")
        while len(ids) >= 2:
            pair = min(zip(ids, ids[1:]), key=lambda p: self._rank.get(p, float("inf")))
            if pair not in self._rank:
                break
            ids = merge(ids, pair, self.merges[pair])
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.clear()
        self._cache[word] = ids
        return ids

    def encode(self, text, allowed_special=()):
        """Text to ids. Special tokens are recognised only if allowed: allowed_special is "all" or a
        set of special-token strings; otherwise "<|im_end|>" in the text is encoded as plain text."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if allowed_special == "all":
            allowed = list(self.special_tokens)
        elif isinstance(allowed_special, str):
            raise ValueError(f"allowed_special must be 'all' or a set of special tokens, got {allowed_special!r}")
        else:
            allowed = list(allowed_special)
            unknown = [s for s in allowed if s not in self.special_tokens]
            if unknown:
                raise ValueError(f"allowed_special has tokens that are not special tokens of this tokenizer: "
                                 f"{unknown}; special tokens are {list(self.special_tokens)}")
        ids = []
        for k, chunk in enumerate(_split_on(text, allowed)):
            if k % 2:
                ids.append(self.special_tokens[chunk])
            else:
                for word in pretokenize(chunk):
                    ids.extend(self._encode_word(word))
        return ids

    def decode(self, ids):
        """Ids to text. Bytes that are not valid UTF-8 (e.g. half a character) become U+FFFD."""
        parts = []
        for i in ids:
            part = self._id_to_bytes.get(i)
            if part is None:
                raise ValueError(f"id {i!r} is not in the vocabulary (ids are 0..{self.vocab_size - 1})")
            parts.append(part)
        return b"".join(parts).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt=True):
        """The ids of render_chat(messages): the markers as special tokens, the content as plain text,
        so a message containing "<|im_end|>" cannot end its turn early."""
        for marker in (IM_START, IM_END):
            if marker not in self.special_tokens:
                raise ValueError(f"the chat template needs the special token {marker!r}, which this tokenizer "
                                 f"lacks; train with special_tokens including {IM_START!r} and {IM_END!r}")
        ids = []
        for text, is_special in _chat_segments(messages, add_generation_prompt):
            ids += [self.special_tokens[text]] if is_special else self.encode(text)
        return ids

    # ----------------------------------------------------------------------------- vocabulary

    @property
    def id_to_token(self):
        """id -> token text as in vocab.json: bytes as printable characters ("Ġthe"), specials verbatim."""
        return self._id_to_token

    @property
    def token_to_id(self):
        return self._token_to_id

    @property
    def vocab_size(self):
        return len(self._id_to_bytes)

    @property
    def eos_id(self):
        """The id that ends a turn: <|im_end|> for chat, else <|endoftext|>; None if neither exists."""
        return self.special_tokens.get(IM_END, self.special_tokens.get(ENDOFTEXT))

    @property
    def pad_id(self):
        """The id used for padding: <|endoftext|> (as Qwen does), else eos_id; None if neither exists."""
        return self.special_tokens.get(ENDOFTEXT, self.eos_id)

    # ----------------------------------------------------------------------------- files

    def save(self, directory):
        """Write directory/vocab.json ({token: id}) and directory/merges.txt ("#version: 0.2", then one
        "left right" merge per line, in rank order): the GPT-2 / Hugging Face format. Each file is
        written to a temporary file first and renamed, so a crash never leaves half a file."""
        os.makedirs(directory, exist_ok=True)
        vocab = json.dumps(self.token_to_id, ensure_ascii=False)
        lines = [f"{self._id_to_token[a]} {self._id_to_token[b]}" for a, b in self.merges]
        _write_atomically(os.path.join(directory, "vocab.json"), vocab)
        _write_atomically(os.path.join(directory, "merges.txt"), "\n".join(["#version: 0.2", *lines]) + "\n")

    @classmethod
    def load(cls, directory):
        """Read vocab.json and merges.txt from directory (written by `save`, GPT-2 or Hugging Face
        `tokenizers`). A vocabulary entry that is neither one byte nor the result of a merge is a
        special token (e.g. "<|endoftext|>"): it keeps its text and is never split. A vocabulary
        trained without all 256 bytes loads, but encoding a byte it lacks is an error (where
        `tokenizers` would silently drop it)."""
        vocab_path, merges_path = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
        vocab = _read_vocab(vocab_path)
        merge_lines = _read_text(merges_path).splitlines()

        merges_by_token = []
        for n, line in enumerate(merge_lines, start=1):
            if (n == 1 and line.startswith("#version")) or not line.strip():
                continue
            parts = line.split(" ")
            if len(parts) != 2 or not all(p in vocab for p in parts) or "".join(parts) not in vocab:
                raise ValueError(f"{merges_path} line {n} is not a merge of two tokens in vocab.json "
                                 f"into a third: {line!r}")
            merges_by_token.append(parts)

        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        merged = {a + b for a, b in merges_by_token}
        id_to_bytes, special = {}, {}
        for token, i in vocab.items():
            if token in byte_of or token in merged:
                if not all(c in byte_of for c in token):
                    raise ValueError(f"{vocab_path} is not a byte-level vocabulary: token {token!r} "
                                     f"has characters that stand for no byte")
                id_to_bytes[i] = bytes(byte_of[c] for c in token)
            else:
                special[token] = i
                id_to_bytes[i] = token.encode("utf-8")
        tokenizer = cls()
        tokenizer._set_vocab(
            id_to_bytes,
            {byte_of[c]: i for c, i in vocab.items() if c in byte_of},
            {(vocab[a], vocab[b]): vocab[a + b] for a, b in merges_by_token},
            special,
        )
        return tokenizer


def _read_text(path):
    """The file as text, with errors that name it (a UTF-8 error in merges.txt is merges.txt's)."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"tokenizer file {path} not found; a saved tokenizer is a directory with "
                                "vocab.json and merges.txt") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not a valid tokenizer file: not UTF-8 text ({e})") from None


def _read_vocab(path):
    """vocab.json as {token: id}, its ids exactly 0..N−1, each once."""
    try:
        vocab = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not a valid tokenizer file: {e}") from None
    if not isinstance(vocab, dict) or not all(isinstance(i, int) and not isinstance(i, bool) for i in vocab.values()):
        raise ValueError(f"{path} is not a valid tokenizer file: expected a JSON object of token -> int id")
    tokens_of = {}
    for token, i in vocab.items():
        tokens_of.setdefault(i, []).append(token)
    shared = {i: t for i, t in tokens_of.items() if len(t) > 1}
    if shared:
        i, tokens = min(shared.items())
        raise ValueError(f"{path}: tokens {tokens!r} share the id {i}; each id must name one token")
    negative = sorted(i for i in tokens_of if i < 0)
    if negative:
        raise ValueError(f"{path}: token {tokens_of[negative[0]][0]!r} has the negative id {negative[0]}; "
                         f"ids must be 0..{len(vocab) - 1}")
    missing = sorted(set(range(len(vocab))) - set(tokens_of))
    if missing:
        raise ValueError(f"{path}: the ids of its {len(vocab)} tokens have gaps (no token has id {missing[0]}, "
                         f"the largest is {max(tokens_of)}); ids must be 0..{len(vocab) - 1}")
    return vocab


def _byte_vocab():
    """The 256 one-byte tokens as (id -> bytes, byte -> id), ids in GPT-2's order ("!" is id 0)."""
    table = bytes_to_unicode()
    byte_to_id = {b: i for i, b in enumerate(sorted(table, key=table.get))}
    return {i: bytes([b]) for b, i in byte_to_id.items()}, byte_to_id


def _split_on(text, special_tokens):
    """Split text around special tokens: [text, special, text, special, ..., text]."""
    if not special_tokens:
        return [text]
    alternatives = "|".join(re.escape(s) for s in sorted(special_tokens, key=len, reverse=True))
    return re.split(f"({alternatives})", text)


def _write_atomically(path, content):
    """Write to a temporary file in the same directory, then rename over path (atomic on POSIX)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=os.path.basename(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(content)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
