"""This project's ``trainer`` package, found even where a script's own ``trainer`` shadows it.

A script's directory comes first on ``sys.path``, and ``trainer.py`` is a common name for a
user's own file: importing ours by that name would fail, or hand the script ours instead of its
own. Where the name belongs to someone else, ours is loaded from its files under a private name
(its modules import each other relatively, so they work under any name).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

PACKAGE = Path(__file__).resolve().parent.parent / "trainer"
ALIAS = "rosetrainer._trainer"


def _name_is_ours() -> bool:
    loaded = sys.modules.get("trainer")
    if loaded is not None:
        paths = list(getattr(loaded, "__path__", []))
    else:
        spec = importlib.util.find_spec("trainer")
        paths = list(spec.submodule_search_locations or []) if spec is not None else []
    return any(Path(p).resolve() == PACKAGE for p in paths)


def _load_alias() -> None:
    spec = importlib.util.spec_from_file_location(
        ALIAS, PACKAGE / "__init__.py", submodule_search_locations=[str(PACKAGE)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[ALIAS] = module
    spec.loader.exec_module(module)


def trainer_module(name: str) -> ModuleType:
    """``trainer.<name>`` of this project (``name`` like ``supervised``, ``checkpoint.api``)."""
    if ALIAS not in sys.modules:
        if _name_is_ours():
            return importlib.import_module(f"trainer.{name}")
        _load_alias()
    return importlib.import_module(f"{ALIAS}.{name}")


def loaded(name: str) -> ModuleType | None:
    """``trainer.<name>`` when it is imported already (under either name), else None."""
    return sys.modules.get(f"trainer.{name}") or sys.modules.get(f"{ALIAS}.{name}")
