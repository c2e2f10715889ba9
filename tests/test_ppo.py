"""PPO math and the rollout details of ../shared/notes/ppo-details.md, each pinned by a test."""
import copy
import dataclasses

import pytest
import torch

import data
import hydra_ppo as H
import infra as I
import lora

EOS, PAD = 62, 63


def _tok(pad=PAD):
    return data.Tokenizer(encode=lambda s: [ord(c) % 60 for c in s], decode=lambda ids: "".join(chr(65 + i % 26) for i in ids),
                       eos_id=EOS, pad_id=pad, vocab_size=64)


def _cfg(**kw):
    base = dict(rollout_batch=8, minibatch=4, ppo_epochs=2, max_new_tokens=6, lora_r=4, lora_alpha=8, seed=0,
                actor_lr=1e-2, critic_lr=1e-2, model="test")
    base.update(kw)
    return H.Config(**base)


def _prompts(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 60, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]


def _setup(method, lm, cfg):
    sft = {name: H.HydraModel(copy.deepcopy(lm)) for name in H.sft_models(method)}
    for i, m in enumerate(sft.values()):  # a reward head that says something
        torch.nn.init.normal_(m.reward_head.weight, std=1.0, generator=torch.Generator().manual_seed(i))
    models = H.ppo_bases(method, sft)
    params, _ = H.prepare_ppo(models, method, cfg, torch.device("cpu"))
    opt = torch.optim.AdamW([{"params": params["actor"], "lr": cfg.actor_lr}, {"params": params["critic"], "lr": cfg.critic_lr}])
    return models, params, opt


def _iterate(models, method, params, opt, cfg, step=0, prompts=None, norm=None):
    """one iteration as train_ppo runs it: rollout, calibrate (when there is no score scale yet), update."""
    roles, kl = H.ROLES[method], cfg.kl_coef
    batch = H.rollout(models, roles, prompts or _prompts(cfg.rollout_batch), _tok(), cfg, step, torch.device("cpu"))
    norm = norm or (H.calibrate(models[roles["critic"][0]], batch, cfg) if cfg.score_norm == "sft" else {})
    return H.ppo_update(models, roles, params, opt, kl, batch, norm, cfg, step), batch.responses


# ---------------------------------------------------------------- pure math

def test_last_token_index_finds_last_real_token_whatever_the_padding_side():
    """if this fails, the reward is read from a pad slot for shorter rows."""
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    mixed = torch.tensor([[0, 1, 1, 1, 0, 0]])  # our layout: left-padded prompt, right-padded response
    assert H.last_token_index(right).tolist() == [2, 4, 0]
    assert H.last_token_index(left).tolist() == [4, 4]
    assert H.last_token_index(mixed).tolist() == [3]


def test_gae_matches_hand_computed_example():
    """if this fails, advantages (and so every PPO update) are wrong."""
    r = torch.tensor([[0.0, 0.0, 1.0], [0.5, 2.0, 0.0]])
    v = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = H.gae(r, v, m, gamma=1.0, lam=0.5)
    # row 0: d2 = 1-0.3 = .7; d1 = 0+.3-.2 = .1; d0 = 0+.2-.1 = .1; A2=.7, A1=.1+.5*.7=.45, A0=.1+.5*.45=.325
    # row 1: last real token is t=1: d1 = 2-.5 = 1.5 (no bootstrap from the pad slot); d0 = .5+.5-.4 = .6; A0 = .6+.5*1.5
    want = torch.tensor([[0.325, 0.45, 0.7], [1.35, 1.5, 0.0]])
    assert torch.allclose(adv, want)
    assert torch.allclose(ret, (want + v) * m)


def test_masked_whiten_ignores_padding():
    """if this fails, padding values leak into the advantage normalisation."""
    x = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 5.0, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    w = H.masked_whiten(x, m)
    x2 = x.clone()
    x2[m == 0] = 1000.0
    assert torch.equal(w, H.masked_whiten(x2, m))
    real = w[m == 1]
    assert abs(real.mean().item()) < 1e-6 and abs(real.std().item() - 1) < 1e-4
    assert (w[m == 0] == 0).all()


def test_kl_rewards_put_the_score_on_the_last_real_token_only():
    """if this fails, the reward model's score lands on padding or on every token."""
    score = torch.tensor([2.0, -1.0])
    logp = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -1.0, -2.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rew, kl = H.kl_rewards(score, logp, ref, m, beta=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, 0.0, -0.5], [0.0, -1.0, 0.0]]))
    assert torch.allclose(rew, torch.tensor([[-0.05, 0.0, 0.05 + 2.0], [0.0, 0.1 - 1.0, 0.0]]))


