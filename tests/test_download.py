"""download stage: CIFAR-10 over HTTP from a local server (resume, retry, checksum, offline message), safe
extraction, the synthetic dataset, image-folder archives from a URL, and the atomic data/raw."""

from __future__ import annotations

import email.message
import hashlib
import io
import json
import os
import pickle
import re
import signal
import socket
import tarfile
import threading
import tracemalloc
import urllib.error
import urllib.request
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from stages import download
from stages.base.runtime import PipelineError, run_stage
from stages.dataset import archives, cifar, fetch
from stages.dataset import ingest as ingest_module

from fileserver import FileServer
from imagefolders import (add_tar_member, image_bytes, make_cifar_tarball, make_image_folder, solid_image, tar_of,
                          write_params, zip_declaring_size, zip_folder, zip_of)

CIFAR_FILES = ("batches.meta", "data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
               "test_batch")


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The waits between retries, recorded instead of slept."""
    recorded: list[float] = []
    monkeypatch.setattr(fetch, "_sleep", recorded.append)
    return recorded


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sleeps: list[float]) -> Path:
    """A project folder to run the stage in (retries do not wait)."""
    work = tmp_path / "work"
    (work / "data" / "sources").mkdir(parents=True)
    monkeypatch.chdir(work)
    return work


@pytest.fixture
def tarball(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> bytes:
    """A small CIFAR-format tarball; the stage's expected MD5 is set to its checksum."""
    path = tmp_path / "cifar-10-python.tar.gz"
    md5 = make_cifar_tarball(path, n_train=60, n_test=20)
    monkeypatch.setattr(download, "CIFAR10_MD5", md5)
    return path.read_bytes()


def stage_params(**overrides: Any) -> dict[str, Any]:
    """The repository's params with keys of its data section overridden (also written to params.yaml)."""
    return write_params(Path.cwd(), **overrides)


def served_cifar(server: FileServer, tarball: bytes) -> str:
    server.files["/cifar-10-python.tar.gz"] = tarball
    return server.url("/cifar-10-python.tar.gz")


def assert_cifar_raw(n_train: int = 60, n_test: int = 20) -> None:
    folder = Path("data/raw/cifar-10-batches-py")
    assert sorted(p.name for p in folder.iterdir()) == sorted(CIFAR_FILES)
    classes, train, test = cifar.load_cifar(folder)
    assert len(classes) == 10 and train[0].shape == (n_train, 3, 32, 32) and test[0].shape == (n_test, 3, 32, 32)


def leftovers() -> list[str]:
    """Temporary folders the stage would have left beside data/raw."""
    return sorted(p.name for p in Path("data").iterdir() if p.name.startswith(".raw."))


# ---------------------------------------------------------------- cifar10 over HTTP


def test_cifar10_download_verifies_extracts_and_reuses(workdir: Path, server: FileServer, tarball: bytes) -> None:
    url = served_cifar(server, tarball)
    info = download.download(stage_params(source="cifar10", url=url))
    assert_cifar_raw()
    source = json.loads(Path("data/raw/source.json").read_text())
    assert source == info and source["kind"] == "cifar10" and source["md5"] == download.CIFAR10_MD5
    assert source["url"] == url
    assert Path("data/.download/cifar-10-python.tar.gz").read_bytes() == tarball  # verified copy kept
    assert not Path("data/.download/cifar-10-python.tar.gz.part").exists()
    assert leftovers() == []
    # A second run uses the verified archive: no request at all.
    requests_before = len(server.requests)
    download.download(stage_params(source="cifar10", url=url))
    assert len(server.requests) == requests_before
    assert_cifar_raw()


def test_wrong_md5_is_a_clear_error_and_leaves_nothing(workdir: Path, server: FileServer, tarball: bytes,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "CIFAR10_MD5", "0" * 32)
    with pytest.raises(PipelineError, match=r"MD5 [0-9a-f]{32} does not match the expected 0{32}"):
        download.download(stage_params(source="cifar10", url=served_cifar(server, tarball)))
    assert not Path("data/raw").exists()
    assert not any(Path("data/.download").iterdir())  # the bad download is deleted, not resumed later
    assert leftovers() == []


def test_transfer_cut_midway_resumes_with_range(workdir: Path, server: FileServer, tarball: bytes,
                                                sleeps: list[float]) -> None:
    server.cut_once = True
    download.download(stage_params(source="cifar10", url=served_cifar(server, tarball)))
    assert_cifar_raw()
    assert [r["range"] for r in server.requests] == [None, f"bytes={len(tarball) // 2}-"]
    assert server.requests[1]["if_range"] == server.last_modified  # a changed file would not be spliced
    assert sleeps == [fetch.BACKOFF_S]


