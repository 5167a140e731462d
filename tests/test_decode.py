"""The fast decode path (one `tokenizers.Tokenizer.decode_batch` call) gives exactly the strings of
`tokenizer.batch_decode(rows, skip_special_tokens=True)`, and tokenizers it cannot vouch for keep `batch_decode`.

Real tokenizers built locally with `tokenizers`: the word-level one of `spilleval.testing` (WordPiece decoder),
a byte-level BPE trained here (multi-byte characters, rows that cut a character in half), each with special tokens,
added tokens (special and not), and `clean_up_tokenization_spaces` on and off.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from spilleval.batch import SampleBatch, split_rows
from spilleval.decode import _rust_backend, batch_decoder, decode_batch
from spilleval.testing import build_tokenizer

CORPUS = ["the cat sat on the mat .", "it's a café , isn't it ?", "日本語 😀 naïve ÉCOLE", "don't stop , we're here !",
          "a picture shows a red cat", "what is two plus two ?", "it 's a café , is n't it ?", "we 're here !"]


def byte_level_bpe(*, clean_up: bool) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE, trained on a few sentences (unicode, contractions, punctuation)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   clean_up_tokenization_spaces=clean_up)


def word_level(*, clean_up: bool) -> PreTrainedTokenizerFast:
    """Whitespace-split words joined by spaces (a WordPiece decoder without its own clean-up), so that
    transformers' `clean_up_tokenization` has spaces before punctuation and contractions to remove."""
    words = ["<pad>", "<unk>", "<s>", "</s>", *sorted({w for text in CORPUS for w in text.split()})]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", clean_up_tokenization_spaces=clean_up)


def with_added_tokens(tok: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    tok.add_tokens(["<extra_word>", "newword"])  # added, not special: kept when decoding
    tok.add_special_tokens({"additional_special_tokens": ["<img>", "<|end|>"]})  # special: skipped
    return tok


TOKENIZERS = {
    "spilleval.testing": build_tokenizer,
    "word-level": lambda: word_level(clean_up=False),
    "word-level, clean-up": lambda: word_level(clean_up=True),
    "word-level, added tokens, clean-up": lambda: with_added_tokens(word_level(clean_up=True)),
    "byte-level BPE": lambda: byte_level_bpe(clean_up=False),
    "byte-level BPE, added tokens": lambda: with_added_tokens(byte_level_bpe(clean_up=False)),
    "byte-level BPE, clean-up (transformers decides)": lambda: byte_level_bpe(clean_up=True),
}
FAST = {name for name in TOKENIZERS if "transformers decides" not in name}
_cache: dict[str, Any] = {}


def get(name: str) -> PreTrainedTokenizerFast:
    if name not in _cache:
        _cache[name] = TOKENIZERS[name]()
    return _cache[name]


def rows_of(tok: PreTrainedTokenizerFast) -> list[list[int]]:
    """Encoded sentences with special tokens around and inside, added tokens, empty rows, and every id alone."""
    specials = tok.all_special_ids
    added = tok.convert_tokens_to_ids([t for t in ("<extra_word>", "newword", "<img>") if t in tok.get_vocab()])
    rows = [tok(text, add_special_tokens=False)["input_ids"] for text in CORPUS]
    rows = [[specials[0], *r, specials[-1]] for r in rows] + [r[:2] + added + r[2:] for r in rows]
    return rows + [[], specials, *[[i] for i in range(len(tok))]]


def as_arrays(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ids as a batch holds them: the ids one after the other, and each row's offsets."""
    ids = np.array([i for row in rows for i in row], dtype=np.uint32)
    return ids, np.cumsum([0, *map(len, rows)])


def decoded(tok: Any, rows: list[list[int]]) -> list[str]:
    return batch_decoder(tok)(*as_arrays(rows))


@pytest.mark.parametrize("name", TOKENIZERS)
def test_fast_decode_equals_batch_decode(name):
    tok = get(name)
    assert (_rust_backend(tok) is not None) == (name in FAST)  # which path is taken
    rows = rows_of(tok)
    want = tok.batch_decode(rows, skip_special_tokens=True)
    assert decoded(tok, rows) == want
    if "clean-up" in name and name in FAST:  # the clean-up really changed something on this data
        assert want != tok.batch_decode(rows, skip_special_tokens=True, clean_up_tokenization_spaces=False)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(sorted(TOKENIZERS)), st.data())
def test_fast_decode_equals_batch_decode_on_random_ids(name, data):
    """Random id rows: any token next to any other, special tokens anywhere, byte tokens that cut UTF-8."""
    tok = get(name)
    ids = st.integers(0, len(tok) - 1)
    rows = data.draw(st.lists(st.lists(ids, max_size=12), max_size=8))
    want = tok.batch_decode(rows, skip_special_tokens=True) if rows else []  # (transformers 5.17: [""] for none)
    assert decoded(tok, rows) == want


def test_a_tokenizer_that_decodes_its_own_way_keeps_batch_decode():
    class Shouting(PreTrainedTokenizerFast):
        def _decode(self, token_ids, skip_special_tokens=False, **kwargs):
            return super()._decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs).upper()

    plain = build_tokenizer()
    tok = Shouting(tokenizer_object=plain.backend_tokenizer, pad_token="<pad>", eos_token="</s>")
    assert _rust_backend(tok) is None
    rows = rows_of(tok)[:6]
    assert decoded(tok, rows) == tok.batch_decode(rows, skip_special_tokens=True)
    assert decoded(tok, rows)[0] == decoded(plain, rows)[0].upper()


