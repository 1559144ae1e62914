"""shared/job_files.py: job paths, log tail/follow reads, artifact listing and lookup."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

import shared.job_files as job_files
from shared.job_files import (
    job_dir,
    list_artifacts,
    log_path,
    read_log_from,
    read_log_tail,
    resolve_artifact,
)
from shared.settings import Settings

ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


# -- paths ---------------------------------------------------------------------------


def test_job_dir_and_log_path(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", artifacts_dir=tmp_path / "artifacts")
    assert job_dir(settings, 7) == (tmp_path / "artifacts").resolve() / "jobs" / "7"
    assert log_path(settings, 7) == job_dir(settings, 7) / "job.log"


# -- read_log_tail -------------------------------------------------------------------


def test_tail_of_a_missing_file(tmp_path: Path) -> None:
    assert read_log_tail(tmp_path / "nope.log", 10) == ([], 0)


def test_tail_returns_the_last_lines_and_the_size(tmp_path: Path) -> None:
    path = write(tmp_path / "job.log", "".join(f"line {i}\n" for i in range(100)))
    lines, size = read_log_tail(path, 3)
    assert lines == ["line 97", "line 98", "line 99"]
    assert size == path.stat().st_size
    assert read_log_tail(path, 1000)[0] == [f"line {i}" for i in range(100)]
    assert read_log_tail(path, 0) == ([], size)


def test_tail_of_an_empty_file(tmp_path: Path) -> None:
    assert read_log_tail(write(tmp_path / "job.log", b""), 5) == ([], 0)


def test_tail_drops_the_line_cut_by_the_window(tmp_path: Path) -> None:
    path = write(tmp_path / "job.log", "a" * 50 + "\nshort\nlast\n")
    # The window starts inside the 50-character line: that fragment is not a line.
    assert read_log_tail(path, 10, max_bytes=20) == (["short", "last"], path.stat().st_size)
    # A window holding no newline before the end holds no complete line at all.
    path = write(tmp_path / "long.log", "x" * 100)
    assert read_log_tail(path, 10, max_bytes=20) == ([], 100)


def test_tail_keeps_a_last_line_without_newline(tmp_path: Path) -> None:
    path = write(tmp_path / "job.log", "one\ntwo\nthr")
    assert read_log_tail(path, 2) == (["two", "thr"], 11)


def test_tail_replaces_bad_utf8_and_keeps_odd_separators(tmp_path: Path) -> None:
    path = write(
        tmp_path / "job.log", b"ok \xe2\x82\xac\nbad \xff\xfe\nform\x0cfeed\xe2\x80\xa8x\r\n"
    )
    lines, _ = read_log_tail(path, 10)
    assert lines == ["ok \u20ac", "bad \ufffd\ufffd", "form\x0cfeed\u2028x"]


def test_tail_cut_inside_a_multibyte_character(tmp_path: Path) -> None:
    path = write(tmp_path / "job.log", "€€€€\nend\n")
    # The window starts in the middle of a 3-byte character: dropped with its line.
    assert read_log_tail(path, 10, max_bytes=8)[0] == ["end"]


def test_tail_of_a_huge_file_reads_only_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "huge.log"
    with open(path, "wb") as f:
        f.truncate(5 * 1024**3)  # sparse: 5 GiB of NULs without writing them
        f.seek(0, os.SEEK_END)
        f.write(b"first\nsecond\nthird\n")
    size = path.stat().st_size
    reads: list[int] = []

    class Spy:
        def __init__(self, f):  # type: ignore[no-untyped-def]
            self._f = f

        def read(self, n: int = -1) -> bytes:
            data = self._f.read(n)
            reads.append(len(data))
            return data

        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            return getattr(self._f, name)

        def __enter__(self):  # type: ignore[no-untyped-def]
            return self

        def __exit__(self, *exc: object) -> None:
            self._f.close()

    monkeypatch.setattr(job_files, "open", lambda *a, **k: Spy(open(*a, **k)), raising=False)  # noqa: SIM115
    started = time.perf_counter()
    lines, end = read_log_tail(path, 2, max_bytes=4096)
    assert lines == ["second", "third"] and end == size
    assert sum(reads) <= 4096
    assert time.perf_counter() - started < 1.0


# -- read_log_from -------------------------------------------------------------------


def test_follow_returns_complete_lines_only(tmp_path: Path) -> None:
    path = write(tmp_path / "job.log", "one\ntwo\npart")
    lines, offset = read_log_from(path, 0)
    assert (lines, offset) == (["one", "two"], 8)
    assert read_log_from(path, offset) == ([], 8)  # "part" is still being written
    with open(path, "ab") as f:
        f.write(b"ial\nfour\n")
    assert read_log_from(path, offset) == (["partial", "four"], path.stat().st_size)
    assert read_log_from(path, path.stat().st_size) == ([], path.stat().st_size)


def test_follow_in_bounded_chunks(tmp_path: Path) -> None:
    path = write(tmp_path / "job.log", "".join(f"{i:04d}\n" for i in range(10)))  # 5 bytes each
    seen: list[str] = []
    offset = 0
    for _ in range(20):
        lines, offset = read_log_from(path, offset, max_bytes=12)
        if not lines:
            break
        assert len(lines) <= 2
        seen += lines
    assert seen == [f"{i:04d}" for i in range(10)] and offset == 50


def test_follow_a_line_longer_than_max_bytes_comes_in_pieces(tmp_path: Path) -> None:
    path = write(tmp_path / "job.log", "x" * 25 + "\n")
    pieces, offset = [], 0
    while True:
        lines, offset = read_log_from(path, offset, max_bytes=10)
        if not lines:
            break
        pieces += lines
    assert "".join(pieces) == "x" * 25 and offset == 26


def test_follow_a_truncated_file_starts_over(tmp_path: Path) -> None:
    path = write(tmp_path / "job.log", "old line 1\nold line 2\n")
    _, offset = read_log_from(path, 0)
    write(path, "new\n")
    assert read_log_from(path, offset) == (["new"], 4)


def test_follow_a_missing_file_and_bad_arguments(tmp_path: Path) -> None:
    assert read_log_from(tmp_path / "nope.log", 123) == ([], 0)
    path = write(tmp_path / "job.log", "x\n")
    with pytest.raises(ValueError):
        read_log_from(path, -1)
    with pytest.raises(ValueError):
        read_log_from(path, 0, max_bytes=0)


# -- list_artifacts ------------------------------------------------------------------


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    """A job directory with files, an in-progress write, and symlinks in and out."""
    root = tmp_path / "jobs" / "1"
    write(root / "job.log", "hello\n")
    write(root / "attempt-1" / "last.pt", b"x" * 10)
    write(root / "attempt-1" / "best.pt", b"y" * 3)
    write(root / "attempt-1" / ".last.pt.abc.tmp", b"partial")
    write(root / "attempt-2" / "sub" / "deep.txt", "deep")
    write(tmp_path / "secret.txt", "outside")
    (root / "to-secret").symlink_to(tmp_path / "secret.txt")
    (root / "to-best").symlink_to(root / "attempt-1" / "best.pt")
    (root / "outside-dir").symlink_to(tmp_path, target_is_directory=True)
    (root / "inside-dir").symlink_to(root / "attempt-1", target_is_directory=True)
    (root / "empty").mkdir()
    return root


def test_list_artifacts(artifacts: Path) -> None:
    listing = list_artifacts(artifacts)
    assert [a["path"] for a in listing] == [
        "attempt-1/best.pt",
        "attempt-1/last.pt",
        "attempt-2/sub/deep.txt",
        "job.log",
    ]
    assert [a["size_bytes"] for a in listing] == [3, 10, 4, 6]
    for item in listing:
        assert set(item) == {"path", "size_bytes", "modified_at"}
        assert ISO_Z.match(item["modified_at"]), item["modified_at"]


def test_list_artifacts_reports_mtime_in_utc(tmp_path: Path) -> None:
    path = write(tmp_path / "d" / "f.bin", b"1")
    os.utime(path, (0, 86400 + 3661.5))
    assert list_artifacts(tmp_path / "d")[0]["modified_at"] == "1970-01-02T01:01:01.500Z"


def test_list_artifacts_of_a_missing_or_odd_directory(tmp_path: Path) -> None:
    assert list_artifacts(tmp_path / "nope") == []
    assert list_artifacts(write(tmp_path / "file", "x")) == []
    (tmp_path / "empty").mkdir()
    assert list_artifacts(tmp_path / "empty") == []


# -- resolve_artifact ----------------------------------------------------------------


def test_resolve_every_listed_artifact(artifacts: Path) -> None:
    for item in list_artifacts(artifacts):
        resolved = resolve_artifact(artifacts, item["path"])
        assert resolved == (artifacts / item["path"]).resolve()
        assert resolved is not None and resolved.is_file()


@pytest.mark.parametrize(
    "name",
    [
        "",
        "../secret.txt",
        "..",
        ".",
        "./job.log",
        "attempt-1/../job.log",
        "attempt-1/../../secret.txt",
        "a/../../x",
        "../x",
        "/etc/passwd",
        "//etc/passwd",
        "attempt-1\\..\\job.log",
        "a\\..\\b",
        "attempt-1\\best.pt",
        "attempt-1/./best.pt",  # "a/./b": only the canonical spelling is accepted
        "attempt-1//best.pt",
        "attempt-1/",
        "job.log/",
        "job.log\x00",
        "job.log\x00.png",
        "C:/Windows/win.ini",
        "c:job.log",
        "%2e%2e/secret.txt",  # a literal name: no such file here
        "%2e%2e%2fsecret.txt",
        "to-secret",  # symlink to a file outside
        "to-best",  # symlink to a file inside: still refused, as it is not listed
        "outside-dir/secret.txt",  # through a symlinked directory pointing out
        "inside-dir/best.pt",  # through a symlinked directory pointing in
        "attempt-1",  # a directory
        "empty",
        "attempt-2/sub",
        "attempt-1/.last.pt.abc.tmp",  # an in-progress write
        "missing.pt",
        "attempt-1/missing.pt",
        "job.log/x",
    ],
)
def test_resolve_refuses(artifacts: Path, name: str) -> None:
    assert resolve_artifact(artifacts, name) is None


def test_resolve_refuses_non_strings(artifacts: Path) -> None:
    assert resolve_artifact(artifacts, None) is None  # type: ignore[arg-type]
    assert resolve_artifact(artifacts, b"job.log") is None  # type: ignore[arg-type]


def test_resolve_a_literal_percent_name(artifacts: Path) -> None:
    # No URL decoding here: "%2e%2e" is an ordinary directory name on disk.
    write(artifacts / "%2e%2e" / "x", "literal")
    assert resolve_artifact(artifacts, "%2e%2e/x") == (artifacts / "%2e%2e" / "x").resolve()


def test_resolve_in_a_missing_directory(tmp_path: Path) -> None:
    assert resolve_artifact(tmp_path / "nope", "job.log") is None


def test_resolve_through_a_symlinked_root(tmp_path: Path) -> None:
    # The artifacts directory itself may sit behind a symlink (a mounted volume);
    # files inside it are still found, and still kept inside.
    real = tmp_path / "real"
    write(real / "job.log", "x\n")
    write(tmp_path / "secret.txt", "outside")
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    assert resolve_artifact(tmp_path / "link", "job.log") == (real / "job.log").resolve()
    assert resolve_artifact(tmp_path / "link", "../secret.txt") is None
