"""reduce_logits against a brute-force numpy computation of the same thing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spilleval.batch import IGNORE_INDEX
from spilleval.reduce import NonFiniteLogitsError, reduce_logits


def brute_force(logits: torch.Tensor, labels: torch.Tensor, *, shift: bool):
    """Per sample: (pred ids, label ids, label log-probs) at supervised positions, in numpy float64."""
    x = logits.float().numpy().astype(np.float64)  # bf16/fp16 -> float32 is exact
    y = labels.numpy()
    if shift:
        x, y = x[:, :-1], y[:, 1:]
    rows = []
    for b in range(x.shape[0]):
        keep = y[b] != IGNORE_INDEX
        xs, ys = x[b][keep], y[b][keep]
        top = xs.max(axis=-1, keepdims=True) if len(xs) else np.zeros((0, 1))
        log_softmax = xs - top - np.log(np.exp(xs - top).sum(axis=-1, keepdims=True))
        rows.append((xs.argmax(axis=-1), ys, log_softmax[np.arange(len(ys)), ys]))
    return rows


def random_labels(gen: torch.Generator, shape, vocab: int, p_masked: float = 0.3) -> torch.Tensor:
    labels = torch.randint(0, vocab, shape, generator=gen)
    masked = torch.rand(shape, generator=gen) < p_masked
    return labels.masked_fill(masked, IGNORE_INDEX)


def check_against_brute_force(logits, labels, *, shift, keep_logprob=False, sample_index=None, **kwargs):
    host = reduce_logits(logits, labels, shift=shift, keep_logprob=keep_logprob, sample_index=sample_index,
                         **kwargs).to_host()
    expected = brute_force(logits, labels, shift=shift)
    assert len(host) == logits.shape[0]
    want_index = np.arange(logits.shape[0]) if sample_index is None else np.asarray(sample_index)
    np.testing.assert_array_equal(host.sample_index, want_index)
    np.testing.assert_array_equal(host.lengths, [len(p) for p, _, _ in expected])
    for i, (pred, label, logprob) in enumerate(expected):
        got_pred, got_label = host.row(i)
        np.testing.assert_array_equal(got_pred, pred)
        np.testing.assert_array_equal(got_label, label)
        if keep_logprob:
            np.testing.assert_allclose(host.logprob_row(i), logprob, rtol=1e-5, atol=1e-5)
    if keep_logprob:
        all_logprob = np.concatenate([lp for _, _, lp in expected]) if expected else np.zeros(0)
        reduced = reduce_logits(logits, labels, shift=shift, keep_logprob=True, **kwargs)
        np.testing.assert_allclose(float(reduced.loss_sum), -all_logprob.sum(), rtol=1e-5, atol=1e-4)
    else:
        assert host.label_logprob is None
    return host


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shift", [True, False])
def test_matches_brute_force(dtype, shift):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 17, 300, generator=gen).to(dtype)
    labels = random_labels(gen, (5, 17), 300)
    check_against_brute_force(logits, labels, shift=shift, keep_logprob=True, sample_index=[10, 3, 7, 8, 100])


def test_bf16_ties_take_the_first_maximum_like_numpy():
    """bf16 has 8 mantissa bits, so the maximum is often tied; argmax must pick the first like numpy."""
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(4, 9, 64, generator=gen) * 2).round().to(torch.bfloat16)  # many exact ties
    labels = random_labels(gen, (4, 9), 64, p_masked=0.0)
    ties = (logits.float() == logits.float().max(-1, keepdim=True).values).sum(-1)
    assert int((ties > 1).sum()) > 10
    check_against_brute_force(logits, labels, shift=True)


def test_argmax_runs_in_the_logits_dtype_without_a_float32_copy():
    """A bf16 tie broken in float32 would differ: values equal in bf16 but distinct before rounding."""
    logits = torch.zeros(1, 2, 4, dtype=torch.bfloat16)
    logits[0, 0, 1] = 1.0
    logits[0, 0, 2] = 1.001  # rounds to 1.0 in bf16: a tie, so index 1 wins
    host = reduce_logits(logits, torch.tensor([[0, 2]]), shift=True).to_host()
    assert host.pred_ids.tolist() == [1]


def test_keep_logprob_equals_numpy_log_softmax_in_small_sequence_chunks():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 40, 128, generator=gen) * 5
    labels = random_labels(gen, (3, 40), 128)
    # chunk_bytes forces one or two sequence positions per chunk: exercises the chunked log-softmax
    for chunk_bytes in (1, 3 * 128 * 4 * 2, 10**9):
        check_against_brute_force(logits, labels, shift=True, keep_logprob=True, chunk_bytes=chunk_bytes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_label_logprobs_are_cross_entropy_bit_for_bit(dtype):
    """The per-token values `nll` and `loss_percentiles` sum and rank: the same float32 numbers as `cross_entropy`
    (gather - logsumexp differed by one ulp on ~23% of tokens on the CPU)."""
    gen = torch.Generator().manual_seed(4)
    logits = (torch.randn(4, 33, 301, generator=gen) * 3).to(dtype)
    labels = random_labels(gen, (4, 33), 301)
    for chunk_bytes in (4000, 10**9):
        reduced = reduce_logits(logits, labels, shift=True, keep_logprob=True, chunk_bytes=chunk_bytes)
        shifted = labels[:, 1:]
        expected = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, 301), shifted.reshape(-1), reduction="none").reshape(shifted.shape)
        mask = shifted != IGNORE_INDEX
        assert torch.equal(-reduced.label_logprob[mask], expected[mask])


def test_rows_with_all_labels_masked_are_empty_not_dropped():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 6, 50, generator=gen)
    labels = random_labels(gen, (4, 6), 50, p_masked=0.0)
    labels[1] = IGNORE_INDEX
    labels[3, 1:] = IGNORE_INDEX  # only the unshifted first position supervised: nothing after the shift
    host = check_against_brute_force(logits, labels, shift=True, keep_logprob=True)
    assert host.lengths.tolist() == [5, 0, 5, 0]


def test_everything_masked_and_nan_at_unsupervised_positions_is_fine():
    logits = torch.randn(2, 5, 20)
    logits[0, 2] = float("nan")  # padding garbage: not supervised, must not raise
    labels = torch.full((2, 5), IGNORE_INDEX)
    host = reduce_logits(logits, labels, keep_logprob=True).to_host()
    assert host.num_tokens == 0 and host.lengths.tolist() == [0, 0]
    assert host.label_logprob is not None and len(host.label_logprob) == 0


@pytest.mark.parametrize("shape", [(0, 5), (0, 1), (3, 1), (2, 0)])
@pytest.mark.parametrize("shift", [True, False])
def test_empty_batches(shape, shift):
    batch, length = shape
    logits = torch.randn(batch, length, 11)
    labels = torch.randint(0, 11, (batch, length))
    host = check_against_brute_force(logits, labels, shift=shift, keep_logprob=True)
    assert host.num_tokens == batch * max(0, length - int(shift))


@pytest.mark.parametrize("vocab, dtype", [(65_535, np.uint16), (65_536, np.uint32)])
def test_id_dtype_switches_above_65535(vocab, dtype):
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, vocab, generator=gen, dtype=torch.bfloat16)
    logits[0, 0, vocab - 1] = 100.0  # the largest id is predicted and must survive the narrowing
    labels = torch.tensor([[0, vocab - 1, 7], [vocab - 1, 5, IGNORE_INDEX]])
    host = check_against_brute_force(logits, labels, shift=True)
    assert host.pred_ids.dtype == dtype and host.label_ids.dtype == dtype
    assert host.pred_ids[0] == vocab - 1 and host.label_ids[0] == vocab - 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_raise_naming_the_sample(dtype, bad):
    logits = torch.randn(3, 4, 10).to(dtype)
    logits[1, 2, 5] = bad
    labels = torch.randint(0, 10, (3, 4))
    reduced = reduce_logits(logits, labels, sample_index=[40, 41, 42])  # on the device: nothing checked yet
    with pytest.raises(NonFiniteLogitsError, match=r"sample\(s\) 41\b"):
        reduced.to_host()


def test_all_minus_inf_row_raises_but_partial_minus_inf_masking_is_legal():
    logits = torch.randn(2, 3, 10)
    logits[0, 0, :5] = float("-inf")  # e.g. constrained decoding masks: legal
    labels = torch.randint(5, 10, (2, 3))
    check_against_brute_force(logits, labels, shift=True, keep_logprob=True)
    logits[1, 1, :] = float("-inf")
    with pytest.raises(NonFiniteLogitsError, match=r"sample\(s\) 1\b"):
        reduce_logits(logits, labels).to_host()


@pytest.mark.parametrize("label_shape", [(2, 5), (2, 7), (3, 6), (2, 6, 1)])
def test_misaligned_labels_raise_with_a_fix(label_shape):
    logits = torch.randn(2, 6, 10)
    with pytest.raises(ValueError, match="do not line up with logits.*label_fn"):
        reduce_logits(logits, torch.zeros(label_shape, dtype=torch.long))


@pytest.mark.parametrize("bad_label", [10, -1, -7])
def test_label_ids_out_of_range_raise(bad_label):
    labels = torch.zeros(2, 4, dtype=torch.long)
    labels[1, 2] = bad_label
    reduced = reduce_logits(torch.randn(2, 4, 10), labels)  # the gather is clamped: no out-of-bounds access
    with pytest.raises(ValueError, match="label id out of range"):
        reduced.to_host()


def test_sample_index_length_must_match_batch():
    with pytest.raises(ValueError, match="sample_index has 2 entries for a batch of 3"):
        reduce_logits(torch.randn(3, 4, 10), torch.zeros(3, 4, dtype=torch.long), sample_index=[0, 1])
