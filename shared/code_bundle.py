"""Code bundles of script jobs: a `.tar.gz` or `.zip` of a team's folder.

Three users, one set of rules: the CLI packs a folder (`pack_directory`), the web checks
an upload before storing it (`inspect_bundle`), and the worker unpacks it into an
attempt's working directory (`unpack_bundle`, which checks everything again: the
archive came from a user).

A bundle is refused (BundleError, its message naming the entry and the rule) for:
an absolute name or one with a `..` component; a symlink or hardlink whose target
leaves the tree (symlinks are resolved through the archive's other symlinks, as the
file system would); an entry inside a symlink or a file; device files, fifos and
sockets; duplicate names; more than `max_files` entries; more than `max_unpacked_bytes`
unpacked (the headers' sizes first, then the bytes actually read: a zip's central
directory may lie); an archive over `max_archive_bytes`; anything but a gzip'd tar or
a zip. Python's tarfile and zipfile read the formats; the rules are ours, and
tarfile's own "data" extraction filter (PEP 706) runs on each tar entry as a second
line, then every symlink of the unpacked tree is resolved once more on disk.

Packing is deterministic (sorted entries, fixed mtime, uid/gid 0, modes 0644/0755, a
gzip header without name or time): the same tree gives the same bytes, so the same
SHA-256, and the CLI uploads a folder only once. Excludes follow `.gitignore` and
`.trainyardignore` (pathspec: git's wildmatch rules as pip and black use them, with
negation and anchoring, which fnmatch does not have).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from shared.settings import Settings

ArchiveFormat = Literal["tar.gz", "zip"]

CHUNK = 1 << 20
# What unpacked files and folders get: no setuid/setgid/sticky, no group or world write.
FILE_MODE, EXEC_MODE, DIR_MODE = 0o644, 0o755, 0o755
# Packed entries carry this time (1980-01-01, the earliest a zip can hold), not the
# files' own: a touched but unchanged file must not change the hash.
PACK_MTIME = 315_532_800
# Symlink hops while resolving one target (Linux's own limit is 40).
MAX_LINK_HOPS = 40
# A symlink's target is a path, not data: a zip's symlink entry larger than this is not one.
MAX_LINK_TARGET = 4096
# Per path component, and whole names: what Linux file systems take.
MAX_NAME_BYTES, MAX_PATH_BYTES = 255, 4096
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DRIVE = re.compile(r"^[A-Za-z]:")

# Left out of every packed bundle unless a .gitignore/.trainyardignore re-includes it
# (`!pattern`): version control, caches, virtual environments, and the ./checkpoints
# folder the SDK writes when a script runs outside Trainyard.
DEFAULT_EXCLUDES = (
    ".git/",
    ".hg/",
    ".svn/",
    "__pycache__/",
    "*.py[cod]",
    ".venv/",
    "venv/",
    ".mypy_cache/",
    ".pytest_cache/",
    ".ruff_cache/",
    ".ipynb_checkpoints/",
    "*.egg-info/",
    ".DS_Store",
    "/checkpoints/",
)
IGNORE_FILES = (".gitignore", ".trainyardignore")


class BundleError(ValueError):
    """The archive breaks a bundle rule; `message` says which, for people."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class BundleLimits:
    max_archive_bytes: int = 50_000_000
    max_unpacked_bytes: int = 500_000_000
    max_files: int = 20_000

    @classmethod
    def from_settings(cls, settings: Settings) -> BundleLimits:
        return cls(
            max_archive_bytes=settings.max_bundle_bytes,
            max_unpacked_bytes=settings.max_bundle_unpacked_bytes,
            max_files=settings.max_bundle_files,
        )


@dataclass(frozen=True)
class BundleManifest:
    archive_format: ArchiveFormat
    file_count: int  # files and links; folders are not counted
    unpacked_bytes: int
    python_files: list[str]  # sorted paths of the bundle's .py files
    has_requirements: bool  # a requirements.txt at the top


