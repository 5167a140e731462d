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

# (hashes, n-gram ids -> texts, known to be in the table) -> corpus counts
DocumentFrequency = Callable[[np.ndarray, Callable[[np.ndarray], pa.Array], np.ndarray], np.ndarray]
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
    gram_texts: Callable[[np.ndarray], pa.Array]  # n-gram ids -> their texts, "w1 w2 ..." (`Occurrences.texts`)
    length: np.ndarray  # int64 [C]: pycocoevalcap's caption length, its number of bigrams


def cook(captions: Sequence[str], orders: int = COOKED_ORDERS) -> CookedCaptions:
    """Split on whitespace (as `precook`), intern the words and count every n-gram of order 1..`orders`: the
    (caption, n-gram) pairs numbered in order of first appearance, which is pycocoevalcap's dict order."""
    found = occurrences(captions, orders)
    first = first_in_groups(found, found.caption)
    is_first = first == np.arange(len(first))
    pair_of_first = np.cumsum(is_first) - 1
    pairs = np.flatnonzero(is_first)
    counts = np.bincount(pair_of_first[first], minlength=len(pairs)).astype(np.int64)
    return CookedCaptions(pair_caption=found.caption[pairs], pair_gram=found.gram[pairs], pair_count=counts,
                          gram_order=found.gram_order, gram_hash=found.gram_hash, gram_texts=found.texts,
                          length=found.length)


def first_in_groups(found: Occurrences, group: np.ndarray) -> np.ndarray:
    """For each occurrence, the first occurrence (in occurrence order) of the same n-gram in the same group
    (`group`: a number per occurrence, e.g. its caption or its sample). An n-gram can repeat in a group only where
    its (n-1)-gram prefix does (every occurrence of it has one of its prefix at the same place), so only those are
    interned by hash, order by order: all unigrams, then a few of the longer n-grams, rather than every occurrence."""
    first = np.arange(len(found.gram), dtype=np.int64)
    repeats = np.zeros(len(found.gram), dtype=bool)  # the occurrence's (group, n-gram) occurs more than once
    grams = max(len(found.gram_order), 1)
    for k, at in enumerate(found.by_order):
        if k:
            at = at[repeats[found.prefix[k - 1]]]
        if not len(at):
            break
        codes, _, first_at = first_appearance(group[at] * grams + found.gram[at])
        first[at] = at[first_at][codes]
        repeats[at] = np.bincount(codes)[codes] > 1
    return first


@dataclass
class Occurrences:
    """Every n-gram occurrence of a list of captions, in pycocoevalcap's dict order (caption by caption, then order
    by order, then position), and the distinct n-grams; n-gram ids are local to this list."""

    caption: np.ndarray  # int64 [O]
    gram: np.ndarray  # int64 [O]
    gram_order: np.ndarray  # int64 [G]
    gram_hash: np.ndarray  # uint64 [G]
    gram_start: np.ndarray  # int64 [G]: where in `words` each n-gram first starts
    words: pa.Array  # every caption's words, flattened
    length: np.ndarray  # int64 [C]: pycocoevalcap's caption length
    by_order: list[np.ndarray]  # per order k: the occurrences of k+1-grams, ascending
    prefix: list[np.ndarray]  # at k - 1 for order k > 0: the occurrence of each one's prefix (aligned with by_order[k])
    _spaced: SpacedWords | None = None  # built at the first `texts`

    def texts(self, grams: np.ndarray) -> pa.Array:
        """The texts of these n-grams, their words joined by a space (pycocoevalcap's tuple of words), built only
        for those asked: CIDEr's second pass compares the texts of about 2% of its n-grams."""
        if self._spaced is None:
            self._spaced = SpacedWords(self.words)
        return self._spaced.joined(self.gram_start[grams], self.gram_order[grams])


