"""pycocoevalcap's CIDEr-D arithmetic over whole batches of captions, in numpy.

pycocoevalcap's `CiderScorer` builds a dict of n-gram counts per caption and loops over them in Python, once per
(hypothesis, reference) pair. Here the words of a batch are interned to integers (Arrow's dictionary encoding) and
every n-gram gets an integer id (its (n-1)-gram prefix's id and one more word, made unique with `np.unique`), so
term frequencies, tf-idf weights, norms and clipped dot products are array operations; n-gram texts (the keys of
the corpus document frequencies) are joined by Arrow and hashed in numpy.

Every per-caption sum adds the same terms in the same order as `CiderScorer.compute_cider`: the n-grams of a
caption in the order its dict holds them (by order, then position of first occurrence), through `np.bincount`,
which adds sequentially. A sample's score therefore depends only on its own captions and the corpus document
frequencies, never on the batch it was scored in, and equals pycocoevalcap's score for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

DocumentFrequency = Callable[[np.ndarray, pa.Array], np.ndarray]  # (hashes, texts) -> corpus counts
COOKED_ORDERS = 4  # pycocoevalcap's CiderScorer cooks 1- to 4-grams whatever its `n` (cook_refs(refs) uses n=4)


@dataclass
class CookedCaptions:
    """The (caption, n-gram, term frequency) pairs of a list of captions, each caption's pairs in the order of
    pycocoevalcap's `precook` dict; n-gram ids are local to this list."""

    pair_caption: np.ndarray  # int64 [P]
    pair_gram: np.ndarray  # int64 [P]
    pair_count: np.ndarray  # int64 [P]
    gram_order: np.ndarray  # int64 [G]: 0 for unigrams ... 3 for 4-grams
    gram_hash: np.ndarray  # uint64 [G]: a hash of the words (to search the corpus table; texts decide equality)
    gram_text: pa.Array  # [G] each n-gram as "w1 w2 ..." (pycocoevalcap's tuple of words)
    length: np.ndarray  # int64 [C]: pycocoevalcap's caption length, its number of bigrams


