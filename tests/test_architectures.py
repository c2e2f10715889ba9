"""hydra_ppo.py --model DIR on every architecture family it claims to take: micro random-init models of each, saved
with a GPT-2 BPE tokenizer by eval.save_random_model, run through the real command line and the KV-cache path."""
import json
import math
import os

import pytest
import torch

import data
import eval as E
import hydra_ppo as H
import infra as I

V = 50304  # >= the GPT-2 BPE's 50257 ids plus each style's special tokens: the real tokenizer, cut by nothing
ARCHS = {
    "llama": dict(model_type="llama", vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True),
    "opt-project-out": dict(model_type="opt", vocab_size=V, hidden_size=32, word_embed_proj_dim=16, ffn_dim=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=256, tie_word_embeddings=True),
    "opt": dict(model_type="opt", vocab_size=V, hidden_size=32, word_embed_proj_dim=32, ffn_dim=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=256, tie_word_embeddings=True),
    "gpt2": dict(model_type="gpt2", vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=256),  # Conv1D layers
    "qwen2": dict(model_type="qwen2", vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True),
    "gpt-neox": dict(model_type="gpt_neox", vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=256, rotary_pct=0.5, tie_word_embeddings=False),
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {name: E.save_random_model(conf, str(root / name)) for name, conf in ARCHS.items()}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_hydra_sft_and_a_ppo_iteration_run_on_each_architecture(arch, model_dirs, tmp_path, capsys):
    """if this fails, hydra_ppo.py --model DIR crashes or yields non-finite rewards on this architecture family."""
    out = str(tmp_path / "run")
    I.STOP.requested = None
    try:
        H.main(["--model", model_dirs[arch], "--data", "builtin", "--n-builtin", "64", "--sft-steps", "2", "--sft-batch", "4",
                "--ppo-steps", "1", "--rollout-batch", "4", "--minibatch", "2", "--max-new-tokens", "4", "--eval-prompts", "4",
                "--out", out, "--device", "cpu", "--threads", "1"])
    except SystemExit as e:
        err = [line for line in capsys.readouterr().err.replace("\r", "\n").split("\n") if line.startswith("error: ")]
        pytest.fail(f"exit {e.code}: {err}")
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    for k in ("reward_sft", "reward_ppo", "gold_sft", "gold_ppo", "kl", "sft_loss"):
        assert s[k] is not None and math.isfinite(s[k]), (k, s[k])
    for f in ("sft.pt", "ckpt/extra.pt", "ppo.pt", "metrics.jsonl"):
        assert os.path.exists(os.path.join(out, f)), f


@pytest.mark.parametrize("arch", list(ARCHS))
def test_kv_cache_logits_equal_a_full_forward_on_each_architecture(arch, model_dirs):
    """if this fails, rollouts on this architecture are sampled from other logits than PPO scores them with
    (cache, left padding or position ids are wrong for it)."""
    lm, tok = I.load_lm(model_dirs[arch], torch.float32)
    m = H.HydraModel(lm.eval())
    prompts = [tok.encode("Review of the lamp:"), tok.encode("Review of the new garden chair:"), tok.encode("Hi")]
    assert len({len(p) for p in prompts}) == 3  # rows of three lengths: two of them left-padded
    steps = [[11, 262, 13], [922, 1049, 257], [50, 4457, 1110]]  # fixed continuations, one list per row
    ids, mask, P = data.collate(prompts, steps, tok.pad_id)
    from transformers import DynamicCache
    with torch.no_grad():
        full = m.logits(m.hidden(ids, mask)[0])  # (B, T, V): one forward, as PPO scores responses
        h, cache = m.hidden(ids[:, :P], mask[:, :P], DynamicCache())
        incremental = [m.logits(h[:, -1])]
        for t in range(P, ids.shape[1] - 1):
            h, cache = m.hidden(ids[:, t:t + 1], mask[:, :t + 1], cache)
            incremental.append(m.logits(h[:, -1]))
        incremental = torch.stack(incremental, 1)  # (B, R, V): the logits that predict each response token
        assert torch.allclose(incremental, full[:, P - 1:-1], atol=1e-5), (incremental - full[:, P - 1:-1]).abs().max()
        for i, (p, r) in enumerate(zip(prompts, steps)):  # and left padding changes nothing: each row alone, unpadded
            alone = lm(torch.tensor([p + r])).logits[0, len(p) - 1:-1]
            assert torch.allclose(incremental[i], alone, atol=1e-5), (i, (incremental[i] - alone).abs().max())


def test_save_random_writes_a_dir_whose_tokenizer_prepends_bos(tmp_path):
    """if this fails, `eval.py save-random` writes a model dir that does not load, or whose tokenizer and config disagree
    on BOS (Llama and OPT prepend it), or that uses ids outside the vocab."""
    from transformers import AutoConfig, AutoTokenizer
    E.main(["save-random", "tiny", str(tmp_path / "llama"), "--dtype", "fp32"])  # vocab 4098 < 50257: the BPE's first ranks
    E.save_random_model(ARCHS["opt-project-out"], str(tmp_path / "opt"))
    for name in ("llama", "opt"):
        tok, cfg = AutoTokenizer.from_pretrained(tmp_path / name), AutoConfig.from_pretrained(tmp_path / name)
        text = "Review of the lamp: good."
        ids = tok.encode(text)
        assert ids[0] == tok.bos_token_id == cfg.bos_token_id, (name, ids[:3], tok.bos_token_id, cfg.bos_token_id)
        assert tok.encode(text, add_special_tokens=False) == ids[1:]
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert cfg.eos_token_id == tok.eos_token_id and len(tok) <= cfg.vocab_size, name
        assert cfg.pad_token_id == tok.pad_token_id, name
    assert tok.pad_token_id not in (None, tok.eos_token_id)  # OPT's own <pad>


def test_save_random_of_an_unknown_model_is_one_error_line(tmp_path, capsys):
    """if this fails, a mistyped MODEL gives a traceback instead of one line naming the flag."""
    with pytest.raises(SystemExit) as e:
        E.main(["save-random", "no-such-model", str(tmp_path / "x")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: save-random 'no-such-model'"), err
    assert not os.path.exists(tmp_path / "x")


def test_a_model_dirs_reward_head_comes_from_the_runs_seed(model_dirs):
    """if this fails, two runs of a real model with one --seed start from different reward heads (only the tiny
    model's init was seeded): their SFT, and every comparison between them, differ by chance."""
    heads = [H.build_sft_models(H.Config(model=model_dirs["llama"], seed=s), torch.float32, torch.device("cpu"))[0]
             ["hydra"].reward_head.weight.detach() for s in (3, 3, 4)]
    assert torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], heads[2])


def _rm_accuracy(model_dir, out, extra, capsys):
    I.STOP.requested = None
    H.main(["--model", model_dir, "--data", "builtin", "--n-builtin", "400", "--stage", "sft", "--sft-lora",
            "--sft-steps", "40", "--sft-batch", "8", "--out", out, "--device", "cpu", "--threads", "1", *extra])
    capsys.readouterr()
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)["rm_accuracy"]


