"""lora.py: the adapter switch and its pitfalls (ppo-details.md, "LoRA switch pitfalls")."""
import copy
import os

import pytest
import torch

import infra
import lora


def _ids(vocab=60, B=3, T=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g)


def _perturb(model, names, seed=0):
    """give adapters non-zero B so that they really change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model):
            for n in names:
                layer.lora_B[n].copy_(torch.randn(layer.lora_B[n].shape, generator=g) * 0.1)


def test_switch_off_is_bit_identical_to_uninjected_model(tiny_lm):
    """if this fails, 'LoRA off' is not the reference/reward model and every KL and score is wrong."""
    plain = copy.deepcopy(tiny_lm)
    lora.inject(tiny_lm, ["actor", "critic"], r=4, alpha=8)
    _perturb(tiny_lm, ["actor", "critic"])
    x = _ids()
    with lora.adapter(None):
        got = tiny_lm(x).logits
    assert torch.equal(got, plain(x).logits)
    with lora.adapter("actor"):
        assert not torch.equal(tiny_lm(x).logits, got)  # and the adapter is really there


def test_fresh_adapter_changes_nothing(tiny_lm):
    """if this fails, the actor does not start at the reference and the first KL is not 0."""
    plain = copy.deepcopy(tiny_lm)
    lora.inject(tiny_lm, ["actor"], r=4, alpha=8)
    x = _ids()
    with lora.adapter("actor"):
        assert torch.equal(tiny_lm(x).logits, plain(x).logits)


def test_gradients_reach_only_the_live_adapter(tiny_lm):
    """if this fails, the critic's loss trains the actor (or the frozen base) behind our back."""
    lora.inject(tiny_lm, ["actor", "critic"], r=4, alpha=8)
    tiny_lm.requires_grad_(False)
    for n in ("actor", "critic"):
        for p in lora.lora_parameters(tiny_lm, n):
            p.requires_grad_(True)
    _perturb(tiny_lm, ["actor", "critic"])
    with lora.adapter("actor"):
        tiny_lm(_ids()).logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.lora_parameters(tiny_lm, "actor"))
    assert all(p.grad is None for p in lora.lora_parameters(tiny_lm, "critic"))
    assert all(p.grad is None for n, p in tiny_lm.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("alpha", [8.0, 5.0])  # scale 2 (a power of two) and 1.25
def test_lora_layer_is_w_x_plus_scaled_b_a_x_in_value_and_gradient(alpha):
    """if this fails, the in-place scaled add in LoRALinear.forward gives other outputs or gradients than the
    formula y = W x + b + (alpha / r) B A x (for the input too: a frozen base passes gradient through it)."""
    torch.manual_seed(0)
    layer = lora.LoRALinear(torch.nn.Linear(6, 5), r=4, alpha=alpha)
    layer.add_adapter("a")
    with torch.no_grad():
        layer.lora_B["a"].normal_()
    x = torch.randn(3, 2, 6, requires_grad=True)
    with lora.adapter("a"):
        y = layer(x)
    A, B, W, b = layer.lora_A["a"], layer.lora_B["a"], layer.base.weight, layer.base.bias
    ref = x @ W.T + b + (x @ A.T @ B.T) * (alpha / 4)
    assert torch.allclose(y, ref, atol=1e-6)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, A, B), g)
    want = torch.autograd.grad(ref, (x, A, B), g)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, want))


def test_switch_state_is_restored_after_an_exception():
    """if this fails, an error inside a reference pass leaves LoRA off (or on) for the rest of the run."""
    with lora.adapter("actor"):
        with pytest.raises(RuntimeError):
            with lora.adapter(None):
                raise RuntimeError("boom")
        assert lora.live_adapter() == "actor"
    assert lora.live_adapter() is None


def test_unknown_adapter_name_is_an_error_not_a_silent_base_pass(tiny_lm):
    """if this fails, a typo in the role table silently runs the base model as the critic."""
    lora.inject(tiny_lm, ["actor"], r=4, alpha=8)
    with lora.adapter("critic"), pytest.raises(KeyError):
        tiny_lm(_ids())


