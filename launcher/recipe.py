"""Loading a recipe: YAML (safe loader) -> ``base:`` chain merged (child wins, dicts merge key by key)
-> ``a.b=value`` overrides applied -> validation by the schema (launcher/schema.py). Every problem
becomes one ``RecipeError`` line naming the file and dotted key, with a did-you-mean for misspelled keys.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .errors import RecipeError
from .schema import Recipe, recipe_schema


def _section_fields(model: type[BaseModel], loc: tuple) -> dict | None:
    """The fields of the schema node at ``loc`` (None if loc does not lead to a model)."""
    for key in loc:
        field = model.model_fields.get(key) if isinstance(key, str) else None
        if field is None:
            return None
        sub = _model_in(field.annotation)
        if sub is None:
            return None
        model = sub
    return model.model_fields


def _model_in(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def all_dotted_keys(model: type[BaseModel] = None, prefix: str = "") -> list[str]:
    """Every valid dotted key of the recipe schema (used for suggestions and docs)."""
    model = model or recipe_schema()
    keys = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        sub = _model_in(field.annotation)
        if sub is not None:
            keys.extend(all_dotted_keys(sub, dotted + "."))
    return keys


def _unknown_key_message(loc: tuple) -> str:
    dotted = ".".join(str(p) for p in loc)
    parent, key = loc[:-1], str(loc[-1])
    fields = _section_fields(recipe_schema(), parent) or {}
    prefix = ".".join(str(p) for p in parent)
    close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
    if close:
        suggestion = f"{prefix}.{close[0]}" if prefix else close[0]
        return f"{dotted}: unknown key; did you mean {suggestion}?"
    # The key may exist in another section (e.g. learning_rate put under model:).
    elsewhere = [k for k in all_dotted_keys() if k.rsplit(".", 1)[-1] == key]
    if elsewhere:
        return f"{dotted}: unknown key here; did you mean {elsewhere[0]}?"
    valid = ", ".join(fields) if fields else "(none)"
    return f"{dotted}: unknown key; valid keys here: {valid}"


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem, each naming the source and dotted key."""
    lines = []
    for item in err.errors():
        loc = tuple(p for p in item["loc"])
        if item["type"] == "extra_forbidden":
            lines.append(f"{source}: {_unknown_key_message(loc)}")
            continue
        dotted = ".".join(str(p) for p in loc)
        msg = item["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if item["type"] == "missing":
            msg = "required key is missing"
        elif "input" in item and item["type"] not in ("value_error",) and not isinstance(item["input"], dict):
            msg = f"{msg} (got {item['input']!r})"
        lines.append(f"{source}: {dotted}: {msg}" if dotted else f"{source}: {msg}")
    return "\n".join(lines)


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # Point at where the broken construct starts (context_mark, e.g. an unclosed "["), not only
        # where the parser gave up, which is often the next line.
        start = getattr(exc, "context_mark", None) or getattr(exc, "problem_mark", None)
        end = getattr(exc, "problem_mark", None)
        where = f" line {start.line + 1}, column {start.column + 1}" if start else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context = getattr(exc, "context", None)
        detail = f"{context}: {problem}" if context else problem
        if end is not None and start is not None and (end.line, end.column) != (start.line, start.column):
            detail += f" (noticed at line {end.line + 1}, column {end.column + 1})"
        raise RecipeError(f"{path}:{where}: invalid YAML: {detail}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping (key: value), got {type(data).__name__}")
    return data


def deep_merge(base: dict, child: dict) -> dict:
    """Child values win; nested mappings merge key by key; lists and scalars are replaced."""
    merged = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _load_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in seen + (path,))
        raise RecipeError(f"{path}: base: recipes form a cycle ({chain})")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise RecipeError(f"{path}: base: must be a path to another recipe, got {base!r}")
    base_path = Path(base)
    if not base_path.is_absolute():
        base_path = path.parent / base_path
    if not base_path.exists():
        raise RecipeError(f"{path}: base: {base} not found (looked at {base_path})")
    return deep_merge(_load_with_bases(base_path, seen + (path,)), data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``training.learning_rate=3e-5`` -> (['training', 'learning_rate'], '3e-5' parsed as YAML)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override {text!r}: expected KEY=VALUE with a dotted key, e.g. training.learning_rate=3e-5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = dict(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise RecipeError(f"override {text!r}: {part} is a value, not a section")
            else:
                child = dict(child)
            node[part] = child
            node = child
        node[path[-1]] = value
    return data


def validate_recipe(data: dict, source: str = "recipe") -> Recipe:
    """A recipe from a mapping (already merged and overridden), validated by the full schema (core and
    every registered task section). Raises RecipeError with one readable line per problem."""
    try:
        return recipe_schema().model_validate(data)
    except ValidationError as err:
        raise RecipeError(format_validation_error(err, source)) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, merge, override and validate a recipe. Raises RecipeError with readable lines."""
    path = Path(path)
    data = _load_with_bases(path)
    data = apply_overrides(data, overrides or [])
    recipe = validate_recipe(data, str(path) + (" (with overrides)" if overrides else ""))
    recipe._source = path.resolve()
    return recipe


def with_overrides(recipe: Recipe, overrides: list[str]) -> Recipe:
    """The same recipe with ``KEY=VALUE`` overrides applied (validated again; its file stays its source)."""
    changed = validate_recipe(apply_overrides(recipe.model_dump(mode="json"), overrides), "overrides")
    changed._source = recipe._source
    return changed


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, default_flow_style=False)


def recipe_base_dir(recipe: Recipe) -> Path | None:
    return recipe._source.parent if recipe._source else None
