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

from ..batch import concat_ranges

# (hashes, texts, known to be in the table) -> corpus counts
DocumentFrequency = Callable[[np.ndarray, pa.Array, np.ndarray], np.ndarray]
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
    """Split on whitespace (as `precook`), intern the words and count every n-gram of order 1..`orders`: the
    (caption, n-gram) pairs come out of interning the occurrences in pycocoevalcap's dict order."""
    found = occurrences(captions, orders)
    grams = max(len(found.gram_order), 1)
    codes, pairs, _ = first_appearance(found.caption * grams + found.gram)
    counts = np.bincount(codes, minlength=len(pairs)).astype(np.int64)
    return CookedCaptions(pair_caption=pairs // grams, pair_gram=pairs % grams, pair_count=counts,
                          gram_order=found.gram_order, gram_hash=found.gram_hash, gram_text=found.gram_text,
                          length=found.length)


@dataclass
class Occurrences:
    """Every n-gram occurrence of a list of captions, in pycocoevalcap's dict order (caption by caption, then order
    by order, then position), and the distinct n-grams; n-gram ids are local to this list."""

    caption: np.ndarray  # int64 [O]
    gram: np.ndarray  # int64 [O]
    gram_order: np.ndarray  # int64 [G]
    gram_hash: np.ndarray  # uint64 [G]
    gram_text: pa.Array  # [G]
    length: np.ndarray  # int64 [C]: pycocoevalcap's caption length


def occurrences(captions: Sequence[str], orders: int = COOKED_ORDERS) -> Occurrences:
    """No sort: words and n-grams are interned by hash (Arrow's dictionary encoding numbers them in order of first
    appearance) and each occurrence is put at its place in the dict order directly. An n-gram's text and hash
    extend its (n-1)-gram prefix's by one word."""
    flat_words, lengths = split_words(captions)
    interned = flat_words.dictionary_encode()
    word_ids = interned.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    vocab_size = max(len(interned.dictionary), 1)
    starts = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    owner = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    in_caption = np.arange(len(flat_words), dtype=np.int64) - starts[owner]
    room = lengths[owner] - in_caption  # words from each position to its caption's end
    block_start, per_caption = _dict_order_blocks(lengths, orders)

    dictionary_hash = text_hashes(interned.dictionary)
    word_hash = dictionary_hash[word_ids]
    occurrence_gram = np.empty(int(per_caption.sum()), dtype=np.int64)
    texts: list[pa.Array] = []
    hashes: list[np.ndarray] = []
    prefix = word_ids  # the id (within its order) of the n-gram starting at each position
    offset = 0
    for k in range(orders):
        where = np.flatnonzero(room > k)
        if k == 0:
            ids, values, first = _words_by_first_appearance(word_ids, len(interned.dictionary))
            texts.append(interned.dictionary.take(pa.array(values)))
            hashes.append(_mix(dictionary_hash[values]))  # chained: h(w1..wk) = mix(h(w1..wk-1) ^ h(wk))
        else:
            ids, _, first = first_appearance(prefix[where] * vocab_size + word_ids[where + k])
            first = where[first]
            head = prefix[first]  # the (k)-gram each new n-gram extends by the word at first + k
            texts.append(pc.binary_join_element_wise(texts[-1].take(pa.array(head)),
                                                     flat_words.take(pa.array(first + k)),
                                                     pa.scalar(" ", pa.large_string())))
            hashes.append(_mix(hashes[-1][head] ^ word_hash[first + k]))
        gram = np.full(len(flat_words), -1, dtype=np.int64)
        gram[where] = ids
        prefix = gram
        occurrence_gram[block_start[owner[where], k] + in_caption[where]] = offset + ids
        offset += len(first)

    occurrence_caption = np.repeat(np.arange(len(lengths), dtype=np.int64), per_caption)
    return Occurrences(
        caption=occurrence_caption, gram=occurrence_gram,
        gram_order=np.repeat(np.arange(len(hashes), dtype=np.int64), [len(h) for h in hashes]),
        gram_hash=np.concatenate(hashes) if hashes else np.zeros(0, np.uint64),
        gram_text=pa.concat_arrays(texts) if texts else pa.array([], pa.large_string()),
        length=np.maximum(lengths - 1, 0))


def split_words(captions: Sequence[str]) -> tuple[pa.Array, np.ndarray]:
    """Every caption's words, flattened, and each caption's word count: Python's `str.split()` (Arrow's
    `utf8_split_whitespace` splits on the same characters, tested for every code point; it keeps the empty strings
    between two separators, which are dropped)."""
    pieces = pc.utf8_split_whitespace(pa.array(captions, pa.large_string()))
    flat = pieces.flatten()
    keep = pc.greater(pc.binary_length(flat), 0)
    owner = pc.list_parent_indices(pieces).to_numpy(zero_copy_only=False)
    kept_owner = owner[keep.to_numpy(zero_copy_only=False)]
    return flat.filter(keep), np.bincount(kept_owner, minlength=len(captions)).astype(np.int64)


