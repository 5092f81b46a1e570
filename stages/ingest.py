"""Image-folder ingestion: a folder or a .zip/.tar/.tar.gz/.tgz archive of pictures -> the canonical images.zip.

The source is listed without extracting anything (member names that could land outside the target are refused,
links are checked and then skipped, hidden and system files and non-images are ignored), its layout is checked
(`train/<class>/*` + `test/<class>/*`, or only `<class>/*`, optionally inside one wrapping top folder), and the
pictures are copied, without decoding, into one uncompressed zip with members `train|test|all/<class>/<path>`,
sorted, with fixed dates: the same pictures always give the same bytes, whatever the archive type, file order or
timestamps. The tar-safety checks (checked_members, check_member_name, check_link_target) serve every archive the
download stage opens."""

from __future__ import annotations

import contextlib
import functools
import lzma
import os
import posixpath
import re
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

from stages.common import PipelineError, file_digest
from stages.images import IMAGE_EXTENSIONS, is_image_name, progress

_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_JUNK_FILES = frozenset({"thumbs.db", "desktop.ini"})
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_EXPECTED_LAYOUT = ("train/<class>/<images> and test/<class>/<images> (optionally inside one top folder), "
                    "or only <class>/<images> folders")

Members = dict[str, Callable[[], bytes]]  # canonical member name -> a function that reads the picture's bytes


def ingest(source: Path, label: str, images_zip: Path, sniff: bool) -> dict[str, Any]:
    """Copy the pictures of the folder or archive `source` (named `label` in messages) into `images_zip`; return
    what source.json records about them. `sniff`: tell the archive type from the content when its name has no
    known extension (a URL's last path part often has none)."""
    with contextlib.ExitStack() as stack:  # keeps a zip source open until its members are copied
        listing = _list_folder(source, label) if source.is_dir() else _list_archive(source, label, stack, sniff)
        layout, members, classes = _layout(listing)
        with progress(len(members), "copy images") as bar:
            write_canonical_zip(images_zip, members, bar.update)
    splits = [name.split("/", 1)[0] for name in members]
    counts = {split: splits.count(split) for split in ("train", "test", "all") if split in splits}
    return {"layout": layout, "classes": classes, "images": counts, "ignored_files": listing.ignored,
            "images_zip_sha256": file_digest(images_zip)}


def write_canonical_zip(path: Path, members: Members, advance: Callable[[int], object] = lambda n: None) -> None:
    """One deterministic uncompressed zip: sorted names, fixed dates and attributes, so the same pictures always
    give the same bytes (and DVC sees no change when nothing changed). JPEG/PNG do not compress further."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name in sorted(members):
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_STORED
            info.create_system = 3  # unix; the default depends on the OS that writes the file
            info.external_attr = 0o100644 << 16
            archive.writestr(info, members[name]())
            advance(1)


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


# ---------------------------------------------------------------- listing


class _Listing:
    """The image files of a source: relative posix path -> a function that reads its bytes; the folders seen
    (to find empty class folders); and how many files were ignored (hidden, system or not an image)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.files: Members = {}
        self.dirs: set[str] = set()
        self.ignored = 0

    @staticmethod
    def wanted(path: str) -> bool:
        parts = path_parts(path)
        return bool(parts) and not _hidden(parts) and is_image_name(parts[-1]) and parts[-1].lower() not in _JUNK_FILES

    def add_file(self, path: str, reader: Callable[[], bytes]) -> None:
        if not self.wanted(path):
            self.ignored += 1
            return
        name = "/".join(path_parts(path))
        if name in self.files:
            raise PipelineError(f"{self.label}: {name} appears twice in the archive")
        self.files[name] = reader

    def add_dir(self, path: str) -> None:
        parts = path_parts(path)
        if parts and not _hidden(parts):
            self.dirs.add("/".join(parts))


def _hidden(parts: list[str]) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in parts)


def _list_folder(root: Path, label: str) -> _Listing:
    listing = _Listing(label)
    for current, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(name for name in dirnames if not _hidden([name]))
        relative = Path(current).relative_to(root).as_posix()
        relative = "" if relative == "." else relative
        if relative:
            listing.add_dir(relative)
        for filename in filenames:
            file_path = Path(current) / filename
            listing.add_file(posixpath.join(relative, filename), functools.partial(_read_file, file_path))
    return listing


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise PipelineError(f"{path}: cannot read file ({error.strerror or error})") from None


