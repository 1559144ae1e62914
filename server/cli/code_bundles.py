"""`trainyard submit --code DIR`: pack a folder, upload it once, describe the script job.

The folder is packed by shared/code_bundle.py (deterministic, so an unchanged folder has
the same SHA-256); the server is asked for a bundle with that hash first
(`GET /api/v1/bundles?sha256=`), and only a new one is uploaded. The server has the
final word on every limit: the pack stops at TRAINYARD_MAX_BUNDLE_BYTES as this
machine's environment says (the server's default unless set), so a huge folder fails
here, fast, and a server configured smaller answers 413.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import click
from rich.console import Console
from rich.markup import escape

from server.cli.api_client import ApiClient
from server.cli.display import fmt_bytes
from server.cli.settings import cli_settings
from shared.code_bundle import BundleError, pack_directory

F = TypeVar("F", bound=Callable[..., Any])

_RUNTIME = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _runtime(_ctx: click.Context, _param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    match = _RUNTIME.match(value)
    if not match:
        raise click.BadParameter("seconds, or a number with s, m, h or d (90m, 2h)")
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def _param_items(
    _ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]
) -> dict[str, Any]:
    """KEY=VALUE pairs; a VALUE that parses as JSON is that value (0.01, true, [1, 2]),
    anything else is text, so `--param model=resnet` needs no quotes."""
    params: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r} is not KEY=VALUE")
        try:
            params[key.strip()] = json.loads(raw)
        except ValueError:
            params[key.strip()] = raw
    return params


SCRIPT_OPTIONS = (
    click.option(
        "--code",
        "code_dir",
        type=click.Path(exists=True, file_okay=False, path_type=Path),
        help="Run your own code: pack this folder (.gitignore and .trainyardignore "
        "respected), upload it unless the server has it, and submit a script job.",
    ),
    click.option(
        "--entry",
        metavar="FILE|MODULE:FUNCTION",
        help="With --code: what to run, e.g. train.py or pkg.train:main.",
    ),
    click.option(
        "--param",
        "param_items",
        multiple=True,
        callback=_param_items,
        metavar="KEY=VALUE",
        help="With --code: one entry of the params the script reads (VALUE as JSON if it "
        "parses, else text). Repeatable; goes on top of --params-file.",
    ),
    click.option(
        "--params-file",
        type=click.File("r", encoding="utf-8"),
        help="With --code: a JSON object of params.",
    ),
    click.option(
        "--dataset",
        metavar="NAME",
        help="With --code: a catalogue dataset whose files the script gets "
        "(mnist, fashion_mnist, cifar10).",
    ),
    click.option("--gpus", type=click.IntRange(min=0), help="With --code: GPUs the job needs."),
    click.option("--name", help="With --code: the job's name."),
    click.option("--tag", "tags", multiple=True, help="With --code: a tag (repeatable)."),
    click.option("--priority", type=int, help="With --code: the job's priority."),
    click.option(
        "--max-runtime",
        callback=_runtime,
        metavar="DURATION",
        help="With --code: the time limit, in seconds or like 90m or 2h.",
    ),
)


def script_options(func: F) -> F:
    for option in reversed(SCRIPT_OPTIONS):
        func = option(func)
    return func


@dataclass(frozen=True)
class ScriptOptions:
    """What `trainyard submit` was told about a script job (all None/empty without --code)."""

    code_dir: Path | None
    entry: str | None
    param_items: dict[str, Any]
    params_file: IO[str] | None
    dataset: str | None
    gpus: int | None
    name: str | None
    tags: tuple[str, ...]
    priority: int | None
    max_runtime: int | None

    def given_without_code(self) -> list[str]:
        """The script options given, for refusing them on a spec-file submit."""
        given = {
            "--entry": self.entry,
            "--param": self.param_items,
            "--params-file": self.params_file,
            "--dataset": self.dataset,
            "--gpus": self.gpus,
            "--name": self.name,
            "--tag": self.tags,
            "--priority": self.priority,
            "--max-runtime": self.max_runtime,
        }
        return [flag for flag, value in given.items() if value not in (None, (), {})]


def script_spec(options: ScriptOptions, bundle_id: int, args: tuple[str, ...]) -> dict[str, Any]:
    """The script JobSpec; only what was given, so the server's defaults apply."""
    if not options.entry:
        raise click.UsageError("--code needs --entry (the script to run, e.g. train.py)")
    params: dict[str, Any] = {}
    if options.params_file is not None:
        try:
            loaded = json.load(options.params_file)
        except ValueError as exc:
            raise click.BadParameter(f"not valid JSON: {exc}", param_hint="--params-file") from None
        if not isinstance(loaded, dict):
            raise click.BadParameter("must hold a JSON object", param_hint="--params-file")
        params.update(loaded)
    params.update(options.param_items)
    spec: dict[str, Any] = {
        "kind": "script",
        "bundle_id": bundle_id,
        "entry": options.entry,
        "args": list(args),
        "params": params,
    }
    optional = {
        "name": options.name,
        "priority": options.priority,
        "max_runtime_s": options.max_runtime,
        "dataset": {"name": options.dataset} if options.dataset else None,
        "resources": {"gpus": options.gpus} if options.gpus is not None else None,
        "tags": list(options.tags) or None,
    }
    spec.update({k: v for k, v in optional.items() if v is not None})
    return spec


def files(n: int) -> str:
    return f"{n} file" if n == 1 else f"{n} files"


def upload_folder(client: ApiClient, folder: Path, console: Console | None) -> dict[str, Any]:
    """The caller's bundle of `folder`'s packed contents: found by its hash, else uploaded.
    `console` None prints nothing (--quiet)."""
    name = f"{folder.resolve().name or 'bundle'}.tar.gz"
    max_bytes = cli_settings().max_bundle_bytes
    with tempfile.TemporaryDirectory(prefix="trainyard-bundle-") as tmp:
        try:
            packed = pack_directory(folder, Path(tmp) / name, max_bytes)
        except BundleError as exc:
            raise click.ClickException(exc.message) from None
        found = client.get("/bundles", {"sha256": packed.sha256})["bundles"]
        if found:
            bundle: dict[str, Any] = found[0]
            if console is not None:
                console.print(
                    f"Bundle {bundle['id']} has this code already "
                    f"({files(packed.file_count)}, sha256 {packed.sha256[:12]}): not uploaded again"
                )
            return bundle
        with packed.path.open("rb") as f:
            bundle = client.post_file("/bundles", f, name, "application/gzip")
    if console is not None:
        console.print(
            f"Uploaded {escape(str(folder))} as bundle {bundle['id']} "
            f"({files(bundle['file_count'])}, {fmt_bytes(bundle['size_bytes'])})"
        )
    return bundle


def upload_archive(client: ApiClient, path: Path) -> dict[str, Any]:
    """Upload a .tar.gz or .zip as it is (the server checks it)."""
    with path.open("rb") as f:
        return client.post_file("/bundles", f, path.name, "application/octet-stream")  # type: ignore[no-any-return]
