"""Tiny, offline test assets: a randomly initialised 2-layer BERT with a word-level tokenizer, and a
learnable toy sentiment dataset. Built from configs in a second; nothing is downloaded.

Also runnable: ``python tests/assets.py DIR`` writes them to DIR (used by multi-process tests and
handy for trying recipes by hand).
"""

from __future__ import annotations

import csv
import json
import random
import sys
from pathlib import Path

POSITIVE = ["good", "great", "fine", "lovely", "superb", "fun", "moving", "clever", "warm", "bright"]
NEGATIVE = ["bad", "awful", "dull", "boring", "weak", "poor", "silly", "flat", "cold", "messy"]
NEUTRAL = ["the", "a", "film", "movie", "plot", "actor", "scene", "story", "was", "is", "and", "very",
           "quite", "it", "this", "ending", "music", "cast", "script", "director"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_example(rng: random.Random) -> tuple[str, str]:
    """1-3 sentiment words of one polarity among 2-10 neutral words: learnable in a few hundred steps."""
    label = rng.choice(["positive", "negative"])
    pool = POSITIVE if label == "positive" else NEGATIVE
    words = [rng.choice(pool) for _ in range(rng.randint(1, 3))]
    words += [rng.choice(NEUTRAL) for _ in range(rng.randint(2, 10))]
    rng.shuffle(words)
    return " ".join(words), label


def write_toy_csv(path: Path, rows: int, seed: int = 0, header=("text", "label")) -> Path:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for _ in range(rows):
            writer.writerow(make_example(rng))
    return path


def write_tiny_bert(directory: Path, seed: int = 0, dropout: float = 0.1) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    vocab = {word: i for i, word in enumerate(SPECIAL + POSITIVE + NEGATIVE + NEUTRAL)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=64,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )
    tokenizer.save_pretrained(directory)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, type_vocab_size=2,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, pad_token_id=0,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(directory, safe_serialization=True)
    return directory


def write_tiny_causal_lm(directory: Path, seed: int = 0) -> Path:
    """A 2-layer GPT-2-style causal LM over the same toy vocabulary, with pad/eos tokens and a chat
    template (for prompt-based evaluation and dialogue tests)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    words = ["<pad>", "<eos>", "<unk>", "<user>", "<assistant>", "Review:", "Sentiment:", "\n"]
    vocab = {word: i for i, word in enumerate(words + POSITIVE + NEGATIVE + NEUTRAL + ["positive", "negative"])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>", model_max_length=128,
        model_input_names=["input_ids", "attention_mask"],
    )
    tokenizer.chat_template = (
        "{% for message in messages %}{{ '<' + message['role'] + '> ' + message['content'] + ' <eos> ' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<assistant> ' }}{% endif %}"
    )
    tokenizer.save_pretrained(directory)
    config = GPT2Config(vocab_size=len(vocab), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=vocab["<eos>"], eos_token_id=vocab["<eos>"], pad_token_id=vocab["<pad>"])
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(directory, safe_serialization=True)
    return directory


def write_all(root: Path) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    paths = {
        "model": str(write_tiny_bert(root / "tiny-bert")),
        "causal_lm": str(write_tiny_causal_lm(root / "tiny-gpt2")),
        "train": str(write_toy_csv(root / "train.csv", 400, seed=1)),
        "validation": str(write_toy_csv(root / "validation.csv", 37, seed=2)),
        "test": str(write_toy_csv(root / "test.csv", 53, seed=3)),
    }
    (root / "assets.json").write_text(json.dumps(paths, indent=2))
    return paths


if __name__ == "__main__":
    print(json.dumps(write_all(Path(sys.argv[1])), indent=2))
