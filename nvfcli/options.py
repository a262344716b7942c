"""Options of the commands: aliases shared by every command (the same option has the same name and help
everywhere), and `config_options`, which builds a command's settings options from its stage's Config
dataclass, the help of each being the field's docstring (read at run time), so that `--help` and the code
cannot drift apart. Options given replace the preset's fields; the others keep the preset's values."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import re
import sys
import textwrap
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import typer
from rich.markup import escape

Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Redo work whose outputs already exist.")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed; the same seed gives the same output.")]
DataDir = Annotated[
    Path, typer.Argument(help="Dataset folder (Multi-PIE tree or folders of images).", show_default=False)
]
OutDir = Annotated[Path, typer.Argument(help="Output folder.", show_default=False)]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
Shard = Annotated[
    Optional[str],
    typer.Option("--shard", help="Process shard K/N of the subjects, 0 <= K < N (default: SLURM array task)."),
]
Captures = Annotated[
    Optional[str], typer.Option("--captures", help="File of capture ids (one per line), or - for stdin.")
]


def stage_preset(module: Any, name: str, changes: dict[str, Any]) -> Any:
    """The stage's Config named ``--preset NAME`` (its `PRESETS`), with the options given (not None)
    replacing its fields: `--preset` always names a stage preset."""
    from stages.core.errors import InputError

    presets = module.PRESETS
    if name not in presets:
        raise InputError(f"unknown --preset '{name}': choose one of {', '.join(presets)}")
    return dataclasses.replace(presets[name], **{k: v for k, v in changes.items() if v is not None})


def stage_context(work: Path, *, data: Path | None = None, shard: str | None = None, captures: str | None = None,
                  device: str = "auto", overwrite: bool = False, progress: Any = None,
                  paths: dict[str, Any] | None = None) -> Any:  # fmt: skip
    """The stage contract's `Context` from a command's options (``--shard K/N``, ``--captures FILE``
    read here; named paths that are None are left to the stage's defaults)."""
    from stages.core import worktree
    from stages.core.contract import Context

    parsed = worktree.Shard.parse(shard)
    ids = worktree.read_capture_ids(captures) if captures else None
    given = {name: Path(value) for name, value in (paths or {}).items() if value is not None}
    return Context(Path(work), data=data, captures=ids, shard=parsed, device=device, overwrite=overwrite,
                   progress=progress, paths=given, partial=ids is not None or parsed.count > 1)  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Options built from a stage's Config: the field's docstring is the option's help (issue 20).


@dataclasses.dataclass(frozen=True)
class Opt:
    """How one Config field is offered where the derived option does not fit (the per-command table).

    ``decls``: option names (``"--voxel"``, ``"--masks/--no-masks"``, ``"-o"``); ``type``: the command-line
    type when it is not the field's (e.g. ``str`` for text that ``parse`` turns into a tuple); ``parse``:
    command-line value -> field value, None (not given) or a dict of field changes (set as given, None
    included); ``hint``: command-line syntax appended to the docstring's sentence; ``default``: the option's default (None: not given);
    ``covers``: further fields this option sets (not offered on their own); ``option``: more
    `typer.Option` arguments (``min=1``)."""

    decls: tuple[str, ...] = ()
    type: Any = None
    parse: Callable[[Any], Any] | None = None
    hint: str = ""
    default: Any = None
    covers: tuple[str, ...] = ()
    option: dict[str, Any] = dataclasses.field(default_factory=dict)


_ABBREVIATIONS = ("e.g.", "i.e.", "Eq.", "etc.", "vs.", "cf.", "Fig.", "approx.")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> docstring (the string literal right after the field) of dataclass ``cls`` and its
    bases, read from their source at run time (`ast`), so that help text is the code's own."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # no source shipped
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):  # fmt: skip
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def first_sentence(doc: str) -> str:
    """The docstring's first sentence on one line: up to a full stop at the end or followed by a space
    and no lower-case letter (abbreviations such as e.g. and Eq. do not end it)."""
    text = " ".join(doc.split())
    for match in re.finditer(r"\.(\s+|$)", text):
        end = match.start() + 1
        if match.group(1) and (text[:end].endswith(_ABBREVIATIONS) or text[match.end() :][:1].islower()):
            continue
        return text[:end]
    return text


