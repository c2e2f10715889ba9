"""the command line: the run contract, resume, faults and bad input (issue 6)."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import hydra_ppo as H
import infra as I
from conftest import read_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--n-builtin", "200", "--sft-steps", "8", "--ppo-steps", "6", "--ckpt-every", "2", "--eval-prompts", "8",
         "--rollout-batch", "8", "--minibatch", "4", "--max-new-tokens", "12"]
TIMING = {"step_s", *H.PHASES}  # the clock of a step: the only fields a resumed run may change


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def _summary(out):
    return I.load_file(os.path.join(out, "summary.json"))


def _main(args, capsys=None):
    """run main in-process; -> (exit code, the one 'error: ' line of stderr, or all of stderr if none)."""
    I.STOP.requested = None
    try:
        H.main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err if capsys else ""
    assert "Traceback" not in err
    errors = [line for line in err.replace("\r", "\n").split("\n") if line.startswith("error: ")]
    assert len(errors) <= 1
    return code, errors[0] if errors else err  # the one error line (progress bars also write to stderr)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref"))
    assert _main(["--out", out] + SMALL)[0] == 0
    return out


def test_run_writes_the_metrics_and_summary_contract(reference_run):
    """if this fails, benchmarks and tools that read metrics.jsonl / summary.json break."""
    rows = _metrics(reference_run)
    assert all("stage" in r and "step" in r for r in rows)
    assert {r["stage"] for r in rows} == {"sft-hydra", "ppo"}
    s = _summary(reference_run)
    for k in ("model", "data", "rm_accuracy", "sft_loss", "peak_memory_mib", "seconds", "method", "reward_sft", "reward_ppo",
              "gold_sft", "gold_ppo", "kl", "latency_per_sample_s"):
        assert s[k] is not None, k
    assert 0 <= s["rm_accuracy"] <= 1 and s["peak_memory_mib"] > 0
    ppo = [r for r in rows if r["stage"] == "ppo"]
    assert ppo[0]["kl"] == 0.0 and ppo[0]["first_ratio"] == 1.0  # the actor starts exactly at the reference
    with open(os.path.join(reference_run, "metrics.jsonl")) as f:  # _metrics drops the clock: read it whole
        clocks = [r for r in map(json.loads, f) if r["stage"] == "ppo"]
    for r in clocks:  # the clock of every step: its phases are parts of the step
        assert all(r[k] > 0 for k in H.PHASES) and r["gen_s"] + r["score_s"] + r["update_s"] <= r["step_s"]
    assert all(s[f"median_{k}"] > 0 for k in H.PHASES)


def _stop_at(monkeypatch, stage, step):
    """make the run receive SIGTERM right after it logs (stage, step)."""
    real = I.log_metrics

    def hooked(out, rec):
        real(out, rec)
        if rec["stage"] == stage and rec["step"] == step:
            I.STOP.requested = signal.SIGTERM
    monkeypatch.setattr(I, "log_metrics", hooked)


@pytest.mark.parametrize("stage,step", [("sft-hydra", 3), ("ppo", 3)])
def test_stopped_and_resumed_run_matches_an_uninterrupted_one_bitwise(reference_run, tmp_path, monkeypatch, capsys, stage, step):
    """if this fails, resuming a run changes its losses and rewards (lost RNG, optimizer or data position)."""
    out = str(tmp_path)
    with monkeypatch.context() as m:
        _stop_at(m, stage, step)
        code, err = _main(["--out", out] + SMALL, capsys)
    assert code == 128 + signal.SIGTERM and "resume" in err
    assert I.load_file(os.path.join(out, "ckpt", "extra.pt"))["step"] == step
    assert _main(["--out", out] + SMALL)[0] == 0
    assert _metrics(out) == _metrics(reference_run)
    for k in ("rm_accuracy", "reward_sft", "reward_ppo", "gold_ppo", "kl"):
        assert _summary(out)[k] == _summary(reference_run)[k], k


def test_baseline_stopped_in_its_second_sft_model_does_not_train_the_first_again(tmp_path, monkeypatch, capsys):
    """if this fails, a lora-ppo/ppo run stopped while training its reward model retrains its SFT model on resume
    (or resumes to another result than an uninterrupted run)."""
    args = SMALL + ["--method", "lora-ppo", "--ppo-steps", "2"]
    ref, out = str(tmp_path / "ref"), str(tmp_path / "out")
    assert _main(["--out", ref] + args)[0] == 0
    with monkeypatch.context() as m:
        _stop_at(m, "sft-rm", 3)
        assert _main(["--out", out] + args, capsys)[0] == 128 + signal.SIGTERM
    trained, real = [], H.train_sft
    monkeypatch.setattr(H, "train_sft", lambda name, *a, **k: (trained.append(name), real(name, *a, **k))[1])
    assert _main(["--out", out] + args)[0] == 0
    assert trained == ["rm"]
    assert _metrics(out) == _metrics(ref)
    for k in ("rm_accuracy", "sft_loss", "reward_sft", "reward_ppo", "gold_ppo"):
        assert _summary(out)[k] == _summary(ref)[k], k


def test_save_atomic_leaves_the_previous_checkpoint_when_a_write_dies(tmp_path, monkeypatch):
    """if this fails, a kill during a checkpoint write destroys the last good checkpoint."""
    path = str(tmp_path / "ckpt.pt")
    I.save_atomic({"step": 1}, path)

    def dying_save(obj, f):
        open(f, "wb").write(b"partial")
        raise KeyboardInterrupt  # killed mid-write
    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        I.save_atomic({"step": 2}, path)
    assert I.load_file(path) == {"step": 1}


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_result(reference_run, tmp_path):
    """if this fails, a killed run (even mid-checkpoint) cannot be resumed to the same result."""
    out = str(tmp_path)
    cmd = [sys.executable, os.path.join(ROOT, "hydra_ppo.py"), "--out", out] + SMALL
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rng = random.Random(0)
    kills = 0
    while kills < 5:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t_end = time.time() + 2 + rng.random() * 5  # during start-up or somewhere in training
        while time.time() < t_end and p.poll() is None:
            if os.path.exists(os.path.join(out, "ckpt.tmp")):  # a checkpoint is being written: kill now
                break
            time.sleep(0.002)
        if p.poll() is not None:
            break
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
    assert kills >= 3, "the run finished before it could be killed enough times"
    assert subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True).returncode == 0
    assert _metrics(out) == _metrics(reference_run)
    assert _summary(out)["reward_ppo"] == _summary(reference_run)["reward_ppo"]


def test_nonfinite_reward_stops_with_step_and_quantity_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    """if this fails, a NaN poisons the run silently or overwrites the last good checkpoint."""
    out = str(tmp_path)
    real = H.HydraModel.score
    calls = {"n": 0}

    def nan_after_a_while(self, h, mask):
        calls["n"] += 1
        s = real(self, h, mask)
        return s * float("nan") if calls["n"] > 20 else s
    monkeypatch.setattr(H.HydraModel, "score", nan_after_a_while)
    code, err = _main(["--out", out, "--stage", "all"] + SMALL[:-8] + ["--rollout-batch", "8", "--minibatch", "4", "--max-new-tokens", "12",
                                                                         "--ppo-steps", "6", "--ckpt-every", "1"], capsys)
    assert code == 2
    assert err.startswith("error: non-finite reward-model scores at step")
    ck = read_checkpoint(out)
    assert all(torch.isfinite(v).all() for sd in ck["models"].values() for v in sd.values())


def test_skip_nonfinite_counts_skipped_steps(tmp_path, monkeypatch):
    """if this fails, --skip-nonfinite either crashes or hides how many steps it dropped."""
    real = H.sft_loss
    monkeypatch.setattr(H, "sft_loss", lambda m, rows, *a: (lambda l, s: (l * float("nan"), s) if len(rows) == 8 and real.calls.append(1) is None and len(real.calls) == 2 else (l, s))(*real(m, rows, *a)))
    real.calls = []
    code, _ = _main(["--out", str(tmp_path), "--stage", "sft", "--sft-batch", "8", "--skip-nonfinite"] + SMALL)
    assert code == 0
    assert _summary(str(tmp_path))["sft"]["hydra"]["skipped_steps"] == 1
    assert sum("skipped" in r for r in _metrics(str(tmp_path))) == 1


@pytest.mark.parametrize("args,needle", [
    (["--method", "dpo"], "--method 'dpo': expected one of"),
    (["--lora-r", "0"], "--lora-r 0: must be >= 1"),
    (["--actor-lr", "-1"], "--actor-lr -1.0: must be >= 0"),
    (["--rollout-batch", "10", "--minibatch", "4"], "multiple of --minibatch"),
    (["--data", "/nonexistent/pairs.jsonl"], "/nonexistent/pairs.jsonl: no such file"),
    (["--model", "no-such-model"], "--model 'no-such-model': no such local directory"),
    (["--model", "./missing-dir"], "no such local directory"),
    (["--sft-batch", "5000"], "--sft-batch 5000 is larger than"),
    (["--rollout-batch", "1", "--minibatch", "1"], "--score-norm sft takes the std"),
    (["--fsdp"], "--fsdp shards the model across processes: launch with torchrun"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--stage", "bogus"], "--"),
])
def test_bad_input_gives_one_line_error_and_nonzero_exit(tmp_path, capsys, args, needle):
    """if this fails, a user's mistake ends in a traceback (or is silently accepted)."""
    code, err = _main(["--out", str(tmp_path)] + SMALL + args, capsys)
    assert code == 2
    assert needle in err and err.startswith("error: ")


