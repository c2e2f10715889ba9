"""tests for data.py: the built-in task, the file loader and its errors, and the batch layout."""
import gzip
import json
import re
import statistics
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import (DataError, Pair, builtin_pairs, collate, encode_example, gold_reward,  # noqa: E402
                  load_data, load_pairs, split_pairs)

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-harmless-sample.jsonl.gz"


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def plain(prompt="Q:", chosen=" yes.", rejected=" no."):
    return json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected})

# -----------------------------------------------------------------------------
# built-in task


def test_builtin_is_deterministic_per_seed_and_differs_across_seeds():
    """if this fails, runs with the same --seed see different data and results cannot be reproduced."""
    assert builtin_pairs(200, 0) == builtin_pairs(200, 0)
    assert builtin_pairs(200, 0) != builtin_pairs(200, 1)


def test_builtin_does_not_touch_the_global_rng():
    """if this fails, building the data shifts torch/python seeds used elsewhere in training."""
    import random
    random.seed(123)
    expected = random.random()
    random.seed(123)
    builtin_pairs(50, 0)
    assert random.random() == expected


def test_builtin_chosen_beats_rejected_by_the_gap_on_every_pair():
    """if this fails, some preference labels are wrong or too close to call, and the reward model learns noise."""
    for p in builtin_pairs(2000, 0):
        assert gold_reward(p.prompt, p.chosen) - gold_reward(p.prompt, p.rejected) >= 0.25
        assert p.prompt.startswith("Review of the ") and p.prompt.endswith(":")
        assert p.chosen.startswith(" ") and p.chosen.endswith(".")


def test_builtin_chosen_gold_leaves_room_for_ppo():
    """if this fails, SFT on chosen already reaches the max gold and PPO has nothing to improve."""
    pairs = builtin_pairs(2000, 0)
    chosen = statistics.mean(gold_reward(p.prompt, p.chosen) for p in pairs)
    rejected = statistics.mean(gold_reward(p.prompt, p.rejected) for p in pairs)
    assert 0.1 < chosen < 0.5  # 0.285 for seed 0
    assert -0.5 < rejected < -0.1  # -0.290 for seed 0


def test_gold_reward_hand_checked_values():
    """if this fails, the gold score that judges PPO is not the documented formula."""
    assert gold_reward("Review of the car:", " good bad good.") == pytest.approx(1 / 3)
    assert gold_reward("", " good great love.") == 1.0
    assert gold_reward("", " awful.") == -1.0
    assert gold_reward("", " the good unknownword.") == pytest.approx(1 / 3)  # unknown words are neutral
    assert gold_reward("", "xq zzv blorp") == 0.0
    assert gold_reward("", "") == 0.0
    assert gold_reward("", "!!! 123") == 0.0
    assert gold_reward("", " GOOD Bad.") == 0.0  # case does not matter

# -----------------------------------------------------------------------------
# files


def test_hh_prompt_split_on_a_two_turn_transcript(tmp_path):
    """if this fails, responses leak into prompts (or vice versa) and the policy is trained on the wrong tokens."""
    head = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant:"
    path = write_lines(tmp_path / "hh.jsonl", [json.dumps({"chosen": head + " fine, thanks.",
                                                           "rejected": head + " go away."})])
    pairs, stats = load_pairs(path)
    assert pairs == [Pair(head, " fine, thanks.", " go away.")]
    assert stats["hh"] == 1 and stats["pairs"] == 1


def test_plain_format_blank_lines_and_identical_pairs_are_counted(tmp_path):
    """if this fails, lines vanish from the data without a count in stats."""
    path = write_lines(tmp_path / "p.jsonl", [plain(), "", "   ", plain(chosen=" same.", rejected=" same."), plain()])
    pairs, stats = load_pairs(path)
    assert pairs == [Pair("Q:", " yes.", " no.")] * 2
    assert stats == {"lines": 5, "blank": 2, "hh": 0, "plain": 2, "empty_response": 0, "empty_turns": 0,
                     "dropped_identical": 1, "dropped_prompt_mismatch": 0, "pairs": 2}


