"""The configuration reference (docs/config.md), made from the schema itself: each field's type, default
and bounds from the pydantic models of `dmdr_rl.config`, and what it is for from the comments beside it
in that module's source, so the page cannot drift from the code.

    python -m dmdr_rl.config_reference            # print it
    python -m dmdr_rl.config_reference --write    # write docs/config.md
    python -m dmdr_rl.config_reference --check    # exit 1 when docs/config.md is not the schema's
"""

from __future__ import annotations

import argparse
import ast
import functools
import inspect
import io
import sys
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Iterator, NamedTuple

from pydantic import BaseModel
from pydantic.fields import FieldInfo

REFERENCE_PATH = Path(__file__).resolve().parent.parent / "docs" / "config.md"
WRITE_COMMAND = "python -m dmdr_rl.config_reference --write"

HEADER = f"""# Configuration reference

Every field of a run's config: its type, its default and what it is for. A run's config is a preset or
a YAML file (`--preset NAME|FILE`; a YAML file may start from another with `base: other.yaml`) plus
dotted overrides on the command line (`trainer.max_steps=100 'rewards.0.serve={{replicas: 2}}'`);
`python -m dmdr_rl.run --preset NAME --dry-run` checks one without starting anything, `--show-config`
prints it whole as YAML (every field, overrides applied), and a run keeps the same in its `config.yaml`. Defaults here are the code's; the presets (`dmdr_rl/presets/`)
set many fields (the toy presets' learning rates, the paper's hyperparameters in the SD3 ones). An
unknown field or a bad value stops the run at once, naming the field. Back to the [README](../README.md).

An override changes a field that exists: `rewards.0.weight=0.5` edits the first reward, but `rewards.1=...`
on a list of one is refused; give the whole list instead, `'rewards=[{{name: toy-align}}, {{name: toy-align,
shaping: linear, label: align-linear}}]'`: entries written so start from the defaults here, not the
preset's (`{{name: toy-align}}` alone is weight 1, hinge, margin 0.7), and two entries of one model need a
label on one of them. The algorithm's
names are [DESIGN section 2](DESIGN.md#2-the-algorithm-the-contract-every-implementation-must-meet)'s:
DynaDG (dynamic distribution guidance: the real score's LoRA scale `s_r(s) = s_r0 c(s)`), DynaRS (dynamic
renoise sampling: the noise levels' Beta distribution), `c(s)` (the cosine factor both anneal by, from 1 to
0 over `dmd.dynamic_steps`), TTUR (the two time-scale update rule: the critic updates every iteration, the
generator every `dmd.ratio`-th) and ReFL (reward feedback learning: the reward's gradient through the
decoder into the generator).

This page is made from `dmdr_rl/config.py` (`{WRITE_COMMAND}`; a test fails when it is not current).
"""


class Row(NamedTuple):
    field: str
    type: str
    default: str
    note: str


@functools.cache
def field_notes(model: type[BaseModel]) -> dict[str, str]:
    """What each field of `model` is for: the comment lines right above it and the comment on its line(s)."""
    source = inspect.getsource(model)
    comments = {token.start[0]: token.string.lstrip("#").strip()
                for token in tokenize.generate_tokens(io.StringIO(source).readline) if token.type == tokenize.COMMENT}
    lines = source.splitlines()
    notes = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, line = [], node.lineno - 1
        while line in comments and lines[line - 1].lstrip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        beside = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        notes[node.target.id] = " ".join(above + beside)
    return notes


def _is_list(info: FieldInfo) -> bool:
    return typing.get_origin(info.annotation) is list


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The config section an annotation holds (Optional[Section] too), else None."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def type_text(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_text(args[0])
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_text(arg) for arg in args)
    if origin is typing.Literal:
        return " or ".join(f"`{value}`" for value in args)
    if origin is list:
        return f"list of {type_text(args[0])}"
    if origin is tuple:
        return "[" + ", ".join(type_text(arg) for arg in args) + "]"
    if origin is dict:
        return "mapping"
    if annotation is type(None):
        return "null"
    if annotation is typing.Any:
        return "any"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def bounds_text(info: FieldInfo) -> str:
    """The field's numeric bounds and length limits, as the schema checks them."""
    words = []
    for item in info.metadata:
        for attribute, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(item, attribute, None) is not None:
                words.append(f"{symbol} {getattr(item, attribute):g}")
        if getattr(item, "min_length", None) is not None:
            words.append(f"length >= {item.min_length}")
        if getattr(item, "max_length", None) is not None:
            words.append(f"length <= {item.max_length}")
        if getattr(item, "pattern", None) is not None:
            words.append(f"matching `{item.pattern}`")
    return ", ".join(words)