def test_partial_file_from_an_earlier_run_is_resumed(workdir: Path, server: FileServer, tarball: bytes) -> None:
    part = Path("data/.download/cifar-10-python.tar.gz.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(tarball[:1000])
    download.download(stage_params(source="cifar10", url=served_cifar(server, tarball)))
    assert [r["range"] for r in server.requests] == ["bytes=1000-"]
    assert_cifar_raw()


def test_complete_partial_file_is_still_verified(workdir: Path, server: FileServer, tarball: bytes) -> None:
    """A .part as long as the file gets 416 from the server; it is used only because its MD5 matches."""
    part = Path("data/.download/cifar-10-python.tar.gz.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(tarball)
    download.download(stage_params(source="cifar10", url=served_cifar(server, tarball)))
    assert [r["range"] for r in server.requests] == [f"bytes={len(tarball)}-"]
    assert_cifar_raw()


def test_server_ignoring_range_restarts_from_zero(workdir: Path, server: FileServer, tarball: bytes) -> None:
    part = Path("data/.download/cifar-10-python.tar.gz.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"garbage that must not end up in the archive")
    server.ignore_range = True
    download.download(stage_params(source="cifar10", url=served_cifar(server, tarball)))
    assert_cifar_raw()
    assert Path("data/.download/cifar-10-python.tar.gz").read_bytes() == tarball


def test_changed_file_on_server_is_downloaded_afresh(workdir: Path, server: FileServer, tarball: bytes) -> None:
    part = Path("data/.download/cifar-10-python.tar.gz.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"old version of the file")
    Path("data/.download/cifar-10-python.tar.gz.validator").write_text("Sun, 01 Jan 2023 00:00:00 GMT")
    download.download(stage_params(source="cifar10", url=served_cifar(server, tarball)))
    assert server.requests[0]["if_range"] == "Sun, 01 Jan 2023 00:00:00 GMT"  # server answered 200: restart
    assert_cifar_raw()


def test_http_503_is_retried(workdir: Path, server: FileServer, tarball: bytes, sleeps: list[float]) -> None:
    server.fail_once = 503
    download.download(stage_params(source="cifar10", url=served_cifar(server, tarball)))
    assert_cifar_raw()
    assert len(server.requests) == 2 and sleeps == [fetch.BACKOFF_S]


def test_persistent_server_error_gives_up_with_backoff(workdir: Path, server: FileServer, tarball: bytes,
                                                       sleeps: list[float]) -> None:
    server.fail_always = 502
    with pytest.raises(PipelineError, match=rf"failed after {fetch.RETRIES + 1} attempts \(HTTP 502"):
        download.download(stage_params(source="cifar10", url=served_cifar(server, tarball)))
    assert sleeps == [fetch.BACKOFF_S * 2 ** i for i in range(fetch.RETRIES)]
    assert not Path("data/raw").exists()


def test_http_404_is_not_retried(workdir: Path, server: FileServer, sleeps: list[float]) -> None:
    with pytest.raises(PipelineError, match=r"missing\.tar\.gz: HTTP 404"):
        download.download(stage_params(source="cifar10", url=server.url("/missing.tar.gz")))
    assert len(server.requests) == 1 and sleeps == []


def test_offline_connection_refused_says_how_to_run_offline(workdir: Path, sleeps: list[float]) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(PipelineError) as caught:
        download.download(stage_params(source="cifar10", url=f"http://127.0.0.1:{port}/cifar-10-python.tar.gz"))
    message = str(caught.value)
    assert "unreachable (connection refused)" in message
    assert "dvc exp run -S data.source=synthetic" in message
    assert "data/sources/" in message and "data.url=file://" in message
    assert sleeps == []  # no pointless retries when offline


def test_offline_dns_failure_says_how_to_run_offline(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_dns(*args: Any, **kwargs: Any) -> None:
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(fetch._OPENER, "open", no_dns)
    with pytest.raises(PipelineError, match=r"www\.cs\.toronto\.edu is unreachable \(cannot resolve the host name"
                                            r".*data\.source=synthetic"):
        download.download(stage_params(source="cifar10"))


def test_file_url_is_used_in_place(workdir: Path, tmp_path: Path, tarball: bytes) -> None:
    download.download(stage_params(source="cifar10", url=(tmp_path / "cifar-10-python.tar.gz").as_uri()))
    assert_cifar_raw()
    assert not Path("data/.download").exists()


def test_failed_run_keeps_the_previous_raw_data(workdir: Path, tmp_path: Path, tarball: bytes,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    download.download(stage_params(source="synthetic", **{"synthetic.train_size": 40, "synthetic.test_size": 10}))
    before = Path("data/raw/source.json").read_bytes()
    monkeypatch.setattr(download, "CIFAR10_MD5", "f" * 32)
    with pytest.raises(PipelineError, match="does not match"):
        download.download(stage_params(source="cifar10", url=(tmp_path / "cifar-10-python.tar.gz").as_uri()))
    assert Path("data/raw/source.json").read_bytes() == before
    assert leftovers() == []


# ---------------------------------------------------------------- safe extraction


@pytest.mark.parametrize("member, kind, linkname, complaint", [
    ("../evil.txt", tarfile.REGTYPE, "", "contains '..'"),
    ("cifar-10-batches-py/../../evil.txt", tarfile.REGTYPE, "", "contains '..'"),
    ("ABSOLUTE", tarfile.REGTYPE, "", "has an absolute path"),
    ("cifar-10-batches-py/link", tarfile.SYMTYPE, "../../evil.txt", "is a link to '../../evil.txt', outside"),
    ("cifar-10-batches-py/abs-link", tarfile.SYMTYPE, "/etc/passwd", "is a link to '/etc/passwd', outside"),
    ("cifar-10-batches-py/hard", tarfile.LNKTYPE, "../evil.txt", "is a link to '../evil.txt', outside"),
])
def test_unsafe_tar_members_are_refused(workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        member: str, kind: bytes, linkname: str, complaint: str) -> None:
    archive = tmp_path / "crafted.tar.gz"
    make_cifar_tarball(archive, n_train=10, n_test=10)
    if member == "ABSOLUTE":
        member = str(tmp_path / "evil.txt")
    add_tar_member(archive, member, kind=kind, linkname=linkname)
    monkeypatch.setattr(download, "CIFAR10_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    with pytest.raises(PipelineError, match=re.escape(f"member {member!r} {complaint}")):
        download.download(stage_params(source="cifar10", url=archive.as_uri()))
    assert not Path("data/raw").exists() and leftovers() == []
    assert not any(p.name == "evil.txt" for p in tmp_path.rglob("*"))


def test_links_inside_the_archive_are_skipped(workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tmp_path / "links.tar.gz"
    make_cifar_tarball(archive, n_train=10, n_test=10)
    add_tar_member(archive, "cifar-10-batches-py/alias", kind=tarfile.SYMTYPE, linkname="data_batch_1")
    monkeypatch.setattr(download, "CIFAR10_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    download.download(stage_params(source="cifar10", url=archive.as_uri()))
    assert not Path("data/raw/cifar-10-batches-py/alias").exists()
    assert_cifar_raw(10, 10)


def test_archive_without_cifar_batches_is_a_clear_error(workdir: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tmp_path / "other.tar.gz"
    with tarfile.open(archive, "w:gz"):
        pass
    add_tar_member(archive, "readme.txt")
    monkeypatch.setattr(download, "CIFAR10_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    with pytest.raises(PipelineError, match="not the CIFAR-10 python archive: cifar-10-batches-py/batches.meta"):
        download.download(stage_params(source="cifar10", url=archive.as_uri()))


# ---------------------------------------------------------------- synthetic


def raw_files() -> dict[str, bytes]:
    return {p.relative_to("data/raw").as_posix(): p.read_bytes() for p in sorted(Path("data/raw").rglob("*"))
            if p.is_file()}


def test_synthetic_is_deterministic_and_seeded(workdir: Path) -> None:
    sizes = {"synthetic.train_size": 100, "synthetic.test_size": 30}
    download.download(stage_params(source="synthetic", seed=3, **sizes))
    first = raw_files()
    download.download(stage_params(source="synthetic", seed=3, **sizes))
    assert raw_files() == first
    download.download(stage_params(source="synthetic", seed=4, **sizes))
    assert raw_files()["cifar-10-batches-py/data_batch_1"] != first["cifar-10-batches-py/data_batch_1"]
    # The test set has its own generator: a bigger test set leaves the training images as they were.
    download.download(stage_params(source="synthetic", seed=3, **{**sizes, "synthetic.test_size": 50}))
    assert raw_files()["cifar-10-batches-py/data_batch_1"] == first["cifar-10-batches-py/data_batch_1"]


def test_synthetic_has_the_cifar10_python_format(workdir: Path) -> None:
    download.download(stage_params(source="synthetic", **{"synthetic.train_size": 103, "synthetic.test_size": 40}))
    folder = Path("data/raw/cifar-10-batches-py")
    with open(folder / "batches.meta", "rb") as handle:
        meta = pickle.load(handle, encoding="bytes")  # the way the official files are read
    assert meta == {b"num_cases_per_batch": 21, b"label_names": [n.encode() for n in cifar.CIFAR10_CLASSES],
                    b"num_vis": 3072}
    sizes, labels = [], []
    for name in CIFAR_FILES[1:]:
        with open(folder / name, "rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        assert list(batch) == [b"batch_label", b"labels", b"data", b"filenames"]
        assert batch[b"data"].dtype.name == "uint8" and batch[b"data"].shape == (len(batch[b"labels"]), 3072)
        assert len(batch[b"filenames"]) == len(batch[b"labels"]) and isinstance(batch[b"filenames"][0], bytes)
        sizes.append(len(batch[b"labels"]))
        labels += batch[b"labels"] if name != "test_batch" else []
    assert sizes == [21, 21, 21, 20, 20, 40]
    assert torch.bincount(torch.tensor(labels)).tolist() == [11, 11, 11, 10, 10, 10, 10, 10, 10, 10]
    source = json.loads(Path("data/raw/source.json").read_text())
    assert source["kind"] == "synthetic" and source["train_size"] == 103 and source["seed"] == 0


def test_synthetic_data_is_learnable() -> None:
    """Even a nearest-class-mean classifier on raw pixels beats chance (10%) by far; the models do much better."""
    train_x, train_y = download.synthetic_images(1000, 0, "train")
    test_x, test_y = download.synthetic_images(300, 0, "test")
    train_x, test_x = train_x.flatten(1).double(), test_x.flatten(1).double()
    train_y, test_y = torch.tensor(train_y), torch.tensor(test_y)
    centroids = torch.stack([train_x[train_y == c].mean(0) for c in range(10)])
    accuracy = (torch.cdist(test_x, centroids).argmin(1) == test_y).double().mean().item()
    assert accuracy > 0.3
    flipped = (torch.cdist(test_x.view(-1, 3, 32, 32).flip(3).flatten(1), centroids).argmin(1) == test_y)
    assert flipped.double().mean().item() > 0.3  # horizontal flips keep the classes recognisable


def test_main_reads_params_yaml(workdir: Path) -> None:
    write_params(workdir, source="synthetic", **{"synthetic.train_size": 40, "synthetic.test_size": 10})
    download.main()
    assert json.loads(Path("data/raw/source.json").read_text())["train_size"] == 40


# ---------------------------------------------------------------- image-folder archives from a URL


@pytest.fixture
def image_zip(tmp_path: Path) -> bytes:
    folder = tmp_path / "pictures"
    make_image_folder(folder, {"train": {"cat": 3, "dog": 3}, "test": {"cat": 1, "dog": 1}})
    return zip_folder(folder, tmp_path / "pictures.zip").read_bytes()


def test_image_archive_url_with_sha256(workdir: Path, server: FileServer, image_zip: bytes) -> None:
    server.files["/pictures.zip"] = image_zip
    digest = hashlib.sha256(image_zip).hexdigest()
    server.cut_once = True
    info = download.download(stage_params(source=server.url("/pictures.zip"), sha256=digest))
    assert info["sha256"] == digest and info["images"] == {"train": 6, "test": 2} and info["classes"] == ["cat", "dog"]
    assert [r["range"] for r in server.requests][1].startswith("bytes=")
    requests = len(server.requests)
    download.download(stage_params(source=server.url("/pictures.zip"), sha256=digest))
    assert len(server.requests) == requests  # pinned by sha256: the verified copy is reused


def test_image_archive_url_without_sha256_is_not_kept(workdir: Path, server: FileServer, image_zip: bytes) -> None:
    server.files["/dl"] = image_zip  # no extension: the type is read from the content
    info = download.download(stage_params(source=server.url("/dl")))
    assert info["images"] == {"train": 6, "test": 2} and info["url"] == server.url("/dl")
    assert not any(Path("data/.download").iterdir())


def test_image_archive_url_with_wrong_sha256(workdir: Path, server: FileServer, image_zip: bytes) -> None:
    server.files["/pictures.zip"] = image_zip
    with pytest.raises(PipelineError, match=r"SHA256 [0-9a-f]{64} does not match the expected a{64}"):
        download.download(stage_params(source=server.url("/pictures.zip"), sha256="a" * 64))
    assert not Path("data/raw").exists()


def test_image_archive_url_offline(workdir: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(PipelineError, match=r"unreachable.*copy the archive into data/sources/.*synthetic"):
        download.download(stage_params(source=f"http://127.0.0.1:{port}/pictures.zip"))


# ---------------------------------------------------------------- hostile and unusual image sources


BOMB = bytes(8 << 20)  # 8 MiB of zeros: deflated a few KB, over data.limits.compression_ratio (200)
SMALL_LAYOUT = {"train": {"cat": 2, "dog": 2}, "test": {"cat": 1, "dog": 1}}


def run_download(capsys: pytest.CaptureFixture[str], **data: Any) -> tuple[int, str, str]:
    """The stage as `python -m stages.download` runs it (run_stage: an error is one line and exit status 2), with
    params.yaml's data keys overridden; returns (exit status, stdout, stderr)."""
    write_params(Path.cwd(), **data)
    capsys.readouterr()
    try:
        run_stage(download.main)
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_refused(result: tuple[int, str, str], *expected: str) -> None:
    """Exit status 2 with exactly one `error:` line, holding each expected text, and no traceback."""
    code, _, err = result
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in errors[0], errors[0]


def stage_warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning:")]


@pytest.fixture
def previous_raw(workdir: Path) -> dict[str, bytes]:
    """data/raw from an earlier good run, which a refused source must leave exactly as it was."""
    download.download(stage_params(source="synthetic", **{"synthetic.train_size": 40, "synthetic.test_size": 10}))
    return raw_files()


def assert_unchanged(previous: dict[str, bytes]) -> None:
    assert raw_files() == previous and leftovers() == []


def png(color: tuple[int, int, int] = (10, 20, 30)) -> bytes:
    return image_bytes(solid_image(color), "PNG")


def noise_png(side: int = 512) -> bytes:
    """An incompressible PNG (side 512: about 790 KB)."""
    pixels = np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return image_bytes(Image.fromarray(pixels, "RGB"), "PNG")


def split_members(extra: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """Small PNG members in the train/test layout (classes cat and dog, 2 images each per split), then `extra`."""
    members = {f"{split}/{cls}/{number}.png": png() for split in ("train", "test") for cls in ("cat", "dog")
               for number in range(2)}
    return {**members, **(extra or {})}


def archive_of(kind: str, members: dict[str, bytes], name: str = "pets") -> Path:
    path = Path("data/sources") / f"{name}.{kind}"
    return zip_of(path, members) if kind == "zip" else tar_of(path, members, compression="gz" if kind == "tar.gz"
                                                              else "")


@pytest.mark.parametrize("kind", ["zip member", "zip of small members", "tar.gz"])
def test_archive_bombs_are_refused_from_their_headers(workdir: Path, previous_raw: dict[str, bytes],
                                                      capsys: pytest.CaptureFixture[str], kind: str) -> None:
    """A few KB that unpack to 8 MB (ratio ~1000) are refused by name before any member is read: one big member,
    or 16 members each below the 1 MiB the per-member ratio waits for (the whole zip's ratio catches them), or a
    tar.gz (its whole stream counts)."""
    if kind == "zip member":
        archive = archive_of("zip", split_members({"train/cat/bomb.png": BOMB}))
        expected = ["error: data/sources/pets.zip: member 'train/cat/bomb.png': unpacks to 8.0 MB from ",
                    "times its packed size, over data.limits.compression_ratio 200 (a decompression bomb?)"]
    elif kind == "zip of small members":
        archive = archive_of("zip", split_members({f"train/cat/bomb{i}.png": BOMB[:512 << 10] for i in range(16)}))
        expected = ["error: data/sources/pets.zip: unpacks to ", " or more from ", "(reached at member 'train/cat/bomb",
                    "over data.limits.compression_ratio 200"]
    else:
        archive = archive_of("tar.gz", split_members({"train/cat/bomb.png": BOMB}))
        expected = ["error: data/sources/pets.tar.gz: unpacks to 8.0 MB or more from ",
                    "(reached at member 'train/cat/bomb.png')", "over data.limits.compression_ratio 200"]
    assert_refused(run_download(capsys, source=str(archive)), *expected)
    assert_unchanged(previous_raw)


def test_a_zip_member_is_never_read_past_its_declared_size(workdir: Path, previous_raw: dict[str, bytes],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Its headers say 100 bytes (under every limit) while its data inflates to 8 MB: the read stops at the
    declared 100 bytes, and the CRC check refuses the member."""
    archive = zip_declaring_size(archive_of("zip", split_members({"train/cat/liar.png": BOMB})),
                                 "train/cat/liar.png", 100)
    assert_refused(run_download(capsys, source=str(archive)),
                   "error: data/sources/pets.zip: cannot read member 'train/cat/liar.png' (Bad CRC-32")
    assert_unchanged(previous_raw)


@pytest.mark.parametrize("kind", ["zip", "tar.gz", "tar"])
@pytest.mark.parametrize("limit, value, expected", [
    ("archive_files", 5, ": holds more than 5 members, over the limit data.limits.archive_files; raise it"),
    ("archive_gb", 0.001, ": unpacks to more than 0.001 GB (reached at member 'train/dog/big.png'), over the limit "
                          "data.limits.archive_gb"),
    ("image_mb", 0.5, ": member 'train/cat/big.png': 7"),  # about 790 KB
    ("image_mb", 0.5, "over the limit of 0.5 MB per image file (data.limits.image_mb); raise it, or remove the file"),
])
def test_archive_limits_are_params(workdir: Path, previous_raw: dict[str, bytes], capsys: pytest.CaptureFixture[str],
                                   kind: str, limit: str, value: float, expected: str) -> None:
    big = noise_png()
    archive = archive_of(kind, split_members({"train/cat/big.png": big, "train/dog/big.png": big}))
    assert_refused(run_download(capsys, source=str(archive), **{f"limits.{limit}": value}),
                   f"error: data/sources/pets.{kind}{expected}" if expected.startswith(":") else expected)
    assert_unchanged(previous_raw)


def test_folder_picture_over_image_mb_is_refused_by_name(workdir: Path, previous_raw: dict[str, bytes],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    make_image_folder(Path("data/sources/pets"), SMALL_LAYOUT)
    Path("data/sources/pets/train/dog/big.png").write_bytes(noise_png())
    assert_refused(run_download(capsys, source="data/sources/pets", **{"limits.image_mb": 0.5}),
                   "error: data/sources/pets/train/dog/big.png: 7",
                   "over the limit of 0.5 MB per image file (data.limits.image_mb)")
    assert_unchanged(previous_raw)


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_ordinary_pictures_pass_the_default_limits(workdir: Path, capsys: pytest.CaptureFixture[str],
                                                   kind: str) -> None:
    """A 12 MP phone photo (4000 x 3000 JPEG, a few MB) and small flat images, which compress a lot."""
    photo = image_bytes(solid_image((90, 120, 160), (4000, 3000), noise=20), "JPEG", quality=90)
    flat_bmp = image_bytes(solid_image((0, 0, 0), (300, 300)), "BMP")  # 270 KB deflating ~1000x
    archive = archive_of(kind, split_members({"train/cat/photo.jpg": photo, "train/dog/flat.bmp": flat_bmp}))
    code, _, err = run_download(capsys, source=str(archive))
    assert code == 0 and stage_warnings(err) == [], err
    assert json.loads(Path("data/raw/source.json").read_text())["images"] == {"train": 6, "test": 4}
    with zipfile.ZipFile("data/raw/images.zip") as copied:
        assert copied.read("train/cat/photo.jpg") == photo and copied.read("train/dog/flat.bmp") == flat_bmp


@pytest.mark.parametrize("compression", ["gz", ""])
def test_tar_pictures_are_not_held_in_memory(workdir: Path, compression: str) -> None:
    """32 incompressible 1 MiB pictures: a plain tar is read member by member and a tar.gz streamed through a
    temporary file, so the copy's peak (Python allocations, where the pictures' bytes live) stays near one
    picture; reading the tar whole, as before, took over 32 MiB."""
    pictures = {f"{split}/{cls}/{i}.png": np.random.default_rng(i).bytes(1 << 20)
                for split in ("train", "test") for cls in ("cat", "dog") for i in range(8)}
    archive = tar_of(Path("data/sources/pets.tar"), pictures, compression=compression)
    tracemalloc.start()
    try:
        info = ingest_module.ingest(archive, str(archive), workdir / "images.zip", sniff=False)
        peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    assert info["images"] == {"train": 16, "test": 16}
    assert peak_mb < 8, f"copying 32 MiB of pictures took {peak_mb:.0f} MB"
    with zipfile.ZipFile(workdir / "images.zip") as copied:
        assert copied.read("train/dog/7.png") == pictures["train/dog/7.png"]
    assert sorted(p.name for p in workdir.iterdir()) == ["data", "images.zip"]  # the spool file is gone


@pytest.fixture
def no_hang() -> Iterator[None]:
    """Fail instead of hanging forever if something opens a FIFO for reading."""
    def hung(*args: Any) -> None:
        raise TimeoutError("the stage blocked")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs and /dev/zero are POSIX")
def test_special_files_in_a_folder_are_skipped_and_listed(workdir: Path, tmp_path: Path, no_hang: None,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Only regular files are read, and links to them: a FIFO, a link to /dev/zero, a broken link, a link to
    itself and a link to an enclosing folder are skipped, listed with their reason and warned about."""
    root = Path("data/sources/pets")
    make_image_folder(root, SMALL_LAYOUT)
    cat = root / "train" / "cat"
    os.mkfifo(cat / "pipe.png")
    (cat / "zero.png").symlink_to("/dev/zero")
    (cat / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (cat / "self.png").symlink_to("self.png")
    (cat / "loop").symlink_to("..")
    (cat / "linked.png").symlink_to((cat / "0000.png").resolve())
    code, _, err = run_download(capsys, source=str(root))
    assert code == 0, err
    source = json.loads(Path("data/raw/source.json").read_text())
    assert source["ignored_special_files"] == [
        {"file": "train/cat/gone.png", "reason": "a broken link"},
        {"file": "train/cat/loop", "reason": "a link to a folder that contains it (a loop)"},
        {"file": "train/cat/pipe.png", "reason": "a FIFO"},
        {"file": "train/cat/self.png", "reason": "a link loop"},
        {"file": "train/cat/zero.png", "reason": "a link to a character device"}]
    assert source["ignored_files"] == 5 and source["images"] == {"train": 5, "test": 2}
    (warning,) = stage_warnings(err)
    assert warning.startswith("warning: data/sources/pets: skipped 5 entries that are neither regular files nor "
                              "folders (nor links to one): train/cat/gone.png (a broken link), ")
    assert "train/cat/zero.png (a link to a character device); source.json lists them" in warning


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs and /dev/zero are POSIX")
def test_a_file_swapped_for_a_fifo_after_listing_is_not_read(tmp_path: Path, no_hang: None) -> None:
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(PipelineError, match=r"pipe\.png: no longer a regular file; rerun the download stage"):
        archives._read_file(tmp_path / "pipe.png", 1 << 20)
    with pytest.raises(PipelineError, match=r"^/dev/zero: no longer a regular file"):
        archives._read_file(Path("/dev/zero"), 1 << 20)


def test_a_linked_class_folder_is_a_class(workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A class folder that is a link was silently dropped (classes cat, dog instead of bird, cat, dog)."""
    make_image_folder(tmp_path / "elsewhere", {"bird": 3})
    root = Path("data/sources/pets")
    make_image_folder(root, {"train": {"cat": 2, "dog": 2}, "test": {"bird": 1, "cat": 1, "dog": 1}})
    (root / "train" / "bird").symlink_to(tmp_path / "elsewhere" / "bird")
    code, _, err = run_download(capsys, source=str(root))
    assert code == 0 and stage_warnings(err) == [], err
    source = json.loads(Path("data/raw/source.json").read_text())
    assert source["classes"] == ["bird", "cat", "dog"] and source["images"] == {"train": 7, "test": 3}
    assert "ignored_special_files" not in source  # an ordinary source keeps its source.json as before
    with zipfile.ZipFile("data/raw/images.zip") as copied:
        assert copied.read("train/bird/0002.png") == (tmp_path / "elsewhere" / "bird" / "0002.png").read_bytes()


@pytest.mark.parametrize("location", ["ftp://127.0.0.1/pictures.zip", "file:///etc/passwd"])
def test_a_redirect_away_from_http_is_refused(workdir: Path, server: FileServer, previous_raw: dict[str, bytes],
                                              capsys: pytest.CaptureFixture[str], location: str) -> None:
    server.redirects["/pictures.zip"] = location
    url = server.url("/pictures.zip")
    assert_refused(run_download(capsys, source=url),
                   f"error: {url}: the server redirects (HTTP 302) to {location}, which is not an http(s) URL; only "
                   f"redirects to http and https are followed")
    assert_unchanged(previous_raw)
    assert not any(Path("data/.download").iterdir())


def test_a_redirect_loop_is_one_line(workdir: Path, server: FileServer, previous_raw: dict[str, bytes],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """urllib's refusal of a redirect loop is three lines (`... infinite loop.` / `The last 30x error message was:`
    / `Found`); the stage says the first."""
    server.redirects["/loop.zip"] = "/loop.zip"
    url = server.url("/loop.zip")
    assert_refused(run_download(capsys, source=url), f"error: {url}: ", "infinite loop")
    _, _, err = run_download(capsys, source=url)
    assert "The last 30x error message" not in err and "Found" not in err
    assert_unchanged(previous_raw)


def test_a_redirect_within_http_is_followed(workdir: Path, server: FileServer, image_zip: bytes,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    server.files["/v2/pictures.zip"] = image_zip
    server.redirects["/pictures.zip"] = "/v2/pictures.zip"  # relative, as servers often send it
    code, _, err = run_download(capsys, source=server.url("/pictures.zip"),
                                sha256=hashlib.sha256(image_zip).hexdigest())
    assert code == 0, err
    assert [r["path"] for r in server.requests] == ["/pictures.zip", "/v2/pictures.zip"]


def test_a_redirect_from_https_to_http_is_refused() -> None:
    """urllib's own handler, as the stage's opener calls it for a 301 answer to an https request."""
    headers = email.message.Message()
    headers["Location"] = "http://example.org/pictures.zip"
    request = urllib.request.Request("https://example.org/pictures.zip")
    with pytest.raises(PipelineError, match=r"^https://example\.org/pictures\.zip: the server redirects \(HTTP 301\) "
                                            r"from https to plain http \(http://example\.org/pictures\.zip\); "
                                            r"refusing the downgrade"):
        fetch._SafeRedirects().http_error_301(request, io.BytesIO(), 301, "Moved Permanently", headers)
    fetch.check_redirect("http://example.org/a.zip", "https://example.org/a.zip", 301)  # an upgrade is fine
    fetch.check_redirect("https://example.org/a.zip", "https://mirror.example.org/a.zip", 302)
    assert any(isinstance(handler, fetch._SafeRedirects) for handler in fetch._OPENER.handlers)


def test_non_utf8_file_name_in_a_folder(workdir: Path, previous_raw: dict[str, bytes],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    make_image_folder(Path("data/sources/pets"), SMALL_LAYOUT)
    try:
        Path(os.fsdecode(os.fsencode("data/sources/pets/train/cat") + b"/caf\xe9.png")).write_bytes(png())
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    assert_refused(run_download(capsys, source="data/sources/pets"),
                   r"error: data/sources/pets: train/cat/caf\xe9.png: the name is not valid UTF-8",
                   "rename it with UTF-8 characters only")
    assert_unchanged(previous_raw)


@pytest.mark.parametrize("name, shown", [("train/cat/café.png", r"train/cat/caf\xe9.png"),
                                         ("train/crème/0.png", r"train/cr\xe8me/0.png")])
def test_non_utf8_names_in_a_tar_made_on_a_latin1_system(workdir: Path, previous_raw: dict[str, bytes],
                                                         capsys: pytest.CaptureFixture[str], name: str,
                                                         shown: str) -> None:
    archive = tar_of(Path("data/sources/pets.tar.gz"), split_members({name: png()}), format=tarfile.GNU_FORMAT,
                     encoding="latin-1")
    assert_refused(run_download(capsys, source=str(archive)),
                   f"error: data/sources/pets.tar.gz: {shown}: the name is not valid UTF-8")
    assert_unchanged(previous_raw)


def test_url_source_without_sha256_warns_with_its_digest(workdir: Path, tmp_path: Path, server: FileServer,
                                                         image_zip: bytes, tarball: bytes,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """DVC tracks neither an http(s) nor a file:// archive outside data/sources/: the stage says so and prints the
    SHA-256 to pin it with; pinned sources, data/sources/ and cifar10 (its MD5 is pinned in the code) do not warn."""
    server.files["/pictures.zip"] = image_zip
    digest = hashlib.sha256(image_zip).hexdigest()
    for url in (server.url("/pictures.zip"), (tmp_path / "pictures.zip").as_uri()):
        code, _, err = run_download(capsys, source=url)
        assert code == 0 and stage_warnings(err) == [
            f"warning: {url}: data.sha256 is not set, so DVC does not track this archive: when it changes at that "
            f"URL, `dvc repro` will not rerun the pipeline. Pin the archive downloaded now with "
            f"`dvc exp run -S data.sha256={digest}` (or set data.sha256: {digest} in params.yaml)"], err
    Path("data/sources/pictures.zip").write_bytes(image_zip)
    for quiet in ({"source": server.url("/pictures.zip"), "sha256": digest},
                  {"source": Path("data/sources/pictures.zip").resolve().as_uri()},
                  {"source": "cifar10", "url": (tmp_path / "cifar-10-python.tar.gz").as_uri()}):
        code, _, err = run_download(capsys, **quiet)
        assert code == 0 and stage_warnings(err) == [], (quiet, err)


# ---------------------------------------------------------------- what a download, a folder, a tar may hold


class EndlessServer:
    """Answers every GET with a body that never ends (no Content-Length), or with a huge announced one."""

    def __init__(self, announce: int | None) -> None:
        self.sent = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                self.send_response(200)
                if announce is not None:
                    self.send_header("Content-Length", str(announce))
                self.end_headers()
                block = b"\0" * 65536
                try:
                    while owner.sent < 64 << 20:  # a bound, so that a broken client check cannot hang the test
                        self.wfile.write(block)
                        owner.sent += len(block)
                except OSError:  # the client hung up, as it should
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("announce", [None, 1 << 40])
def test_a_download_is_cut_off_at_archive_gb(workdir: Path, previous_raw: dict[str, bytes],
                                             capsys: pytest.CaptureFixture[str], announce: int | None) -> None:
    """A server that streams forever stops at data.limits.archive_gb (here 2 MiB) and its part file goes; one that
    announces 1 TiB is not read at all."""
    endless = EndlessServer(announce)
    try:
        result = run_download(capsys, source=endless.url("/pets.zip"), **{"limits.archive_gb": 2 / 1024})
    finally:
        endless.close()
    if announce is None:
        assert_refused(result, "/pets.zip: the download passed 2.0 MB, the limit of data.limits.archive_gb, "
                               "and was stopped and deleted")
    else:
        assert_refused(result, "/pets.zip: the server announces 1,024.0 GB, more than the 2.0 MB of "
                               "data.limits.archive_gb; nothing was downloaded")
    assert endless.sent < 40 << 20
    assert_unchanged(previous_raw)
    assert not list(Path("data/.download").glob("*")), "the cut-off part file (and its validator) must go"


@pytest.mark.parametrize("limit, value, expected", [
    ("archive_files", 5, "error: data/sources/pets: holds more than 5 image files, over the limit "
                         "data.limits.archive_files; raise it if the folder is genuine"),
    ("archive_gb", 0.001, "error: data/sources/pets: its image files add up to more than 0.001 GB (reached at "
                          "'train/dog/big.png'), over the limit data.limits.archive_gb"),
])
def test_folder_limits_count_its_image_files(workdir: Path, previous_raw: dict[str, bytes],
                                             capsys: pytest.CaptureFixture[str], limit: str, value: float,
                                             expected: str) -> None:
    root = Path("data/sources/pets")
    make_image_folder(root, SMALL_LAYOUT)  # 6 small images
    (root / "train" / "cat" / "big.png").write_bytes(noise_png())
    (root / "train" / "dog" / "big.png").write_bytes(noise_png())
    (root / "notes.txt").write_text("not an image: not counted")
    assert_refused(run_download(capsys, source=str(root), **{f"limits.{limit}": value}), expected)
    assert_unchanged(previous_raw)


def test_fifo_and_device_entries_of_a_tar_are_skipped_and_listed(workdir: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = tar_of(Path("data/sources/pets.tar"), split_members(), compression="")
    with tarfile.open(path, "a") as archive:
        for name, kind in (("train/cat/pipe.png", tarfile.FIFOTYPE), ("train/dog/zero.png", tarfile.CHRTYPE),
                           ("train/dog/disk.png", tarfile.BLKTYPE)):
            entry = tarfile.TarInfo(name)
            entry.type = kind
            archive.addfile(entry)
    code, _, err = run_download(capsys, source=str(path))
    assert code == 0, err
    source = json.loads(Path("data/raw/source.json").read_text())
    assert source["ignored_special_files"] == [{"file": "train/cat/pipe.png", "reason": "a FIFO"},
                                               {"file": "train/dog/zero.png", "reason": "a character device"},
                                               {"file": "train/dog/disk.png", "reason": "a block device"}]
    assert source["images"] == {"train": 4, "test": 4} and source["ignored_files"] == 3
    (warning,) = stage_warnings(err)
    assert warning.startswith("warning: data/sources/pets.tar: skipped 3 entries that are neither regular files")
