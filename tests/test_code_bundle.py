"""Code bundles (shared/code_bundle.py): crafted archives that must be refused, safe
unpacking, and deterministic packing with the ignore files.

Each attack is a real archive built byte by byte here (tarfile/zipfile with hand-made
headers, or patched bytes), checked by both `inspect_bundle` (the web) and
`unpack_bundle` (the worker), which must leave nothing behind.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import tarfile
import time
import zipfile
import zlib
from pathlib import Path

import pytest

from shared.code_bundle import (
    BundleError,
    BundleLimits,
    detect_format,
    inspect_bundle,
    pack_directory,
    sha256_file,
    unpack_bundle,
)
from shared.settings import Settings

LIMITS = BundleLimits()


# ---------------------------------------------------------------- archive builders


Entry = tarfile.TarInfo | tuple[str | tarfile.TarInfo, bytes]


def tar_gz(path: Path, entries: list[Entry]) -> Path:
    """A .tar.gz of (name or TarInfo, data) files and hand-made TarInfo entries, in order."""
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                tar.addfile(entry)
                continue
            name, data = entry
            info = name if isinstance(name, tarfile.TarInfo) else tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def tar_link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def tar_special(name: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.devmajor, info.devminor = kind, 1, 3
    return info


def zip_file(path: Path, entries: list[tuple[str, bytes] | tuple[str, bytes, int]]) -> Path:
    """A .zip of (name, data[, unix mode]) entries."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for entry in entries:
            name, data = entry[0], entry[1]
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if len(entry) == 3:
                info.create_system = 3
                info.external_attr = entry[2] << 16  # type: ignore[misc]
            zf.writestr(info, data)
    return path


def refused(path: Path, limits: BundleLimits, tmp_path: Path) -> str:
    """Both the web's check and the worker's unpack refuse it, and unpack leaves nothing."""
    with pytest.raises(BundleError) as inspected:
        inspect_bundle(path, limits)
    dest = tmp_path / "unpacked"
    with pytest.raises(BundleError) as unpacked:
        unpack_bundle(path, dest, limits)
    assert inspected.value.message == unpacked.value.message
    assert not dest.exists() or list(dest.iterdir()) == []
    return inspected.value.message


# ---------------------------------------------------------------- refused: names


def test_tar_traversal_is_refused(tmp_path: Path) -> None:
    bad = tar_gz(tmp_path / "b.tar.gz", [("train.py", b"x"), ("../evil.py", b"x")])
    assert "'..' component" in refused(bad, LIMITS, tmp_path)
    deep = tar_gz(tmp_path / "c.tar.gz", [("a/b/../../../evil.py", b"x")])
    assert "'..' component" in refused(deep, LIMITS, tmp_path)
    assert not (tmp_path / "evil.py").exists()


def test_tar_absolute_path_is_refused(tmp_path: Path) -> None:
    bad = tar_gz(tmp_path / "b.tar.gz", [("/tmp/evil.py", b"x")])
    assert "absolute path" in refused(bad, LIMITS, tmp_path)


def test_zip_traversal_and_absolute_and_backslash_are_refused(tmp_path: Path) -> None:
    assert "'..' component" in refused(
        zip_file(tmp_path / "a.zip", [("ok.py", b"x"), ("../../evil.py", b"x")]), LIMITS, tmp_path
    )
    assert "absolute path" in refused(
        zip_file(tmp_path / "b.zip", [("/etc/evil", b"x")]), LIMITS, tmp_path
    )
    assert "backslash" in refused(
        zip_file(tmp_path / "c.zip", [("..\\..\\evil.py", b"x")]), LIMITS, tmp_path
    )


def test_duplicate_names_and_entries_inside_files_are_refused(tmp_path: Path) -> None:
    twice = tar_gz(tmp_path / "a.tar.gz", [("train.py", b"x"), ("./train.py", b"y")])
    assert "appears twice" in refused(twice, LIMITS, tmp_path)
    inside = tar_gz(tmp_path / "b.tar.gz", [("a", b"x"), ("a/b.py", b"y")])
    assert "inside the file 'a'" in refused(inside, LIMITS, tmp_path)


# ---------------------------------------------------------------- refused: links


def test_symlinks_out_of_the_tree_are_refused(tmp_path: Path) -> None:
    for n, target in enumerate(
        ("/etc/passwd", "../../etc/passwd", "../../outside", "../sub/../..", "x/../../..")
    ):
        bad = tar_gz(tmp_path / f"s{n}.tar.gz", [("ok.py", b"x"), tar_link("sub/l", target)])
        message = refused(bad, LIMITS, tmp_path)
        assert "points outside the bundle" in message, (target, message)


