"""OpenAI's CLIP byte-level BPE tokenizer, with ids identical to OpenAI's (and open_clip's).

Pipeline for one text (the facts of OpenAI's tokenizer):
  ftfy.fix_text -> html.unescape twice -> strip -> collapse whitespace (str.split) -> lower()
  -> split with OpenAI's regex -> UTF-8 bytes mapped to printable unicode -> BPE with `</w>` word end
  -> ids; a batch row is [SOT] ids [EOT], truncated to the context with EOT kept last, zero padded.

Why it is fast:
- ftfy and html.unescape provably leave printable ASCII without '&' unchanged (no mojibake, entities,
  control characters, curly quotes, ligatures or wide forms are possible), so such text skips them.
- No regex match crosses a space, so each space-separated chunk of the cleaned text is tokenized on its
  own and its ids are cached: a warm caption costs a few dict look-ups.
- A batch is written into the output tensor with one masked assignment instead of a copy per row.
"""

from __future__ import annotations

import gzip
import html
import importlib.resources
import operator
from collections.abc import Iterable, Sequence
from functools import lru_cache
from itertools import chain, pairwise
from typing import Any

import ftfy
import numpy as np
import regex
import torch

TOKENIZER_TYPE = "openai-bpe"
DEFAULT_CONTEXT_LENGTH = 77
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"  # OpenAI's BPE merges, shipped in the package's assets/
_VOCAB_RESOURCE = f"assets/{VOCAB_FILE}"
_NUM_MERGES = 49152 - 256 - 2  # merge lines used after the header line
_SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")
_WORD_END = "</w>"
_CACHE_SIZE = 100_000  # entries per cache; a caption corpus has ~10k distinct words

_SPLIT_PATTERN = regex.compile(
    r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)


def _byte_to_unicode() -> dict[int, str]:
    """Printable stand-in character for each byte 0..255 (OpenAI's reversible byte mapping).

    Bytes that are already printable Latin-1 (except the soft hyphen and space-like ones) keep their
    own code point; the other 68 bytes get code points 256, 257, ... in byte order. The dict's order
    (kept bytes first, then the others) is the order of the first 256 vocabulary ids.
    """
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in kept}
    others = [byte for byte in range(256) if byte not in mapping]
    mapping.update({byte: chr(256 + n) for n, byte in enumerate(others)})
    return mapping


def vocab_bytes() -> bytes:
    """The gzipped BPE merges file the tokenizer reads (for exports that ship it beside a model)."""
    return importlib.resources.files("clipforge").joinpath(_VOCAB_RESOURCE).read_bytes()


class _Vocabulary:
    """The token strings, their ids and the merge ranks, read once from the packaged merges file."""

    def __init__(self) -> None:
        lines = gzip.decompress(vocab_bytes()).decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
        if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"{_VOCAB_RESOURCE} is not OpenAI's BPE merges file (bad merge lines)")

        byte_map = _byte_to_unicode()
        byte_chars = list(byte_map.values())
        # id order: 256 byte symbols, the same with the word end, one token per merge, then specials.
        tokens = byte_chars + [c + _WORD_END for c in byte_chars] + [a + b for a, b in merges]
        tokens += _SPECIAL_TOKENS
        self.token_to_id: dict[str, int] = {tok: i for i, tok in enumerate(tokens)}
        self.id_to_token: list[str] = tokens
        self.merge_rank: dict[tuple[str, str], int] = {pair: rank for rank, pair in enumerate(merges)}
        # str.translate tables between Latin-1-decoded UTF-8 bytes and the byte stand-ins.
        self.bytes_to_chars = byte_map
        self.chars_to_bytes = {char: byte for byte, char in byte_map.items()}


@lru_cache(maxsize=1)
def _vocabulary() -> _Vocabulary:
    return _Vocabulary()


def _clean(text: str) -> list[str]:
    """OpenAI's text normalisation, returned as the space-separated chunks of the cleaned text."""
    if text.isascii() and text.isprintable() and "&" not in text:
        return text.lower().split()  # ftfy and html.unescape are identities here; see module docstring
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower().split()


def _check_context_length(context_length: Any) -> int:
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
        raise ValueError(f"context_length must be an int >= 2 (room for SOT and EOT), got {context_length!r}")
    return context_length


def _as_text(item: Any, where: str) -> str:
    """A str from a str or UTF-8 bytes; a clear error naming `where` otherwise."""
    if isinstance(item, str):
        return item
    if isinstance(item, (bytes, bytearray)):
        try:
            return bytes(item).decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{where}: bytes are not valid UTF-8 ({err.reason} at byte {err.start}); "
                             "decode them to str with the right encoding first") from None
    kind = "None" if item is None else f"a {type(item).__name__}"
    raise TypeError(f"{where} is {kind}; expected a str")


