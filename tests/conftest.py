import os
import sys
import weakref

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


def _saved_peak(fn, weights):
    """run fn(); -> the peak bytes of the tensors autograd keeps for backward meanwhile, a storage counted once and
    released when its last saved tensor dies; the storages of `weights` are not counted."""
    skip = {p.untyped_storage().data_ptr() for p in weights}
    alive, peak = {}, [0]  # storage -> [saved tensors using it, bytes]

    def release(k):
        alive[k][0] -= 1
        if not alive[k][0]:
            del alive[k]

    def pack(x):
        k = x.untyped_storage().data_ptr()
        if k not in skip:
            alive.setdefault(k, [0, x.untyped_storage().nbytes()])[0] += 1
            weakref.finalize(x, release, k)
            peak[0] = max(peak[0], sum(n for _, n in alive.values()))
        return x
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn()
    return peak[0]


@pytest.fixture
def saved_peak():
    """saved_peak(fn, weights) -> peak bytes autograd saves for backward while fn() runs, weights excluded."""
    return _saved_peak


def read_checkpoint(out):
    """OUT/ckpt/ whole: its small fields (extra.pt) and, read back from torch.distributed.checkpoint's files, the
    tensors it holds: {"models": {name: {key: tensor}}, "opt": ...}."""
    import tempfile
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    path = os.path.join(out, "ckpt")
    with tempfile.TemporaryDirectory() as d:
        dcp_to_torch_save(path, os.path.join(d, "ck.pt"))
        tensors = torch.load(os.path.join(d, "ck.pt"), map_location="cpu", weights_only=False)
    return {**torch.load(os.path.join(path, "extra.pt"), map_location="cpu", weights_only=False), **tensors}
