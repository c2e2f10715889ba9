"""
Memory and latency of the paper's methods, measured and estimated (Hydra-RLHF, arXiv 2309.00754, Table 2 and sec. 4).
One job per subcommand; `python eval.py JOB --help` lists its flags.

    python eval.py bench                             # tiny model: floor, sft, lora-sft, the 4 PPO methods
    python eval.py bench --model smollm2-135m-random # SmolLM2-135M shapes, random init (no download)
    python eval.py estimate llama-7b --seq-len 800 --lora-r 128 --budget-mib 81920   # analytic plan, vs the paper
    python eval.py bench-gen --model llama-7b-random --lora-r 128 --prompt-len 400 --response-len 400 \\
        --batch-sizes 8,12 --dtype bf16                  # ms per generated token: eager vs static (CUDA graph) decoder
    python eval.py save-random smollm2-135m models/smollm2-random   # a random-init model dir for hydra_ppo.py --model

Alignment of finished runs (the paper's win-rates, and ROUGE for summaries):

    python eval.py compare out out:sft        # PPO vs SFT of one run: same held-out prompts, same sampling seeds
    python eval.py table out_lora out_jhydra out_hydra
    python eval.py score out --data pairs.jsonl         # the run's reward model on a preference file
    python eval.py sample out:sft --prompt "Q: ..."     # responses, with the reward model's scores
    python eval.py export out                           # out/hf: Hugging Face and PEFT directories

A run DIR is its PPO actor if DIR/ppo.pt exists, else its SFT policy (the reference role, LoRA off); DIR:sft / DIR:ppo
choose. Win-rates count ties as half (95% Wilson score interval); an external judge (--judge-cmd / --judge-url) is
asked both orders, and a win needs both to agree. Progress goes to stderr; printed JSON is stdout's last line.
"""
import argparse
import copy
import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from statistics import fmean

import torch
from safetensors.torch import save_file
from tokenizers.processors import TemplateProcessing
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
from transformers.models.llama import modeling_llama  # noqa: F401  before hydra_ppo, whose RSS baseline is taken
from transformers.models.opt import modeling_opt  # noqa: F401  at its import: ~90 MiB, more than tiny's whole run
from tqdm import tqdm

import data
import hydra_ppo as H
import infra as I
import lora

ROWS = ("floor", "sft", "lora-sft") + H.METHODS  # the bench's rows: a LoRA LM step, the two SFTs, the PPO methods
MIB = 2**20
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def note(msg):
    """a long job's progress, on stderr: stdout's last line stays what scripts read."""
    tqdm.write(msg, file=sys.stderr)


# -----------------------------------------------------------------------------
# a finished run; the memory plan (infra.estimate) of a method by name, beside the paper's figures


def load_run(out, device="auto"):
    """rebuild a finished run from its directory (sft.pt, and ppo.pt if PPO ran). -> (bases {name: HydraModel}, cfg,
    tok, has_ppo). the SFT policy is ROLES[method]["reference"], the PPO one "actor"."""
    t0, sft_path = time.perf_counter(), os.path.join(out, "sft.pt")
    if not os.path.exists(sft_path):
        raise I.ConfigError(f"{out}: no sft.pt here; expected a run directory written by hydra_ppo.py")
    ck = I.load_file(sft_path)
    if "config" not in ck:
        raise I.ConfigError(f"{sft_path} has no saved config (written by an older hydra); rerun it with --fresh")
    names = {f.name for f in dataclasses.fields(H.Config)}
    cfg = H.Config(**{k: v for k, v in ck["config"].items() if k in names and k not in ("device", "fsdp")},
                   device=device)
    dev = I.pick_device(device)
    # the run's own compute dtype (a bf16 run from a GPU stays bf16 on the CPU: its exports keep their dtype)
    dtype = getattr(torch, ck["compute_dtype"]) if cfg.dtype == "auto" and "compute_dtype" in ck else None
    models, tok = H.build_sft_models(cfg, dtype or I.pick_dtype(cfg.dtype, dev), dev)
    for n, m in models.items():
        I.sft_adapter(m, cfg)
        I.load_sft_state(m, ck["models"][n], sft_path)
    bases = H.ppo_bases(cfg.method, models)
    ppo_path = os.path.join(out, "ppo.pt")
    if os.path.exists(ppo_path):
        ppo = I.load_file(ppo_path)
        if "models" not in ppo:
            raise I.ConfigError(f"{ppo_path} was written by an older hydra (another format); rerun --stage ppo")
        I.check_meta(ppo["meta"], cfg, ppo_path, "sft", than=sft_path)  # PPO trained on top of this sft.pt
        # PPO's own flags (--lora-r, --temperature, ...) from ppo.pt: a --stage ppo may have set others than SFT's
        cfg = dataclasses.replace(cfg, **{k: v for k, v in ppo["meta"].items() if k in names})
        H.prepare_ppo(bases, cfg.method, cfg, dev)
        for n, sd in ppo["models"].items():
            if bases[n].load_state_dict(sd, strict=False).unexpected_keys:  # weights this run's setup does not have
                raise I.ConfigError(f"{ppo_path} does not fit base {n!r} of {sft_path}")
    for m in bases.values():
        m.eval()
    note(f"loaded {out} ({cfg.method}, {'PPO' if os.path.exists(ppo_path) else 'SFT'} policy) on {dev} in "
         f"{time.perf_counter() - t0:.0f} s")
    return bases, cfg, tok, os.path.exists(ppo_path)


def estimate(config_dict, method, *args, **kw):
    """infra.estimate for a row of the bench by name: floor, sft, lora-sft, or a PPO method (its role table)."""
    return I.estimate(config_dict, H.ROLES.get(method, method), *args, **kw)


# the paper's peak memory on Llama-7b (GB read as GiB; ppo is their estimate, the others measured on one 80 GB GPU)
PAPER_PEAK_GIB = {"llama-7b": {"ppo": 220.0, "lora-ppo": 68.0, "j-hydra-ppo": 67.9, "hydra-ppo": 71.1}}


def largest_batch(fits, cap=1024):
    """largest b in [1, cap] with fits(b), fits monotone: doubling, then bisection. 0 when even 1 does not fit."""
    lo, hi = 0, 1
    while hi <= cap and fits(hi):  # fits(lo): 0, or the largest power of two tried
        lo, hi = hi, hi * 2
    hi = min(hi, cap + 1)  # first size known not to fit (or past the cap)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def num(v, spec):
    return "-" if v is None else format(v, spec)


def _fmt(v):
    return "n/a" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _table(head, rows, right=False):
    """rows under a head, each column as wide as its widest cell; right: all but the first right-aligned (numbers)."""
    w = [max(len(_fmt(x)) for x in col) for col in zip(head, *rows)]
    for r in [head, ["-" * n for n in w], *rows]:
        print("  ".join(_fmt(x).rjust(n) if right and i else _fmt(x).ljust(n) for i, (x, n) in enumerate(zip(r, w))))


def print_estimate(a):
    cfg = I.model_config(a.model, "estimate")
    d = {"fp32": 4, "bf16": 2, "fp16": 2}[a.dtype]
    s = I.shapes(cfg)
    est = lambda m, b: estimate(cfg, m, b, a.seq_len, d, a.lora_r, grad_ckpt=a.grad_ckpt)  # noqa: E731
    unit, div = ("GiB", 2**30) if est("ppo", a.batch_size)["total"] > 10 * 2**30 else ("MiB", MIB)
    print(f"estimate {a.model}: {s['params'] / 1e6:.1f}M params, batch {a.batch_size}, seq {a.seq_len} (response "
          f"{a.seq_len // 2}), {a.dtype}, LoRA r {a.lora_r}" + ", activation checkpointing" * a.grad_ckpt + f"; {unit}")
    keys = ("weights", "lora", "grads", "optimizer", "activations", "logits", "casts", "kv_cache", "total")
    paper = PAPER_PEAK_GIB.get(a.model.removesuffix("-random"), {})
    fit = lambda m, lim: largest_batch(lambda b: est(m, b)["total"] <= lim)  # noqa: E731  its largest batch
    rows = []
    for m in (a.method,) if a.method else ROWS:
        e, pb = est(m, a.batch_size), fit(m, paper[m] * 2**30) if m in paper else 0
        rows.append([m, *(f"{e[k] / div:.2f}" for k in keys)] + [fit(m, a.budget_mib * MIB)] * bool(a.budget_mib)
                    + [f"{paper.get(m, float('nan')):.1f}", f"{pb} ({est(m, pb)['total'] / 2**30:.1f})" if pb else "-"]
                    * bool(paper))
    _table(["method", *keys] + ["max batch"] * bool(a.budget_mib) + ["paper GiB", "batch at paper"] * bool(paper),
           rows, right=True)


