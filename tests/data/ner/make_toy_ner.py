"""Writes the toy NER data next to this file (train/validation/test .jsonl: {"tokens": [...], "tags": [...]}).

Entities come from fixed word lists, tagged BIO with types PER, LOC, ORG: a first name (B-PER),
optionally followed by a surname (I-PER); a city (B-LOC) or a two-word city ("new york": B-LOC
I-LOC); a company (B-ORG), optionally followed by "corp"/"labs"/"group" (I-ORG). They sit among
filler words. Every word is its own token for the word-level test tokenizer built from these files
(tests/assets.py write_word_level_bert), so a tiny model learns it in a few hundred steps; only the
I- tags need context (a surname or suffix follows an entity). About one sentence in eight is long
(15-22 words): at data.max_length=16 (14 words + [CLS]/[SEP]) its last words are cut off.

    python tests/data/ner/make_toy_ner.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

FIRST = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy"]
LAST = ["smith", "jones", "brown", "taylor", "wilson", "evans", "moore", "clark"]
CITY = ["paris", "london", "berlin", "madrid", "rome", "oslo", "vienna", "dublin"]
CITY2 = [["new", "york"], ["san", "diego"], ["los", "angeles"], ["hong", "kong"]]
ORG = ["acme", "globex", "initech", "umbrella", "hooli", "vandelay"]
ORG_SUFFIX = ["corp", "labs", "group"]
FILLER = ["the", "a", "visited", "met", "works", "for", "in", "at", "and", "said", "today", "with", "from",
          "joined", "left", "went", "to", "on", "monday", "office", "team", "later", "he", "she", "they",
          "yesterday", "was", "is", "meeting", "after"]


def entity(rng: random.Random) -> tuple[list[str], list[str]]:
    kind = rng.choice(["PER", "LOC", "ORG"])
    if kind == "PER":
        words = [rng.choice(FIRST)] + ([rng.choice(LAST)] if rng.random() < 0.5 else [])
    elif kind == "LOC":
        words = list(rng.choice(CITY2)) if rng.random() < 0.3 else [rng.choice(CITY)]
    else:
        words = [rng.choice(ORG)] + ([rng.choice(ORG_SUFFIX)] if rng.random() < 0.4 else [])
    return words, [f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 1)


def make_example(rng: random.Random) -> dict:
    long = rng.random() < 0.125
    chunks = [entity(rng) for _ in range(rng.randint(1, 3) + (2 if long else 0))]
    fillers = rng.randint(12, 16) if long else rng.randint(2, 8)
    chunks += [([rng.choice(FILLER)], ["O"]) for _ in range(fillers)]
    rng.shuffle(chunks)
    tokens = [w for words, _ in chunks for w in words]
    tags = [t for _, tags in chunks for t in tags]
    return {"tokens": tokens, "tags": tags}


def write(path: Path, rows: int, seed: int) -> None:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(rows):
            handle.write(json.dumps(make_example(rng)) + "\n")


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    write(here / "train.jsonl", 320, seed=21)
    write(here / "validation.jsonl", 37, seed=22)
    write(here / "test.jsonl", 41, seed=23)