def test_an_empty_response_is_real_data_kept_and_counted(tmp_path):
    """Anthropic's published HH test split has pairs whose chosen response is empty (the human preferred no answer):
    the loader refused the whole file over them if this fails."""
    empty_chosen = json.dumps({"chosen": "\n\nHuman: say nothing\n\nAssistant:",
                               "rejected": "\n\nHuman: say nothing\n\nAssistant: Something."})
    path = write_lines(tmp_path / "hh.jsonl", [empty_chosen, plain(rejected=" ")])
    pairs, stats = load_pairs(path)
    assert [(p.chosen, p.rejected) for p in pairs] == [("", " Something."), (" yes.", " ")]
    assert stats["empty_response"] == 2 and stats["pairs"] == 2
    _, r, _ = encode_example(chars, pairs[0].prompt, pairs[0].chosen, EOS, 64, 8)
    assert r == [EOS]  # its LM loss trains the EOS alone


def test_hh_prompt_mismatch_is_dropped_and_counted(tmp_path):
    """if this fails, a pair whose two transcripts disagree on the conversation is trained as a preference."""
    a = "\n\nHuman: hi\n\nAssistant: x\n\nHuman: y\n\nAssistant: z"
    b = "\n\nHuman: hi\n\nAssistant: other"
    path = write_lines(tmp_path / "hh.jsonl", [json.dumps({"chosen": a, "rejected": b}), plain()])
    pairs, stats = load_pairs(path)
    assert len(pairs) == 1 and stats["dropped_prompt_mismatch"] == 1


def test_gz_path_reads_the_same_pairs(tmp_path):
    """if this fails, --data file.jsonl.gz silently reads compressed bytes as text."""
    with gzip.open(tmp_path / "p.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(plain() + "\n" + plain(prompt="é:") + "\n")
    pairs, stats = load_pairs(str(tmp_path / "p.jsonl.gz"))
    assert [p.prompt for p in pairs] == ["Q:", "é:"] and stats["lines"] == 2


BAD_LINES = [  # (what, the bad line, a phrase the message must contain)
    ("malformed json", '{"prompt": "Q:", "chosen": ', "malformed JSON"),
    ("not an object", '["Q:", " a.", " b."]', "expected a JSON object"),
    ("missing hh key", '{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b"}', "missing key rejected"),
    ("missing plain key", '{"prompt": "Q:", "chosen": " a."}', "missing key rejected"),
    ("non-string", '{"prompt": "Q:", "chosen": 3, "rejected": " b."}', "'chosen' is of type int"),
    ("empty prompt", plain(prompt=" "), "empty prompt"),
    ("no assistant turn", json.dumps({"chosen": "\n\nHuman: a", "rejected": "\n\nHuman: a"}), "has no"),
]


def assert_one_line_error_at_line_3(tmp_path, loader, good, bad, phrase):
    """a file of [good, blank, bad, good] must fail with one line naming PATH:3 and the phrase."""
    path = write_lines(tmp_path / "bad.jsonl", [good, "", bad, good])
    with pytest.raises(DataError) as e:
        loader(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:3: ") and phrase in msg and "\n" not in msg


@pytest.mark.parametrize("what,bad,phrase", BAD_LINES, ids=[b[0] for b in BAD_LINES])
def test_bad_line_names_path_and_line(tmp_path, what, bad, phrase):
    """if this fails, a user with a broken data file gets a traceback instead of the line to fix."""
    assert_one_line_error_at_line_3(tmp_path, load_pairs, plain(), bad, phrase)


def test_undecodable_bytes_name_the_line(tmp_path):
    """if this fails, a latin-1 file crashes with a UnicodeDecodeError that names no line."""
    path = tmp_path / "bad.jsonl"
    path.write_bytes((plain() + "\n").encode() + b'{"prompt": "caf\xe9", "chosen": " a.", "rejected": " b."}\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: undecodable bytes"):
        load_pairs(str(path))


def test_whole_file_errors_name_the_path(tmp_path):
    """if this fails, a missing, empty or all-dropped file is reported without saying which file."""
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="no such file; --data takes 'builtin'"):
        load_pairs(missing)
    with pytest.raises(DataError, match="no such file"):
        load_data(missing)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=rf"^{re.escape(str(empty))}: empty file"):
        load_pairs(str(empty))
    dropped = write_lines(tmp_path / "same.jsonl", ["", plain(chosen=" s.", rejected=" s.")])
    with pytest.raises(DataError, match=rf"^{re.escape(str(dropped))}: no pairs left"):
        load_pairs(dropped)
    corrupt = tmp_path / "c.jsonl.gz"
    corrupt.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=rf"^{re.escape(str(corrupt))}: cannot read"):
        load_pairs(str(corrupt))