def test_adapter_save_load_round_trip(tiny_lm, tmp_path):
    """if this fails, a saved PPO run cannot be restored: adapters alone must carry the whole trained state."""
    lora.inject(tiny_lm, ["actor"], r=4, alpha=8)
    _perturb(tiny_lm, ["actor"])
    x = _ids()
    with lora.adapter("actor"):
        want = tiny_lm(x).logits
    path = str(tmp_path / "actor.pt")
    infra.save_atomic(lora.lora_state_dict(tiny_lm, "actor"), path)
    assert not os.path.exists(path + ".tmp")
    sd = infra.load_file(path)
    assert all("lora_" in k for k in sd) and len(sd) == 2 * len(lora.lora_layers(tiny_lm))
    _perturb(tiny_lm, ["actor"], seed=5)
    assert not tiny_lm.load_state_dict(sd, strict=False).unexpected_keys  # as load_run reads ppo.pt
    with lora.adapter("actor"):
        assert torch.equal(tiny_lm(x).logits, want)


@torch.no_grad()
def test_folding_an_adapter_makes_new_weights_and_leaves_lora_off_the_base(tiny_lm):
    """if this fails, the fold an export writes (merged_weight) is not W + B A alpha/r, or it wrote into the live
    base: the merged adapter would survive 'LoRA off', and the reference and reward model would be the policy."""
    lora.inject(tiny_lm, ["actor"], r=4, alpha=8)
    _perturb(tiny_lm, ["actor"])
    x = _ids()
    with lora.adapter(None):
        off = tiny_lm(x).logits
    for layer in lora.lora_layers(tiny_lm):
        w = layer.base.weight.clone()
        want = w + layer.lora_B["actor"] @ layer.lora_A["actor"] * layer.scale
        assert torch.allclose(layer.merged_weight("actor"), want) and torch.equal(layer.base.weight, w)
    with lora.adapter(None):
        assert torch.equal(tiny_lm(x).logits, off)


def test_gpt2_conv1d_layers_take_lora():
    """if this fails, GPT-2-style models (Conv1D, transposed weights) get no adapter or a wrong-shaped one."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    plain = copy.deepcopy(m)
    n = lora.inject(m, ["actor"], r=4, alpha=8)
    assert n == 2 * 4  # c_attn, c_proj (attn), c_fc, c_proj (mlp) per block
    x = _ids()
    with lora.adapter("actor"):
        assert torch.equal(m(x).logits, plain(x).logits)
        _perturb(m, ["actor"])
        assert not torch.equal(m(x).logits, plain(x).logits)


def _grads_with_backward_outside_switch(lm, ckpt):
    """forward under the actor adapter, backward after the switch is back off (as a PPO loop may do)."""
    if ckpt:
        infra.enable_checkpointing(lm)
    lm.train()
    with lora.adapter("actor"):
        loss = lm(_ids()).logits.pow(2).mean()
    loss.backward()  # recomputation (if any) happens here, with the switch off
    return [p.grad.clone() for p in lora.lora_parameters(lm, "actor")]


def test_activation_checkpointing_gives_the_same_gradients_as_without(tiny_lm):
    """if this fails, checkpointing recomputes the forward with a different switch state: silently wrong grads."""
    lora.inject(tiny_lm, ["actor"], r=4, alpha=8)
    tiny_lm.requires_grad_(False)
    for p in lora.lora_parameters(tiny_lm, "actor"):
        p.requires_grad_(True)
    _perturb(tiny_lm, ["actor"])
    a, b = copy.deepcopy(tiny_lm), copy.deepcopy(tiny_lm)
    want = _grads_with_backward_outside_switch(a, ckpt=False)
    got = _grads_with_backward_outside_switch(b, ckpt=True)
    assert b.model.layers[0].gradient_checkpointing  # checkpointing is really on
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-6)
