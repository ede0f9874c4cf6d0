"""footprint: every number checked against a hand computation on hand-made masks."""
import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

import prune_lab as pl
from prune_lab.analysis.footprint import footprint
from tests.conftest import TiedLinears, assert_state_equal, state_copy

B = torch.bool


def _chain():
    net = nn.Sequential(nn.Linear(4, 3, bias=False), nn.ReLU(), nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, -2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [0.5, 0.5, 0.5, 0.5]]))
        net[2].weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    masks = {
        "0.weight": torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=B),  # unit 1 receives nothing
        "2.weight": torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=B),  # unit 2 feeds nothing
    }
    return net, masks


def test_linear_chain_by_hand():
    net, masks = _chain()
    before = state_copy(net)
    df = footprint(net, masks).set_index("layer")
    l1, l2, tot = df.loc["0.weight"], df.loc["2.weight"], df.loc["(model)"]
    # counts and sparsities
    assert (l1.params, l1.kept, l1.effective_kept) == (12, 4, 3)  # W1[2,1] feeds unit 2, which reaches nothing
    assert (l2.params, l2.kept, l2.effective_kept) == (6, 2, 1)  # W2[0,1] reads the dead unit 1
    assert l1.nominal_sparsity == pytest.approx(8 / 12) and l1.effective_sparsity == pytest.approx(9 / 12)
    assert tot.nominal_sparsity == pytest.approx(12 / 18) and tot.effective_sparsity == pytest.approx(14 / 18)
    # bytes (float32): dense n·4; bitmask k·4 + ⌈n/8⌉; CSR k·4 + 4k + 4(out+1); 2:4 (n₄/2)·4 + ⌈n₄/8⌉
    assert (l1.bytes_dense, l1.bytes_bitmask, l1.bytes_csr, l1.bytes_2_4) == (48, 18, 48, 26)
    assert (l2.bytes_dense, l2.bytes_bitmask, l2.bytes_csr, l2.bytes_2_4) == (24, 9, 28, 17)  # in 3 → padded 4
    assert (tot.bytes_dense, tot.bytes_bitmask, tot.bytes_csr, tot.bytes_2_4) == (72, 27, 76, 43)
    # multiply-adds per sample (a Linear on (B, in): one position)
    assert (l1.macs_dense, l1.macs_sparse, l1.macs_effective) == (12, 4, 3)
    assert (tot.macs_dense, tot.macs_sparse, tot.macs_effective) == (18, 6, 4)
    # 2:4: row 0 of W1 keeps 3 of 4; projecting drops |1| (the smallest kept)
    assert l1.compliance_2_4 == pytest.approx(2 / 3) and l2.compliance_2_4 == 1.0
    assert tot.compliance_2_4 == pytest.approx(4 / 5)
    assert l1.extra_frobenius_2_4 == pytest.approx(1.0) and l2.extra_frobenius_2_4 == 0.0
    assert l1.relative_extra_frobenius_2_4 == pytest.approx(1.0 / net[0].weight.norm().item())
    assert tot.extra_frobenius_2_4 == pytest.approx(1.0)
    # labelled as computed
    assert set(df["basis"]) == {"computed"} and "computed, not measured" in df.attrs["note"]
    assert_state_equal(net, before)


