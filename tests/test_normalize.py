"""Image-folder sources through download + normalize (layouts, bad input, empty splits, decode limits, lazy
reading of images.zip, splits, statistics, determinism), the CIFAR-format path of normalize, and a small check on
the real CIFAR-10 JPEG copy when it is present."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
import threading
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from stages import download, normalize
from stages.dataset import cifar
from stages.base.runtime import PipelineError, run_stage
from stages.model.tensors import load_split

from imagefolders import (PALETTE, add_tar_member, image_bytes, make_image_folder, solid_image, tar_folder,
                          write_params, zip_folder, zip_symlink)
from repo_root import REPO_ROOT

# torchvision 0.29 deprecates its image decoders (in favour of TorchCodec); the pinned version still has them.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

REAL_ZIP = REPO_ROOT.parent / "shared" / "datasets" / "cifar10-jpeg.zip"
SPLIT_LAYOUT = {"train": {"cat": 6, "dog": 6, "fox": 6}, "test": {"cat": 2, "dog": 2, "fox": 2}}


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    work = tmp_path / "work"
    (work / "data" / "sources").mkdir(parents=True)
    monkeypatch.chdir(work)
    return work


def run(source: str, stats: str = "dataset", **data: Any) -> dict[str, Any]:
    """download + normalize with the repository's params, `data` keys overridden; returns meta.json."""
    params = write_params(Path.cwd(), source=source, **{"val_fraction": 0.0, **data})
    download.download(params)
    normalize.normalize({**params, "normalize": {"stats": stats}})
    meta = json.loads(Path("data/prepared/meta.json").read_text())
    return meta


def source_folder(layout: dict[str, Any], name: str = "pets", **kwargs: Any) -> Path:
    root = Path("data/sources") / name
    make_image_folder(root, layout, **kwargs)
    return root


def outputs() -> dict[str, str]:
    files = [*Path("data/prepared").iterdir(), Path("data/raw/images.zip"), Path("data/raw/source.json")]
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(files) if p.exists()}


# ---------------------------------------------------------------- layouts


def test_split_folder_gives_tensors_counts_and_summary(workdir: Path) -> None:
    source_folder(SPLIT_LAYOUT, size=(20, 14))
    meta = run("data/sources/pets", image_size=16)
    assert meta["classes"] == ["cat", "dog", "fox"] and meta["image_size"] == 16
    assert meta["splits"] == {"train": 18, "val": 0, "test": 6}
    assert meta["counts"]["test"] == {"cat": 2, "dog": 2, "fox": 2}
    assert meta["skipped"] == [] and meta["skipped_count"] == 0
    assert meta["source"]["kind"] == "images" and meta["source"]["layout"] == "train/test"
    assert meta["source"]["sha256"] is None and meta["source"]["images"] == {"train": 18, "test": 6}
    images, labels = load_split("data/prepared/train.pt")
    assert images.dtype == torch.uint8 and images.shape == (18, 3, 16, 16) and images.is_contiguous()
    assert labels.dtype == torch.int64 and labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    for label, color in enumerate(PALETTE[:3]):  # each class has its own colour in the generated folders
        assert images[labels == label][:, :, 8, 8].tolist() == [list(color)] * 6
    val_images, val_labels = load_split("data/prepared/val.pt")
    assert val_images.shape == (0, 3, 16, 16) and val_labels.shape == (0,)


def test_outputs_are_byte_identical_across_runs_and_archive_types(workdir: Path) -> None:
    folder = source_folder(SPLIT_LAYOUT, fmt="JPEG")
    run("data/sources/pets", val_fraction=0.25)
    first = outputs()
    run("data/sources/pets", val_fraction=0.25)
    assert outputs() == first
    # The same pictures as a zip with a wrapping folder, or as a tar.gz: the very same canonical data.
    zip_folder(folder, Path("data/sources/pets.zip"), prefix="pets-v1/")
    tar_folder(folder, Path("data/sources/pets.tar.gz"))
    shutil.rmtree(folder)
    for archive in ("data/sources/pets.zip", "data/sources/pets.tar.gz"):
        meta = run(archive, val_fraction=0.25)
        assert meta["source"]["sha256"] == hashlib.sha256(Path(archive).read_bytes()).hexdigest()
        changed = {name for name, digest in outputs().items() if digest != first[name]}
        assert changed == {"meta.json", "source.json"}, archive  # only the description of the source differs