def test_load_data_builtin_carries_gold_and_files_do_not(tmp_path):
    """if this fails, training scores a real-data run with the toy gold reward (or loses it on builtin)."""
    pairs, gold, stats = load_data("builtin", n_builtin=10, seed=3)
    assert pairs == builtin_pairs(10, 3) and gold is gold_reward and stats["pairs"] == 10
    pairs, gold, stats = load_data(write_lines(tmp_path / "p.jsonl", [plain()]))
    assert len(pairs) == 1 and gold is None and stats["pairs"] == 1


def test_real_sample_loads_with_every_line_accounted_for():
    """if this fails, the loader no longer reads real HH-RLHF data, or drops lines it does not count."""
    if not SAMPLE.exists():
        pytest.skip(f"{SAMPLE} not present (only in the dev checkout)")
    pairs, stats = load_pairs(str(SAMPLE))
    assert stats["lines"] == 400 and stats["pairs"] == len(pairs) == 399
    assert stats["dropped_prompt_mismatch"] == 1 and stats["dropped_identical"] == 0 and stats["blank"] == 0
    for p in pairs:
        assert p.prompt.startswith("\n\nHuman:") and p.prompt.endswith("\n\nAssistant:")
        assert "\n\nAssistant:" not in p.chosen and "\n\nAssistant:" not in p.rejected

# a strict chat template, as Llama-2's: user first, then user and assistant in turn, else an error
STRICT = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
          "{% else %}{{ ' ' + m['content'] + ' </s>' }}{% endif %}{% endfor %}")


def test_hh_transcripts_with_empty_turns_fit_a_strict_chat_template(tmp_path):
    """if this fails, an HH transcript with an empty turn kills the run before SFT (a strict template refuses two user
    turns in a row), or its prompt silently goes untemplated (an empty last human turn), or a transcript no template
    takes is a traceback instead of one line naming its file and line."""
    from types import SimpleNamespace

    from data import encode_pairs, hf_gpt2_tokenizer, hf_tokenizer
    hf = hf_gpt2_tokenizer(bos="<s>", eos="</s>", unk="<unk>", extra_special=("<unk>", "<s>", "</s>"))
    hf.chat_template = STRICT
    tok, cfg = hf_tokenizer(hf), SimpleNamespace(max_prompt=64, max_response=16)
    hh = lambda p: json.dumps({"chosen": p + " yes.", "rejected": p + " no."})  # noqa: E731
    prompts = ["\n\nHuman: hi\n\nAssistant:\n\nHuman: still there?\n\nAssistant:",  # an empty assistant turn
               "\n\nHuman: hi\n\nAssistant: hello\n\nHuman:\n\nAssistant:",  # an empty last human turn
               "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant:"]
    pairs, stats = load_pairs(write_lines(tmp_path / "hh.jsonl", map(hh, prompts)))
    assert stats["empty_turns"] == 2 and stats["pairs"] == 3
    assert [tok.format_prompt(p.prompt) for p in pairs] == [
        "[INST] hi [/INST]  </s>[INST] still there? [/INST]", "[INST] hi [/INST] hello </s>[INST]  [/INST]",
        "[INST] hi [/INST] hello </s>[INST] bye [/INST]"]
    assert len(encode_pairs(pairs, tok, cfg)[0]) == 3
    path = write_lines(tmp_path / "bad.jsonl", [hh(prompts[2]), hh("\n\nAssistant: I start\n\nHuman: q\n\nAssistant:")])
    with pytest.raises(DataError) as e:
        encode_pairs(load_pairs(path)[0], tok, cfg)
    assert str(e.value).startswith(f"{path}:2: ") and "must alternate" in str(e.value) and "\n" not in str(e.value)