def test_policy_loss_clips_the_ratio():
    """if this fails, PPO takes unbounded steps (no trust region)."""
    old = torch.zeros(1, 2)
    adv = torch.ones(1, 2)
    m = torch.ones(1, 2)
    new = torch.log(torch.tensor([[1.5, 1.1]]))  # first ratio is past 1 + clip
    loss, s = H.policy_loss(new, old, adv, m, clip=0.2)
    assert torch.allclose(loss, torch.tensor(-(1.2 + 1.1) / 2))
    assert H.masked_mean(s["clipfrac"], m) == 0.5
    loss0, s0 = H.policy_loss(old, old, adv, m)
    assert H.masked_mean(s0["ratio"], m) == 1.0 and H.masked_mean(s0["approx_kl"], m) == 0.0 and loss0.item() == -1.0


def test_value_loss_is_clipped_around_the_old_value():
    """if this fails, the critic can jump arbitrarily far in one update."""
    old, ret, m = torch.tensor([[0.0]]), torch.tensor([[1.0]]), torch.ones(1, 1)
    # v = 0.9 is close to the return but 0.7 past the clip: clipped value 0.2 gives the larger loss
    assert torch.allclose(H.value_loss(torch.tensor([[0.9]]), old, ret, m, clip=0.2), torch.tensor(0.5 * 0.8 ** 2))
    assert torch.allclose(H.value_loss(torch.tensor([[0.1]]), old, ret, m, clip=0.2), torch.tensor(0.5 * 0.9 ** 2))


def test_adaptive_kl_controller_moves_beta_towards_the_target():
    """if this fails, --target-kl does nothing and KL runs away (or beta collapses)."""
    assert H.adaptive_kl(0.1, 5.0, 10, target=1.0, horizon=100) > 0.1
    assert H.adaptive_kl(0.1, 0.1, 10, target=1.0, horizon=100) < 0.1
    assert H.adaptive_kl(0.1, 5.0, 10) == 0.1  # target 0: fixed


def test_logprobs_use_the_temperature():
    """if this fails, log-probs at T != 1 disagree with the sampler and the KL estimate is biased."""
    logits = torch.tensor([[[2.0, 0.0, -1.0]]])
    lp, _ = H.logprobs_of(logits, torch.tensor([[0]]), temperature=2.0)
    assert torch.allclose(lp, torch.log_softmax(logits / 2.0, -1)[..., 0])


# ---------------------------------------------------------------- model-level details

def test_reward_is_read_at_the_last_real_token_for_rows_of_different_lengths(tiny_lm):
    """if this fails, shorter rows of a padded batch are scored at a pad slot."""
    m = H.HydraModel(tiny_lm)
    prompts, resps = [[1, 2, 3], [4]], [[5, 6, EOS], [7, 8, 9, 10, EOS]]
    ids, mask, P = data.collate(prompts, resps, PAD)
    with torch.no_grad():
        h, _ = m.hidden(ids, mask)
        batched = m.score(h, mask)
        for i in range(2):
            x = torch.tensor([prompts[i] + resps[i]])
            hi, _ = m.hidden(x, torch.ones_like(x))
            assert torch.allclose(batched[i], m.score(hi, torch.ones_like(x)), atol=1e-5)


def test_kv_cache_generation_matches_a_full_forward(tiny_lm, monkeypatch):
    """if this fails, left padding / position ids / the cache are wrong and rollouts come from a broken policy;
    it also pins that sampling uses the same temperature as the log-probs."""
    m = H.HydraModel(tiny_lm)
    seen = []
    real = H.sample_tokens
    monkeypatch.setattr(H, "sample_tokens", lambda logits, t, gens: (seen.append(torch.softmax(logits / t, -1)), real(logits, t, gens))[1])
    prompts = [[1, 2, 3, 4], [5, 6]]
    T = 0.7
    resp = H.generate(m, None, prompts, _tok(), 4, T, [0, 1])
    assert seen
    for t in range(len(seen)):
        for i in range(2):
            if t < len(resp[i]):  # rows still running at step t
                x = torch.tensor([prompts[i] + resp[i][:t]])
                with torch.no_grad():
                    full = torch.softmax(tiny_lm(x).logits[0, -1] / T, -1)
                assert torch.allclose(seen[t][i], full, atol=1e-5)


