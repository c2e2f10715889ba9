"""
Hand-written LoRA with one global adapter switch (Hydra-RLHF, arXiv 2309.00754, sec. 3.2 "dynamic LoRA").

Every targeted nn.Linear (or GPT-2 Conv1D) of a frozen base is wrapped by LoRALinear, which can hold several
named adapter sets ("actor", "critic", ...). One process-wide switch says which set is live:

    with lora.adapter("actor"):  ...   # base + actor LoRA
    with lora.adapter(None):     ...   # LoRA off: bit-identical to the frozen base (reference / reward)

A finished LoRA-SFT adapter joins the base unmerged (fix()), since a bf16 weight would round most of it away;
nothing merges into a live model: an export folds copies (LoRALinear.merged_weight).
"""
import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# the switch: the only global state in the project

_LIVE = None  # name of the live adapter set, or None (LoRA off)


def live_adapter():
    return _LIVE


@contextlib.contextmanager
def adapter(name):
    """make adapter set `name` live (None = LoRA off) inside the block; the previous one comes back on any exit."""
    global _LIVE
    prev, _LIVE = _LIVE, name
    try:
        yield
    finally:
        _LIVE = prev


def checkpoint_context():
    """context_fn for torch.utils.checkpoint: activation checkpointing re-runs the forward during backward,
    when the switch may be in another state; replay the state the forward saw, or gradients are wrong."""
    return contextlib.nullcontext(), adapter(_LIVE)


# -----------------------------------------------------------------------------
# the layer

DEFAULT_TARGETS = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",  # llama, mistral, qwen
    "out_proj", "fc1", "fc2",  # opt
    "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h",  # gpt-neox
    "c_attn", "c_proj", "c_fc",  # gpt-2 (Conv1D)
)


def _is_conv1d(m):
    # gpt-2's Conv1D stores weight as (in, out); found by name so we need not import it
    return type(m).__name__ == "Conv1D"


class LoRALinear(nn.Module):
    """y = base(x) + x @ A^T @ B^T * alpha / r for the live set, base(x) for none; no dropout: PPO turns it off."""

    def __init__(self, base, r, alpha):
        super().__init__()
        self.base = base
        w = base.weight
        self.in_features, self.out_features = (w.shape[0], w.shape[1]) if _is_conv1d(base) else (w.shape[1], w.shape[0])
        self.r, self.scale = r, alpha / r
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        self.fixed = []  # adapter sets that are part of the base (fix()): applied with LoRA off too

    def add_adapter(self, name):
        # adapters are kept in fp32 even on a bf16 base: they are the weights that train
        A = torch.empty(self.r, self.in_features, device=self.base.weight.device, dtype=torch.float32)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        B = torch.zeros(self.out_features, self.r, device=A.device, dtype=torch.float32)  # a fresh adapter: no change
        self.lora_A[name], self.lora_B[name] = nn.Parameter(A), nn.Parameter(B)

    def applied(self, live):
        """the adapter sets this layer adds while `live` is live (None: LoRA off): the fixed ones, and `live` once."""
        return self.fixed if live is None or live in self.fixed else [*self.fixed, live]

    @torch.no_grad()
    def merged_weight(self, live):
        """the base weight with the sets applied under `live` folded in: W + sum of B A * alpha / r, in fp32."""
        w = self.base.weight.float()
        for name in self.applied(live):
            d = ((self.lora_B[name] @ self.lora_A[name]) * self.scale).float()  # (out, in)
            w = w + (d.t() if _is_conv1d(self.base) else d)  # conv1d stores (in, out)
        return w

    def forward(self, x):
        y = self.base(x)
        for name in self.applied(_LIVE):  # none with LoRA off and nothing fixed: exactly the frozen base
            if name not in self.lora_A:
                raise KeyError(f"adapter {name!r} is live but this layer only has {list(self.lora_A)}")
            A, B = self.lora_A[name], self.lora_B[name]
            xa = x.to(A.dtype) if x.dtype != A.dtype and not torch.is_autocast_enabled(x.device.type) else x
            d = F.linear(F.linear(xa, A), B)  # (..., out); runs once per layer per generated token: lean
            # y is base(x)'s own fresh output (its backward does not need it): scale and add in place, no copy
            y = y.add_(d if d.dtype == y.dtype else d.to(y.dtype), alpha=self.scale)
        return y


# -----------------------------------------------------------------------------
# injecting, parameters, state

def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def inject(model, names, r=8, alpha=16, targets=DEFAULT_TARGETS):
    """wrap every Linear/Conv1D whose attribute name is in `targets` and give it the adapter sets `names`.
    calling it again on an injected model only adds the new sets. returns the number of wrapped layers."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in targets and (isinstance(child, nn.Linear) or _is_conv1d(child)):
                setattr(parent, child_name, LoRALinear(child, r, alpha))
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"no layer named any of {targets} found to put LoRA on; pass targets= for this architecture")
    for layer in layers:
        for name in names:
            if name not in layer.lora_A:
                layer.add_adapter(name)
    return len(layers)


def adapter_names(model):
    layers = lora_layers(model)
    return list(layers[0].lora_A) if layers else []


def lora_parameters(model, name):
    return [p for layer in lora_layers(model) for p in (layer.lora_A[name], layer.lora_B[name])]


def lora_state_dict(model, name):
    """the adapter set `name` alone (A and B of every wrapped layer), keyed by module path."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if f".lora_A.{name}" in k or f".lora_B.{name}" in k}


def fix(model, name):
    """make adapter set `name` part of the frozen base, unmerged: applied whatever the switch says (LoRA off
    included), trained no more: merged into a bf16 weight, updates under 2^-8 of it would round away. -> model"""
    for layer in lora_layers(model):
        if name not in layer.fixed:
            layer.fixed.append(name)
        layer.lora_A[name].requires_grad_(False), layer.lora_B[name].requires_grad_(False)
    return model


def cast_base(model, dtype):
    """the base weights (and buffers) to dtype; every adapter set stays fp32, the fixed ones too. -> model"""
    keep = [(p, p.data) for layer in lora_layers(model) for p in (*layer.lora_A.values(), *layer.lora_B.values())]
    model.to(dtype)
    for p, d in keep:  # .to() put a cast copy in place: the fp32 tensor comes back
        p.data = d
    return model
