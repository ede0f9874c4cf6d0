"""as_loader, calibration_batch, iter_batches and data_identity over every accepted kind of data argument."""
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from prune_lab import data


@pytest.fixture(scope="module")
def bundle():
    return data.synthetic(n_train=50, n_test=20, input_shape=(1, 4, 4), num_classes=3, seed=0)


class PlainDataset(Dataset):
    """A map-style dataset without the in-memory fast path."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def _all(loader):
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def test_as_loader_on_a_bundle_picks_the_split(bundle):
    x, y = _all(data.as_loader(bundle, batch_size=8))
    assert x.shape == (20, 1, 4, 4) and torch.equal(y, bundle.test.labels)
    x, y = _all(data.as_loader(bundle, split="train", batch_size=8))
    assert x.shape == (50, 1, 4, 4) and torch.equal(x, bundle.train.images)


def test_as_loader_accepts_tuple_dataset_and_loader(bundle):
    x, y = bundle.test.images, bundle.test.labels
    loader = DataLoader(TensorDataset(x, y), batch_size=7)
    assert data.as_loader(loader) is loader
    for source in ((x, y), PlainDataset(x, y), TensorDataset(x, y)):
        xs, ys = _all(data.as_loader(source, batch_size=6))
        assert torch.equal(xs, x) and torch.equal(ys, y)


def test_shuffle_is_seeded(bundle):
    order = lambda seed: _all(data.as_loader(bundle, split="train", shuffle=True, seed=seed))[1]  # noqa: E731
    state = torch.get_rng_state()
    assert torch.equal(order(0), order(0))
    assert not torch.equal(order(0), order(1))
    assert torch.equal(state, torch.get_rng_state())


def test_bad_arguments_are_named(bundle):
    with pytest.raises(ValueError, match="split"):
        data.as_loader(bundle, split="valid")
    with pytest.raises(TypeError, match="data must be"):
        data.as_loader("digits")
    with pytest.raises(ValueError, match="batch_size"):
        data.as_loader(bundle, batch_size=0)
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="targets must have shape"):
        data.as_loader((x, torch.zeros(3, dtype=torch.long)))
    with pytest.raises(TypeError, match="integer class labels"):
        data.as_loader((x, torch.zeros(4)))
    with pytest.raises(ValueError, match="empty"):
        data.as_loader((torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ValueError, match="empty"):
        data.as_loader(PlainDataset(torch.zeros(0, 2), torch.zeros(0)))
    with pytest.raises(TypeError, match="two tensors"):
        data.as_loader((x,))


def test_calibration_batch_is_deterministic(bundle):
    x1, y1 = data.calibration_batch(bundle, n=16)
    x2, y2 = data.calibration_batch(bundle, n=16)
    x3, _ = data.calibration_batch(bundle, n=16, seed=1)
    assert x1.shape == (16, 1, 4, 4) and y1.shape == (16,) and y1.dtype == torch.int64
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    # the samples are real training samples, drawn without replacement
    rows = {tuple(r.tolist()) for r in bundle.train.images.reshape(50, -1)}
    assert len({tuple(r.tolist()) for r in x1.reshape(16, -1)} & rows) == 16


def test_calibration_batch_sources_agree(bundle):
    x, y = bundle.train.images, bundle.train.labels
    ref = data.calibration_batch(bundle, n=10)
    for source in ((x, y), PlainDataset(x, y), DataLoader(TensorDataset(x, y), batch_size=4), Subset(bundle.train, range(50))):
        got = data.calibration_batch(source, n=10)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert data.calibration_batch(bundle, n=10_000)[0].shape[0] == 50  # capped at the dataset size
    with pytest.raises(ValueError, match="n must be"):
        data.calibration_batch(bundle, n=0)


def test_iter_batches_matches_a_dataloader(bundle):
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    fast = list(data.iter_batches(bundle, batch_size=8, shuffle=True, generator=g1))
    slow = list(data.iter_batches(PlainDataset(bundle.train.images, bundle.train.labels), batch_size=8,
                                  shuffle=True, generator=g2))
    assert [b[0].shape[0] for b in fast] == [8] * 6 + [2]
    for (a, b), (c, d) in zip(fast, slow):
        assert torch.equal(a, c) and torch.equal(b, d)


def test_data_identity_is_a_content_hash(bundle):
    x, y = torch.arange(12.0).reshape(3, 4), torch.tensor([0, 1, 2])
    ident = data.data_identity((x, y))
    assert len(ident) == 32 and int(ident, 16) >= 0
    # a fixed value: sha256 of bytes is stable across processes and Python hash seeds
    assert ident == data.data_identity((x.clone(), y.clone())) == "1da09085346546e109ba18184bac747f"
    x2 = x.clone()
    x2[1, 2] += 1e-3
    assert data.data_identity((x2, y)) != ident
    assert data.data_identity((x, torch.tensor([0, 1, 1]))) != ident
    same = data.synthetic(n_train=50, n_test=20, input_shape=(1, 4, 4), num_classes=3, seed=0)
    assert data.data_identity(bundle) == data.data_identity(same)
    renamed = data.DataBundle("other", same.train, same.test, same.num_classes, same.input_shape)
    assert data.data_identity(renamed) != data.data_identity(bundle)
    plain = PlainDataset(bundle.test.images, bundle.test.labels)
    assert data.data_identity(plain) == data.data_identity(PlainDataset(bundle.test.images.clone(), bundle.test.labels))
    assert data.data_identity(DataLoader(bundle.test)) == data.data_identity(bundle.test)
    with pytest.raises(TypeError):
        data.data_identity(42)
