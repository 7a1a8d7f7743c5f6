"""Toy dialogues for the causal_lm_sft tests, over the tiny GPT-2's word vocabulary (tests/assets.py).

The user says a few words with one sentiment; the assistant answers either with the sentiment word
alone (1 content token + the end-of-turn token) or with a 20-word reply (the sentiment word, then
the user's words repeated): replies of very different lengths, so that a per-micro-batch mean loss
would weigh tokens differently depending on how the global batch is split.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from assets import make_example

LONG_REPLY = 20


def make_dialogue(rng: random.Random, long_reply: bool, exchanges: int = 1, system: bool = False) -> list[dict]:
    messages = [{"role": "system", "content": "the film"}] if system else []
    for _ in range(exchanges):
        text, label = make_example(rng)
        if long_reply:
            words = text.split()
            reply = " ".join([label] + [words[i % len(words)] for i in range(LONG_REPLY - 1)])
        else:
            reply = label
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
    return messages


def dialogues(rows: int, seed: int, short_only: bool = False) -> list[dict]:
    """Mixed 1- and 20-token replies, some 2-exchange conversations and system messages; or (short_only)
    one exchange answered by the sentiment word: quick to learn even for a small adapter."""
    rng = random.Random(seed)
    out = []
    for i in range(rows):
        if short_only:
            out.append({"messages": make_dialogue(rng, long_reply=False)})
            continue
        out.append({"messages": make_dialogue(rng, long_reply=i % 2 == 1 if rng.random() < 0.8 else rng.random() < 0.5,
                                              exchanges=1 if rng.random() < 0.75 else 2, system=rng.random() < 0.3)})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_dialogue_splits(root: Path, short_only: bool = False) -> dict:
    return {
        "train": str(write_jsonl(root / "train.jsonl", dialogues(96, seed=11, short_only=short_only))),
        "validation": str(write_jsonl(root / "validation.jsonl", dialogues(21, seed=12, short_only=short_only))),
        "test": str(write_jsonl(root / "test.jsonl", dialogues(19, seed=13, short_only=short_only))),
    }