def occurrences(captions: Sequence[str], orders: int = COOKED_ORDERS) -> Occurrences:
    """No sort: words and n-grams are interned by hash (Arrow's dictionary encoding numbers them in order of first
    appearance) and each occurrence is put at its place in the dict order directly. An n-gram's text and hash
    extend its (n-1)-gram prefix's by one word."""
    flat_words, lengths = split_words(captions)
    interned = flat_words.dictionary_encode()
    word_ids = interned.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    vocab_size = max(len(interned.dictionary), 1)
    caption_length = np.repeat(lengths, lengths)
    per_caption = _occurrences_per_caption(lengths, orders)
    # the occurrence of each position's unigram: its caption's first slot plus its position in the caption; the
    # k-gram starting there is k x (caption length) - k(k-1)/2 slots further (after the caption's shorter n-grams)
    slot = (np.repeat(np.cumsum(per_caption) - per_caption - np.cumsum(lengths) + lengths, lengths)
            + np.arange(len(flat_words), dtype=np.int64))

    dictionary_hash = text_hashes(interned.dictionary)
    occurrence_gram = np.empty(int(per_caption.sum()), dtype=np.int64)
    starts: list[np.ndarray] = []
    hashes: list[np.ndarray] = []
    by_order: list[np.ndarray] = []
    prefix_at: list[np.ndarray] = []
    position = np.arange(len(flat_words), dtype=np.int64)  # where an n-gram of the current order starts
    room = np.repeat(np.cumsum(lengths), lengths) - position  # words from there to its caption's end
    ids = word_ids  # the id (within its order) of each of those n-grams
    offset = 0
    for k in range(orders):
        if k == 0:
            ids, values, first = _words_by_first_appearance(word_ids, len(interned.dictionary))
            starts.append(first)
            hashes.append(_mix(dictionary_hash[values]))  # chained: h(w1..wk) = mix(h(w1..wk-1) ^ h(wk))
        else:
            fits = room > k  # the n-gram ends in its caption
            position, room, prefix_ids = position[fits], room[fits], ids[fits]
            slot, caption_length = slot[fits], caption_length[fits]
            last_word = position + k
            ids, _, first = first_appearance(prefix_ids * vocab_size + word_ids[last_word])
            head = prefix_ids[first]  # the k-gram each new n-gram extends by one word
            starts.append(position[first])
            hashes.append(_mix(hashes[-1][head] ^ dictionary_hash[word_ids[last_word[first]]]))
            prefix_at.append(slot)
            slot = slot + caption_length - (k - 1)
        occurrence_gram[slot] = offset + ids
        by_order.append(slot)
        offset += len(hashes[-1])

    occurrence_caption = np.repeat(np.arange(len(lengths), dtype=np.int64), per_caption)
    return Occurrences(
        caption=occurrence_caption, gram=occurrence_gram,
        gram_order=np.repeat(np.arange(len(hashes), dtype=np.int64), [len(h) for h in hashes]),
        gram_hash=np.concatenate(hashes) if hashes else np.zeros(0, np.uint64),
        gram_start=np.concatenate(starts) if starts else np.zeros(0, np.int64), words=flat_words,
        length=np.maximum(lengths - 1, 0), by_order=by_order, prefix=prefix_at)


class SpacedWords:
    """Words laid out with one space after each: the words of an n-gram are then one stretch of bytes, so its text
    ("w1 w2 ...", pycocoevalcap's tuple of words joined) is a slice, and many texts are one numpy gather (Arrow's
    takes and joins, one per word of the longest n-gram, cost 10% of CIDEr)."""

    def __init__(self, words: pa.Array) -> None:
        words = words.cast(pa.large_string())
        offsets = np.frombuffer(words.buffers()[1], dtype=np.int64)[words.offset : words.offset + len(words) + 1]
        data = words.buffers()[2]
        data = np.frombuffer(data, np.uint8)[offsets[0] : offsets[-1]] if data is not None else np.zeros(0, np.uint8)
        self.lengths = np.diff(offsets)
        self.starts = offsets[:-1] - offsets[0] + np.arange(len(words), dtype=np.int64)  # each word's first byte
        self.bytes = np.full(len(data) + len(words), ord(" "), dtype=np.uint8)
        self.bytes[np.repeat(np.arange(len(words), dtype=np.int64), self.lengths) + np.arange(len(data))] = data

    def joined(self, start: np.ndarray, order: np.ndarray) -> pa.Array:
        """For each (start, order): words[start], ..., words[start + order] joined by a space."""
        start = np.asarray(start, dtype=np.int64)
        last = start + np.asarray(order, dtype=np.int64)
        begin = self.starts[start]
        text_length = self.starts[last] + self.lengths[last] - begin
        text_offsets = np.zeros(len(start) + 1, dtype=np.int64)
        np.cumsum(text_length, out=text_offsets[1:])
        gather = np.repeat(begin - text_offsets[:-1], text_length) + np.arange(int(text_offsets[-1]), dtype=np.int64)
        return pa.LargeStringArray.from_buffers(len(start), pa.py_buffer(text_offsets), pa.py_buffer(self.bytes[gather]))


