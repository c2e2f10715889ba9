import os
import subprocess
import sys

import pytest

import infra as I

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a CPU run after start_run frees large tensors between live ones (each batch has its own shapes); the child reads
# how much of what it freed stays in RSS. every other block is freed, so each freed block lies between live ones and
# cannot merge into the heap's top and be trimmed: the count does not hang on where the allocator put small blocks
CHILD = """
import sys, torch, infra as I
if sys.argv[1] == "start_run":
    I.start_run(I.parse_args(__import__("hydra_ppo").Config, ["--out", sys.argv[2], "--device", "cpu"]))
rss = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS:")).split()[1]) // 1024  # noqa
big = torch.ones(6 * 2**20)  # a freed 24 MiB block: glibc's own threshold rises above every block below
del big
before = rss()
blocks = [torch.ones(2**20) for _ in range(32)]  # 32 x 4 MiB
del blocks[::2]
print(rss() - before - 16 * 4, rss())  # MiB freed but still resident
"""


@pytest.mark.skipif(I.glibc() is None or not os.path.exists("/proc/self/status"),
                    reason="the start-up setting is glibc's; RSS is read from Linux's /proc")
def test_start_run_makes_freed_tensors_leave_rss(tmp_path):
    """if this fails, a CPU run keeps the freed blocks of every batch shape (glibc's growing mmap threshold) and its
    peak RSS outgrows the memory plan (1.5x on SmolLM2-135M's SFT)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    kept = {}
    for mode in ("start_run", "none"):
        r = subprocess.run([sys.executable, "-c", CHILD, mode, str(tmp_path / mode)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        kept[mode] = int(r.stdout.split()[0])
    assert kept["start_run"] < 8, kept  # MiB: every large block went back at free
    assert kept["none"] > 40, kept  # the mechanism under test: without it the 64 MiB freed stay
