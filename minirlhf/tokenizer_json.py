"""tokenizer.json: the one-file tokenizer of today's models (the Hugging Face `tokenizers` format), read
into a :class:`~minirlhf.tokenizer.BPETokenizer` that encodes exactly as `tokenizers` does.

The file describes a pipeline; each stage here is the same idea as in GPT-2 (see ``tokenizer.py``):

    added tokens   "<|im_start|>", "<|eot_id|>", ... cut out of the text first, each one id
    normalizer     none (Llama 3, SmolLM2) or NFC (Qwen2/Qwen3): "é" as one code point, never e + ◌́
    pre-tokenizer  the split into words that merges never cross, by a regex:
                     GPT-2      's|'t|...| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+
                     Llama 3    (?i:'s|'t|...)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|
                                \\s*[\\r\\n]+|\\s+(?!\\S)|\\s+
                     Qwen2      the same with \\p{N} (one digit per word)
                   and SmolLM2 first isolates each digit (Digits), then applies GPT-2's regex
    model          byte-level BPE: vocab (token → id) and merges in rank order, written as
                   "Ġ t" strings (older files) or ["Ġ", "t"] pairs (newer); with ``ignore_merges``
                   (Llama 3) a word that is itself in the vocabulary is one token without merging
    decoder        byte-level: the bytes of the tokens, joined

The regexes are Oniguruma's (the library `tokenizers` uses). The standard library's `re` has no
\\p{L}, so each \\p{…}, \\s and \\S is rewritten into an explicit character class built from
`unicodedata`, with Oniguruma's \\s (\\t \\n \\v \\f \\r, U+0085 and the separators Z*).

Added tokens marked ``special`` (<|im_end|>, <|eot_id|>) are recognised in the text only when the
caller allows them (``allowed_special``), as in ``tokenizer.py``, so user text cannot end a turn; the
other added tokens (Qwen's "<tool_call>") are always recognised, as `tokenizers` does. Nothing is
added around the ids (no BOS): the chat templates write the markers they need.

Chat templates, for plain {"role", "content"} messages, the text the models' own templates produce:

    ChatML (Qwen, SmolLM2)  <|im_start|>{role}\\n{content}<|im_end|>\\n ... <|im_start|>assistant\\n
    Llama 3                 <|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>
                            ... <|start_header_id|>assistant<|end_header_id|>\\n\\n   (content stripped)

(Qwen2.5's and SmolLM2's templates insert their own system message when there is none, and Llama 3.1's
a dated one; give the system message to get the same text.)
"""
import functools
import json
import os
import re
import sys
import unicodedata

from .tokenizer import (ENDOFTEXT, GPT2_SPLIT_PATTERN, IM_END, IM_START, BPETokenizer, _split_on,
                        _write_atomically, bytes_to_unicode)

BEGIN_OF_TEXT, EOT = "<|begin_of_text|>", "<|eot_id|>"
START_HEADER, END_HEADER = "<|start_header_id|>", "<|end_header_id|>"
_ONIGURUMA_SPACE = "\t\n\v\f\r\x85"


# ------------------------------------------------------------ Oniguruma regexes in `re`
@functools.cache
def _category_codes():
    """Every code point's general category, one character per code point, and the categories by code."""
    names = sorted({unicodedata.category(chr(cp)) for cp in range(sys.maxunicode + 1)})
    code_of = {name: chr(ord("A") + i) for i, name in enumerate(names)}
    return "".join([code_of[unicodedata.category(chr(cp))] for cp in range(sys.maxunicode + 1)]), code_of


@functools.cache
def category_ranges(category):
    r"""The code points of a general category ("L", "N", "Lu", "Z", ...) as ranges for a `re` class."""
    codes, code_of = _category_codes()
    chosen = "".join(c for name, c in code_of.items() if name.startswith(category))
    if not chosen:
        raise ValueError(f"unknown Unicode category \\p{{{category}}} in a pre-tokenizer pattern")
    return "".join(f"\\U{m.start():08x}-\\U{m.end() - 1:08x}" for m in re.finditer(f"[{chosen}]+", codes))


def _space_ranges():
    return re.escape(_ONIGURUMA_SPACE) + category_ranges("Z")