@dataclass(frozen=True)
class PackedBundle:
    path: Path
    sha256: str
    file_count: int
    size_bytes: int


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def detect_format(path: Path) -> ArchiveFormat:
    """By the first bytes, not the name: gzip (then it must hold a tar) or zip."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"\x1f\x8b":
        return "tar.gz"
    if head in (b"PK\x03\x04", b"PK\x05\x06"):  # a zip, or an empty one
        return "zip"
    raise BundleError("not a .tar.gz or .zip archive")


# ---------------------------------------------------------------- the rules


@dataclass(frozen=True)
class _Entry:
    name: str  # normalised: relative posix path without "." components or trailing "/"
    kind: Literal["file", "dir", "symlink", "hardlink"]
    size: int = 0  # declared bytes of a file
    mode: int = 0
    target: str = ""  # a link's target as stored


@dataclass
class _Plan:
    """What pass one learnt of an archive: the entries by name and the totals."""

    archive_format: ArchiveFormat
    limits: BundleLimits
    entries: dict[str, _Entry] = field(default_factory=dict)
    count: int = 0
    declared: int = 0  # unpacked bytes by the headers
    read: int = 0  # unpacked bytes actually read

    def add(self, entry: _Entry | None) -> None:
        if entry is None:  # the archive's top folder itself
            return
        self.count += 1
        if self.count > self.limits.max_files:
            raise BundleError(f"more than {self.limits.max_files:,} files and folders")
        known = self.entries.get(entry.name)
        if known is not None:
            if known.kind == "dir" and entry.kind == "dir":
                return
            raise BundleError(f"{entry.name!r} appears twice in the archive")
        if entry.kind == "hardlink":
            linked = self.entries.get(entry.target)
            if linked is None or linked.kind != "file":
                raise BundleError(
                    f"hardlink {entry.name!r} -> {entry.target!r} does not name a file "
                    "earlier in the archive"
                )
            entry = _Entry(entry.name, "hardlink", linked.size, linked.mode, entry.target)
        self.entries[entry.name] = entry
        self.declared += entry.size if entry.kind in ("file", "hardlink") else len(entry.target)
        self._check_unpacked(self.declared)

    def count_read(self, n: int) -> None:
        self.read += n
        self._check_unpacked(self.read)

    def _check_unpacked(self, total: int) -> None:
        if total > self.limits.max_unpacked_bytes:
            raise BundleError(
                f"unpacks to more than {self.limits.max_unpacked_bytes:,} bytes "
                "(TRAINYARD_MAX_BUNDLE_UNPACKED_BYTES)"
            )

    def finish(self) -> BundleManifest:
        """The checks that need every entry: what lies inside what, and where links lead."""
        for entry in self.entries.values():
            parts = entry.name.split("/")
            for depth in range(1, len(parts)):
                parent = self.entries.get("/".join(parts[:depth]))
                if parent is not None and parent.kind != "dir":
                    raise BundleError(f"{entry.name!r} is inside the {parent.kind} {parent.name!r}")
        for entry in self.entries.values():
            if entry.kind == "symlink":
                self._resolve(entry)
        files = [e for e in self.entries.values() if e.kind != "dir"]
        return BundleManifest(
            archive_format=self.archive_format,
            file_count=len(files),
            unpacked_bytes=max(self.declared, self.read),
            python_files=sorted(e.name for e in files if e.name.endswith(".py")),
            has_requirements=any(e.name == "requirements.txt" for e in files),
        )

    def _resolve(self, link: _Entry) -> None:
        """Follow `link` through the archive's symlinks as the file system would; refuse
        it if any step leaves the tree. Lexical normalisation is not enough: with
        `d/p -> ..`, `d/q -> p/..` looks like `d` but is the tree's parent."""
        out = BundleError(f"symlink {link.name!r} -> {link.target!r} points outside the bundle")
        if link.target.startswith("/") or _DRIVE.match(link.target) or "\\" in link.target:
            raise out
        hops = 0
        pending = link.target.split("/")
        here = link.name.split("/")[:-1]
        while pending:
            part = pending.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                if not here:
                    raise out
                here.pop()
                continue
            candidate = "/".join([*here, part])
            found = self.entries.get(candidate)
            if found is not None and found.kind == "symlink":
                hops += 1
                if hops > MAX_LINK_HOPS:
                    raise BundleError(f"symlink {link.name!r} loops")
                if found.target.startswith("/") or _DRIVE.match(found.target):
                    raise out
                pending = found.target.split("/") + pending
                continue
            here.append(part)


