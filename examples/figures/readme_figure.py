"""The figure shown in the README: test accuracy against remaining weights (log axis) for five methods on the
MLP trained on scikit-learn's embedded digits, one-shot, no fine-tuning.

    python examples/figures/readme_figure.py      # from the repository root; about half a minute on a CPU

Writes ``accuracy_digits.png`` (150 dpi, to keep the file small; exports default to 300 dpi) and
``accuracy_digits.csv`` (the plotted points) beside this script.
"""
from pathlib import Path

import prune_lab as pl

METHODS = ["magnitude", "global_magnitude", "lamp", "lap", "random"]
GRID = [0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999]


def main() -> list:
    data = pl.data.digits()
    session = pl.PruneSession(pl.pretrained("mlpnet", data), data, device="cpu")
    curve = session.sweep(METHODS, GRID, seeds=(0, 1, 2), progress=False)
    fig = pl.viz.plot_accuracy_curve(curve, dense=session.evaluate()["accuracy"], log_remaining=True,
                                     title="MLP on digits: one-shot pruning, no fine-tuning")
    return pl.viz.save_figure(fig, Path(__file__).with_name("accuracy_digits"), formats=("png",), dpi=150)


if __name__ == "__main__":
    for path in main():
        print(path)