@functools.cache
def compile_oniguruma(pattern):
    r"""``pattern`` with \p{X}, \P{X}, \s and \S spelled as explicit classes, compiled by `re`."""
    out, i, in_class = [], 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            e = pattern[i + 1]
            if e in "pP" and pattern[i + 2:i + 3] == "{":
                end = pattern.index("}", i)
                ranges = category_ranges(pattern[i + 3:end])
                if in_class and e == "P":
                    raise ValueError(f"pre-tokenizer pattern {pattern!r}: \\P{{..}} inside [...] is not supported")
                out.append(ranges if in_class else f"[{'^' if e == 'P' else ''}{ranges}]")
                i = end + 1
                continue
            if e in "sS":
                if in_class and e == "S":
                    raise ValueError(f"pre-tokenizer pattern {pattern!r}: \\S inside [...] is not supported")
                out.append(_space_ranges() if in_class else f"[{'^' if e == 'S' else ''}{_space_ranges()}]")
                i += 2
                continue
            out.append(pattern[i:i + 2])
            i += 2
            continue
        if c == "[" and not in_class:
            in_class = True
            out.append(c + ("^" if pattern[i + 1:i + 2] == "^" else ""))
            i += 2 if pattern[i + 1:i + 2] == "^" else 1
            continue
        if c == "]" and in_class:
            in_class = False
        out.append(c)
        i += 1
    return re.compile("".join(out))


def _isolate(pieces, regex):
    """Split each piece at the matches of ``regex``, keeping matches and gaps (`tokenizers`' "Isolated")."""
    out = []
    for piece in pieces:
        start = 0
        for m in regex.finditer(piece):
            if m.start() == m.end():
                continue
            if m.start() > start:
                out.append(piece[start:m.start()])
            out.append(m.group())
            start = m.end()
        if start < len(piece):
            out.append(piece[start:])
    return out


# ------------------------------------------------------------ the pipeline's stages
def _pre_tokenizer_steps(spec, where):
    """The pre-tokenizer as a list of compiled regexes, applied one after the other ("Isolated")."""
    if spec is None:
        return []
    kind = spec.get("type")
    if kind == "Sequence":
        return [step for s in spec.get("pretokenizers", []) for step in _pre_tokenizer_steps(s, where)]
    if kind == "Split":
        if spec.get("behavior") != "Isolated" or spec.get("invert", False):
            raise ValueError(f"{where}: Split pre-tokenizer with behavior={spec.get('behavior')!r}, "
                             f"invert={spec.get('invert')!r}; only behavior 'Isolated' without invert is supported")
        pattern = spec.get("pattern", {})
        if "Regex" in pattern:
            return [compile_oniguruma(pattern["Regex"])]
        if "String" in pattern:
            return [re.compile(re.escape(pattern["String"]))]
        raise ValueError(f"{where}: Split pre-tokenizer without a Regex or String pattern: {pattern!r}")
    if kind == "ByteLevel":
        if spec.get("add_prefix_space", False):
            raise ValueError(f"{where}: ByteLevel pre-tokenizer with add_prefix_space=true is not supported")
        return [compile_oniguruma(GPT2_SPLIT_PATTERN)] if spec.get("use_regex", True) else []
    if kind == "Digits":
        numeric = f"[{category_ranges('N')}]"
        return [re.compile(numeric if spec.get("individual_digits", False) else numeric + "+")]
    raise ValueError(f"{where}: pre-tokenizer {kind!r} is not supported; supported: Sequence, Split, ByteLevel, Digits")


def _normalizer(spec, where):
    if spec is None or (spec.get("type") == "Sequence" and not spec.get("normalizers")):
        return None
    if spec.get("type") == "NFC":
        return "NFC"
    raise ValueError(f"{where}: normalizer {spec.get('type')!r} is not supported; supported: none, NFC")