def _list_archive(path: Path, label: str, stack: contextlib.ExitStack, sniff: bool) -> _Listing:
    """List an archive without extracting it: a zip is read member by member later; a tar (often compressed,
    so without cheap random access) is read into memory in one pass. The type comes from the file name; for a
    URL whose name has no known extension (`sniff`), from the content."""
    lowered = path.name.lower()
    if lowered.endswith(".zip") or (sniff and zipfile.is_zipfile(path)):
        try:
            archive = stack.enter_context(zipfile.ZipFile(path))
        except (zipfile.BadZipFile, OSError) as error:
            raise PipelineError(f"{label}: not a readable zip archive ({error})") from None
        return _list_zip(archive, label)
    if lowered.endswith(_TAR_SUFFIXES) or (sniff and _is_tar(path)):
        return _list_tar(path, label)
    raise PipelineError(f"{label}: unsupported archive type ({path.name}): expected a folder or a .zip, .tar, "
                        f".tar.gz or .tgz archive")


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except (OSError, EOFError):
        return False


def _list_zip(archive: zipfile.ZipFile, label: str) -> _Listing:
    listing = _Listing(label)
    for member in archive.infolist():
        name = check_member_name(member.filename, label)
        if _is_link_mode(member.external_attr >> 16):
            target = _read_zip_member(archive, member, label).decode("utf-8", "replace")
            check_link_target(name, target, label)
            listing.ignored += 1  # links inside the archive are not followed
        elif member.is_dir():
            listing.add_dir(name)
        else:
            listing.add_file(name, functools.partial(_read_zip_member, archive, member, label))
    return listing


def _is_link_mode(mode: int) -> bool:
    return (mode & 0o170000) == 0o120000


def _read_zip_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo, label: str) -> bytes:
    try:
        return archive.read(member)
    except (zipfile.BadZipFile, RuntimeError, OSError, EOFError, NotImplementedError, zlib.error) as error:
        raise PipelineError(f"{label}: cannot read member {member.filename!r} ({error})") from None


def _list_tar(path: Path, label: str) -> _Listing:
    listing = _Listing(label)
    try:
        with tarfile.open(path, "r:*") as archive:
            for name, member in checked_members(archive, label):
                if member.issym() or member.islnk():
                    listing.ignored += 1  # links inside the archive are not followed
                elif member.isdir():
                    listing.add_dir(name)
                elif member.isfile():
                    data = archive.extractfile(member).read() if listing.wanted(name) else b""
                    listing.add_file(name, functools.partial(bytes, data))
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as error:
        raise PipelineError(f"{label}: not a readable tar archive ({error})") from None
    return listing


# ---------------------------------------------------------------- layout


def _layout(listing: _Listing) -> tuple[str, Members, list[str]]:
    """Check the folder structure and map canonical member names (train|test|all/<class>/<path>) to readers.
    Returns (layout 'train/test' or 'flat', members, sorted class names)."""
    label = listing.label
    files = sorted(listing.files)
    dirs = _all_folders(listing, files)
    if not files:
        raise PipelineError(f"{label}: no image files found ({', '.join(sorted(IMAGE_EXTENSIONS))}); expected "
                            f"{_EXPECTED_LAYOUT}{_found(dirs, listing)}")
    prefix = _wrapper_prefix(files, dirs)
    inner_files = [name[len(prefix):] for name in files]
    inner_dirs = {d[len(prefix):] for d in dirs if d.startswith(prefix) and d != prefix.rstrip("/")}
    for name in inner_files:
        if "/" not in name:
            raise PipelineError(f"{label}: {prefix}{name} is not inside a class folder; expected "
                                f"{_EXPECTED_LAYOUT}")
    tops = sorted({name.split("/")[0] for name in inner_files} | {d.split("/")[0] for d in inner_dirs})
    if {top.lower() for top in tops} & {"train", "test"}:
        layout, (members, classes) = "train/test", _split_members(listing, prefix, tops, inner_files, inner_dirs)
    else:
        layout, (members, classes) = "flat", _flat_members(listing, prefix, inner_files, inner_dirs)
    if len(classes) < 2:
        raise PipelineError(f"{label}: found {len(classes)} class folder ({', '.join(classes)}); at least 2 "
                            f"classes are needed; expected {_EXPECTED_LAYOUT}")
    return layout, members, classes


