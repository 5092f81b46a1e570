"""List a folder, zip or tar of pictures safely within data.limits, without extracting anything.

A listing maps each picture's relative path to a function that reads its bytes; stages/dataset/ingest.py turns it
into images.zip. Member names that could land outside the target are refused, links are checked and then skipped,
hidden and system files and non-images are ignored. The member checks (checked_members, check_member_name,
check_link_target) also serve the CIFAR-10 tarball the download stage extracts.

Limits (`ArchiveLimits`, from params `data.limits`): an archive holds at most `archive_files` members and unpacks
to at most `archive_gb` all together; one picture (member or file) is at most `image_mb`; a zip member, a whole
zip and a whole compressed tar unpack to at most `compression_ratio` times their packed size, checked only above
1 MiB unpacked (small flat images compress a lot, harmlessly). Each source over a limit is refused by name, from
the headers, before its pictures are read; no read goes past the size a header declares (zipfile and tarfile stop
there), so a lying header cannot make a member bigger. A zip is read member by member; a tar lazily: an
uncompressed one member by member, a compressed one (no random access) in one streaming pass that copies each
picture into an unnamed temporary file beside images.zip, never into memory.

Folder sources: only regular files are read. A link is followed when it resolves to a regular file or a folder (a
linked class folder is a class like any other); anything else (a FIFO, a device, a socket, a broken link, a link
loop) is skipped, counted in `ignored_files`, listed with its reason in `ignored_special_files` and warned about,
as are a tar's FIFO and device entries. A folder's image files count against `archive_files` and `archive_gb` as
an archive's members do. Links inside archives are never followed (checked, then skipped). Names must be valid
UTF-8 (images.zip stores UTF-8): a file or folder named in another encoding (made on a latin-1 system) is refused
by name, to be renamed.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import lzma
import os
import posixpath
import re
import shutil
import stat
import sys
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from stages.base.runtime import PipelineError, human_size
from stages.dataset.imagefiles import byte_limit, is_image_name, over_byte_limit
from stages.dataset.images import DecodeLimits

_JUNK_FILES = frozenset({"thumbs.db", "desktop.ini"})
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_RATIO_FLOOR = 1 << 20  # unpacked bytes below which the compression ratio is not checked
_LINK_TARGET_BYTES = 4096  # a zip symlink's target is a path (at most PATH_MAX); its declared size is not trusted
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz: the compressions tarfile opens
_SPECIAL_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
                  stat.S_IFSOCK: "a socket"}
_TAR_SPECIAL_KINDS = {tarfile.FIFOTYPE: "a FIFO", tarfile.CHRTYPE: "a character device",
                      tarfile.BLKTYPE: "a block device"}
_WARN_LISTED = 5  # special files named in the warning line; source.json lists them all

Reader = Callable[[], bytes]  # reads one picture's bytes when it is copied


@dataclass(frozen=True)
class ArchiveLimits:
    """What one image source may unpack to (params data.limits). The defaults refuse only bombs: CIFAR-10 as
    JPEGs is 60,000 members and 150 MB, a 12 MP phone photo 3-8 MB."""
    max_files: int = 1_000_000
    max_total_bytes: int = 64 * 2**30
    max_member_bytes: int = 100 * 2**20
    max_ratio: float = 200.0

    @classmethod
    def from_params(cls, data: dict[str, Any]) -> ArchiveLimits:
        """From params.yaml's data.limits (archive_files, archive_gb, image_mb, compression_ratio)."""
        limits = data["limits"]
        return cls(max_files=limits["archive_files"], max_total_bytes=round(limits["archive_gb"] * 2**30),
                   max_member_bytes=DecodeLimits.from_params(data).max_bytes, max_ratio=limits["compression_ratio"])


def list_source(source: Path, label: str, stack: contextlib.ExitStack, sniff: bool, limits: ArchiveLimits,
                spool_dir: Path) -> Listing:
    """The pictures of the folder or archive `source` (named `label` in messages), with what was skipped (warned
    about here). `stack` keeps an archive, and a compressed tar's spool file in `spool_dir`, open until the
    listing's readers have run. `sniff`: tell the archive type from the content when its name has no known
    extension (a URL's last path part often has none)."""
    if source.is_dir():
        listing = _list_folder(source, label, limits)
    else:
        listing = _list_archive(source, label, stack, sniff, limits, spool_dir)
    _warn_special(listing)
    return listing