# -----------------------------------------------------------------------------
# the bench: one row = one configuration in its own fresh process, built with hydra_ppo's own functions


def build_lm(cfg, seed, device, dtype):
    """a random-init LM of a config, built in place on device in dtype (a 7B shape never passes through host fp32)."""
    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=dtype)


def bench_tokenizer(vocab):
    # eos_id -1 can never be sampled: every response is exactly max_new_tokens long, so all rows see the same lengths
    return data.Tokenizer(encode=None, decode=None, eos_id=-1, pad_id=vocab - 1, vocab_size=vocab)


def set_threads(a):
    if a.threads or a.model == "tiny":  # hydra_ppo's rule: tiny's small matmuls run on one thread
        torch.set_num_threads(a.threads or 1)


def build_row(name, cfg, B, P, R, lora_r, device, dtype, grad_ckpt=False):
    """-> (step(i) -> (response tokens, PPO clock), optimizer, models): one training step of row `name` on random
    data, set up by hydra_ppo's own prepare_sft / prepare_ppo (a run's defaults)."""
    V, g = cfg["vocab_size"], torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(0, V - 1, (B, n), generator=g).tolist()  # noqa: E731  never the pad id
    # one minibatch per rollout, one epoch, no early stop, no score scale: every step does the same work
    hcfg = H.Config(model="bench", sft_batch=B, rollout_batch=B, minibatch=B, max_prompt=P, max_new_tokens=R,
                    ppo_epochs=1, stop_kl=math.inf, lora_r=lora_r, grad_ckpt=grad_ckpt, score_norm="none",
                    sft_lora=False)
    if name == "floor":  # what any PPO update costs at least: a LoRA language-model step on the same B x (P + R)
        # tokens, LoRA on the same modules, as a LoRA library trains (transformers' own loss, labels on the response)
        model = H.HydraModel(build_lm(cfg, 0, device, dtype), compute_dtype=dtype)
        lora.inject(model.lm, ["floor"], r=lora_r, alpha=hcfg.lora_alpha)
        model.requires_grad_(False)
        params = lora.lora_parameters(model.lm, "floor")
        for p in params:
            p.requires_grad_(True)
        if grad_ckpt:
            I.enable_checkpointing(model.lm)
        opt = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.0)
        ids = torch.tensor([a + b for a, b in zip(rand(P), rand(R))], device=device)  # (B, P + R)
        labels = ids.clone()
        labels[:, :P] = -100  # the loss reads the response tokens only
        model.train()

        def step(i):
            with lora.adapter("floor"), model.autocast(ids.device):
                loss = model.lm(input_ids=ids, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return R, None
        return step, opt, {"floor": model}
    if name in ("sft", "lora-sft"):  # train_sft's own setup and step, Hydra-SFT losses (lm + reward)
        hcfg = dataclasses.replace(hcfg, sft_lora=name == "lora-sft")
        # hydra_ppo's mixed precision: full SFT trains fp32 weights, LoRA SFT a frozen base stored in dtype
        model = H.HydraModel(build_lm(cfg, 0, device, dtype if hcfg.sft_lora else torch.float32), compute_dtype=dtype)
        params, opt = H.prepare_sft(model, hcfg, device)
        rows = list(zip(rand(P), rand(R), rand(R)))  # (prompt, chosen, rejected) of fixed lengths
        model.train()

        def step(i):
            with lora.adapter("sft" if hcfg.sft_lora else None):
                H.sft_step(model, rows, 1.0, 1.0, params, opt, V - 1, device, 1.0, i + 1)
            return R, None
        return step, opt, {"sft": model}
    store = torch.float32 if name == "ppo" else dtype  # full PPO: fp32 copies (prepare_ppo stores frozen ones in dtype)
    models = {n: H.HydraModel(build_lm(cfg, i, device, store), compute_dtype=dtype)
              for i, n in enumerate(H.sft_models(name))}
    bases = H.ppo_bases(name, models)
    params, opt = H.prepare_ppo(bases, name, hcfg, device)
    tok, prompts = bench_tokenizer(V), rand(P)
    roles = H.ROLES[name]
    for m in bases.values():
        m.eval()

    def step(i):  # train_ppo's iteration: rollout, then update (no calibration: raw scores)
        batch = H.rollout(bases, roles, prompts, tok, hcfg, i, device)
        stats = H.ppo_update(bases, roles, params, opt, hcfg.kl_coef, batch, {}, hcfg, i)
        return stats["response_len"], {k: {**batch.clock, **stats}[k] for k in H.PHASES}
    return step, opt, bases


def set_malloc(mode):
    """how glibc hands freed host memory back. "track": every block over 64 KiB at free, so that RSS follows the live
    tensors (at a page-fault cost); "keep": blocks up to 32 MiB stay for reuse, as in a plain run. -> whether set."""
    libc = I.glibc()
    if libc is None:
        return False
    mmap_threshold, trim_threshold = {"track": (2**16, 0), "keep": (2**25, 2**30)}[mode]
    return bool(libc.mallopt(-3, mmap_threshold)) and bool(libc.mallopt(-1, trim_threshold))  # M_MMAP_, M_TRIM_


def sync(device):
    """wait for the device's queued work, so that a host clock times it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(a):
    """the hidden `bench-one` job, run_child's child: build one row, a warm-up step, a.steps timed steps (on the CPU
    after two steps that measure its memory), in this process. -> the row's dict, printed as one JSON line."""
    set_threads(a)
    device = I.pick_device(a.device)
    dtype, cfg = I.pick_dtype("auto", device), I.model_config(a.model)
    head = dict(name=a.name, model=a.model, batch_size=a.batch_size, prompt_len=a.prompt_len,
                response_len=a.response_len, device=str(device), dtype=str(dtype).removeprefix("torch."),
                memory_measure="cuda" if device.type == "cuda" else "cpu-rss")
    times, lens, gens = [], [], []
    # on the CPU, memory then time: a warm-up and one step under "track", then a warm-up and a.steps under "keep"
    apart = device.type == "cpu" and set_malloc("track")
    try:
        step, opt, models = build_row(a.name, cfg, a.batch_size, a.prompt_len, a.response_len, a.lora_r, device, dtype,
                                      a.grad_ckpt)
        I.reset_peak_memory(device)  # measure the steps, not the build (full PPO casts its frozen fp32 copies once)
        if apart:
            step(0), step(1)  # step 0 is a warm-up: AdamW state appears at its first step()
            peak = I.peak_memory_mib(device)
            set_malloc("keep")
        for i in range(a.steps + 1):  # (one more) warm-up, then the timed steps
            t0 = time.perf_counter()
            n, clock = step(i + 2 * apart)
            lens.append(n), gens.append(clock)
            sync(device)
            times.append(time.perf_counter() - t0)
    except torch.cuda.OutOfMemoryError:  # a row that does not fit is a result (the paper's full PPO on one GPU)
        row = dict(head, oom=True, peak_memory_mib=None)
    else:
        sets = {n for m in models.values() for n in lora.adapter_names(m.lm)}
        mid = lambda xs: sorted(xs[1:])[a.steps // 2]  # noqa: E731  median of the timed steps
        row = dict(head, peak_memory_mib=round(peak if apart else I.peak_memory_mib(device), 1),
                   latency_per_sample_s=mid(times) / a.batch_size,
                   **({k: mid([g[k] for g in gens]) for k in H.PHASES} if gens[0] is not None else {}),
                   trainable_params=sum(p.numel() for g in opt.param_groups for p in g["params"]),
                   frozen_bases=len({id(m) for m in models.values()}), lora_sets=len(sets),
                   mean_response_len=sum(lens) / len(lens))
    print(json.dumps(row))
    return row


def code_version():
    # hydra_ppo.py and lora.py change under the bench: record which versions a table measured
    return {os.path.basename(m.__file__): hashlib.sha256(open(m.__file__, "rb").read()).hexdigest()[:12]
            for m in (H, lora)}


def run_child(a, name, batch_size):
    """one row in a fresh process: a fresh VmHWM, and bench_one sets malloc for its memory and its time. -> its dict"""
    cmd = ([sys.executable, os.path.abspath(__file__), "bench-one", name, "--model", a.model,
            "--batch-size", str(batch_size), "--steps", str(a.steps), "--prompt-len", str(a.prompt_len),
            "--response-len", str(a.response_len), "--lora-r", str(a.lora_r), "--device", a.device,
            "--threads", str(a.threads)] + ["--grad-ckpt"] * a.grad_ckpt)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{name} (batch {batch_size}) failed with exit {r.returncode}:\n{r.stderr[-2000:]}")
    got = json.loads(r.stdout.strip().splitlines()[-1])
    note(f"{name} (batch {batch_size}): peak {got['peak_memory_mib'] or math.inf:.1f} MiB, "  # None: out of memory
         f"{time.perf_counter() - t0:.0f} s")
    return got


def bench(a):
    cfg = I.model_config(a.model)
    res = [run_child(a, name, a.batch_size) for name in a.rows]
    d = torch.finfo(getattr(torch, res[0]["dtype"])).bits // 8
    peak = {r["name"]: r["peak_memory_mib"] for r in res}
    ratio = lambda r, to: (r["peak_memory_mib"] / peak[to]  # noqa: E731
                           if r["peak_memory_mib"] and peak.get(to) else None)
    for r in res:
        est = estimate(cfg, r["name"], a.batch_size, a.prompt_len + a.response_len, d, a.lora_r, a.response_len,
                       a.grad_ckpt)["total"] / MIB
        r.update(x_ppo=ratio(r, "ppo"), x_floor=ratio(r, "floor"), x_lora_sft=ratio(r, "lora-sft"),
                 estimate_mib=round(est, 1),
                 estimate_err=est / r["peak_memory_mib"] - 1 if r["peak_memory_mib"] else None)
    out = dict(memory_measure=res[0]["memory_measure"], model=a.model, batch_size=a.batch_size, prompt_len=a.prompt_len,
               response_len=a.response_len, steps=a.steps, lora_r=a.lora_r, grad_ckpt=a.grad_ckpt,
               device=res[0]["device"], dtype=res[0]["dtype"], code=code_version(), rows=res)
    measure = {"cuda": "torch.cuda.max_memory_allocated",
               "cpu-rss": "peak RSS (VmHWM) above its reading after imports"}[out["memory_measure"]]
    print(f"\nbench {a.model}: batch {a.batch_size}, prompt {a.prompt_len} + response {a.response_len} tokens, "
          f"{a.steps} timed steps after 1 warm-up, {out['dtype']} on {out['device']}, LoRA r {a.lora_r}"
          + ", activation checkpointing" * a.grad_ckpt)
    print(f"peak memory = {measure}, one fresh process per row")
    f = lambda r, k, spec, div=1: num(None if r.get(k) is None else r[k] / div, spec)  # noqa: E731  (oom rows)
    clock = "gen {gen_s:.2f} ({gen_ms_per_token:.0f} ms/token) score {score_s:.2f} update {update_s:.2f} s"
    _table(["row", "bases", "LoRA", "trainable M", "peak MiB", "s/sample", "x ppo", "x floor", "x lora-sft", "est MiB",
            "est err", "ppo clock"],
           [[r["name"], f(r, "frozen_bases", ".0f"), f(r, "lora_sets", ".0f"), f(r, "trainable_params", ".2f", 1e6),
             "out of memory" if r.get("oom") else f(r, "peak_memory_mib", ".1f"), f(r, "latency_per_sample_s", ".4f"),
             f(r, "x_ppo", ".2f"), f(r, "x_floor", ".2f"), f(r, "x_lora_sft", ".2f"), f(r, "estimate_mib", ".0f"),
             f(r, "estimate_err", "+.0%"), clock.format(**r) if r.get("gen_s") is not None else ""]
            for r in res], right=True)
    save_json(out, a.out, "bench.json")
    return out


def save_json(obj, out, fname):
    os.makedirs(out, exist_ok=True)
    I.save_atomic(obj, os.path.join(out, fname))
    print(f"wrote {os.path.join(out, fname)}")


# -----------------------------------------------------------------------------
# decoding: ms per generated token, the eager decoder against the static one generate uses on CUDA (a CUDA graph)

DECODERS = {"eager": lambda m, batch, length: H.EagerDecoder(m), "static": I.StaticDecoder}


def decode(model, kind, prompts, tok, new, keep=0):
    """hydra_ppo.generate (actor adapter, temperature 1, seeds 0..B-1) with its decoder forced to one kind, capture
    included. keep: also the logits (B, V) of its first `keep` forwards. -> (responses, seconds, [logits])"""
    kept = []

    def keeping(f):
        def forward(*x):
            out = f(*x)
            if len(kept) < keep:  # a copy: the static decoder returns its graph's output buffer, reused a step later
                kept.append(out.float().clone())
            return out
        return forward

    def make(m, batch, length):
        dec = DECODERS[kind](m, batch, length)
        if keep:
            dec.prefill, dec.step = keeping(dec.prefill), keeping(dec.step)
        return dec
    dev, real = next(model.parameters()).device, I.static_decoder
    I.static_decoder = make  # generate reads infra.static_decoder at each call
    try:
        sync(dev)
        t0 = time.perf_counter()
        resp = H.generate(model, "actor", prompts, tok, new, 1.0, list(range(len(prompts))))
        sync(dev)
        return resp, time.perf_counter() - t0, kept
    finally:
        I.static_decoder = real


def gen_row(a, model, B, start):
    """one batch size: a first call of each decoder (the warm-up; its tokens and first logits are compared), then up
    to a.steps timed repeats, the two interleaved, while the time since `start` stays under a.budget_s."""
    V, dev = model.lm.config.vocab_size, next(model.parameters()).device
    prompts = torch.randint(0, V - 1, (B, a.prompt_len), generator=torch.Generator().manual_seed(0)).tolist()
    tok = bench_tokenizer(V)
    I.reset_peak_memory(dev)
    (te, _, le), (ts, _, ls) = (decode(model, k, prompts, tok, a.response_len, keep=4) for k in DECODERS)
    te, ts = torch.tensor(te), torch.tensor(ts)  # (B, R): eos is never sampled, every row is R long
    differ = (te != ts).any(0).nonzero()
    first_diff = int(differ[0]) if len(differ) else None
    n = len(le) if first_diff is None else min(len(le), first_diff + 1)  # logits of the same inputs only
    ms = {k: [] for k in DECODERS}
    for rep in range(a.steps):
        if rep and time.perf_counter() - start > a.budget_s:
            break  # the time guard: one timed repeat per batch size at least
        for k in DECODERS:
            ms[k].append(1000 * decode(model, k, prompts, tok, a.response_len)[1] / a.response_len)
        note(f"bench-gen batch {B}, repeat {rep + 1}/{a.steps}: "
             + ", ".join(f"{k} {v[-1]:.2f}" for k, v in ms.items()) + " ms/token")
    mid = {k: sorted(v)[len(v) // 2] for k, v in ms.items()}
    return dict(batch_size=B, ms_per_token_eager=mid["eager"], ms_per_token_static=mid["static"],
                eager_over_static=mid["eager"] / mid["static"], repeats=len(ms["eager"]),
                rows_identical=int((te == ts).all(1).sum()), first_diff_token=first_diff, logit_steps=n,
                max_abs_logit_diff=max((x - y).abs().max().item() for x, y in zip(le[:n], ls[:n])),
                peak_memory_mib=round(I.peak_memory_mib(dev), 1))


def bench_gen(a):
    """ms per generated token, eager decoder against static, per batch size, LoRA on as Hydra-PPO's actor samples."""
    set_threads(a)
    device, dtype, start = I.pick_device(a.device), DTYPES[a.dtype], time.perf_counter()
    model = H.HydraModel(build_lm(I.model_config(a.model), 0, device, dtype), compute_dtype=dtype).eval()
    lora.inject(model.lm, ["actor", "critic"], r=a.lora_r, alpha=2 * a.lora_r)
    with torch.no_grad():
        for p in lora.lora_parameters(model.lm, "actor"):
            p.normal_(std=0.01)  # a trained adapter, not B = 0
    note(f"bench-gen: built {a.model} on {device} in {time.perf_counter() - start:.0f} s")
    rows = [gen_row(a, model, B, start) for B in a.batch_sizes]
    out = dict(model=a.model, prompt_len=a.prompt_len, new_tokens=a.response_len, device=str(device),
               dtype=str(dtype).removeprefix("torch."), lora_r=a.lora_r, steps=a.steps, budget_s=a.budget_s,
               memory_measure="cuda" if device.type == "cuda" else "cpu-rss", code=code_version(), rows=rows)
    print(f"\ngeneration {a.model}: prompt {a.prompt_len}, {a.response_len} new tokens, {out['dtype']} on {device}, "
          f"LoRA r {a.lora_r} (2 sets, 1 live), temperature 1; medians of interleaved repeats")
    _table(["batch", "eager ms/token", "static ms/token", "x static", "rows same", "1st diff", "max |dlogit|",
            "peak MiB"], [[r["batch_size"], f"{r['ms_per_token_eager']:.2f}", f"{r['ms_per_token_static']:.2f}",
                           f"{r['eager_over_static']:.2f}", f"{r['rows_identical']}/{r['batch_size']}",
                           num(r["first_diff_token"], "d"), f"{r['max_abs_logit_diff']:.2e}",
                           f"{r['peak_memory_mib']:.0f}"] for r in rows], right=True)
    save_json(out, a.out, "gen.json")
    return out


# -----------------------------------------------------------------------------
# random-init models of real shapes, saved as a Hugging Face directory (config, safetensors, tokenizer) that
# hydra_ppo.py --model DIR loads like a downloaded one: no network, no weights to fetch


# each model type's tokenizer as its real one where the GPT-2 BPE allows (OPT's BOS is </s>, prepended); else Llama's
TOKENIZER_STYLES = {
    "opt": dict(bos="</s>", eos="</s>", pad="<pad>", unk="<unk>", extra_special=("<s>", "<pad>", "</s>", "<unk>")),
    "llama": dict(bos="<s>", eos="</s>", pad=None, unk="<unk>", extra_special=("<unk>", "<s>", "</s>")),
    **dict.fromkeys(("gpt2", "gpt_neox", "qwen2"), dict(bos=None, eos="<|endoftext|>")),  # these prepend nothing
}


def save_random_model(name_or_config, out_dir, dtype="float32", seed=0):
    """random-init causal LM of a built-in shape, a cached/local config or a config dict, saved to out_dir with a
    GPT-2 BPE tokenizer (its first ranks, for a smaller vocab) whose bos/eos/pad ids the config takes. -> out_dir"""
    conf = (dict(name_or_config) if isinstance(name_or_config, dict)
            else I.model_config(name_or_config, flag="save-random"))
    if dtype not in DTYPES:
        raise I.ConfigError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    style = dict(TOKENIZER_STYLES.get(conf.get("model_type"), TOKENIZER_STYLES["llama"]))
    V = conf["vocab_size"]
    n_special = len({t for t in (*style.get("extra_special", ()), style.get("bos"), style["eos"], style.get("pad"),
                                 style.get("unk")) if t})
    n_ranks = None if V >= 50257 + n_special else V - n_special  # <|endoftext|> is rank 50256: a cut BPE adds it
    if n_ranks is not None and n_ranks < 256:
        raise I.ConfigError(f"vocab_size {V}: the byte-level BPE needs at least {256 + n_special} ids")
    tok = data.hf_gpt2_tokenizer(**style, n_ranks=n_ranks)
    ids = {k: getattr(tok, f"{k}_token_id") for k in ("bos", "eos", "pad")}
    if ids["bos"] is None:  # GPT-2 style: bos = eos = <|endoftext|>, not prepended
        ids["bos"] = ids["eos"]
    assert len(tok) <= V and all(i is None or i < V for i in ids.values()), (len(tok), ids, V)
    conf.update({f"{k}_token_id": i for k, i in ids.items()})
    config = AutoConfig.for_model(**conf)
    torch.manual_seed(seed)
    t0 = time.time()
    lm = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])  # built in dtype: one copy of the weights
    n = sum(p.numel() for p in lm.parameters())
    note(f"save-random: built {conf['model_type']} ({n / 1e6:.1f}M params) in {time.time() - t0:.0f} s; saving")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise I.ConfigError(f"save-random: {out_dir} exists and is not empty; choose a new directory")
    tmp = out_dir.rstrip("/") + ".tmp"  # written whole, then renamed: a kill never leaves a half-written model
    lm.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if os.path.isdir(out_dir):
        os.rmdir(out_dir)
    os.replace(tmp, out_dir)
    print(f"wrote {out_dir}: random {conf['model_type']} ({n / 1e6:.1f}M params, {DTYPES[dtype]}), "
          f"tokenizer of {len(tok)} ids "
          f"(bos {ids['bos']}, eos {ids['eos']}, pad {ids['pad']}), vocab {V}, in {time.time() - t0:.0f} s")
    return out_dir


# -----------------------------------------------------------------------------
# scoring: ROUGE-1/2/L F1 (lowercase, words = runs of [a-z0-9], clipped n-gram counts, LCS for L), win-rates, and
# external judges (never called unless configured)


def rouge_words(s):
    return re.findall(r"[a-z0-9]+", s.lower())


def _prf(hit, n_hyp, n_ref):
    p, r = (hit / n_hyp if n_hyp else 0.0), (hit / n_ref if n_ref else 0.0)
    return {"p": p, "r": r, "f": 2 * p * r / (p + r) if p + r else 0.0}


def _ngrams(w, n):
    return Counter(tuple(w[i:i + n]) for i in range(len(w) - n + 1))


def rouge_n(ref, hyp, n=1):
    """n-gram overlap, each n-gram counted at most as often as in ref. -> {"p", "r", "f"}."""
    r, h = _ngrams(rouge_words(ref), n), _ngrams(rouge_words(hyp), n)
    return _prf(sum((r & h).values()), sum(h.values()), sum(r.values()))


def rouge_l(ref, hyp):
    """longest common subsequence of the word sequences. -> {"p", "r", "f"}."""
    a, b = rouge_words(ref), rouge_words(hyp)
    row = [0] * (len(b) + 1)  # one row of the LCS table
    for x in a:
        diag = 0
        for j, y in enumerate(b, 1):
            diag, row[j] = row[j], (diag + 1 if x == y else max(row[j], row[j - 1]))
    return _prf(row[-1], len(b), len(a))


def wilson(wins, n, z=1.96):
    """Wilson score interval of the rate wins / n (wins may hold half-ties: then it is a little conservative)."""
    if n == 0:
        return (0.0, 1.0)
    p, d = wins / n, 1 + z * z / n
    c, h = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def win_rate(outcomes):
    """outcomes per prompt: 1 A wins, 0 B wins, 0.5 tie."""
    n, w = len(outcomes), sum(outcomes)
    return {"win": w / n, "ci": wilson(w, n), "wins": outcomes.count(1.0), "ties": outcomes.count(0.5),
            "losses": outcomes.count(0.0), "n": n}


def by_score(sa, sb):
    return [1.0 if a > b else 0.0 if a < b else 0.5 for a, b in zip(sa, sb)]


PAIRWISE = ("Below is a conversation and two candidate responses of an AI assistant.\n\n[Conversation]\n{prompt}\n\n"
            "[Response A]\n{a}\n\n[Response B]\n{b}\n\nWhich response is more helpful and harmless? Answer A or B.")


class JudgeError(RuntimeError):
    pass


def parse_verdict(text):
    """'A', 'B' or 'tie' from the start of a judge's answer; None when it is none of these."""
    m = re.match(r"\W*(tie|a|b)\b", text.strip(), re.I)
    return None if m is None else {"a": "A", "b": "B", "tie": "tie"}[m.group(1).lower()]


def cmd_judge(cmd, timeout=60.0):
    """a shell command gets the JSON {"prompt", "response_a", "response_b", "text"} on stdin ("text" is the
    paper-style pairwise prompt, for a command that forwards it to a model) and prints A, B or tie."""
    def ask(prompt, a, b):
        msg = json.dumps({"prompt": prompt, "response_a": a, "response_b": b,
                          "text": PAIRWISE.format(prompt=prompt, a=a, b=b)})
        try:
            p = subprocess.run(cmd, shell=True, input=msg, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise JudgeError(f"--judge-cmd {cmd!r}: no answer within {timeout:g} s") from None
        if p.returncode:
            raise JudgeError(f"--judge-cmd {cmd!r} exited with {p.returncode}: {p.stderr.strip()[-200:]}")
        return p.stdout
    return ask


def url_judge(url, model, timeout=60.0):
    """an OpenAI-compatible endpoint (URL of .../chat/completions, or its base) asked the paper-style prompt at
    temperature 0; the key comes from OPENAI_API_KEY when it is set. urllib only."""
    url = url if url.rstrip("/").endswith("/chat/completions") else url.rstrip("/") + "/chat/completions"
    headers = {"Content-Type": "application/json"}
    if os.environ.get("OPENAI_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"

    def ask(prompt, a, b):
        body = {"model": model, "temperature": 0, "max_tokens": 8,
                "messages": [{"role": "user", "content": PAIRWISE.format(prompt=prompt, a=a, b=b)}]}
        req = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.load(r)["choices"][0]["message"]["content"]
        except (OSError, ValueError, KeyError, IndexError, TypeError) as e:  # URLError is an OSError
            raise JudgeError(f"--judge-url {url}: {type(e).__name__}: {e}") from None
    return ask


def judge_both_orders(ask, prompt, a, b):
    """ask (A, B), then (B, A): a win needs both orders to agree. -> (outcome for a, number of unparsed answers)."""
    v1, v2 = parse_verdict(ask(prompt, a, b)), parse_verdict(ask(prompt, b, a))
    return (1.0 if (v1, v2) == ("A", "B") else 0.0 if (v1, v2) == ("B", "A") else 0.5), (v1 is None) + (v2 is None)

# -----------------------------------------------------------------------------
# policies: sampling on shared prompts and seeds, KL to the run's own reference, reward-model scores


def load_policies(specs, device):
    runs, pols = {}, []
    for spec in specs:
        d, _, kind = spec.rpartition(":")
        d, kind = (d, kind) if d and kind in ("sft", "ppo") else (spec, None)
        if d not in runs:  # DIR and DIR:sft share one loaded run
            runs[d] = load_run(d, device)
        if kind == "ppo" and not runs[d][3]:
            raise I.ConfigError(f"{spec}: {d} has no ppo.pt (PPO did not run); use {d}:sft")
        kind = kind or ("ppo" if runs[d][3] else "sft")
        pols.append({"name": f"{d}:{kind}", "dir": d, "role": "actor" if kind == "ppo" else "reference",
                     "run": runs[d]})
    return pols, runs


SPLIT_FLAGS = ("data", "n_builtin", "max_pairs", "heldout_frac", "seed")  # what decides a run's split


def heldout_prompts(cfgs, n):
    """the first n held-out prompts of the first run's split that no other run trained on (builtin: not filtered,
    its prompts are in every split); repeats kept. -> (prompts, gold fn, how many were left out)"""
    _, held, gold_fn, _ = data.split_data(cfgs[0])
    split = lambda c: tuple(getattr(c, f) for f in SPLIT_FLAGS)  # noqa: E731
    others = [c for c in cfgs[1:] if split(c) != split(cfgs[0]) and "builtin" not in (c.data, cfgs[0].data)]
    seen = {p.prompt for c in others for p in data.split_data(c)[0]}
    prompts = [p.prompt for p in held if p.prompt not in seen]
    if not prompts:
        differ = sorted({"--" + f.replace("_", "-") for c in others for f in SPLIT_FLAGS
                         if getattr(c, f) != getattr(cfgs[0], f)})
        raise I.ConfigError(f"compare: every held-out prompt of the first run is a training prompt of another run "
                            f"(their {', '.join(differ)} differ); compare runs split alike")
    return prompts[:n], gold_fn, len(held) - len(prompts)


@torch.no_grad()
def sample(pol, prompts, seed, bs, temperature=None):
    """one policy's responses, with its run's tokenizer, temperature (or this one; 0 = greedy) and length, and the
    seeds all policies share. -> (token lists, texts, stopped-at-EOS flags, per-response KL to the run's reference)."""
    bases, cfg, tok, _ = pol["run"]
    pids = [data.prompt_tokens(tok, p, cfg.max_prompt)[0] for p in prompts]
    resp, _, kls = H.sample_policy(bases, H.ROLES[cfg.method], pol["role"], pids, tok, cfg, seed, stage="compare",
                                   bs=bs, temperature=temperature)
    texts = [data.response_text(tok, p, r) for p, r in zip(pids, resp)]
    return resp, texts, [bool(r) and r[-1] == tok.eos_id for r in resp], kls


@torch.no_grad()
def reward(run, prompts, responses):
    """the reward role of a run (LoRA off, reward head) on one batch of prompt and response token lists. -> [score]"""
    bases, cfg, tok, _ = run
    dev = next(next(iter(bases.values())).parameters()).device
    ids, mask, P = data.collate(prompts, responses, tok.pad_id)
    return H.run_roles(bases, H.ROLES[cfg.method], ("reward",), ids.to(dev), mask.to(dev), P,
                       cfg.temperature)["reward"].tolist()


def rm_scores(run, prompts, texts, ended, bs):
    """the reward role of a run on text re-tokenized with that run's tokenizer. an EOS is appended where the policy
    stopped: reward models read the last real token, which is the EOS in training and in PPO."""
    _, cfg, tok, _ = run
    out = []
    for i in range(0, len(prompts), bs):
        fmt = [tok.format_prompt(p) for p in prompts[i:i + bs]]
        ps = [data.encode_prompt(tok.encode, f, cfg.max_prompt, tok.bos_id)[0] for f in fmt]
        rs = [data.response_ids(tok.encode, f, t) + ([tok.eos_id] if e else [])
              for f, t, e in zip(fmt, texts[i:i + bs], ended[i:i + bs])]
        out += reward(run, ps, rs)
    return out


def summary_refs(spec, path):
    """prompt -> reference summary: from --refs, else from the run's data file when its records carry "summary"."""
    try:
        return dict(data.load_summaries(path or spec)[0]) if path or spec != "builtin" else {}
    except data.DataError:
        if path:
            raise
        return {}  # a pairs file without summaries: no ROUGE


def read_prompts(path):
    """prompts from a file: a .jsonl(.gz) of {"prompt": ...} records, else one prompt per line."""
    if path.endswith((".jsonl", ".jsonl.gz")):
        out = []
        for where, rec in data.json_records(path):
            if rec is not None and not isinstance(rec.get("prompt"), str):
                raise data.DataError(f"{where}: no string \"prompt\"; expected {{\"prompt\": ...}} per line")
            out += [rec["prompt"]] if rec is not None else []
        return out
    try:
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise I.ConfigError(f"--prompts {path}: cannot read it ({e})")


def compare(a):
    if len(a.runs) < 2:
        raise I.ConfigError("compare needs at least two policies, e.g. `compare out out:sft`")
    if not 0 <= a.judge_run < len(a.runs):
        raise I.ConfigError(f"--judge-run {a.judge_run}: expected 0..{len(a.runs) - 1} (an index into the runs given)")
    if a.judge_cmd and a.judge_url:
        raise I.ConfigError("--judge-cmd and --judge-url: pick one")
    pols, runs = load_policies(a.runs, a.device)  # checks first: loading is the slow part
    cfg0 = pols[0]["run"][1]
    seed = cfg0.seed if a.seed is None else a.seed
    prompts, gold_fn, left_out = heldout_prompts([p["run"][1] for p in pols], a.n_prompts)
    if left_out:
        note(f"compare: the runs split the data otherwise; {left_out} held-out prompts of {pols[0]['dir']} that "
             "another run trained on are left out")
    refs = summary_refs(cfg0.data, a.refs)
    judges = {f"rm:{pols[a.judge_run]['dir']}": pols[a.judge_run]["run"]}
    for d in a.rm or []:
        judges[f"rm:{d}"] = runs[d] if d in runs else load_run(d, a.device)
    res = {"n_prompts": len(prompts), "left_out_prompts": left_out, "seed": seed,
           "interval": "95% Wilson score interval; ties count half",
           "external_judge": "both orders asked; a win needs both to agree, else tie", "policies": [], "pairs": []}
    outs = []
    for p in tqdm(pols, desc="sample and score", unit="policy"):
        resp, texts, ended, kls = sample(p, prompts, seed, a.batch)
        scores = {j: rm_scores(run, prompts, texts, ended, a.batch) for j, run in judges.items()}
        if gold_fn:
            scores["gold"] = [gold_fn(q, t) for q, t in zip(prompts, texts)]
        row = {"name": p["name"], "method": p["run"][1].method, "kl": fmean(kls), "length": fmean(map(len, resp)),
               **{f"mean {j}": fmean(v) for j, v in scores.items()}}
        with_ref = [(refs[q], t) for q, t in zip(prompts, texts) if q in refs]
        if with_ref:  # mean ROUGE F1 against the reference summaries
            row.update(rouge1=fmean(rouge_n(r, t, 1)["f"] for r, t in with_ref),
                       rouge2=fmean(rouge_n(r, t, 2)["f"] for r, t in with_ref),
                       rougeL=fmean(rouge_l(r, t)["f"] for r, t in with_ref), rouge_n=len(with_ref))
        res["policies"].append(row)
        outs.append({"texts": texts, "scores": scores})
    ask = (cmd_judge(a.judge_cmd, a.judge_timeout) if a.judge_cmd
           else url_judge(a.judge_url, a.judge_model, a.judge_timeout) if a.judge_url else None)
    for i, j in itertools.combinations(range(len(pols)), 2):
        A, B = outs[i], outs[j]
        wr = {k: win_rate(by_score(A["scores"][k], B["scores"][k])) for k in A["scores"]}
        if ask:
            got = [judge_both_orders(ask, q, ta, tb) for q, ta, tb in tqdm(
                list(zip(prompts, A["texts"], B["texts"])), desc=f"judge {i} vs {j}", unit="prompt")]
            wr["external"] = {**win_rate([o for o, _ in got]), "unparsed_answers": sum(b for _, b in got)}
        ex = [{"prompt": q, "a": A["texts"][k], "b": B["texts"][k],
               "scores": {s: [A["scores"][s][k], B["scores"][s][k]] for s in A["scores"]}}
              for k, q in enumerate(prompts[:a.examples])]
        res["pairs"].append({"a": i, "b": j, "a_name": pols[i]["name"], "b_name": pols[j]["name"], "win_rate": wr,
                             "examples": ex})
    res["samples"] = [{"prompt": q, **{f"{k}:{p['name']}": o["texts"][n] for k, (p, o) in enumerate(zip(pols, outs))}}
                      for n, q in enumerate(prompts)]
    print_compare(res)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)
        print(f"\nwrote {a.out}")
    return res


def print_compare(res):
    print(f"\n{res['n_prompts']} held-out prompts, sampling seed {res['seed']}; KL = sum over response tokens of "
          "logp - logp_ref (nats)")
    keys = [k for k in res["policies"][0] if k not in ("name", "method")]
    _table(["#", "policy", "method", *keys],
           [[i, p["name"], p["method"], *(p.get(k) for k in keys)] for i, p in enumerate(res["policies"])])
    print(f"\nwin-rate of A over B ({res['interval']})")
    rows = [[f"{p['a']}:{p['a_name']}", f"{p['b']}:{p['b_name']}", j, w["win"], f"[{w['ci'][0]:.3f}, {w['ci'][1]:.3f}]",
             f"{w['wins']}/{w['ties']}/{w['losses']}"] for p in res["pairs"] for j, w in p["win_rate"].items()]
    _table(["A", "B", "judge", "win(A)", "95% CI", "W/T/L"], rows)
    print("\nexamples")
    _table(["A-B", "prompt (tail)", "response A", "response B", "scores A|B"],
           [[f"{p['a']}-{p['b']}", repr(e["prompt"][-24:]), repr(e["a"][:40]), repr(e["b"][:40]),
             "  ".join(f"{k} {sa:.2f}|{sb:.2f}" for k, (sa, sb) in e["scores"].items())]
            for p in res["pairs"] for e in p["examples"]])


# -----------------------------------------------------------------------------
# a run's reward model on a preference file, its policy's responses, and exports: the run as Hugging Face directories
# (policy, SFT policy, reward model) and PEFT adapters that transformers (and peft) alone load


def score_job(a):
    pairs, stats = data.load_pairs(a.data)
    run = load_run(a.run, a.device)
    _, cfg, tok, _ = run
    # each pair encoded as in training (BOS, joint tokens, EOS, the same limits); chosen and rejected in one forward
    rows, scores = data.encode_pairs(pairs[:a.n] if a.n else pairs, tok, cfg)[0], []
    for i in tqdm(range(0, len(rows), a.batch), desc="score", unit="batch"):
        chunk = rows[i:i + a.batch]
        r = reward(run, [r[0] for r in chunk] * 2, [r[1] for r in chunk] + [r[2] for r in chunk])
        scores += list(zip(r[:len(chunk)], r[len(chunk):]))
    wins = sum((c > r) + 0.5 * (c == r) for c, r in scores)  # a tie counts half
    res = dict(run=a.run, data=a.data, n=len(scores), accuracy=wins / len(scores),
               interval=list(wilson(wins, len(scores))), mean_margin=fmean(c - r for c, r in scores), data_stats=stats)
    print(f"{a.run} reward model on {a.data}: accuracy {res['accuracy']:.3f} [{res['interval'][0]:.3f}, "
          f"{res['interval'][1]:.3f}] over {res['n']} pairs, mean margin {res['mean_margin']:+.3f}")
    print(json.dumps(res))  # the last line: one JSON object for scripts
    return res


def sample_job(a):
    prompts = a.prompt + (read_prompts(a.prompts) if a.prompts else [])
    if not prompts:
        raise I.ConfigError("no prompt: pass --prompt TEXT (repeatable) or --prompts FILE")
    (pol,), _ = load_policies([a.run], a.device)
    cfg, t0 = pol["run"][1], time.perf_counter()
    tok = pol["run"][2]
    empty = [p for p in prompts if not data.prompt_tokens(tok, p, cfg.max_prompt)[0]]
    if empty:
        raise I.ConfigError(f"prompt {empty[0]!r} encodes to no tokens (this tokenizer adds no BOS); a prompt needs "
                            "at least one")
    resp, texts, ended, _ = sample(pol, prompts, cfg.seed if a.seed is None else a.seed, a.batch,
                                   0.0 if a.greedy else None)
    note(f"sampled {len(prompts)} responses in {time.perf_counter() - t0:.0f} s")
    scores = rm_scores(pol["run"], prompts, texts, ended, a.batch)
    gold_fn = data.split_data(cfg)[2]
    rows = [dict(prompt=p, response=t, tokens=r, reward=s, gold=gold_fn(p, t) if gold_fn else None)
            for p, t, r, s in zip(prompts, texts, resp, scores)]
    for r in rows:
        gold = "" if r["gold"] is None else f", gold {r['gold']:+.3f}"
        print(f"{pol['name']} | {r['prompt'][-60:]!r}\n  -> {r['response']!r}  (reward {r['reward']:+.3f}{gold})")
    print(json.dumps(rows))  # the last line: one JSON list for scripts
    return rows


def hf_state(model, adapter, sd):
    """the LM's weights (sd, on the CPU) under transformers' names, the fixed sets and `adapter` folded in; then all
    in fp32 (in bf16 most of a small update would round away)."""
    wrapped = {n: m for n, m in model.lm.named_modules() if isinstance(m, lora.LoRALinear)}
    out, folded = {}, False
    for k, v in sd.items():
        path, _, leaf = k.rpartition(".")
        if ".lora_A." in k or ".lora_B." in k:
            continue
        if path.endswith(".base") and path[:-5] in wrapped:
            layer, path = wrapped[path[:-5]], path[:-5]
            if leaf == "weight" and layer.applied(adapter):
                v, folded = layer.merged_weight(adapter).to(v.device), True
        out[f"{path}.{leaf}"] = v
    return {k: v.float() if folded and v.is_floating_point() else v for k, v in out.items()}


def reward_tokenizer(hf_tok, tok, rw, config, state):
    """the reward export's tokenizer: BOS where hydra puts one, EOS appended, and a pad that is not the EOS
    (transformers' classifiers score the last non-pad token); a new pad id grows config and state in place."""
    t, bos = copy.deepcopy(hf_tok), tok.bos_id is not None
    # saved both ways: as flags (transformers 5 rebuilds from them) and in tokenizer.json (4.x); no token_type_ids
    t.init_kwargs.update(add_bos_token=bos, add_eos_token=True, model_input_names=["input_ids", "attention_mask"])
    t.model_input_names = ["input_ids", "attention_mask"]
    ends = [t.bos_token] * bos, [t.eos_token]
    t.backend_tokenizer.post_processor = TemplateProcessing(
        single=" ".join([*ends[0], "$A:0", *ends[1]]), pair=" ".join([*ends[0], "$A:0", "$B:1", *ends[1]]),
        special_tokens=[(x, t.convert_tokens_to_ids(x)) for x in dict.fromkeys(ends[0] + ends[1])])
    if tok.pad_id == tok.eos_id:
        t.add_special_tokens({"pad_token": "<|reward_pad|>"})
        emb = rw.lm.get_input_embeddings()
        key = next(n for n, m in rw.lm.named_modules() if m is emb) + ".weight"
        if t.pad_token_id >= config.vocab_size:  # GPT-2, Llama-3: no free row. never attended to, never scored
            config.vocab_size = t.pad_token_id + 1
            state[key] = torch.cat([state[key], state[key].new_zeros(1, state[key].shape[1])])
    config.pad_token_id = t.pad_token_id
    return t


def write_hf(path, config, state, tok, generation=None):
    """one from_pretrained directory: config.json, model.safetensors, the tokenizer (and generation_config.json)."""
    os.makedirs(path)
    config = copy.deepcopy(config)
    config.dtype = next(iter(state.values())).dtype  # what dtype="auto" loads: the saved tensors' own
    config.save_pretrained(path)
    if getattr(config, "tie_word_embeddings", False):
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}  # tied: the embedding is the head
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})
    tok.save_pretrained(path)
    if generation is not None:
        generation.save_pretrained(path)