def test_sampling_draws_from_the_tempered_softmax():
    """if this fails, rollouts come from another distribution than the one the log-probs score (temperature mismatch)."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    T, n = 0.5, 20000
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    counts = torch.bincount(H.sample_tokens(logits.expand(n, 4), T, gens), minlength=4).float() / n
    want = torch.softmax(logits[0] / T, -1)
    assert torch.allclose(counts, want, atol=0.015), (counts, want)


@pytest.mark.parametrize("T", [1.0, 0.7])
def test_sampling_is_the_gumbel_max_of_each_rows_own_noise(T):
    """the in-place sampler draws other noise than -log(-log(u)) from each row's generator, so a run's (and a resumed
    run's, and every rank's) samples change, if this fails."""
    logits = torch.randn(5, 300)
    want = torch.stack([torch.rand(300, generator=torch.Generator().manual_seed(s)) for s in range(5)])
    want = (logits / T - torch.log(-torch.log(want.clamp(min=1e-20)))).argmax(-1)
    assert torch.equal(H.sample_tokens(logits, T, [torch.Generator().manual_seed(s) for s in range(5)]), want)


def test_a_response_depends_only_on_its_own_seed(tiny_lm):
    """if this fails, a run on N ranks (or with another batch layout) samples other responses than a run on one."""
    m = H.HydraModel(tiny_lm)
    prompts = _prompts(6)
    whole = H.generate(m, None, prompts, _tok(), 6, 1.0, list(range(6)))
    halves = H.generate(m, None, prompts[3:], _tok(), 6, 1.0, [3, 4, 5]) + H.generate(m, None, prompts[:3], _tok(), 6, 1.0, [0, 1, 2])
    assert whole == halves[3:] + halves[:3]
    assert H.generate(m, None, prompts, _tok(), 6, 1.0, list(range(1, 7))) != whole  # and the seed does matter


def test_responses_stop_after_the_first_eos(tiny_lm):
    """if this fails, tokens after EOS get reward, value and loss."""
    m = H.HydraModel(tiny_lm)
    with torch.no_grad():  # make EOS very likely so rows finish at different times
        tiny_lm.get_output_embeddings().weight[EOS] += 0.6 * tiny_lm.get_output_embeddings().weight.mean(0).sign()
    resp = H.generate(m, None, _prompts(8), _tok(), 12, 1.0, range(3, 11))
    assert any(r[-1] == EOS for r in resp)
    for r in resp:
        assert EOS not in r[:-1]  # (pad may be sampled by an untrained model; masks come from lengths)


def test_pad_equal_to_eos_does_not_mask_the_real_eos(tiny_lm):
    """if this fails (pad == eos tokenizers), the final EOS is masked and the model never learns to stop."""
    ids, mask, P = data.collate([[1, 2], [3]], [[4, EOS], [5, 6, EOS]], EOS)  # pad id == eos id
    assert mask[0, P + 1] == 1 and mask[1, P + 2] == 1 and mask[0, P + 2] == 0
    assert ids[0, P + 2] == EOS  # the pad slot holds the same id, and is still masked out


@pytest.mark.parametrize("method", H.METHODS)
def test_first_minibatch_has_ratio_exactly_one_and_kl_exactly_zero(tiny_lm, method):
    """if this fails, old log-probs and the reference are not the actor's own function (dropout, merge, shapes)."""
    cfg = _cfg()
    models, params, opt = _setup(method, tiny_lm, cfg)
    stats, _ = _iterate(models, method, params, opt, cfg)
    assert stats["first_ratio"] == 1.0
    assert stats["first_approx_kl"] == 0.0
    assert stats["kl"] == 0.0


@pytest.mark.parametrize("method", H.METHODS)
def test_no_gradient_reaches_frozen_weights_or_the_reward_head(tiny_lm, method):
    """if this fails, PPO trains the reference/reward model (Hydra's 'LoRA off' would no longer be the SFT model)."""
    cfg = _cfg()
    models, params, opt = _setup(method, tiny_lm, cfg)
    trainable = {id(p) for ps in params.values() for p in ps}
    before = {(n, k): v.detach().clone() for n, m in models.items() for k, v in m.named_parameters()}
    _iterate(models, method, params, opt, cfg)
    _iterate(models, method, params, opt, cfg, step=1)
    moved_trainable = False
    for n, m in models.items():
        for k, v in m.named_parameters():
            if id(v) in trainable:
                moved_trainable |= not torch.equal(v, before[(n, k)])
            else:
                assert torch.equal(v, before[(n, k)]), f"{method}: frozen {n}.{k} changed"
                assert v.grad is None
        assert all(not p.requires_grad for p in m.reward_head.parameters())
    assert moved_trainable


