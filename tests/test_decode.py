"""decoding on a static KV cache with a captured one-token step (infra.StaticDecoder, generate's path on CUDA) against
the eager path (hydra_ppo.EagerDecoder, the CPU's): the same logits, the same tokens, the adapter it was captured
under."""
from types import SimpleNamespace

import pytest
import torch

import data
import hydra_ppo as H
import infra as I
import lora

EOS, PAD = 62, 63
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (graph capture)")


def _static_decodes():
    from transformers import LlamaConfig, StaticCache
    return I.plain_static(StaticCache(config=LlamaConfig(num_hidden_layers=1), max_cache_len=8))


# transformers < 5.4: no static layer keeps its offset in a tensor, so infra.static_decoder never makes one
static = pytest.mark.skipif(not _static_decodes(), reason="transformers < 5.4: generate decodes eagerly")


def _tok():
    return data.Tokenizer(encode=lambda s: [ord(c) % 60 for c in s], decode=lambda ids: "".join(map(chr, ids)),
                       eos_id=EOS, pad_id=PAD, vocab_size=64)


def _model(adapters=(), device="cpu", dtype=torch.float32, hidden=32, layers=2, arch="llama"):
    """tiny random Llama (as conftest's tiny_lm) or OPT in a HydraModel; adapters get a nonzero B so they matter."""
    from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig
    torch.manual_seed(0)
    ids = dict(vocab_size=64, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
               max_position_embeddings=256, tie_word_embeddings=True, eos_token_id=EOS, pad_token_id=PAD,
               bos_token_id=EOS)
    cfg = (LlamaConfig(intermediate_size=2 * hidden, num_key_value_heads=4, **ids) if arch == "llama" else
           OPTConfig(ffn_dim=2 * hidden, word_embed_proj_dim=hidden, dropout=0.0, **ids))
    lm = AutoModelForCausalLM.from_config(cfg).eval().to(device, dtype)
    if adapters:
        lora.inject(lm, list(adapters), r=4, alpha=8)
        with torch.no_grad():
            for name, p in lm.named_parameters():
                if ".lora_B." in name:
                    p.normal_(0, 0.2)
    return H.HydraModel(lm, compute_dtype=dtype).eval()


def _batch(device="cpu"):
    """left-padded prompts of lengths 2, 5, 4, 1: row 0 padded too (a cache that reads its offset off row 0's keys,
    as transformers < 5.4 did, writes over the prompt)."""
    prompts = [[6, 7], [1, 2, 3, 4, 5], [8, 9, 10, 11], [12]]
    ids, mask, _ = data.collate(prompts, [[] for _ in prompts], PAD)
    return prompts, ids.to(device), mask.to(device)


def _dynamic_logits(m, ids, mask, toks, reals):
    """the eager path of hydra's generate: DynamicCache, mask grown by one column per token."""
    from transformers import DynamicCache
    h, cache = m.hidden(ids, mask, DynamicCache())
    out = [m.logits(h[:, -1])]
    for tk, real in zip(toks, reals):
        mask = torch.cat([mask, real.unsqueeze(-1)], 1)
        h, cache = m.hidden(tk.unsqueeze(-1), mask, cache)
        out.append(m.logits(h[:, -1]))
    return out


def _static_logits(m, ids, mask, toks, reals, max_len=32):
    dec = I.StaticDecoder(m, ids.shape[0], max_len)
    out = [dec.prefill(ids, mask).clone()]
    for tk, real in zip(toks, reals):
        out.append(dec.step(tk, real).clone())  # clone: on CUDA the graph's output buffer is overwritten next step
    return out


def _steps(n, B, device="cpu"):
    g = torch.Generator().manual_seed(1)
    toks = [torch.randint(0, 60, (B,), generator=g).to(device) for _ in range(n)]
    reals = [torch.ones(B, dtype=torch.long, device=device) for _ in range(n)]
    for r in reals[3:]:
        r[1] = 0  # row 1 finishes after 3 tokens: its later columns are masked, as generate does
    return toks, reals


@static
@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("adapter", [None, "actor"])
@torch.no_grad()
def test_static_step_matches_dynamic_cache_on_left_padding(adapter, arch):
    """static cache + full-length mask buffer give the DynamicCache logits; else positions/mask/cache offset are off."""
    m = _model(["actor"], arch=arch)
    _, ids, mask = _batch()
    toks, reals = _steps(6, ids.shape[0])
    with lora.adapter(adapter):
        ref = _dynamic_logits(m, ids, mask, toks, reals)
        got = _static_logits(m, ids, mask, toks, reals)
    for t, (a, b) in enumerate(zip(ref, got)):
        assert torch.allclose(a, b, atol=1e-5, rtol=0), f"step {t}: max diff {(a - b).abs().max():.2e}"


