"""torchrun on CPU (gloo): 2 processes, data parallel and FSDP2, against 1 process on the combined batch.

tolerance (fp32): losses and logged statistics rtol 1e-4, weights atol 1e-4. a 2-rank run sums in another order
and torch's fp32 norms differ by ~1e-5 relative between a whole tensor and its shards; AdamW turns tiny gradient
differences into step-size differences on weights whose gradient is nearly zero. PPO is compared from the same
sft.pt (the first rollout's score normaliser would magnify SFT-stage rounding across the stages).
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import hydra_ppo as H
import infra as I

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "hydra_ppo.py")
ARGS = ["--sft-steps", "4", "--sft-batch", "8", "--ppo-steps", "2", "--rollout-batch", "8", "--minibatch", "4",
        "--eval-prompts", "6", "--n-builtin", "200", "--max-new-tokens", "8", "--ckpt-every", "1"]

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without torch.distributed")]


def launch(out, *extra, nproc=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1 and "--fsdp" not in extra:  # (--fsdp on one rank still runs under torchrun)
        cmd = [sys.executable, SCRIPT]
    else:  # --standalone: a free local rendezvous port, so tests can run beside each other
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", SCRIPT]
    r = subprocess.run(cmd + ARGS + ["--out", str(out), *extra], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def metrics(out, stage):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["stage"] == stage]


def close(a, b, rtol=1e-4, atol=1e-6):
    return abs(a - b) <= atol + rtol * abs(b)


def assert_same_records(got, want, keys):
    assert len(got) == len(want) and want
    for g, w in zip(got, want):
        for k in keys:
            assert close(g[k], w[k]), (k, g["step"], g[k], w[k])


def assert_same_weights(a, b, atol=1e-4):
    assert set(a) == set(b)
    for k in a:
        if isinstance(a[k], dict):
            assert_same_weights(a[k], b[k], atol)
        else:
            assert a[k].shape == b[k].shape and torch.allclose(a[k], b[k], atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max())


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """the reference: one process, Hydra-SFT then Hydra-PPO on the combined batches."""
    out = tmp_path_factory.mktemp("one")
    launch(out)
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_match_one_process_on_the_combined_batch(single, tmp_path, mode):
    """if this fails, gradients are not averaged (or the loss is not normalised over every rank's tokens), global
    statistics are per-rank, the ranks sample the wrong rows, FSDP2 sharding or its checkpoint gather is wrong,
    or a two-adapter method (actor and critic backward separately) mis-syncs its adapters."""
    extra = ["--fsdp"] if mode == "fsdp" else []
    # Hydra-SFT on two ranks, each with half of every batch
    launch(tmp_path, "--stage", "sft", *extra, nproc=2)
    assert_same_records(metrics(tmp_path, "sft-hydra"), metrics(single, "sft-hydra"), ("loss", "lm_loss", "rm_loss", "rm_acc", "grad_norm"))
    load = lambda d, f: torch.load(os.path.join(d, f), map_location="cpu", weights_only=False)  # noqa: E731
    assert_same_weights(load(tmp_path, "sft.pt")["models"], load(single, "sft.pt")["models"])
    two_sft = json.load(open(os.path.join(tmp_path, "summary.json")))
    assert two_sft["world_size"] == 2 and two_sft["fsdp"] == (mode == "fsdp")
    assert close(two_sft["rm_accuracy"], json.load(open(os.path.join(single, "summary.json")))["rm_accuracy"])
    # Hydra-PPO from the same sft.pt. FSDP: stopped after iteration 1 and resumed by every rank from ckpt/
    shutil.copy(os.path.join(single, "sft.pt"), os.path.join(tmp_path, "sft.pt"))
    if mode == "fsdp":
        launch(tmp_path, "--stage", "ppo", "--ppo-steps", "1", *extra, nproc=2)
        assert "resuming ppo" in launch(tmp_path, "--stage", "ppo", *extra, nproc=2).stdout
    else:
        launch(tmp_path, "--stage", "ppo", nproc=2)
    keys = ("pg_loss", "vf_loss", "clipfrac", "approx_kl", "entropy", "score", "kl", "explained_var", "response_len", "first_ratio")
    assert_same_records(metrics(tmp_path, "ppo"), metrics(single, "ppo"), keys)
    assert_same_weights(load(tmp_path, "ppo.pt")["models"], load(single, "ppo.pt")["models"])
    two, one = (json.load(open(os.path.join(d, "summary.json"))) for d in (tmp_path, single))
    for k in ("reward_sft", "reward_ppo", "kl_ppo", "gold_sft", "gold_ppo", "length_ppo"):
        assert close(two[k], one[k], atol=1e-5), (k, two[k], one[k])


def test_sigterm_to_torchrun_stops_every_rank_at_one_step_and_they_all_resume(tmp_path):
    """if this fails, a stopped distributed run checkpoints ranks at different steps (or not at all), hangs, or
    resumes to another result than an uninterrupted run."""
    import signal
    import time
    args = ["--stage", "all", "--ppo-steps", "12", "--ckpt-every", "100"]
    launch(tmp_path / "whole", *args, nproc=2)
    out = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT] + ARGS + args + ["--out", str(out)]
    p = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not any(r["step"] >= 2 for r in (metrics(out, "ppo") if (out / "metrics.jsonl").exists() else [])):
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=300)[1]
    assert err.count("stopped; checkpoint in") == 2  # both ranks, after agreeing on the step
    ck = torch.load(out / "ckpt" / "extra.pt", map_location="cpu", weights_only=False)
    assert ck["stage"] == "ppo" and 2 <= ck["step"] < 12
    assert "resuming ppo" in launch(out, *args, nproc=2).stdout
    timing = ("step_s", *H.PHASES)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(metrics(out, "ppo")) == strip(metrics(tmp_path / "whole", "ppo"))


def test_a_sharded_checkpoint_resumes_on_one_rank_as_on_two(single, tmp_path):
    """if this fails, an --fsdp checkpoint is tied to the number of ranks that wrote it (DCP's resharding is not
    used), or a resume from it trains other weights than the uninterrupted run."""
    # SFT stopped after step 2 on 2 ranks, resumed on 1; PPO (from the same sft.pt) stopped after 1 step, resumed on 1
    out = tmp_path
    launch(out, "--stage", "sft", "--sft-steps", "2", "--fsdp", nproc=2)
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(os.listdir(out / "ckpt"))  # a shard a rank
    os.remove(out / "sft.pt")  # as if stopped after step 2 of 4
    assert "resuming sft-hydra" in launch(out, "--stage", "sft", "--fsdp", nproc=1).stdout
    assert_same_records(metrics(out, "sft-hydra"), metrics(single, "sft-hydra"), ("loss", "lm_loss", "rm_loss", "grad_norm"))
    shutil.copy(os.path.join(single, "sft.pt"), out / "sft.pt")
    launch(out, "--stage", "ppo", "--ppo-steps", "1", "--fsdp", nproc=2)
    assert "resuming ppo" in launch(out, "--stage", "ppo", "--fsdp", nproc=1).stdout
    keys = ("pg_loss", "vf_loss", "clipfrac", "approx_kl", "score", "kl", "explained_var", "response_len")
    assert_same_records(metrics(out, "ppo"), metrics(single, "ppo"), keys)
    load = lambda d, f: torch.load(os.path.join(d, f), map_location="cpu", weights_only=False)  # noqa: E731
    assert_same_weights(load(out, "ppo.pt")["models"], load(single, "ppo.pt")["models"])


def _worker_pids(agent_pid):
    """{rank: pid} of torchrun's worker processes."""
    out = {}
    for task in os.listdir(f"/proc/{agent_pid}/task"):
        with open(f"/proc/{agent_pid}/task/{task}/children") as f:
            for pid in f.read().split():
                with open(f"/proc/{pid}/environ", "rb") as e:
                    env = dict(kv.split(b"=", 1) for kv in e.read().split(b"\0") if b"=" in kv)
                if b"RANK" in env:
                    out[int(env[b"RANK"])] = int(pid)
    return out


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds torchrun's workers through /proc")
def test_sigkill_to_one_rank_then_rerunning_the_command_resumes_to_the_uninterrupted_result(tmp_path):
    """if this fails, a rank that dies mid-PPO (out of memory, a lost node) leaves a sharded checkpoint that cannot
    be resumed (half-written, or ranks at different steps), or the resumed run ends elsewhere than an uninterrupted
    one."""
    import signal
    import time
    args = ["--stage", "all", "--ppo-steps", "8", "--fsdp"]
    launch(tmp_path / "whole", *args, nproc=2)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT] + ARGS + args
    p = subprocess.Popen(cmd + ["--out", str(out)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not any(r["step"] >= 3 for r in (metrics(out, "ppo") if (out / "metrics.jsonl").exists() else [])):
        time.sleep(0.05)
    os.kill(_worker_pids(p.pid)[1], signal.SIGKILL)
    assert p.wait(timeout=300) != 0  # torchrun tears the group down
    extra = torch.load(out / "ckpt" / "extra.pt", weights_only=False)
    assert extra["stage"] == "ppo" and 2 <= extra["step"] < 8  # the last complete one: step 3 may be half-way
    assert "resuming ppo" in launch(out, *args, nproc=2).stdout  # the same command again
    timing = ("step_s", *H.PHASES)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(metrics(out, "ppo")) == strip(metrics(tmp_path / "whole", "ppo"))


SHARD_SIZES = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import hydra_ppo as H, infra as I, lora
from transformers import AutoConfig, AutoModelForCausalLM
device = I.init_distributed("cpu")
torch.manual_seed(0)
lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**I.MODELS["micro"]))
model = H.HydraModel(lm)
lora.inject(model.lm, ["actor", "critic"], r=4, alpha=8)
model.requires_grad_(False)
for p in lora.lora_parameters(model.lm, "actor"):
    p.requires_grad_(True)
