"""Token ids -> text, batched, with the tokenizer that the spill stores.

Text metrics see `tokenizer.batch_decode(rows, skip_special_tokens=True)`. transformers' `batch_decode` decodes
row by row in Python (about three quarters of a cheap text metric's time); a fast tokenizer's own Rust
`Tokenizer.decode_batch` does the same work in one call. It is used only where it is provably the same function:
for transformers' own fast tokenizer class (no subclass that overrides `decode`, `batch_decode` or `_decode`),
whose `_decode` is exactly the Rust decode followed, when `clean_up_tokenization_spaces` is set, by
`clean_up_tokenization`. transformers 5 skips that clean-up for BPE models (with a warning) where transformers 4
applies it, so a BPE tokenizer that asks for it keeps `batch_decode`, as does every other tokenizer.
`tests/test_decode.py` checks both paths give the same strings (special and added tokens, clean-up, byte-level
BPE, broken UTF-8). Where the Rust tokenizer's decoder works a token at a time, its strings are gathered with numpy
instead (`piece_decode.py`, 4x faster; `tests/test_piece_decode.py`).
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Any, Callable

import numpy as np

from .batch import LazyText, SampleBatch, split_rows
from .piece_decode import PieceDecoder

Decoder = Callable[[np.ndarray, np.ndarray], list[str]]  # (ids, row offsets) -> the rows' strings
_OWN_DECODING = ("decode", "batch_decode", "_decode")
_DECODERS: "weakref.WeakKeyDictionary[Any, Decoder]" = weakref.WeakKeyDictionary()  # one per tokenizer object
# piece decoders of the last few tokenizers loaded from a file, by the file's digest (`LightTokenizer.fingerprint`):
# each `SpillReader` loads its own tokenizer object, and a new piece decoder learnt its pieces again (a one-worker
# text_match on 2.56M caption tokens, repeated: 1.01 s, shared 0.73; a 150k vocabulary's pieces take 0.3 s)
PIECES_KEPT = 2
_PIECES: "OrderedDict[bytes, PieceDecoder | None]" = OrderedDict()
_PIECES_LOCK = threading.Lock()


class TokenizerMismatchError(ValueError):
    """The tokenizer cannot have produced the spilled ids (vocabulary sizes disagree)."""


def decode_batch(batch: SampleBatch, tokenizer: Any) -> SampleBatch:
    """Attach `pred_text` / `label_text` (skip_special_tokens=True), each decoded on its first read: a metric that
    takes its references from a dataset column never pays for decoding the labels. Later calls reuse them."""
    if not batch.has_text:
        decode = batch_decoder(tokenizer)
        batch.attach_text(LazyText(decode, batch.pred_ids, batch.offsets),
                          LazyText(decode, batch.label_ids, batch.label_row_offsets))
    return batch


def batch_decoder(tokenizer: Any) -> Decoder:
    """`(ids, offsets) -> tokenizer.batch_decode(rows, skip_special_tokens=True)`, through the Rust tokenizer when
    that is the same function (see the module docstring), and then by gathering each token's piece of text with
    numpy where its decoder works a token at a time (`piece_decode.py`). Made once per tokenizer object."""
    try:
        return _DECODERS[tokenizer]
    except (KeyError, TypeError):
        pass
    decode = _decoder(tokenizer)
    try:
        _DECODERS[tokenizer] = decode
    except TypeError:  # an object that takes no weak reference: not kept
        pass
    return decode


def _decoder(tokenizer: Any) -> Decoder:
    backend = _rust_backend(tokenizer)
    if backend is None:  # (no rows: no call; transformers 5.17 gives [""] for none)
        return lambda ids, offsets: tokenizer.batch_decode(split_rows(ids, offsets), skip_special_tokens=True) \
            if len(offsets) > 1 else []
    clean_up = tokenizer.clean_up_tokenization if getattr(tokenizer, "clean_up_tokenization_spaces", False) else None
    pieces = _piece_decoder(backend, getattr(tokenizer, "fingerprint", None))

    def decode(ids: np.ndarray, offsets: np.ndarray) -> list[str]:
        if pieces is not None:
            texts = pieces.decode(ids, offsets)
        else:
            texts = backend.decode_batch(split_rows(ids, offsets), skip_special_tokens=True)
        return [clean_up(t) for t in texts] if clean_up is not None else texts

    return decode


def _piece_decoder(backend: Any, fingerprint: bytes | None) -> PieceDecoder | None:
    """`PieceDecoder.of(backend)`, shared by the tokenizers loaded from the same bytes (`fingerprint`)."""
    if fingerprint is None:
        return PieceDecoder.of(backend)
    with _PIECES_LOCK:
        if fingerprint in _PIECES:
            _PIECES.move_to_end(fingerprint)
            return _PIECES[fingerprint]
        pieces = _PIECES[fingerprint] = PieceDecoder.of(backend)
        while len(_PIECES) > PIECES_KEPT:
            _PIECES.popitem(last=False)
        return pieces


def _rust_backend(tokenizer: Any) -> Any:
    """The `tokenizers.Tokenizer` whose `decode_batch` equals the tokenizer's `batch_decode`, or None."""
    from .spill.light_tokenizer import LightTokenizer

    if isinstance(tokenizer, LightTokenizer):  # loaded only where it is that (no clean-up): transformers not needed
        return tokenizer.backend
    try:
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        return None
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        return None
    if any(getattr(type(tokenizer), name) is not getattr(PreTrainedTokenizerFast, name) for name in _OWN_DECODING):
        return None
    backend = getattr(tokenizer, "_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        return None
    if tokenizer.clean_up_tokenization_spaces and type(backend.model).__name__ == "BPE":
        return None  # the clean-up depends on the transformers version here: leave it to transformers
    return backend


def check_tokenizer_vocab(tokenizer: Any, vocab_size: int) -> None:
    """A tokenizer larger than the model's vocabulary cannot be the one that made these ids."""
    size = len(tokenizer)
    if size > vocab_size:
        raise TokenizerMismatchError(
            f"the tokenizer has {size} tokens but the spill's vocabulary has {vocab_size}: it is not the tokenizer "
            "of this model. Evaluate with the model's own tokenizer (tokenizer=...)."
        )
