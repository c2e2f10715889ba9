"""
Hydra-RLHF in one file (arXiv 2309.00754, "Efficient RLHF: Reducing the Memory Usage of PPO").

  1. Hydra-SFT: one decoder, two heads (LM head + reward head), trained together on preference pairs.
  2. PPO with only LoRA trainable on that one frozen base. The global switch in lora.py turns LoRA off, and the
     same weights then *are* the reference model (LM head) and the reward model (reward head).

    python hydra_ppo.py                                  # tiny model, built-in task: Hydra-SFT, Hydra-PPO, eval
    torchrun --nproc_per_node 2 hydra_ppo.py [--fsdp]     # data parallel (or sharded) over 2 processes

Top to bottom: Config, HydraModel, ROLES (Table 2 as data), the PPO math, generate, one PPO iteration and its loop,
Hydra-SFT and its loop, evaluation, run. infra.py holds what is not RLHF, data.py the pairs, lora.py the switch.
"""
import contextlib
import copy
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import data
import infra
import lora
from infra import (ConfigError, NumericalFault, all_sum, batch_indices, check_finite, gather_lists, is_fsdp, my_rows,
                   optimizer_step, say, step_seed, world)

# -----------------------------------------------------------------------------
# configuration: one dataclass, every field becomes a --flag


flag = lambda default, help: field(default=default, metadata={"help": help})  # noqa: E731


@dataclass
class Config:
    model: str = flag("tiny", "tiny | smollm2-135m | opt-1.3b | llama-7b | a Hugging Face id | a local directory")
    data: str = flag("builtin", "builtin | path or URL of a .jsonl/.jsonl.gz of preference pairs")
    stage: str = flag("all", "all (sft, ppo, eval) | sft | ppo (starts from OUT/sft.pt)")
    method: str = flag("hydra-ppo", "hydra-ppo | j-hydra-ppo | lora-ppo | ppo")
    out: str = flag("out", "run directory: metrics.jsonl, summary.json, checkpoints")
    seed: int = flag(0, "seed of data order, init and sampling")
    device: str = flag("auto", "auto | cpu | cuda | cuda:N")
    dtype: str = flag("auto", "auto (bf16 on cuda, fp32 on cpu) | float32 | bfloat16")
    threads: int = flag(0, "CPU threads (0 = 1 for tiny, whose small matmuls gain nothing from more; else torch's)")
    fresh: bool = flag(False, "remove the old run's files in OUT and start over (default: resume)")
    n_builtin: int = flag(2000, "pairs generated for the built-in task")
    max_pairs: int = flag(0, "read only the first N pairs of a --data file (0 = all): a CPU-sized slice")
    heldout_frac: float = flag(0.1, "fraction of pairs held out for evaluation")
    max_prompt: int = flag(128, "prompt tokens kept (cut from the left)")
    max_response: int = flag(48, "response tokens kept in SFT (cut from the right)")
    sft_steps: int = flag(300, "Hydra-SFT optimizer steps")
    sft_batch: int = flag(16, "preference pairs per SFT step")
    sft_lr: float = flag(0.0, "SFT learning rate (0 = 1e-3 for tiny or --sft-lora, 1e-5 for full SFT otherwise)")
    rm_weight: float = flag(1.0, "weight of the pairwise reward loss in Hydra-SFT")
    sft_lora: bool | None = flag(None, "LoRA SFT on a frozen base, adapter kept unmerged (None: the GPU memory plan's)")
    lora_r: int = flag(16, "LoRA rank (the paper uses 128 on Llama-7b)")
    lora_alpha: float = flag(32.0, "LoRA alpha; scale = alpha / r")
    ppo_steps: int = flag(60, "PPO iterations (rollout + update)")
    rollout_batch: int = flag(32, "prompts sampled per PPO iteration")
    minibatch: int = flag(16, "rollouts per PPO minibatch")
    ppo_epochs: int = flag(2, "passes over each rollout batch")
    actor_lr: float = flag(0.0, "actor learning rate (0 = LoRA 2e-3 tiny, 2e-4 otherwise; full 2e-4 tiny, 5e-5)")
    critic_lr: float = flag(0.0, "critic learning rate (0 = the actor's)")
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
    missing_eos_penalty: float = flag(0.0, "added to the score of a response that hit the length limit (TRL: -1)")
    stop_kl: float = flag(0.5, "stop the PPO epochs of an iteration once approx_kl exceeds this")
    max_grad_norm: float = flag(1.0, "gradient clip per role")
    value_init: str = flag("reward", "value head init: reward (copy the reward head, as DeepSpeed-Chat) | zero")
    grad_ckpt: bool | None = flag(None, "activation checkpointing, switch-safe (None: the GPU memory plan's)")
    fsdp: bool = flag(False, "under torchrun: shard every base across the ranks with FSDP2")
    skip_nonfinite: bool = flag(False, "skip (undo and count) a step whose loss/reward/gradient is NaN or inf")
    eval_prompts: int = flag(64, "held-out prompts sampled in the final evaluation")
    ckpt_every: int = flag(50, "steps between checkpoints")
    wandb: bool = flag(False, "also log to wandb (if installed)")
    export: bool = flag(False, "at the end, write OUT/hf: policies, reward model and adapters (eval.py export)")

    def __post_init__(self):  # the "0 = a rule" defaults, resolved once: checkpoints and exports hold the numbers
        tiny, full = self.model == "tiny", self.method == "ppo"  # full: PPO trains whole copies, not a LoRA actor
        self.threads = self.threads or (1 if tiny else 0)
        if tiny or self.sft_lora is not None:  # else the memory plan decides --sft-lora first (run)
            self.sft_lr = self.sft_lr or (1e-3 if tiny or self.sft_lora else 1e-5)  # README: measured on SmolLM2
        self.actor_lr = self.actor_lr or ((2e-4 if full else 2e-3) if tiny else (5e-5 if full else 2e-4))
        self.critic_lr = self.critic_lr or self.actor_lr