I.shard(model, device)
size = lambda ps: sum(p.to_local().numel() if I.is_sharded(p) else p.numel() for p in ps)
print(json.dumps([size(p for p in model.parameters() if not p.requires_grad),
                  size(p for p in model.parameters() if p.requires_grad)]))
I.end_run()
"""


def test_fsdp_gives_each_of_two_ranks_half_of_every_weight(tmp_path):
    """if this fails, --fsdp does not shard the frozen base (or the adapters) across ranks: a base too big for one
    device would not fit on two."""
    script = tmp_path / "sizes.py"
    script.write_text(SHARD_SIZES)
    got = {}
    for n in (1, 2):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                            "--tee", "1", str(script), ROOT], env={**os.environ, "OMP_NUM_THREADS": "1"},
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        got[n] = [json.loads(line.split("]:", 1)[1]) for line in r.stdout.splitlines() if "]:[" in line]
    (frozen, trained), = got[1]
    assert len(got[2]) == 2 and frozen > 0 and trained > 0
    for f, t in got[2]:  # each holds half, up to FSDP's padding of dim 0 to a multiple of 2
        assert abs(f - frozen / 2) <= 0.01 * frozen and abs(t - trained / 2) <= 0.01 * trained


def test_under_fsdp_only_rank_0_holds_a_whole_copy_while_loading(tmp_path):
    """if this fails, every rank loads the whole pretrained model into host memory before sharding it (8 ranks x a
    70B model = 1.1 TB of RAM on one node)."""
    import eval as E
    conf = dict(I.MODELS["micro"], vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=8)  # ~27M parameters: 100 MiB in fp32
    # saved in bf16, trained in fp32: the loaded copy is a real one, not pages of the file mapped in
    E.save_random_model(conf, str(tmp_path / "model"), dtype="bfloat16")
    launch(tmp_path / "out", "--model", str(tmp_path / "model"), "--stage", "sft", "--sft-steps", "1", "--fsdp",
           "--max-prompt", "16", "--max-response", "8", nproc=2)
    ranks = json.load(open(tmp_path / "out" / "summary.json"))["peak_memory_mib_ranks"]
    full = 27e6 * 4 / 2**20
    # both ranks import and build the same things; only rank 0 reads the weights (rank 1: the architecture, on meta)
    assert ranks["load"][0] - ranks["load"][1] > 0.8 * full, ranks


def test_fsdp_baseline_stopped_in_its_first_sft_model_resumes_and_exports(tmp_path):
    """if this fails, a sharded checkpoint holds optimizer state the next load does not expect (a weight no loss
    reaches, as a plain SFT model's reward head, in the optimizer), so a stopped --fsdp baseline cannot resume; or
    --export under torchrun crashes or hangs on the ranks that do not write, or exports other weights than the run's."""
    import signal
    import time
    from safetensors.torch import load_file
    args = ["--method", "lora-ppo", "--ppo-steps", "1", "--sft-steps", "6", "--fsdp", "--export"]
    out = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT] + ARGS + args
    p = subprocess.Popen(cmd + ["--out", str(out)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not any(r["step"] >= 2 for r in (metrics(out, "sft-sft") if (out / "metrics.jsonl").exists() else [])):
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    assert p.communicate(timeout=300)[1].count("stopped; checkpoint in") == 2
    assert torch.load(out / "ckpt" / "extra.pt", weights_only=False)["stage"] == "sft-sft"
    assert "resuming sft-sft" in launch(out, *args, nproc=2).stdout
    assert [r["step"] for r in metrics(out, "sft-sft")] == list(range(1, 7)) and len(metrics(out, "ppo")) == 1
    # the export gathered on two ranks holds the run's weights: the same as one process exporting its files
    subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "export", str(out), "--out", str(tmp_path / "one")],
                   check=True, capture_output=True)
    for d in ("policy", "reward", "sft"):
        a, b = (load_file(os.path.join(x, d, "model.safetensors")) for x in (out / "hf", tmp_path / "one"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), d
    assert sorted(os.listdir(out / "hf" / "adapters")) == ["actor"]  # lora-ppo: no critic over reward/


def test_data_url_under_torchrun_is_fetched_by_every_rank_without_a_crash(tmp_path):
    """if this fails, `torchrun ... --data URL` dies on every rank but the first to finish the download (the ranks
    shared one .part file: the first renamed it, the others' rename found nothing)."""
    import functools
    import gzip
    import http.server
    import threading
    (tmp_path / "srv").mkdir()
    with gzip.open(tmp_path / "srv" / "pairs.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"prompt": f"Q{i}:", "chosen": " yes.", "rejected": " no."}) + "\n" for i in range(9))
    all_in = threading.Barrier(4, timeout=60)  # every rank is mid-download before any gets a byte: the race, each time

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            try:
                all_in.wait()
            except threading.BrokenBarrierError:
                pass
            super().do_GET()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(tmp_path / "srv")))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/pairs.jsonl.gz"
    script = tmp_path / "fetch.py"
    script.write_text(f"import os, sys\nsys.path.insert(0, {ROOT!r})\nimport data\n"
                      f"print('rank', os.environ['RANK'], 'pairs', len(data.load_pairs({url!r})[0]))\n")
    try:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_CACHE": str(tmp_path / "c")}
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
                            str(script)], env=env, capture_output=True, text=True, timeout=300)
    finally:
        srv.shutdown()
        srv.server_close()
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("pairs 9") == 4, r.stdout  # every rank read every pair (lines may interleave)
    cached = [p.name for p in (tmp_path / "c").iterdir()]  # one whole copy, no .part left behind
    assert len(cached) == 1 and cached[0].endswith("-pairs.jsonl.gz"), cached
