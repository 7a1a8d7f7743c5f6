"""Recipe reference generated from the schema, so the docs cannot drift from the code."""

from __future__ import annotations

import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .recipe import _model_in
from .schema import recipe_schema


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "**required**"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{value!r}`" if value is not None else "`null`"


def _rows(model: type[BaseModel], prefix: str = "") -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        sub = _model_in(field.annotation)
        dotted = f"{prefix}{name}"
        # A list of items (continual.stages) or a section inside a section (continual.replay) gets a row of its own.
        listed = sub is not None and (typing.get_origin(field.annotation) is list or bool(prefix))
        if sub is not None and not listed:
            rows.extend(_rows(sub, dotted + "."))
            continue
        description = (field.description or "").replace("|", "\\|")
        symbols = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
        constraints = [
            f"{symbol} {getattr(m, attr)}" for m in field.metadata for attr, symbol in symbols.items() if hasattr(m, attr)
        ]
        if constraints:
            description += f" ({', '.join(constraints)})"
        rows.append(f"| `{dotted}` | {_type_name(field.annotation).replace('|', chr(92) + '|')} | {_default(field)} | {description} |")
        if listed:
            rows.extend(_rows(sub, dotted + "."))  # its keys
    return rows


def recipe_reference() -> str:
    lines = [
        "# Recipe reference",
        "",
        "Generated from the schema (`launcher/schema.py` and each task's own section) by `launcher schema` (a test checks this file is current).",
        "Unknown keys are errors. A recipe may start with `base: other.yaml` (merged key by key, this file wins);",
        "any field can be overridden on the command line as `section.key=value`.",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
        *_rows(recipe_schema()),
        "",
    ]
    return "\n".join(lines)