def test_decode_batch_fills_both_sides_of_aligned_and_ragged_batches():
    tok = get("byte-level BPE")
    rows = rows_of(tok)[:8]
    aligned = SampleBatch.from_rows(range(8), rows, rows, vocab_size=len(tok))
    ragged = SampleBatch.from_rows(range(8), rows, rows[::-1], vocab_size=len(tok), aligned=False)
    for batch, labels in ((aligned, rows), (ragged, rows[::-1])):
        decode_batch(batch, tok)
        assert batch.pred_text == tok.batch_decode(rows, skip_special_tokens=True)
        assert batch.label_text == tok.batch_decode(labels, skip_special_tokens=True)
    part = aligned.slice(3, 6)  # a view whose offsets and ids start inside the parent batch
    assert split_rows(part.pred_ids, part.offsets) == rows[3:6]
    assert decode_batch(SampleBatch.from_rows([], [], [], vocab_size=len(tok)), tok).pred_text == []
    assert split_rows(np.zeros(0, dtype=np.uint16), np.zeros(1, dtype=np.int64)) == []


def test_text_is_decoded_on_first_read_and_only_the_rows_read(monkeypatch: pytest.MonkeyPatch):
    """decode_batch attaches text that decodes when it is first read: a metric with references in a column never
    pays for decoding the labels, and rows sliced or taken before the read decode only themselves, once."""
    tok = get("byte-level BPE")
    rows = rows_of(tok)[:8]
    calls: list[int] = []
    reference = batch_decoder(tok)

    def counting(ids: np.ndarray, offsets: np.ndarray) -> list[str]:
        calls.append(len(offsets) - 1)
        return reference(ids, offsets)

    batch = SampleBatch.from_rows(range(8), rows, rows[::-1], vocab_size=len(tok), aligned=False)
    monkeypatch.setattr("spilleval.decode.batch_decoder", lambda _: counting)
    decode_batch(batch, tok)
    assert calls == [] and batch.has_text
    part, picked = batch.slice(2, 5), batch.take(np.array([6, 0]))
    assert part.pred_text == reference(*as_arrays(rows[2:5])) and calls == [3]
    assert picked.label_text == reference(*as_arrays([rows[::-1][6], rows[::-1][0]])) and calls == [3, 2]
    assert batch.pred_text == reference(*as_arrays(rows)) and batch.pred_text is batch.pred_text and calls == [3, 2, 8]
    assert batch.label_text == reference(*as_arrays(rows[::-1])) and calls == [3, 2, 8, 8]
    decode_batch(batch, tok)  # already attached: nothing decoded again
    assert calls == [3, 2, 8, 8]