def test_lora_sft_on_a_real_model_trains_at_its_default_learning_rate(model_dirs, tmp_path, capsys):
    """if this fails, --sft-lora on any model but tiny (llama-7b's recipe) gets full fine-tuning's 1e-5 again, at
    which 40 steps leave the adapter and the fresh reward head where they started."""
    default = _rm_accuracy(model_dirs["llama"], str(tmp_path / "default"), [], capsys)
    slow = _rm_accuracy(model_dirs["llama"], str(tmp_path / "slow"), ["--sft-lr", "1e-5"], capsys)
    assert default >= 0.8 and default > slow + 0.2, (default, slow)


@pytest.mark.parametrize("arch", [*ARCHS, "gpt2-full-vocab"])
def test_the_exported_reward_model_called_plainly_scores_as_hydras_reward_head(arch, model_dirs, tmp_path):
    """if this fails, a user who runs the exported reward/ the obvious way (its tokenizer on prompt + response, a
    padded batch, AutoModelForSequenceClassification) gets other scores than hydra's reward head: no EOS appended,
    or the EOS skipped as the pad (gpt2-full-vocab: no free row for another pad)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    full = {**ARCHS["gpt2"], "vocab_size": 50257}
    cfg = H.Config(model=model_dirs[arch] if arch in ARCHS else E.save_random_model(full, str(tmp_path / "m")))
    models, tok = H.build_sft_models(cfg, torch.float32, torch.device("cpu"))
    I.export_run(models, H.ROLES[cfg.method], cfg, tok, False, str(tmp_path / "hf"))
    pairs = data.builtin_pairs(6)
    seqs = [p + c for p, c, _ in data.encode_pairs(pairs, tok, cfg)[0]]
    ids, mask, _ = data.collate(seqs, [[]] * len(seqs), tok.pad_id)  # left-padded: hydra's positions come from mask
    with torch.no_grad():
        m = models[H.ROLES[cfg.method]["reward"][0]]
        ours = m.score(m.hidden(ids, mask)[0], mask)
        rt = AutoTokenizer.from_pretrained(tmp_path / "hf" / "reward")
        rm = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf" / "reward").eval()
        batch = rt([p.prompt + p.chosen for p in pairs], padding=True, return_tensors="pt")
        theirs = rm(**batch).logits[:, 0]
    assert [r[m == 1].tolist() for r, m in zip(batch["input_ids"], batch["attention_mask"])] == seqs
    assert torch.allclose(theirs, ours, atol=1e-4), (ours.tolist(), theirs.tolist())
    assert rt.decode(rt("a")["input_ids"][:-1], skip_special_tokens=True) == "a"  # the EOS comes off as special


# the LM's own post-head step, set off its default so it matters on a tiny random model (gemma3: none by default)
POST_HEAD = {"cohere": dict(logit_scale=0.25), "granite": dict(logits_scaling=4.0),
             "gemma2": dict(final_logit_softcapping=0.5), "gemma3_text": dict(final_logit_softcapping=0.5), "llama": {}}


@pytest.mark.parametrize("model_type", list(POST_HEAD))
def test_hydra_logits_are_the_lms_own_after_its_logit_scale_or_softcap(model_type):
    """if this fails, every log-prob of Cohere (logit_scale), Granite (logits_scaling) or Gemma 2/3 (final logit
    softcap) is silently off the model's own, or the plain head of a Llama is no longer bit-identical."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                               **POST_HEAD[model_type])
    lm = AutoModelForCausalLM.from_config(cfg).eval()
    if lm.base_model is lm:  # transformers < 5 names no base model in Gemma3ForCausalLM: hidden() cannot run it
        pytest.skip(f"transformers {transformers.__version__}: no base model in {type(lm).__name__}")
    m = H.HydraModel(lm)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        h = m.hidden(ids, torch.ones_like(ids))[0]
        ref, got, head = lm(ids).logits, m.logits(h), lm.get_output_embeddings()(h)
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), (got - ref).abs().max()
    assert torch.equal(got, head) == (model_type == "llama")  # the test has teeth: the step changes the logits
