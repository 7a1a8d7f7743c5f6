"""Data: load splits (Hub or local files), carve missing splits, validate, tokenize once, cache.

Everything that can be wrong with the data is found here, before a run directory is created or a
model is loaded, and reported as one line naming the split, file and row.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DataError, HubDataUnavailable
from .paths import resolve_path
from .recipe import recipe_base_dir
from .schema import Recipe
from .tasks.base import CUT_COLUMN, tokenizer_fingerprint

CACHE_VERSION = 3
SPLITS = ("train", "validation", "test")
_FORMATS = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".lz4")


@dataclass
class PreparedData:
    raw: dict = field(default_factory=dict)  # split -> datasets.Dataset (validated raw rows)
    features: dict = field(default_factory=dict)  # split -> tokenized datasets.Dataset
    sources: dict = field(default_factory=dict)  # split -> where it came from (for messages)
    dropped: dict = field(default_factory=dict)  # split -> rows dropped (data.drop_other_labels)
    cached: dict = field(default_factory=dict)  # split -> True if features came from the cache
    truncated: dict = field(default_factory=dict)  # split -> examples cut at a length limit (tasks that mark them)


def count_truncated(features) -> int | None:
    """How many features the task marked as cut at a length limit (None: the task does not mark them)."""
    if CUT_COLUMN not in features.column_names:
        return None
    import pyarrow.compute as pc

    return int(pc.sum(features.data.column(CUT_COLUMN)).as_py() or 0)


def _quiet_datasets() -> None:
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def file_format(path: Path, key: str = "data") -> tuple[str, dict]:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSIONS:
        suffixes = suffixes[:-1]
    if not suffixes or suffixes[-1] not in _FORMATS:
        raise DataError(
            f"{key}: {path}: unknown file type; use .csv, .tsv, .json, .jsonl or .parquet (optionally .gz/.bz2/.xz/.zst)"
        )
    return _FORMATS[suffixes[-1]]


# First bytes of files that are not text, whatever their name says.
_MAGIC = {
    b"\x1f\x8b": ("gzip-compressed", ".gz"),
    b"BZh": ("bzip2-compressed", ".bz2"),
    b"\xfd7zXZ\x00": ("xz-compressed", ".xz"),
    b"\x28\xb5\x2f\xfd": ("zstd-compressed", ".zst"),
    b"PK\x03\x04": ("a zip archive", None),
    b"PAR1": ("a parquet file", ".parquet"),
}


def check_not_binary(path: Path, key: str) -> None:
    """A text format must hold text: name compressed/binary files for what they are."""
    with _open_maybe_compressed(path) as handle:
        head = handle.read(4096)
    for magic, (what, suffix) in _MAGIC.items():
        if head.startswith(magic):
            fix = f"name it with a {suffix} suffix" if suffix else "extract it first"
            raise DataError(f"{key}: {path} is {what}, not {file_format(path, key)[0]} text; {fix}")
    if b"\x00" in head:
        raise DataError(f"{key}: {path} is binary (NUL bytes in its first 4 KiB), not {file_format(path, key)[0]} text")


def first_bad_json_line(path: Path) -> str | None:
    """For JSON Lines: the first line that does not parse, as 'line N: reason'."""
    with _open_maybe_compressed(path) as handle:
        for number, raw in enumerate(handle, start=1):
            text = raw.decode("utf-8").strip()
            if not text:
                continue
            try:
                json.loads(text)
            except json.JSONDecodeError as exc:
                return f"line {number}: {exc.msg} (column {exc.colno})"
    return None


def _root_cause(exc: BaseException) -> BaseException:
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        nxt = exc.__cause__ or exc.__context__
        if nxt is None:
            break
        exc = nxt
    return exc


def _open_maybe_compressed(path: Path):
    import bz2
    import gzip
    import lzma

    openers = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
    return openers.get(path.suffix.lower(), open)(path, "rb")


def check_utf8(path: Path, key: str) -> None:
    """Fail early, with a line number, on a text file that is not UTF-8 (the parsers' errors don't say where)."""
    import codecs

    if path.suffix.lower() in (".zst", ".lz4"):
        return  # needs optional libraries to peek into; the parser will still complain
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, offset = 1, 0
    with _open_maybe_compressed(path) as handle:
        while chunk := handle.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                bad = max(exc.start - len(decoder.getstate()[0]), 0)
                line += chunk.count(b"\n", 0, bad)
                raise DataError(
                    f"{key}: {path} is not UTF-8 text (byte 0x{chunk[bad]:02x} on line {line}, offset {offset + bad}); "
                    f"convert it, e.g. iconv -f latin1 -t utf-8"
                ) from None
            line += chunk.count(b"\n")
            offset += len(chunk)


def load_file(path: Path, key: str):
    import datasets

    if not path.exists():
        raise DataError(f"{key}: file {path} not found")
    if path.is_dir():
        raise DataError(f"{key}: {path} is a directory; name a data file")
    if path.stat().st_size == 0:
        raise DataError(f"{key}: {path} is empty (0 bytes)")
    builder, options = file_format(path, key)
    if builder != "parquet":
        check_not_binary(path, key)
        check_utf8(path, key)
    try:
        return datasets.load_dataset(builder, data_files={"data": str(path)}, split="data", **options)
    except Exception as exc:  # datasets wraps parser errors in DatasetGenerationError
        cause = _root_cause(exc)
        if isinstance(cause, UnicodeDecodeError):
            raise DataError(
                f"{key}: {path} is not UTF-8 text (byte 0x{cause.object[cause.start]:02x} at offset "
                f"{cause.start}); convert it, e.g. iconv -f latin1 -t utf-8"
            ) from None
        message = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        if "corresponds to no data" in message:
            raise DataError(f"{key}: {path} has no data rows") from None
        if builder == "json":
            bad_line = first_bad_json_line(path)
            if bad_line:
                raise DataError(f"{key}: {path} is not valid JSON Lines: {bad_line}") from None
        raise DataError(f"{key}: {path} could not be read as {builder}: {message}") from None


def load_hub_splits(recipe: Recipe) -> dict:
    import datasets

    data = recipe.data
    try:
        loaded = datasets.load_dataset(data.dataset, data.dataset_config)
    except Exception as exc:
        cause = _root_cause(exc)
        message = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        if isinstance(exc, ConnectionError):  # what `datasets` raises for "not cached, and the Hub cannot be reached"
            why = ("the Hub is switched off (HF_HUB_OFFLINE=1)" if datasets.config.HF_HUB_OFFLINE
                   else f"the Hub cannot be reached ({str(exc).strip().splitlines()[0]})")
            raise HubDataUnavailable(
                f"data.dataset: {data.dataset} is a Hugging Face Hub dataset that is not in the local datasets cache, "
                f"and {why}; download it once with network, or point data.train/validation/test at local files"
            ) from None
        raise DataError(
            f"data.dataset: could not load {data.dataset!r} from the Hugging Face Hub ({message}); "
            f"without network, point data.train/validation/test at local files"
        ) from None
    splits = {}
    for split in SPLITS:
        name = getattr(data, split) or (split if split == "train" else None)
        if name is None:
            continue
        if name not in loaded:
            raise DataError(f"data.{split}: the dataset {data.dataset!r} has no split {name!r}; it has {list(loaded)}")
        splits[split] = loaded[name]
    return splits


def _carve(dataset, size: float, seed: int, what: str):
    total = len(dataset)
    count = int(round(size * total)) if size < 1 else int(size)
    if count < 1 or count >= total:
        raise DataError(
            f"data.{what}_size={size:g} of {total} training rows gives {count} {what} rows and leaves "
            f"{total - count} for training; choose a size between 1 and {total - 1} rows (or a fraction)"
        )
    parts = dataset.train_test_split(test_size=count, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def _add_row_numbers(dataset):
    """Remember each row's position in its source file, for error messages after carving."""
    return dataset.add_column("_row", np.arange(len(dataset)))