def _bpe_model(spec, where):
    """(vocab token → id, merges as [left, right] pairs in rank order, ignore_merges) of a BPE model."""
    if spec.get("type", "BPE") != "BPE":
        raise ValueError(f"{where}: model type {spec.get('type')!r} is not supported; expected byte-level 'BPE'")
    for key in ("dropout", "byte_fallback", "continuing_subword_prefix", "end_of_word_suffix"):
        if spec.get(key):
            raise ValueError(f"{where}: BPE model with {key}={spec[key]!r} is not supported")
    vocab, merges = spec.get("vocab"), spec.get("merges")
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise ValueError(f"{where}: model.vocab must map token strings to integer ids")
    if not isinstance(merges, list):
        raise ValueError(f"{where}: model.merges must be a list")
    pairs = []
    for n, m in enumerate(merges):
        pair = m.split(" ") if isinstance(m, str) else m
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise ValueError(f"{where}: merges[{n}] must be 'left right' or [left, right], got {m!r}")
        if not all(t in vocab for t in pair) or pair[0] + pair[1] not in vocab:
            raise ValueError(f"{where}: merges[{n}] {m!r} is not a merge of two vocabulary tokens into a third")
        pairs.append(pair)
    return vocab, pairs, bool(spec.get("ignore_merges", False))


