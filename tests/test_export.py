"""exports: a finished run loads with transformers (and peft) alone and computes what hydra computes."""
import json
import os

import pytest
import torch

import data
import eval as E
import hydra_ppo as H
import infra as I
import lora

ARGS = ["--sft-steps", "40", "--ppo-steps", "2", "--rollout-batch", "8", "--minibatch", "4", "--eval-prompts", "4",
        "--max-new-tokens", "12", "--n-builtin", "300"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """a short tiny-model Hydra-PPO run with --export."""
    out = str(tmp_path_factory.mktemp("run"))
    H.main(["--out", out, "--export", *ARGS])
    return out


@pytest.fixture(scope="module")
def loaded(run_dir):
    return E.load_run(run_dir, "cpu")


def _prompt_ids(tok, cfg, n=4):
    _, held, _, _ = data.split_data(cfg)
    return [data.prompt_tokens(tok, p.prompt, cfg.max_prompt)[0] for p in held[:n]], [p.prompt for p in held[:n]]


def test_export_writes_the_three_models_and_the_actors_peft_dir_alone(run_dir):
    """if this fails, a run with --export leaves out a model a user needs, leaves its temporary directory behind, or
    writes the critic's adapter, of no use without its value head (which no transformers class holds)."""
    hf = os.path.join(run_dir, "hf")
    assert sorted(os.listdir(hf)) == ["adapters", "policy", "reward", "sft"]
    assert sorted(os.listdir(os.path.join(hf, "adapters"))) == ["actor"]
    assert not os.path.exists(hf + ".tmp")
    for d in ("policy", "sft", "reward"):
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(os.path.join(hf, d)))
    with open(os.path.join(hf, "reward", "config.json")) as f:
        conf = json.load(f)
    assert conf["architectures"] == ["LlamaForSequenceClassification"] and len(conf["id2label"]) == 1


def test_exported_tokenizer_encodes_as_the_runs_own(run_dir, loaded):
    """if this fails, the exported models read other token ids than they were trained on (tiny's tiktoken BPE
    rebuilt as a transformers tokenizer must give the same ids, with eos and pad in place)."""
    from transformers import AutoTokenizer
    _, _, tok, _ = loaded
    hf = AutoTokenizer.from_pretrained(os.path.join(run_dir, "hf", "policy"))
    for text in ("Review of the phone: great it best.", " héllo  wörld\n\nHuman: 12,345!", ""):
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert (hf.eos_token_id, hf.pad_token_id, len(hf)) == (tok.eos_id, tok.pad_id, tok.vocab_size)


