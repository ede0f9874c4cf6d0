"""Training, evaluation and cached pretrained models, all aware of pruning masks.

>>> from prune_lab import models, data, training
>>> bundle = data.synthetic(n_train=64, n_test=32)
>>> net = training.train(models.create("mlpnet", in_features=64, seed=0), bundle, epochs=1, progress=False)
>>> 0.0 <= training.evaluate(net, bundle)["accuracy"] <= 1.0
True
"""
from .loop import (OPTIMIZERS, check_masks, evaluate, next_token_stats, perplexity, recalibrate_bn, resolve_device,
                   train)
from .checkpoints import DEFAULT_RECIPE, RECIPES, checkpoint_path, default_cache_dir, pretrained, recipe

__all__ = [
    "train", "evaluate", "perplexity", "next_token_stats", "recalibrate_bn", "pretrained", "check_masks", "resolve_device",
    "recipe", "RECIPES", "DEFAULT_RECIPE", "OPTIMIZERS", "checkpoint_path", "default_cache_dir",
]