def test_a_symlink_out_through_another_symlink_is_refused(tmp_path: Path) -> None:
    # Lexically d/q -> p/.. is "d", inside; on disk p is the top, so p/.. is its parent.
    chain = tar_gz(tmp_path / "c.tar.gz", [tar_link("d/p", ".."), tar_link("d/q", "p/..")])
    assert "'d/q' -> 'p/..' points outside" in refused(chain, LIMITS, tmp_path)
    # The same through a later entry: order in the archive does not matter.
    later = tar_gz(tmp_path / "l.tar.gz", [tar_link("d/q", "p/.."), tar_link("d/p", "..")])
    assert "points outside" in refused(later, LIMITS, tmp_path)
    loop = tar_gz(tmp_path / "o.tar.gz", [tar_link("a", "b/x"), tar_link("b", "a/y")])
    assert "loops" in refused(loop, LIMITS, tmp_path)


def test_writing_through_a_symlink_is_refused(tmp_path: Path) -> None:
    # A symlink to a folder inside, then a file "below" it: the classic two-step escape
    # when the link points out; refused whatever the link's target.
    bad = tar_gz(tmp_path / "b.tar.gz", [tar_link("lib", "pkg"), ("lib/evil.py", b"x")])
    assert "inside the symlink 'lib'" in refused(bad, LIMITS, tmp_path)


def test_hardlinks_out_of_the_tree_are_refused(tmp_path: Path) -> None:
    for n, target in enumerate(("/etc/passwd", "../../etc/passwd", "missing.py")):
        bad = tar_gz(
            tmp_path / f"h{n}.tar.gz", [("ok.py", b"x"), tar_link("h", target, tarfile.LNKTYPE)]
        )
        message = refused(bad, LIMITS, tmp_path)
        assert "hardlink" in message or "absolute path" in message, message


def test_zip_symlink_in_external_attr_is_refused_when_it_points_out(tmp_path: Path) -> None:
    link = stat.S_IFLNK | 0o777
    out = zip_file(tmp_path / "a.zip", [("ok.py", b"x"), ("passwd", b"/etc/passwd", link)])
    assert "'passwd' -> '/etc/passwd' points outside" in refused(out, LIMITS, tmp_path)
    up = zip_file(tmp_path / "b.zip", [("sub/up", b"../../x", link)])
    assert "points outside" in refused(up, LIMITS, tmp_path)


def test_device_files_and_fifos_are_refused(tmp_path: Path) -> None:
    for kind in (tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE):
        bad = tar_gz(tmp_path / "d.tar.gz", [("ok.py", b"x"), tar_special("dev/null2", kind)])
        assert "only files, folders and links" in refused(bad, LIMITS, tmp_path)
    for mode in (stat.S_IFCHR | 0o666, stat.S_IFIFO | 0o644, stat.S_IFSOCK | 0o755):
        bad = zip_file(tmp_path / "d.zip", [("ok.py", b"x"), ("dev", b"", mode)])
        assert "device file, fifo or socket" in refused(bad, LIMITS, tmp_path)


# ---------------------------------------------------------------- refused: sizes and formats


def test_zip_bomb_by_declared_size_is_refused_before_reading(tmp_path: Path) -> None:
    zeros = b"\0" * 3_000_000
    bomb = zip_file(tmp_path / "bomb.zip", [("a.bin", zeros), ("b.bin", zeros)])
    assert bomb.stat().st_size < 20_000  # deflate: 1000 to 1
    limits = BundleLimits(max_unpacked_bytes=5_000_000)
    assert "unpacks to more than 5,000,000 bytes" in refused(bomb, limits, tmp_path)
    tar_bomb = tar_gz(tmp_path / "bomb.tar.gz", [("a.bin", zeros), ("b.bin", zeros)])
    assert "unpacks to more than" in refused(tar_bomb, limits, tmp_path)


def _patch_zip_sizes(path: Path, size: int, crc: int | None = None) -> None:
    """Make the local and central headers of a one-entry zip claim `size` bytes (and
    `crc`), whatever the compressed data really holds."""
    data = bytearray(path.read_bytes())
    local = data.index(b"PK\x03\x04")
    central = data.index(b"PK\x01\x02")
    struct.pack_into("<L", data, local + 22, size)
    struct.pack_into("<L", data, central + 24, size)
    if crc is not None:
        struct.pack_into("<L", data, local + 14, crc)
        struct.pack_into("<L", data, central + 16, crc)
    path.write_bytes(bytes(data))


