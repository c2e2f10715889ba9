"""a run's identity (issue #21, items 4 and 7): --fresh leaves nothing of the old run to be read with the new one,
and a resume (or eval.py) refuses files of another run, naming each flag that differs."""
import os
import shutil
import signal

import pytest

import eval as E
import infra as I
from test_cli import SMALL, _main, _metrics, _stop_at


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """a whole run, seed 0, exported to OUT/hf: every artifact a run writes."""
    out = str(tmp_path_factory.mktemp("seed0"))
    assert _main(["--out", out, "--export"] + SMALL)[0] == 0
    assert os.path.exists(os.path.join(out, "ppo.pt")) and os.path.isdir(os.path.join(out, "hf"))
    return out


@pytest.fixture(scope="module")
def reseeded(finished_run, tmp_path_factory):
    """the issue's repro: the seed-0 run's directory, then --fresh --stage sft --seed 1 in it."""
    out = str(tmp_path_factory.mktemp("reseeded") / "o")
    shutil.copytree(finished_run, out)
    for leftover in ("hf.tmp", "ckpt.old"):  # what a kill can leave behind (an export, a sharded checkpoint)
        os.makedirs(os.path.join(out, leftover), exist_ok=True)  # (ckpt.old: also the checkpoint before ckpt)
    open(os.path.join(out, "ppo.pt.tmp"), "w").close()
    open(os.path.join(out, "notes.txt"), "w").close()  # not the run's
    assert _main(["--out", out, "--fresh", "--stage", "sft", "--seed", "1"] + SMALL)[0] == 0
    return out


def _copy(src, tmp_path):
    out = str(tmp_path / "o")
    shutil.copytree(src, out)
    return out


def test_fresh_removes_every_artifact_of_the_old_run(reseeded):
    """if this fails, --fresh leaves the old run's ppo.pt or hf/ behind, and eval.py loads the new sft.pt with the old
    run's adapters without a word."""
    assert sorted(os.listdir(reseeded)) == [".lock", "ckpt", "ckpt.old", "metrics.jsonl", "notes.txt", "sft.pt",
                                            "summary.json"]
    for f in ("sft.pt", "ckpt/extra.pt", "ckpt.old/extra.pt"):  # ckpt.old: the new run's checkpoint before ckpt
        assert I.load_file(os.path.join(reseeded, f))["meta"]["seed"] == 1
    assert I.load_file(os.path.join(reseeded, "summary.json"))["seed"] == 1
    assert E.load_run(reseeded, "cpu")[3] is False  # the SFT policy alone: no PPO policy of another run


def test_load_run_refuses_a_ppo_pt_of_another_run_with_one_line(finished_run, reseeded, tmp_path):
    """if this fails, eval.py (sample, compare, export) puts one run's PPO adapters on another run's SFT model."""
    out = _copy(reseeded, tmp_path)
    shutil.copy(os.path.join(finished_run, "ppo.pt"), out)  # the seed-0 PPO policy beside the seed-1 sft.pt
    with pytest.raises(I.ConfigError) as e:
        E.load_run(out, "cpu")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(os.path.join(out, "ppo.pt")) and "--seed 0 (sft.pt: 1)" in msg
    E.load_run(finished_run, "cpu")  # a run's own ppo.pt loads


@pytest.mark.parametrize("flag,value,needle", [
    ("--lora-r", "8", "ckpt is from another run: --lora-r 16 (now 8);"),  # a PPO flag: the checkpoint's adapters
    ("--temperature", "0.7", "ckpt is from another run: --temperature 1.0 (now 0.7);"),  # no shape: was silent
    ("--sft-lr", "0.01", "sft.pt is from another run: --sft-lr 0.001 (now 0.01);"),  # an SFT flag: sft.pt's
])
def test_resume_with_a_changed_flag_that_changes_results_is_refused_naming_it(finished_run, tmp_path, capsys, flag,
                                                                               value, needle):
    """if this fails, a resume with another --lora-r dies of a raw RuntimeError, or one with another --temperature
    (--sft-lr, ...) continues silently with mixed settings."""
    code, err = _main(["--out", _copy(finished_run, tmp_path)] + SMALL + [flag, value], capsys)
    assert code == 2 and needle in err and err.startswith("error: ")