def _as_token_id(item: Any) -> int | None:
    """`item` as a Python int if it is an integer (of any integer type, bool excluded), else None."""
    if isinstance(item, bool):
        return None
    try:
        return operator.index(item)
    except TypeError:
        return None


class Tokenizer:
    """OpenAI's CLIP tokenizer: `tokenizer(texts)` gives a zero-padded [N, context_length] LongTensor.

    Ids are identical to OpenAI's: row = [SOT, bpe ids..., EOT], truncated to the context with EOT kept
    last. Literal "<start_of_text>"/"<end_of_text>" in a text become the special ids, as in OpenAI's.
    The empty string is legal and gives [SOT, EOT]. Texts may be str or UTF-8 bytes.
    """

    def __init__(self, context_length: int = DEFAULT_CONTEXT_LENGTH, *, cache_size: int = _CACHE_SIZE) -> None:
        self._context_length = _check_context_length(context_length)
        self._vocab = _vocabulary()
        self._special_ids = {tok: self._vocab.token_to_id[tok] for tok in _SPECIAL_TOKENS}
        # chunk of cleaned text -> its ids, and byte-mapped regex piece -> its ids; both bounded.
        self._cache_size = max(0, int(cache_size))
        self._chunk_cache: dict[str, list[int]] = {}
        self._piece_cache: dict[str, list[int]] = {}

    # -- pickling -----------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        # The vocabulary (~2 MB pickled) is shared package data and the caches refill on their own: a
        # DataLoader worker gets only the settings and rebuilds the rest from the packaged merges file.
        return {"context_length": self._context_length, "cache_size": self._cache_size}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["context_length"], cache_size=state["cache_size"])

    # -- properties ---------------------------------------------------------------------------------
    @property
    def sot_token_id(self) -> int:
        return self._special_ids["<start_of_text>"]

    @property
    def eot_token_id(self) -> int:
        return self._special_ids["<end_of_text>"]

    @property
    def vocab_size(self) -> int:
        return len(self._vocab.id_to_token)

    @property
    def context_length(self) -> int:
        return self._context_length

    # -- config -------------------------------------------------------------------------------------
    def to_config(self) -> dict[str, Any]:
        """The settings a saved model's config.json needs to rebuild this tokenizer."""
        return {"type": TOKENIZER_TYPE, "context_length": self._context_length}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Tokenizer:
        """Inverse of `to_config`; rejects other tokenizer types and unknown keys."""
        if not isinstance(config, dict):
            raise TypeError(f"tokenizer config must be a dict, got {type(config).__name__}")
        if config.get("type") != TOKENIZER_TYPE:
            raise ValueError(f"tokenizer config type must be {TOKENIZER_TYPE!r}, got {config.get('type')!r}")
        unknown = set(config) - {"type", "context_length"}
        if unknown:
            raise ValueError(f"tokenizer config has unknown keys {sorted(unknown)}; allowed: type, context_length")
        return cls(context_length=config.get("context_length", DEFAULT_CONTEXT_LENGTH))

    # -- encoding -----------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """BPE ids of one text, without SOT/EOT and without truncation."""
        return self._encode(_as_text(text, "text"), "text")

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.LongTensor:
        """Token ids of `texts` as a zero-padded [N, context_length] int64 tensor (N = 1 for one str)."""
        context = self._context_length if context_length is None else _check_context_length(context_length)
        rows = [self._row(text, f"texts[{i}]", context) for i, text in enumerate(self._as_batch(texts))]
        return self._pad(rows, context)

    def _row(self, text: Any, where: str, context: int) -> list[int]:
        ids = self._encode(_as_text(text, where), where)
        if len(ids) > context - 2:
            ids = ids[: context - 2]  # truncation keeps room for EOT, which always ends the row
        return [self.sot_token_id, *ids, self.eot_token_id]

    @staticmethod
    def _as_batch(texts: Any) -> Sequence[Any]:
        if isinstance(texts, (str, bytes, bytearray)):
            return [texts]
        if texts is None:
            raise TypeError("texts is None; expected a str or a sequence of str")
        if not isinstance(texts, Iterable):
            raise TypeError(f"texts is a {type(texts).__name__}; expected a str or a sequence of str")
        return texts if isinstance(texts, Sequence) else list(texts)

    @staticmethod
    def _pad(rows: list[list[int]], context: int) -> torch.LongTensor:
        # All ids go into the flat zero buffer with one NumPy scatter: slot (row i, column j) is i * context + j.
        # NumPy rather than torch: for these small arrays torch's per-op overhead dominated the whole batch.
        result = np.zeros(len(rows) * context, dtype=np.int64)
        if rows:
            lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
            total = int(lengths.sum())
            ends = np.cumsum(lengths)
            column = np.arange(total) - np.repeat(ends - lengths, lengths)
            result[np.repeat(np.arange(len(rows)) * context, lengths) + column] = np.fromiter(
                chain.from_iterable(rows), dtype=np.int64, count=total)
        return torch.from_numpy(result.reshape(len(rows), context))

    def _encode(self, text: str, where: str) -> list[int]:
        cache = self._chunk_cache
        ids: list[int] = []
        try:
            for chunk in _clean(text):
                chunk_ids = cache.get(chunk)
                if chunk_ids is None:
                    chunk_ids = self._encode_chunk(chunk)
                    if len(cache) >= self._cache_size:
                        cache.clear()  # bounded memory; a refill is cheap compared with unbounded growth
                    if self._cache_size:
                        cache[chunk] = chunk_ids
                ids += chunk_ids
        except UnicodeEncodeError as err:  # only lone surrogates that ftfy could not repair get here
            raise ValueError(f"{where}: text holds characters that cannot be UTF-8 encoded ({err.reason} at "
                             f"position {err.start})") from None
        return ids

    def _encode_chunk(self, chunk: str) -> list[int]:
        """Ids of one space-free chunk of cleaned text (OpenAI's regex pieces, each BPE-encoded)."""
        ids: list[int] = []
        for piece in _SPLIT_PATTERN.findall(chunk):
            special = self._special_ids.get(piece)
            if special is not None:
                ids.append(special)
                continue
            mapped = piece.encode("utf-8").decode("latin-1").translate(self._vocab.bytes_to_chars)
            piece_ids = self._piece_cache.get(mapped)
            if piece_ids is None:
                token_to_id = self._vocab.token_to_id
                piece_ids = [token_to_id[symbol] for symbol in self._bpe(mapped)]
                if len(self._piece_cache) >= self._cache_size:
                    self._piece_cache.clear()
                if self._cache_size:
                    self._piece_cache[mapped] = piece_ids
            ids += piece_ids
        return ids

    def _bpe(self, word: str) -> list[str]:
        """Apply the merges to one word: repeatedly join every occurrence of its best-ranked pair."""
        symbols = [*word[:-1], word[-1] + _WORD_END]
        ranks = self._vocab.merge_rank
        while len(symbols) > 1:
            best_rank, best_pair = None, None
            for pair in pairwise(symbols):
                rank = ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best_pair = rank, pair
            if best_pair is None:
                break
            first, second = best_pair
            merged: list[str] = []
            i, n = 0, len(symbols)
            while i < n:
                if i + 1 < n and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)  # left to right, so overlapping pairs merge once
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    # -- decoding -----------------------------------------------------------------------------------
    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of token ids; word ends become spaces (the last one is dropped).

        With `skip_special_tokens`, SOT is dropped and decoding stops at the first EOT, so a padded
        tokenizer row decodes to its text. Invalid UTF-8 from partial byte tokens becomes U+FFFD.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode takes a 1-D sequence of ids, got a tensor of shape {list(ids.shape)}")
            ids = ids.tolist()
        tokens = []
        for position, item in enumerate(ids):
            token_id = _as_token_id(item)  # also takes NumPy integers, e.g. from a row of an int64 array
            if token_id is None or not 0 <= token_id < self.vocab_size:
                raise ValueError(f"ids[{position}] = {item!r} is not a token id in [0, {self.vocab_size})")
            if skip_special_tokens and token_id == self.eot_token_id:
                break
            if skip_special_tokens and token_id == self.sot_token_id:
                continue
            tokens.append(self._vocab.id_to_token[token_id])
        # Special tokens are plain ASCII, so they survive the byte mapping unchanged.
        raw = bytes(map(self._vocab.chars_to_bytes.__getitem__, "".join(tokens)))
        text = raw.decode("utf-8", errors="replace").replace(_WORD_END, " ")
        return text.removesuffix(" ")


@lru_cache(maxsize=1)
def _default_tokenizer() -> Tokenizer:
    return Tokenizer()


def tokenize(texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH) -> torch.LongTensor:
    """Token ids of `texts` as a zero-padded [N, context_length] LongTensor, with a shared tokenizer."""
    return _default_tokenizer()(texts, context_length=context_length)
