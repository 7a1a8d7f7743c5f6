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


def write_toy_topic_csv(path: Path, rows: int, seed: int = 0) -> Path:
    """A second toy task over the same vocabulary (continual learning): does the text mention `music`?
    Columns `sentence` and `topic` (not the sentiment file's), labels `music` / `other`."""
    rng = random.Random(seed)
    words = [w for w in NEUTRAL if w != "music"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sentence", "topic"])
        for _ in range(rows):
            text = [rng.choice(words) for _ in range(rng.randint(3, 8))]
            label = rng.choice(["music", "other"])
            if label == "music":
                text.insert(rng.randrange(len(text) + 1), "music")
            writer.writerow([" ".join(text), label])
    return path


def write_tiny_bert(directory: Path, seed: int = 0, dropout: float = 0.1) -> Path:
    """A randomly initialised 2-layer BERT over the toy sentiment vocabulary (one word = one token)."""
    return write_word_level_bert(directory, POSITIVE + NEGATIVE + NEUTRAL, seed=seed, dropout=dropout)


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


# ---- sequence to sequence: a toy "translation", a tiny BART and a tiny T5 (tests/integration/test_task_seq2seq.py) ----

# Each English word has one fixed "German" word; a sentence translates word by word, in order.
TOY_LEXICON = {
    "the": "die", "a": "eine", "red": "rot", "blue": "blau", "green": "gruen", "black": "schwarz",
    "white": "weiss", "big": "gross", "small": "klein", "old": "alt", "cat": "katze", "dog": "hund",
    "bird": "vogel", "fish": "fisch", "house": "haus", "tree": "baum", "car": "auto", "sees": "sieht",
    "has": "hat", "and": "und",
}
TOY_PREFIX_WORDS = ["translate", "English", "to", "German:"]


def make_translation(rng: random.Random, min_words: int = 1, max_words: int = 10) -> tuple[str, str]:
    words = [rng.choice(list(TOY_LEXICON)) for _ in range(rng.randint(min_words, max_words))]
    return " ".join(words), " ".join(TOY_LEXICON[w] for w in words)


def write_toy_translation_csv(path: Path, rows: int, seed: int = 0, lengths: list[tuple[int, int]] | None = None) -> Path:
    """``source,target`` rows; ``lengths`` optionally gives (min, max) words per consecutive block of
    rows (e.g. short sentences first, long ones last). tests/data/translation_*.csv were written with
    (400, seed=11, [(1, 3), (1, 10)]), (37, seed=12, [(1, 2), (8, 10)]) and (53, seed=13, [(1, 2), (8, 10)])."""
    rng = random.Random(seed)
    blocks = lengths or [(1, 10)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(("source", "target"))
        for i in range(rows):
            low, high = blocks[min(i * len(blocks) // rows, len(blocks) - 1)]
            writer.writerow(make_translation(rng, low, high))
    return path


def _seq2seq_tokenizer(directory: Path, specials: list[str], bos: str | None, eos: str):
    """A word-level tokenizer over the toy translation vocabulary (sources, targets and the T5-style
    task prefix): ``[bos] words eos``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = specials + TOY_PREFIX_WORDS + list(TOY_LEXICON) + list(TOY_LEXICON.values())
    vocab = {word: i for i, word in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    start = f"{bos} " if bos else ""
    backend.post_processor = processors.TemplateProcessing(
        single=f"{start}$A {eos}", pair=f"{start}$A {eos} $B:1 {eos}:1",
        special_tokens=[(token, vocab[token]) for token in (bos, eos) if token],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token=eos, bos_token=bos,
        model_max_length=64, model_input_names=["input_ids", "attention_mask"],
    )
    tokenizer.save_pretrained(directory)
    return vocab


def write_tiny_bart(directory: Path, seed: int = 0, dropout: float = 0.0) -> Path:
    """A 1+1-layer BART (encoder-decoder, d_model 128) over the toy translation vocabulary, with BART's
    special tokens (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2; the decoder starts from ``</s>``, then ``<s>``).
    Learns the toy translation in ~100 steps. (From random weights a decoder first learns to ignore
    the source, then - suddenly - to use it; with one layer each, that happens early and reliably.)"""
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    directory.mkdir(parents=True, exist_ok=True)
    vocab = _seq2seq_tokenizer(directory, ["<s>", "<pad>", "</s>", "<unk>"], bos="<s>", eos="</s>")
    config = BartConfig(
        vocab_size=len(vocab), d_model=128, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256, max_position_embeddings=64,
        dropout=dropout, attention_dropout=dropout, activation_dropout=dropout,
        bos_token_id=vocab["<s>"], pad_token_id=vocab["<pad>"], eos_token_id=vocab["</s>"],
        decoder_start_token_id=vocab["</s>"], forced_bos_token_id=vocab["<s>"], forced_eos_token_id=vocab["</s>"],
    )
    torch.manual_seed(seed)
    BartForConditionalGeneration(config).save_pretrained(directory, safe_serialization=True)
    return directory


def write_tiny_t5(directory: Path, seed: int = 0, dropout: float = 0.0) -> Path:
    """A 2+2-layer T5 (d_model 32) over the toy translation vocabulary: sequences end with ``</s>``,
    the decoder starts from ``<pad>``, as in T5."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    directory.mkdir(parents=True, exist_ok=True)
    vocab = _seq2seq_tokenizer(directory, ["<pad>", "</s>", "<unk>"], bos=None, eos="</s>")
    config = T5Config(
        vocab_size=len(vocab), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2,
        relative_attention_num_buckets=16, relative_attention_max_distance=32, dropout_rate=dropout,
        decoder_start_token_id=vocab["<pad>"], pad_token_id=vocab["<pad>"], eos_token_id=vocab["</s>"],
    )
    torch.manual_seed(seed)
    T5ForConditionalGeneration(config).save_pretrained(directory, safe_serialization=True)
    return directory


# ---- token classification / relation extraction (tests/integration/test_task_*.py) ----


def words_of_jsonl(*paths: Path, field: str) -> list[str]:
    """Every distinct word of ``field`` (a list of words, or a text split on whitespace) in JSON Lines
    files, sorted: the vocabulary of a word-level tokenizer that covers those files."""
    words: set[str] = set()
    for path in paths:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            value = json.loads(line)[field]
            words.update(value if isinstance(value, list) else value.split())
    return sorted(words)


def write_word_level_bert(directory: Path, words: list[str], seed: int = 0, dropout: float = 0.0,
                          max_positions: int = 64) -> Path:
    """A randomly initialised 2-layer BERT like ``write_tiny_bert``, with a word-level (one word = one
    token) fast tokenizer over ``words``: for tasks whose toy data has its own vocabulary."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    vocab = {word: i for i, word in enumerate(SPECIAL + [w for w in words if w not in SPECIAL])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=max_positions,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    ).save_pretrained(directory)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=max_positions, type_vocab_size=2, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout, pad_token_id=0,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(directory, safe_serialization=True)
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
