import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

torch.set_num_threads(1)  # 2 shared cores: one thread per test process is faster under load and deterministic


@pytest.fixture
def tiny_lm():
    """a very small random Llama, fast enough for exact-invariant tests."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=True, eos_token_id=62,
                      pad_token_id=63, bos_token_id=62)
    return LlamaForCausalLM(cfg).eval()
