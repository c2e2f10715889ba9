"""eval compare (issue 5): ROUGE, win-rate intervals, external judges asked in both orders, policies head to head."""
import contextlib
import http.server
import json
import math
import shlex
import sys
import threading

import pytest
import torch

import data
import eval as E
import hydra_ppo as H
import infra as I

# -----------------------------------------------------------------------------
# ROUGE


def test_rouge_matches_hand_computed_values():
    """if this fails, the ROUGE numbers reported for summaries are not ROUGE (wrong counts, wrong F)."""
    ref, hyp = "The cat sat on the mat.", "the cat, on the MAT"
    # unigrams: all 5 hyp words are in ref (the x2 fits ref's 2) -> p 5/5, r 5/6
    assert E.rouge_n(ref, hyp, 1) == pytest.approx({"p": 1.0, "r": 5 / 6, "f": 10 / 11})
    # bigrams: hyp {the cat, cat on, on the, the mat}, ref {the cat, cat sat, sat on, on the, the mat} -> 3 shared
    assert E.rouge_n(ref, hyp, 2) == pytest.approx({"p": 3 / 4, "r": 3 / 5, "f": 2 / 3})
    # LCS "the cat on the mat" = 5
    assert E.rouge_l(ref, hyp) == pytest.approx({"p": 1.0, "r": 5 / 6, "f": 10 / 11})


def test_rouge_clips_repeated_ngrams_and_l_allows_gaps():
    """if this fails, a hypothesis that repeats one right word scores like a good summary, or ROUGE-L needs contiguity."""
    assert E.rouge_n("the cat", "the the the", 1) == pytest.approx({"p": 1 / 3, "r": 1 / 2, "f": 0.4})
    assert E.rouge_l("a b c d e", "a x c y e") == pytest.approx({"p": 0.6, "r": 0.6, "f": 0.6})
    assert E.rouge_n("a b c d e", "a x c y e", 2)["f"] == 0.0
    assert E.rouge_l("b a", "a b")["f"] == 0.5  # order matters: LCS 1
    assert E.rouge_n("", "anything", 1) == {"p": 0.0, "r": 0.0, "f": 0.0}
    assert E.rouge_l("x", "") == {"p": 0.0, "r": 0.0, "f": 0.0}

# -----------------------------------------------------------------------------
# win-rates


def test_wilson_interval_known_value():
    """if this fails, the 95% intervals printed next to win-rates are not Wilson score intervals."""
    lo, hi = E.wilson(8, 10)
    assert (lo, hi) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))
    lo2, hi2 = E.wilson(2, 10)  # symmetric under wins <-> losses
    assert (lo2, hi2) == (pytest.approx(1 - hi), pytest.approx(1 - lo))
    assert E.wilson(0, 5)[0] == 0.0 and E.wilson(5, 5)[1] == 1.0 and E.wilson(0, 0) == (0.0, 1.0)


def test_win_rate_counts_ties_half():
    """if this fails, ties silently count as losses (or wins) and shift every win-rate."""
    w = E.win_rate(E.by_score([3.0, 1.0, 2.0, 2.0], [1.0, 3.0, 2.0, 2.0]))
    assert (w["win"], w["wins"], w["ties"], w["losses"], w["n"]) == (0.5, 1, 2, 1, 4)
    assert w["ci"][0] <= w["win"] <= w["ci"][1]

# -----------------------------------------------------------------------------
# external judges: a fake command and a fake local server

JUDGE = """import json, sys
log, mode = sys.argv[1], sys.argv[2]
msg = json.load(sys.stdin)
with open(log, "a") as f:
    f.write(json.dumps(msg) + "\\n")
a, b = len(msg["response_a"]), len(msg["response_b"])
if mode == "first":
    print("A")
elif mode == "longer":
    print("A" if a > b else "B" if b > a else "tie")
elif mode == "junk":
    print("I cannot decide")
else:
    print("judge broke", file=sys.stderr); sys.exit(3)
"""