# -----------------------------------------------------------------------------
# the model: a causal LM with two scalar heads on its last hidden state


def last_token_index(mask):
    """(B, T) 0/1 mask -> (B,) index of the last real token, whatever the padding side."""
    return mask.shape[1] - 1 - mask.long().flip(-1).argmax(-1)


class HydraModel(nn.Module):
    """a causal LM plus two scalar heads on its last hidden state: reward (trained in Hydra-SFT) and value (critic).
    what trains is fp32 (small updates are not rounded away); a frozen base may be stored in compute_dtype, in which
    the LM's matmuls run (autocast). the scalar heads stay fp32."""

    def __init__(self, lm, compute_dtype=torch.float32):
        super().__init__()
        self.lm, self.compute_dtype = lm, compute_dtype
        h = lm.get_output_embeddings().weight.shape[1]
        self.reward_head, self.value_head = nn.Linear(h, 1), nn.Linear(h, 1)
        nn.init.normal_(self.reward_head.weight, std=1 / math.sqrt(h + 1))
        for t in (self.reward_head.bias, self.value_head.weight, self.value_head.bias):
            nn.init.zeros_(t)
        self.to(next(lm.parameters()).device)

    def autocast(self, device):
        """matmuls in compute_dtype (bf16 on a GPU); a no-op in fp32."""
        return torch.autocast(device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32)

    def hidden(self, ids, mask, cache=None):
        """-> last hidden state (B, T, H), after the final norm, and the KV cache when one is passed."""
        base, kw = self.lm.base_model, infra.cache_keyword(type(self.lm.base_model))
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]  # left padding: count real tokens only
        with self.autocast(ids.device):
            out = base(input_ids=ids, attention_mask=mask, position_ids=pos,
                       use_cache=cache is not None, **({kw: cache} if cache is not None else {}))
        return out.last_hidden_state, out.get(kw)

    def logits(self, h):  # (..., H) -> (..., V), the LM's own post-head step included (infra.lm_logits)
        with self.autocast(h.device):  # as one (N, H) matmul: a (B, R, H) batched matmul reads the head once a row
            return infra.lm_logits(self.lm, h.reshape(-1, h.shape[-1])).view(*h.shape[:-1], -1)

    # the scalar heads read fp32 hidden states in fp32, autocast or not: a score is a difference of nearby numbers
    def score(self, h, mask):  # reward at the last real token, (B,)
        with torch.autocast(h.device.type, enabled=False):
            last = h[torch.arange(h.shape[0], device=h.device), last_token_index(mask)]  # (B, H)
            return self.reward_head(last.float()).squeeze(-1)

    def values(self, h):  # (B, T)
        with torch.autocast(h.device.type, enabled=False):
            return self.value_head(h.float()).squeeze(-1)


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


def run_roles(models, roles, wanted, ids, mask, P, temperature, entropy=False):
    """one forward per distinct (base, adapter): in Hydra-PPO the reference and the reward share one LoRA-off pass.
    -> {role: (logp, entropy or None) (B, R) for lm heads | values (B, R) | score (B,)}."""
    groups = {}
    for role in wanted:
        base, adapter, head = roles[role]
        groups.setdefault((base, adapter), []).append((role, head))
    out = {}
    for (base, adapter), heads in groups.items():
        m = models[base]
        with lora.adapter(adapter):
            h, _ = m.hidden(ids, mask)  # (B, T, H)
        for role, head in heads:
            if head == "lm":  # logits at P-1 .. T-2 predict the response tokens
                out[role] = response_logprobs(m, h[:, P - 1:-1], ids[:, P:], temperature, entropy=entropy)
            elif head == "value":
                out[role] = m.values(h[:, P - 1:-1])
            else:
                out[role] = m.score(h, mask)
    return out


# -----------------------------------------------------------------------------
# the PPO math: small pure functions (no collectives: a sum over ranks is passed in), imported by the tests


def logprobs_of(logits, tokens, temperature=1.0, entropy=False):
    """log p(token) under logits / temperature: (B, R, V), (B, R) -> (B, R) log-probs and, when asked, the (B, R)
    entropy (else None: only the actor's is ever logged)."""
    x = logits.float()
    logp = F.log_softmax(x / temperature if temperature != 1 else x, dim=-1)
    ent = None
    if entropy:
        with torch.no_grad():  # logged, not trained: keeps two more (B, R, V) tensors out of the autograd graph
            ent = -(logp.exp() * logp).sum(-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), ent


