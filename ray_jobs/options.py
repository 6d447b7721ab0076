"""Command-line options generated from the frozen config dataclasses, so each fact is written once.

A field gives its option: ``batch_size: int = field(default=64, metadata={"help": "..."})``
becomes ``--batch-size``, typed ``int``, default 64, with that help line. ``Literal`` types give
the choices, ``bool`` fields a ``--name/--no-name`` pair, ``tuple[float, float]`` two values and
``tuple[float, ...]`` one or more. ``--config FILE`` replaces the defaults with a saved run's
values, so that any option given beside it overrides the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from agecore import storage
from agecore.config import CALIBRATION_HELP, DETECT_FACES, DETECT_FACES_HELP

T = TypeVar("T")


def _unwrap_optional(tp: Any) -> Any:
    """``int | None`` -> ``int``: None is the default, never typed on a command line."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _type_options(tp: Any) -> dict[str, Any]:
    """argparse keywords for one field type."""
    tp = _unwrap_optional(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return {"type": type(args[0]), "choices": args}
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return {"type": args[0], "nargs": "+"}
    if origin is tuple:  # a pair is a range: LO HI
        return {"type": args[0], "nargs": len(args), "metavar": ("LO", "HI") if len(args) == 2 else None}
    if tp is bool:
        return {"action": argparse.BooleanOptionalAction}
    if tp in (int, float, str):
        return {"type": tp}
    raise TypeError(f"no command-line form for the type {tp!r}")


def add_config_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    exclude: Iterable[str] = (),
    rename: Mapping[str, str] | None = None,
) -> None:
    """One option per field of the dataclass ``cls``, less ``exclude``.

    ``rename`` maps a field to its option name (``{"tta_flip": "tta"}`` gives ``--tta/--no-tta``).
    """
    rename, skip = rename or {}, set(exclude)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kwargs = _type_options(hints[f.name])
        text = f.metadata.get("help", "")
        if f.default is dataclasses.MISSING:
            kwargs.update(required=True, help=text)
        else:  # a help line that explains its default itself keeps its words
            kwargs.update(default=f.default, help=text if "(default" in text else f"{text} (default: %(default)s)")
        option = "--" + rename.get(f.name, f.name).replace("_", "-")
        parser.add_argument(option, dest=f.name, **kwargs)


def add_detect_faces_argument(parser: argparse.ArgumentParser, what: str = "") -> None:
    """``--detect-faces [auto|true|false]``, how each image is taken; a bare ``--detect-faces`` is ``true``."""
    parser.add_argument("--detect-faces", nargs="?", const="true", default="auto", choices=DETECT_FACES,
                        help=f"{DETECT_FACES_HELP}{'. ' + what if what else ''} (default: %(default)s)")


def add_calibration_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calibration", default=None, metavar="NAME", help=CALIBRATION_HELP)


def override_defaults(parser: argparse.ArgumentParser, defaults: Mapping[str, tuple[Any, str]]) -> None:
    """A stage's own defaults for options it shares, ``{dest: (value, why)}``; the help line gives the why."""
    unknown = set(defaults) - {a.dest for a in parser._actions}
    if unknown:
        raise ValueError(f"no options for {sorted(unknown)}")
    for action in parser._actions:  # argparse keeps each option's help and default on its action
        if action.dest in defaults:
            value, why = defaults[action.dest]
            text = (action.help or "").split(" (default")[0]
            action.default = value
            action.help = f"{text} (default: {why})" if value is None else f"{text} (default: {value}, {why})"


def config_from_args(cls: type[T], args: argparse.Namespace, **values: Any) -> T:
    """``cls`` from the parsed options that name its fields, with ``values`` taking precedence."""
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}  # type: ignore[arg-type]
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in {**fields, **values}.items()}
    return cls(**fields)


def read_json(path: str) -> dict[str, Any]:
    """A ``--config`` file's settings, or an error naming the file and the reason."""
    return storage.read_json(path, f"--config {path}")


def parse_with_config(
    parser: argparse.ArgumentParser, argv: list[str] | None, defaults_from: Callable[[dict[str, Any]], dict[str, Any]]
) -> argparse.Namespace:
    """Parse ``argv``; with ``--config FILE``, ``defaults_from(FILE's JSON)`` replaces the defaults first.

    An option the file provides is no longer required, and any option given overrides the file.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    path = pre.parse_known_args(argv)[0].config
    if path:
        values = defaults_from(read_json(path))
        for action in parser._actions:  # argparse has no public way to relax `required`
            if action.dest in values:
                action.default, action.required = values[action.dest], False
    return parser.parse_args(argv)