@static
@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_generate_on_the_static_decoder_samples_what_the_eager_one_samples(temperature, monkeypatch):
    """if this fails, a GPU rollout (static cache) samples other responses than the CPU's for the same seeds (EOS cut,
    finished rows, the done check every few tokens)."""
    m = _model(["actor"])
    tok = _tok()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 60, (int(n),), generator=g).tolist() for n in torch.randint(1, 7, (8,), generator=g)]
    seeds = list(range(100, 108))
    ref = H.generate(m, "actor", prompts, tok, 24, temperature, seeds)
    if temperature:  # the case must exercise both: rows that stop at EOS and rows that run to max_new
        assert any(r[-1] == EOS and len(r) < 24 for r in ref) and any(len(r) == 24 for r in ref)
    monkeypatch.setattr(I, "static_decoder", I.StaticDecoder)
    assert H.generate(m, "actor", prompts, tok, 24, temperature, seeds) == ref


@static
@torch.no_grad()
def test_step_refuses_an_adapter_other_than_the_prefills():
    """a step under another adapter than the prefill's raises; else one rollout mixes two policies (or the graph's)."""
    m = _model(["actor", "critic"])
    _, ids, mask = _batch()
    dec = I.StaticDecoder(m, ids.shape[0], 16)
    with lora.adapter("actor"):
        dec.prefill(ids, mask)
        dec.step(ids[:, -1], torch.ones(4, dtype=torch.long))  # the prefill's adapter: fine
    for other in ("critic", None):
        with lora.adapter(other), pytest.raises(RuntimeError, match="decoder prefilled under adapter 'actor'"):
            dec.step(ids[:, -1], torch.ones(4, dtype=torch.long))


@static
@torch.no_grad()
def test_step_has_no_host_sync():
    """the one-token step never reads a device value on the host (.item(), bool(t), nonzero); else CUDA capture fails."""
    from torch.utils._python_dispatch import TorchDispatchMode
    syncing = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
               torch.ops.aten.masked_select.default}
    seen = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in syncing:
                seen.append(func)
            return func(*args, **(kwargs or {}))

    m = _model(["actor"])
    _, ids, mask = _batch()
    dec = I.StaticDecoder(m, ids.shape[0], 16)
    with lora.adapter("actor"):
        dec.prefill(ids, mask)  # eager: may sync (transformers checks the mask there)
        with Spy():
            dec.step(ids[:, -1], torch.tensor([1, 0, 1, 1]))
            dec.step(ids[:, -1], torch.ones(4, dtype=torch.long))
    assert not seen, f"host syncs in the step: {seen}"


@static
@torch.no_grad()
def test_the_captures_warm_up_leaves_the_cache_as_it_found_it(monkeypatch):
    """the capture sequence run eagerly (warm-up of two steps, offsets put back, then a stand-in graph that reruns the
    step) gives the DynamicCache logits; else every captured step on a GPU writes at a stale offset."""
    def capture(dec):  # _capture minus CUDA: the same warm-up, then a "graph" replaying the step into one buffer
        dec._warm_up()
        out = torch.empty(ids.shape[0], 64)
        captured.append(lora.live_adapter())
        return SimpleNamespace(replay=lambda: out.copy_(dec._forward())), out
    m = _model(["actor"])
    _, ids, mask = _batch()
    toks, reals = _steps(6, ids.shape[0])
    captured = []
    monkeypatch.setattr(I.StaticDecoder, "_captures", lambda self, new: True)
    monkeypatch.setattr(I.StaticDecoder, "_capture", capture)
    with lora.adapter("actor"):
        ref = _dynamic_logits(m, ids, mask, toks, reals)
        got = _static_logits(m, ids, mask, toks, reals)
    assert captured == ["actor"]
    for t, (a, b) in enumerate(zip(ref, got)):
        assert torch.allclose(a, b, atol=1e-5, rtol=0), f"step {t}: max diff {(a - b).abs().max():.2e}"


@static
def test_a_capture_that_raises_decodes_eagerly_after_one_warning_line(monkeypatch, capsys):
    """if this fails, a capture that raises on an untested version or model kills a run (or warns at every rollout,
    or decodes other tokens than the eager path) instead of going on eagerly."""
    m = _model(["actor"])
    prompts, seeds = [[1, 2, 3], [4], [5, 6]], [7, 8, 9]
    ref = H.generate(m, "actor", prompts, _tok(), 12, 1.0, seeds)

    def capture(dec):
        calls.append(1)
        raise RuntimeError("operation not permitted when stream is capturing\nsecond line")
    calls = []
    monkeypatch.setattr(I, "static_decoder", I.StaticDecoder)
    monkeypatch.setattr(I.StaticDecoder, "failed", False)
    monkeypatch.setattr(I.StaticDecoder, "_captures", lambda self, new: True)
    monkeypatch.setattr(I.StaticDecoder, "_capture", capture)
    capsys.readouterr()
    assert [H.generate(m, "actor", prompts, _tok(), 12, 1.0, seeds) for _ in range(2)] == [ref, ref]
    assert capsys.readouterr().err.splitlines() == ["warning: CUDA graph capture failed, decoding eagerly "
                                                    "(RuntimeError: operation not permitted when stream is capturing)"]
    assert calls == [1]  # no capture tried again in this process