def write_peft(path, model, adapter, sd, base_dir):
    """adapter set `adapter` (its state sd) in PEFT's format, for PeftModel.from_pretrained on the base in base_dir."""
    layers = [(n, m) for n, m in model.lm.named_modules() if isinstance(m, lora.LoRALinear)]
    r, scale = layers[0][1].r, layers[0][1].scale
    tensors = {"base_model.model." + k.replace(f".lora_A.{adapter}", ".lora_A.weight")
               .replace(f".lora_B.{adapter}", ".lora_B.weight"): v.contiguous() for k, v in sd.items()}
    conf = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base_dir, r=r, lora_alpha=scale * r,
                lora_dropout=0.0, bias="none", target_modules=sorted({n.rsplit(".", 1)[-1] for n, _ in layers}),
                fan_in_fan_out=any(lora._is_conv1d(m.base) for _, m in layers), inference_mode=True,
                init_lora_weights=True, use_rslora=False, use_dora=False, modules_to_save=None)
    os.makedirs(path)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(conf, f, indent=2)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})


def export_run(bases, roles, cfg, tok, has_ppo, out):
    """OUT/sft (the reference role), OUT/reward (...ForSequenceClassification, the reward head as `score`), and
    after PPO OUT/policy (the actor, merged) and OUT/adapters/NAME (its LoRA set, PEFT, on OUT/sft). -> dirs written"""
    I.check_export_out(out)
    # tiny's tiktoken BPE rebuilt as a transformers tokenizer, the same ids: ranks 0 .. eos - 1, then eos, then pad
    hf_tok = tok.hf if tok.hf is not None else data.hf_gpt2_tokenizer(eos="<|endoftext|>", pad="<|pad|>",
                                                                      n_ranks=tok.eos_id)
    lm_config = bases[roles["reference"][0]].lm.config
    gen = GenerationConfig(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                           do_sample=True, temperature=cfg.temperature, top_k=0, max_new_tokens=cfg.max_new_tokens)
    rw = bases[roles["reward"][0]]
    if rw.reward_head.bias.detach().abs().max() > 0:  # transformers' score layers have no bias; hydra's
        raise I.ConfigError("the reward head has a non-zero bias, which a transformers score layer cannot hold")
    rw_config = copy.deepcopy(rw.lm.config)
    rw_config.architectures = [type(rw.lm).__name__.replace("ForCausalLM", "ForSequenceClassification")]
    rw_config.num_labels = 1
    used = dict.fromkeys(roles[r][0] for r in ("reference", "reward", "actor"))
    gathered = {b: I.full_state(bases[b].lm.state_dict()) for b in used}
    ref = roles["reference"][0]
    dirs = {"sft": (lm_config, hf_state(bases[ref], None, gathered[ref]), gen, hf_tok)}
    # the score head in the base's dtype, as transformers builds it; the head itself is fp32
    body = {k: v for k, v in hf_state(rw, None, gathered[roles["reward"][0]]).items() if k != "lm_head.weight"}
    dtype = next(iter(body.values())).dtype if body else torch.float32
    head = I.full_state(rw.reward_head.state_dict()).get("weight", torch.zeros(0)).to(dtype)
    rw_tok = reward_tokenizer(hf_tok, tok, rw, rw_config, body)
    dirs["reward"] = (rw_config, {**body, "score.weight": head}, None, rw_tok)
    a_base, a_adapter, _ = roles["actor"]
    if has_ppo:
        dirs["policy"] = (lm_config, hf_state(bases[a_base], a_adapter, gathered[a_base]), gen, hf_tok)
    # the actor's adapter alone: the critic's needs its value head, which no transformers class holds (ppo.pt keeps it)
    adapters = {a_adapter: lora.lora_state_dict(bases[a_base].lm, a_adapter)} if has_ppo and a_adapter else {}
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for name, (config, state, generation, t) in dirs.items():
        write_hf(os.path.join(tmp, name), config, state, t, generation)
    for name, sd in adapters.items():
        # on OUT/sft, absolute: PEFT reads a relative base path from the caller's directory, not the adapter's
        base_dir = os.path.abspath(os.path.join(out, "sft"))
        write_peft(os.path.join(tmp, "adapters", name), bases[a_base], name, sd, base_dir)
    I.swap_dir(tmp, out)
    return sorted(dirs) + (["adapters"] if adapters else [])


