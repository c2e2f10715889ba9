"""the misuse matrix (issue 29): each case ends in one `error:` line and a non-zero exit, or in the right behaviour,
and nothing of the user's is lost."""
import os
import shutil
import signal
import subprocess
import sys

import pytest

import eval as E
import hydra_ppo as H
import infra as I

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--sft-steps", "4", "--ppo-steps", "2", "--rollout-batch", "4", "--minibatch", "4", "--eval-prompts", "4",
        "--max-new-tokens", "8", "--n-builtin", "200"]


def _exit(fn, args, capsys):
    """fn(args) in-process; -> (exit code, the one 'error: ' line of stderr or all of stderr if none, stdout)."""
    I.STOP.requested = None
    try:
        fn(args)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    errors = [line for line in err.replace("\r", "\n").split("\n") if line.startswith("error: ")]
    assert len(errors) <= 1, errors
    return code, errors[0] if errors else err, out


def _files(d):
    """{relative path: bytes} of everything under d."""
    out = {}
    for root, _, fs in os.walk(d):
        for f in fs:
            with open(os.path.join(root, f), "rb") as fh:
                out[os.path.relpath(os.path.join(root, f), d)] = fh.read()
    return out


def _cut(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("misuse") / "run")
    assert H.main(["--out", out] + TINY) is None
    return out


@pytest.fixture
def copy(run_dir, tmp_path):
    d = str(tmp_path / "run")
    shutil.copytree(run_dir, d)
    return d


# 1. eval.py export --out


@pytest.mark.parametrize("target", ["the run", "a folder holding a run", "unrelated files", "a regular file"])
def test_export_never_replaces_a_run_a_folder_holding_one_or_unrelated_files(copy, tmp_path, capsys, target):
    """if this fails, `eval.py export RUN --out DIR` deletes a run's checkpoints or a user's files and exits 0."""
    out = {"the run": copy, "a folder holding a run": str(tmp_path), "unrelated files": str(tmp_path / "mine"),
           "a regular file": str(tmp_path / "file")}[target]
    if target == "unrelated files":
        os.makedirs(out)
        open(os.path.join(out, "notes.txt"), "w").write("mine")
    if target == "a regular file":
        open(out, "w").write("mine")
    before = _files(str(tmp_path))
    code, err, _ = _exit(E.main, ["export", copy, "--out", out], capsys)
    assert code == 2 and err.startswith(f"error: export to {out}: it ")
    assert _files(str(tmp_path)) == before


def test_export_replaces_an_earlier_export_whole(copy, tmp_path, capsys):
    """if this fails, exporting again to the same --out is refused (or leaves the old export's files in it)."""
    out = str(tmp_path / "ex")
    assert _exit(E.main, ["export", copy, "--out", out], capsys)[0] == 0
    open(os.path.join(out, "sft", "stale.txt"), "w").write("from an older export")
    assert _exit(E.main, ["export", copy, "--out", out], capsys)[0] == 0
    assert sorted(os.listdir(out)) == ["adapters", "policy", "reward", "sft"]
    assert not os.path.exists(os.path.join(out, "sft", "stale.txt"))


# 2. a refused run writes nothing


@pytest.mark.parametrize("args", [["--method", "lora-ppo", "--seed", "3"], ["--sft-batch", "5000"]])
def test_a_refused_run_writes_nothing_into_the_run_it_refused(copy, capsys, args):
    """if this fails, a refused resume has already rewritten summary.json, and `eval.py table` lists the run under
    the refused flags."""
    before = _files(copy)
    code, err, _ = _exit(H.main, ["--out", copy] + TINY + args, capsys)
    assert code == 2 and err.startswith("error: ")
    assert _files(copy) == before


# 3. one run per --out


