"""Command-line conventions the entry points share: bad input is one line (``UsageError``), and
flags are named after the configuration fields they fill (``writer_wait``: ``--writer-wait``)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import field
from typing import Any, NoReturn


class UsageError(Exception):
    """Bad input from the command line; the message is the one line the user sees."""


class Parser(argparse.ArgumentParser):
    """An argument parser that raises UsageError instead of printing usage and exiting, so the
    caller prints one line and picks the exit code."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def flag(name: str) -> str:
    """The flag of a configuration field: ``--writer-wait`` for ``writer_wait``."""
    return "--" + name.replace("_", "-")


def flag_names(message: str) -> str:
    """A validation message that starts ``field=value`` (as dataclass validation speaks) with the
    flag the user typed instead: ``--field value...``; any other message unchanged."""
    head, sep, rest = message.partition("=")
    if sep and head.isidentifier():
        return f"{flag(head)} {rest}"
    return message


def option(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field that is also a flag: its default, its help text and any ``extra``
    settings for the parser, in one place."""
    return field(default=default, metadata={"help": help, **extra})


def finite_float(text: str) -> float:
    """A float flag's value: a finite number (``nan`` would silently disable a timeout)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return value


finite_float.__name__ = "finite number"  # what argparse names in "invalid ... value"


def flag_fields(cls: type) -> list[tuple[dataclasses.Field[Any], Any]]:
    """(field, resolved type) of every field of dataclass ``cls`` that is a flag or an
    argument: those made with ``option`` (a help text)."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if "help" in f.metadata]


def is_list(hint: Any) -> bool:
    """Whether a field's type is a tuple: a comma-separated list on the command line."""
    return typing.get_origin(hint) is tuple


def scalar(hint: Any) -> Any:
    """``float`` for ``float | None``; the item type of ``tuple[int, ...]``; else ``hint``."""
    args = [a for a in typing.get_args(hint) if a is not type(None) and a is not Ellipsis]
    return args[0] if args else hint


def help_text(f: dataclasses.Field[Any]) -> str:
    """The field's help text, with its default (or its ``shown`` one) unless that is None,
    empty or False."""
    shown = f.metadata.get("shown", f.default)
    if shown is None or shown == () or shown is False:
        return str(f.metadata["help"])
    if isinstance(shown, tuple):
        shown = ",".join(map(str, shown))
    elif isinstance(shown, float):
        shown = f"{shown:g}"
    return f"{f.metadata['help']} (default {shown})"


def add_flag(target: Any, f: dataclasses.Field[Any], hint: Any) -> None:
    """Add field ``f`` to a parser or argument group: a positional argument when it has no
    default, ``store_true`` for a bool (with ``--no-name`` as well when it defaults to on), a
    comma-separated text for a tuple (split by the caller), else a typed option (floats must
    be finite). ``flags`` in its metadata gives the option strings (default
    ``--field-name``); ``metavar`` and ``choices`` pass through."""
    settings = {k: f.metadata[k] for k in ("metavar", "choices") if k in f.metadata}
    kind = scalar(hint)
    kind = finite_float if kind is float else kind
    if f.default is dataclasses.MISSING:
        target.add_argument(f.name, type=kind, help=f.metadata["help"], **settings)
        return
    names = f.metadata.get("flags", (flag(f.name),))
    if kind is bool:
        # On by default: --name keeps it, --no-name turns it off.
        if f.default:  # argparse's action itself adds "(default: True)" to the help
            target.add_argument(
                *names,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=True,
                help=f.metadata["help"],
            )
        else:
            target.add_argument(*names, dest=f.name, action="store_true", help=help_text(f))
        return
    default = f.default
    if is_list(hint):
        kind, default = str, ",".join(map(str, default)) or None
    target.add_argument(
        *names, dest=f.name, type=kind, default=default, help=help_text(f), **settings
    )