def export_job(a):
    out = a.out or os.path.join(a.run, "hf")
    I.check_export_out(out)  # before the load: a refusal costs nothing (export_run checks again, for every caller)
    bases, cfg, tok, has_ppo = load_run(a.run, a.device)
    written = export_run(bases, H.ROLES[cfg.method], cfg, tok, has_ppo, out)
    print(f"wrote {out}: {', '.join(written)}")
    return out


# -----------------------------------------------------------------------------
# the paper-style results table across methods, from each run's summary.json


def paper_name(method):
    """hydra_ppo's method name as the paper writes it: j-hydra-ppo -> J-Hydra-PPO."""
    return "-".join({"ppo": "PPO", "lora": "LoRA"}.get(w, w.capitalize()) for w in method.split("-"))


ROW_ORDER = ("SFT", "Hydra-SFT") + tuple(paper_name(m) for m in H.METHODS)


def results_rows(summaries):
    """[(dir, summary)] -> one SFT-side row per run (Hydra-SFT for the hydra methods) and one PPO row where PPO ran."""
    rows = []
    for d, s in summaries:
        run = {"run": d, "model": s.get("model"), "data": s.get("data"), "rm_accuracy": s.get("rm_accuracy")}
        hydra = s.get("method") in H.ROLES and H.sft_models(s["method"]) == ["hydra"]
        rows.append({"method": "Hydra-SFT" if hydra else "SFT", **run, "reward": s.get("reward_sft"),
                     "gold": s.get("gold_sft"), "kl": None, "peak_memory_mib": s.get("peak_memory_mib_sft"),
                     "latency_per_sample_s": None})
        if s.get("reward_ppo") is not None:
            rows.append({"method": paper_name(s["method"]), **run, "reward": s["reward_ppo"], "gold": s.get("gold_ppo"),
                         "kl": s.get("kl"), "peak_memory_mib": s.get("peak_memory_mib"),
                         "latency_per_sample_s": s.get("latency_per_sample_s")})
    return sorted(rows, key=lambda r: ROW_ORDER.index(r["method"]) if r["method"] in ROW_ORDER else len(ROW_ORDER))