# ---------------------------------------------------------------- archive safety


def checked_members(tar: tarfile.TarFile, label: str | Path) -> Iterator[tuple[str, tarfile.TarInfo]]:
    """Each member with its checked relative name; PipelineError for a name or link that points outside."""
    for member in tar:
        name = check_member_name(member.name, label)
        if member.issym() or member.islnk():
            check_link_target(name, member.linkname, label, hard=member.islnk())
        yield name, member


def check_member_name(name: str, archive: str | Path) -> str:
    """An archive member's name as a relative posix path; PipelineError if it could land outside the target."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or re.match(r"[A-Za-z]:", posix):
        raise PipelineError(f"{archive}: member {name!r} has an absolute path; refusing an archive that would "
                            f"write outside its target folder")
    if ".." in posix.split("/"):
        raise PipelineError(f"{archive}: member {name!r} contains '..'; refusing an archive that would write "
                            f"outside its target folder")
    return posix


def check_link_target(name: str, target: str, archive: str | Path, hard: bool = False) -> None:
    """Refuse a link member pointing outside the archive (a symlink is relative to its folder, a tar hardlink
    to the archive root)."""
    posix = target.replace("\\", "/")
    resolved = posixpath.normpath(posixpath.join("" if hard else posixpath.dirname(name), posix))
    if posix.startswith("/") or re.match(r"[A-Za-z]:", posix) or resolved == ".." or resolved.startswith("../"):
        raise PipelineError(f"{archive}: member {name!r} is a link to {target!r}, outside the archive; "
                            f"refusing it")


def path_parts(path: str) -> list[str]:
    """A relative path's folder and file names, without empty and '.' parts ('a//./b' and 'a/b' are the same)."""
    return [part for part in path.replace("\\", "/").split("/") if part not in ("", ".")]


class _Budget:
    """One source checked against the limits as its headers come; the error names the archive or file and the
    param to raise."""

    def __init__(self, label: str, limits: ArchiveLimits, packed: int | None, folder: bool = False) -> None:
        self.label = label
        self.limits = limits
        self.packed = packed  # the archive file's size, where the ratio applies to it as a whole
        self.folder = folder  # a folder source: its image files count as an archive's members
        self.members = 0

    def count(self, members: int = 1) -> None:
        self.members += members
        if self.members > self.limits.max_files:
            what = "image files" if self.folder else "members"
            raise PipelineError(f"{self.label}: holds more than {self.limits.max_files:,} {what}, over the limit "
                                f"data.limits.archive_files; raise it if the {'folder' if self.folder else 'archive'} "
                                f"is genuine")

    def unpacked(self, total: int, member: str) -> None:
        """`total`: what the archive unpacks to up to the end of `member` (a folder: its image files so far)."""
        if total > self.limits.max_total_bytes:
            limit = f"{self.limits.max_total_bytes / 2**30:g} GB"
            what = (f"its image files add up to more than {limit} (reached at {member!r})" if self.folder else
                    f"unpacks to more than {limit} (reached at member {member!r})")
            raise PipelineError(f"{self.label}: {what}, over the limit data.limits.archive_gb; raise it if the "
                                f"{'folder' if self.folder else 'archive'} is genuine")
        if self.packed is not None and _over_ratio(total, self.packed, self.limits.max_ratio):
            raise PipelineError(f"{self.label}: unpacks to {human_size(total)} or more from "
                                f"{human_size(self.packed)} (reached at member {member!r}): "
                                f"{_ratio_refusal(total, self.packed, self.limits)}")

    def picture(self, what: str, size: int, packed: int | None = None) -> None:
        """One picture to be copied, named `what`; `packed`: its compressed size (a zip member)."""
        if size > self.limits.max_member_bytes:
            raise PipelineError(f"{what}: {over_byte_limit(size, self.limits.max_member_bytes)}; raise it, or "
                                f"remove the file")
        if packed is not None and _over_ratio(size, packed, self.limits.max_ratio):
            raise PipelineError(f"{what}: unpacks to {human_size(size)} from {human_size(packed)}: "
                                f"{_ratio_refusal(size, packed, self.limits)}")


