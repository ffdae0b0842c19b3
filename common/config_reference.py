"""The configuration reference, docs/configuration.md, generated from the jobs' config dataclasses.

    python -m common.config_reference            # (re)write docs/configuration.md
    python -m common.config_reference --check    # exit 1 when the committed file is not what this writes now

Every key of the curation job's tree (`curation.config.CurateConfig`) and of the training job's tree
(`training.config.TrainConfig`) gets a row: its dotted key exactly as the command line takes it
(`encode.max_side=512`), its type (a `Literal`'s choices spelled out), its default (the value in a freshly
built tree, so a section built by a `default_factory` shows its own values) and its description. The
descriptions are the attribute docstrings the config classes write under each field (a string literal
right after `name: type = default`), read from the class source with `ast`; a field without one makes the
generator fail naming it (`MissingDocstrings`), so the reference cannot silently lose a key's meaning.

The config modules are imported by name (`JOBS`), not at the top of this module, so `common` keeps no
import of the job packages; none of them imports torch.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import importlib
import inspect
import json
import sys
import textwrap
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.configtree import literal_choices

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "configuration.md"
REGENERATE = "python -m common.config_reference"


class MissingDocstrings(Exception):
    """Config fields without an attribute docstring (dotted keys with their classes)."""

    def __init__(self, missing: list[str]):
        self.missing = missing
        super().__init__(f"config fields without a docstring (add a string literal under each): "
                         f"{', '.join(missing)}")


@dataclass(frozen=True)
class Job:
    """One job's config tree and how a user reaches it."""

    title: str
    """Section heading in the reference."""
    module: str
    """Module holding the root config class (imported when the reference is built)."""
    root: str
    """Name of the root config dataclass in `module`."""
    intro: str
    """Markdown paragraph(s) under the heading: the command, how to override, where the tree is written."""


JOBS: tuple[Job, ...] = (
    Job(
        title="Curation job (`python -m pipeline.curate`)",
        module="curation.config",
        root="CurateConfig",
        intro=textwrap.dedent("""\
            ```
            python -m pipeline.curate --input IN --output OUT [--config FILE] [key=value ...]
            ```

            Defaults below, updated by the YAML file given with `--config` (without it,
            `configs/curate_default.yaml` when present), then by `key=value` overrides on the command line,
            e.g. `encode.max_side=384 scores.clip.device=cpu filter.min_clip_similarity=null`. Unknown keys and
            badly typed values stop the job before any work, naming the key. The resolved tree is written to
            `OUT/config.yaml`; a re-run on the same OUT compares against it to resume."""),
    ),
    Job(
        title="Training job (`python -m training.train`)",
        module="training.config",
        root="TrainConfig",
        intro=textwrap.dedent("""\
            ```
            python -m training.train --config configs/train/tiny-base.yaml [key=value ...] [--resume auto|none|PATH]
            ```

            Defaults below are the dataclass defaults; the recipe given with `--config` (one of the
            `configs/train/*.yaml` files, each a tiny CPU demo or a paper-scale stage) overrides many of
            them, then `key=value` overrides on the command line,
            e.g. `data.batch_size=2 optim.lr=3e-4 max_steps=50`. Unknown keys and badly typed values exit
            with status 2 before torch is imported, naming the key. The resolved tree is written to
            `OUTPUT/config.yaml` (`output_dir`), beside every checkpoint
            (`OUTPUT/checkpoints/step-XXXXXXXX/config.yaml`) and as the MLflow run's `config.yaml`
            artifact."""),
    ),
)


@dataclass
class Row:
    """One key of the reference table."""

    key: str
    type: str
    default: str
    description: str


@dataclass
class Section:
    """One config dataclass of a tree: its dotted prefix, its class, and the rows of its own leaf fields."""

    prefix: str
    cls: type
    doc: str
    rows: list[Row]


def _class_node(cls: type) -> ast.ClassDef:
    source = textwrap.dedent(inspect.getsource(cls))
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef) and node.name == cls.__name__:
            return node
    raise TypeError(f"no class statement for {cls.__qualname__} in its source")


def field_docs(cls: type) -> dict[str, str]:
    """{field name: attribute docstring} of a dataclass, from its source (and its dataclass bases')."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        body = _class_node(klass).body
        for stmt, after in zip(body, body[1:] + [None]):
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            if (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[stmt.target.id] = inspect.cleandoc(after.value.value)
            else:
                docs.pop(stmt.target.id, None)  # a subclass re-declared it without one
    return docs


def class_doc(cls: type) -> str:
    """The class's own docstring from its source ('' when it has none; not dataclass's generated one)."""
    return ast.get_docstring(_class_node(cls)) or ""


def type_name(tp: Any) -> str:
    """Markdown-free spelling of an annotation: `int`, `int | null`, `one of 'a', 'b'`, `list[str]`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    choices = literal_choices(tp)
    if choices is not None:
        values = [c for c in choices if c is not None]
        return "one of " + ", ".join(json.dumps(a) if isinstance(a, str) else repr(a) for a in values) + \
            (", null" if len(values) < len(choices) else "")
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]" if inner else origin.__name__
    return getattr(tp, "__name__", str(tp))