def test_zip_bomb_by_real_size_never_lands_on_disk(tmp_path: Path) -> None:
    """Headers that understate the data: the real bytes are what is read and counted."""
    zeros = b"\0" * 4_000_000
    lying = zip_file(tmp_path / "lying.zip", [("a.bin", zeros)])
    _patch_zip_sizes(lying, 100)  # the CRC still covers 4 MB: reading past 100 fails it
    assert "cannot be read" in refused(lying, BundleLimits(max_unpacked_bytes=1000), tmp_path)
    # With a CRC that matches the first 100 bytes, only the 100 declared bytes come out.
    fitted = zip_file(tmp_path / "fitted.zip", [("a.bin", zeros)])
    _patch_zip_sizes(fitted, 100, zlib.crc32(zeros[:100]))
    dest = tmp_path / "fitted"
    manifest = unpack_bundle(fitted, dest, BundleLimits(max_unpacked_bytes=1000))
    assert manifest.unpacked_bytes == 100 and (dest / "a.bin").stat().st_size == 100


def test_a_truncated_archive_is_refused(tmp_path: Path) -> None:
    whole = tar_gz(tmp_path / "w.tar.gz", [("a.bin", os.urandom(200_000))])
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(whole.read_bytes()[:50_000])
    message = refused(cut, LIMITS, tmp_path)
    assert "cannot be read" in message or "not a readable" in message, message


def test_too_many_files_are_refused(tmp_path: Path) -> None:
    limits = BundleLimits(max_files=10)
    files = [(f"f{i}.py", b"") for i in range(11)]
    assert "more than 10 files" in refused(tar_gz(tmp_path / "m.tar.gz", files), limits, tmp_path)
    assert "more than 10 files" in refused(zip_file(tmp_path / "m.zip", files), limits, tmp_path)
    exactly = inspect_bundle(tar_gz(tmp_path / "ok.tar.gz", files[:10]), limits)
    assert exactly.file_count == 10


def test_a_zip_with_a_huge_central_directory_is_counted_before_zipfile_reads_it(
    tmp_path: Path,
) -> None:
    files = [(f"{i}", b"") for i in range(5000)]
    many = zip_file(tmp_path / "many.zip", files)
    real = zipfile.ZipFile.__init__
    opened = []

    def spy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        opened.append(1)
        return real(self, *args, **kwargs)

    zipfile.ZipFile.__init__ = spy  # type: ignore[method-assign]
    try:
        with pytest.raises(BundleError, match="more than 100 files"):
            inspect_bundle(many, BundleLimits(max_files=100))
    finally:
        zipfile.ZipFile.__init__ = real  # type: ignore[method-assign]
    assert opened == []


def test_not_an_archive_and_too_large_are_refused(tmp_path: Path) -> None:
    text = tmp_path / "train.py"
    text.write_text("print('hello')\n")
    assert refused(text, LIMITS, tmp_path) == "not a .tar.gz or .zip archive"
    with pytest.raises(BundleError, match="not a .tar.gz"):
        detect_format(text)
    import gzip

    plain_gz = tmp_path / "x.gz"
    plain_gz.write_bytes(gzip.compress(b"not a tar at all" * 100))
    assert "not a readable .tar.gz" in refused(plain_gz, LIMITS, tmp_path)
    big = tar_gz(tmp_path / "big.tar.gz", [("a.bin", os.urandom(20_000))])
    limits = BundleLimits(max_archive_bytes=10_000)
    assert "at most 10,000" in refused(big, limits, tmp_path)


def test_limits_come_from_the_settings(tmp_path: Path) -> None:
    settings = Settings(
        home=tmp_path, max_bundle_bytes=2048, max_bundle_unpacked_bytes=4096, max_bundle_files=3
    )
    assert BundleLimits.from_settings(settings) == BundleLimits(2048, 4096, 3)


# ---------------------------------------------------------------- accepted