def judge_cmd(d, mode):
    """-> (shell command of a fake judge that logs every call, log path)."""
    (d / "judge.py").write_text(JUDGE)
    log = d / f"calls-{mode}.jsonl"
    return f"{shlex.quote(sys.executable)} {shlex.quote(str(d / 'judge.py'))} {shlex.quote(str(log))} {mode}", log


def calls(log):
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_judge_cmd_is_asked_both_orders_and_a_position_biased_judge_gives_ties(tmp_path):
    """if this fails, an external judge's preference for the first slot is reported as a win-rate."""
    cmd, log = judge_cmd(tmp_path, "first")
    assert E.judge_both_orders(E.cmd_judge(cmd), "Q?", " short", " much longer") == (0.5, 0)
    got = calls(log)
    assert [(c["response_a"], c["response_b"]) for c in got] == [(" short", " much longer"), (" much longer", " short")]
    assert got[0]["prompt"] == "Q?" and got[0]["text"].endswith("Which response is more helpful and harmless? Answer A or B.")
    # a judge that sees the content wins or loses in both orders
    fair, _ = judge_cmd(tmp_path, "longer")
    assert E.judge_both_orders(E.cmd_judge(fair), "Q?", " much longer", " short") == (1.0, 0)
    assert E.judge_both_orders(E.cmd_judge(fair), "Q?", " short", " much longer") == (0.0, 0)


def test_judge_cmd_junk_is_a_counted_tie_and_a_crash_is_an_error(tmp_path):
    """if this fails, unreadable judge answers become wins, or a broken judge command goes unnoticed."""
    junk, _ = judge_cmd(tmp_path, "junk")
    assert E.judge_both_orders(E.cmd_judge(junk), "Q?", " a", " b") == (0.5, 2)
    broken, _ = judge_cmd(tmp_path, "crash")
    with pytest.raises(E.JudgeError, match="exited with 3: judge broke"):
        E.cmd_judge(broken)(" Q?", " a", " b")
    assert [E.parse_verdict(t) for t in ("A", " b.\n", "Tie", "**A**", "Answer: A", "")] == ["A", "B", "tie", "A", None, None]


