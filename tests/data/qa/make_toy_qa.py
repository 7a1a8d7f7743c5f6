"""Writes the toy extractive-QA data next to this file (train/validation/test .jsonl, SQuAD format).

Words come from the tiny test tokenizer's vocabulary (tests/assets.py), so one word = one token.
Every context is 30-60 words of filler and distractor sentiment words with one "director X" in it;
the question is always "the director was" and the answer is X, the word after the cue "director".
At data.max_length=32 (question 3 tokens + 3 special tokens -> 26 context tokens per window) every
context needs 2 or 3 windows, so the answer is in some windows and not in others, and sometimes in
the overlap of two. Validation/test examples list two gold answers: "X" and "director X".

    python tests/data/qa/make_toy_qa.py
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from assets import NEGATIVE, NEUTRAL, POSITIVE  # noqa: E402

CUE = "director"
QUESTION = "the director was"
FILLER = [w for w in NEUTRAL if w != CUE]
ANSWERS = POSITIVE + NEGATIVE


def make_example(rng: random.Random, index: int, split: str, min_words: int = 30, max_words: int = 60) -> dict:
    length = rng.randint(min_words, max_words)
    words = [rng.choice(ANSWERS) if rng.random() < 0.15 else rng.choice(FILLER) for _ in range(length - 2)]
    at = rng.randint(0, len(words))
    answer = rng.choice(ANSWERS)
    words[at:at] = [CUE, answer]
    context = " ".join(words)
    cue_start = len(" ".join(words[:at])) + (1 if at else 0)
    answer_start = cue_start + len(CUE) + 1
    assert context[answer_start:answer_start + len(answer)] == answer
    if split == "train":
        answers = {"text": [answer], "answer_start": [answer_start]}
    else:
        answers = {"text": [answer, f"{CUE} {answer}"], "answer_start": [answer_start, cue_start]}
    return {"id": f"{split}-{index}", "question": QUESTION, "context": context, "answers": answers}


def write(path: Path, rows: int, seed: int, split: str) -> None:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as handle:
        for index in range(rows):
            handle.write(json.dumps(make_example(rng, index, split)) + "\n")


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    write(here / "train.jsonl", 320, seed=11, split="train")
    write(here / "validation.jsonl", 23, seed=12, split="validation")
    write(here / "test.jsonl", 29, seed=13, split="test")