def test_a_good_bundle_unpacks_with_safe_modes(tmp_path: Path) -> None:
    setuid = tarfile.TarInfo("bin/run.sh")
    setuid.mode = 0o4777
    path = tar_gz(
        tmp_path / "good.tar.gz",
        [
            ("./train.py", b"print('hi')\n"),
            ("pkg/__init__.py", b""),
            ("pkg/model.py", b"X = 1\n"),
            ("requirements.txt", b"numpy\n"),
            tar_link("pkg/alias.py", "model.py"),
            tar_link("pkg/copy.py", "pkg/model.py", tarfile.LNKTYPE),
            tar_link("top", "pkg/.."),
            (setuid, b"#!x"),
        ],
    )
    manifest = inspect_bundle(path, LIMITS)
    assert manifest.archive_format == "tar.gz"
    assert manifest.python_files == [
        "pkg/__init__.py", "pkg/alias.py", "pkg/copy.py", "pkg/model.py", "train.py"
    ]  # fmt: skip
    assert manifest.has_requirements and manifest.file_count == 8
    dest = tmp_path / "out"
    assert unpack_bundle(path, dest, LIMITS) == manifest
    assert (dest / "train.py").read_bytes() == b"print('hi')\n"
    assert os.readlink(dest / "pkg/alias.py") == "model.py"
    assert (dest / "pkg/copy.py").read_text() == "X = 1\n"
    assert not (dest / "pkg/copy.py").is_symlink()
    assert stat.S_IMODE((dest / "bin/run.sh").stat().st_mode) == 0o755  # no setuid
    assert stat.S_IMODE((dest / "train.py").stat().st_mode) == 0o644
    with pytest.raises(BundleError, match="not an empty folder"):
        unpack_bundle(path, dest, LIMITS)


def test_a_zip_bundle_with_an_inside_symlink_unpacks(tmp_path: Path) -> None:
    link = stat.S_IFLNK | 0o777
    path = zip_file(
        tmp_path / "b.zip",
        [("src/", b""), ("src/train.py", b"print(1)\n", stat.S_IFREG | 0o755), ("t.py", b"src/train.py", link)],
    )  # fmt: skip
    assert detect_format(path) == "zip"
    dest = tmp_path / "out"
    manifest = unpack_bundle(path, dest, LIMITS)
    assert manifest.python_files == ["src/train.py", "t.py"] and not manifest.has_requirements
    assert (dest / "t.py").read_text() == "print(1)\n"
    assert stat.S_IMODE((dest / "src/train.py").stat().st_mode) == 0o755


def test_an_unpack_that_fails_half_way_leaves_the_folder_empty(tmp_path: Path) -> None:
    """The second pass re-reads the archive; if it changed in between, what was written
    goes."""
    path = tar_gz(tmp_path / "a.tar.gz", [("a.py", b"x"), ("b.py", b"y")])
    swapped = tar_gz(tmp_path / "s.tar.gz", [("a.py", b"x"), tar_link("b.py", "a.py")])
    import shared.code_bundle as cb

    real = cb._extract_tar

    def swap_then_extract(_path: Path, dest: Path, plan: object) -> None:
        real(swapped, dest, plan)  # type: ignore[arg-type]

    cb._extract_tar = swap_then_extract  # type: ignore[assignment]
    try:
        with pytest.raises(BundleError, match="changed since"):
            unpack_bundle(path, tmp_path / "out", LIMITS)
    finally:
        cb._extract_tar = real  # type: ignore[assignment]
    assert list((tmp_path / "out").iterdir()) == []


# ---------------------------------------------------------------- packing


def make_project(root: Path) -> Path:
    (root / "pkg").mkdir(parents=True)
    (root / "train.py").write_text("import pkg\n")
    (root / "pkg" / "__init__.py").write_text("")
    (root / "pkg" / "__pycache__").mkdir()
    (root / "pkg" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / "checkpoints").mkdir()
    (root / "checkpoints" / "last.pt").write_bytes(b"weights")
    (root / "data").mkdir()
    (root / "data" / "train.csv").write_text("a,b\n")
    (root / "data" / "README.md").write_text("keep me\n")
    (root / "notes.log").write_text("log\n")
    (root / ".gitignore").write_text("data/*\n!data/README.md\n*.log\n")
    (root / "pkg" / ".gitignore").write_text("secret.py\n")
    (root / "pkg" / "secret.py").write_text("TOKEN = 'x'\n")
    return root


def packed_names(path: Path) -> list[str]:
    with tarfile.open(path, "r:gz") as tar:
        return tar.getnames()


