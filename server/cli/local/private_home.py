"""TRAINYARD_HOME is private: only its owner may read or write anything in it.

It holds the SQLite database (password hashes, every job's spec), the secret key, the
CLI's token, the first admin's password, uploads, checkpoints and job logs. `up` sets
its umask to 077 before it creates anything, so the home is made 0700 and every file
that `up` and its children (web, worker, reconciler, the embedded Redis: a child
inherits the umask) create is 0600 or 0700, whatever umask the user started it with.
SQLite gives its -wal and -shm files the database file's mode.

A home made before this (or loosened by hand) is not changed behind the owner's back:
`up` warns, naming what others can read and the command that fixes it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

PRIVATE_UMASK = 0o077
# What a warning names at most: enough to show the problem, not a listing of the home.
_MAX_NAMED = 5


def make_home_private(home: Path) -> str | None:
    """Set this process's umask to 077 (children inherit it) and create `home` 0700.

    Returns a warning when `home` already existed with anything in it (the home itself,
    or an entry directly inside it or in its artifacts and uploads folders) readable,
    writable or searchable by group or others; None when it is private.
    """
    os.umask(PRIVATE_UMASK)
    if not home.exists():
        home.mkdir(mode=0o700, parents=True)
        return None
    exposed = _exposed(home)
    if not exposed:
        return None
    named = ", ".join(f"{path} ({_mode(path)})" for path in exposed[:_MAX_NAMED])
    more = f" and {len(exposed) - _MAX_NAMED} more" if len(exposed) > _MAX_NAMED else ""
    return (
        f"TRAINYARD_HOME {home} is open to other users: {named}{more}. Other local users "
        "can read the database (password hashes, job specs), uploads and checkpoints. "
        f"Fix it with: chmod -R go-rwx {home}"
    )


def _exposed(home: Path) -> list[Path]:
    candidates = [home]
    for folder in (home, home / "artifacts", home / "artifacts" / "uploads"):
        try:
            candidates.extend(sorted(folder.iterdir()))
        except OSError:
            continue
    found = []
    for path in candidates:
        try:
            mode = path.lstat().st_mode
        except OSError:
            continue
        if not stat.S_ISLNK(mode) and mode & 0o077:
            found.append(path)
    return list(dict.fromkeys(found))


def _mode(path: Path) -> str:
    return f"{stat.S_IMODE(path.lstat().st_mode):04o}"
