"""A model's output with pruned (or updated) weights swapped in, for the output distortion (session and
sensitivity analysis)."""
from __future__ import annotations

import torch

from ..core.capture import eval_mode
from ..core.losses import lm_forward_kwargs, output_logits


def model_output(model, x, overrides, mask=None) -> torch.Tensor:
    """The model's output (the logits of a ``transformers`` output) as float32 on the CPU; ``mask``: the attention
    mask of token ids ``x``."""
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    with eval_mode(model), torch.no_grad():
        x = x.to(dev)
        kw = {} if mask is None else lm_forward_kwargs(model, mask.to(dev))
        out = torch.func.functional_call(model, overrides, (x,), kw) if overrides else model(x, **kw)
        return output_logits(out).float().cpu()
