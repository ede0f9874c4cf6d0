"""Tiny causal LMs built locally from random configs (no downloads) and structured token data, shared by the
language-model tests."""
import functools
import warnings

import torch
from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig,
                          LlamaForCausalLM, OPTConfig, OPTForCausalLM)

VOCAB = 128


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def tiny_opt(seed: int = 0) -> OPTForCausalLM:
    """A tiny OPT (its ``lm_head`` tied to the input embedding)."""
    torch.manual_seed(seed)
    return OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=64,
                                    word_embed_proj_dim=32)).eval()


def tiny_gpt_neox(seed: int = 0) -> GPTNeoXForCausalLM:
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4,
                                            max_position_embeddings=64)).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """A tiny GPT-2 with its ``Conv1D`` layers turned into ``nn.Linear`` (:func:`prune_lab.models.conv1d_to_linear`)."""
    import prune_lab as pl

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                       bos_token_id=0, eos_token_id=0)).eval()
    return pl.models.conv1d_to_linear(model)


TINY_LMS = {"llama": tiny_llama, "opt": tiny_opt, "gpt_neox": tiny_gpt_neox, "gpt2": tiny_gpt2}


def pattern_ids(n: int, seq_len: int, seed: int, noise: float = 0.1) -> torch.Tensor:
    """Sequences where token t is perm[token t−2] for a fixed random permutation (10 % random tokens): predicting
    them needs attention to the token before last, so the decoder blocks matter."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(123))
    x = torch.empty(n, seq_len, dtype=torch.long)
    x[:, :2] = torch.randint(0, VOCAB, (n, 2), generator=g)
    for t in range(2, seq_len):
        jump = torch.rand(n, generator=g) < noise
        x[:, t] = torch.where(jump, torch.randint(0, VOCAB, (n,), generator=g), perm[x[:, t - 2]])
    return x


@functools.lru_cache(maxsize=1)
def _trained_state():
    model = tiny_llama(0).train()
    data = pattern_ids(256, 24, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        batch = data[torch.randint(0, data.shape[0], (32,), generator=g)]
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def trained_llama() -> LlamaForCausalLM:
    """A tiny Llama trained for 100 steps on :func:`pattern_ids` sequences (a fresh copy each call)."""
    model = tiny_llama(0)
    model.load_state_dict(_trained_state())
    return model.eval()


def quiet_session(*args, **kw):
    """A PruneSession without the expected torch.fx fallback warning of transformers models."""
    import prune_lab as pl

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pl.PruneSession(*args, **kw)