def response_logprobs(model, h, tokens, temperature=1.0, chunk=None, entropy=False):
    """log p(token) (and the entropy, when asked) from hidden states, a few positions at a time: each chunk's logits
    are made, reduced to (B, c) and made again in backward (activation checkpointing), so no (B, R, V) fp32 tensor
    ever exists whole. (B, R, H), (B, R) -> (B, R) x 2."""
    V = model.lm.get_output_embeddings().weight.shape[0]
    B, R = tokens.shape
    step = max(1, (chunk or infra.LOGIT_CHUNK) // max(1, B * V))  # positions a chunk
    replay = infra.Replay()  # backward's recompute needs the log-probs only, not the (logged) entropy
    f = lambda hc, tc: logprobs_of(model.logits(hc), tc, temperature, entropy and not replay.on)  # noqa: E731
    # one call when chunks gain nothing (no gradients: nothing is kept), or an FSDP head would be gathered per chunk
    if R <= step or is_fsdp(model) or not (torch.is_grad_enabled() and h.requires_grad):
        return f(h, tokens)
    parts = [torch.utils.checkpoint.checkpoint(f, h[:, i:i + step], tokens[:, i:i + step], use_reentrant=False,
                                               context_fn=lambda: (contextlib.nullcontext(), replay))
             for i in range(0, R, step)]
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
    adv, last = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    nxt_mask = F.pad(mask[:, 1:], (0, 1))  # (B, R): the next token is real (none after the last)
    nxt_value = F.pad(values[:, 1:], (0, 1)) * nxt_mask
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * nxt_value[:, t] - values[:, t]
        last = delta + gamma * lam * nxt_mask[:, t] * last
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


def adaptive_kl(beta, kl, n, target=0.0, horizon=10000):
    """beta after n responses of mean KL kl: fixed (target 0), or the adaptive controller of Ziegler et al. 2019."""
    if target <= 0:
        return beta
    return beta * (1 + max(-0.2, min(0.2, kl / target - 1)) * n / horizon)


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


class EagerDecoder:
    """generate's one-token step on a growing cache (transformers' DynamicCache), the mask grown by a column a token:
    the CPU's, and FSDP's (its all-gathers cannot be captured). real (B,): 1 where the row still runs."""
    check_every = 1  # tokens between the all-rows-done checks

    def __init__(self, model):
        from transformers import DynamicCache
        self.model, self.cache = model, DynamicCache()

    def prefill(self, ids, mask):  # -> the next token's logits (B, V)
        self.mask = mask
        return self.forward(ids)

    def step(self, tokens, real):
        self.mask = torch.cat([self.mask, real.unsqueeze(-1)], 1)
        return self.forward(tokens.unsqueeze(-1))

    def forward(self, ids):
        h, self.cache = self.model.hidden(ids, self.mask, self.cache)
        return self.model.logits(h[:, -1])


@torch.no_grad()
def generate(model, adapter, prompts, tok, max_new, temperature, seeds):
    """sample responses for token-id prompts, row i from seeds[i], one token a step with a KV cache (on a GPU the
    step is a captured graph: infra.static_decoder). -> list of response token lists, each cut after its first EOS."""
    dev = next(model.parameters()).device
    gens = [torch.Generator(dev).manual_seed(s) for s in seeds]
    ids, mask, _ = data.collate(prompts, [[] for _ in prompts], tok.pad_id)
    ids, mask = ids.to(dev), mask.to(dev)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=dev)
    out, was_training = [], model.training
    model.eval()
    # inference mode: no autograd bookkeeping at all; not under FSDP2, whose gathered weights outlive the call
    with contextlib.nullcontext() if is_fsdp(model) else torch.inference_mode(), lora.adapter(adapter):
        try:
            dec = infra.static_decoder(model, ids.shape[0], ids.shape[1] + max_new) or EagerDecoder(model)
            logits = dec.prefill(ids, mask)
            for t in range(max_new):
                nxt = sample_tokens(logits, temperature, gens)  # (B,)
                nxt = torch.where(done, torch.full_like(nxt, tok.pad_id), nxt)
                out.append(nxt)
                real = (~done).long()  # a token is real if its row was still running
                done |= nxt == tok.eos_id
                # the last token needs no forward; every rank's rows: sharded ranks must run the same forwards
                if t == max_new - 1 or ((t + 1) % dec.check_every == 0 and all_sum((~done).sum()).item() == 0):
                    break
                logits = dec.step(nxt, real)
        finally:
            model.train(was_training)
    return [row[: row.index(tok.eos_id) + 1] if tok.eos_id in row else row for row in torch.stack(out, 1).tolist()]


# -----------------------------------------------------------------------------
# PPO (sec. 3.2): the bases get their adapters, then each iteration in textbook order: 1. sample with the actor,
# 2. score with every role, 3. (once) calibrate the score scale, 4. KL-shaped rewards, 5. GAE, 6. epochs x minibatches

def prepare_ppo(models, method, cfg, device):
    """adapters (LoRA init from the seed) and value head on, every base frozen but what actor and critic train, one
    AdamW with a group per trained role; train_ppo, load_run and the bench share it. -> ({role: [params]}, AdamW)."""
    roles = ROLES[method]
    torch.manual_seed(step_seed(cfg.seed, "ppo-init", 0))  # the same on every rank, fresh or resumed
    full = {roles[r][0] for r in ("actor", "critic") if roles[r][1] is None}  # bases that train whole (full PPO)
    for base in dict.fromkeys(b for b, _, _ in roles.values()):  # table order: LoRA init draws from the RNG
        if base not in full:  # a frozen base is stored in the compute dtype; what trains stays fp32 (heads, LoRA)
            lora.cast_base(models[base].lm, models[base].compute_dtype)
        names = sorted({a for b, a, _ in roles.values() if b == base and a is not None})
        if names:
            lora.inject(models[base].lm, names, r=cfg.lora_r, alpha=cfg.lora_alpha)
        models[base].requires_grad_(False)
        infra.no_dropout(models[base])  # PPO's ratios and KL compare the same function: no dropout in any role
    if cfg.value_init == "reward":  # (else zero, as HydraModel made it: SFT never trains the value head)
        models[roles["critic"][0]].value_head.load_state_dict(models[roles["reward"][0]].reward_head.state_dict())

    def owned():  # the weights each trained role owns (again after sharding: FSDP puts new parameters in place)
        params, seen = {}, set()
        for role in ("actor", "critic"):
            base, adapter, _ = roles[role]
            lm = models[base].lm
            ps = lora.lora_parameters(lm, adapter) if adapter else list(lm.parameters())
            if role == "critic":  # values read the hidden state: an untied LM head gets no gradient
                head = lm.get_output_embeddings().weight
                ps = [p for p in ps if p is not head or head is lm.get_input_embeddings().weight]
                ps += list(models[base].value_head.parameters())
            params[role] = [p for p in ps if id(p) not in seen]  # j-hydra: the shared adapter trains as the actor
            seen |= {id(p) for p in params[role]}
        return params
    for p in sum(owned().values(), []):
        p.requires_grad_(True)
    for m in dict.fromkeys(models.values()):
        infra.distribute(m, cfg, device)
    params = owned()
    return params, torch.optim.AdamW([{"params": params["actor"], "lr": cfg.actor_lr},
                                      {"params": params["critic"], "lr": cfg.critic_lr}], weight_decay=0.0)


