"""eval.py's memory plan and bench: exact arithmetic on hand-checked configs, the method ordering, one real bench row."""
import json
import os
import subprocess
import sys

import pytest
import torch

import eval as E
import hydra_ppo as H
import infra as I
import lora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# h 8, 2 heads of 4 (q 8), 1 kv head (kv 4), ffn 16, 2 layers, vocab 10, tied
SMALL = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)


def test_estimator_matches_hand_count_on_small_config():
    """the plan's per-component arithmetic (weights, LoRA, grads, AdamW state, KV cache) is off if this fails."""
    # params per layer: q 8*8 + k 8*4 + v 8*4 + o 8*8 + mlp 3*8*16 + 2 norms * 8 = 592; 2 layers + embed 80 + final norm 8
    n = 2 * 592 + 80 + 8
    assert n == 1272
    # LoRA r=2 per layer: q 2*(8+8) + k 2*(8+4) + v 2*(8+4) + o 2*(8+8) + gate, up, down 3 * 2*(8+16) = 256
    lora_set = 2 * 256
    heads = 2 * 9 * 4  # reward + value head (8 weights + bias) in fp32, per model copy
    B, T = 3, 10
    e = E.estimate(SMALL, "hydra-ppo", B, T, dtype_bytes=2, lora_r=2)
    assert e["weights"] == n * 2 + heads
    assert e["lora"] == 2 * lora_set * 4
    assert e["grads"] == (2 * lora_set + 9) * 4  # actor + critic LoRA and the value head, fp32
    assert e["optimizer"] == (2 * lora_set + 9) * 8  # two fp32 AdamW states
    assert e["kv_cache"] == 2 * 2 * B * T * 4 * 2  # k and v, 2 layers, 1 kv head of 4, bf16
    f = E.estimate(SMALL, "ppo", B, T, dtype_bytes=2, lora_r=2)
    assert f["weights"] == 2 * n * 2 + 2 * n * 4 + 4 * heads  # frozen reference + reward in bf16, trained actor + critic fp32
    assert f["grads"] == (2 * n + 9) * 4  # actor + critic full and the value head, all fp32
    assert f["optimizer"] == (2 * n + 9) * 8  # two fp32 AdamW states, no separate master copy
    assert f["casts"] == 2 * n * 2  # autocast's bf16 copy of every trained weight, saved for backward
    assert f["lora"] == 0 and e["casts"] == 0  # a frozen bf16 base needs no cast
    s = E.estimate(SMALL, "sft", B, T, dtype_bytes=4, lora_r=2)
    assert s["optimizer"] == n * 8 + 8 * 8 and s["kv_cache"] == 0  # fp32: no master copy; reward-head weight only (its bias gets no gradient); no rollout in SFT
    # logits: 3 fp32 (B, response, V) tensors; activations: (10h + 4 ffn) elements per token per layer + 2h final norm
    assert s["logits"] == 3 * B * 5 * 10 * 4
    assert s["activations"] == 2 * B * T * (2 * (10 * 8 + 4 * 16) * 4 + 2 * 8 * 4)
    # activation checkpointing: each layer keeps its input (h), one layer is recomputed in backward
    c = E.estimate(SMALL, "sft", B, T, dtype_bytes=4, lora_r=2, grad_ckpt=True)
    assert c["activations"] == 2 * B * T * (2 * 8 * 4 + (10 * 8 + 4 * 16) * 4 + 2 * 8 * 4)


@pytest.mark.parametrize("cfg", [I.MODELS["micro"], dict(model_type="opt", vocab_size=50, hidden_size=32, ffn_dim=64,
                                 num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)])
def test_estimator_param_counts_match_built_models(cfg):
    """the plan's parameter and LoRA counts drift from what transformers and lora.inject actually build if this fails."""
    lm = E.build_lm(cfg, 0, "cpu", torch.float32)
    s = I.shapes(cfg)
    assert s["params"] == sum(p.numel() for p in lm.parameters())
    lora.inject(lm, ["a"], r=4)
    assert 4 * s["lora_r1"] == sum(p.numel() for p in lora.lora_parameters(lm, "a"))