def test_a_second_run_on_a_live_out_is_refused_naming_the_holder_and_a_killed_holder_blocks_nothing(tmp_path, capsys):
    """if this fails, two runs on one --out write into each other's checkpoints (or a killed run's lock blocks the
    next run for ever)."""
    out = str(tmp_path / "o")
    os.makedirs(out)
    holder = subprocess.Popen([sys.executable, "-c", f"import infra, time; infra.lock_out({out!r}); "
                               "print('held', flush=True); time.sleep(60)"], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, err, _ = _exit(H.main, ["--out", out] + TINY, capsys)
        assert code == 2 and "is in use by a run that is still going" in err and f"pid {holder.pid} " in err
        assert sorted(os.listdir(out)) == [".lock"]  # nothing written, nothing deleted
    finally:
        holder.kill()
        holder.wait()
    I.lock_out(out)  # the kernel let go of the killed holder's lock
    I.unlock_out()


# 4. flags that change training, and the context window


@pytest.mark.parametrize("args,needle", [
    (["--max-grad-norm=-1"], "--max-grad-norm -1.0: must be > 0"),
    (["--lora-alpha", "0"], "--lora-alpha 0.0: must be > 0"),
    (["--ppo-steps", "0"], "--ppo-steps 0: must be >= 1"),
    (["--kl-coef", "nan"], "--kl-coef nan: must be a finite number"),
    (["--temperature", "inf"], "--temperature inf: must be a finite number"),
    (["--vf-coef", "-1"], "--vf-coef -1.0: must be >= 0"),
    (["--kl-horizon", "0"], "--kl-horizon 0: must be >= 1"),
    (["--max-prompt", "480", "--max-response", "16", "--max-new-tokens", "60"],
     "--max-prompt 480 + --max-new-tokens 60 = 540 tokens (PPO) is more than the 512 positions of --model tiny"),
    (["--max-prompt", "2000"], "--max-prompt 2000 + --max-response 48 = 2048 tokens (SFT) is more than the 512"),
])
def test_flags_outside_their_domain_are_refused_before_anything_is_written(copy, capsys, args, needle):
    """if this fails, gradient ascent, a no-op PPO or positions past the model's window run on with exit 0 (or
    --fresh deletes the old run before the refusal)."""
    before = _files(copy)
    code, err, _ = _exit(H.main, ["--out", copy, "--fresh"] + TINY + args, capsys)
    assert code == 2 and needle in err
    assert _files(copy) == before


# 5. damaged files


def test_damaged_files_are_one_line_naming_the_file_in_hydra_ppo_and_eval_py(copy, tmp_path, capsys):
    """if this fails, a truncated sft.pt or ppo.pt ends in torch's PytorchStreamReader traceback."""
    _cut(os.path.join(copy, "ppo.pt"))
    for job in (["export", copy, "--out", str(tmp_path / "ex")], ["sample", copy, "--prompt", "hi"]):
        code, err, _ = _exit(E.main, job, capsys)
        assert code == 2 and err.startswith(f"error: {copy}/ppo.pt is damaged")
    _cut(os.path.join(copy, "sft.pt"))
    code, err, _ = _exit(H.main, ["--out", copy] + TINY, capsys)
    assert code == 2 and err.startswith(f"error: {copy}/sft.pt is damaged") and "delete it" in err


def test_a_damaged_checkpoint_falls_back_to_the_one_before_it_and_says_so(copy, capsys):
    """if this fails, a cut checkpoint ends the run in a traceback though the one before it is whole on disk."""
    _cut(os.path.join(copy, "ckpt", "extra.pt"))
    code, err, out = _exit(H.main, ["--out", copy] + TINY[:2] + ["--ppo-steps", "3"] + TINY[4:], capsys)
    assert code == 0
    assert f"{copy}/ckpt/extra.pt is damaged" in out
    assert out.count(f"resuming from the one before it, {copy}/ckpt.old") == 1  # the checkpoint is read once


def test_a_cut_checkpoint_shard_with_none_before_it_is_one_line(copy, capsys):
    """if this fails, a checkpoint shard cut short (a full disk) ends in a traceback from deep in dcp.load."""
    shutil.rmtree(os.path.join(copy, "ckpt.old"))
    shard = next(f for f in os.listdir(os.path.join(copy, "ckpt")) if f.endswith(".distcp"))
    _cut(os.path.join(copy, "ckpt", shard))
    code, err, _ = _exit(H.main, ["--out", copy] + TINY[:2] + ["--ppo-steps", "3"] + TINY[4:], capsys)
    assert code == 2 and f"{copy}/ckpt is damaged: {shard} is cut short" in err and "no checkpoint before it" in err


# 6. the output directory


@pytest.mark.parametrize("kind", ["empty", "a file", "under a file"])
def test_an_out_that_cannot_be_a_directory_is_refused_at_start_up(tmp_path, capsys, kind):
    """if this fails, --out '' or a file gives a raw OSError (after the model has loaded)."""
    f = tmp_path / "file"
    f.write_text("mine")
    out = {"empty": "", "a file": str(f), "under a file": str(f / "sub")}[kind]
    code, err, _ = _exit(H.main, ["--out", out] + TINY, capsys)
    assert code == 2 and err.startswith("error: --out ")
    assert f.read_text() == "mine"


# 7. every step skipped


def test_a_run_whose_ppo_steps_were_all_skipped_ends_in_one_line_with_its_files(copy, capsys, monkeypatch):
    """if this fails, a run with no trained PPO step dies in print_summary with a TypeError (or saves an untrained
    ppo.pt as its PPO result)."""
    real = H.HydraModel.score
    monkeypatch.setattr(H.HydraModel, "score", lambda self, h, mask: real(self, h, mask) * float("nan"))
    code, err, _ = _exit(H.main, ["--out", copy, "--fresh", "--stage", "ppo", "--skip-nonfinite"] + TINY, capsys)
    assert code == 2 and "every one of the 2 PPO steps was non-finite and skipped" in err
    assert {"sft.pt", "ckpt", "metrics.jsonl", "summary.json"} <= set(os.listdir(copy))
    assert not os.path.exists(os.path.join(copy, "ppo.pt"))


# 8. signals at the edges


def test_sigterm_in_the_final_evaluation_stops_at_once_non_zero(copy, capsys, monkeypatch):
    """if this fails, SIGTERM during the final evaluation promises a checkpoint, runs the whole evaluation and
    exits 0."""
    real = H.evaluate

    def evaluate(*a, **kw):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **kw)
    monkeypatch.setattr(H, "evaluate", evaluate)
    code, err, _ = _exit(H.main, ["--out", copy] + TINY, capsys)
    assert code == 128 + signal.SIGTERM and err.startswith("error: SIGTERM: stopped")