def default_text(value: Any, name: str) -> str:
    """A default as it would be written in YAML / on the command line (null, true, [0, 1000], {})."""
    if isinstance(value, str):
        text = json.dumps(value) if value == "" or value.strip() != value else value
    elif isinstance(value, (list, tuple, dict, bool)) or value is None:
        text = json.dumps(list(value) if isinstance(value, tuple) else value)
    else:
        text = repr(value)
    if isinstance(value, int) and not isinstance(value, bool) and name.endswith("_bytes"):
        for unit, size in (("GiB", 1024**3), ("MiB", 1024**2)):
            if value >= size and value % size == 0:
                return f"{text} ({value // size} {unit})"
    return text


def walk(cls: type, instance: Any | None = None, prefix: str = "",
         doc: str = "") -> tuple[list[Section], list[str]]:
    """Sections of the tree under `cls` (depth first, field order) and the dotted keys lacking docstrings.

    Defaults are read from `instance` (default: `cls()`), so a nested section built by a default_factory
    with its own arguments shows those values. A field whose type is a dataclass is a section, recursed;
    its table is headed by `doc` (the field's docstring in its parent) or else by the class docstring, and
    a section with neither counts as missing."""
    instance = cls() if instance is None else instance
    doc = doc or class_doc(cls)
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    rows: list[Row] = []
    nested: list[Section] = []
    missing: list[str] = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp, value = hints[f.name], getattr(instance, f.name)
        if dataclasses.is_dataclass(tp):
            sub, sub_missing = walk(tp, value, f"{key}.", docs.get(f.name, ""))
            nested += sub
            missing += sub_missing
            continue
        if f.name not in docs:
            missing.append(f"{key} ({cls.__name__}.{f.name})")
        rows.append(Row(key, type_name(tp), default_text(value, f.name), docs.get(f.name, "")))
    if prefix and not doc:
        missing.append(f"{prefix.rstrip('.')} (section {cls.__name__}: no class or field docstring)")
    own = Section(prefix.rstrip("."), cls, doc, rows)
    return ([own] if rows else []) + nested, missing


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def render_job(job: Job, root: type) -> tuple[str, int, list[str]]:
    """Markdown of one job (heading, intro, one table per config class with leaf fields), its number of
    keys, and its fields without docstrings."""
    sections, missing = walk(root)
    lines = [f"## {job.title}", "", job.intro.strip(), ""]
    count = 0
    for section in sections:
        name = f"`{section.prefix}`" if section.prefix else "top level"
        lines += [f"### {name} ({section.cls.__name__})", ""]
        if section.doc:
            lines += [_cell(section.doc.split("\n\n")[0]), ""]
        lines += ["| key | type | default | description |", "|---|---|---|---|"]
        for row in section.rows:
            lines.append(f"| `{row.key}` | {_cell(row.type)} | `{_cell(row.default)}` | {_cell(row.description)} |")
        lines.append("")
        count += len(section.rows)
    return "\n".join(lines), count, missing


def render(jobs: tuple[Job, ...] | None = None) -> tuple[str, dict[str, int]]:
    """The reference of `jobs` (default: JOBS) and {job module: number of keys}; MissingDocstrings names
    undocumented fields."""
    parts = [
        "# Configuration reference",
        "",
        f"Generated by `{REGENERATE}` from the config dataclasses (the docstring under each field);",
        f"do not edit by hand. `{REGENERATE} --check` (run by the unit tests) fails when this file is",
        "out of date.",
        "",
        "Every job reads one typed config tree: the defaults below, updated by a YAML file given with",
        "`--config` (nested mappings, any subset of the keys), then by `key=value` arguments on the command",
        "line, where `key` is the dotted path of the tables below. Values are parsed as YAML: `null` for",
        "none, `true`/`false`, lists as `[a, b]` (or `a,b`), mappings as `{k: v}`.",
        "",
    ]
    counts: dict[str, int] = {}
    missing: list[str] = []
    for job in JOBS if jobs is None else jobs:
        root = getattr(importlib.import_module(job.module), job.root)
        text, counts[job.module], job_missing = render_job(job, root)
        parts.append(text)
        missing += job_missing
    if missing:
        raise MissingDocstrings(missing)
    return "\n".join(parts).rstrip("\n") + "\n", counts


def check(path: Path, expected: str) -> str | None:
    """None when `path` holds `expected`, else a one-line hint naming the first differing line."""
    if not path.is_file():
        return f"{path} does not exist; run `{REGENERATE}`"
    current = path.read_text()
    if current == expected:
        return None
    for i, (old, new) in enumerate(zip(current.splitlines(), expected.splitlines()), start=1):
        if old != new:
            return f"{path} is out of date at line {i} (now {new[:80]!r}, file {old[:80]!r}); run `{REGENERATE}`"
    diff = sum(1 for d in difflib.ndiff(current.splitlines(), expected.splitlines()) if d[:1] in "+-")
    return f"{path} is out of date ({diff} lines differ at the end); run `{REGENERATE}`"


def main(argv: list[str] | None = None) -> int:
    """Write (or with --check, compare) the reference; exit status 1 on a stale file or missing docstrings."""
    p = argparse.ArgumentParser(prog=f"{REGENERATE}", description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 when stale")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default: {DEFAULT_OUT.relative_to(REPO)}")
    args = p.parse_args(argv)
    try:
        text, counts = render()
    except MissingDocstrings as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.check:
        problem = check(args.out, text)
        if problem:
            print(problem, file=sys.stderr)
            return 1
        print(f"{args.out} is current ({', '.join(f'{m}: {n} keys' for m, n in counts.items())})")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out} ({', '.join(f'{m}: {n} keys' for m, n in counts.items())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
