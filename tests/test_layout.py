"""the layout a reader relies on: the algorithm in hydra_ppo.py, the plumbing in infra.py, pure math, one role table,
no import circle."""
import ast
import os
import subprocess
import sys

import pytest
import torch

import hydra_ppo as H
import infra as I

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = open(os.path.join(ROOT, "hydra_ppo.py")).read()


def _section(title, next_title):
    """the source between two section rulers of hydra_ppo.py."""
    start = SOURCE.index("# " + title)
    return SOURCE[start:SOURCE.index("# " + next_title, start)]


def _calls(src):
    return {n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", None)
            for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Call)}


def test_the_ppo_math_calls_no_collective():
    """if this fails, a loss or a statistic reaches for the process group again: its formula no longer reads on its
    own, and a test of it needs torchrun."""
    math = _section("the PPO math", "generation:")
    assert not _calls(math) & {"all_sum", "world", "all_reduce", "rank_mean", "token_mean", "token_share", "barrier"}


def test_the_math_gives_the_same_bits_with_the_rank_sum_passed_in(monkeypatch):
    """if this fails, passing all_sum into masked_whiten / explained_variance (as ppo_update does) changes a
    one-process run's numbers, or the math calls a collective on its own (here they raise)."""
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    m = (torch.rand(4, 6, generator=g) > 0.3).float()
    one = (H.masked_whiten(x, m, total=I.all_sum), H.explained_variance(v, x, m, I.all_sum))

    def boom(*a, **k):
        raise AssertionError("a collective inside the math")
    monkeypatch.setattr(H, "all_sum", boom)
    monkeypatch.setattr(H, "world", boom)
    assert torch.equal(H.masked_whiten(x, m), one[0]) and H.explained_variance(v, x, m) == one[1]
    loss, diag = H.policy_loss(x, v, x, m, 0.2)
    assert torch.equal(loss, H.policy_loss(x, v, x, m, 0.2, n=m.sum().clamp(min=1))[0])
    assert set(diag) == {"clipfrac", "approx_kl", "ratio"} and not any(t.requires_grad for t in diag.values())
    H.value_loss(x, v, x, m), H.gae(x, v, m), H.kl_rewards(x[:, 0], x, v, m, 0.1)


def test_the_algorithm_is_hydra_ppo_and_the_plumbing_lives_in_infra():
    """if this fails, hydra_ppo.py no longer reads as the paper: a role, a loss or a loop moved out of it, process
    plumbing moved back in, or the reader meets the PPO iteration and its loop past the first 550 lines."""
    defined = {n.name for n in ast.parse(SOURCE).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    for name in ("Config", "HydraModel", "run_roles", "gae", "policy_loss", "generate", "sft_loss", "rollout",
                 "calibrate", "ppo_update", "train_sft", "train_ppo", "evaluate", "run", "main"):
        assert name in defined, name
    for name in ("all_sum", "shard", "save_atomic", "load_lm", "validate", "StopFlag", "estimate", "Loop"):
        assert name not in defined, name
    lines = SOURCE.split("\n")
    at = {d: next(i + 1 for i, line in enumerate(lines) if line.startswith(d))
          for d in ("ROLES = {", "def rollout(", "def ppo_update(", "def train_ppo(")}
    assert list(at.values()) == sorted(at.values()) and max(at.values()) <= 550, at


def _imports(name):
    tree = ast.parse(open(os.path.join(ROOT, name)).read())
    got = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return got | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}


def test_the_project_files_import_one_way():
    """if this fails, there is an import circle: infra.py (plumbing) reaches into the algorithm or the evaluation,
    data.py into either, or lora.py into anything of the project's."""
    project = {"hydra_ppo", "infra", "data", "lora", "eval"}
    allowed = {"lora.py": set(), "data.py": set(), "infra.py": {"data", "lora"},
               "hydra_ppo.py": {"data", "infra", "lora"}, "eval.py": {"data", "infra", "lora", "hydra_ppo"}}
    for name, ok in allowed.items():
        assert _imports(name) & project <= ok, (name, _imports(name) & project)


def test_hydra_ppo_does_not_import_eval():
    """if this fails, the two files import each other again (the memory plan reached into eval.py)."""
    code = ("import sys, torch, hydra_ppo as H, infra as I\n"
            "I.check_memory_plan(H.Config(model='smollm2-135m'), torch.device('cpu'), torch.float32, "
            "H.ROLES['hydra-ppo'], 1)\n"
            "assert 'eval' not in sys.modules, 'eval imported'\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "memory plan" in r.stdout


@pytest.mark.parametrize("name", ["hydra_ppo.py", "infra.py", "eval.py", "data.py", "lora.py"])
def test_core_files_have_no_line_wider_than_120_columns(name):
    """if this fails, a reader scrolls sideways: the project's files stay within 120 columns."""
    with open(os.path.join(ROOT, name)) as f:
        wide = [i + 1 for i, line in enumerate(f.read().split("\n")) if len(line) > 120]
    assert not wide, f"{name}: lines {wide[:10]}"


def test_method_lists_come_from_the_role_table():
    """if this fails, a method added to ROLES is missing from the flags, the SFT plan, the bench or the results
    table (names were listed by hand in six places)."""
    import eval as E
    assert H.METHODS == tuple(H.ROLES) and E.ROWS[-len(H.METHODS):] == H.METHODS
    assert [E.paper_name(m) for m in H.METHODS] == ["PPO", "LoRA-PPO", "J-Hydra-PPO", "Hydra-PPO"]
    assert set(E.ROW_ORDER) >= {E.paper_name(m) for m in H.METHODS}
    for m in H.METHODS:
        sft = {n: [n] for n in H.sft_models(m)}
        bases = H.ppo_bases(m, sft)
        assert set(sft) <= set(H.SFT_LOSS) and set(bases) == {b for b, _, _ in H.ROLES[m].values()}
        for role, (base, adapter, _) in H.ROLES[m].items():  # a base a role trains whole is a copy, never shared
            whole = adapter is None and role in ("actor", "critic")
            assert any(bases[base] is v for v in sft.values()) != whole and bases[base] == sft[H.COPY_OF.get(base, base)]