def load_raw_splits(recipe: Recipe) -> tuple[dict, dict]:
    """-> ({split: Dataset}, {split: source description})."""
    _quiet_datasets()
    data = recipe.data
    base = recipe_base_dir(recipe)
    sources = {}
    if data.dataset is not None:
        splits = {name: _add_row_numbers(ds) for name, ds in load_hub_splits(recipe).items()}
        for name in splits:
            sources[name] = f"data.{name} ({data.dataset}:{getattr(data, name) or name})"
    else:
        splits = {}
        for name in SPLITS:
            value = getattr(data, name)
            if value is None:
                continue
            path = resolve_path(value, base)
            if not path.exists() and not Path(value).expanduser().is_absolute() and base is not None:
                raise DataError(
                    f"data.{name}: file {value} not found (looked at {Path(value).resolve()} and, next to the "
                    f"recipe, {(base / value).resolve()})"
                )
            splits[name] = _add_row_numbers(load_file(path, f"data.{name}"))
            sources[name] = f"data.{name} ({path})"
    if len(splits.get("train", [])) == 0:
        raise DataError(f"{sources.get('train', 'data.train')}: the training split is empty (0 rows)")
    if "test" not in splits and data.test_size > 0:
        splits["train"], splits["test"] = _carve(splits["train"], data.test_size, data.split_seed, "test")
        sources["test"] = f"test split carved from {sources['train']}"
    if "validation" not in splits and data.validation_size > 0:
        splits["train"], splits["validation"] = _carve(
            splits["train"], data.validation_size, data.split_seed, "validation"
        )
        sources["validation"] = f"validation split carved from {sources['train']}"
    return splits, sources


