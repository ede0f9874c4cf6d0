"""Token data for causal LMs: accepted forms, validation, identity, calibration batches."""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers import BatchEncoding

import prune_lab as pl
from prune_lab.data import TokenBatches, calibration_batch, data_identity, iter_batches, token_bundle, tokens


def test_tensor_is_batched_in_order():
    ids = torch.arange(5 * 4).reshape(5, 4)
    tb = tokens(ids, batch_size=2)
    assert isinstance(tb, TokenBatches) and len(tb) == 5 and tb.seq_len == 4 and tb.n_tokens == 20
    got = list(tb.batches())
    assert [b[0].shape[0] for b in got] == [2, 2, 1]
    assert torch.equal(torch.cat([b[0] for b in got]), ids)
    assert all(bool(m.all()) for _, m in got) and not tb.padded
    assert pl.data.tokens is tokens and pl.data.TokenBatches is TokenBatches


def test_batches_of_different_lengths_are_right_padded():
    tb = tokens([torch.tensor([[1, 2, 3]]), torch.tensor([[4, 5], [6, 7]])], pad_id=9)
    assert tb.input_ids.tolist() == [[1, 2, 3], [4, 5, 9], [6, 7, 9]]
    assert tb.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0], [1, 1, 0]]
    assert tb.padded and tb.n_tokens == 7


def test_tokenizer_outputs_and_dataloaders():
    enc = BatchEncoding({"input_ids": torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]]),
                         "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])})
    tb = tokens(enc)
    assert tb.attention_mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]] and tb.n_tokens == 5
    # the batch is trimmed of padding-only columns
    ids, mask = tb.batch(slice(1, 2))
    assert ids.tolist() == [[8, 9]] and mask.tolist() == [[1, 1]]
    # tokenizer output without return_tensors: ragged python lists
    tb = tokens({"input_ids": [[1, 2, 3], [4, 5]]})
    assert tb.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    # a DataLoader over a TensorDataset yields [ids] lists
    loader = DataLoader(TensorDataset(torch.arange(12).reshape(6, 2)), batch_size=4)
    assert tokens(loader).input_ids.tolist() == torch.arange(12).reshape(6, 2).tolist()
    # a generator of dicts
    assert len(tokens({"input_ids": torch.ones(2, 3, dtype=torch.long)} for _ in range(3))) == 6


@pytest.mark.parametrize("bad, exc, match", [
    (torch.rand(2, 5), TypeError, "integer token ids.*float32"),
    (torch.ones(2, 5, dtype=torch.bool), TypeError, "integer token ids.*bool"),
    (torch.arange(6), ValueError, r"\(n_sequences, seq_len\), got \(6,\).*unsqueeze\(0\)"),
    (torch.zeros(0, 4, dtype=torch.long), ValueError, "empty"),
    (torch.zeros(3, 1, dtype=torch.long), ValueError, "at least 2 tokens"),
    (torch.tensor([[1, -2, 3]]), ValueError, "negative"),
    ([1, 2, 3], ValueError, "flat list of 3 token ids"),
    ([], ValueError, "empty"),
    ("some text", TypeError, "tensor.*got str"),
    ({"ids": torch.ones(1, 3, dtype=torch.long)}, ValueError, "'input_ids'"),
])
def test_bad_token_data_is_named(bad, exc, match):
    with pytest.raises(exc, match=match):
        tokens(bad)


def test_bad_options_and_vocabulary():
    ids = torch.tensor([[1, 2, 130]])
    with pytest.raises(ValueError, match="up to 130 but.*vocabulary of 128"):
        tokens(ids, vocab_size=128)
    with pytest.raises(ValueError, match="batch_size"):
        tokens(ids, batch_size=0)
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        tokens(ids, attention_mask=torch.ones(1, 2))
    with pytest.raises(ValueError, match="all padding"):
        tokens(torch.ones(2, 3, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 1], [0, 0, 0]]))
    # padding ids beyond the vocabulary do not count: only real tokens are checked
    tb = tokens(torch.tensor([[1, 2, 999]]), attention_mask=torch.tensor([[1, 1, 0]]), vocab_size=128)
    assert tb.max_id == 2


def test_identity_follows_content_not_batching():
    a = torch.randint(0, 50, (6, 8), generator=torch.Generator().manual_seed(0))
    b = a.clone()
    b[3, 4] += 1
    assert data_identity(tokens(a, batch_size=2)) == data_identity(tokens(a.clone(), batch_size=5))
    assert data_identity(tokens(a)) != data_identity(tokens(b))
    masked = torch.ones_like(a)
    masked[0, -1] = 0
    assert data_identity(tokens(a)) != data_identity(tokens(a, attention_mask=masked))
    assert data_identity(token_bundle(a, b)) != data_identity(token_bundle(b, a))


def test_calibration_batch_is_a_seeded_sample_of_ids_and_mask():
    a = torch.randint(0, 50, (10, 6), generator=torch.Generator().manual_seed(1))
    tb = tokens(a)
    ids, mask = calibration_batch(tb, n=4)
    assert ids.shape == (4, 6) and ids.dtype == torch.int64 and bool(mask.all())
    assert torch.equal(ids, calibration_batch(tb, n=4)[0])
    rows = {tuple(r) for r in a.tolist()}
    assert all(tuple(r) in rows for r in ids.tolist())
    assert calibration_batch(tb, n=100)[0].shape == (10, 6)  # capped at the data
    assert [x.shape[0] for x, _ in iter_batches(tb, batch_size=4)] == [4, 4, 2]


def test_bundle_keeps_calibration_and_evaluation_apart():
    train, test = torch.randint(0, 40, (8, 5)), torch.randint(0, 40, (3, 7))
    b = token_bundle(train, test, vocab_size=40)
    assert b.num_classes == 40 and b.input_shape == (5,)
    assert pl.data.as_tokens(b, "train").input_ids.shape == (8, 5)
    assert pl.data.as_tokens(b, "test").input_ids.shape == (3, 7)
    assert calibration_batch(b, n=8)[0].shape == (8, 5)


def test_raw_int_tensors_point_to_the_wrapper():
    with pytest.raises(TypeError, match=r"prune_lab.data.tokens\(ids\)"):
        pl.data.resolve_dataset(torch.ones(2, 3, dtype=torch.long))