def test_batches_that_ranks_cannot_share_equally_are_refused(monkeypatch):
    """if this fails, under torchrun a batch is split unevenly and N ranks no longer compute the combined batch."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(I.ConfigError, match="--minibatch 6 must be a multiple of the 4 ranks"):
        I.validate(H.Config(rollout_batch=12, minibatch=6), H.METHODS)
    I.validate(H.Config(rollout_batch=16, minibatch=8, sft_batch=8), H.METHODS)


def test_malformed_data_line_is_named(tmp_path, capsys):
    """if this fails, bad data gives a traceback or is dropped silently instead of naming the line."""
    p = tmp_path / "pairs.jsonl"
    p.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": \n')
    code, err = _main(["--out", str(tmp_path / "o"), "--data", str(p)] + SMALL, capsys)
    assert code == 2 and err.startswith(f"error: {p}:2:")


def test_checkpoint_from_another_method_is_refused(reference_run, tmp_path, capsys):
    """if this fails, resuming mixes weights of different runs."""
    import shutil
    out = str(tmp_path / "o")
    shutil.copytree(reference_run, out)
    code, err = _main(["--out", out, "--method", "lora-ppo"] + SMALL, capsys)
    assert code == 2 and "is from another run" in err and "--method hydra-ppo (now lora-ppo)" in err


def test_gpu_memory_plan_refuses_early_when_the_method_cannot_fit(monkeypatch, capsys):
    """if this fails, a too-big run on a GPU loads 14 GB of weights before dying of OOM instead of refusing at once."""
    gib = 2 ** 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 * gib, 80 * gib))
    cuda = torch.device("cuda")
    full = H.Config(model="llama-7b", method="ppo", sft_lora=True, minibatch=4)
    with pytest.raises(I.ConfigError, match=r"needs about .* GiB \(.*\), 80.0 GiB is free"):
        I.check_memory_plan(full, cuda, torch.bfloat16, H.ROLES["ppo"], 2)
    I.check_memory_plan(H.Config(model="llama-7b", method="hydra-ppo", sft_lora=True, sft_batch=2, minibatch=2), cuda, torch.bfloat16,
                        H.ROLES["hydra-ppo"], 1)
    assert "memory plan (eval.py estimate)" in capsys.readouterr().out


def test_lora_sft_adapter_stays_unmerged_and_fixed_and_the_run_completes(tmp_path):
    """if this fails, --sft-lora (the path for bases too big to fine-tune) breaks, merges its adapter (rounded away in
    bf16), or leaves it out of PPO's LoRA-off (reference and reward model)."""
    out = str(tmp_path)
    assert _main(["--out", out, "--sft-lora", "--sft-lr", "1e-2"] + SMALL)[0] == 0
    sd = I.load_file(os.path.join(out, "sft.pt"))["models"]["hydra"]
    assert any(".lora_B.sft" in k for k in sd) and not any(".lora_" in k and ".sft" not in k for k in sd)
    assert max(v.abs().max() for k, v in sd.items() if ".lora_B.sft" in k) > 0  # trained, kept as an adapter
    s = _summary(out)
    assert s["rm_accuracy"] > 0.5 and s["kl"] >= 0