def _over_ratio(unpacked: int, packed: int, ratio: float) -> bool:
    return unpacked > _RATIO_FLOOR and unpacked > ratio * max(packed, 1)


def _ratio_refusal(unpacked: int, packed: int, limits: ArchiveLimits) -> str:
    return (f"{unpacked / max(packed, 1):,.0f} times its packed size, over data.limits.compression_ratio "
            f"{limits.max_ratio:g} (a decompression bomb?); raise data.limits.compression_ratio if the archive is "
            f"genuine")


# ---------------------------------------------------------------- listing


class Listing:
    """The image files of a source: relative posix path -> a function that reads its bytes; the folders seen
    (to find empty class folders); how many files were ignored (hidden, system, not an image, not a regular
    file) and, for the entries that are not regular files or folders, why."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.files: dict[str, Reader] = {}
        self.dirs: set[str] = set()
        self.ignored = 0
        self.special: list[dict[str, str]] = []

    def add_file(self, path: str, reader: Reader) -> None:
        if not is_picture(path):
            self.ignored += 1
            return
        self._check_utf8(path)
        name = "/".join(path_parts(path))
        if name in self.files:
            raise PipelineError(f"{self.label}: {name} appears twice in the archive")
        self.files[name] = reader

    def add_dir(self, path: str) -> None:
        parts = path_parts(path)
        if parts and not _hidden(parts):
            self._check_utf8(path)
            self.dirs.add("/".join(parts))

    def skip(self, path: str, reason: str) -> None:
        self.ignored += 1
        self.special.append({"file": _printable(path), "reason": reason})

    def _check_utf8(self, path: str) -> None:
        """Names come from the OS or a tar header with undecodable bytes kept as surrogates; zip needs UTF-8."""
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            raise PipelineError(f"{self.label}: {_printable(path)}: the name is not valid UTF-8 (made on a system "
                                f"with another encoding, such as latin-1; the undecodable bytes are shown as \\x..);"
                                f" rename it with UTF-8 characters only (for a folder, `convmv -f latin1 -t utf8 -r "
                                f"--notest FOLDER` does it), since images.zip and the class names store UTF-8"
                                ) from None


def is_picture(path: str) -> bool:
    """Whether a file of the source is a picture to copy: an image file name, neither hidden nor a system file.
    Only pictures count against the limits, so they are checked before the listing takes them."""
    parts = path_parts(path)
    return bool(parts) and not _hidden(parts) and is_image_name(parts[-1]) and parts[-1].lower() not in _JUNK_FILES


def _hidden(parts: list[str]) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in parts)


def _printable(name: str) -> str:
    """A name read with undecodable bytes (surrogate escapes) shown with those bytes as \\xNN."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _warn_special(listing: Listing) -> None:
    if not listing.special:
        return
    shown = ", ".join(f"{entry['file']} ({entry['reason']})" for entry in listing.special[:_WARN_LISTED])
    more = len(listing.special) - _WARN_LISTED
    print(f"warning: {listing.label}: skipped {len(listing.special)} entries that are neither regular files nor "
          f"folders (nor links to one): {shown}{f' and {more} more' if more > 0 else ''}; source.json lists them "
          f"under ignored_special_files", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- folders


def _list_folder(root: Path, label: str, limits: ArchiveLimits) -> Listing:
    """Walk the folder depth first in sorted order. Links are followed to regular files and folders only, never
    into a folder that contains the link (a loop); hidden folders are not walked."""
    listing, budget = Listing(label), _Budget(label, limits, packed=None, folder=True)
    pending = [("", root, frozenset({_identity(os.stat(root))}))]
    total = 0
    while pending:
        relative, folder, ancestors = pending.pop()
        subfolders = []
        for entry in _entries(folder):
            path = f"{relative}/{entry.name}" if relative else entry.name
            if _hidden([entry.name]):
                # ignored_files counts files: a hidden folder is one entry, and not walked to count what it holds
                listing.ignored += 0 if entry.is_dir() else 1
                continue
            target = _follow(entry, ancestors)
            if isinstance(target, str):
                listing.skip(path, target)
            elif stat.S_ISDIR(target.st_mode):
                listing.add_dir(path)
                subfolders.append((path, Path(entry.path), ancestors | {_identity(target)}))
            else:
                if is_picture(path):
                    budget.picture(_printable(entry.path), target.st_size)
                    budget.count()
                    total += target.st_size
                    budget.unpacked(total, _printable(path))
                listing.add_file(path, functools.partial(_read_file, Path(entry.path), limits.max_member_bytes))
        pending.extend(reversed(subfolders))
    return listing


def _identity(info: os.stat_result) -> tuple[int, int]:
    return info.st_dev, info.st_ino


def _entries(folder: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as scan:
            return sorted(scan, key=lambda entry: entry.name)
    except OSError as error:
        raise PipelineError(f"{_printable(str(folder))}: cannot list folder ({error.strerror or error})") from None


def _follow(entry: os.DirEntry[str], ancestors: frozenset[tuple[int, int]]) -> os.stat_result | str:
    """The stat of the entry, or of what it links to, when that is a regular file or a folder outside the chain
    of `ancestors`; otherwise why the entry is skipped. (os.stat, not entry.stat: only it has inode numbers on
    Windows.) Nothing is opened, so a FIFO cannot block."""
    link = entry.is_symlink()
    try:
        info = os.stat(entry.path)
    except OSError as error:
        if not link:
            return f"cannot be read ({error.strerror or error})"
        if error.errno == errno.ELOOP:
            return "a link loop"
        return "a broken link" if error.errno == errno.ENOENT else f"a link that cannot be followed ({error.strerror})"
    if stat.S_ISREG(info.st_mode) or (stat.S_ISDIR(info.st_mode) and _identity(info) not in ancestors):
        return info
    kind = "a folder that contains it (a loop)" if stat.S_ISDIR(info.st_mode) else _SPECIAL_KINDS.get(
        stat.S_IFMT(info.st_mode), "not a regular file")
    return f"a link to {kind}" if link else kind


def _read_file(path: Path, max_bytes: int) -> bytes:
    """A regular file's bytes, at most `max_bytes`. Opened without blocking and checked again once open: the
    entry may have been replaced since it was listed (a FIFO would block, /dev/zero never ends)."""
    try:
        with open(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)),
                  "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise PipelineError(f"{_printable(str(path))}: no longer a regular file; rerun the download stage")
            data = handle.read(max_bytes + 1)
    except OSError as error:
        raise PipelineError(f"{_printable(str(path))}: cannot read file ({error.strerror or error})") from None
    if len(data) > max_bytes:
        raise PipelineError(f"{_printable(str(path))}: grew over {byte_limit(max_bytes)} while being read; raise "
                            f"it, or remove the file")
    return data


# ---------------------------------------------------------------- archives


def _list_archive(path: Path, label: str, stack: contextlib.ExitStack, sniff: bool, limits: ArchiveLimits,
                  spool_dir: Path) -> Listing:
    """List an archive without extracting it (its members are read when they are copied). The type comes from
    the file name; for a URL whose name has no known extension (`sniff`), from the content."""
    lowered = path.name.lower()
    if lowered.endswith(".zip") or (sniff and zipfile.is_zipfile(path)):
        try:
            archive = stack.enter_context(zipfile.ZipFile(path))
        except (zipfile.BadZipFile, OSError) as error:
            raise PipelineError(f"{label}: not a readable zip archive ({error})") from None
        return _list_zip(archive, label, _Budget(label, limits, packed=path.stat().st_size))
    if lowered.endswith(_TAR_SUFFIXES) or (sniff and _is_tar(path)):
        return _list_tar(path, label, stack, limits, spool_dir)
    raise PipelineError(f"{label}: unsupported archive type ({path.name}): expected a folder or a .zip, .tar, "
                        f".tar.gz or .tgz archive")


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except (OSError, EOFError):
        return False


def _list_zip(archive: zipfile.ZipFile, label: str, budget: _Budget) -> Listing:
    listing = Listing(label)
    members = archive.infolist()
    budget.count(len(members))  # the central directory is read already; it costs the archive's size, no more
    unpacked = 0
    for member in members:
        name = check_member_name(member.filename, label)
        if _is_link_mode(member.external_attr >> 16):
            target = _read_zip_member(archive, member, label, _LINK_TARGET_BYTES).decode("utf-8", "replace")
            check_link_target(name, target, label)
            listing.ignored += 1  # links inside the archive are not followed
        elif member.is_dir():
            listing.add_dir(name)
        else:
            if is_picture(name):  # first: a member over a limit is named as such, not only the archive
                budget.picture(f"{label}: member {member.filename!r}", member.file_size, member.compress_size)
            unpacked += member.file_size
            budget.unpacked(unpacked, member.filename)
            listing.add_file(name, functools.partial(_read_zip_member, archive, member, label))
    return listing


def _is_link_mode(mode: int) -> bool:
    return (mode & 0o170000) == 0o120000


def _read_zip_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo, label: str, limit: int = -1) -> bytes:
    """The member's bytes (at most `limit`): zipfile stops at the size the member declares, and checks its CRC."""
    try:
        with archive.open(member) as handle:
            return handle.read(limit)
    except (zipfile.BadZipFile, RuntimeError, OSError, EOFError, NotImplementedError, zlib.error) as error:
        raise PipelineError(f"{label}: cannot read member {member.filename!r} ({error})") from None