def value_text(value: Any) -> str:
    """A default as it is written in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, BaseModel):
        return value_text(value.model_dump())
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {value_text(item)}" for key, item in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(value_text(item) for item in value) + "]"
    return str(value)


def _default(info: FieldInfo) -> Any:
    return info.default_factory() if info.default_factory is not None else info.default


def section_rows(model: type[BaseModel], prefix: str, defaults: BaseModel | None = None) -> Iterator[Row]:
    """A row per field of `model` under `prefix` (`student.`), a nested section's fields after its own row;
    `defaults`: the instance the parent's default holds (student.lora's rank 64 is not critic.lora's 32)."""
    notes = field_notes(model)
    for name, info in model.model_fields.items():
        required = info.is_required()
        default = getattr(defaults, name) if defaults is not None and not required else _default(info)
        kind = type_text(info.annotation)
        bounds = bounds_text(info)
        default_text = ("required" if required else "its fields below" if isinstance(default, BaseModel)
                        else f"`{value_text(default)}`")
        yield Row(prefix + name, kind + (f" ({bounds})" if bounds else ""), default_text, notes.get(name, ""))
        nested = _section_model(info.annotation)
        if nested is not None:
            yield from section_rows(nested, f"{prefix}{name}{'[]' if _is_list(info) else ''}.",
                                    default if isinstance(default, BaseModel) else None)


def _cell(text: str) -> str:
    """Text in a table cell: a | ends the cell, and <name> would be read as an HTML tag and not shown."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def reference() -> str:
    """docs/config.md: the run's own fields, then a section per part of the config."""
    from .config import RunConfig

    out = [HEADER]
    rows = list(section_rows(RunConfig, ""))
    parts = [(name, info) for name, info in RunConfig.model_fields.items() if _section_model(info.annotation)]
    out.append("Sections: " + " · ".join(f"[{name}{'[]' if _is_list(info) else ''}](#{name})" for name, info in parts)
               + "\n")
    out.append(_table([row for row in rows if row.field in RunConfig.model_fields
                       and row.field not in dict(parts)]))
    for name, info in parts:
        out.append(f"## {name}\n")
        out.append(" ".join(line.strip() for line in inspect.getdoc(_section_model(info.annotation)).splitlines()) + "\n")
        if _is_list(info):
            out.append(f"`{name}` is a list (default `{value_text(_default(info))}`); each item has these fields, "
                       f"`{name}[]` standing for `{name}.0`, `{name}.1`, ... in an override.\n")
        out.append(_table([row for row in rows if row.field.startswith((f"{name}.", f"{name}[]."))]))
    return "\n".join(out)


def _table(rows: list[Row]) -> str:
    lines = ["| field | type | default | what it is for |", "|---|---|---|---|"]
    lines += [f"| `{row.field}` | {_cell(row.type)} | {_cell(row.default)} | {_cell(row.note)} |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from .cli import command_name, command_summary

    parser = argparse.ArgumentParser(prog=command_name("dmdr_rl.config_reference"), description=command_summary(__doc__))
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help=f"write {REFERENCE_PATH.name} under docs/ (default: print it)")
    action.add_argument("--check", action="store_true",
                        help="exit 1 when docs/config.md differs from what the schema gives (default: print it)")
    args = parser.parse_args(argv)
    text = reference()
    if args.write:
        REFERENCE_PATH.write_text(text)
        print(f"wrote {REFERENCE_PATH}")
    elif args.check:
        if not REFERENCE_PATH.exists() or REFERENCE_PATH.read_text() != text:
            sys.exit(f"{REFERENCE_PATH} is not the schema's: run `{WRITE_COMMAND}`")
        print(f"{REFERENCE_PATH} is current")
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main(sys.argv[1:])