def _sliding(arch):
    from transformers import Gemma2Config, MistralConfig, Qwen2Config
    return {"mistral": lambda: MistralConfig(num_hidden_layers=2, sliding_window=16),
            "gemma2": lambda: Gemma2Config(num_hidden_layers=2),  # sliding and full layers alternate
            "qwen2": lambda: Qwen2Config(num_hidden_layers=2, use_sliding_window=True, sliding_window=16,
                                         max_window_layers=1)}[arch]()


@pytest.mark.parametrize("arch", ["mistral", "gemma2", "qwen2", "llama"])
def test_only_plain_static_caches_get_the_static_decoder(arch, monkeypatch):
    """infra.static_decoder on a GPU makes the captured step only where every cache layer is a plain static one; else
    a replay never advances a sliding-window layer's python offset: silently wrong tokens (Mistral, Gemma 2, Qwen2)."""
    from transformers import LlamaConfig, StaticCache
    cfg = LlamaConfig(num_hidden_layers=2) if arch == "llama" else _sliding(arch)
    gpu = SimpleNamespace(parameters=lambda: iter([SimpleNamespace(device=torch.device("cuda"))]),
                          lm=SimpleNamespace(config=cfg))  # static_decoder() reads the device and the config only
    monkeypatch.setattr(I, "StaticDecoder", lambda model, batch, length: SimpleNamespace(
        cache=StaticCache(config=model.lm.config, max_cache_len=length)))
    assert (I.static_decoder(gpu, 2, 32) is None) != (arch == "llama" and _static_decodes())


# --- GPU only: the captured graph -------------------------------------------------------------------------------

@cuda
@torch.no_grad()
def test_graph_logits_match_eager_in_bf16():
    """replayed graph = eager DynamicCache path within bf16 noise; else capture baked in stale state."""
    m = _model(["actor"], "cuda", torch.bfloat16, hidden=128, layers=4)
    _, ids, mask = _batch("cuda")
    toks, reals = _steps(8, ids.shape[0], "cuda")
    with lora.adapter("actor"):
        ref = _dynamic_logits(m, ids, mask, toks, reals)
        got = _static_logits(m, ids, mask, toks, reals)
    for t, (a, b) in enumerate(zip(ref, got)):
        err = (a.float() - b.float()).abs().max().item()
        assert err <= 0.05 * a.float().abs().max().item() + 1e-2, f"step {t}: max diff {err:.3g}"


@cuda
@torch.no_grad()
def test_graph_rereads_lora_weights_and_keeps_one_graph_per_adapter():
    """after an in-place LoRA update the replay follows it, per adapter; else PPO samples from a stale policy."""
    m = _model(["actor", "critic"], "cuda", torch.bfloat16, hidden=128, layers=4)
    _, ids, mask = _batch("cuda")
    toks, reals = _steps(4, ids.shape[0], "cuda")
    dec = I.StaticDecoder(m, ids.shape[0], 32)
    for name in ("actor", "critic", "actor"):
        for p in lora.lora_parameters(m, name):
            p.mul_(1.5)  # as an optimizer step would: in place
        with lora.adapter(name):
            ref = _dynamic_logits(m, ids, mask, toks, reals)[-1]
            dec.prefill(ids, mask)
            for tk, real in zip(toks, reals):
                got = dec.step(tk, real)
        assert (ref.float() - got.float()).abs().max() <= 0.05 * ref.float().abs().max() + 1e-2
    assert set(dec.graphs) == {"actor", "critic"}


@cuda
def test_graph_rollout_agrees_with_generate(monkeypatch):
    """a short fixed-seed bf16 rollout mostly agrees token for token; bf16 noise may flip a few rows (reported)."""
    m = _model(["actor"], "cuda", torch.bfloat16, hidden=128, layers=4)
    tok = _tok()
    prompts = [[i + 1, (3 * i) % 60, 7] for i in range(8)]
    with monkeypatch.context() as mp:
        mp.setattr(I, "static_decoder", lambda *a: None)
        ref = H.generate(m, "actor", prompts, tok, 16, 1.0, range(8))
    got = H.generate(m, "actor", prompts, tok, 16, 1.0, range(8))
    bad = [i for i, (a, b) in enumerate(zip(ref, got)) if a != b]
    print(f"mismatching rows: {bad}", {i: (ref[i], got[i]) for i in bad})
    assert len(bad) <= len(prompts) // 2