def test_packing_is_deterministic(tmp_path: Path) -> None:
    root = make_project(tmp_path / "proj")
    first = pack_directory(root, tmp_path / "a.tar.gz", 10_000_000)
    # Times, permissions' group/other bits and the owner do not count; content does.
    later = time.time() + 3600
    for path in root.rglob("*"):
        os.utime(path, (later, later), follow_symlinks=False)
    os.chmod(root / "train.py", 0o664)
    second = pack_directory(root, tmp_path / "b.tar.gz", 10_000_000)
    assert second.sha256 == first.sha256 == sha256_file(first.path)
    assert (tmp_path / "a.tar.gz").read_bytes() == (tmp_path / "b.tar.gz").read_bytes()
    (root / "train.py").write_text("import pkg  # changed\n")
    assert pack_directory(root, tmp_path / "c.tar.gz", 10_000_000).sha256 != first.sha256
    os.chmod(root / "train.py", 0o755)  # the executable bit is content
    modes = pack_directory(root, tmp_path / "d.tar.gz", 10_000_000)
    with tarfile.open(modes.path, "r:gz") as tar:
        info = tar.getmember("train.py")
        assert (info.mode, info.uid, info.gid, info.uname, info.mtime) == (
            0o755,
            0,
            0,
            "",
            315532800,
        )


def test_packing_honours_ignore_files_and_defaults(tmp_path: Path) -> None:
    root = make_project(tmp_path / "proj")
    packed = pack_directory(root, tmp_path / "p.tar.gz", 10_000_000)
    names = packed_names(packed.path)
    assert names == [
        ".gitignore", "data", "data/README.md", "pkg", "pkg/.gitignore", "pkg/__init__.py",
        "train.py",
    ]  # fmt: skip
    assert packed.file_count == 5
    # .trainyardignore: more excludes, and re-including a default.
    (root / ".trainyardignore").write_text("!/checkpoints/\n.gitignore\n")
    names = packed_names(pack_directory(root, tmp_path / "q.tar.gz", 10_000_000).path)
    assert "checkpoints/last.pt" in names and ".gitignore" not in names
    assert "pkg/secret.py" not in names and ".git/HEAD" not in names
    # The archive written inside the folder is not packed into itself.
    inside = pack_directory(root, root / "bundle.tar.gz", 10_000_000)
    assert "bundle.tar.gz" not in packed_names(inside.path)
    manifest = inspect_bundle(inside.path, LIMITS)
    assert manifest.python_files == ["pkg/__init__.py", "train.py"]


def test_packing_stops_at_the_size_limit_naming_the_largest_files(tmp_path: Path) -> None:
    root = make_project(tmp_path / "proj")
    (root / "weights.bin").write_bytes(os.urandom(300_000))
    out = tmp_path / "big.tar.gz"
    with pytest.raises(BundleError) as exc:
        pack_directory(root, out, 100_000)
    assert "more than 100,000 bytes" in exc.value.message
    assert "weights.bin (300,000 bytes)" in exc.value.message
    assert not out.exists()
    (root / ".trainyardignore").write_text("*.bin\n")
    assert pack_directory(root, out, 100_000).size_bytes < 100_000


def test_packing_refuses_a_symlink_out_of_the_folder(tmp_path: Path) -> None:
    root = make_project(tmp_path / "proj")
    (tmp_path / "outside.txt").write_text("secret")
    (root / "inside.py").symlink_to("train.py")
    packed = pack_directory(root, tmp_path / "ok.tar.gz", 10_000_000)
    assert "inside.py" in packed_names(packed.path)
    (root / "leak.txt").symlink_to(tmp_path / "outside.txt")
    with pytest.raises(BundleError, match="leak.txt is a symlink .* outside the folder"):
        pack_directory(root, tmp_path / "bad.tar.gz", 10_000_000)
    assert not (tmp_path / "bad.tar.gz").exists()


def test_the_second_and_third_lines_hold_without_the_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With our symlink rule switched off, tarfile's data filter refuses a tar's link
    out, and the walk over the unpacked tree refuses a zip's."""
    import shared.code_bundle as cb

    monkeypatch.setattr(cb._Plan, "_resolve", lambda self, link: None)
    out = tar_gz(tmp_path / "t.tar.gz", [("ok.py", b"x"), tar_link("l", "../../etc")])
    with pytest.raises(BundleError, match="'l'.*outside"):
        unpack_bundle(out, tmp_path / "t", LIMITS)
    assert list((tmp_path / "t").iterdir()) == []
    link = stat.S_IFLNK | 0o777
    zipped = zip_file(tmp_path / "z.zip", [("ok.py", b"x"), ("l", b"/etc", link)])
    with pytest.raises(BundleError, match="symlink 'l' points outside"):
        unpack_bundle(zipped, tmp_path / "z", LIMITS)
    assert list((tmp_path / "z").iterdir()) == []
