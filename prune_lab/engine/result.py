"""PruneResult: what a pruning call returns. Per-layer counts and distortions are there at once; the masks are
built only when first asked for (a slider move never materialises them)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass
class PruneResult:
    """The outcome of pruning at one sparsity.

    ``masks``: ``{name: BoolTensor}`` of the parameters' shapes, True = kept (built on first access);
    ``weights``: ``{name: Tensor}`` of updated kept weights for methods that update them, else ``None``;
    ``layer_sparsity``: ``{name: float}``; ``sparsity``: achieved over the prunable set; ``frobenius``:
    ``{name: ‖W − M⊙W‖_F}``; ``target_sparsity``: what was asked for.

    >>> import torch, prune_lab as pl
    >>> res = pl.prune(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)), "magnitude", 0.5)
    >>> res.layer_sparsity
    {'0.weight': 0.5, '2.weight': 0.5}
    """

    method: str
    allocation: str
    target_sparsity: float
    hyperparameters: dict
    seed: int | None
    layers: tuple
    numel: tuple
    pruned: tuple
    frobenius: dict
    weight_norms: dict
    model_fingerprint: str = ""
    weights: dict | None = None
    _mask_builder: Callable | None = field(default=None, repr=False)
    _masks: dict | None = field(default=None, repr=False)

    @property
    def masks(self) -> dict:
        if self._masks is None:
            self._masks = self._mask_builder()
            self._mask_builder = None
        return self._masks

    @property
    def masks_built(self) -> bool:
        """Whether the masks have been materialised (they are built lazily)."""
        return self._masks is not None

    @property
    def layer_sparsity(self) -> dict:
        return {n: (p / t if t else 0.0) for n, p, t in zip(self.layers, self.pruned, self.numel)}

    @property
    def sparsity(self) -> float:
        total = sum(self.numel)
        return sum(self.pruned) / total if total else 0.0

    @property
    def density(self) -> float:
        return 1.0 - self.sparsity

    @property
    def n_kept(self) -> int:
        return int(sum(self.numel) - sum(self.pruned))

    @property
    def relative_frobenius(self) -> dict:
        return {n: (self.frobenius[n] / self.weight_norms[n] if self.weight_norms[n] > 0 else 0.0)
                for n in self.layers}

    @property
    def label(self) -> str:
        return f"{self.method} ({self.allocation}) @ {self.target_sparsity:g}"

    def __repr__(self) -> str:
        return (f"PruneResult(method={self.method!r}, allocation={self.allocation!r}, "
                f"sparsity={self.sparsity:.4f}, layers={len(self.layers)}, kept={self.n_kept})")
