"""Command-line conventions the entry points share: bad input is one line (``UsageError``), and
flags are named after the configuration fields they fill (``writer_wait``: ``--writer-wait``)."""

from __future__ import annotations

import argparse
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
