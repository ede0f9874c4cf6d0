import pytest
import torch

import prune_lab as pl
from prune_lab.analysis import layer_table, mask_overlap, sanity_checks, score_rank_correlation


def test_mask_overlap_by_hand():
    a = {"x": torch.tensor([[True, True], [False, False]]), "y": torch.tensor([True, False, True])}
    b = {"x": torch.tensor([[True, False], [True, False]]), "y": torch.tensor([True, False, True])}
    df = mask_overlap(a, b).set_index("layer")
    assert df.loc["x", "jaccard"] == pytest.approx(1 / 3) and df.loc["x", "exactly_one"] == pytest.approx(0.5)
    assert df.loc["y", "jaccard"] == 1.0 and df.loc["y", "exactly_one"] == 0.0
    assert df.loc["(model)", "jaccard"] == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="different layers"):
        mask_overlap(a, {"x": a["x"]})


def test_layer_table_and_rank_correlation(mlp):
    s = pl.PruneSession(mlp)
    t = layer_table([s.prune("lamp", 0.8), s.prune("magnitude", 0.8)])
    assert len(t) == 6 and set(t.method) == {"lamp", "magnitude"}
    assert t[t.method == "magnitude"]["sparsity"].round(1).tolist() == [0.8, 0.8, 0.8]
    c = score_rank_correlation(s, ["magnitude", "lamp", "random"])
    mag_lamp = c[(c.method_a == "magnitude") & (c.method_b == "lamp")]["spearman"]
    assert (mag_lamp > 0.999).all()  # LAMP ranks weights in magnitude order within a layer
    assert (c[c.method_b == "random"]["spearman"].abs() < 0.9).all()


def test_sanity_checks_keep_layer_counts():
    data = pl.data.digits()
    model = pl.train(pl.models.create("mlpnet", in_features=64, seed=0), data, epochs=10, progress=False).eval()
    s = pl.PruneSession(model, data)
    df = sanity_checks(s, "lamp", 0.8)
    assert df["variant"].tolist() == ["lamp (global)", "layerwise shuffle", "random, same layer counts",
                                      "inverted scores"]
    assert df.attrs["layer_counts"] == dict(zip(s.layer_names, s.prune("lamp", 0.8).pruned))
    own = df["accuracy"].iloc[0]
    assert own > df["accuracy"].iloc[1:].max()  # on a trained net, which weights are kept matters