def field_help(cls: type, name: str, hint: str = "") -> str:
    """The help of the option for field ``name`` of Config ``cls``: its docstring's first sentence
    (backticks dropped, rich markup escaped), then the command-line ``hint``."""
    doc = first_sentence(field_docs(cls).get(name, ""))
    return escape(" ".join(part for part in (doc, hint) if part).replace("`", ""))


def _optional(annotation: Any) -> Any:
    """``X | None`` -> X (``Optional`` is what the option adds back); other types unchanged."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _simple(annotation: Any) -> bool:
    if annotation in (bool, int, float, str, Path):
        return True
    return typing.get_origin(annotation) is Literal and all(isinstance(a, str) for a in typing.get_args(annotation))


def config_options(cls: type, table: dict[str, Opt] | None = None, exclude: tuple[str, ...] = (),
                   panel: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:  # fmt: skip
    """Decorate a command whose last parameter is ``**changes``: add one option per field of Config ``cls``
    (name ``--field-name``, help: the field's docstring, default None), and call the command with the
    fields given (after ``table``'s parse) as ``changes``, ready for ``dataclasses.replace(preset, **changes)``.

    Fields of types other than bool, int, float, str, Path and string Literals need an `Opt` in ``table``;
    fields named like one of the command's own parameters, and those in ``exclude``, are not offered.
    The wrapped command's ``config_fields`` names the fields it offers (for tests)."""
    table = table or {}
    hints = {f.name: f.type for f in dataclasses.fields(cls)}
    unknown = set(table) | set(exclude) | {f for opt in table.values() for f in opt.covers}
    if unknown - set(hints):
        raise TypeError(f"{cls.__qualname__} has no fields {sorted(unknown - set(hints))}")
    module = sys.modules[cls.__module__]
    panel = panel or f"Settings ({cls.__module__}.{cls.__qualname__})"

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        taken = {p.name for p in own} | set(exclude) | {f for opt in table.values() for f in opt.covers}
        added: list[inspect.Parameter] = []
        specs: dict[str, Opt] = {}
        for field in dataclasses.fields(cls):
            if field.name in taken or not field.init:
                continue
            spec = table.get(field.name, Opt())
            annotation = hints[field.name]
            if isinstance(annotation, str):
                try:
                    annotation = eval(annotation, vars(module))  # noqa: S307 - the stage's own annotation
                except Exception:  # noqa: BLE001 - a name only for type checkers: offer it via the table
                    annotation = None
            kind = spec.type or _optional(annotation)
            if not _simple(kind) and spec.type is None:
                continue
            decls = spec.decls
            if kind is bool and not any(d.startswith("--") for d in decls):
                flag = field.name.replace("_", "-")
                decls = (f"--{flag}/--no-{flag}", *decls)
            info = typer.Option(*decls, help=field_help(cls, field.name, spec.hint), rich_help_panel=panel,
                                show_default=spec.default not in (None, False), **spec.option)  # fmt: skip
            cli_type = kind if spec.default is not None else Optional[kind]
            added.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=spec.default,
                                           annotation=Annotated[cli_type, info]))  # fmt: skip
            specs[field.name] = spec

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            changes: dict[str, Any] = {}
            for name, spec in specs.items():
                value = kwargs.pop(name)
                if value is not None and spec.parse is not None:
                    value = spec.parse(value)
                if isinstance(value, dict):  # several fields, set as given
                    changes.update(value)
                elif value is not None:
                    changes[name] = value
            return command(**kwargs, **changes)

        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + added
        wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        wrapper.config_fields = tuple(specs)  # type: ignore[attr-defined]
        wrapper.config_class = cls  # type: ignore[attr-defined]
        return wrapper

    return decorate


def preset_help(module: Any, what: str = "Stage preset") -> str:
    """Help of ``--preset``: the stage's `PRESETS` by name; the options below override its fields."""
    return f"{what}: {', '.join(module.PRESETS)}; the settings options override its fields."