def check_columns(task, splits: dict, sources: dict) -> None:
    import difflib

    for name, dataset in splits.items():
        for key, column in task.required_columns(name).items():
            if column not in dataset.column_names:
                present = [c for c in dataset.column_names if c != "_row"]
                close = difflib.get_close_matches(column, present, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                separators = {",": "comma", ";": "semicolon", "\t": "tab"}
                if len(present) == 1:
                    found = [name for sep, name in separators.items() if sep in present[0]]
                    if found:
                        hint = (f"; the file looks {found[0]}-separated (its one column is {present[0]!r}): "
                                f"use .csv for comma-separated and .tsv for tab-separated files")
                raise DataError(
                    f"{sources[name]}: {key}={column!r} is not a column{hint} (columns: {', '.join(present)})"
                )


def _limit(dataset, limit: int | None):
    return dataset.select(range(min(limit, len(dataset)))) if limit else dataset


def cache_root(recipe: Recipe) -> Path:
    if recipe.data.cache_dir:
        return resolve_path(recipe.data.cache_dir, recipe_base_dir(recipe))
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "recipe-launcher"
    return Path(os.environ.get("LAUNCHER_CACHE", default))


def load_validated_splits(recipe: Recipe, task) -> PreparedData:
    """Load and validate every split (no tokenization): enough to count steps for a plan."""
    splits, sources = load_raw_splits(recipe)
    check_columns(task, splits, sources)
    splits["train"] = _limit(splits["train"], recipe.data.max_train_samples)
    for name in ("validation", "test"):
        if name in splits:
            splits[name] = _limit(splits[name], recipe.data.max_eval_samples)
    task.fit(splits["train"])
    prepared = PreparedData(sources=sources)
    for name, dataset in splits.items():
        dataset, dropped = task.clean_split(name, dataset, sources[name])
        if len(dataset) == 0:
            raise DataError(f"{sources[name]}: the {name} split is empty" + (f" after dropping {dropped} rows" if dropped else ""))
        prepared.raw[name] = dataset
        prepared.dropped[name] = dropped
    return prepared


def preparation_key(recipe: Recipe, task, tokenizer) -> str | None:
    """A key over everything that decides the prepared data, computed without reading the data:
    the data section, the task, the tokenizer, and each local file's path, size and mtime. None for
    Hub datasets (their content can change behind a name; `datasets` caches those itself)."""
    if recipe.data.dataset is not None:
        return None
    files = {}
    for split in SPLITS:
        value = getattr(recipe.data, split)
        if value is not None:
            path = resolve_path(value, recipe_base_dir(recipe)).resolve()
            if not path.is_file():
                return None  # the normal path reports what is wrong with it
            stat = path.stat()
            files[split] = [str(path), stat.st_size, stat.st_mtime_ns]
    inputs = {"version": CACHE_VERSION, "task": task.name, "data": recipe.data.model_dump(mode="json", exclude={"cache_dir"}),
              "task_inputs": task.cache_inputs(), "tokenizer": tokenizer_fingerprint(tokenizer), "files": files}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]