OPT_MICRO = dict(model_type="opt", vocab_size=64, hidden_size=64, ffn_dim=128, num_hidden_layers=4, num_attention_heads=4,
                 max_position_embeddings=64, word_embed_proj_dim=64, dropout=0.0)


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("row,dtype", [("sft", torch.float32), ("lora-sft", torch.float32), ("sft", torch.bfloat16),
                                       ("lora-sft", torch.bfloat16)])
def test_activation_count_matches_saved_tensors(row, dtype, arch):
    """the plan's activation bytes drift from what autograd keeps for transformers' blocks (fp32, or bf16 autocast
    over fp32 trained weights / a bf16 frozen base, as hydra_ppo builds them) if this fails."""
    cfg = OPT_MICRO if arch == "opt" else dict(I.MODELS["micro"], hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                               num_key_value_heads=2)
    store = torch.float32 if row == "sft" else dtype  # hydra_ppo.build_sft_models' rule
    model = H.HydraModel(E.build_lm(cfg, 0, "cpu", store), compute_dtype=dtype)
    if row == "lora-sft":
        lora.inject(model.lm, ["sft"], r=4)
        model.requires_grad_(False)
        for p in lora.lora_parameters(model.lm, "sft"):
            p.requires_grad_(True)
    B, T = 3, 32
    params, saved, casts = {p.untyped_storage().data_ptr() for p in model.parameters()}, {}, {}
    weight_shapes = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}  # none is (.., 2B * T) or (.., T, ..)
    keep = []  # hold every saved tensor so no address is reused while counting

    def pack(x):
        keep.append(x)
        if x.untyped_storage().data_ptr() not in params:  # autocast's copy of a weight is a cast, not an activation
            (casts if tuple(x.shape) in weight_shapes else saved)[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), lora.adapter("sft" if row == "lora-sft" else None):
        model.hidden(torch.randint(0, 60, (2 * B, T)), torch.ones(2 * B, T, dtype=torch.long))  # chosen + rejected
    est = E.estimate(cfg, row, B, T, dtype_bytes=torch.finfo(dtype).bits // 8, lora_r=4)
    assert abs(sum(saved.values()) / est["activations"] - 1) < 0.1
    # casts: the plan counts a d-byte copy of every fully trained weight (the decoder's matmul weights are most of
    # it); LoRA's own casts are at most half its fp32 bytes
    assert est["casts"] / 2 <= sum(casts.values()) <= est["casts"] * 1.01 + est["lora"] / 2


@pytest.mark.parametrize("row", E.ROWS)
def test_activation_peak_of_a_real_step_matches_the_plan(row, saved_peak):
    """the plan misjudges how many forwards' activations a real step keeps alive at once (e.g. ppo_update
    backpropagating actor and critic together again) if this fails."""
    cfg = dict(I.MODELS["micro"], hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_key_value_heads=2)
    B, P, R = 3, 16, 16
    step, opt, models = E.build_row(row, cfg, B, P, R, 4, torch.device("cpu"), torch.float32)
    peak = saved_peak(lambda: step(0), [p for m in models.values() for p in m.parameters()])
    e = E.estimate(cfg, row, B, P + R, dtype_bytes=4, lora_r=4, response_len=R)
    assert abs(peak / e["activations"] - 1) < 0.15


def test_plan_follows_the_role_table():
    """the estimator no longer reflects hydra_ppo.ROLES (the paper's Table 2: bases / LoRA sets) if this fails."""
    got = {m: (I.plan(H.ROLES.get(m, m))["copies"], I.plan(H.ROLES.get(m, m))["sets"], I.plan(H.ROLES.get(m, m))["full"]) for m in E.ROWS}
    assert got == {"floor": (1, 1, 0), "sft": (1, 0, 1), "lora-sft": (1, 1, 0), "ppo": (4, 0, 2), "lora-ppo": (2, 2, 0),
                   "j-hydra-ppo": (1, 1, 0), "hydra-ppo": (1, 2, 0)}


@pytest.mark.parametrize("model", ["smollm2-135m", "llama-7b", "opt-1.3b"])
def test_method_ordering_invariants(model):
    """the plan contradicts the paper's structure (one frozen base for Hydra, four copies for PPO) if this fails."""
    cfg, n = I.MODELS[model], I.shapes(I.MODELS[model])["params"]
    for B, d in [(b, d) for b in (1, 4, 16) for d in (2, 4)]:
        e = {m: E.estimate(cfg, m, B, 256, dtype_bytes=d, lora_r=16) for m in E.ROWS}
        base = e["hydra-ppo"]["weights"]
        assert base > n * d and e["j-hydra-ppo"]["weights"] == base
        fp32_copy = E.estimate(cfg, "hydra-ppo", B, 256, dtype_bytes=4, lora_r=16)["weights"]
        assert e["lora-ppo"]["weights"] == 2 * base and e["ppo"]["weights"] == 2 * base + 2 * fp32_copy  # trained copies fp32
        assert e["hydra-ppo"]["lora"] == 2 * e["j-hydra-ppo"]["lora"] == e["lora-ppo"]["lora"]
        assert e["j-hydra-ppo"]["total"] <= e["hydra-ppo"]["total"] <= e["lora-ppo"]["total"]
        assert e["lora-ppo"]["total"] < e["ppo"]["total"]
        # actor and critic backpropagate one at a time: B sequences alive, half of LoRA-SFT's chosen + rejected
        # (PPO turns dropout off; SFT keeps a config's dropout, so compare with a dropout-free SFT)
        sft = E.estimate(dict(cfg, dropout=0.0), "lora-sft", B, 256, dtype_bytes=d, lora_r=16)
        assert 2 * e["hydra-ppo"]["activations"] == 2 * e["j-hydra-ppo"]["activations"] == sft["activations"]


def test_bench_rows_train_what_the_plan_counts():
    """the bench's optimizer and the plan disagree on trainable parameters, bases or LoRA sets if this fails."""
    cfg = I.MODELS["micro"]
    for name in E.ROWS:
        step, opt, models = E.build_row(name, cfg, 2, 4, 3, 4, torch.device("cpu"), torch.float32)
        e = E.estimate(cfg, name, 2, 7, dtype_bytes=4, lora_r=4, response_len=3)
        assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == e["trainable_params"], name
        assert len({id(m) for m in models.values()}) == e["base_copies"], name
        assert len({a for m in models.values() for a in lora.adapter_names(m.lm)}) == e["lora_sets"], name


def test_largest_batch_finds_the_boundary():
    """--budget-mib reports a batch that does not fit, or misses a larger one that does, if this fails."""
    for limit in (0, 1, 2, 3, 37, 64, 100):
        calls = []
        assert E.largest_batch(lambda b: calls.append(b) or b <= limit, cap=1000) == limit
        assert len(calls) <= 2 * max(1, limit).bit_length() + 2  # doubling then bisection, not a linear scan
    assert E.largest_batch(lambda b: True, cap=48) == 48


@pytest.mark.parametrize("argv, msg", [(["bench", "--batch-size", "0"], "error: --batch-size 0: must be >= 1"),
                                       (["estimate", "no-such-model"], "error: estimate 'no-such-model': not built in")])
def test_bad_input_is_one_line_and_exit_2(argv, msg, capsys):
    """a bad flag crashes with a traceback, or exits 0, if this fails."""
    with pytest.raises(SystemExit) as ex:
        E.main(argv)
    assert ex.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(msg) and err.count("\n") == 1


JOBS = {"bench": ["--rows", "floor,nope"], "bench-gen": ["--batch-sizes", "8,x"],
        "estimate": ["tiny", "--seq-len", "1"], "save-random": ["tiny"], "compare": ["a", "b", "--n-prompts", "0"],
        "table": [], "score": ["run"], "sample": ["run", "--batch", "0"], "export": ["run", "--nope"]}


@pytest.mark.parametrize("job", JOBS)
def test_every_job_answers_a_bad_argument_with_one_error_line_and_exit_2(job, capsys):
    """if this fails, a job's bad argument gives argparse's usage block, a traceback or exit 0 instead of one line."""
    with pytest.raises(SystemExit) as ex:
        E.main([job, *JOBS[job]])
    err = capsys.readouterr().err
    assert ex.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err


def test_help_lists_every_job_but_not_the_internal_child():
    """if this fails, `eval.py --help` hides a job, or shows the bench's internal per-row child mode to users."""
    r = subprocess.run([sys.executable, "eval.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0
    listed = {line.split()[0] for line in r.stdout.split("jobs:")[1].splitlines()[2:] if line.startswith("    ")
              and not line.startswith("     ")}
    assert listed == set(JOBS), listed
    assert "bench-one" not in r.stdout and "internal" not in r.stdout


def test_bench_one_row_reports_its_fields():
    """`bench` cannot build its table (missing or wrong fields, responses of varying length) if this fails."""
    r = subprocess.run([sys.executable, "eval.py", "bench-one", "hydra-ppo", "--model", "micro", "--batch-size", "2", "--steps", "1",
                        "--prompt-len", "6", "--response-len", "5", "--threads", "1"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads(r.stdout.strip().splitlines()[-1])
    assert row["name"] == "hydra-ppo" and row["frozen_bases"] == 1 and row["lora_sets"] == 2
    assert row["memory_measure"] == ("cuda" if torch.cuda.is_available() else "cpu-rss")
    assert row["peak_memory_mib"] > 0 and row["latency_per_sample_s"] > 0
    assert row["trainable_params"] == E.estimate(I.MODELS["micro"], "hydra-ppo", 2, 11, 4, 16, 5)["trainable_params"]
    assert row["mean_response_len"] == 5  # eos can never be sampled: every response has the fixed length


@pytest.mark.skipif(I.glibc() is None, reason="malloc settings are glibc's")
def test_bench_memory_phase_hands_blocks_back_and_its_clock_keeps_them():
    """if this fails, the bench's peak is read while malloc keeps freed blocks (RSS is not live memory), or its clock
    runs while every large tensor is page-faulted in afresh (a time no real run pays)."""
    code = """
import resource, sys, torch, eval as E
assert E.set_malloc(sys.argv[1])
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt  # noqa: E731
t = torch.ones(2**20)  # 4 MiB
del t
f0 = faults()
for _ in range(20):
    t = torch.ones(2**20)
    del t
print(faults() - f0)
"""
    pages = {}
    for mode in ("track", "keep"):
        r = subprocess.run([sys.executable, "-c", code, mode], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        pages[mode] = int(r.stdout.split()[-1])
    assert pages["track"] > 20 * 2**20 * 4 // 4096 // 2  # each 4 MiB tensor faulted in afresh (>= half its pages)
    assert pages["keep"] * 10 < pages["track"]  # reused (at most the first one is faulted in)


def test_bench_gen_eager_and_static_decoders_agree_and_report_their_clock(tmp_path, capsys):
    """if this fails, the static decoder (a CUDA graph on CUDA) samples other tokens or computes other logits than
    the eager one under a live LoRA adapter, or bench-gen's gen.json (issue #23's measurement) loses a field."""
    E.main(["bench-gen", "--model", "micro", "--batch-sizes", "2,3", "--steps", "2", "--prompt-len", "4",
            "--response-len", "6", "--lora-r", "4", "--dtype", "fp32", "--out", str(tmp_path)])
    g = json.load(open(tmp_path / "gen.json"))
    assert [r["batch_size"] for r in g["rows"]] == [2, 3] and g["dtype"] == "float32" and g["lora_r"] == 4
    for r in g["rows"]:
        assert r["rows_identical"] == r["batch_size"] and r["first_diff_token"] is None  # every token the same
        assert r["logit_steps"] == 4 and r["max_abs_logit_diff"] < 1e-4  # prefill + 3 steps, fp32 rounding only
        assert r["ms_per_token_eager"] > 0 and r["ms_per_token_static"] > 0 and r["repeats"] == 2
        assert r["eager_over_static"] == r["ms_per_token_eager"] / r["ms_per_token_static"]
        assert r["peak_memory_mib"] is not None
    assert "repeat 2/2" in capsys.readouterr().err  # one progress line per repeat, on stderr