@pytest.mark.parametrize("method", ["hydra-ppo", "ppo"])
def test_reference_logprobs_do_not_move_while_the_actor_trains(tiny_lm, method):
    """if this fails, the KL penalty measures distance to a moving target."""
    cfg = _cfg()
    models, params, opt = _setup(method, tiny_lm, cfg)
    ids, mask, P = data.collate([[1, 2, 3], [4, 5]], [[6, 7, EOS], [8, 9]], PAD)
    with torch.no_grad():
        ref0 = H.run_roles(models, H.ROLES[method], ("reference", "actor"), ids, mask, P, 1.0)
    for step in range(3):
        _iterate(models, method, params, opt, cfg, step=step)
    with torch.no_grad():
        ref1 = H.run_roles(models, H.ROLES[method], ("reference", "actor"), ids, mask, P, 1.0)
    assert torch.equal(ref0["reference"][0], ref1["reference"][0])
    assert not torch.equal(ref0["actor"][0], ref1["actor"][0])


def test_hydra_reference_and_reward_share_one_lora_off_pass(tiny_lm, monkeypatch):
    """if this fails, Hydra-PPO runs more forwards than the paper's method needs (memory/latency claims)."""
    cfg = _cfg()
    models, _, _ = _setup("hydra-ppo", tiny_lm, cfg)
    calls = []
    orig = H.HydraModel.hidden
    monkeypatch.setattr(H.HydraModel, "hidden", lambda self, *a, **k: (calls.append(lora.live_adapter()), orig(self, *a, **k))[1])
    ids, mask, P = data.collate([[1, 2]], [[3, EOS]], PAD)
    with torch.no_grad():
        H.run_roles(models, H.ROLES["hydra-ppo"], ("actor", "reference", "critic", "reward"), ids, mask, P, 1.0)
    assert sorted(calls, key=str) == sorted(["actor", None, "critic"], key=str)


def test_only_the_updates_forward_pays_for_an_entropy(tiny_lm, monkeypatch):
    """if this fails, scoring or backward's recompute spends passes over (B, R, V) on an entropy nobody logs, or the
    logged entropy is gone."""
    cfg = _cfg(rollout_batch=4, minibatch=4, ppo_epochs=1)
    models, params, opt = _setup("hydra-ppo", tiny_lm, cfg)
    monkeypatch.setattr(I, "LOGIT_CHUNK", 4 * 64 * 2)  # 2 positions a chunk: the update recomputes in backward
    asked, orig = [], H.logprobs_of
    monkeypatch.setattr(H, "logprobs_of", lambda *a: (asked.append(a[3]), orig(*a))[1])
    roles = H.ROLES["hydra-ppo"]
    batch = H.rollout(models, roles, _prompts(4), _tok(), cfg, 0, torch.device("cpu"))
    assert asked and not any(asked)  # actor and reference log-probs: no entropy
    asked.clear()
    stats = H.ppo_update(models, roles, params, opt, cfg.kl_coef, batch, {}, cfg, 0)
    chunks = -(-batch.rmask.shape[1] // 2)
    assert asked == [True] * chunks + [False] * chunks  # the forward's chunks, then backward's recompute
    assert stats["entropy"] > 0


@pytest.mark.parametrize("sharded", [False, True])
def test_generation_records_no_graph_and_uses_inference_mode_unless_sharded(tiny_lm, monkeypatch, sharded):
    """if this fails, sampling builds autograd graphs (memory and time per token), or runs in inference mode under
    FSDP2, whose gathered weights then cannot be written by the training forward."""
    m = H.HydraModel(tiny_lm)
    monkeypatch.setattr(H, "is_fsdp", lambda mod: sharded)
    seen, orig = [], H.HydraModel.hidden
    monkeypatch.setattr(H.HydraModel, "hidden", lambda self, *a: (
        seen.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled())), orig(self, *a))[1])
    H.generate(m, None, [[1, 2, 3], [4]], _tok(), 3, 1.0, [0, 1])
    assert seen and set(seen) == {(False, not sharded)}