def test_exported_policy_generates_greedily_what_eval_py_sample_greedy_gives(run_dir, loaded, capsys):
    """if this fails, the policy a user serves with transformers is not the one hydra trained (adapter not merged,
    the wrong adapter, wrong weight names or a wrong head)."""
    from transformers import AutoModelForCausalLM
    _, cfg, tok, _ = loaded
    _, texts = _prompt_ids(tok, cfg)
    rows = E.main(["sample", run_dir, "--greedy", "--device", "cpu", *sum((["--prompt", t] for t in texts), [])])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == rows
    policy = AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "hf", "policy")).eval()
    for t, row in zip(texts, rows):
        ids = torch.tensor([data.prompt_tokens(tok, t, cfg.max_prompt)[0]])
        out = policy.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=cfg.max_new_tokens, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        assert out[0, ids.shape[1]:].tolist() == row["tokens"]
    # greedy answers of a briefly trained tiny model are short: the merged weights are also checked token by token
    bases = loaded[0]
    actor = bases[H.ROLES[cfg.method]["actor"][0]]
    ids = torch.tensor([data.prompt_tokens(tok, texts[0], cfg.max_prompt)[0] + [400, 13, 99, 7, 1200, 13]])
    mask = torch.ones_like(ids)
    with torch.no_grad(), lora.adapter("actor"):
        ours = actor.logits(actor.hidden(ids, mask)[0])
        theirs = policy(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(theirs, ours, atol=1e-4), (theirs - ours).abs().max()


def test_exported_reward_model_scores_as_the_reward_head_under_padding(run_dir, loaded):
    """if this fails, the exported reward model scores other text than hydra's reward head (the score layer is not
    the head, or the last real token is read from another slot when rows are padded)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    bases, cfg, tok, _ = loaded
    rm = AutoModelForSequenceClassification.from_pretrained(os.path.join(run_dir, "hf", "reward")).eval()
    _, held, _, _ = data.split_data(cfg)
    rows, _ = data.encode_pairs(held[:12], tok, cfg)
    seqs = [p + c for p, c, _ in rows] + [p + r for p, _, r in rows]  # lengths differ: right padding in a batch
    T = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_id] * (T - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs])
    assert len(set(map(len, seqs))) > 1
    with torch.no_grad():
        theirs = rm(input_ids=ids, attention_mask=mask).logits[:, 0]
        model = bases[H.ROLES[cfg.method]["reward"][0]]
        with lora.adapter(None):
            ours = model.score(model.hidden(ids, mask)[0], mask)
    assert torch.allclose(theirs, ours, atol=1e-4, rtol=1e-4), (theirs - ours).abs().max()
    assert ours.std() > 0.01  # the scores differ from row to row: a real comparison
    rt = AutoTokenizer.from_pretrained(os.path.join(run_dir, "hf", "reward"))  # called plainly, as a user would
    with torch.no_grad():
        plain = rm(**rt([p.prompt + p.chosen for p in held[:12]], padding=True, return_tensors="pt")).logits[:, 0]
    assert torch.allclose(plain, ours[:12], atol=1e-4, rtol=1e-4), (plain - ours[:12]).abs().max()


def test_peft_loads_the_actor_adapter_on_the_exported_sft_base_with_the_actors_logits(run_dir, loaded):
    """if this fails, the PEFT export is not the actor (PEFT key names, target modules, alpha or base differ)."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM
    bases, cfg, tok, _ = loaded
    hf = os.path.join(run_dir, "hf")
    base = AutoModelForCausalLM.from_pretrained(os.path.join(hf, "sft"))
    model = peft.PeftModel.from_pretrained(base, os.path.join(hf, "adapters", "actor")).eval()
    prompts, _ = _prompt_ids(tok, cfg)
    ids, mask, _ = data.collate(prompts, [[5, 6, 7]] * len(prompts), tok.pad_id)
    ids, mask = ids[:1], mask[:1]  # one row, no padding: transformers' positions are then the same as hydra's
    actor = bases[H.ROLES[cfg.method]["actor"][0]]
    with torch.no_grad(), lora.adapter("actor"):
        ours = actor.logits(actor.hidden(ids, mask)[0])
    with torch.no_grad():
        theirs = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(theirs, ours, atol=1e-4), (theirs - ours).abs().max()
    with torch.no_grad(), model.disable_adapter(), lora.adapter(None):  # and the switch is the same switch
        assert torch.allclose(model(input_ids=ids, attention_mask=mask).logits,
                              actor.logits(actor.hidden(ids, mask)[0]), atol=1e-4)
    with torch.no_grad(), lora.adapter(None):
        assert (ours - actor.logits(actor.hidden(ids, mask)[0])).abs().max() > 1e-3  # the adapter is not a no-op


def test_a_failed_export_leaves_the_previous_one_whole(run_dir, loaded, monkeypatch):
    """if this fails, an export that dies half-way (disk full, a kill) leaves a half-written OUT/hf behind."""
    bases, cfg, tok, has_ppo = loaded
    out = os.path.join(run_dir, "hf")
    before = sorted(os.listdir(out))

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(E, "write_peft", boom)
    with pytest.raises(OSError):
        E.export_run(bases, H.ROLES[cfg.method], cfg, tok, has_ppo, out)
    assert sorted(os.listdir(out)) == before
    assert sorted(os.listdir(os.path.join(out, "adapters"))) == ["actor"]


def test_a_bf16_base_exports_in_bf16_but_a_merged_adapter_in_fp32(run_dir, tmp_path):
    """if this fails, a bf16 run's unmerged export doubles in size (fp32), or the policy's merged PPO update is
    rounded to bf16 (most of an update far below the weights' size is lost there)."""
    from safetensors import safe_open
    bases, cfg, tok, has_ppo = E.load_run(run_dir, "cpu")
    for m in bases.values():
        m.lm.to(torch.bfloat16)  # as prepare_ppo stores a frozen base in a bf16 run
    E.export_run(bases, H.ROLES[cfg.method], cfg, tok, has_ppo, str(tmp_path / "hf"))
    for d, dtype in (("policy", torch.float32), ("sft", torch.bfloat16), ("reward", torch.bfloat16)):
        with safe_open(str(tmp_path / "hf" / d / "model.safetensors"), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {dtype}, d


def test_the_peft_export_loads_by_its_path_from_any_directory(run_dir, tmp_path, monkeypatch):
    """if this fails, AutoPeftModelForCausalLM.from_pretrained(OUT/hf/adapters/actor) finds no base model unless the
    caller stands in the adapter's own directory (PEFT reads a relative base path from the current directory)."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM
    hf = os.path.join(run_dir, "hf")
    monkeypatch.chdir(tmp_path)
    model = peft.AutoPeftModelForCausalLM.from_pretrained(os.path.join(hf, "adapters", "actor")).eval()
    policy = AutoModelForCausalLM.from_pretrained(os.path.join(hf, "policy")).eval()  # the actor, merged
    ids = torch.tensor([[400, 13, 99, 7, 1200, 13]])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, policy(input_ids=ids).logits, atol=1e-4)


def test_an_export_folds_the_fixed_lora_sft_adapter_in_fp32(tiny_lm):
    """if this fails, a --sft-lora run's exported sft/ and reward/ lose the SFT adapter kept unmerged (lora.fix), or
    round its update to the base's bf16."""
    from transformers import LlamaForCausalLM
    m = H.HydraModel(tiny_lm.to(torch.bfloat16), compute_dtype=torch.bfloat16)
    lora.inject(m.lm, ["sft"], r=4, alpha=8)
    with torch.no_grad():
        for n, p in m.lm.named_parameters():
            if ".lora_B." in n:
                p.normal_(std=1e-3)  # an update far below bf16's step at the weights' size
    lora.fix(m.lm, "sft")
    state = E.hf_state(m, None, m.lm.state_dict())
    assert {v.dtype for v in state.values()} == {torch.float32}
    lm = LlamaForCausalLM(tiny_lm.config).eval()
    lm.load_state_dict(state, strict=False)
    lm.tie_weights()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad(), lora.adapter(None):  # what PPO's reference reads: base + the fixed adapter
        want = m.lm.float()(ids).logits
        assert torch.allclose(lm(ids).logits, want, atol=1e-5)