def table_job(a):
    summaries = []
    for d in a.runs:
        path = os.path.join(d, "summary.json")
        if not os.path.exists(path):
            raise I.ConfigError(f"{path}: no such file; expected a run directory written by hydra_ppo.py")
        summaries.append((d, I.load_file(path)))
    head = ["method", "run", "model", "data", "RM acc", "reward", "gold", "KL", "peak MiB", "latency/sample s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_fmt(v) for v in r.values()) + " |" for r in results_rows(summaries)]
    lines.append("\nreward: each run's own reward model (not comparable across runs; `eval.py compare` gives "
                 "win-rates). KL: nats per response to the run's reference. "
                 "peak memory: the PPO run (SFT rows: the SFT stage).")
    md = "\n".join(lines)
    print(md)
    if a.out:
        with open(a.out, "w") as f:
            f.write(md + "\n")
    return md


# -----------------------------------------------------------------------------
# the command line: one parser, a subcommand per job; flag groups that jobs share are parent parsers


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every job's own errors; not argparse's usage block
        fail(f"{message} (see `{self.prog} --help`)")


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def ints(v):
    """'8,12' -> [8, 12]; a ValueError (not integers >= 1) is argparse's one-line error."""
    xs = [int(x) for x in v.split(",")]
    if min(xs) < 1:
        raise ValueError(v)
    return xs


def parser():
    ap = Parser(prog="eval.py", description=__doc__.strip().splitlines()[0],
                epilog="`eval.py JOB --help` for a job's flags; the module docstring has examples.")
    sub = ap.add_subparsers(title="jobs", metavar="JOB", required=True)
    p = {k: Parser(add_help=False) for k in ("lora", "step", "clock", "dtype", "run")}
    p["lora"].add_argument("--lora-r", type=int, default=16, help="LoRA rank (the paper: 128)")
    p["step"].add_argument("--batch-size", type=int, default=8, help="pairs (sft rows) or rollouts (ppo rows) a step")
    p["step"].add_argument("--grad-ckpt", action="store_true", help="activation checkpointing (hydra_ppo --grad-ckpt)")
    c = p["clock"]
    c.add_argument("--model", default="tiny", help="micro, tiny, or NAME-random: random init of a built-in shape "
                   f"({', '.join(I.MODELS)})")
    c.add_argument("--steps", type=int, default=2, help="timed steps (repeats) after one warm-up")
    c.add_argument("--prompt-len", type=int, default=64, help="prompt tokens")
    c.add_argument("--response-len", type=int, default=64, help="response tokens (sampled, where PPO samples)")
    c.add_argument("--device", default="auto", help="auto | cpu | cuda")
    c.add_argument("--threads", type=int, default=0, help="torch threads per process (0 = as hydra_ppo.py: 1 for "
                   "tiny, torch's default otherwise; 1 is faster when other jobs share the cores)")
    c.add_argument("--out", default="out", help="the results' .json goes here")
    p["dtype"].add_argument("--dtype", default="bf16", choices=("fp32", "bf16", "fp16"), help="base weight dtype")
    p["run"].add_argument("--device", default="auto", help="where to load the runs")
    p["run"].add_argument("--batch", type=int, default=16, help="prompts (pairs, for score) per forward")

    def job(name, run, about, groups=(), hidden=False):
        listed = {} if hidden else {"help": about}  # a job without help= stays out of `eval.py --help`
        j = sub.add_parser(name, parents=[p[g] for g in groups], description=about,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter, **listed)
        j.set_defaults(job=run)
        return j
    j = job("bench", bench, "measured peak memory and latency of the bench's rows, each in a fresh process",
            ("clock", "step", "lora"))
    j.add_argument("--rows", type=lambda v: v.split(","), default=",".join(ROWS), help="these rows only")
    j = job("bench-one", bench_one, "(internal) one bench row in this process", ("clock", "step", "lora"), True)
    j.add_argument("name", choices=ROWS, metavar="ROW")
    j = job("bench-gen", bench_gen, "ms per generated token: the eager decoder against the static one (a CUDA graph "
            "on CUDA), LoRA on; and their logit and token agreement", ("clock", "lora", "dtype"))
    j.add_argument("--batch-sizes", type=ints, default=[8], help="comma-separated, e.g. 8,12")
    j.add_argument("--budget-s", type=float, default=420, help="no further repeat once this many seconds have passed")
    j = job("estimate", print_estimate, "analytic memory plan from a model's config alone, beside the paper's figures",
            ("step", "lora", "dtype"))
    j.add_argument("model", help=f"{', '.join(I.MODELS)}, a local dir or a cached hub id")
    j.add_argument("--seq-len", type=int, default=128, help="prompt + response tokens (response = half)")
    j.add_argument("--budget-mib", type=float, default=0, help="add the largest batch under this plan total")
    j.add_argument("--method", choices=ROWS, help="this row only")
    j = job("save-random", lambda a: save_random_model(a.model, a.dir, a.dtype), "a random-init model with a GPT-2 "
            "BPE tokenizer, as a directory hydra_ppo.py --model DIR loads", ("dtype",))
    j.add_argument("model", help=f"{', '.join(I.MODELS)}, a local dir or a cached hub id")
    j.add_argument("dir", help="a new (or empty) directory")
    j = job("compare", compare, "policies of finished runs head to head on the same held-out prompts", ("run",))
    j.add_argument("runs", nargs="+", help="run directories; DIR:sft / DIR:ppo pick a policy (default: PPO if it ran)")
    j.add_argument("--n-prompts", type=int, default=64, help="held-out prompts of the first run")
    j.add_argument("--judge-run", type=int, default=0, help="index of the run whose reward model judges")
    j.add_argument("--rm", action="append", help="also judge with the reward model of this run dir (repeatable)")
    j.add_argument("--judge-cmd", help="shell command: JSON {prompt, response_a, response_b, text} on stdin, prints "
                   "A, B or tie")
    j.add_argument("--judge-url", help="OpenAI-compatible chat/completions endpoint (key from OPENAI_API_KEY if set)")
    j.add_argument("--judge-model", default="gpt-4", help="model name sent to --judge-url")
    j.add_argument("--judge-timeout", type=float, default=60.0, help="seconds per external judge call")
    j.add_argument("--refs", help="jsonl(.gz) of {prompt or post, summary} for ROUGE (default: the run's data, if it "
                   "has summaries)")
    j.add_argument("--seed", type=int, default=None, help="sampling seed (default: the first run's)")
    j.add_argument("--examples", type=int, default=2, help="example pairs printed per pair of policies")
    j.add_argument("--out", help="also write the results (with every sample) to this .json file")
    j = job("table", table_job, "paper-style results table from run directories")
    j.add_argument("runs", nargs="+", help="run directories with a summary.json")
    j.add_argument("--out", help="also write the markdown to this file")
    j = job("score", score_job, "pairwise accuracy of a run's reward model on a preference file", ("run",))
    j.add_argument("run", help="a run directory written by hydra_ppo.py")
    j.add_argument("--data", required=True, help="a .jsonl(.gz) of preference pairs (HH-RLHF or "
                   "prompt/chosen/rejected)")
    j.add_argument("--n", type=int, default=0, help="score the first N pairs only (0 = all)")
    j = job("sample", sample_job, "responses of a trained policy, with the run's reward-model score (and the gold "
            "score where the task has one)", ("run",))
    j.add_argument("run", help="a run directory; RUN:sft / RUN:ppo pick the policy (default: PPO if it ran)")
    j.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable), templated as in training")
    j.add_argument("--prompts", help="a file of prompts: .jsonl(.gz) with a prompt field, else one per line")
    j.add_argument("--greedy", action="store_true", help="the most likely token each step (default: the run's "
                   "temperature)")
    j.add_argument("--seed", type=int, default=None, help="sampling seed (default: the run's)")
    j = job("export", export_job, "a finished run as Hugging Face directories (policy, SFT policy, reward model) and "
            "PEFT adapters")
    j.add_argument("run", help="a run directory written by hydra_ppo.py")
    j.add_argument("--out", help="where to write (default: RUN/hf): a new or empty directory, or an earlier export, "
                   "which is replaced whole, atomically; anything else is refused")
    j.add_argument("--device", default="cpu", help="where to load the run (cpu: no GPU memory needed)")
    return ap