def test_dropout_is_off_in_every_ppo_role(tiny_lm):
    """if this fails, train-mode forwards are stochastic and PPO ratios are noise."""
    tiny_lm.config.attention_dropout = 0.5
    for layer in tiny_lm.model.layers:
        layer.self_attn.attention_dropout = 0.5
    cfg = _cfg()
    models, _, _ = _setup("ppo", tiny_lm, cfg)
    ids, mask, P = data.collate([[1, 2, 3]], [[4, 5, EOS]], PAD)
    for m in models.values():
        m.train()
    a = H.run_roles(models, H.ROLES["ppo"], ("actor", "critic"), ids, mask, P, 1.0)
    b = H.run_roles(models, H.ROLES["ppo"], ("actor", "critic"), ids, mask, P, 1.0)
    assert torch.equal(a["actor"][0], b["actor"][0]) and torch.equal(a["critic"], b["critic"])


def test_value_head_starts_as_the_reward_head_when_asked(tiny_lm):
    """if this fails, --value-init does not do what the README says."""
    models, _, _ = _setup("hydra-ppo", tiny_lm, _cfg(value_init="reward"))
    assert torch.equal(models["hydra"].value_head.weight, models["hydra"].reward_head.weight)
    models, _, _ = _setup("hydra-ppo", tiny_lm, _cfg(value_init="zero"))
    assert (models["hydra"].value_head.weight == 0).all()


def test_missing_eos_penalty_lowers_the_score_of_unfinished_responses(tiny_lm):
    """if this fails, --missing-eos-penalty is silently ignored."""
    outs = []
    for pen in (0.0, -3.0):
        cfg = _cfg(missing_eos_penalty=pen, max_new_tokens=2, ppo_epochs=1)
        models, params, opt = _setup("hydra-ppo", tiny_lm, cfg)
        stats, resp = _iterate(models, "hydra-ppo", params, opt, cfg)
        outs.append((stats, resp))
    n_open = sum(r[-1] != EOS for r in outs[0][1])
    assert n_open > 0
    # same rollouts (same seeds); the penalty shows up in the value loss targets, not in the raw score
    assert outs[0][1] == outs[1][1] and outs[0][0]["score"] == outs[1][0]["score"]
    assert outs[0][0]["vf_loss"] != outs[1][0]["vf_loss"]


def test_value_head_copied_from_reward_head_is_put_on_the_normalised_score_scale(tiny_lm):
    """if this fails, the critic starts on the raw reward scale while its targets are normalised (explained var ~ -10)."""
    cfg = _cfg(value_init="reward")
    models, params, opt = _setup("hydra-ppo", tiny_lm, cfg)
    m = models["hydra"]
    w0, b0 = m.reward_head.weight.detach().clone(), m.reward_head.bias.detach().clone()
    batch = H.rollout(models, H.ROLES["hydra-ppo"], _prompts(cfg.rollout_batch), _tok(), cfg, 0, torch.device("cpu"))
    norm = H.calibrate(m, batch, cfg)
    assert torch.allclose(m.value_head.weight, w0 / norm["std"]) and torch.allclose(m.value_head.bias, (b0 - norm["mean"]) / norm["std"])
    assert torch.equal(m.reward_head.weight, w0)  # the reward model itself is untouched


def test_adapter_init_does_not_depend_on_what_ran_before(tiny_lm, tmp_path):
    """if this fails, a resumed `--stage ppo` (or another rank) starts from other LoRA weights than the run that did
    SFT in the same process: the init read the global RNG wherever SFT had left it."""
    cfg = _cfg(ppo_steps=0)
    got = []
    for burn in (0, 5):
        models = H.ppo_bases("hydra-ppo", {"hydra": H.HydraModel(copy.deepcopy(tiny_lm))})
        torch.rand(burn)  # what SFT steps did to the global RNG
        H.train_ppo(models, "hydra-ppo", [], _tok(), dataclasses.replace(cfg, out=str(tmp_path)), torch.device("cpu"))
        got.append(torch.cat([p.detach().flatten() for p in lora.lora_parameters(models["hydra"].lm, "actor")]))
    assert torch.equal(got[0], got[1])