def test_resume_with_only_flags_outside_the_identity_changed_still_resumes(tmp_path, monkeypatch, capsys):
    """if this fails, the identity holds a flag that does not change results, and a run stopped mid-PPO cannot be
    resumed with other --threads/--ckpt-every/--eval-prompts/--skip-nonfinite (or a longer --ppo-steps)."""
    out = str(tmp_path)
    with monkeypatch.context() as m:
        _stop_at(m, "ppo", 3)
        assert _main(["--out", out] + SMALL, capsys)[0] == 128 + signal.SIGTERM
    other = ["--threads", "2", "--ckpt-every", "5", "--eval-prompts", "4", "--skip-nonfinite", "--ppo-steps", "7"]
    assert _main(["--out", out] + SMALL + other)[0] == 0
    assert f"resuming ppo from {os.path.join(out, 'ckpt')} at step 3" in capsys.readouterr().out
    steps = [r["step"] for r in _metrics(out) if r["stage"] == "ppo"]
    assert steps == list(range(1, 8))
    assert I.load_file(os.path.join(out, "ckpt", "extra.pt"))["step"] == 7


def test_stage_ppo_from_a_finished_sft_may_change_ppo_flags(reseeded, tmp_path):
    """if this fails, sft.pt (or the checkpoint SFT left) holds PPO flags in its identity, and PPO runs with another
    --kl-coef/--lora-r from one finished SFT are refused."""
    out = _copy(reseeded, tmp_path)
    args = SMALL + ["--seed", "1", "--stage", "ppo", "--ppo-steps", "1", "--kl-coef", "0.05", "--lora-r", "8"]
    assert _main(["--out", out] + args)[0] == 0
    bases, cfg, _, has_ppo = E.load_run(out, "cpu")  # with its PPO's flags: --lora-r 8 adapters load
    assert has_ppo and (cfg.lora_r, cfg.kl_coef) == (8, 0.05)


def test_resume_past_the_checkpoints_step_count_is_refused(finished_run, tmp_path, capsys):
    """if this fails, a run asked for fewer PPO steps than its checkpoint holds writes the longer run's policy as its
    own without a word."""
    code, err = _main(["--out", _copy(finished_run, tmp_path)] + SMALL + ["--ppo-steps", "4"], capsys)
    assert code == 2 and "ckpt is at ppo step 6, past --ppo-steps 4" in err


def test_fresh_with_stage_ppo_starts_ppo_over_from_the_sft_it_has(finished_run, tmp_path):
    """if this fails, `--fresh --stage ppo` deletes the sft.pt it is about to start from and stops with "needs
    sft.pt", or keeps the old PPO's checkpoint, adapters or records."""
    out = _copy(finished_run, tmp_path)
    sft = open(os.path.join(out, "sft.pt"), "rb").read()
    assert _main(["--out", out, "--fresh", "--stage", "ppo"] + SMALL)[0] == 0
    assert open(os.path.join(out, "sft.pt"), "rb").read() == sft and not os.path.exists(os.path.join(out, "hf"))
    assert _metrics(out) == _metrics(finished_run)  # PPO again from step 1, its records once


def test_files_of_an_older_format_are_one_line(finished_run, tmp_path, capsys):
    """if this fails, a run directory from before the one checkpoint format (extra.pt without the loop's state, a
    ppo.pt without "models") resumes or loads into a KeyError traceback."""
    import torch
    out = _copy(finished_run, tmp_path)
    extra = os.path.join(out, "ckpt", "extra.pt")
    torch.save({k: v for k, v in torch.load(extra, weights_only=False).items() if k != "state"}, extra)
    code, err = _main(["--out", out] + SMALL, capsys)
    assert code == 2 and err.startswith("error: ") and "written by an older hydra" in err and "\n" not in err
    ppo = os.path.join(out, "ppo.pt")
    torch.save({"trainable": torch.load(ppo, weights_only=False)["models"]}, ppo)
    with pytest.raises(I.ConfigError, match="ppo.pt was written by an older hydra"):
        E.load_run(out, "cpu")
