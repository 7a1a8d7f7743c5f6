"""Writes the toy relation-extraction data next to this file (train/validation/test .jsonl:
{"text", "head_start", "head_end", "tail_start", "tail_end", "label"}, character offsets, end exclusive).

Relations between people, companies and cities: works_for (person -> company), lives_in (person ->
city), based_in (company -> city), and no_relation. One-clause sentences state one relation, with
the head before or after the tail ("acme hired bob smith": head bob smith, tail acme). Two-clause
sentences ("alice works for acme and bob lives in paris") hold two relations; the marked pair is
one of them or a crossed pair (alice, paris) whose label is no_relation, so only the markers tell
which pair is asked about. "x met y in z" pairs people: no_relation. Entity names may be two words.
Every word is a token of the word-level test tokenizer built from these files.

    python tests/data/relation/make_toy_relation.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

PEOPLE = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy"]
SURNAMES = ["smith", "jones", "brown", "taylor"]
COMPANIES = ["acme", "globex", "initech", "umbrella", "hooli", "vandelay"]
CITIES = ["paris", "london", "berlin", "madrid", "rome", "oslo", "new york", "hong kong"]

# relation -> clauses: (template, head slot, tail slot); slots: p = person, o = company, c = city
CLAUSES = {
    "works_for": [("{p} works for {o}", "p", "o"), ("{p} is an engineer at {o}", "p", "o"), ("{o} hired {p}", "p", "o")],
    "lives_in": [("{p} lives in {c}", "p", "c"), ("{p} moved to {c}", "p", "c"), ("{c} is home to {p}", "p", "c")],
    "based_in": [("{o} is based in {c}", "o", "c"), ("{o} has offices in {c}", "o", "c")],
}


def person(rng: random.Random) -> str:
    return rng.choice(PEOPLE) + (" " + rng.choice(SURNAMES) if rng.random() < 0.3 else "")


def fill(template: str, names: dict, tag: str) -> tuple[list[tuple[str, str | None]], dict]:
    """Template -> list of (text piece, slot key or None)."""
    pieces, rest = [], template
    while "{" in rest:
        before, _, after = rest.partition("{")
        slot, _, rest = after.partition("}")
        pieces += [(before, None), (names[slot], tag + slot)]
    pieces.append((rest, None))
    return pieces


def render(pieces) -> tuple[str, dict]:
    text, spans = "", {}
    for piece, key in pieces:
        if key is not None:
            spans[key] = (len(text), len(text) + len(piece))
        text += piece
    return text, spans


def example(rng: random.Random) -> dict:
    kind = rng.random()
    names = [{"p": person(rng), "o": rng.choice(COMPANIES), "c": rng.choice(CITIES)} for _ in range(2)]
    if kind < 0.15:  # two people meet: no relation between them
        a, b = rng.sample(PEOPLE, 2)
        text, spans = render([("", None), (a, "a"), (" met ", None), (b, "b"), (" in ", None),
                              (rng.choice(CITIES), "c")])
        head, tail = (spans["a"], spans["b"]) if rng.random() < 0.5 else (spans["b"], spans["a"])
        label = "no_relation"
    elif kind < 0.55:  # one clause, one relation
        label = rng.choice(list(CLAUSES))
        template, h, t = rng.choice(CLAUSES[label])
        text, spans = render(fill(template, names[0], "0"))
        head, tail = spans["0" + h], spans["0" + t]
    else:  # two clauses; ask about one of their relations or a crossed pair
        labels = [rng.choice(list(CLAUSES)) for _ in range(2)]
        clauses = [rng.choice(CLAUSES[label]) for label in labels]
        while names[1]["p"].split()[0] == names[0]["p"].split()[0]:
            names[1]["p"] = person(rng)
        pieces = fill(clauses[0][0], names[0], "0") + [(" and ", None)] + fill(clauses[1][0], names[1], "1")
        text, spans = render(pieces)
        if rng.random() < 0.6:
            which = rng.randrange(2)
            head, tail, label = spans[f"{which}{clauses[which][1]}"], spans[f"{which}{clauses[which][2]}"], labels[which]
        else:
            head, tail, label = spans[f"0{clauses[0][1]}"], spans[f"1{clauses[1][2]}"], "no_relation"
            if text[head[0]:head[1]] == text[tail[0]:tail[1]]:
                return example(rng)
    return {"text": text, "head_start": head[0], "head_end": head[1], "tail_start": tail[0], "tail_end": tail[1],
            "label": label}


def write(path: Path, rows: int, seed: int) -> None:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(rows):
            handle.write(json.dumps(example(rng)) + "\n")


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    write(here / "train.jsonl", 400, seed=31)
    write(here / "validation.jsonl", 37, seed=32)
    write(here / "test.jsonl", 41, seed=33)
