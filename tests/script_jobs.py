"""Script jobs as rows and bundles, for worker tests: a tiny tar.gz built here, stored
where the worker fetches it, a CodeBundle row, and a queued job of kind "script"."""

from __future__ import annotations

import io
import secrets
import tarfile
import textwrap
from pathlib import Path
from typing import Any

from shared.artifact_store import bundle_key, store_for
from shared.code_bundle import sha256_file
from shared.db import transaction
from shared.orm import CodeBundle, Job
from shared.settings import Settings
from shared.spec import parse_spec, spec_to_json


def make_archive(files: dict[str, str], path: Path) -> Path:
    """A .tar.gz of `files` (name -> text, dedented)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, text in sorted(files.items()):
            data = textwrap.dedent(text).encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


def add_bundle(settings: Settings, files: dict[str, str], owner_id: int | None = None) -> int:
    """Store a bundle of `files` as the upload API would: the archive under its
    content hash in the artifact store, and its row."""
    made = settings.home.parent / "bundles-made" / f"{secrets.token_hex(4)}.tar.gz"
    archive = make_archive(files, made)
    sha = sha256_file(archive)
    store_for(settings).put_file(archive, bundle_key(sha, "tar.gz"))
    with transaction(settings.resolved_database_url) as session:
        row = CodeBundle(
            owner_id=owner_id, sha256=sha, archive_format="tar.gz", filename="bundle.tar.gz",
            size_bytes=archive.stat().st_size,
            unpacked_bytes=sum(len(t.encode()) for t in files.values()),
            file_count=len(files), python_files=sorted(n for n in files if n.endswith(".py")),
            has_requirements="requirements.txt" in files,
        )  # fmt: skip
        session.add(row)
        session.flush()
        return row.id


def insert_script_job(settings: Settings, bundle_id: int, **fields: Any) -> int:
    """A queued script job, written straight to the database (no HTTP API)."""
    spec = parse_spec({"kind": "script", "bundle_id": bundle_id, "entry": "train.py", **fields})
    with transaction(settings.resolved_database_url) as session:
        job = Job(
            kind="script", state="queued", queue=spec.queue, spec=spec_to_json(spec),
            max_attempts=settings.max_attempts,
        )  # fmt: skip
        session.add(job)
        session.flush()
        return job.id