def _list_tar(path: Path, label: str, stack: contextlib.ExitStack, limits: ArchiveLimits,
              spool_dir: Path) -> Listing:
    """List a tar in one pass over its headers. The unpacked size so far is where the current member's data ends
    in the uncompressed stream (headers included): tarfile frames members by the sizes their headers declare."""
    listing = Listing(label)
    try:
        compressed = _is_compressed(path)
        budget = _Budget(label, limits, packed=path.stat().st_size if compressed else None)
        archive = stack.enter_context(tarfile.open(path, "r:*"))
        spool = stack.enter_context(tempfile.TemporaryFile(dir=spool_dir)) if compressed else None
        for name, member in checked_members(archive, label):
            budget.count()
            budget.unpacked(member.offset_data + member.size, member.name)
            if member.issym() or member.islnk():
                listing.ignored += 1  # links inside the archive are not followed
            elif member.isdir():
                listing.add_dir(name)
            elif member.isfile() and not is_picture(name):
                listing.ignored += 1
            elif member.isfile():
                budget.picture(f"{label}: member {member.name!r}", member.size)
                listing.add_file(name, _tar_reader(archive, member, label, spool))
            else:  # a FIFO or device entry (tarfile reads a type it does not know as a regular file)
                listing.skip(name, _TAR_SPECIAL_KINDS.get(member.type, "not a regular file"))
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as error:
        raise PipelineError(f"{label}: not a readable tar archive ({error})") from None
    return listing


def _is_compressed(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(6).startswith(_COMPRESSED_MAGIC)


def _tar_reader(archive: tarfile.TarFile, member: tarfile.TarInfo, label: str,
                spool: IO[bytes] | None) -> Reader:
    """A reader of the member's bytes. From an uncompressed tar it reads later, seeking to the member; from a
    compressed one (where seeking back means decompressing again from the start) the bytes are copied now, in
    stream order, to the end of the `spool` file, and read back from there."""
    if spool is None:
        return functools.partial(_read_tar_member, archive, member, label)
    spool.seek(0, os.SEEK_END)
    start = spool.tell()
    with archive.extractfile(member) as handle:
        shutil.copyfileobj(handle, spool)
    return functools.partial(_read_spooled, spool, start, member.size)


def _read_tar_member(archive: tarfile.TarFile, member: tarfile.TarInfo, label: str) -> bytes:
    try:
        with archive.extractfile(member) as handle:
            return handle.read()
    except (tarfile.TarError, EOFError, OSError) as error:
        raise PipelineError(f"{label}: cannot read member {member.name!r} ({error})") from None


def _read_spooled(spool: IO[bytes], start: int, size: int) -> bytes:
    spool.seek(start)
    return spool.read(size)