def cook(captions: Sequence[str], orders: int = COOKED_ORDERS) -> CookedCaptions:
    """Split on whitespace (as `precook`), intern the words and count every n-gram of order 1..`orders`."""
    words = [caption.split() for caption in captions]
    lengths = np.fromiter((len(w) for w in words), dtype=np.int64, count=len(words))
    flat_words = pa.array([word for caption in words for word in caption], pa.large_string())
    interned = flat_words.dictionary_encode()
    word_ids = interned.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    vocab_size = max(len(interned.dictionary), 1)
    starts = np.zeros(len(words) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    owner = np.repeat(np.arange(len(words), dtype=np.int64), lengths)
    room = starts[1:][owner] - np.arange(len(flat_words))  # words from each position to its caption's end

    word_hash = text_hashes(interned.dictionary)[word_ids]
    occ_gram, occ_caption, occ_order, occ_position, texts, gram_order, hashes = [], [], [], [], [], [], []
    prefix = word_ids
    offset = 0
    for k in range(orders):
        where = np.flatnonzero(room > k)
        keys = word_ids if k == 0 else prefix[where] * vocab_size + word_ids[where + k]
        _, first, ids = np.unique(keys, return_index=True, return_inverse=True)
        first = where[first]
        gram = np.full(len(flat_words), -1, dtype=np.int64)
        gram[where] = ids.reshape(-1)
        prefix = gram
        occ_gram.append(offset + gram[where])
        occ_caption.append(owner[where])
        occ_order.append(np.full(len(where), k, dtype=np.int64))
        occ_position.append(where)
        texts.append(_joined(flat_words, first, k + 1))
        hashes.append(_chained(word_hash, first, k + 1))
        gram_order.append(np.full(len(first), k, dtype=np.int64))
        offset += len(first)

    gram = np.concatenate(occ_gram)
    caption = np.concatenate(occ_caption)
    in_dict_order = np.lexsort((np.concatenate(occ_position), np.concatenate(occ_order), caption))
    gram, caption = gram[in_dict_order], caption[in_dict_order]
    grams = max(offset, 1)
    pairs, first, counts = np.unique(caption * grams + gram, return_index=True, return_counts=True)
    by_first = np.argsort(first, kind="stable")
    pairs, counts = pairs[by_first], counts[by_first]
    gram_text = pa.concat_arrays(texts) if texts else pa.array([], pa.large_string())
    return CookedCaptions(pair_caption=pairs // grams, pair_gram=pairs % grams, pair_count=counts,
                          gram_order=np.concatenate(gram_order) if gram_order else np.zeros(0, np.int64),
                          gram_hash=np.concatenate(hashes) if hashes else np.zeros(0, np.uint64),
                          gram_text=gram_text, length=np.maximum(lengths - 1, 0))


def _joined(words: pa.Array, start: np.ndarray, k: int) -> pa.Array:
    """The k words from each start position, joined by spaces (pycocoevalcap's tuple, as one string)."""
    columns = [words.take(pa.array(start + j)) for j in range(k)]
    return columns[0] if k == 1 else pc.binary_join_element_wise(*columns, pa.scalar(" ", pa.large_string()))


def _chained(word_hash: np.ndarray, start: np.ndarray, k: int) -> np.ndarray:
    """A 64-bit hash of the k words from each start position: their hashes chained through a mixer."""
    h = np.zeros(len(start), dtype=np.uint64)
    for j in range(k):
        h = _mix(h ^ word_hash[start + j])
    return h


def text_hashes(texts: pa.Array) -> np.ndarray:
    """A 64-bit hash of each string's UTF-8 bytes (a polynomial over the bytes, then mixed), in numpy."""
    texts = texts.cast(pa.large_string())
    if not len(texts):
        return np.zeros(0, dtype=np.uint64)
    offsets = np.frombuffer(texts.buffers()[1], dtype=np.int64)[texts.offset : texts.offset + len(texts) + 1]
    lengths = np.diff(offsets)
    data = np.frombuffer(texts.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]].astype(np.uint64)
    from_end = np.repeat(offsets[1:] - offsets[0], lengths) - 1 - np.arange(len(data))
    terms = (data + np.uint64(1)) * np.power(np.uint64(0x100000001B3), from_end.astype(np.uint64))
    sums = np.add.reduceat(terms, np.minimum(offsets[:-1] - offsets[0], max(len(terms) - 1, 0))) if len(terms) \
        else np.zeros(len(texts), np.uint64)
    sums[lengths == 0] = 0
    return _mix(sums ^ lengths.astype(np.uint64))


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (uint64 arithmetic wraps around)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def document_frequencies(refs: Sequence[Sequence[str]]) -> tuple[np.ndarray, pa.Array, np.ndarray]:
    """(hash, text, number of samples whose references hold it) of every n-gram of the samples' references: the
    batch's share of pycocoevalcap's `compute_doc_freq`."""
    owner = np.repeat(np.arange(len(refs), dtype=np.int64), [len(r) for r in refs])
    cooked = cook([ref for sample_refs in refs for ref in sample_refs])
    grams = max(len(cooked.gram_order), 1)
    in_sample = _distinct(owner[cooked.pair_caption] * grams + cooked.pair_gram) % grams
    ids, samples = np.unique(in_sample, return_counts=True)
    return cooked.gram_hash[ids], cooked.gram_text.take(pa.array(ids)), samples


