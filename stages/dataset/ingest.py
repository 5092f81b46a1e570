"""The canonical images.zip, both ways: a listed image source -> images.zip, and its members -> (split, class).

The listing (stages/dataset/archives.py) has its layout checked (`train/<class>/*` + `test/<class>/*`, or only
`<class>/*`, optionally inside one wrapping top folder), and its pictures are copied, without decoding, into one
uncompressed zip with members `train|test|all/<class>/<path>`, sorted, with fixed dates: the same pictures always
give the same bytes, whatever the archive type, file order or timestamps. normalize reads the members back with
member_layout, so the layout is written and parsed here, in one place.
"""

from __future__ import annotations

import contextlib
import posixpath
import zipfile
from pathlib import Path
from typing import Any, Callable

from stages.base.runtime import PipelineError, file_digest, progress
from stages.dataset.archives import ArchiveLimits, Listing, Reader, list_source
from stages.dataset.imagefiles import IMAGE_EXTENSIONS

SPLIT_FOLDERS = ("train", "test", "all")  # the top folders of images.zip; `all` holds a flat source, not yet split
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_EXPECTED_LAYOUT = ("train/<class>/<images> and test/<class>/<images> (optionally inside one top folder), "
                    "or only <class>/<images> folders")

Members = dict[str, Reader]  # canonical member name -> a function that reads the picture's bytes


def ingest(source: Path, label: str, images_zip: Path, sniff: bool,
           limits: ArchiveLimits = ArchiveLimits()) -> dict[str, Any]:
    """Copy the pictures of the folder or archive `source` (named `label` in messages) into `images_zip`; return
    what source.json records about them. `sniff`: tell the archive type from the content when its name has no
    known extension (a URL's last path part often has none)."""
    with contextlib.ExitStack() as stack:  # keeps an archive (and a tar's spool file) open until the copy is done
        listing = list_source(source, label, stack, sniff, limits, spool_dir=images_zip.parent)
        layout, members, classes = _layout(listing)
        with progress(len(members), "copy images") as bar:
            write_canonical_zip(images_zip, members, bar.update)
    splits = [name.split("/", 1)[0] for name in members]
    counts = {split: splits.count(split) for split in SPLIT_FOLDERS if split in splits}
    info = {"layout": layout, "classes": classes, "images": counts, "ignored_files": listing.ignored,
            "images_zip_sha256": file_digest(images_zip)}
    if listing.special:  # only then: an ordinary source keeps the very same source.json
        info["ignored_special_files"] = listing.special
    return info


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


def member_layout(path: Path, names: list[str]) -> tuple[list[str], list[str]]:
    """(split, class) of each member name train|test|all/<class>/<file> of images.zip at `path`, checked: a
    images.zip made some other way is refused here, before anything is decoded."""
    member_splits, member_classes = [], []
    for name in names:
        parts = name.split("/")
        if len(parts) < 3 or parts[0] not in SPLIT_FOLDERS:
            raise PipelineError(f"{path}: unexpected member {name!r} (expected train|test|all/<class>/<file>); "
                                f"rerun the download stage")
        member_splits.append(parts[0])
        member_classes.append(parts[1])
    if set(member_splits) not in ({"train", "test"}, {"all"}):
        raise PipelineError(f"{path}: expected train/ and test/ members or only all/ members, found "
                            f"{', '.join(sorted(set(member_splits)))}; rerun the download stage")
    return member_splits, member_classes


# ---------------------------------------------------------------- layout


def _layout(listing: Listing) -> tuple[str, Members, list[str]]:
    """Check the folder structure and map canonical member names (train|test|all/<class>/<path>) to readers.
    Returns (layout 'train/test' or 'flat', members, sorted class names)."""
    label = listing.label
    files = sorted(listing.files)
    dirs = _all_folders(listing, files)
    if not files:
        raise PipelineError(f"{label}: no image files found ({', '.join(sorted(IMAGE_EXTENSIONS))}); expected "
                            f"{_EXPECTED_LAYOUT}{_found_instead(dirs, listing)}")
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


def _all_folders(listing: Listing, files: list[str]) -> set[str]:
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


def _split_members(listing: Listing, prefix: str, tops: list[str], inner_files: list[str],
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


def _flat_members(listing: Listing, prefix: str, inner_files: list[str],
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


def _found_instead(dirs: set[str], listing: Listing) -> str:
    """What the source holds instead of pictures in the expected layout, so the error shows what to move."""
    tops = sorted({d.split("/")[0] + "/" for d in dirs})
    found = f"; found folders: {', '.join(tops[:10])}" if tops else "; found no folders"
    return found + (f" and {listing.ignored} other files (not images, hidden or system files)"
                    if listing.ignored else "")