def _load_prepared(directory: Path, task) -> PreparedData:
    import datasets

    meta = json.loads((directory / "meta.json").read_text())
    task.restore_fitted(meta["task"])
    prepared = PreparedData(sources=meta["sources"], dropped=meta["dropped"], truncated=meta["truncated"])
    for name in meta["splits"]:
        prepared.raw[name] = datasets.load_from_disk(str(directory / f"raw-{name}"))
        prepared.features[name] = datasets.load_from_disk(str(directory / f"features-{name}"))
        prepared.cached[name] = True
    return prepared


def _save_prepared(prepared: PreparedData, task, directory: Path) -> None:
    import shutil
    import tempfile

    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        for name in prepared.raw:
            prepared.raw[name].save_to_disk(str(staging / f"raw-{name}"))
            prepared.features[name].save_to_disk(str(staging / f"features-{name}"))
        meta = {"splits": list(prepared.raw), "sources": prepared.sources, "dropped": prepared.dropped,
                "truncated": prepared.truncated, "task": task.fitted_state()}
        (staging / "meta.json").write_text(json.dumps(meta))  # written last: marks the entry complete
        os.replace(staging, directory)
    except OSError:
        if not (directory / "meta.json").exists():  # another process won the race: theirs is as good
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _counted(encode, bar):
    """``encode`` advancing a progress bar by the examples of each batch it encodes."""
    if bar is None or not bar.shown:
        return encode

    def counted(batch, indices):
        bar.advance(len(indices))
        return encode(batch, indices)

    return counted


def prepare_data(recipe: Recipe, task, tokenizer, main_process_first=None, progress=None) -> PreparedData:
    """Load, validate and tokenize every split - or, when nothing that decides them has changed,
    read the result of an earlier run from the cache. The main process of each node goes first;
    the others then read what it wrote. ``progress``: a launcher.progress.Progress (bars per split)."""
    root = cache_root(recipe)
    try:
        (root / "prepared").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"data.cache_dir: cannot create {root} ({exc.strerror}); set data.cache_dir or $LAUNCHER_CACHE") from None
    key = preparation_key(recipe, task, tokenizer)
    entry = root / "prepared" / f"{task.name}-{key}" if key else None
    with main_process_first() if main_process_first else nullcontext():
        if entry is not None and (entry / "meta.json").exists():
            return _load_prepared(entry, task)
        prepared = load_validated_splits(recipe, task)
        encode = task.encoder(tokenizer)
        for name, dataset in prepared.raw.items():
            prepared.cached[name] = False
            with progress.task(f"tokenizing {name}", total=len(dataset)) if progress else nullcontext() as bar:
                prepared.features[name] = dataset.map(
                    _counted(encode, bar), batched=True, with_indices=True, remove_columns=dataset.column_names,
                    keep_in_memory=True, desc=f"tokenizing {name}",
                )
            cut = count_truncated(prepared.features[name])
            if cut is not None:
                prepared.truncated[name] = cut
        if entry is not None:
            with progress.task("caching features") if progress else nullcontext():
                _save_prepared(prepared, task, entry)
            reloaded = _load_prepared(entry, task)  # memory-mapped, like every later run
            reloaded.cached = {name: False for name in reloaded.raw}
            return reloaded
        return prepared
