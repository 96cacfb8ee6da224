"""Tokenizer: id parity with OpenAI's tokenizer (open_clip's copy) on the packaged cases, batch API, errors,
config round trip, the ASCII fast path against the full ftfy path, and bounded caches."""

from __future__ import annotations

import html
import json
import pickle
import random
import re
import string
from pathlib import Path

import ftfy
import numpy as np
import pytest
import torch

import clipforge
from clipforge import tokenizer as tokenizer_module
from clipforge.tokenizer import Tokenizer, tokenize

CASES_FILE = Path(__file__).parent / "data" / "tokenizer_cases.json"
SOT, EOT = 49406, 49407

# Strings where the fast path and the full normalisation could plausibly disagree.
TRICKY = [
    "", " ", "\t", "\n\n", "  leading and trailing  ", "tab\tseparated\twords", "line\nbreak\r\nwindows",
    "&amp;", "a &amp; b", "&amp;amp;", "AT&T", "&lt;b&gt;bold&lt;/b&gt;", "&#39;quoted&#39;", "&notanentity;",
    "fish & chips", "\u201ccurly\u201d \u2018quotes\u2019", "don\u2019t", "caf\u00e9", "na\u00efve r\u00e9sum\u00e9",
    "\ufb01ne \ufb02ow", "\uff26\uff55\uff4c\uff4c width", "Ã©tÃ© mojibake", "\x1b[31mred\x1b[0m", "nul\x00byte",
    "12345", "3.14159", "1,000,000 dollars", "route 66", "v2.0-beta", "don't", "it's", "they're", "we've",
    "I'm", "you'll", "he'd", "DON'T IT'S THEY'RE", "rock 'n' roll", "o'clock", "<start_of_text>",
    "<END_OF_TEXT> shouting", "a<end_of_text>b", "a" * 300, "supercalifragilisticexpialidocious" * 8,
    "x" + "-" * 200, "MiXeD CaSe WoRdS", "e-mail@example.com", "https://example.com/a?b=c&d=e", "#hashtag",
    "!!!???...", "emoji \U0001f600\U0001f436", "\u4e2d\u6587\u5b57", "\ud55c\uad6d\uc5b4",
    "\u0627\u0644\u0639\u0631\u0628\u064a\u0629",
    "a photo of a cat.", "A black dog is running through the grass .",
]


def _cases() -> list[dict]:
    return json.loads(CASES_FILE.read_text(encoding="utf-8"))["cases"]


@pytest.fixture(scope="module")
def cases() -> list[dict]:
    return _cases()


def _expected_row(ids: list[int], context: int) -> list[int]:
    """OpenAI's row for a context: truncated with EOT kept last, zero padded."""
    if len(ids) > context:
        ids = [*ids[: context - 1], EOT]
    return ids + [0] * (context - len(ids))