# -----------------------------------------------------------------------------
# splits


def test_split_is_deterministic_disjoint_and_covers_all_pairs():
    """if this fails, heldout pairs leak into training or differ between runs with the same seed."""
    pairs = builtin_pairs(101, 0)
    train, held = split_pairs(pairs, 0.1, seed=5)
    assert (train, held) == split_pairs(pairs, 0.1, seed=5)
    assert len(held) == 10 and len(train) == 91
    ids = sorted(map(id, train + held))
    assert ids == sorted(map(id, pairs))  # each pair exactly once
    assert split_pairs(pairs, 0.1, seed=6) != (train, held)


def test_split_keeps_at_least_one_pair_on_each_side():
    """if this fails, a small file gives an empty heldout set (nan eval) or an empty train set."""
    pairs = builtin_pairs(2, 0)
    train, held = split_pairs(pairs, 0.01)
    assert len(train) == 1 and len(held) == 1
    train, held = split_pairs(pairs, 0.99)
    assert len(train) == 1 and len(held) == 1
    with pytest.raises(DataError, match="at least 2"):
        split_pairs(pairs[:1])

# -----------------------------------------------------------------------------
# tokens and batches

EOS = 99


def chars(s):
    return [ord(c) for c in s]


def test_encode_cuts_prompt_from_the_left_and_keeps_its_end():
    """if this fails, long prompts lose the text nearest the response (the question being answered)."""
    p, r, truncated = encode_example(chars, "abcdef", "xy", EOS, max_prompt=3, max_response=8)
    assert p == chars("def") and r == chars("xy") + [EOS] and truncated


def test_encode_appends_eos_only_when_the_whole_response_fits():
    """if this fails, the model is taught to stop mid-sentence, or never taught to stop at all."""
    assert encode_example(chars, "ab", "xyz", EOS, 8, 4) == (chars("ab"), chars("xyz") + [EOS], False)
    assert encode_example(chars, "ab", "xyz", EOS, 8, 3) == (chars("ab"), chars("xyz"), True)  # no room for EOS
    assert encode_example(chars, "ab", "xyzw", EOS, 8, 3) == (chars("ab"), chars("xyz"), True)
    assert encode_example(chars, "ab", "", EOS, 8, 3) == (chars("ab"), [EOS], False)


def test_collate_left_pads_prompts_right_pads_responses_mask_from_lengths():
    """if this fails, responses do not all start at column P and per-token rewards/log-probs misalign."""
    ids, mask, P = collate([[1, 2, 3], [4]], [[5], [6, 7]], pad_id=0)
    assert P == 3 and ids.dtype == mask.dtype == torch.long
    assert ids.tolist() == [[1, 2, 3, 5, 0], [0, 0, 4, 6, 7]]
    assert mask.tolist() == [[1, 1, 1, 1, 0], [0, 0, 1, 1, 1]]


def test_collate_keeps_a_real_eos_unmasked_when_pad_equals_eos():
    """if this fails, with GPT-2 (pad = eos) the EOS is masked out and the model never learns to stop."""
    ids, mask, P = collate([[1, 2], [3]], [[5, EOS], [EOS]], pad_id=EOS)
    assert P == 2
    assert ids.tolist() == [[1, 2, 5, EOS], [EOS, 3, EOS, EOS]]
    assert mask.tolist() == [[1, 1, 1, 1], [0, 1, 1, 0]]


def test_collate_all_empty_responses_gives_R_zero():
    """if this fails, a batch of prompts alone (the rollout input) cannot be built with the same function."""
    ids, mask, P = collate([[1, 2], [3]], [[], []], pad_id=0)
    assert P == 2 and ids.shape == (2, 2) and mask.tolist() == [[1, 1], [0, 1]]

# -----------------------------------------------------------------------------
# summaries (reference texts for ROUGE)

from data import load_summaries  # noqa: E402


