"""What an incomplete install lacks, said in one line with the command that fixes it.

`pip install trainyard` alone installs the web side only; the worker needs the `worker`
extra (torch, numpy, scikit-learn). Without this check `trainyard up` would start a
worker that dies on `No module named 'numpy'` and restart it every 30 s, a Celery
traceback each time, and a newcomer would have to dig the cause out of the noise.

Nothing here imports torch: the check asks the import system whether a module could be
found, which is what `trainyard up` (whose process must stay free of torch) can afford.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

import click

# Module -> the distribution that provides it, as pyproject.toml's `worker` extra names it.
WORKER_MODULES = {"torch": "torch", "numpy": "numpy", "sklearn": "scikit-learn"}

_CHECKOUT = Path(__file__).resolve().parents[2]


class InstallError(click.ClickException):
    """Something the command needs is not installed; shown as one `error: ...` line."""

    def show(self, file: IO[Any] | None = None) -> None:
        # click's default prefix is "Error: "; the CLI's other errors are "error: ...".
        click.echo(f"error: {self.format_message()}", err=True, file=file)


def module_missing(name: str) -> bool:
    """Whether `import name` would fail to find the module, without importing it."""
    if name in sys.modules:
        return False
    try:
        return importlib.util.find_spec(name) is None
    except ImportError:
        # A finder may refuse a module outright (a broken install, or an import hook
        # blocking it) instead of answering "not found"; either way it cannot be imported.
        return True
    except ValueError:
        return False  # only raised for a module already imported (__spec__ is None)


def install_command(extra: str) -> str:
    """The command that installs an extra: the checkout's installer, else pip."""
    script = _CHECKOUT / "scripts" / "install.sh"
    if script.is_file() and (_CHECKOUT / "pyproject.toml").is_file():
        try:
            shown = str(script.relative_to(Path.cwd().resolve()))
        except ValueError:
            shown = str(script)
        # scripts/install.sh installs every extra (worker, local, dev) into .venv.
        return shlex.quote(shown) if os.sep in shown else f"./{shown}"
    return f"{shlex.quote(sys.executable)} -m pip install 'trainyard[{extra}]'"


def _names(items: Iterable[str]) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def require_worker_extra() -> None:
    """Raise InstallError naming what the worker cannot import, if anything."""
    missing = [dist for module, dist in WORKER_MODULES.items() if module_missing(module)]
    if missing:
        which = "which is" if len(missing) == 1 else "which are"
        raise InstallError(
            f"the worker needs {_names(missing)}, {which} not installed; "
            f"install the worker extra: {install_command('worker')}"
        )