def test_lora_sft_checkpoint_holds_what_trains_and_resumes_to_the_uninterrupted_run(tmp_path, monkeypatch, capsys):
    """if this fails, a --sft-lora checkpoint writes the whole frozen base again (13 GB a checkpoint for Llama-7b),
    or a run resumed from one trains other weights than an uninterrupted run."""
    args = ["--sft-lora", "--sft-lr", "1e-2", "--stage", "sft"] + SMALL
    ref, out = str(tmp_path / "ref"), str(tmp_path / "stopped")
    assert _main(["--out", ref] + args)[0] == 0
    with monkeypatch.context() as m:
        _stop_at(m, "sft-hydra", 3)
        assert _main(["--out", out] + args, capsys)[0] == 128 + signal.SIGTERM
    ck = read_checkpoint(out)["models"]["hydra"]
    assert ck and all("lora_" in k or k.startswith("reward_head.") for k in ck)  # adapter + reward head, no base
    assert _main(["--out", out] + args)[0] == 0
    assert _metrics(out) == _metrics(ref)
    a, b = (I.load_file(os.path.join(d, "sft.pt"))["models"]["hydra"] for d in (ref, out))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stage_ppo_without_sft_checkpoint_names_what_to_run(tmp_path, capsys):
    """if this fails, --stage ppo on an empty --out starts PPO from an untrained base, or dies with a traceback."""
    code, err = _main(["--out", str(tmp_path), "--stage", "ppo"] + SMALL, capsys)
    assert code == 2 and "run --stage sft" in err