def test_canonical_zip_is_sorted_stored_and_dated_1980(workdir: Path) -> None:
    source_folder(SPLIT_LAYOUT)
    run("data/sources/pets")
    with zipfile.ZipFile("data/raw/images.zip") as archive:
        infos = archive.infolist()
    names = [info.filename for info in infos]
    assert names == sorted(names) and names[0] == "test/cat/0000.png" and names[-1] == "train/fox/0005.png"
    assert {(info.compress_type, info.date_time, info.external_attr) for info in infos} == {
        (zipfile.ZIP_STORED, (1980, 1, 1, 0, 0, 0), 0o100644 << 16)}


def test_zip_with_wrapping_folder_and_junk_is_accepted(workdir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pictures"
    make_image_folder(folder, SPLIT_LAYOUT)
    junk = {"cifar-like/.DS_Store": b"x", "cifar-like/train/cat/Thumbs.db": b"x", "cifar-like/README.txt": b"hi",
            "cifar-like/train/dog/desktop.ini": b"x", "cifar-like/train/.hidden/0.png": b"x",
            "cifar-like/train/cat/._0000.png": b"resource fork", "__MACOSX/cifar-like/train/cat/._0000.png": b"x",
            "cifar-like/test/fox/notes.md": b"x"}
    zip_folder(folder, Path("data/sources/pets.zip"), prefix="cifar-like/", extra=junk)
    meta = run("data/sources/pets.zip")
    assert meta["classes"] == ["cat", "dog", "fox"] and meta["splits"]["train"] == 18
    assert meta["source"]["ignored_files"] == len(junk)


def test_flat_layout_inside_a_wrapping_folder(workdir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "animals"
    make_image_folder(folder, {"ant": 5, "bee": 5})
    meta = run(str(tar_folder(folder, Path("data/sources/animals.tar"), prefix="animals/", compression="")))
    assert meta["source"]["layout"] == "flat" and meta["classes"] == ["ant", "bee"]
    assert meta["splits"] == {"train": 8, "val": 0, "test": 2}


def test_hidden_and_non_image_files_in_a_folder_are_ignored(workdir: Path) -> None:
    root = source_folder({"train": {"cat": 2, "dog": 2}, "test": {"cat": 1, "dog": 1}})
    (root / ".DS_Store").write_bytes(b"x")
    (root / "train" / "cat" / "Thumbs.db").write_bytes(b"x")
    (root / "train" / "cat" / "labels.csv").write_text("a,b")
    (root / "train" / ".cache").mkdir()
    (root / "train" / ".cache" / "0.png").write_bytes(b"not read")
    (root / "__MACOSX").mkdir()
    (root / "__MACOSX" / "0.png").write_bytes(b"not read")
    (root / "train" / "dog" / "UPPER.PNG").write_bytes(image_bytes(solid_image((1, 2, 3)), "PNG"))
    meta = run("data/sources/pets")
    assert meta["counts"]["train"] == {"cat": 2, "dog": 3}  # UPPER.PNG counts
    assert meta["source"]["ignored_files"] == 3  # .DS_Store, Thumbs.db, labels.csv (hidden folders not walked)


def test_flat_folder_is_split_stratified_and_seeded(workdir: Path) -> None:
    source_folder({"ant": 10, "bee": 20, "cow": 5})
    meta = run("data/sources/pets", test_fraction=0.2, seed=1)
    assert meta["source"]["layout"] == "flat"
    assert meta["counts"]["test"] == {"ant": 2, "bee": 4, "cow": 1}
    assert meta["counts"]["train"] == {"ant": 8, "bee": 16, "cow": 4}
    first = outputs()
    run("data/sources/pets", test_fraction=0.2, seed=1)
    assert outputs() == first
    # Which files land in test depends on the seed: compare the noise-free but file-specific pixels.
    Path("data/sources/pets/bee/0000.png").write_bytes(image_bytes(solid_image((9, 9, 9)), "PNG"))
    held = {seed: _test_set_holds((9, 9, 9), run("data/sources/pets", test_fraction=0.2, seed=seed))
            for seed in range(8)}
    assert set(held.values()) == {True, False}


def _test_set_holds(color: tuple[int, int, int], meta: dict[str, Any]) -> bool:
    images, _ = load_split("data/prepared/test.pt")
    return bool((images[:, :, 0, 0] == torch.tensor(color, dtype=torch.uint8)).all(1).any())


def test_validation_split_is_stratified_and_seeded(workdir: Path) -> None:
    source_folder({"train": {"cat": 8, "dog": 12}, "test": {"cat": 1, "dog": 1}})
    meta = run("data/sources/pets", val_fraction=0.25, seed=0)
    assert meta["counts"]["val"] == {"cat": 2, "dog": 3} and meta["counts"]["train"] == {"cat": 6, "dog": 9}
    train_images, train_labels = load_split("data/prepared/train.pt")
    val_images, val_labels = load_split("data/prepared/val.pt")
    assert len(train_images) == 15 and val_labels.tolist() == [0, 0, 1, 1, 1]
    assert normalize.stratified_split(train_labels, 0.25, 0, "val")[1].tolist() != list(range(4))  # not just first


def test_dataset_and_fixed_statistics(workdir: Path) -> None:
    source_folder({"train": {"cat": 3, "dog": 3}, "test": {"cat": 1, "dog": 1}})
    meta = run("data/sources/pets", stats="dataset")
    images, _ = load_split("data/prepared/train.pt")
    pixels = images.double().div(255).permute(1, 0, 2, 3).reshape(3, -1)
    assert meta["stats"] == "dataset"
    assert meta["mean"] == pytest.approx(pixels.mean(1).tolist(), abs=1e-12)
    assert meta["std"] == pytest.approx(pixels.std(1, unbiased=False).tolist(), abs=1e-12)
    meta = run("data/sources/pets", stats="fixed")
    assert meta["stats"] == "fixed" and meta["mean"] == [0.5] * 3 and meta["std"] == [0.5] * 3


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("layout, message", [
    ({"train": {"cat": 2, "dog": 0}, "test": {"cat": 1, "dog": 1}},
     r"class folder train/dog/ has no image files"),
    ({"train": {"cat": 2}, "test": {"cat": 1}}, r"found 1 class folder \(cat\); at least 2 classes are needed"),
    ({"only": 3}, r"found 1 class folder \(only\); at least 2"),
    ({"train": {"cat": 2, "dog": 2}, "test": {"cat": 1, "emu": 1}},
     r"train and test have different class folders \(only in train: dog; only in test: emu\)"),
    ({"train": {"cat": 2, "dog": 2}}, r"found top-level folders train/; expected train/<class>/<images> and test"),
    ({"train": {"cat": 2, "dog": 2}, "test": {"cat": 1, "dog": 1}, "val": {"cat": 1, "dog": 1}},
     r"found top-level folders test/, train/, val/; expected"),
])
def test_bad_layouts_name_the_folder(workdir: Path, layout: dict[str, Any], message: str) -> None:
    source_folder(layout)
    with pytest.raises(PipelineError, match=r"^data/sources/pets: " + message):
        run("data/sources/pets")
    assert not Path("data/raw").exists()


def test_image_outside_a_class_folder(workdir: Path) -> None:
    root = source_folder({"cat": 2, "dog": 2})
    (root / "cover.jpg").write_bytes(image_bytes(solid_image((1, 2, 3)), "JPEG"))
    with pytest.raises(PipelineError, match=r"cover\.jpg is not inside a class folder; expected train/<class>"):
        run("data/sources/pets")


def test_archive_without_images_says_what_was_found(workdir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    (folder / "notes").mkdir(parents=True)
    (folder / "notes" / "a.txt").write_text("x")
    zip_folder(folder, Path("data/sources/docs.zip"))
    with pytest.raises(PipelineError, match=r"docs\.zip: no image files found .*expected train/<class>/<images>.*"
                                            r"found folders: notes/ and 1 other files"):
        run("data/sources/docs.zip")


def test_source_outside_data_sources_is_refused(workdir: Path, tmp_path: Path) -> None:
    make_image_folder(tmp_path / "elsewhere", {"cat": 2, "dog": 2})
    with pytest.raises(PipelineError, match=r"not cifar10, synthetic, an http\(s\)/file URL or a path inside "
                                            r"data/sources/.*ln -s .*DVC notices when their content changes"):
        run(str(tmp_path / "elsewhere"))
    with pytest.raises(PipelineError, match=r"data/sources/nothing not found"):
        run("data/sources/nothing")


def test_symlinked_source_inside_data_sources_works(workdir: Path, tmp_path: Path) -> None:
    make_image_folder(tmp_path / "elsewhere", {"cat": 5, "dog": 10})
    Path("data/sources/linked").symlink_to(tmp_path / "elsewhere")
    assert run("data/sources/linked")["counts"]["train"] == {"cat": 4, "dog": 8}


def test_unsupported_archive_type(workdir: Path) -> None:
    Path("data/sources/pets.rar").write_bytes(b"Rar!\x1a\x07\x00")
    with pytest.raises(PipelineError, match=r"unsupported archive type \(pets\.rar\): expected a folder or a \.zip"):
        run("data/sources/pets.rar")
    Path("data/sources/broken.zip").write_bytes(b"not a zip")
    with pytest.raises(PipelineError, match=r"broken\.zip: not a readable zip archive"):
        run("data/sources/broken.zip")


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_unsafe_archive_members_are_refused(workdir: Path, tmp_path: Path, kind: str) -> None:
    folder = tmp_path / "pictures"
    make_image_folder(folder, SPLIT_LAYOUT)
    if kind == "dotdot":
        archive = tar_folder(folder, Path("data/sources/pets.tar.gz"))
        add_tar_member(archive, "train/cat/../../../escape.png", image_bytes(solid_image((1, 1, 1)), "PNG"))
        expected = r"member 'train/cat/\.\./\.\./\.\./escape\.png' contains '\.\.'"
    elif kind == "absolute":
        archive = zip_folder(folder, Path("data/sources/pets.zip"), extra={"/tmp/escape.png": b"x"})
        expected = r"member '/tmp/escape\.png' has an absolute path"
    else:
        archive = zip_symlink(zip_folder(folder, Path("data/sources/pets.zip")), "train/cat/link.png",
                              "../../../../etc/passwd")
        expected = r"member 'train/cat/link\.png' is a link to '\.\./\.\./\.\./\.\./etc/passwd', outside"
    with pytest.raises(PipelineError, match=expected):
        run(str(archive))
    assert not Path("data/raw").exists()


def test_sha256_checks_archives_only(workdir: Path, tmp_path: Path) -> None:
    folder = source_folder(SPLIT_LAYOUT)
    with pytest.raises(PipelineError, match=r"data\.sha256: data/sources/pets is a folder; data\.sha256 verifies "
                                            r"archive files only"):
        run("data/sources/pets", sha256="0" * 64)
    archive = zip_folder(folder, Path("data/sources/pets.zip"))
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    with pytest.raises(PipelineError, match=rf"pets\.zip: SHA-256 {digest} does not match data\.sha256 0{{64}}"):
        run("data/sources/pets.zip", sha256="0" * 64)
    assert run("data/sources/pets.zip", sha256=digest.upper())["source"]["sha256"] == digest


def test_corrupt_image_raises_or_is_skipped(workdir: Path) -> None:
    root = source_folder(SPLIT_LAYOUT)
    (root / "train" / "dog" / "0003.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(PipelineError, match=r"train/dog/0003\.png: cannot read image .*data\.on_error: skip"):
        run("data/sources/pets")
    assert not Path("data/prepared").exists()
    meta = run("data/sources/pets", on_error="skip")
    assert meta["skipped_count"] == 1 and meta["skipped"][0]["file"] == "train/dog/0003.png"
    assert meta["counts"]["train"] == {"cat": 6, "dog": 5, "fox": 6}


def test_class_left_without_readable_images_is_an_error(workdir: Path) -> None:
    root = source_folder({"train": {"cat": 2, "dog": 1}, "test": {"cat": 1, "dog": 1}})
    (root / "train" / "dog" / "0000.png").write_bytes(b"broken")
    with pytest.raises(PipelineError, match=r"class 'dog' has no readable training image left"):
        run("data/sources/pets", on_error="skip")


def run_stage_lines(capsys: pytest.CaptureFixture, **data: Any) -> list[str]:
    """normalize as its command runs it (params.yaml with `data` keys, run_stage): exit status 2, no traceback;
    returns the stderr lines besides the progress bar's."""
    write_params(Path.cwd(), **{"val_fraction": 0.0, **data})
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_stage(normalize.main)
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    return [line for line in stderr.strip().splitlines() if not line.startswith("decode:")]


def test_an_empty_test_split_stops_normalize(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    root = source_folder(SPLIT_LAYOUT)
    run("data/sources/pets")
    before = outputs()
    for picture in (root / "test").rglob("*.png"):  # every test image unreadable, all skipped
        picture.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    params = write_params(Path.cwd(), source="data/sources/pets", on_error="skip", val_fraction=0.0)
    download.download(params)
    lines = run_stage_lines(capsys, source="data/sources/pets", on_error="skip")
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: data/raw/images.zip: the test split has no images: 6 unreadable images were "
                               "skipped (data.on_error: skip), e.g. test/cat/0000.png: ")
    assert lines[0].endswith("it needs at least one: fix or replace the unreadable files, or add pictures, in "
                             "data/sources/pets")
    after = outputs()
    assert {name: after[name] for name in ("meta.json", "test.pt", "train.pt", "val.pt")} == {
        name: before[name] for name in ("meta.json", "test.pt", "train.pt", "val.pt")}


def test_decode_limits_come_from_params(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    source_folder(SPLIT_LAYOUT, size=(20, 14))  # 280 pixels, 0.00028 megapixels each
    params = write_params(Path.cwd(), source="data/sources/pets")
    download.download(params)
    lines = run_stage_lines(capsys, source="data/sources/pets", **{"limits.image_megapixels": 0.0002})
    assert lines == ["error: test/cat/0000.png: cannot read image (20x14 pixels, over the limit of 0.0002 "
                     "megapixels per image (data.limits.image_megapixels)), in data/raw/images.zip (copied from "
                     "data/sources/pets); fix or remove the file, or set data.on_error: skip to leave unreadable "
                     "images out"]
    size = zipfile.ZipFile("data/raw/images.zip").getinfo("test/cat/0000.png").file_size
    lines = run_stage_lines(capsys, source="data/sources/pets", **{"limits.image_mb": 2**-16})  # 16 bytes
    assert lines == [f"error: data/raw/images.zip: member 'test/cat/0000.png' is {size:,} bytes, over the limit of "
                     f"{2**-16:g} MB per image file (data.limits.image_mb); rerun the download stage"]
    assert not Path("data/prepared").exists()


def test_zip_members_are_read_when_decoded_not_up_front(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """images.zip is not read into memory whole: each member is read once, by the thread that decodes it."""
    source_folder({"train": {"cat": 300, "dog": 300}, "test": {"cat": 2, "dog": 2}})
    params = write_params(Path.cwd(), source="data/sources/pets", val_fraction=0.0)
    download.download(params)
    reads: list[tuple[str, bool]] = []
    read = zipfile.ZipFile.read

    def recording_read(archive: zipfile.ZipFile, name: Any, pwd: bytes | None = None) -> bytes:
        reads.append((str(name), threading.current_thread() is threading.main_thread()))
        return read(archive, name, pwd)

    monkeypatch.setattr(zipfile.ZipFile, "read", recording_read)
    normalize.normalize({**params, "normalize": {"stats": "dataset"}})
    assert sorted(name for name, _ in reads) == sorted(zipfile.ZipFile("data/raw/images.zip").namelist())
    assert not any(in_main for _, in_main in reads)
    lazy = outputs()
    # the same bytes as from every member read up front
    monkeypatch.setattr(normalize, "ZipMembers", lambda path, archive, names: [read(archive, n) for n in names])
    normalize.normalize({**params, "normalize": {"stats": "dataset"}})
    assert outputs() == lazy


def test_a_damaged_member_of_images_zip_is_one_line(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    """Members are read in the decoding threads now: a read error there is still the stage's one line."""
    source_folder(SPLIT_LAYOUT)
    params = write_params(Path.cwd(), source="data/sources/pets")
    download.download(params)
    raw = Path("data/raw/images.zip")
    with zipfile.ZipFile(raw) as archive:
        info = archive.getinfo("train/dog/0002.png")
    data = bytearray(raw.read_bytes())
    data[info.header_offset + 30 + len(info.filename) + 20] ^= 0xFF  # a byte of the stored picture
    raw.write_bytes(bytes(data))
    lines = run_stage_lines(capsys, source="data/sources/pets")
    assert lines == ["error: data/raw/images.zip: cannot read member 'train/dog/0002.png' (Bad CRC-32 for file "
                     "'train/dog/0002.png'); rerun the download stage"]
    assert not Path("data/prepared").exists()


# ---------------------------------------------------------------- CIFAR format in normalize


def synthetic_raw(**data: Any) -> dict[str, Any]:
    params = write_params(Path.cwd(), source="synthetic", **{"synthetic.train_size": 50, "synthetic.test_size": 20,
                                                              **data})
    download.download(params)
    return params


def test_cifar_format_splits_and_resizes(workdir: Path) -> None:
    params = synthetic_raw(val_fraction=0.2, image_size=24)
    meta = normalize.normalize({**params, "normalize": {"stats": "dataset"}})
    assert meta["splits"] == {"train": 40, "val": 10, "test": 20} and meta["image_size"] == 24
    assert meta["counts"]["val"] == dict.fromkeys(cifar.CIFAR10_CLASSES, 1)
    assert load_split("data/prepared/test.pt")[0].shape == (20, 3, 24, 24)
    assert meta["source"]["kind"] == "synthetic"


def test_cifar_batch_problems_are_clear(workdir: Path) -> None:
    params = synthetic_raw()
    batch = Path("data/raw/cifar-10-batches-py/data_batch_3")
    batch.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(PipelineError, match=r"data_batch_3: 'data' must be a uint8 array N x 3072 .*\(2, 100\)"):
        normalize.normalize({**params, "normalize": {"stats": "dataset"}})
    batch.write_bytes(b"\x80\x04 truncated pickle")
    with pytest.raises(PipelineError, match=r"data_batch_3: not a readable CIFAR-10 batch file"):
        normalize.normalize({**params, "normalize": {"stats": "dataset"}})
    batch.unlink()
    with pytest.raises(PipelineError, match=r"data_batch_3 is missing; rerun the download stage"):
        normalize.normalize({**params, "normalize": {"stats": "dataset"}})


def test_pickled_code_in_a_batch_is_refused(workdir: Path) -> None:
    class Exploit:
        def __reduce__(self) -> tuple[Any, ...]:
            return (print, ("this must never run",))

    params = synthetic_raw()
    Path("data/raw/cifar-10-batches-py/test_batch").write_bytes(pickle.dumps({b"data": Exploit()}))
    with pytest.raises(PipelineError, match=r"test_batch: not a readable .*refusing to load builtins\.print"):
        normalize.normalize({**params, "normalize": {"stats": "dataset"}})


def test_missing_raw_data(workdir: Path) -> None:
    params = write_params(Path.cwd())
    with pytest.raises(PipelineError, match=r"data/raw/source\.json: .* not found; run the stage that writes it"):
        normalize.normalize({**params, "normalize": {"stats": "dataset"}})


# ---------------------------------------------------------------- the real CIFAR-10 JPEG copy


@pytest.mark.realdata
@pytest.mark.skipif(not REAL_ZIP.is_file(), reason=f"{REAL_ZIP} not present")
def test_real_cifar10_jpeg_sample(workdir: Path) -> None:
    """A few hundred real JPEGs (30 train and 5 test per class) taken from the real zip, wrapper folder included:
    same layout handling, fast decode equal to Pillow, plausible pixels. The full decode is bench/decode.py."""
    with zipfile.ZipFile(REAL_ZIP) as real, zipfile.ZipFile("data/sources/sample.zip", "w") as sample:
        per_folder: dict[str, int] = {}
        for name in real.namelist():
            folder, _, file = name.rpartition("/")
            if file and per_folder.get(folder, 0) < (30 if "/train/" in name else 5):
                per_folder[folder] = per_folder.get(folder, 0) + 1
                sample.writestr(name, real.read(name))
        first_jpeg = real.read(next(n for n in real.namelist() if n.endswith(".jpg")))
    meta = run("data/sources/sample.zip", val_fraction=0.1)
    assert len(meta["classes"]) == 10 and meta["classes"][0] == "airplane"
    assert meta["splits"] == {"train": 270, "val": 30, "test": 50}
    images, _ = load_split("data/prepared/train.pt")
    assert images.shape == (270, 3, 32, 32) and 0.3 < meta["mean"][0] < 0.7 and 0.1 < meta["std"][0] < 0.4
    pillow = torch.from_numpy(np.array(Image.open(io.BytesIO(first_jpeg)).convert("RGB"))).permute(2, 0, 1)
    from stages.dataset.images import decode_image
    assert (decode_image(first_jpeg, 32, "real.jpg").int() - pillow.int()).abs().max().item() <= 1


# ---------------------------------------------------------------- class imbalance


def test_imbalanced_training_split_warns_in_meta_and_log(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    source_folder({"train": {"cat": 9, "dog": 3, "fox": 5}, "test": {"cat": 1, "dog": 1, "fox": 1}})
    capsys.readouterr()
    meta = run("data/sources/pets")
    assert meta["counts"]["train"] == {"cat": 9, "dog": 3, "fox": 5}
    assert meta["warning"] == ("the classes are imbalanced: in the training split, 'dog' has 3 images and 'cat' 9 "
                               "(3.0x as many); accuracy then hides the small classes (see balanced accuracy and "
                               "per-class recall), and train.class_weights: balanced weights the loss against it")
    assert list(meta)[-1] == "warning"
    assert f"warning: {meta['warning']}" in capsys.readouterr().out.splitlines()


def test_below_three_times_there_is_no_warning_key(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    source_folder({"train": {"cat": 8, "dog": 3}, "test": {"cat": 1, "dog": 1}})  # 2.67x: no warning
    capsys.readouterr()
    meta = run("data/sources/pets")
    assert "warning" not in meta and "warning:" not in capsys.readouterr().out


def test_imbalance_warning_rule() -> None:
    assert normalize.imbalance_warning({"a": 5, "b": 5}) is None
    assert normalize.imbalance_warning({"a": 2, "b": 5}) is None
    assert "'a' has 2 images and 'b' 6 (3.0x as many);" in normalize.imbalance_warning({"a": 2, "b": 6, "c": 6})
    assert "'b' has 0 images and 'a' 4;" in normalize.imbalance_warning({"a": 4, "b": 0})