def _clean_name(raw: str, what: str = "entry") -> str | None:
    """The entry's name as a relative posix path; None for the top folder itself."""
    if not raw or raw.startswith("/") or _DRIVE.match(raw):
        raise BundleError(f"{what} {raw!r} has an absolute path")
    if "\\" in raw:
        raise BundleError(f"{what} {raw!r} has a backslash in its name; use / between folders")
    if _CONTROL.search(raw):
        raise BundleError(f"{what} {raw!r} has a control character in its name")
    try:
        encoded = raw.encode("utf-8")
    except UnicodeEncodeError:
        raise BundleError(f"{what} {raw!r}: its name is not UTF-8") from None
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise BundleError(f"{what} {raw!r} has a '..' component")
    if len(encoded) > MAX_PATH_BYTES or any(len(p.encode()) > MAX_NAME_BYTES for p in parts):
        raise BundleError(f"{what} {raw[:100]!r}...: its name is too long")
    return "/".join(parts) or None


# ---------------------------------------------------------------- tar.gz


def _tar_entry(member: tarfile.TarInfo) -> _Entry | None:
    name = _clean_name(member.name)
    if member.isdir():
        return None if name is None else _Entry(name, "dir")
    if name is None:
        raise BundleError(f"entry {member.name!r} is not a folder but names the top")
    if member.isreg():
        return _Entry(name, "file", member.size, member.mode)
    if member.issym():
        if not member.linkname:
            raise BundleError(f"symlink {name!r} has no target")
        return _Entry(name, "symlink", target=member.linkname)
    if member.islnk():
        # A tar hardlink names another member, relative to the archive's top.
        target = _clean_name(member.linkname, f"hardlink {name!r} target")
        if target is None:
            raise BundleError(f"hardlink {name!r} points outside the bundle")
        return _Entry(name, "hardlink", target=target)
    kind = "a device file" if (member.ischr() or member.isblk()) else "a fifo or special file"
    raise BundleError(f"{name!r} is {kind}; only files, folders and links are allowed")


def _open_tar(f: IO[bytes]) -> tarfile.TarFile:
    # Stream mode: one pass over the gzip data, members one at a time (not all of them
    # in memory, as random access would keep them).
    try:
        return tarfile.open(fileobj=f, mode="r|gz")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleError(f"not a readable .tar.gz: {exc}") from None