def split_words(captions: Sequence[str]) -> tuple[pa.Array, np.ndarray]:
    """Every caption's words, flattened, and each caption's word count: Python's `str.split()` (the characters
    for which `str.isspace()` holds separate words; tested for every code point), by a scan of the UTF-8 bytes.

    Not Arrow's `utf8_split_whitespace`: in pyarrow 26 it reads past the end of the values buffer, and a last
    string that ends in whitespace, in a buffer of exactly 64 bytes, kept its trailing space ("x ... bé ") when the
    byte after the buffer was 0x80 or above: a word that differs from run to run."""
    texts = pa.array(captions, pa.large_string())
    offsets = np.frombuffer(texts.buffers()[1], dtype=np.int64)[: len(texts) + 1]
    data = texts.buffers()[2]
    data = np.frombuffer(data, np.uint8)[offsets[0] : offsets[-1]] if data is not None else np.zeros(0, np.uint8)
    offsets = offsets - offsets[0]
    in_word = ~_space_bytes(data)
    caption_start = np.zeros(len(data) + 1, dtype=bool)
    caption_start[offsets] = True
    begins, ends = in_word.copy(), in_word.copy()
    begins[1:] &= ~in_word[:-1] | caption_start[1:-1]  # a word byte after a space or at its caption's start
    ends[:-1] &= ~in_word[1:] | caption_start[1:-1]
    begin_at = np.flatnonzero(begins)
    kept_before = np.cumsum(in_word) - in_word  # where each byte goes once the spaces are dropped
    word_offsets = np.append(kept_before[begin_at], np.count_nonzero(in_word)).astype(np.int64)
    words = pa.LargeStringArray.from_buffers(len(begin_at), pa.py_buffer(word_offsets), pa.py_buffer(data[in_word]))
    owner = np.searchsorted(offsets, begin_at, side="right") - 1
    return words, np.bincount(owner, minlength=len(captions)).astype(np.int64)


# the UTF-8 encodings of the characters for which str.isspace() holds
_ONE_BYTE_SPACES = np.zeros(256, dtype=bool)
_ONE_BYTE_SPACES[list(b"\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f ")] = True
_TWO_BYTE_SPACES = np.array([0xC285, 0xC2A0])  # U+0085, U+00A0
_THREE_BYTE_SPACES = np.array([0xE19A80, *range(0xE28080, 0xE2808B), 0xE280A8, 0xE280A9, 0xE280AF, 0xE2819F,
                               0xE38080])  # U+1680, U+2000-200A, U+2028, U+2029, U+202F, U+205F, U+3000


def _space_bytes(data: np.ndarray) -> np.ndarray:
    """Marks every byte of a whitespace character. A UTF-8 lead byte never occurs inside another character, so a
    match that starts at a lead byte is that character."""
    space = _ONE_BYTE_SPACES[data]
    padded = np.concatenate([data, np.zeros(2, np.uint8)]).astype(np.int64)
    for lead, width, codes in ((0xC2, 2, _TWO_BYTE_SPACES), (0xE1, 3, _THREE_BYTE_SPACES),
                               (0xE2, 3, _THREE_BYTE_SPACES), (0xE3, 3, _THREE_BYTE_SPACES)):
        at = np.flatnonzero(data == lead)
        code = padded[at]
        for k in range(1, width):
            code = (code << 8) | padded[at + k]
        at = at[np.isin(code, codes)]
        for k in range(width):
            space[at + k] = True
    return space


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


def _occurrences_per_caption(lengths: np.ndarray, orders: int) -> np.ndarray:
    """Each caption's number of n-gram occurrences of orders 1..`orders`."""
    return np.maximum(lengths[:, None] - np.arange(orders)[None, :], 0).sum(axis=1)


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
    return found.gram_hash[ids], found.texts(ids), samples[ids]


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
    df = document_frequency(cooked.gram_hash, cooked.gram_texts, in_references)
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
    (hypotheses 0..samples-1 first, then the references), each caption's pairs in dict order. Each reference pair
    finds its hypothesis' pair of the same n-gram by a binary search among the hypotheses' (sample, n-gram) keys;
    the n-grams a reference does not share add nothing."""
    hyp_pairs = int(np.searchsorted(caption, samples))
    out = np.zeros(len(ref_owner) * orders)
    if not hyp_pairs or hyp_pairs == len(caption):
        return out.reshape(len(ref_owner), orders)
    grams = int(gram.max()) + 1
    hyp_keys = caption[:hyp_pairs] * grams + gram[:hyp_pairs]
    by_key = np.argsort(hyp_keys)
    sorted_keys = hyp_keys[by_key]
    ref = caption[hyp_pairs:] - samples
    ref_keys = ref_owner[ref] * grams + gram[hyp_pairs:]
    at = np.minimum(np.searchsorted(sorted_keys, ref_keys), hyp_pairs - 1)
    matched = np.flatnonzero(sorted_keys[at] == ref_keys)
    ref_of, hyp_match = ref[matched], by_key[at[matched]]
    in_hyp_order = np.argsort(ref_of * hyp_pairs + hyp_match)  # reference by reference, hypothesis dict order
    ref_of, hyp_match, ref_match = ref_of[in_hyp_order], hyp_match[in_hyp_order], hyp_pairs + matched[in_hyp_order]
    clipped = np.minimum(weight[hyp_match], weight[ref_match]) * weight[ref_match]
    return _sums(ref_of * orders + order[ref_match], clipped, len(ref_owner) * orders).reshape(len(ref_owner), orders)


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