@dataclass
class Rollout:
    """a rollout batch: this rank's share of it, as ppo_update reads it. (B, R) tensors are right-padded responses."""
    responses: list  # B token lists, each cut after its first EOS
    chunks: list  # (ids, mask, P) per minibatch: this rank's mb rows of each global minibatch, collated
    rmask: torch.Tensor  # (B, R) 1 on real response tokens
    logp: torch.Tensor  # (B, R) the actor's log-probs when sampling
    ref_logp: torch.Tensor  # (B, R) the reference's
    values: torch.Tensor  # (B, R) the critic's
    raw_score: torch.Tensor  # (B,) the reward model's, before normalising
    has_eos: torch.Tensor  # (B,) the response ended (not cut by --max-new-tokens)
    clock: dict  # seconds sampling (gen_s) and scoring (score_s), and gen_ms_per_token


@torch.no_grad()
def rollout(models, roles, prompts, tok, cfg, step, device, rows=None):
    """steps 1-2 on this rank's token-id prompts (rows: their rows in the global batch, which seed the sampling), scored
    in the update's minibatches. -> Rollout"""
    t0, rows = time.time(), range(len(prompts)) if rows is None else rows
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
    batch = Rollout(responses=responses, chunks=chunks,
                    rmask=torch.cat([pad(mask[:, P:].float()) for _, mask, P in chunks]),
                    logp=torch.cat([pad(o["actor"][0]) for o in old]),
                    ref_logp=torch.cat([pad(o["reference"][0]) for o in old]),
                    values=torch.cat([pad(o["critic"]) for o in old]), raw_score=torch.cat([o["reward"] for o in old]),
                    has_eos=torch.tensor([r[-1] == tok.eos_id for r in responses], device=device),
                    clock=dict(gen_s=t_gen, score_s=time.time() - t0 - t_gen,
                               gen_ms_per_token=1000 * t_gen / max(1, max((len(r) for r in responses), default=0))))
    for key, name in (("raw_score", "reward-model scores"), ("logp", "log-probs"), ("ref_logp", "reference log-probs"),
                      ("values", "values")):
        check_finite(getattr(batch, key), name, step + 1)  # before anything (the score scale included) is fitted
    return batch


@torch.no_grad()
def calibrate(critic, batch, cfg):
    """step 3, once, on the first rollout (SFT samples: actor == reference): the mean and std of every rank's scores.
    a value head copied from the reward head moves to that scale, and so do its values of this batch. -> {mean, std}"""
    N = len(batch.responses) * world()[1]
    mean = all_sum(batch.raw_score.sum()).item() / N
    var = all_sum(((batch.raw_score - mean) ** 2).sum()).item() / (N - 1)
    norm = dict(mean=mean, std=math.sqrt(var) + 1e-6)
    if cfg.value_init == "reward":
        critic.value_head.weight.div_(norm["std"])
        critic.value_head.bias.sub_(norm["mean"]).div_(norm["std"])
        batch.values = (batch.values - norm["mean"]) / norm["std"] * batch.rmask
    return norm


def ppo_update(models, roles, params, opt, beta, batch, norm, cfg, step):
    """steps 4-6 on a rollout batch with KL coefficient beta: rewards, advantages, epochs x minibatches of clipped
    updates. norm: calibrate's score scale ({} = raw scores); sums over ranks by all_sum. -> stats"""
    t0, W = time.time(), world()[1]
    N = len(batch.responses) * W  # the global rollout batch
    rmask, logp, values, raw_score = batch.rmask, batch.logp, batch.values, batch.raw_score
    # 4. rewards: -beta * KL per token + the clipped score at the last real token
    score = (raw_score - norm["mean"]) / norm["std"] if norm else raw_score
    score = score.clamp(-cfg.score_clip, cfg.score_clip) + cfg.missing_eos_penalty * (~batch.has_eos).float()
    with torch.no_grad():
        rewards, kl = kl_rewards(score, logp, batch.ref_logp, rmask, beta)
        # 5. GAE, and advantages whitened over every rank's tokens
        adv, returns = gae(rewards, values * rmask, rmask, cfg.gamma, cfg.lam)
        adv = masked_whiten(adv, rmask, total=all_sum)
    check_finite(rewards, "rewards", step + 1)
    check_finite(adv, "advantages", step + 1)
    # 6. epochs x minibatches
    log = {k: [] for k in ("pg_loss", "vf_loss", "clipfrac", "approx_kl", "ratio", "entropy")}
    chunks, mb, stopped_early = batch.chunks, cfg.minibatch // W, False  # mb: this rank's rows of a minibatch
    for epoch in range(cfg.ppo_epochs):
        g = torch.Generator().manual_seed(step_seed(cfg.seed, f"ppo-order{epoch}", step))
        order = range(len(chunks)) if epoch == 0 else torch.randperm(len(chunks), generator=g).tolist()
        for c in order:
            ids, mask, P = chunks[c]
            sl, w = slice(c * mb, (c + 1) * mb), ids.shape[1] - P
            m = rmask[sl, :w]
            tokens = all_sum(m.sum()).clamp(min=1)  # every rank's: losses are means, a rank's share is tokens / W
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
                    pg, diag = policy_loss(new["actor"][0], logp[sl, :w], adv[sl, :w], m, cfg.clip, tokens / W)
                    loss = loss + pg
                if "critic" in group:
                    vf = value_loss(new["critic"], values[sl, :w], returns[sl, :w], m, cfg.value_clip, tokens / W)
                    loss = loss + cfg.vf_coef * vf
                check_finite(loss, "ppo loss", step + 1)
                loss.backward()
            # clip per role: the critic's gradient scale must not shrink the actor's step
            optimizer_step(opt, list(params.values()), cfg.max_grad_norm, "ppo", step + 1)
            # logged over every rank's tokens (the early stop is one decision for all); a loss sums to W x its mean
            per_token = {"entropy": new["actor"][1].detach(), **diag}
            sums = all_sum(torch.stack([pg.detach(), vf.detach(), *((v * m).sum() for v in per_token.values())]))
            pg_sum, vf_sum, *means = torch.cat([sums[:2], sums[2:] / tokens]).tolist()  # one host sync
            s = dict(zip(per_token, means))
            for k, v in (("pg_loss", pg_sum / W), ("vf_loss", vf_sum / W), *s.items()):
                log[k].append(v)
            if s["approx_kl"] > cfg.stop_kl:
                stopped_early = True
                break
        if stopped_early:
            break
    for mod in models.values():
        mod.eval()
    seq_kl = all_sum(kl.sum()).item() / N  # the KL controller sees the mean over every rank's responses
    stats = {"kl_coef": beta, **{k: sum(v) / len(v) for k, v in log.items() if v}}
    stats.update(score=all_sum(raw_score.sum()).item() / N, kl=seq_kl, first_ratio=log["ratio"][0],
                 first_approx_kl=log["approx_kl"][0], explained_var=explained_variance(values, returns, rmask, all_sum),
                 response_len=all_sum(rmask.sum()).item() / N, eos_frac=all_sum(batch.has_eos.sum()).item() / N,
                 stopped_early=stopped_early, update_s=time.time() - t0)
    return stats