def _tar_members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    try:
        yield from tar
    except (tarfile.TarError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise BundleError(f"not a readable .tar.gz: {exc}") from None


def _scan_tar(path: Path, plan: _Plan) -> None:
    with open(path, "rb") as f, _open_tar(f) as tar:
        for member in _tar_members(tar):
            entry = _tar_entry(member)
            plan.add(entry)
            if entry is not None and entry.kind == "file":
                _drain(tar.extractfile(member), entry, plan, None)


def _extract_tar(path: Path, dest: Path, plan: _Plan) -> None:
    with open(path, "rb") as f, _open_tar(f) as tar:
        for member in _tar_members(tar):
            entry = _tar_entry(member)
            if entry is None:
                continue
            if plan.entries.get(entry.name, _Entry("", "dir")).kind != entry.kind:
                raise BundleError(f"{entry.name!r} changed since the archive was checked")
            try:  # the second line: tarfile's own rules for untrusted archives (PEP 706)
                tarfile.data_filter(member, str(dest))
            except tarfile.FilterError as exc:
                raise BundleError(f"{entry.name!r}: {exc}") from None
            _create(dest, entry, lambda m=member: tar.extractfile(m), plan)


# ---------------------------------------------------------------- zip


def _zip_kind(info: zipfile.ZipInfo) -> int:
    # Unix mode bits live in the top half of external_attr (create_system 3, Unix).
    return (info.external_attr >> 16) if info.create_system == 3 else 0


def _zip_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> _Entry | None:
    name = _clean_name(info.filename)
    mode = _zip_kind(info)
    if info.flag_bits & 0x1:
        raise BundleError(f"{info.filename!r} is encrypted")
    if info.is_dir() or stat.S_ISDIR(mode):
        return None if name is None else _Entry(name, "dir")
    if name is None:
        raise BundleError(f"entry {info.filename!r} is not a folder but names the top")
    if stat.S_ISLNK(mode):
        if info.file_size > MAX_LINK_TARGET:
            raise BundleError(f"symlink {name!r} has a target of {info.file_size:,} bytes")
        with _zip_open(zf, info) as f:
            raw = f.read(MAX_LINK_TARGET + 1)
        try:
            target = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BundleError(f"symlink {name!r}: its target is not UTF-8") from None
        if not target or _CONTROL.search(target) or len(raw) > MAX_LINK_TARGET:
            raise BundleError(f"symlink {name!r} has no usable target")
        return _Entry(name, "symlink", target=target)
    # Many zip tools store permission bits without a file type: those are files too.
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
        raise BundleError(f"{name!r} is a device file, fifo or socket; only files, folders "
                          "and links are allowed")  # fmt: skip
    return _Entry(name, "file", info.file_size, mode)


def _zip_open(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> IO[bytes]:
    try:
        return zf.open(info)
    except (zipfile.BadZipFile, NotImplementedError, RuntimeError, OSError) as exc:
        raise BundleError(f"{info.filename!r} cannot be read: {exc}") from None


def _zip_entry_count(f: IO[bytes], size: int) -> int:
    """How many entries the central directory holds, by walking its records without
    building them: zipfile keeps one object per record in memory before we could count
    them, and a 50 MB zip of empty names holds about a million."""
    tail_len = min(size, 22 + 65_535)
    f.seek(size - tail_len)
    tail = f.read(tail_len)
    # The record is the last 22 bytes plus its comment; a comment may itself hold the
    # signature, so the one whose comment length reaches the end of the file is it.
    at = tail.rfind(b"PK\x05\x06")
    while at >= 0 and (
        len(tail) - at < 22 or at + 22 + struct.unpack_from("<H", tail, at + 20)[0] != len(tail)
    ):
        at = tail.rfind(b"PK\x05\x06", 0, at)
    if at < 0:
        raise BundleError("not a readable .zip: no end of central directory")
    cd_size, cd_offset = struct.unpack_from("<LL", tail, at + 12)
    end = size - tail_len + at  # where the central directory ends (zip64: its locator)
    if cd_size == 0xFFFFFFFF or cd_offset == 0xFFFFFFFF:
        raise BundleError("zip64 archives are not supported; a bundle is far smaller")
    start = end - cd_size
    if start < 0:
        raise BundleError("not a readable .zip: the central directory does not fit")
    f.seek(start)
    directory = f.read(cd_size)
    count = pos = 0
    while pos + 46 <= len(directory):
        if directory[pos : pos + 4] != b"PK\x01\x02":
            break
        n, m, k = struct.unpack_from("<HHH", directory, pos + 28)
        pos += 46 + n + m + k
        count += 1
    return count


def _scan_zip(path: Path, plan: _Plan) -> None:
    size = path.stat().st_size
    with open(path, "rb") as raw:
        if _zip_entry_count(raw, size) > plan.limits.max_files:
            raise BundleError(f"more than {plan.limits.max_files:,} files and folders")
        try:
            zf = zipfile.ZipFile(raw)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise BundleError(f"not a readable .zip: {exc}") from None
        with zf:
            for info in zf.infolist():
                entry = _zip_entry(zf, info)
                plan.add(entry)
                if entry is not None and entry.kind == "file":
                    _drain(_zip_open(zf, info), entry, plan, None)


def _extract_zip(path: Path, dest: Path, plan: _Plan) -> None:
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            entry = _zip_entry(zf, info)
            if entry is None:
                continue
            if plan.entries.get(entry.name, _Entry("", "dir")).kind != entry.kind:
                raise BundleError(f"{entry.name!r} changed since the archive was checked")
            _create(dest, entry, lambda i=info: _zip_open(zf, i), plan)


# ---------------------------------------------------------------- reading and writing


def _drain(source: IO[bytes] | None, entry: _Entry, plan: _Plan, out: IO[bytes] | None) -> None:
    """Read a file entry's bytes (into `out` when unpacking), counting what is really
    there against the header's size and the bundle's limit."""
    if source is None:
        raise BundleError(f"{entry.name!r} cannot be read")
    got = 0
    try:
        with source:
            while chunk := source.read(CHUNK):
                got += len(chunk)
                if got > entry.size:
                    raise BundleError(f"{entry.name!r} holds more bytes than its header says")
                plan.count_read(len(chunk))
                if out is not None:
                    out.write(chunk)
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise BundleError(f"{entry.name!r} cannot be read: {exc}") from None
    if got != entry.size:
        raise BundleError(f"{entry.name!r} is shorter than its header says")


def _create(dest: Path, entry: _Entry, open_source: object, plan: _Plan) -> None:
    target = dest / entry.name
    if entry.kind == "dir":
        target.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        return
    target.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    if entry.kind == "symlink":
        os.symlink(entry.target, target)
    elif entry.kind == "hardlink":
        # A copy, not a link: the two names must not share one inode's later edits.
        shutil.copyfile(dest / entry.target, target, follow_symlinks=False)
        os.chmod(target, EXEC_MODE if entry.mode & 0o111 else FILE_MODE)
    else:
        mode = EXEC_MODE if entry.mode & 0o111 else FILE_MODE
        # O_EXCL|O_NOFOLLOW: never write through something already at that path.
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        with os.fdopen(fd, "wb") as out:
            _drain(open_source(), entry, plan, out)  # type: ignore[operator]


def _plan(path: Path, limits: BundleLimits) -> _Plan:
    path = Path(path)
    size = path.stat().st_size
    if size > limits.max_archive_bytes:
        raise BundleError(
            f"the archive is {size:,} bytes; at most {limits.max_archive_bytes:,} "
            "(TRAINYARD_MAX_BUNDLE_BYTES)"
        )
    archive_format = detect_format(path)
    plan = _Plan(archive_format, limits)
    (_scan_tar if archive_format == "tar.gz" else _scan_zip)(path, plan)
    return plan


def inspect_bundle(path: Path, limits: BundleLimits) -> BundleManifest:
    """Check every rule (reading every byte: sizes are counted, not believed); what the
    bundle holds. BundleError says what is wrong."""
    return _plan(path, limits).finish()


def unpack_bundle(path: Path, dest: Path, limits: BundleLimits) -> BundleManifest:
    """Check the archive as `inspect_bundle` does, then unpack it into `dest` (new or
    empty). On any failure `dest` is left empty and BundleError is raised."""
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BundleError(f"{dest} is not an empty folder")
    plan = _plan(path, limits)
    manifest = plan.finish()
    dest.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    plan.read = 0  # counted again, as written
    try:
        (_extract_tar if manifest.archive_format == "tar.gz" else _extract_zip)(
            Path(path), dest, plan
        )
        _check_links_on_disk(dest)
    except BaseException:
        _empty(dest)
        raise
    return manifest


def _check_links_on_disk(dest: Path) -> None:
    """The last line: every symlink of the unpacked tree resolves inside it."""
    root = os.path.realpath(dest)
    for folder, dirs, files in os.walk(dest):
        for name in dirs + files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                resolved = os.path.realpath(path)
                if resolved != root and not resolved.startswith(root + os.sep):
                    rel = os.path.relpath(path, dest)
                    raise BundleError(f"symlink {rel!r} points outside the bundle")


def _empty(dest: Path) -> None:
    for child in dest.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


# ---------------------------------------------------------------- packing


class _Excludes:
    """The ignore files' rules in effect for one folder: the defaults, then each
    .gitignore and .trainyardignore from the top down. As in git, the last rule that
    matches a path decides (so a deeper file or `!pattern` can re-include)."""

    def __init__(self, specs: tuple[tuple[str, object], ...]):
        self.specs = specs  # (the folder the rules are relative to, its GitIgnoreSpec)

    @classmethod
    def defaults(cls) -> _Excludes:
        import pathspec

        return cls((("", pathspec.GitIgnoreSpec.from_lines(DEFAULT_EXCLUDES)),))

    def below(self, folder: Path, rel: str) -> _Excludes:
        """The rules for `folder` (at `rel` in the tree): these plus its own ignore files."""
        import pathspec

        specs = list(self.specs)
        for name in IGNORE_FILES:
            ignore = folder / name
            if ignore.is_file() and not ignore.is_symlink():
                lines = ignore.read_text(encoding="utf-8", errors="replace").splitlines()
                specs.append((rel, pathspec.GitIgnoreSpec.from_lines(lines)))
        return _Excludes(tuple(specs))

    def excluded(self, rel: str, is_dir: bool) -> bool:
        decision = None
        for base, spec in self.specs:
            if base and not rel.startswith(base + "/"):
                continue
            local = rel[len(base) + 1 :] if base else rel
            result = spec.check_file(local + "/" if is_dir else local)  # type: ignore[attr-defined]
            if result.include is not None:
                decision = result.include
        return bool(decision)


def _walk(root: Path, skip: tuple[int, int]) -> Iterator[tuple[str, Path, os.stat_result]]:
    """(relative name, path, lstat) of everything to pack, sorted, excludes applied;
    `skip` is the (device, inode) of the archive being written, should it be inside."""

    def visit(
        folder: Path, rel: str, rules: _Excludes
    ) -> Iterator[tuple[str, Path, os.stat_result]]:
        rules = rules.below(folder, rel)
        for child in sorted(folder.iterdir(), key=lambda p: p.name):
            name = f"{rel}/{child.name}" if rel else child.name
            st = child.lstat()
            is_dir = stat.S_ISDIR(st.st_mode)
            if rules.excluded(name, is_dir) or (st.st_dev, st.st_ino) == skip:
                continue
            yield name, child, st
            if is_dir:
                yield from visit(child, name, rules)

    yield from visit(root, "", _Excludes.defaults())


def _pack_entry(root: Path, name: str, path: Path, st: os.stat_result) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mtime, info.uid, info.gid, info.uname, info.gname = PACK_MTIME, 0, 0, "", ""
    if stat.S_ISDIR(st.st_mode):
        info.type, info.mode = tarfile.DIRTYPE, DIR_MODE
    elif stat.S_ISREG(st.st_mode):
        info.type, info.size = tarfile.REGTYPE, st.st_size
        info.mode = EXEC_MODE if st.st_mode & 0o111 else FILE_MODE
    elif stat.S_ISLNK(st.st_mode):
        target = os.readlink(path)
        resolved = os.path.realpath(path)
        top = os.path.realpath(root)
        if os.path.isabs(target) or not resolved.startswith(top + os.sep):
            raise BundleError(
                f"{name} is a symlink to {target}, outside the folder: copy the file in, "
                "or exclude it in .trainyardignore"
            )
        info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
    else:
        raise BundleError(
            f"{name} is not a file, folder or symlink; exclude it in .trainyardignore"
        )
    return info


def pack_directory(root: Path, out: Path, max_bytes: int) -> PackedBundle:
    """Pack `root`'s contents (names relative to it) into the .tar.gz `out`,
    deterministically, leaving out what the ignore files and DEFAULT_EXCLUDES say.
    BundleError when the archive would pass `max_bytes` (naming the largest files)."""
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise BundleError(f"{root} is not a folder")
    sizes: list[tuple[int, str]] = []  # (bytes, name) of each file packed so far
    try:
        with open(out, "wb") as raw:
            out_st = os.fstat(raw.fileno())
            # No file name and time 0 in the gzip header: only the content decides the bytes.
            gz = gzip.GzipFile(
                filename="", mode="wb", fileobj=_LimitedWriter(raw, max_bytes), mtime=0
            )  # type: ignore[arg-type]
            with gz, tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                count = _add_tree(tar, root, (out_st.st_dev, out_st.st_ino), sizes)
    except _TooLarge:
        out.unlink(missing_ok=True)
        largest = ", ".join(f"{n} ({s:,} bytes)" for s, n in sorted(sizes, reverse=True)[:3])
        raise BundleError(
            f"{root} packs to more than {max_bytes:,} bytes; the largest files: {largest}. "
            "Leave out data and checkpoints with a .trainyardignore"
        ) from None
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return PackedBundle(out, sha256_file(out), count, out.stat().st_size)


def _add_tree(
    tar: tarfile.TarFile, root: Path, skip: tuple[int, int], sizes: list[tuple[int, str]]
) -> int:
    """Add everything `_walk` yields to `tar`; how many files and links."""
    count = 0
    for name, path, st in _walk(root, skip):
        info = _pack_entry(root, name, path, st)
        if info.isreg():
            sizes.append((info.size, name))
            with open(path, "rb") as f:
                tar.addfile(info, f)
        else:
            tar.addfile(info)
        count += 0 if info.isdir() else 1
    return count


class _TooLarge(Exception):
    pass


class _LimitedWriter:
    """A file object that refuses to grow past `limit` bytes (checked as gzip writes)."""

    def __init__(self, raw: IO[bytes], limit: int):
        self.raw, self.limit, self.written = raw, limit, 0

    def write(self, data: bytes) -> int:
        self.written += len(data)
        if self.written > self.limit:
            raise _TooLarge()
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()