def test_a_second_ctrl_c_inside_a_step_is_one_line_non_zero(copy, capsys, monkeypatch):
    """if this fails, a second Ctrl-C prints a raw KeyboardInterrupt traceback."""
    real = I.log_metrics

    def twice(out, rec):
        real(out, rec)
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(I, "log_metrics", twice)
    code, err, _ = _exit(H.main, ["--out", copy] + TINY[:2] + ["--ppo-steps", "3"] + TINY[4:], capsys)
    assert code == 128 + signal.SIGINT and err.startswith("error: SIGINT again: stopped inside a step")


def test_ctrl_c_in_an_eval_py_job_is_one_line_non_zero(copy, capsys, monkeypatch):
    """if this fails, Ctrl-C in eval.py prints a raw KeyboardInterrupt traceback."""
    def interrupted(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(E, "load_run", interrupted)
    code, err, _ = _exit(E.main, ["sample", copy, "--prompt", "hi"], capsys)
    assert code == 130 and err.startswith("error: interrupted")


# 9. eval.py sample


def test_an_empty_prompt_is_one_line(copy, capsys):
    """if this fails, `eval.py sample --prompt ''` crashes inside the model with a reshape error."""
    code, err, _ = _exit(E.main, ["sample", copy, "--prompt", ""], capsys)
    assert code == 2 and "encodes to no tokens" in err


def test_an_eval_py_out_that_cannot_be_written_is_one_line(copy, tmp_path, capsys):
    """if this fails, `eval.py table RUN --out DIR` (a directory, or a folder that is not there) is a raw OSError."""
    for out in (str(tmp_path), str(tmp_path / "no" / "such.md")):
        code, err, _ = _exit(E.main, ["table", copy, "--out", out], capsys)
        assert code == 2 and err.startswith(f"error: {out}: ")


def test_export_flag_refuses_an_out_hf_of_other_files_before_training(copy, capsys):
    """if this fails, `hydra_ppo.py --export` trains a whole run, then refuses (or wipes) an OUT/hf of other files."""
    os.makedirs(os.path.join(copy, "hf"))
    open(os.path.join(copy, "hf", "mine.txt"), "w").write("mine")
    before = _files(copy)
    code, err, _ = _exit(H.main, ["--out", copy, "--export"] + TINY[:2] + ["--ppo-steps", "3"] + TINY[4:], capsys)
    assert code == 2 and err.startswith(f"error: export to {copy}/hf: it holds files that are not an earlier export")
    assert _files(copy) == before  # no PPO step ran


def test_an_export_shaped_folder_with_a_run_inside_is_refused(tmp_path):
    """if this fails, a run kept inside an earlier export's folders is deleted by the next export there."""
    os.makedirs(tmp_path / "ex" / "sft" / "run")
    (tmp_path / "ex" / "sft" / "config.json").write_text("{}")
    I.check_export_out(str(tmp_path / "ex"))  # an earlier export: replaced
    (tmp_path / "ex" / "sft" / "run" / "sft.pt").write_text("a run")
    with pytest.raises(I.ConfigError, match="it holds a run's files"):
        I.check_export_out(str(tmp_path / "ex"))
