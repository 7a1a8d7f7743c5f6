"""Where the model and tokenizer come from, with errors that say what to fix."""

from __future__ import annotations

from pathlib import Path

from .errors import LauncherError, ModelError
from .paths import PKG_SCHEME, resolve_path
from .recipe import Recipe, recipe_base_dir


def _resolve(value: str, recipe: Recipe, key: str) -> str:
    """A local path (checked) or a Hub id (returned as is)."""
    looks_local = value.startswith((PKG_SCHEME, "/", "./", "../", "~")) or Path(value).exists()
    if not looks_local:
        base = recipe_base_dir(recipe)
        looks_local = base is not None and (base / value).exists()
    if not looks_local:
        return value  # a Hub id; loading will say if it cannot be fetched
    try:
        path = resolve_path(value, recipe_base_dir(recipe))
    except LauncherError as exc:
        raise ModelError(f"{key}: {exc}") from None
    if not path.exists():
        raise ModelError(f"{key}: {value} does not exist ({path}); give a model directory or a Hub id")
    if not path.is_dir() or not (path / "config.json").exists():
        raise ModelError(
            f"{key}: {path} is not a model directory (no config.json); point it at a folder written by "
            f"save_pretrained"
        )
    return str(path)


def model_location(recipe: Recipe) -> str:
    return _resolve(recipe.model.name_or_path, recipe, "model.name_or_path")


def tokenizer_location(recipe: Recipe) -> str:
    if recipe.model.tokenizer is None:
        return model_location(recipe)
    value = recipe.model.tokenizer
    looks_local = value.startswith((PKG_SCHEME, "/", "./", "../", "~")) or Path(value).exists()
    if looks_local:
        path = resolve_path(value, recipe_base_dir(recipe))
        if not path.exists():
            raise ModelError(f"model.tokenizer: {value} does not exist ({path.resolve()}); give a tokenizer directory or a Hub id")
        if not path.is_dir():
            raise ModelError(f"model.tokenizer: {value} is not a directory ({path.resolve()})")
        return str(path)
    return value


def load_tokenizer(recipe: Recipe):
    from transformers import AutoTokenizer

    location = tokenizer_location(recipe)
    key = "model.tokenizer" if recipe.model.tokenizer else "model.name_or_path"
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            location, trust_remote_code=recipe.model.trust_remote_code, revision=recipe.model.revision
        )
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"{key}: could not load a tokenizer from {location} ({first}); for a Hub id this needs network"
        ) from None
    if tokenizer.pad_token is None:
        # Decoder-only tokenizers often lack a pad token; padding positions are masked out anyway.
        if tokenizer.eos_token is None:
            raise ModelError(f"{key}: the tokenizer has neither a pad nor an eos token; add a pad token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_error(exc: Exception, location: str) -> ModelError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ModelError(f"model.name_or_path: could not load a model from {location} ({first})")


def load_pretrained_model(auto_class: str, location: str, recipe: Recipe, **kwargs):
    """``transformers.<auto_class>.from_pretrained(location)`` with the recipe's trust/revision settings;
    a load failure becomes a one-line ModelError naming the location."""
    import transformers

    try:
        return getattr(transformers, auto_class).from_pretrained(
            location, trust_remote_code=recipe.model.trust_remote_code, revision=recipe.model.revision, **kwargs
        )
    except (OSError, ValueError) as exc:
        raise load_model_error(exc, location) from None