def test_conv_flatten_linear_positions_and_dead_channels():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 2)).train()
    conv = torch.ones(3, 2, 3, 3, dtype=B)
    conv[1] = False  # channel 1 receives nothing: linear features 16..31 are dead
    lin = torch.ones(2, 48, dtype=B)
    lin[:, 32:] = False  # channel 2 is read by nobody: its filter is dead
    before = state_copy(net)
    df = footprint(net, {"0.weight": conv, "3.weight": lin}, input_shape=(2, 4, 4)).set_index("layer")
    c, f = df.loc["0.weight"], df.loc["3.weight"]
    assert (c.kept, c.effective_kept, f.kept, f.effective_kept) == (36, 18, 64, 32)
    assert (c.macs_dense, c.macs_sparse, c.macs_effective) == (54 * 16, 36 * 16, 18 * 16)  # 4×4 output positions
    assert (f.macs_dense, f.macs_sparse) == (96, 64)
    # 2 input channels per tap, padded to groups of 4: 27 groups, all compliant, nothing to project
    assert c.compliance_2_4 == 1.0 and c.extra_frobenius_2_4 == 0.0
    assert c.bytes_2_4 == 27 * 4 // 2 * 4 + math.ceil(27 * 4 / 8)
    assert c.bytes_csr == 36 * 4 + 4 * 36 + 4 * (3 + 1)
    assert_state_equal(net, before)
    assert net.training  # the model's mode is untouched (shapes are recorded on a copy)
    nan = footprint(net, {"0.weight": conv, "3.weight": lin})
    assert np.isnan(nan["macs_dense"]).all() and "input_shape" in nan.attrs["note"]


class _Residual(nn.Module):
    def __init__(self, skip: bool):
        super().__init__()
        self.skip = skip
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.fc1(x)
        y = torch.relu(self.fc2(h))
        return self.fc3(y + h if self.skip else y)


@pytest.mark.parametrize("skip, fc1_effective", [(True, 16), (False, 0)])
def test_residual_join_keeps_units_alive(skip, fc1_effective):
    torch.manual_seed(0)
    net = _Residual(skip)
    masks = {"fc1.weight": torch.ones(4, 4, dtype=B), "fc2.weight": torch.zeros(4, 4, dtype=B),
             "fc3.weight": torch.ones(2, 4, dtype=B)}
    df = footprint(net, masks).set_index("layer")
    assert df.loc["fc1.weight", "effective_kept"] == fc1_effective
    assert df.loc["fc3.weight", "effective_kept"] == (8 if skip else 0)


def test_prune_result_and_updated_weights(mlp):
    res = pl.prune(mlp, "lamp", 0.6)
    df = footprint(mlp, res).set_index("layer")
    for n, s in res.layer_sparsity.items():
        assert df.loc[n, "nominal_sparsity"] == pytest.approx(s)
    assert df.loc["(model)", "nominal_sparsity"] == pytest.approx(res.sparsity)
    assert (df["effective_sparsity"] >= df["nominal_sparsity"] - 1e-12).all()
    # with updated weights, the 2:4 distortion is measured on them
    new = {n: torch.full_like(p, 2.0) for n, p in pl.prunable_parameters(mlp).items()}
    upd = dataclasses.replace(res, weights=new, _masks=res.masks, _mask_builder=None)
    d2 = footprint(mlp, upd).set_index("layer")
    m = res.masks["0.weight"]
    groups = torch.nn.functional.pad(m.float(), (0, 2)).reshape(-1, 4).sum(1)  # in = 6 → padded to 8
    want = math.sqrt(float((groups - 2).clamp_min(0).sum()) * 4.0)
    assert d2.loc["0.weight", "extra_frobenius_2_4"] == pytest.approx(want)


def test_masks_of_another_model(mlp, convnet):
    with pytest.raises(ValueError, match="'c1.weight' is not one of its Linear/Conv weights"):
        footprint(mlp, pl.prune(convnet, "magnitude", 0.5, device="cpu"))
    with pytest.raises(ValueError, match=r"mask of '0.weight' has shape \(2, 2\)"):
        footprint(mlp, {"0.weight": torch.ones(2, 2, dtype=B)})
    with pytest.raises(ValueError, match="input_shape"):
        footprint(mlp, pl.prune(mlp, "magnitude", 0.5), input_shape=(7,))


def test_tied_weights_counted_at_each_use():
    masks = {"a.weight": torch.ones(4, 4, dtype=B), "c.weight": torch.ones(2, 4, dtype=B)}
    df = footprint(TiedLinears(), masks, input_shape=(4,)).set_index("layer")
    assert df.loc["a.weight", "params"] == 16  # stored once
    assert df.loc["a.weight", "macs_dense"] == 32  # run twice per sample
    assert df.loc["(model)", "macs_dense"] == 40