def _words_by_first_appearance(word_ids: np.ndarray, vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`first_appearance(word_ids)`, free when the dictionary encoding numbered the words in order of first
    appearance (Arrow's does: its memo table numbers values as they come), checked."""
    first = _first_positions(word_ids)
    if len(first) == vocab:
        return word_ids, np.arange(vocab, dtype=np.int64), first
    return first_appearance(word_ids)


def _first_positions(codes: np.ndarray) -> np.ndarray:
    """Where each code first appears, for codes numbered in order of first appearance (0, 1, 2, ...): there a code
    is larger than every code before it."""
    is_first = np.ones(len(codes), dtype=bool)
    if len(codes) > 1:
        is_first[1:] = codes[1:] > np.maximum.accumulate(codes)[:-1]
    return np.flatnonzero(is_first)


def _dict_order_blocks(lengths: np.ndarray, orders: int) -> tuple[np.ndarray, np.ndarray]:
    """Where each caption's n-grams of each order start in pycocoevalcap's dict order (caption by caption, then
    order by order, then position), [C, orders], and each caption's number of n-gram occurrences."""
    per_order = np.maximum(lengths[:, None] - np.arange(orders)[None, :], 0)
    per_caption = per_order.sum(axis=1)
    caption_start = np.concatenate(([0], np.cumsum(per_caption)[:-1])) if len(lengths) else np.zeros(0, np.int64)
    within = np.cumsum(per_order, axis=1) - per_order
    return caption_start[:, None] + within, per_caption


def first_appearance(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes, distinct values, first positions): each key's number among the distinct keys, numbered in order of
    first appearance (a hash table, no sort), the distinct keys in that order and where each first appears."""
    encoded = pa.array(keys, pa.int64()).dictionary_encode()
    codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    values = encoded.dictionary.to_numpy(zero_copy_only=False)
    first = _first_positions(codes)
    if len(first) != len(values):  # Arrow numbered the keys in another order: number them by sorting instead
        values, first, codes = np.unique(keys, return_index=True, return_inverse=True)
        by_first = np.argsort(first, kind="stable")
        rank = np.empty_like(by_first)
        rank[by_first] = np.arange(len(by_first))
        values, first, codes = values[by_first], first[by_first], rank[codes.reshape(-1)]
    return codes, values, first


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
    found = occurrences([ref for sample_refs in refs for ref in sample_refs])
    grams = max(len(found.gram_order), 1)
    in_sample = pc.unique(pa.array(owner[found.caption] * grams + found.gram)).to_numpy()
    samples = np.bincount(in_sample % grams, minlength=len(found.gram_order)).astype(np.int64)
    ids = np.flatnonzero(samples)
    return found.gram_hash[ids], found.gram_text.take(pa.array(ids)), samples[ids]


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
    in_references = np.zeros(len(cooked.gram_order), dtype=bool)  # counted in the first pass: in the table
    in_references[cooked.pair_gram[cooked.pair_caption >= samples]] = True
    df = document_frequency(cooked.gram_hash, cooked.gram_text, in_references)
    weight = count.astype(np.float64) * (np.log(float(corpus_size)) - _log_df(df)[gram])
    captions = len(hyps) + len(ref_owner)
    norm = np.sqrt(_sums(caption * orders + order, libm_squares(weight), captions * orders)).reshape(captions, orders)
    dot = _clipped_dots(caption, gram, order, weight, samples, ref_owner, orders)

    hyp_norm, ref_norm = norm[ref_owner], norm[samples:]
    both = (hyp_norm != 0) & (ref_norm != 0)
    dot[both] /= hyp_norm[both] * ref_norm[both]
    delta = cooked.length[ref_owner] - cooked.length[samples:]
    dot *= _length_penalty(delta, sigma)[:, None]
    summed = np.zeros((samples, n))
    summed[:, :orders] = _sums((ref_owner[:, None] * orders + np.arange(orders)).ravel(), dot.ravel(),
                               samples * orders).reshape(samples, orders)
    return summed.mean(axis=1) / np.array([len(r) for r in refs], dtype=np.float64) * 10.0


def _clipped_dots(caption: np.ndarray, gram: np.ndarray, order: np.ndarray, weight: np.ndarray, samples: int,
                  ref_owner: np.ndarray, orders: int) -> np.ndarray:
    """[references, orders]: sum over the hypothesis' n-grams of min(hyp, ref) * ref weight, per reference and
    order, adding in pycocoevalcap's order (the hypothesis' n-grams in its dict order). Pairs are grouped by caption
    (hypotheses 0..samples-1 first, then the references), each caption's pairs in dict order."""
    hyp_pairs = int(np.searchsorted(caption, samples))
    hyp_bounds = np.searchsorted(caption[:hyp_pairs], np.arange(samples + 1))
    hyp_count = np.diff(hyp_bounds)
    # every (reference, n-gram of its hypothesis), reference by reference, in the hypothesis' dict order
    candidate_hyp = concat_ranges(hyp_bounds[ref_owner], hyp_count[ref_owner])
    candidate_ref = np.repeat(np.arange(len(ref_owner), dtype=np.int64), hyp_count[ref_owner])
    grams = int(gram.max()) + 1 if len(gram) else 1
    ref_keys = pa.array((caption[hyp_pairs:] - samples) * grams + gram[hyp_pairs:])
    at = pc.index_in(pa.array(candidate_ref * grams + gram[candidate_hyp]), value_set=ref_keys)
    matched = at.is_valid().to_numpy(zero_copy_only=False)
    ref_match = hyp_pairs + at.drop_null().to_numpy().astype(np.int64)
    hyp_match = candidate_hyp[matched]
    clipped = np.minimum(weight[hyp_match], weight[ref_match]) * weight[ref_match]
    bins = candidate_ref[matched] * orders + order[ref_match]
    return _sums(bins, clipped, len(ref_owner) * orders).reshape(len(ref_owner), orders)


def libm_squares(x: np.ndarray) -> np.ndarray:
    """`pow(w, 2)` of each float, as pycocoevalcap squares a weight for the norm: the C library's pow, which is not
    always the correctly rounded `w * w` (glibc: 869 in a million random floats differ in the last bit, enough to
    change a CIDEr score's last bit). `w * w` is computed with its exact rounding error (Dekker's product); where
    w² lies within 0.4 ULP of a rounding midpoint (or the product is a power of two, whose lower neighbour is
    nearer), a pow accurate to 0.6 ULP may round either way, so only there pow itself is called, per element: a fifth
    of the values. Elsewhere any pow within 0.6 ULP (glibc's: 0.52) returns `w * w`. CIDEr's weights take few
    distinct values (term frequency x a few document frequencies): each is squared once."""
    return _per_distinct(np.asarray(x, dtype=np.float64), _libm_squares_of)


def _libm_squares_of(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):  # a product that overflows is inf, as pow's
        product = x * x
        split = x * 134217729.0  # 2^27 + 1: Veltkamp's split of x into two halves of 26 bits
        high = split - (split - x)
        low = x - high
        error = ((high * high - product) + 2.0 * high * low) + low * low  # product + error == x² exactly
    mantissa, _ = np.frexp(product)
    hard = ((np.abs(error) > 0.4 * np.spacing(product)) | (mantissa == 0.5)) & np.isfinite(product)
    out = product.copy()
    where = np.flatnonzero(hard)
    out[where] = [value**2 for value in x[where].tolist()]
    return out


def _sums(index: np.ndarray, weights: np.ndarray, size: int) -> np.ndarray:
    """Per-bin sums, each adding its terms one after the other in the given order (np.bincount's loop)."""
    return np.bincount(index, weights=weights, minlength=size).astype(np.float64, copy=False)


def _log_df(df: np.ndarray) -> np.ndarray:
    """np.log(max(1.0, df)) per n-gram, one scalar log per distinct value (as pycocoevalcap takes it)."""
    return _per_distinct(np.asarray(df, dtype=np.int64),
                         lambda values: np.array([np.log(max(1.0, float(v))) for v in values.tolist()], np.float64))


def _length_penalty(delta: np.ndarray, sigma: float) -> np.ndarray:
    """pycocoevalcap's np.e**(-(delta**2)/(2*sigma**2)), one Python float power per distinct length difference."""
    return _per_distinct(np.asarray(delta, dtype=np.int64), lambda values: np.array(
        [np.e ** (-(float(d) ** 2) / (2 * sigma**2)) for d in values.tolist()], np.float64))


def _per_distinct(values: np.ndarray, compute: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """`compute` of each value, called once on the distinct values (Arrow's hash encoding: no sort): for the
    per-value scalar arithmetic that must be pycocoevalcap's own (logs, powers) over few distinct values."""
    encoded = pa.array(values).dictionary_encode()
    return compute(encoded.dictionary.to_numpy(zero_copy_only=False))[encoded.indices.to_numpy(zero_copy_only=False)]