def _all_folders(listing: _Listing, files: list[str]) -> set[str]:
    """Every folder of the source: those listed, those holding an image, and all their ancestors."""
    dirs = set(listing.dirs) | {posixpath.dirname(name) for name in files} - {""}
    dirs |= {"/".join(d.split("/")[:i]) for d in list(dirs) for i in range(1, d.count("/") + 1)}
    return dirs


def _wrapper_prefix(files: list[str], dirs: set[str]) -> str:
    """'<top>/' when everything sits in one folder that wraps the layout, else ''."""
    tops = {name.split("/")[0] for name in files} | {d.split("/")[0] for d in dirs}
    if len(tops) == 1:
        (top,) = tops
        # One folder holding folders is a wrapper (e.g. cifar10-jpeg/train/...); one holding only images is a
        # single class folder, reported as such by _layout.
        if top.lower() not in ("train", "test") and any(name.count("/") >= 2 for name in files):
            return top + "/"
    return ""


def _split_members(listing: _Listing, prefix: str, tops: list[str], inner_files: list[str],
                   inner_dirs: set[str]) -> tuple[Members, list[str]]:
    """The train/test layout: members `train|test/<class>/<path>` and the classes, which both splits share."""
    label = listing.label
    if sorted(top.lower() for top in tops) != ["test", "train"]:
        raise PipelineError(f"{label}: found top-level folders {', '.join(prefix + t + '/' for t in tops)}; "
                            f"expected {_EXPECTED_LAYOUT}")
    members: Members = {}
    class_sets = {}
    for top in tops:
        split = top.lower()
        by_class = _classes(label, prefix + top + "/", [n[len(top) + 1:] for n in inner_files
                                                        if n.startswith(top + "/")],
                            {d[len(top) + 1:] for d in inner_dirs if d.startswith(top + "/")})
        class_sets[split] = sorted(by_class)
        for cls, names in by_class.items():
            for rest in names:
                members[f"{split}/{cls}/{rest}"] = listing.files[f"{prefix}{top}/{cls}/{rest}"]
    if class_sets["train"] != class_sets["test"]:
        only_train = sorted(set(class_sets["train"]) - set(class_sets["test"]))
        only_test = sorted(set(class_sets["test"]) - set(class_sets["train"]))
        raise PipelineError(f"{label}: train and test have different class folders (only in train: "
                            f"{', '.join(only_train) or '-'}; only in test: {', '.join(only_test) or '-'}); "
                            f"both need the same classes")
    return members, class_sets["train"]


def _flat_members(listing: _Listing, prefix: str, inner_files: list[str],
                  inner_dirs: set[str]) -> tuple[Members, list[str]]:
    """The flat layout: members `all/<class>/<path>` (normalize splits them by data.test_fraction)."""
    by_class = _classes(listing.label, prefix, inner_files, inner_dirs)
    members: Members = {}
    for cls, names in by_class.items():
        for rest in names:
            members[f"all/{cls}/{rest}"] = listing.files[f"{prefix}{cls}/{rest}"]
    return members, sorted(by_class)


def _classes(label: str, where: str, names: list[str], dirs: set[str]) -> dict[str, list[str]]:
    """Group `names` (paths below `where`) by class folder; every class folder must hold an image."""
    by_class: dict[str, list[str]] = {}
    for name in names:
        if "/" not in name:
            raise PipelineError(f"{label}: {where}{name} is not inside a class folder; expected {_EXPECTED_LAYOUT}")
        cls, rest = name.split("/", 1)
        by_class.setdefault(cls, []).append(rest)
    empty = sorted({d.split("/")[0] for d in dirs} - set(by_class))
    if empty:
        raise PipelineError(f"{label}: class folder {where}{empty[0]}/ has no image files (expected "
                            f"{', '.join(sorted(IMAGE_EXTENSIONS))}, any case)")
    return dict(sorted(by_class.items()))


def _found(dirs: set[str], listing: _Listing) -> str:
    tops = sorted({d.split("/")[0] + "/" for d in dirs})
    found = f"; found folders: {', '.join(tops[:10])}" if tops else "; found no folders"
    return found + (f" and {listing.ignored} other files (not images, hidden or system files)"
                    if listing.ignored else "")