def test_summaries_read_prompt_or_post_blank_lines_counted_and_gz(tmp_path):
    """if this fails, ROUGE references go missing, attach to the wrong text, or .gz files read as bytes."""
    lines = [json.dumps({"post": "a long post", "summary": " short."}), "",
             json.dumps({"prompt": "P: x\nTL;DR:", "post": "x", "summary": " y.", "id": 7})]  # prompt wins, extras ignored
    rows, stats = load_summaries(write_lines(tmp_path / "s.jsonl", lines))
    assert rows == [("a long post", " short."), ("P: x\nTL;DR:", " y.")]
    assert stats == {"lines": 3, "blank": 1, "summaries": 2}
    with gzip.open(tmp_path / "s.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    assert load_summaries(str(tmp_path / "s.jsonl.gz")) == (rows, stats)


BAD_SUMMARY_LINES = [  # (what, the bad line, a phrase the message must contain)
    ("malformed json", '{"post": "x", ', "malformed JSON"),
    ("not an object", '["x", "y"]', "expected a JSON object"),
    ("no text key", '{"summary": "y"}', "missing key prompt or post"),
    ("no summary", '{"post": "x"}', "missing key summary"),
    ("non-string", '{"post": "x", "summary": 3}', "'summary' is of type int"),
    ("empty summary", '{"prompt": "x", "summary": "  "}', "empty summary"),
    ("a pairs record", plain(), "missing key summary"),
]


@pytest.mark.parametrize("what,bad,phrase", BAD_SUMMARY_LINES, ids=[b[0] for b in BAD_SUMMARY_LINES])
def test_bad_summary_line_names_path_and_line(tmp_path, what, bad, phrase):
    """if this fails, a broken summaries file gives a traceback instead of the line to fix."""
    assert_one_line_error_at_line_3(tmp_path, load_summaries, json.dumps({"post": "x", "summary": "y"}), bad, phrase)


def test_summaries_whole_file_errors_name_the_path(tmp_path):
    """if this fails, a missing, empty, blank-only or undecodable summaries file is reported without its path or line."""
    with pytest.raises(DataError, match="no such file"):
        load_summaries(str(tmp_path / "nope.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=rf"^{re.escape(str(empty))}: empty file"):
        load_summaries(str(empty))
    blank = write_lines(tmp_path / "blank.jsonl", ["", "  "])
    with pytest.raises(DataError, match=rf"^{re.escape(blank)}: no summaries"):
        load_summaries(blank)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"post": "caf\xe9", "summary": "y"}\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(latin))}:1: undecodable bytes"):
        load_summaries(str(latin))


# -----------------------------------------------------------------------------
# --data as a URL


def test_url_data_is_fetched_once_into_the_cache_and_offline_is_one_line(tmp_path, monkeypatch):
    """if this fails, --data URL downloads on every run (or not at all), a half-downloaded file is taken for the
    data, or no network gives a traceback instead of one line naming the URL."""
    import functools
    import http.server
    import threading
    srv_dir = tmp_path / "srv"
    srv_dir.mkdir()
    with gzip.open(srv_dir / "pairs.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join([plain("Q1:"), plain("Q2:"), plain("Q3:")]) + "\n")
    monkeypatch.setenv("HYDRA_CACHE", str(tmp_path / "cache"))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(srv_dir))
    handler.log_message = lambda *a: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/pairs.jsonl.gz"
    try:
        pairs, _ = load_pairs(url)
    finally:
        srv.shutdown()
        srv.server_close()
    assert [p.prompt for p in pairs] == ["Q1:", "Q2:", "Q3:"]
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and cached[0].name.endswith("pairs.jsonl.gz")
    assert [p.prompt for p in load_pairs(url)[0]] == ["Q1:", "Q2:", "Q3:"]  # the server is gone: from the cache
    with pytest.raises(DataError) as e:
        load_pairs(url.replace("pairs", "other"))  # nothing listens on that port now: "offline"
    msg = str(e.value)
    assert "\n" not in msg and url.replace("pairs", "other") in msg and "cannot fetch" in msg
    assert not any(p.name.endswith(".part") for p in (tmp_path / "cache").iterdir())