def cider_scores(hyps: Sequence[str], refs: Sequence[Sequence[str]], document_frequency: DocumentFrequency, *,
                 corpus_size: int, n: int = 4, sigma: float = 6.0) -> np.ndarray:
    """Each sample's CIDEr-D, as `CiderScorer.compute_cider` gives it for a corpus of `corpus_size` samples."""
    samples = len(hyps)
    ref_owner = np.repeat(np.arange(samples, dtype=np.int64), [len(r) for r in refs])
    cooked = cook([*hyps, *(ref for sample_refs in refs for ref in sample_refs)])
    orders = min(n, COOKED_ORDERS)
    keep = cooked.gram_order[cooked.pair_gram] < orders
    caption, gram, count = cooked.pair_caption[keep], cooked.pair_gram[keep], cooked.pair_count[keep]
    order = cooked.gram_order[gram]
    all_grams = np.arange(len(cooked.gram_order))
    df = document_frequency(cooked.gram_hash, cooked.gram_text)
    weight = count.astype(np.float64) * (np.log(float(corpus_size)) - _log_df(df)[gram])
    captions = len(hyps) + len(ref_owner)
    norm = np.sqrt(_sums(caption * orders + order, weight * weight, captions * orders)).reshape(captions, orders)

    is_hyp = caption < samples
    hyp_pairs = np.flatnonzero(is_hyp)
    hyp_keys = caption[hyp_pairs] * len(all_grams) + gram[hyp_pairs]
    by_key = np.argsort(hyp_keys, kind="stable")
    ref_pairs = np.flatnonzero(~is_hyp)
    ref_keys = ref_owner[caption[ref_pairs] - samples] * len(all_grams) + gram[ref_pairs]
    at = np.minimum(np.searchsorted(hyp_keys[by_key], ref_keys), max(len(hyp_pairs) - 1, 0))
    matched = hyp_keys[by_key][at] == ref_keys if len(hyp_pairs) else np.zeros(len(ref_pairs), bool)
    ref_match, hyp_match = ref_pairs[matched], hyp_pairs[by_key[at[matched]]]
    in_hyp_order = np.lexsort((hyp_match, caption[ref_match]))  # pycocoevalcap loops over the hypothesis' n-grams
    ref_match, hyp_match = ref_match[in_hyp_order], hyp_match[in_hyp_order]
    clipped = np.minimum(weight[hyp_match], weight[ref_match]) * weight[ref_match]
    ref_row = caption[ref_match] - samples
    dot = _sums(ref_row * orders + order[ref_match], clipped, len(ref_owner) * orders).reshape(len(ref_owner), orders)

    hyp_norm, ref_norm = norm[ref_owner], norm[samples:]
    both = (hyp_norm != 0) & (ref_norm != 0)
    dot[both] /= hyp_norm[both] * ref_norm[both]
    delta = cooked.length[ref_owner] - cooked.length[samples:]
    dot *= _length_penalty(delta, sigma)[:, None]
    summed = np.zeros((samples, n))
    summed[:, :orders] = _sums((ref_owner[:, None] * orders + np.arange(orders)).ravel(), dot.ravel(),
                               samples * orders).reshape(samples, orders)
    return summed.mean(axis=1) / np.array([len(r) for r in refs], dtype=np.float64) * 10.0


def _distinct(values: np.ndarray) -> np.ndarray:
    """The distinct values, sorted (a sort: faster here than numpy's hash-based `np.unique`)."""
    values = np.sort(values)
    return values[np.concatenate(([True], values[1:] != values[:-1]))] if len(values) else values


def _sums(index: np.ndarray, weights: np.ndarray, size: int) -> np.ndarray:
    """Per-bin sums, each adding its terms one after the other in the given order (np.bincount's loop)."""
    return np.bincount(index, weights=weights, minlength=size).astype(np.float64, copy=False)


def _log_df(df: np.ndarray) -> np.ndarray:
    """np.log(max(1.0, df)) per n-gram, one scalar log per distinct value (as pycocoevalcap takes it)."""
    values, inverse = np.unique(df, return_inverse=True)
    return np.array([np.log(max(1.0, float(v))) for v in values.tolist()], dtype=np.float64)[inverse.reshape(-1)]


def _length_penalty(delta: np.ndarray, sigma: float) -> np.ndarray:
    """pycocoevalcap's np.e**(-(delta**2)/(2*sigma**2)), one Python float power per distinct length difference."""
    values, inverse = np.unique(delta, return_inverse=True)
    penalty = [np.e ** (-(float(d) ** 2) / (2 * sigma**2)) for d in values.tolist()]
    return np.array(penalty, dtype=np.float64)[inverse.reshape(-1)]
