"""Helpers for Hugging Face ``transformers`` causal LMs (duck-typed: importing prune_lab never imports
transformers).

- :func:`causal_lm_exclude`: the weights to leave dense as in the Wanda paper (everything outside the decoder
  blocks: ``lm_head``, often tied to the input embedding, and e.g. OPT's ``project_in``/``project_out``), as exact
  names for ``PruneSession(..., exclude=...)``.
- :func:`conv1d_to_linear`: a copy of a GPT-2-style model with ``transformers``' ``Conv1D`` layers (weight
  ``(in, out)``) turned into equivalent ``nn.Linear`` layers, which prune_lab prunes.
- :func:`decoder_blocks`: the decoder blocks in order, the unit of Wanda's block-by-block calibration.
- :func:`vocab_size`: the vocabulary an LM's token ids must fit (the forward pass's keyword arguments and its
  logits: :mod:`prune_lab.core.losses`).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["causal_lm_exclude", "conv1d_to_linear", "decoder_blocks", "is_hf_model", "vocab_size"]

_PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``transformers`` model (by its classes' modules; transformers is not imported)."""
    return any(c.__module__.split(".")[0] == "transformers" for c in type(model).__mro__)


def is_hf_conv1d(module: nn.Module) -> bool:
    """``transformers.pytorch_utils.Conv1D`` (GPT-2 family): a Linear with its weight stored ``(in, out)``."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.split(".")[0] == "transformers"


def _block_prefix(model: nn.Module) -> str | None:
    """Name of the stack of decoder blocks: the longest ``nn.ModuleList`` holding Linear layers."""
    best, size = None, 0
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > size and any(isinstance(x, _PRUNABLE) for x in m.modules()):
            best, size = name, len(m)
    return best


def decoder_blocks(model: nn.Module) -> list:
    """``[(module name, module)]`` of the decoder blocks, in order: the children of the longest ``nn.ModuleList``
    holding Linear/Conv layers (``model.layers``, ``model.decoder.layers``, ``gpt_neox.layers``,
    ``transformer.h``); ``[]`` for a model without one.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> lm = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
    ...                                   num_hidden_layers=2, num_attention_heads=4))
    >>> [name for name, _ in decoder_blocks(lm)]
    ['model.layers.0', 'model.layers.1']
    """
    prefix = _block_prefix(model)
    if prefix is None:
        return []
    stack = model.get_submodule(prefix)
    return [(f"{prefix}.{i}" if prefix else str(i), block) for i, block in enumerate(stack)]


def causal_lm_exclude(model: nn.Module) -> list:
    """Names of the Linear/Conv weights outside the model's decoder blocks, to pass as ``exclude=``: the Wanda
    paper prunes every Linear layer inside the blocks and leaves the rest (``lm_head``) dense.

    The blocks are the longest ``nn.ModuleList`` of the model (``model.layers``, ``model.decoder.layers``,
    ``gpt_neox.layers``, ``transformer.h``). A tied ``lm_head`` is named as prune_lab names it: by the first
    name of the shared parameter (e.g. ``model.decoder.embed_tokens.weight`` in OPT), so excluding it works.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> lm = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
    ...                                   num_hidden_layers=2, num_attention_heads=4))
    >>> causal_lm_exclude(lm)
    ['lm_head.weight']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    canonical: dict = {}
    for name, p in model.named_parameters():
        canonical.setdefault(id(p), name)
    prefix = _block_prefix(model)
    inside, outside = set(), []
    for mname, m in model.named_modules():
        w = getattr(m, "weight", None)
        if not isinstance(m, _PRUNABLE) or not isinstance(w, nn.Parameter) or id(w) not in canonical:
            continue
        name = canonical[id(w)]
        if prefix is not None and mname.startswith(prefix + "."):
            inside.add(name)
        elif name not in outside:
            outside.append(name)
    return [n for n in outside if n not in inside]


def conv1d_to_linear(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every ``transformers`` ``Conv1D`` (GPT-2, GPT-J's predecessors; weight
    ``(in, out)``, ``y = x @ W + b``) replaced by an ``nn.Linear`` holding ``Wᵀ``: same outputs, and prunable.
    The model itself is not changed.

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> gpt2 = conv1d_to_linear(GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4)))
    >>> type(gpt2.transformer.h[0].attn.c_attn).__name__
    'Linear'
    """
    out = copy.deepcopy(model)
    for parent in list(out.modules()):
        for child_name, child in list(parent.named_children()):
            if is_hf_conv1d(child):
                w = child.weight.detach()
                lin = nn.Linear(w.shape[0], w.shape[1], bias=child.bias is not None, device=w.device, dtype=w.dtype)
                with torch.no_grad():
                    lin.weight.copy_(w.t())
                    if child.bias is not None:
                        lin.bias.copy_(child.bias.detach())
                lin.weight.requires_grad_(child.weight.requires_grad)
                setattr(parent, child_name, lin)
    return out


def vocab_size(model: nn.Module) -> int | None:
    """The vocabulary size of an LM (``get_input_embeddings()``'s rows, or ``config.vocab_size``), else ``None``
    (a plain module: its embeddings are not guessed).

    >>> vocab_size(nn.Sequential(nn.Embedding(50, 4))) is None
    True
    """
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            emb = get()
        except (NotImplementedError, AttributeError):
            emb = None
        if isinstance(emb, nn.Embedding):
            return int(emb.num_embeddings)
    n = getattr(getattr(model, "config", None), "vocab_size", None)
    return n if isinstance(n, int) and not isinstance(n, bool) else None