def _reference_clean(text: str) -> list[str]:
    """OpenAI's normalisation with no shortcut: ftfy, html.unescape twice, whitespace collapse, lower."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip().lower().split(" ")


# ------------------------------------------------------------------------------------------------- parity


def test_cases_file_is_the_full_reference_set(cases):
    assert len(cases) == 2179
    assert all(c["ids"][0] == SOT and c["ids"][-1] == EOT and len(c["ids"]) <= 77 for c in cases)


def test_every_reference_case_has_identical_ids(cases):
    tokens = tokenize([c["text"] for c in cases])
    assert tokens.shape == (len(cases), 77)
    expected = torch.tensor([_expected_row(c["ids"], 77) for c in cases])
    mismatched = [cases[i]["text"][:60] for i in torch.nonzero((tokens != expected).any(1)).flatten().tolist()]
    assert not mismatched, f"{len(mismatched)} cases differ, e.g. {mismatched[:5]}"


def test_reference_cases_tokenized_one_by_one(cases):
    # A fresh tokenizer with cold caches, one text per call: ids do not depend on batching or cache state.
    tok = Tokenizer()
    for case in cases[::7]:
        assert tok(case["text"])[0].tolist() == _expected_row(case["ids"], 77), case["text"][:60]


@pytest.mark.parametrize("context", [2, 3, 8, 32, 76, 77, 100])
def test_other_context_lengths(cases, context):
    # The reference ids are cut at 77, so for longer contexts only the untruncated cases are known answers.
    usable = [c for c in cases if context <= 77 or len(c["ids"]) < 77]
    tokens = Tokenizer(context)([c["text"] for c in usable])
    assert tokens.shape == (len(usable), context)
    assert tokens.tolist() == [_expected_row(c["ids"], context) for c in usable]
    # A per-call context overrides the tokenizer's own.
    assert torch.equal(Tokenizer(77)([c["text"] for c in usable[:50]], context_length=context), tokens[:50])


def test_truncation_keeps_eot_last():
    tok = Tokenizer(16)
    text = " ".join(f"word{i}" for i in range(40))
    full = tok.encode(text)
    assert len(full) > 14
    row = tok(text)[0].tolist()
    assert row == [SOT, *full[:14], EOT]
    # Exactly filling the context is not truncation: 14 ids + SOT + EOT.
    exact = tok.decode(full[:14])
    assert tok(exact)[0].tolist() == [SOT, *tok.encode(exact), EOT]
    assert tokenize("word " * 200, context_length=5)[0].tolist() == [SOT, *[2653] * 3, EOT]


# ------------------------------------------------------------------------------------------------ batch API


def test_batch_is_zero_padded_long_tensor():
    tokens = tokenize(["a photo of a cat", "dog", ""])
    assert tokens.dtype == torch.long and tokens.shape == (3, 77)
    assert tokens[0, :7].tolist() == [SOT, 320, 1125, 539, 320, 2368, EOT]
    assert tokens[1, :3].tolist() == [SOT, 1929, EOT]
    assert tokens[2, :2].tolist() == [SOT, EOT]
    assert not tokens[0, 7:].any() and not tokens[1, 3:].any() and not tokens[2, 2:].any()


def test_single_string_and_other_sequences():
    one = tokenize("a photo of a cat")
    assert one.shape == (1, 77)
    for texts in (("a photo of a cat",), (t for t in ["a photo of a cat"]), np.array(["a photo of a cat"])):
        assert torch.equal(tokenize(texts), one)
    assert torch.equal(tokenize([b"a photo of a cat"]), one)  # UTF-8 bytes are accepted
    assert torch.equal(tokenize(bytearray("caf\u00e9".encode())), tokenize("caf\u00e9"))
    assert tokenize([]).shape == (0, 77)
    assert torch.equal(clipforge.tokenize("dog"), tokenize("dog"))


@pytest.mark.parametrize("text", ["", "   ", "\t\n", "\u00a0\u2003"])
def test_empty_or_blank_text_is_sot_eot(text):
    assert tokenize(text, context_length=4)[0].tolist() == [SOT, EOT, 0, 0]
    assert Tokenizer().encode(text) == []


def test_special_token_literals_and_properties():
    tok = Tokenizer()
    assert (tok.sot_token_id, tok.eot_token_id, tok.vocab_size, tok.context_length) == (SOT, EOT, 49408, 77)
    assert tok.encode("<start_of_text>") == [SOT]
    assert tok.encode("<END_OF_TEXT>") == [EOT]  # lower-cased before splitting, as in the reference
    assert tok.encode("a<end_of_text>b") == [320, EOT, 321]


# --------------------------------------------------------------------------------------------------- decode


@pytest.mark.parametrize("text", ["a photo of a cat", "the quick brown fox jumps over a lazy dog", "antidisestablish"])
def test_decode_round_trip(text):
    tok = Tokenizer()
    assert tok.decode(tok(text)[0]) == text  # SOT skipped, stops at EOT, padding ignored
    assert tok.decode(tok.encode(text)) == text


def test_decode_round_trip_on_plain_reference_captions(cases):
    tok = Tokenizer()
    plain = [c for c in cases if len(c["ids"]) < 77 and c["text"].strip() and re.fullmatch(r"[A-Za-z ]+", c["text"])]
    assert len(plain) > 20
    for case in plain:
        assert tok.decode(case["ids"]) == " ".join(case["text"].lower().split())


def test_decode_details():
    tok = Tokenizer()
    row = tok("hello, world!")[0]
    assert tok.decode(row) == "hello , world !"  # each punctuation piece ends a word in OpenAI's BPE
    assert tok.decode(row, skip_special_tokens=False).startswith("<start_of_text>hello ")
    assert tok.decode(np.array(tok.encode("a dog"))) == "a dog"  # NumPy integers are ids too
    assert tok.decode([]) == ""
    assert tok.encode("\u4e2d\u6587\u5b57") == [19759, 255, 29032, 229, 35751, 501]  # byte-level BPE pieces
    assert tok.decode([19759, 255, 29032]) == "\u4e2d\ufffd"  # a partial UTF-8 sequence decodes to U+FFFD
    with pytest.raises(ValueError, match=r"ids\[1\] = 49408"):
        tok.decode([320, 49408])
    with pytest.raises(ValueError, match=r"ids\[0\]"):
        tok.decode([-1])
    with pytest.raises(ValueError, match=r"ids\[0\] = True"):
        tok.decode([True])
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(torch.zeros(2, 3, dtype=torch.long))


# --------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("texts", "error", "pattern"), [
    ([None], TypeError, r"texts\[0\] is None"),
    (["ok", 5], TypeError, r"texts\[1\] is a int"),
    (["ok", "fine", 1.5], TypeError, r"texts\[2\] is a float"),
    (["ok", b"\xff\xfe bad"], ValueError, r"texts\[1\]: bytes are not valid UTF-8"),
    (None, TypeError, r"texts is None"),
    (42, TypeError, r"texts is a int"),
])
def test_bad_texts_name_the_item(texts, error, pattern):
    with pytest.raises(error, match=pattern):
        tokenize(texts)


def test_encode_names_its_argument():
    with pytest.raises(TypeError, match=r"^text is None"):
        Tokenizer().encode(None)
    with pytest.raises(ValueError, match=r"^text: bytes are not valid UTF-8"):
        Tokenizer().encode(b"\xc3")


@pytest.mark.parametrize("context", [1, 0, -5, True, 2.0, "77", None])
def test_bad_context_length(context):
    with pytest.raises(ValueError, match="context_length must be an int >= 2"):
        Tokenizer(context)
    if context is not None:  # None means "the tokenizer's own" in a call
        with pytest.raises(ValueError, match="context_length must be an int >= 2"):
            tokenize("a", context_length=context)


# --------------------------------------------------------------------------------------------------- config


def test_config_round_trip():
    tok = Tokenizer(32)
    config = tok.to_config()
    assert config == {"type": "openai-bpe", "context_length": 32}
    rebuilt = Tokenizer.from_config(json.loads(json.dumps(config)))
    assert rebuilt.context_length == 32
    assert torch.equal(rebuilt(TRICKY), tok(TRICKY))
    assert Tokenizer.from_config({"type": "openai-bpe"}).context_length == 77


@pytest.mark.parametrize(("config", "error", "pattern"), [
    ({"type": "openai-bpe", "context_length": 77, "vocab": "x"}, ValueError, r"unknown keys \['vocab'\]"),
    ({"type": "hf-tokenizers", "context_length": 77}, ValueError, "type must be 'openai-bpe'"),
    ({"context_length": 77}, ValueError, "type must be 'openai-bpe'"),
    ({"type": "openai-bpe", "context_length": 1}, ValueError, "context_length must be an int >= 2"),
    ([("type", "openai-bpe")], TypeError, "must be a dict"),
])
def test_bad_config_is_rejected(config, error, pattern):
    with pytest.raises(error, match=pattern):
        Tokenizer.from_config(config)


def test_pickle_is_small_and_equivalent():
    tok = Tokenizer(40, cache_size=123)
    tok(TRICKY)  # warm caches must not travel
    data = pickle.dumps(tok)
    assert len(data) < 1000
    clone = pickle.loads(data)
    assert (clone.context_length, clone.to_config()) == (40, tok.to_config())
    assert torch.equal(clone(TRICKY), tok(TRICKY))


# ------------------------------------------------------------------------------------- fast path, caches


def _random_ascii_texts(n: int, seed: int = 0) -> list[str]:
    """Seeded soups over all 128 ASCII characters, weighted to letters, spaces, '&', quotes and digits."""
    rng = random.Random(seed)
    alphabet = [chr(c) for c in range(128)] + list(string.ascii_letters * 3 + "    &&''0123456789;#")
    words = ["amp;", "&amp;", "&lt;", "&#39;", "don't", "it's", "I'LL", "x" * 80]
    texts = []
    for _ in range(n):
        pieces = [rng.choice(words) if rng.random() < 0.1 else rng.choice(alphabet) for _ in range(rng.randint(0, 60))]
        texts.append("".join(pieces))
    return texts


def test_fast_path_matches_full_normalisation(monkeypatch, cases):
    texts = TRICKY + _random_ascii_texts(400) + [c["text"] for c in cases if c["text"].isascii()]
    fast = Tokenizer()(texts)
    monkeypatch.setattr(tokenizer_module, "_clean", _reference_clean)
    slow = Tokenizer()(texts)  # fresh caches, every text through ftfy + html.unescape + whitespace regex
    differ = [texts[i] for i in torch.nonzero((fast != slow).any(1)).flatten().tolist()]
    assert not differ, f"fast path differs on {differ[:5]}"


def test_plain_ascii_skips_ftfy(monkeypatch):
    calls = []
    original = ftfy.fix_text
    monkeypatch.setattr(ftfy, "fix_text", lambda text, *a, **k: calls.append(text) or original(text, *a, **k))
    tok = Tokenizer()
    tok(["a photo of a cat", "don't stop: 3 dogs!"])
    assert calls == []
    tok(["fish &amp; chips", "tab\there", "caf\u00e9"])
    assert calls == ["fish &amp; chips", "tab\there", "caf\u00e9"]


@pytest.mark.parametrize("cache_size", [0, 1, 3])
def test_small_caches_stay_bounded_and_give_same_ids(cases, cache_size):
    texts = [c["text"] for c in cases[::3]]
    tok = Tokenizer(cache_size=cache_size)
    first = tok(texts)
    assert torch.equal(first, tokenize(texts))
    assert len(tok._chunk_cache) <= cache_size and len(tok._piece_cache) <= cache_size
    assert torch.equal(tok(texts), first)  # a second pass over evicted/refilled caches changes nothing


def test_default_cache_reuses_chunks():
    tok = Tokenizer()
    tok(["a photo of a cat", "a photo of a dog"])
    assert set(tok._chunk_cache) == {"a", "photo", "of", "cat", "dog"}