def test_hh_prompt_becomes_chat_messages():
    """if this fails, a chat model sees raw 'Human:/Assistant:' text instead of its own template."""
    msgs = data.hh_to_messages("\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant:")
    assert msgs == [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "how are you?"}]


def test_max_pairs_takes_the_first_pairs_of_a_file_and_is_part_of_the_run(tmp_path, capsys):
    """if this fails, --max-pairs reads other pairs than the first N (or all of them), or a run resumed with another
    --max-pairs silently trains on other data."""
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Q{i}:", "chosen": " yes.", "rejected": " no."}) + "\n"
                            for i in range(100)))
    train, held, _, _ = data.split_data(H.Config(data=str(path), max_pairs=30))
    assert sorted(p.prompt for p in train + held) == sorted(f"Q{i}:" for i in range(30))
    meta = I.run_meta(H.Config(data=str(path), max_pairs=30))
    with pytest.raises(I.ConfigError, match="--max-pairs 30 \\(now 0\\)"):
        I.check_meta(meta, H.Config(data=str(path)), "ckpt.pt")
    I.check_meta({k: v for k, v in I.run_meta(H.Config(data=str(path))).items() if k != "max_pairs"},
                 H.Config(data=str(path)), "ckpt.pt")  # a run from before the flag read every pair