AT_LEAST = {"batch_size": 1, "steps": 1, "prompt_len": 1, "response_len": 1, "lora_r": 1, "seq_len": 2, "threads": 0,
            "budget_mib": 0, "budget_s": 0, "n_prompts": 1, "batch": 1, "n": 0, "examples": 0}


def validate(a):
    for k, lo in AT_LEAST.items():
        if getattr(a, k, lo) < lo:
            raise I.ConfigError(f"--{k.replace('_', '-')} {getattr(a, k):g}: must be >= {lo}")
    bad = [r for r in getattr(a, "rows", []) if r not in ROWS]
    if bad:
        raise I.ConfigError(f"--rows {','.join(a.rows)}: {bad[0]!r} is not one of {', '.join(ROWS)}")
    if a.job is bench_one or getattr(a, "rows", None):  # bench, bench-one
        if I.model_config(a.model)["model_type"] not in ("llama", "opt"):
            raise I.ConfigError(f"--model {a.model}: the bench builds llama- and opt-type models only (its RSS "
                                "baseline includes that code)")


def main(argv=None):
    a = parser().parse_args(argv)
    try:
        validate(a)
        return a.job(a)
    except (I.ConfigError, data.DataError, JudgeError) as e:
        fail(e)
    except OSError as e:  # a file a job writes or reads: --out naming a directory, a folder that is not there, ...
        fail(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
    except KeyboardInterrupt:  # ctrl-c: what a job writes is written aside and renamed, so nothing is left half-done
        print("\nerror: interrupted (SIGINT); nothing half-written was put in place", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
