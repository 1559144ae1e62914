"""What a member may see of a job's errors and log: no server paths, no tracebacks.

A failed job's owner needs to know what went wrong in their terms; the absolute paths
of the server's directories and Python's tracebacks say how the server is laid out and
what it runs, which is an administrator's business. So:

- the worker stores a job's `error_message` already redacted (paths replaced by
  `<artifacts>`, `<data>`, `<home>`, `<python>`, ... or `<path>/name`), and the full
  text with the traceback as `result["error_detail"]`, which only admins are shown
  (worker/runner.py; server/job_errors.py);
- the job log keeps everything. The runner writes a traceback as *detail lines*
  (`DETAIL_MARK` after the usual prefix); a member reading the log (API, page, stream)
  gets those lines folded into one notice and every other line with its paths redacted.

Pure stdlib: the web process, the worker and the CLI import this.
"""

from __future__ import annotations

import contextlib
import functools
import re
import site
import sys
import sysconfig
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from shared.settings import Settings

# Marks a job-log line as detail for administrators: `<ts> [attempt n] | <text>`.
DETAIL_MARK = "| "
HIDDEN_NOTICE = "(details hidden: an administrator can see them in the job log)"
# A key of a failed job's `result`: the unredacted message and traceback.
ERROR_DETAIL = "error_detail"

# The job log's prefix (worker/job_log.py): `2026-11-28T15:04:05.123Z [attempt 1] `.
_PREFIX = re.compile(r"^(\S+Z \[attempt \d+\] )(.*)$", re.DOTALL)
# An absolute path: a slash at the start of a token (not inside a URL or a fraction),
# at least two components. Stops at whitespace, quotes and the usual punctuation.
_ABSOLUTE = re.compile(r"(?<![\w.:/~<>-])/(?:[^\s'\"()<>:,;\[\]{}]+/)+[^\s'\"()<>:,;\[\]{}]*")


@dataclass(frozen=True, eq=False)
class Redactor:
    """Replaces known directories by a label and any other absolute path by
    `<path>/<its last part>`."""

    roots: tuple[tuple[str, str], ...]  # (directory, label), longest directory first

    @functools.cached_property
    def _known(self) -> re.Pattern[str]:
        # Whole directories only: /root must not eat the start of /rootfs.
        alternatives = "|".join(re.escape(directory) for directory, _ in self.roots)
        return re.compile(f"(?:{alternatives})(?![\\w.-])") if self.roots else re.compile("(?!)")

    def text(self, text: str) -> str:
        labels = dict(self.roots)
        text = self._known.sub(lambda m: labels[m.group(0)], text)
        return _ABSOLUTE.sub(_generic, text)

    def log_lines(self, lines: Iterable[str]) -> list[str]:
        """A member's view of job-log lines: detail lines (a traceback) folded into one
        notice per run, every other line's paths redacted."""
        out: list[str] = []
        hidden_run = False
        for line in lines:
            match = _PREFIX.match(line)
            prefix, body = (match.group(1), match.group(2)) if match else ("", line)
            if _is_detail(body):
                if not hidden_run:
                    out.append(prefix + HIDDEN_NOTICE)
                hidden_run = True
                continue
            hidden_run = False
            out.append(prefix + self.text(body))
        return out


def _generic(match: re.Match[str]) -> str:
    path = match.group(0).rstrip("/.")
    name = path.rsplit("/", 1)[-1]
    return f"<path>/{name}" if name else "<path>"


def _is_detail(body: str) -> bool:
    # Marked detail; and, for logs written before the mark, a traceback's header and
    # its indented frame and source lines (no event line starts with a space).
    return (
        body.startswith(DETAIL_MARK)
        or body.startswith("Traceback (most recent call last):")
        or body[:1] in (" ", "\t")
    )


def _python_dirs() -> list[str]:
    found = {sys.prefix, sys.base_prefix, sys.exec_prefix}
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            found.add(path)
    with contextlib.suppress(AttributeError):  # some virtualenv builds of site lack it
        found.update(site.getsitepackages())
    return [d for d in found if d and d != "/"]


@functools.lru_cache(maxsize=16)
def _build(artifacts: str, data: str, home: str, user_home: str, code: str) -> Redactor:
    labelled = [(d, "<python>") for d in _python_dirs()]
    labelled += [
        (code, "<trainyard>"),
        (user_home, "~"),
        (home, "<home>"),
        (data, "<data>"),
        (artifacts, "<artifacts>"),
    ]
    unique = {d.rstrip("/"): label for d, label in labelled if d and d.rstrip("/")}
    ordered = sorted(unique.items(), key=lambda item: len(item[0]), reverse=True)
    return Redactor(tuple(ordered))


def redactor_for(settings: Settings) -> Redactor:
    """The redactor for this server's directories (cached per set of directories)."""
    return _build(
        str(settings.resolved_artifacts_dir),
        str(settings.resolved_data_dir),
        str(settings.home.resolve()),
        str(Path.home()),
        str(Path(__file__).resolve().parents[1]),
    )