# ------------------------------------------------------------ the tokenizer
class HFTokenizer(BPETokenizer):
    """A byte-level BPE read from tokenizer.json; ``HFTokenizer.load(path)`` (a file or a model directory).

    Same interface as :class:`BPETokenizer`: ``encode(text, allowed_special=())``, ``decode(ids)``,
    ``apply_chat_template(messages)``, ``eos_id``, ``pad_id``, ``vocab_size``.
    """

    @classmethod
    def load(cls, path):
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"HFTokenizer.load: {file} not found; expected a tokenizer.json file or a "
                                    "model directory that holds one")
        with open(file, encoding="utf-8") as f:
            try:
                spec = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"HFTokenizer.load: {file} is not valid JSON ({e})") from None
        return cls.from_spec(spec, file)

    @classmethod
    def from_spec(cls, spec, where="tokenizer.json"):
        """The tokenizer described by a parsed tokenizer.json; settings it does not implement are named."""
        decoder = spec.get("decoder") or {}
        if decoder.get("type") != "ByteLevel":
            raise ValueError(f"{where}: decoder {decoder.get('type')!r} is not supported; this is a byte-level "
                             "BPE (decoder 'ByteLevel')")
        vocab, merges, ignore_merges = _bpe_model(spec.get("model") or {}, where)
        byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
        added_texts = {entry.get("content") for entry in spec.get("added_tokens") or []}
        id_to_bytes = {}
        for token, i in vocab.items():
            if token in added_texts:
                continue
            if not all(ch in byte_of for ch in token):
                raise ValueError(f"{where}: vocabulary token {token!r} (id {i}) has characters that stand for no "
                                 "byte; this is not a byte-level vocabulary")
            id_to_bytes[i] = bytes(byte_of[ch] for ch in token)
        added, special = {}, {}
        for entry in spec.get("added_tokens") or []:
            for key in ("single_word", "lstrip", "rstrip"):
                if entry.get(key, False):
                    raise ValueError(f"{where}: added token {entry.get('content')!r} has {key}=true, which is "
                                     "not supported")
            (special if entry.get("special", False) else added)[entry["content"]] = entry["id"]
            id_to_bytes[entry["id"]] = entry["content"].encode("utf-8")
        merge_ids = {}
        for left, right in merges:
            merge_ids.setdefault((vocab[left], vocab[right]), vocab[left + right])
        tokenizer = cls()
        byte_to_id = {byte_of[ch]: i for ch, i in vocab.items() if len(ch) == 1 and ch not in added_texts}
        tokenizer._set_vocab(id_to_bytes, byte_to_id,
                             merge_ids, {**added, **special})
        tokenizer.special_tokens = special
        tokenizer.added_tokens = added
        tokenizer.normalizer = _normalizer(spec.get("normalizer"), where)
        tokenizer.split_steps = _pre_tokenizer_steps(spec.get("pre_tokenizer"), where)
        tokenizer.word_ids = ({bytes(byte_of[ch] for ch in t): i for t, i in vocab.items() if t not in added_texts}
                              if ignore_merges else {})
        tokenizer.spec = spec
        return tokenizer

    # ------------------------------------------------------------ encoding
    def pretokenize(self, text):
        """The words BPE merges within: the normalised text split by each pre-tokenizer step in turn."""
        if self.normalizer:
            text = unicodedata.normalize(self.normalizer, text)
        pieces = [text] if text else []
        for regex in self.split_steps:
            pieces = _isolate(pieces, regex)
        return pieces

    def _encode_word(self, word):
        whole = self.word_ids.get(word.encode("utf-8"))
        return [whole] if whole is not None else super()._encode_word(word)

    def encode(self, text, allowed_special=()):
        """Text to ids. Added tokens are always recognised; special ones only if allowed: allowed_special
        is "all" or a set of special-token strings, otherwise "<|im_end|>" in the text is plain text."""
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
        marked = {**self.added_tokens, **{s: self.special_tokens[s] for s in allowed}}
        ids = []
        for k, chunk in enumerate(_split_on(text, list(marked))):
            if k % 2:
                ids.append(marked[chunk])
            else:
                for word in self.pretokenize(chunk):
                    ids.extend(self._encode_word(word))
        return ids

    # ------------------------------------------------------------ chat
    @property
    def chat_format(self):
        """"llama3" or "chatml", from the markers the vocabulary has; None if it has neither."""
        if START_HEADER in self.special_tokens and END_HEADER in self.special_tokens and EOT in self.special_tokens:
            return "llama3"
        if IM_START in self.special_tokens and IM_END in self.special_tokens:
            return "chatml"
        return None

    def _chat_segments(self, messages, add_generation_prompt):
        """The template as (text, is_special) pieces: markers special, role and content plain text."""
        from .tokenizer import _chat_segments
        if self.chat_format == "chatml":
            return _chat_segments(messages, add_generation_prompt)
        if self.chat_format is None:
            raise ValueError("this tokenizer has neither ChatML's <|im_start|>/<|im_end|> nor Llama 3's "
                             "<|start_header_id|>/<|end_header_id|>/<|eot_id|> special tokens: no chat template")
        _chat_segments(messages, False)  # checks the messages; Llama 3 lays them out differently
        segments = [(BEGIN_OF_TEXT, True)] if BEGIN_OF_TEXT in self.special_tokens else []
        for message in messages:
            segments += [(START_HEADER, True), (message["role"], False), (END_HEADER, True),
                         ("\n\n" + message["content"].strip(), False), (EOT, True)]
        if add_generation_prompt:
            segments += [(START_HEADER, True), ("assistant", False), (END_HEADER, True), ("\n\n", False)]
        return segments

    def render_chat(self, messages, add_generation_prompt=True):
        """The chat as text, as the model's own template writes it (see the module docstring)."""
        return "".join(text for text, _ in self._chat_segments(messages, add_generation_prompt))

    def apply_chat_template(self, messages, add_generation_prompt=True):
        """The ids of render_chat(messages): markers as special tokens, content as plain text, so a message
        containing "<|eot_id|>" cannot end its turn early."""
        ids = []
        for text, is_special in self._chat_segments(messages, add_generation_prompt):
            ids += [self.special_tokens[text]] if is_special else self.encode(text)
        return ids

    @property
    def eos_id(self):
        """The id that ends an assistant turn: <|im_end|> (ChatML) or <|eot_id|> (Llama 3), else <|endoftext|>."""
        for token in (IM_END, EOT, ENDOFTEXT, "<|end_of_text|>"):
            if token in self.special_tokens:
                return self.special_tokens[token]
        return None

    @property
    def pad_id(self):
        """The id used for padding: <|endoftext|> (Qwen), <|finetune_right_pad_id|> (Llama 3.1), else eos_id."""
        for token in (ENDOFTEXT, "<|finetune_right_pad_id|>"):
            if token in self.special_tokens:
                return self.special_tokens[token]
        return self.eos_id

    def save(self, directory):
        """Write directory/tokenizer.json (the file this tokenizer was read from, unchanged), atomically."""
        os.makedirs(directory, exist_ok=True)
        _write_atomically(os.path.join(directory, "tokenizer.json"), json.dumps(self.spec, ensure_ascii=False))