def test_adapter_init_is_the_same_in_every_process():
    """if this fails, a two-base method (lora-ppo) puts other LoRA weights on each rank or in a resumed run: the
    bases were injected in set order, which Python's per-process string hashing changes."""
    import os
    import subprocess
    import sys
    code = ("import copy, torch, hydra_ppo as H, lora\n"
            "from transformers import LlamaConfig, LlamaForCausalLM\n"
            "torch.manual_seed(0)\n"
            "lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,"
            " num_attention_heads=2, num_key_value_heads=2))\n"
            "models = H.ppo_bases('lora-ppo', {n: H.HydraModel(copy.deepcopy(lm)) for n in ('sft', 'rm')})\n"
            "torch.manual_seed(1)\n"
            "H.prepare_ppo(models, 'lora-ppo', H.Config(lora_r=2, lora_alpha=4), torch.device('cpu'))\n"
            "print(float(lora.lora_parameters(models['sft'].lm, 'actor')[0].sum()), float(lora.lora_parameters(models['rm'].lm, 'critic')[0].sum()))\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outs = {subprocess.run([sys.executable, "-c", code], cwd=root, env={**os.environ, "PYTHONHASHSEED": seed},
                           capture_output=True, text=True, check=True).stdout for seed in ("1", "2", "3", "4")}
    assert len(outs) == 1, outs


def test_chunked_logprobs_equal_whole_logits_in_value_and_gradient(tiny_lm):
    """the chunked log-probs (no whole (B, R, V) logits) would train on other numbers than the plain log-softmax, or
    keep the whole logits alive after all, if this fails."""
    m = H.HydraModel(tiny_lm)
    torch.manual_seed(0)
    h = torch.randn(3, 7, 32, requires_grad=True)
    tokens = torch.randint(0, 64, (3, 7))
    w = torch.randn(3, 7)
    ref, ref_ent = H.logprobs_of(m.logits(h), tokens, temperature=0.7, entropy=True)
    (ref * w).sum().backward()
    g_ref, gw_ref = h.grad.clone(), m.lm.get_output_embeddings().weight.grad.clone()
    h.grad, m.lm.get_output_embeddings().weight.grad = None, None
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: (saved.append(x.numel()), x)[1], lambda x: x):
        lp, ent = H.response_logprobs(m, h, tokens, temperature=0.7, chunk=2 * 3 * 64, entropy=True)  # 2 positions
    (lp * w).sum().backward()
    assert torch.allclose(lp, ref, atol=1e-6) and torch.allclose(ent, ref_ent, atol=1e-6)
    assert torch.allclose(h.grad, g_ref, atol=1e-6) and torch.allclose(m.lm.get_output_embeddings().weight.grad, gw_ref, atol=1e-6)
    assert max(saved) < 3 * 7 * 64  # nothing of the whole logits' size is kept for backward


def test_a_skipped_step_leaves_the_weights_and_the_optimizer_as_before_it(tiny_lm, monkeypatch, tmp_path):
    """if this fails, --skip-nonfinite counts a PPO step as skipped while the minibatches before its fault have moved
    the weights and AdamW's state already (and the loop's own fields) - a skipped step kept part of its updates."""
    import math
    cfg = _cfg(rollout_batch=8, minibatch=2, ppo_epochs=1, stop_kl=math.inf, skip_nonfinite=True, out=str(tmp_path))
    models, params, opt = _setup("hydra-ppo", tiny_lm, cfg)
    roles, real, calls = H.ROLES["hydra-ppo"], H.value_loss, []

    def nan_in_the_third_minibatch_of_step_two(*a, **k):  # 4 minibatches a step, one critic loss each
        calls.append(1)
        return real(*a, **k) * (float("nan") if len(calls) == 7 else 1.0)
    monkeypatch.setattr(H, "value_loss", nan_in_the_third_minibatch_of_step_two)
    state, before = {"skipped": 0, "steps_seen": 0}, []

    loop = I.Loop("ppo", 2, cfg, {n: (m, "trained") for n, m in models.items()}, opt, state)
    for i in loop:
        with loop.guard():
            before.append(([p.detach().clone() for ps in params.values() for p in ps],
                           copy.deepcopy(opt.state_dict())))
            state["steps_seen"] += 1
            batch = H.rollout(models, roles, _prompts(8), _tok(), cfg, i, torch.device("cpu"))
            loop.log(H.ppo_update(models, roles, params, opt, cfg.kl_coef, batch, {}, cfg, i))
    assert len(calls) == 7 and state == {"skipped": 1, "steps_seen": 1}  # the faulty step's field change undone
    weights, opt_state = before[1]
    assert all(torch.equal(p, w) for p, w in zip([p for ps in params.values() for p in ps], weights))
    now = opt.state_dict()
    assert now["state"].keys() == opt_state["state"].keys() and all(
        torch.equal(now["state"][i][k], v) for i, s in opt_state["state"].items() for k, v in s.items())
    assert all(p.grad is None for ps in params.values() for p in ps)
