"""Where the model and tokenizer come from, with errors that say what to fix."""

from __future__ import annotations

from pathlib import Path

from .errors import HubModelUnavailable, LauncherError, ModelError
from .paths import PKG_SCHEME, resolve_path
from .recipe import recipe_base_dir
from .schema import Recipe


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


def load_error(key: str, location: str, exc: Exception, what: str) -> ModelError:
    """One line for a model, config or tokenizer that could not be loaded; for a Hub id that is not in the
    local cache, what to do about the Hub (transformers' own message is a paragraph about connections)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if Path(location).exists():
        return ModelError(f"{key}: could not load {what} from {location} ({first})")
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return HubModelUnavailable(
            f"{key}: {location} is a Hugging Face Hub id and its {what} is not in the local Hugging Face cache, and "
            f"the Hub is switched off (HF_HUB_OFFLINE=1); download it once with network (hf download {location}) "
            f"or point {key} at a local directory"
        )
    return HubModelUnavailable(
        f"{key}: could not load {what} for {location} from the Hugging Face Hub ({first}); check the id and the "
        f"network, or point {key} at a local directory"
    )


def probe_hub_config(location: str, revision: str | None) -> None:
    """Before a config is loaded from ``location`` (model_location's answer): a Hub model whose config is not in the
    local cache is looked up once, without retries, and an unreachable Hub is HubModelUnavailable at once. (Loading
    it through transformers retries a failed connection five times, ~23 s, before saying the same.)"""
    if Path(location).exists():
        return
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError
    import httpx2  # huggingface_hub's HTTP client: its TransportError is a connection that failed

    if constants.HF_HUB_OFFLINE or isinstance(try_to_load_from_cache(location, "config.json", revision=revision), str):
        return  # offline: transformers answers from the cache at once; cached: no network needed
    try:
        get_hf_file_metadata(hf_hub_url(location, "config.json", revision=revision))
    except httpx2.TransportError as exc:
        raise load_error("model.name_or_path", location, exc, "config") from None
    except HfHubHTTPError:
        return  # the Hub answered (no such repo, gated ...): loading says what is wrong, as before


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
        raise load_error(key, location, exc, "tokenizer") from None
    if tokenizer.pad_token is None:
        # Decoder-only tokenizers often lack a pad token; padding positions are masked out anyway.
        if tokenizer.eos_token is None:
            raise ModelError(f"{key}: the tokenizer has neither a pad nor an eos token; add a pad token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_error(exc: Exception, location: str) -> ModelError:
    return load_error("model.name_or_path", location, exc, "model")


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


# ---------------------------------------------------------------------------------------------
# GGUF weights (model.gguf_file): read with transformers' GGUF support, dequantized to fp32


def gguf_location(recipe) -> tuple[str, str]:
    """(directory, file name) of model.gguf_file, checked."""
    import importlib.util

    name = recipe.model.gguf_file
    try:
        directory = resolve_path(recipe.model.name_or_path, recipe_base_dir(recipe))
    except Exception as exc:  # a pkg:// package that is not installed
        raise ModelError(f"model.name_or_path: {exc}") from None
    if not (directory / name).is_file():
        raise ModelError(
            f"model.gguf_file: {name} is not a file in {directory} (model.name_or_path); name a .gguf file in that directory"
        )
    if importlib.util.find_spec("gguf") is None:
        raise ModelError("model.gguf_file: loading GGUF weights needs the gguf package; pip install gguf")
    return str(directory), name


def gguf_config(recipe):
    """The model config stored in the GGUF file, with model.config_overrides applied."""
    import difflib

    from transformers import AutoConfig

    directory, name = gguf_location(recipe)
    config = AutoConfig.from_pretrained(directory, gguf_file=name)
    for key, value in recipe.model.config_overrides.items():
        if not hasattr(config, key):
            close = difflib.get_close_matches(key, list(config.to_dict()), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ModelError(f"model.config_overrides.{key}: not an attribute of this {config.model_type} config{hint}")
        setattr(config, key, value)
    return directory, name, config


def drop_gguf_quantization(model) -> None:
    """The GGUF weights are dequantized on load: mark the model as the plain fp32 model it is, so that
    save_pretrained (export, best weights) works."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None


def save_gguf_tokenizer(directory: str, gguf_file: str, target: str) -> str:
    """Write the tokenizer (with its chat template) stored in a GGUF file as a tokenizer directory
    that model.tokenizer can name."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    tokenizer.save_pretrained(target)
    return target