PHASES = ("gen_s", "score_s", "update_s", "gen_ms_per_token")  # the clock of a PPO step, in metrics and the summary


def train_ppo(models, method, prompts, tok, cfg, device, start=None):
    """the PPO loop; prompts: (text, ids) of the training pairs. -> the run's PPO summary."""
    roles = ROLES[method]
    params, opt = prepare_ppo(models, method, cfg, device)
    held = {n: (m, "trained") for n, m in models.items()}  # a checkpoint holds what trains: adapters, value head
    state = {"kl_coef": cfg.kl_coef, "score_norm": {}, "skipped": 0, "clock": {k: [] for k in ("step_s", *PHASES)}}
    rank, W = world()
    M, mb = cfg.minibatch, cfg.minibatch // W
    # this rank's rows of the global batch: its share of every global minibatch, so the chunks line up across ranks
    rows = [c * M + rank * mb + j for c in range(cfg.rollout_batch // M) for j in range(mb)]
    for m in models.values():
        m.eval()
    loop = infra.Loop("ppo", cfg.ppo_steps, cfg, held, opt, state, start, ("score", "kl"), f"ppo {method}")
    for i in loop:
        with loop.guard():  # --skip-nonfinite: a NaN or inf undoes the step
            t0 = time.time()
            batch = [prompts[j][1] for j in batch_indices(len(prompts), cfg.rollout_batch, cfg.seed, i)]
            batch = (batch * cfg.rollout_batch)[: cfg.rollout_batch]  # fewer prompts than a batch: repeated
            b = rollout(models, roles, [batch[j] for j in rows], tok, cfg, i, device, rows)
            if cfg.score_norm == "sft" and not state["score_norm"]:  # 3. the first rollout fixes the score scale
                state["score_norm"] = calibrate(models[roles["critic"][0]], b, cfg)
            stats = ppo_update(models, roles, params, opt, state["kl_coef"], b, state["score_norm"], cfg, i)
            state["kl_coef"] = adaptive_kl(state["kl_coef"], stats["kl"], cfg.rollout_batch, cfg.target_kl,
                                           cfg.kl_horizon)
            stats.update(b.clock, step_s=time.time() - t0)
            for k, v in state["clock"].items():
                v.append(stats[k])
            loop.log({k: (round(v, 6) if isinstance(v, float) else v) for k, v in stats.items()})
    clock = state["clock"]
    mid = {k: sorted(v)[len(v) // 2] if v else None for k, v in clock.items()}
    return {"kl_coef": state["kl_coef"], "score_norm": state["score_norm"], "skipped_steps": state["skipped"],
            "latency_per_sample_s": mid["step_s"] / cfg.rollout_batch if clock["step_s"] else None,
            **{f"median_{k}": mid[k] for k in PHASES}}


# -----------------------------------------------------------------------------
# Hydra-SFT (sec. 3.1), the stage before PPO: LM loss on the chosen response + pairwise reward loss, one model.
# the baselines train a plain SFT model and a reward model instead

# what each SFT model learns: (LM loss weight, reward loss weight); None = --rm-weight
SFT_LOSS = {"hydra": (1.0, None), "sft": (1.0, 0.0), "rm": (0.0, 1.0)}


def sft_models(method):
    """-> the SFT models a method's bases start from, in table order: ["hydra"], or ["sft", "rm"]."""
    return list(dict.fromkeys(COPY_OF.get(base, base) for base, _, _ in ROLES[method].values()))


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
        lm_loss = -masked_mean(logp, m, all_sum(m.sum()).clamp(min=1) / world()[1])  # every rank's token mean
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
    a baseline's plain SFT model (rm_w 0) leaves its reward head, its reward model (lm_w 0) an untied LM head. the
    one setup that train_sft and eval.py's bench share. -> (trained parameters, AdamW)."""
    if cfg.sft_lora:
        lora.inject(model.lm, ["sft"], r=cfg.lora_r, alpha=cfg.lora_alpha)
        model.requires_grad_(False)
        for p in lora.lora_parameters(model.lm, "sft") + list(model.reward_head.parameters()):
            p.requires_grad_(True)
    model.value_head.requires_grad_(False)
    # the pairwise loss sees r(chosen) - r(rejected): the reward bias gets no gradient, and AdamW would turn rounding
    # noise in that zero into steps of size lr. a weight no loss reaches stays out of the optimizer
    model.reward_head.bias.requires_grad_(False)
    if not rm_w:
        model.reward_head.requires_grad_(False)
    if not lm_w and model.lm.get_output_embeddings().weight is not model.lm.get_input_embeddings().weight:
        model.lm.get_output_embeddings().requires_grad_(False)
    params = infra.distribute(model, cfg, device)
    return params, torch.optim.AdamW(params, lr=cfg.sft_lr, weight_decay=0.0)


def sft_step(model, rows, lm_w, rm_w, params, opt, pad_id, device, max_grad_norm, step):
    """one optimizer step on this rank's rows. -> loss, gradient norm, stats. a non-finite loss or gradient raises
    NumericalFault before the optimizer step."""
    loss, stats = sft_loss(model, rows, lm_w, rm_w, pad_id, device)
    check_finite(loss, "sft loss", step)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gn, = optimizer_step(opt, [params], max_grad_norm, "sft", step)
    return loss, gn, stats


def train_sft(name, model, lm_w, rm_w, train_rows, cfg, tok, device, start=None, finished=None):
    """Hydra-SFT (lm_w, rm_w > 0), plain SFT (rm_w = 0) or a reward model (lm_w = 0). finished: the SFT models this
    run trained before this one, {name: (model, stats)} (the baselines train two), kept whole in its checkpoints."""
    torch.manual_seed(step_seed(cfg.seed, f"sft-{name}-init", 0))  # LoRA init: the same on every rank and on resume
    params, opt = prepare_sft(model, cfg, device, lm_w, rm_w)
    # a checkpoint holds the finished models whole, and this one whole or (--sft-lora) what trains: the frozen base is
    # rebuilt from --model on resume
    held = {**{n: (m, "all") for n, (m, _) in (finished or {}).items()},
            name: (model, "trained" if cfg.sft_lora else "all")}
    state = {"loss": float("nan"), "skipped": 0, "finished": {n: s for n, (_, s) in (finished or {}).items()}}
    rank, W = world()
    b = cfg.sft_batch // W  # this rank's share of a batch

    model.train()
    loop = infra.Loop(f"sft-{name}", cfg.sft_steps, cfg, held, opt, state, start, ("lm_loss", "rm_loss", "rm_acc"))
    for i in loop:
        with loop.guard(), lora.adapter("sft") if cfg.sft_lora else contextlib.nullcontext():
            rows = [train_rows[j] for j in batch_indices(len(train_rows), cfg.sft_batch, cfg.seed, i)][rank * b:][:b]
            loss, gn, stats = sft_step(model, rows, lm_w, rm_w, params, opt, tok.pad_id, device, cfg.max_grad_norm,
                                       i + 1)
            state["loss"] = infra.rank_mean(loss.item())
            loop.log({"loss": state["loss"], "grad_norm": gn.item(),
                      **{k: round(infra.rank_mean(v), 6) for k, v in stats.items() if k != "rm_hits"}})
    opt.zero_grad(set_to_none=True)  # the last step's gradients would outlive training (a model's worth of memory)
    if cfg.sft_lora:  # part of the base from now on, unmerged: LoRA off is the model SFT trained, to the bit
        lora.fix(model.lm, "sft")
    return state["loss"], state["skipped"]


def train_sft_models(models, train_rows, held_rows, cfg, tok, device, ck=None):
    """stage 1: every SFT model of the method, in turn, then OUT/sft.pt. a stopped run (ck: its checkpoint) resumes
    inside the model it was training, keeping the ones it had finished. -> {name: {loss, skipped_steps, seconds[,
    rm_accuracy]}}."""
    sft_stats, finished = {}, {}
    earlier = ck["state"]["finished"] if ck and ck["stage"].startswith("sft-") else {}
    names = sft_models(cfg.method)
    for name in names:
        lm_w, rm_w = SFT_LOSS[name]
        rm_w = cfg.rm_weight if rm_w is None else rm_w
        if name in earlier:  # a baseline stopped while training its second model: the first is done
            say(f"sft-{name}: finished before the stop, loaded from the checkpoint in {cfg.out}")
            infra.sft_adapter(models[name], cfg)  # (--sft-lora: its adapter, fixed, is part of the checkpoint)
            infra.distribute(models[name], cfg, device)  # (a sharded checkpoint loads into a sharded model)
            infra.restore_checkpoint(ck, {name: (models[name], "all")}, None)
            sft_stats[name] = earlier[name]
            finished[name] = (models[name], sft_stats[name])
            continue
        t0 = time.time()
        loss, skipped = train_sft(name, models[name], lm_w, rm_w, train_rows, cfg, tok, device,
                                  infra.resume_point(ck, f"sft-{name}", cfg), finished)
        sft_stats[name] = {"loss": loss, "skipped_steps": skipped, "seconds": time.time() - t0}
        if rm_w:
            sft_stats[name]["rm_accuracy"] = rm_accuracy(models[name], held_rows, tok.pad_id, device)
        if name != names[-1]:  # it trains no more: kept in the next checkpoints
            finished[name] = (models[name], sft_stats[name])
    infra.save_models(os.path.join(cfg.out, "sft.pt"), models, cfg, "all")
    return sft_stats


# -----------------------------------------------------------------------------
# evaluation: SFT policy (LoRA off) vs PPO policy on the same held-out prompts with the same seeds

def sft_roles(method):
    """the roles the SFT models serve before PPO (the SFT policy is the reference, LoRA off), for evaluating them."""
    return {r: (COPY_OF.get(b, b), a, h) for r, (b, a, h) in ROLES[method].items() if r in ("reference", "reward")}


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
        texts = samples[pol] = [data.response_text(tok, p[1], r) for p, r in zip(prompts, resp)]
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


def build_sft_models(cfg, dtype, device):
    """the method's SFT models on device (under --fsdp: on the CPU for rank 0, the meta device for the others; shard()
    fills theirs from rank 0's). full SFT trains every weight, so they are fp32; LoRA SFT stores the base in dtype."""
    models, tok = {}, None
    meta = cfg.fsdp and world()[0] != 0
    for i, name in enumerate(sft_models(cfg.method)):
        lm, tok = infra.load_lm(cfg.model, dtype if cfg.sft_lora else torch.float32, seed=cfg.seed + i, meta=meta)
        models[name] = HydraModel(lm if meta else lm.to("cpu" if cfg.fsdp else device), compute_dtype=dtype)
    return models, tok


def ppo_bases(method, sft):
    """a method's bases from its SFT models: a base that a role trains whole (full PPO) is its own copy."""
    bases = {}
    for role, (base, adapter, _) in ROLES[method].items():
        if base not in bases:
            src = sft[COPY_OF.get(base, base)]
            bases[base] = copy.deepcopy(src) if adapter is None and role in ("actor", "critic") else src
    return bases


@dataclass
class Run:
    """what the stages of a run share: the config (its rules and the memory plan's choices resolved), where it runs,
    its data (pairs, and as token ids), the clock and each stage's peak memory."""
    cfg: Config
    device: torch.device
    dtype: torch.dtype
    tok: data.Tokenizer
    train_pairs: list
    held_pairs: list
    gold_fn: object  # the built-in task's gold reward, or None
    t0: float
    train_rows: list = None  # (prompt, chosen, rejected) token ids
    held_rows: list = None
    held_prompts: list = None  # (text, ids) of the first --eval-prompts held-out pairs
    ck: dict = None  # OUT's checkpoint as the run found it (infra.load_ckpt), or None
    sft_ran: bool = False  # this invocation trained the SFT models (else they come from OUT/sft.pt)
    peaks: dict = field(default_factory=dict)  # stage -> peak MiB of the largest rank
    ranks: dict = field(default_factory=dict)  # stage -> peak MiB of each rank

    def peak(self, stage):  # each stage measured on its own
        self.peaks[stage], self.ranks[stage] = infra.stage_peak(self.device)
        return self.peaks[stage]


def start(cfg):
    """devices, the memory plan's choices, the data and the SFT models, every check that can refuse done before the
    first write into OUT (summary.json). -> (Run, the SFT models as loaded)"""
    t0 = time.time()
    infra.check_window(cfg)
    device, dtype = infra.start_run(cfg)
    train_pairs, held_pairs, gold_fn, dstats = data.split_data(cfg)
    say(f"data: {cfg.data}: {len(train_pairs)} train / {len(held_pairs)} held-out pairs {dstats}")
    if cfg.sft_batch > len(train_pairs):
        raise ConfigError(f"--sft-batch {cfg.sft_batch} is larger than the {len(train_pairs)} training pairs")
    cfg, plan = infra.check_memory_plan(cfg, device, dtype, ROLES[cfg.method], len(sft_models(cfg.method)))
    ck = infra.check_resume(cfg)  # every refusal before the first write into OUT (then --wandb starts)
    models, tok = build_sft_models(cfg, dtype, device)
    infra.check_window(cfg, next(iter(models.values())).lm.config.to_dict())  # (a model the cache did not hold)
    W = world()[1]
    n_params = sum(p.numel() for p in next(iter(models.values())).lm.parameters())
    say(f"model: {cfg.model} ({n_params / 1e6:.1f}M params) on {device}, matmuls in {dtype}; method {cfg.method}"
        + (f"; {W} ranks, {'FSDP2-sharded' if cfg.fsdp else 'data parallel'}" if W > 1 else ""))
    r = Run(cfg, device, dtype, tok, train_pairs, held_pairs, gold_fn, t0, ck=ck)
    r.peak("load")
    r.train_rows, cut1 = data.encode_pairs(train_pairs, tok, cfg)
    r.held_rows, cut2 = data.encode_pairs(held_pairs, tok, cfg)
    r.held_prompts = data.prompt_ids(held_pairs, tok, cfg)[0][: cfg.eval_prompts]
    infra.update_summary(cfg.out, model=cfg.model, data=cfg.data, method=cfg.method, seed=cfg.seed, device=str(device),
                         world_size=W, fsdp=cfg.fsdp, sft_lora=cfg.sft_lora, grad_ckpt=cfg.grad_ckpt,
                         memory_plan_mib={k: round(v / 2**20) for k, v in plan.items()} if plan else None,
                         n_train=len(train_pairs), n_heldout=len(held_pairs), truncated_pairs=cut1 + cut2,
                         data_stats=dstats)
    return r, models


def sft_stage(r, models):
    """stage 1: Hydra-SFT (or the baselines' separate SFT and reward models), and where the SFT weights come from:
    trained now, or read from OUT/sft.pt (a resumed run, --stage ppo). what SFT just trained stays in memory (no second
    copy from disk), but under --fsdp sharded modules cannot take the PPO adapters: then fresh unsharded ones read
    sft.pt (rank 0), and train_ppo shards them. -> the SFT models"""
    cfg = r.cfg
    r.sft_ran = infra.sft_will_run(cfg)
    if r.sft_ran:
        if r.gold_fn and not cfg.fsdp:  # (under --fsdp the ranks but 0 have no weights until SFT shards the models)
            res, _ = evaluate(models, sft_roles(cfg.method), r.held_prompts, r.tok, cfg, r.gold_fn, policies=("sft",))
            infra.update_summary(cfg.out, gold_init=res["gold_sft"])
        sft = train_sft_models(models, r.train_rows, r.held_rows, cfg, r.tok, r.device, r.ck)
        rm_name, lm_name = (sft_roles(cfg.method)[k][0] for k in ("reward", "reference"))
        s = infra.update_summary(cfg.out, rm_accuracy=sft[rm_name]["rm_accuracy"], sft=sft,
                                 sft_loss=sft[lm_name]["loss"], peak_memory_mib_sft=r.peak("sft"),
                                 peak_memory_mib_load=r.peaks["load"])
        say(f"sft done: held-out rm_accuracy {s['rm_accuracy']:.3f}, sft_loss {s['sft_loss']:.3f}")
        if not cfg.fsdp or cfg.stage == "sft":
            return models
        del models  # sharded modules sit in reference cycles: only a collection frees their shards
        infra.free_memory(r.device)
        models, _ = build_sft_models(cfg, r.dtype, r.device)
    infra.load_sft(models, cfg)
    return models


def sft_summary(r, models):
    """--stage sft ends here: the SFT policy on the held-out prompts (the built-in task's gold reward). -> summary"""
    if r.cfg.fsdp and not r.sft_ran:  # evaluated sharded: the other ranks get rank 0's weights
        for m in models.values():
            infra.distribute(m, r.cfg, r.device)
    if r.gold_fn:
        res, _ = evaluate(models, sft_roles(r.cfg.method), r.held_prompts, r.tok, r.cfg, r.gold_fn, policies=("sft",))
        infra.update_summary(r.cfg.out, gold_sft=res["gold_sft"])
    r.peak("eval")
    summary = infra.update_summary(r.cfg.out, peak_memory_mib=max(r.peaks.values()), peak_memory_mib_ranks=r.ranks,
                                   seconds=time.time() - r.t0)
    say(json.dumps(summary, indent=2))
    return summary


def ppo_stage(r, bases):
    """stage 2: PPO with the method's role table on the training prompts, resumed where a checkpoint stopped inside
    it; then OUT/ppo.pt. -> its stats"""
    cfg = r.cfg
    prompts, cut = data.prompt_ids(r.train_pairs, r.tok, cfg)
    if cut:
        say(f"{cut} of {len(prompts)} PPO prompts were longer than --max-prompt {cfg.max_prompt} and were cut from "
            "the left")
    infra.update_summary(cfg.out, truncated_prompts=cut)
    ck = infra.load_ckpt(cfg) if r.sft_ran else r.ck  # (an SFT stage in this run wrote newer ones)
    start = infra.resume_point(ck, "ppo", cfg)
    t0 = time.time()
    stats = train_ppo(bases, cfg.method, prompts, r.tok, cfg, r.device, start)
    stats["ppo_seconds"] = time.time() - t0
    if stats["skipped_steps"] >= cfg.ppo_steps:  # nothing trained: no PPO policy to save or evaluate
        raise NumericalFault(f"every one of the {cfg.ppo_steps} PPO steps was non-finite and skipped "
                             f"(--skip-nonfinite): no PPO policy; {cfg.out}/metrics.jsonl names each step's fault")
    r.peak("ppo")
    infra.save_models(os.path.join(cfg.out, "ppo.pt"), bases, cfg, "trained")
    return stats


def eval_stage(r, bases, ppo_stats):
    """stage 3: the SFT and PPO policies on the same held-out prompts with the same seeds; the summary, and with
    --export OUT/hf (eval.py's job on the files just written, in a process of its own). -> the summary"""
    res, samples = evaluate(bases, ROLES[r.cfg.method], r.held_prompts, r.tok, r.cfg, r.gold_fn)
    examples = list(zip(r.held_prompts, samples["sft"], samples["ppo"]))[:3]
    summary = infra.update_summary(r.cfg.out, **res, kl=res["kl_ppo"], **ppo_stats,
                                   peak_memory_mib_eval=r.peak("eval"), peak_memory_mib_ppo=r.peaks["ppo"],
                                   peak_memory_mib=max(r.peaks.values()), peak_memory_mib_ranks=r.ranks,
                                   seconds=time.time() - r.t0,
                                   examples=[{"prompt": p[0], "sft": a, "ppo": b} for p, a, b in examples])
    if r.cfg.export:
        infra.export_files(r.cfg.out)
    infra.print_summary(summary)
    return summary


def run(cfg):
    """a whole run, each stage resumable: 1. Hydra-SFT (or the baselines' SFT and reward models), 2. PPO with the
    method's roles, 3. the SFT and PPO policies on held-out prompts. -> the summary (also OUT/summary.json)."""
    r, models = start(cfg)
    models = sft_stage(r, models)
    if r.cfg.stage == "sft":
        return sft_summary(r, models)
    bases = ppo_bases(r.cfg.method, models)
    return eval_stage(r, bases, ppo_stage(r, bases))


def main(argv=None):
    cfg = infra.parse_args(Config, argv, __doc__.strip().splitlines()[0])
    try:
        infra.validate(cfg, METHODS)
        infra.STOP.install()
        run(cfg)
        infra.end_run()
    except (ConfigError, data.DataError, NumericalFault) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        line, code = infra.STOP.interrupted()
        print(f"\nerror: {line}", file=sys.stderr)
        sys.exit(code)
    except torch.cuda.OutOfMemoryError:
        print(f"error: out of GPU memory with --method {cfg.method} --model {cfg.model}; reduce "
              "--rollout-batch/--minibatch/--sft-batch, --max-new-tokens or --max-prompt, add --grad-ckpt, or use "
              f"--method hydra-ppo; see `python eval.py estimate {cfg.model}`", file=sys.stderr)
        sys.exit(3)
    finally:
        infra.unlock_out()


if __name__ == "__main__":
    main()