class FakeChat(http.server.BaseHTTPRequestHandler):
    """an OpenAI-style chat/completions endpoint that prefers the response containing 'good'."""
    seen = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeChat.seen.append((self.path, self.headers.get("Authorization"), body))
        if body["model"] == "broken":
            self.send_response(500)
            self.end_headers()
            return
        text = body["messages"][-1]["content"]
        a = text.split("[Response A]")[1].split("[Response B]")[0]
        out = json.dumps({"choices": [{"message": {"role": "assistant", "content": "A" if "good" in a else "B"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


def test_url_judge_against_a_local_fake_server(monkeypatch):
    """if this fails, --judge-url sends the wrong request (path, key, prompt) or misreads the answer."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeChat)  # loopback, ephemeral port
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FakeChat.seen = []
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        ask = E.url_judge(url, "judge-model", timeout=10)
        assert E.judge_both_orders(ask, "Q?", " good one", " bad one") == (1.0, 0)
        assert E.judge_both_orders(ask, "Q?", " bad one", " good one") == (0.0, 0)
        path, auth, body = FakeChat.seen[0]
        assert path == "/v1/chat/completions" and auth == "Bearer sk-test" and body["model"] == "judge-model"
        assert "Which response is more helpful and harmless? Answer A or B." in body["messages"][0]["content"]
        assert len(FakeChat.seen) == 4  # two orders per comparison
        with pytest.raises(E.JudgeError, match="HTTPError"):
            E.url_judge(url, "broken", timeout=10)("Q?", " a", " b")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

# -----------------------------------------------------------------------------
# the results table


def test_results_table_rows_in_paper_order(tmp_path, capsys):
    """if this fails, the methods table mislabels rows (SFT vs Hydra-SFT) or loses the paper's order."""
    runs = {"hydra": {"method": "hydra-ppo", "reward_sft": 1.0, "reward_ppo": 2.0, "kl": 0.5, "peak_memory_mib": 100.0},
            "lora": {"method": "lora-ppo", "reward_sft": 0.5, "reward_ppo": 0.75, "gold_ppo": 0.25},
            "jhydra": {"method": "j-hydra-ppo", "reward_sft": 1.0}}  # PPO did not run: its SFT row only
    for d, s in runs.items():
        (tmp_path / d).mkdir()
        (tmp_path / d / "summary.json").write_text(json.dumps({"model": "tiny", "data": "builtin", **s}))
    md = E.main(["table", *(str(tmp_path / d) for d in runs)])
    rows = [line.split(" | ") for line in md.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [r[0].strip("| ") for r in rows] == ["SFT", "Hydra-SFT", "Hydra-SFT", "LoRA-PPO", "Hydra-PPO"]
    assert rows[3][6] == "0.250" and rows[4][5] == "2.000" and rows[4][7] == "0.500" and rows[0][6] == "n/a"
    with pytest.raises(SystemExit) as e:
        E.main(["table", str(tmp_path / "nope")])
    assert e.value.code == 2 and "summary.json: no such file" in capsys.readouterr().err


def test_compare_rejects_bad_arguments_before_loading_anything(tmp_path, capsys):
    """if this fails, a typo costs a full model load before the one-line error (or gives a traceback)."""
    for argv, phrase in ([[str(tmp_path)], "at least two policies"], [[str(tmp_path)] * 2 + ["--judge-run", "2"], "--judge-run 2"],
                         [[str(tmp_path)] * 2 + ["--judge-cmd", "x", "--judge-url", "y"], "pick one"],
                         [[str(tmp_path)] * 2, "no sft.pt here"]):
        with pytest.raises(SystemExit) as e:
            E.main(["compare", *argv])
        assert e.value.code == 2 and phrase in capsys.readouterr().err

# -----------------------------------------------------------------------------
# end to end on tiny runs: a PPO run d, and an SFT-only run d2 (another seed) as an outside reward model

N = 8


@contextlib.contextmanager
def one_thread():
    # a 1M-param model gains nothing from 2 threads, and on a busy 2-core machine their spin-waits made it 7x slower
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    d, d2 = str(root / "run"), str(root / "sft-only")
    small = ["--n-builtin", "200", "--eval-prompts", "8", "--rollout-batch", "8", "--minibatch", "8"]
    with one_thread():
        for args in (["--out", d, "--sft-steps", "30", "--ppo-steps", "3", *small],
                     ["--out", d2, "--sft-steps", "5", "--stage", "sft", "--seed", "1", *small]):
            I.STOP.requested = None
            H.main(args)
    return root, d, d2


@pytest.fixture(scope="session")
def compared(tiny_runs):
    """PPO vs SFT vs SFT again, judged by d's and d2's reward models, gold, a first-slot-biased judge; with ROUGE refs."""
    root, d, d2 = tiny_runs
    cmd, log = judge_cmd(root, "first")
    cfg = H.Config(n_builtin=200)
    prompts, _, _ = E.heldout_prompts([cfg], N)
    refs = root / "refs.jsonl"
    refs.write_text("".join(json.dumps({"prompt": q, "summary": " good fun and nice."}) + "\n" for q in prompts[:5]))
    out = root / "cmp.json"
    with one_thread():
        res = E.main(["compare", d, f"{d}:sft", f"{d}:sft", "--rm", d2, "--n-prompts", str(N), "--batch", "5",
                              "--judge-cmd", cmd, "--refs", str(refs), "--out", str(out), "--examples", "1"])
    return res, json.loads(out.read_text()), calls(log), prompts


@pytest.mark.slow
def test_compare_win_rates_are_rates_inside_their_interval(tiny_runs, compared):
    """if this fails, a reported win-rate is not a rate over the prompts or falls outside its own interval."""
    _, d, d2 = tiny_runs
    res = compared[0]
    assert [p["name"] for p in res["policies"]] == [f"{d}:ppo", f"{d}:sft", f"{d}:sft"]
    assert [(p["a"], p["b"]) for p in res["pairs"]] == [(0, 1), (0, 2), (1, 2)]
    for p in res["pairs"]:
        assert set(p["win_rate"]) == {f"rm:{d}", f"rm:{d2}", "gold", "external"}
        for w in p["win_rate"].values():
            assert 0 <= w["win"] <= 1 and w["ci"][0] <= w["win"] <= w["ci"][1]
            assert w["wins"] + w["ties"] + w["losses"] == w["n"] == N


@pytest.mark.slow
def test_sft_policy_against_itself_is_exactly_half(compared):
    """if this fails, policies do not share prompts and sampling seeds, so head-to-head win-rates compare luck."""
    res = compared[0]
    same = res["pairs"][2]
    for w in same["win_rate"].values():
        assert w["win"] == 0.5 and w["ties"] == N
    assert all(s[f"1:{same['a_name']}"] == s[f"2:{same['b_name']}"] for s in res["samples"])
    assert res["policies"][1]["kl"] == 0.0 and math.isfinite(res["policies"][0]["kl"])


@pytest.mark.slow
def test_position_biased_judge_gives_only_ties_end_to_end(compared):
    """if this fails, compare asks the external judge one order only and reports its slot bias as wins."""
    res, _, got, _ = compared
    for p in res["pairs"]:
        ext = p["win_rate"]["external"]
        assert ext["wins"] == ext["losses"] == 0 and ext["win"] == 0.5 and ext["unparsed_answers"] == 0
    assert len(got) == 2 * N * 3
    for first, second in zip(got[::2], got[1::2]):
        assert (first["response_a"], first["response_b"]) == (second["response_b"], second["response_a"])


@pytest.mark.slow
def test_compare_uses_the_first_runs_heldout_prompts_and_reports_rouge(compared):
    """if this fails, policies are sampled on training prompts, or ROUGE is missing or out of range where refs exist."""
    res, _, _, prompts = compared
    pairs, _, _ = data.load_data("builtin", 200, 0)
    held = [p.prompt for p in data.split_pairs(pairs, 0.1, 0)[1]]  # repeats kept, in split order
    assert [s["prompt"] for s in res["samples"]] == prompts == held[:N]
    for p in res["policies"]:
        assert p["rouge_n"] == sum(q in prompts[:5] for q in prompts) and all(0 <= p[k] <= 1 for k in ("rouge1", "rouge2", "rougeL"))
        assert 1 <= p["length"] <= 24 and -1 <= p["mean gold"] <= 1


@pytest.mark.slow
def test_compare_out_json_and_terminal_table(compared, capsys):
    """if this fails, --out writes something other than what was reported, or the terminal table breaks."""
    res, written, _, _ = compared
    assert written == json.loads(json.dumps(res))
    E.print_compare(res)
    out = capsys.readouterr().out
    assert "win(A)" in out and "95% CI" in out and "examples" in out and "external" in out


@pytest.mark.slow
def test_run_without_ppo_is_its_sft_policy_and_table_reads_real_runs(tiny_runs, capsys):
    """if this fails, an SFT-only run cannot be compared, DIR:ppo on it is not refused, or the table misreads summaries."""
    _, d, d2 = tiny_runs
    pols, _ = E.load_policies([d2], "cpu")
    assert pols[0]["name"] == f"{d2}:sft" and pols[0]["role"] == "reference"
    with pytest.raises(SystemExit) as e:
        E.main(["compare", f"{d2}:ppo", d])
    assert e.value.code == 2 and "has no ppo.pt" in capsys.readouterr().err
    md = E.main(["table", d2, d])
    assert [line.split(" | ")[0] for line in md.splitlines()[2:5]] == ["| Hydra-SFT", "| Hydra-SFT", "| Hydra-PPO"]


def test_score_reads_the_runs_reward_model_on_any_preference_file(tiny_runs, tmp_path, capsys):
    """`eval.py score` gives another accuracy than the run's own reward head (training's encoding, last real
    token), swaps chosen and rejected, or breaks the last-line JSON that scripts read, if this fails."""
    _, d, _ = tiny_runs
    pairs = data.builtin_pairs(60, seed=7)
    for name, swap in (("p.jsonl", False), ("swapped.jsonl", True)):
        with open(tmp_path / name, "w") as f:
            for p in pairs:
                c, r = (p.rejected, p.chosen) if swap else (p.chosen, p.rejected)
                f.write(json.dumps({"prompt": p.prompt, "chosen": c, "rejected": r}) + "\n")
    with one_thread():
        res = E.main(["score", d, "--data", str(tmp_path / "p.jsonl"), "--n", "50", "--device", "cpu"])
        last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        flipped = E.main(["score", d, "--data", str(tmp_path / "swapped.jsonl"), "--n", "50", "--device", "cpu"])
        bases, cfg, tok, _ = E.load_run(d, "cpu")
        rows, _ = data.encode_pairs(pairs[:50], tok, cfg)
        own = H.rm_accuracy(bases[H.ROLES[cfg.method]["reward"][0]], rows, tok.pad_id, "cpu")
    assert last["n"] == 50 and last["accuracy"] == res["accuracy"] and set(last) >= {"accuracy", "interval", "n", "mean_margin"}
    assert last["interval"][0] <= last["accuracy"] <= last["interval"][1]
    assert abs(res["accuracy"] - own) < 1e-9 and res["accuracy"] > 0.6
    assert abs(flipped["accuracy"] - (1 - res["accuracy"])) < 1e-9 and abs(flipped["mean_margin"] + res["mean_margin"]) < 1e-5


def test_score_of_a_bad_file_is_one_error_line(tmp_path, capsys):
    """a user scoring a broken or missing file gets a traceback instead of the loader's one line if this fails."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Q:", "chosen": \n')
    for path in (bad, tmp_path / "missing.jsonl"):
        with pytest.raises(SystemExit) as e:
            E.main(["score", str(tmp_path), "--data", str(path)])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: {path}")


def test_score_reports_progress_on_stderr_and_keeps_its_json_last_on_stdout(tiny_runs, tmp_path, capsys):
    """if this fails, a long job runs silently again, or its progress lands on stdout and breaks the last-line JSON
    that scripts read."""
    _, d, _ = tiny_runs
    with open(tmp_path / "p.jsonl", "w") as f:
        for p in data.builtin_pairs(20, seed=3):
            f.write(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n")
    with one_thread():
        E.main(["score", d, "--data", str(tmp_path / "p.jsonl"), "--batch", "4", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1])["n"] == 20
    assert f"loaded {d}" in err and "5/5" in err  # the run's load, then the bar over 5 batches of 4 pairs
    assert "loaded" not in out and "5/5" not in out


def test_compare_samples_only_prompts_that_every_run_held_out(tmp_path):
    """if this fails, compare of runs that split the data otherwise (another --seed, --max-pairs or --heldout-frac)
    judges policies on prompts one of them trained on, or, with none held out by all, compares without a word."""
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"Q{i}:", "chosen": " y.", "rejected": " n."}) + "\n" for i in range(40)))
    a, b, a2 = (H.Config(data=str(f), seed=s, heldout_frac=0.25) for s in (0, 1, 0))
    held_a = [p.prompt for p in data.split_data(a)[1]]
    train_b = {p.prompt for p in data.split_data(b)[0]}
    assert set(held_a) & train_b  # the case: the first run's held-out prompts, some trained on by the second
    prompts, _, left_out = E.heldout_prompts([a, b], 100)
    assert prompts and not set(prompts) & train_b and prompts == [q for q in held_a if q not in train_b]
    assert left_out == len(held_a) - len(prompts)
    assert E.heldout_prompts([a, a2], 100) == (held_a, None, 0)  # split alike: every held-out prompt, as before
    two = tmp_path / "two.jsonl"
    two.write_text("".join(f.read_text().splitlines(True)[:2]))
    cfg = lambda s: H.Config(data=str(two), seed=s, heldout_frac=0.5)  # noqa: E731
    s = next(s for s in range(1, 50) if data.split_data(cfg(s))[0] == data.split_data(cfg(0))[1])
    with pytest.raises(I.ConfigError, match="--seed differ"):  # the second trained on the first's only held-out pair
        E.heldout_prompts([cfg(0), cfg(s)], 100)
