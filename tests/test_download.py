"""download stage: CIFAR-10 over HTTP from a local server (resume, retry, checksum, offline message), safe
extraction, the synthetic dataset, image-folder archives from a URL, and the atomic data/raw."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import socket
import tarfile
import threading
import urllib.error
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from imagefolders import (add_tar_member, make_cifar_tarball, make_image_folder, write_params, zip_folder)
from stages import download, fetch, normalize
from stages.common import PipelineError

CIFAR_FILES = ("batches.meta", "data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
               "test_batch")


class FileServer:
    """A threaded HTTP server on 127.0.0.1 serving in-memory files, with Range/If-Range support and faults a test
    can arm: `cut_once` (send half the body, then close), `fail_once` (answer an HTTP error code once) and
    `ignore_range` (always answer 200 with the whole file)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.last_modified = "Mon, 01 Jan 2024 00:00:00 GMT"
        self.requests: list[dict[str, Any]] = []
        self.cut_once = False
        self.fail_once: int | None = None
        self.fail_always: int | None = None
        self.ignore_range = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                server.requests.append({"path": self.path, "range": self.headers.get("Range"),
                                        "if_range": self.headers.get("If-Range")})
                if server.fail_always or server.fail_once:
                    code = server.fail_always or server.fail_once
                    server.fail_once = None
                    self.send_error(code)
                    return
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start, status = 0, 200
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if_range = self.headers.get("If-Range")
                if match and not server.ignore_range and (if_range is None or if_range == server.last_modified):
                    start, status = int(match.group(1)), 206
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                body = data[start:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Last-Modified", server.last_modified)
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if server.cut_once:
                    server.cut_once = False
                    self.wfile.write(body[:len(body) // 2])
                    return  # HTTP/1.0: returning closes the connection, short of Content-Length
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"


@pytest.fixture
def server() -> Iterator[FileServer]:
    instance = FileServer()
    instance.thread.start()
    try:
        yield instance
    finally:
        instance.httpd.shutdown()
        instance.httpd.server_close()


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


def data_params(**overrides: Any) -> dict[str, Any]:
    params = write_params(Path.cwd(), **overrides)
    return params["data"]


def served_cifar(server: FileServer, tarball: bytes) -> str:
    server.files["/cifar-10-python.tar.gz"] = tarball
    return server.url("/cifar-10-python.tar.gz")


def assert_cifar_raw(n_train: int = 60, n_test: int = 20) -> None:
    folder = Path("data/raw/cifar-10-batches-py")
    assert sorted(p.name for p in folder.iterdir()) == sorted(CIFAR_FILES)
    classes, train, test = normalize.load_cifar(folder, 32)
    assert len(classes) == 10 and train[0].shape == (n_train, 3, 32, 32) and test[0].shape == (n_test, 3, 32, 32)


def leftovers() -> list[str]:
    """Temporary folders the stage would have left beside data/raw."""
    return sorted(p.name for p in Path("data").iterdir() if p.name.startswith(".raw."))


# ---------------------------------------------------------------- cifar10 over HTTP


def test_cifar10_download_verifies_extracts_and_reuses(workdir: Path, server: FileServer, tarball: bytes) -> None:
    url = served_cifar(server, tarball)
    info = download.download(data_params(source="cifar10", url=url))
    assert_cifar_raw()
    source = json.loads(Path("data/raw/source.json").read_text())
    assert source == info and source["kind"] == "cifar10" and source["md5"] == download.CIFAR10_MD5
    assert source["url"] == url
    assert Path("data/.download/cifar-10-python.tar.gz").read_bytes() == tarball  # verified copy kept
    assert not Path("data/.download/cifar-10-python.tar.gz.part").exists()
    assert leftovers() == []
    # A second run uses the verified archive: no request at all.
    requests_before = len(server.requests)
    download.download(data_params(source="cifar10", url=url))
    assert len(server.requests) == requests_before
    assert_cifar_raw()


def test_wrong_md5_is_a_clear_error_and_leaves_nothing(workdir: Path, server: FileServer, tarball: bytes,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "CIFAR10_MD5", "0" * 32)
    with pytest.raises(PipelineError, match=r"MD5 [0-9a-f]{32} does not match the expected 0{32}"):
        download.download(data_params(source="cifar10", url=served_cifar(server, tarball)))
    assert not Path("data/raw").exists()
    assert not any(Path("data/.download").iterdir())  # the bad download is deleted, not resumed later
    assert leftovers() == []


def test_transfer_cut_midway_resumes_with_range(workdir: Path, server: FileServer, tarball: bytes,
                                                sleeps: list[float]) -> None:
    server.cut_once = True
    download.download(data_params(source="cifar10", url=served_cifar(server, tarball)))
    assert_cifar_raw()
    assert [r["range"] for r in server.requests] == [None, f"bytes={len(tarball) // 2}-"]
    assert server.requests[1]["if_range"] == server.last_modified  # a changed file would not be spliced
    assert sleeps == [fetch.BACKOFF_S]


def test_partial_file_from_an_earlier_run_is_resumed(workdir: Path, server: FileServer, tarball: bytes) -> None:
    part = Path("data/.download/cifar-10-python.tar.gz.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(tarball[:1000])
    download.download(data_params(source="cifar10", url=served_cifar(server, tarball)))
    assert [r["range"] for r in server.requests] == ["bytes=1000-"]
    assert_cifar_raw()


def test_complete_partial_file_is_still_verified(workdir: Path, server: FileServer, tarball: bytes) -> None:
    """A .part as long as the file gets 416 from the server; it is used only because its MD5 matches."""
    part = Path("data/.download/cifar-10-python.tar.gz.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(tarball)
    download.download(data_params(source="cifar10", url=served_cifar(server, tarball)))
    assert [r["range"] for r in server.requests] == [f"bytes={len(tarball)}-"]
    assert_cifar_raw()


def test_server_ignoring_range_restarts_from_zero(workdir: Path, server: FileServer, tarball: bytes) -> None:
    part = Path("data/.download/cifar-10-python.tar.gz.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"garbage that must not end up in the archive")
    server.ignore_range = True
    download.download(data_params(source="cifar10", url=served_cifar(server, tarball)))
    assert_cifar_raw()
    assert Path("data/.download/cifar-10-python.tar.gz").read_bytes() == tarball


def test_changed_file_on_server_is_downloaded_afresh(workdir: Path, server: FileServer, tarball: bytes) -> None:
    part = Path("data/.download/cifar-10-python.tar.gz.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"old version of the file")
    Path("data/.download/cifar-10-python.tar.gz.validator").write_text("Sun, 01 Jan 2023 00:00:00 GMT")
    download.download(data_params(source="cifar10", url=served_cifar(server, tarball)))
    assert server.requests[0]["if_range"] == "Sun, 01 Jan 2023 00:00:00 GMT"  # server answered 200: restart
    assert_cifar_raw()


def test_http_503_is_retried(workdir: Path, server: FileServer, tarball: bytes, sleeps: list[float]) -> None:
    server.fail_once = 503
    download.download(data_params(source="cifar10", url=served_cifar(server, tarball)))
    assert_cifar_raw()
    assert len(server.requests) == 2 and sleeps == [fetch.BACKOFF_S]


def test_persistent_server_error_gives_up_with_backoff(workdir: Path, server: FileServer, tarball: bytes,
                                                       sleeps: list[float]) -> None:
    server.fail_always = 502
    with pytest.raises(PipelineError, match=rf"failed after {fetch.RETRIES + 1} attempts \(HTTP 502"):
        download.download(data_params(source="cifar10", url=served_cifar(server, tarball)))
    assert sleeps == [fetch.BACKOFF_S * 2 ** i for i in range(fetch.RETRIES)]
    assert not Path("data/raw").exists()


def test_http_404_is_not_retried(workdir: Path, server: FileServer, sleeps: list[float]) -> None:
    with pytest.raises(PipelineError, match=r"missing\.tar\.gz: HTTP 404"):
        download.download(data_params(source="cifar10", url=server.url("/missing.tar.gz")))
    assert len(server.requests) == 1 and sleeps == []


def test_offline_connection_refused_says_how_to_run_offline(workdir: Path, sleeps: list[float]) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(PipelineError) as caught:
        download.download(data_params(source="cifar10", url=f"http://127.0.0.1:{port}/cifar-10-python.tar.gz"))
    message = str(caught.value)
    assert "unreachable (connection refused)" in message
    assert "dvc exp run -S data.source=synthetic" in message
    assert "data/sources/" in message and "data.url=file://" in message
    assert sleeps == []  # no pointless retries when offline


def test_offline_dns_failure_says_how_to_run_offline(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_dns(*args: Any, **kwargs: Any) -> None:
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(fetch.urllib.request, "urlopen", no_dns)
    with pytest.raises(PipelineError, match=r"www\.cs\.toronto\.edu is unreachable \(cannot resolve the host name"
                                            r".*data\.source=synthetic"):
        download.download(data_params(source="cifar10"))


def test_file_url_is_used_in_place(workdir: Path, tmp_path: Path, tarball: bytes) -> None:
    download.download(data_params(source="cifar10", url=(tmp_path / "cifar-10-python.tar.gz").as_uri()))
    assert_cifar_raw()
    assert not Path("data/.download").exists()


def test_failed_run_keeps_the_previous_raw_data(workdir: Path, tmp_path: Path, tarball: bytes,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    download.download(data_params(source="synthetic", **{"synthetic.train_size": 40, "synthetic.test_size": 10}))
    before = Path("data/raw/source.json").read_bytes()
    monkeypatch.setattr(download, "CIFAR10_MD5", "f" * 32)
    with pytest.raises(PipelineError, match="does not match"):
        download.download(data_params(source="cifar10", url=(tmp_path / "cifar-10-python.tar.gz").as_uri()))
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
        download.download(data_params(source="cifar10", url=archive.as_uri()))
    assert not Path("data/raw").exists() and leftovers() == []
    assert not any(p.name == "evil.txt" for p in tmp_path.rglob("*"))


def test_links_inside_the_archive_are_skipped(workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tmp_path / "links.tar.gz"
    make_cifar_tarball(archive, n_train=10, n_test=10)
    add_tar_member(archive, "cifar-10-batches-py/alias", kind=tarfile.SYMTYPE, linkname="data_batch_1")
    monkeypatch.setattr(download, "CIFAR10_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    download.download(data_params(source="cifar10", url=archive.as_uri()))
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
        download.download(data_params(source="cifar10", url=archive.as_uri()))


# ---------------------------------------------------------------- synthetic


def raw_files() -> dict[str, bytes]:
    return {p.relative_to("data/raw").as_posix(): p.read_bytes() for p in sorted(Path("data/raw").rglob("*"))
            if p.is_file()}


def test_synthetic_is_deterministic_and_seeded(workdir: Path) -> None:
    sizes = {"synthetic.train_size": 100, "synthetic.test_size": 30}
    download.download(data_params(source="synthetic", seed=3, **sizes))
    first = raw_files()
    download.download(data_params(source="synthetic", seed=3, **sizes))
    assert raw_files() == first
    download.download(data_params(source="synthetic", seed=4, **sizes))
    assert raw_files()["cifar-10-batches-py/data_batch_1"] != first["cifar-10-batches-py/data_batch_1"]
    # The test set has its own generator: a bigger test set leaves the training images as they were.
    download.download(data_params(source="synthetic", seed=3, **{**sizes, "synthetic.test_size": 50}))
    assert raw_files()["cifar-10-batches-py/data_batch_1"] == first["cifar-10-batches-py/data_batch_1"]


def test_synthetic_has_the_cifar10_python_format(workdir: Path) -> None:
    download.download(data_params(source="synthetic", **{"synthetic.train_size": 103, "synthetic.test_size": 40}))
    folder = Path("data/raw/cifar-10-batches-py")
    with open(folder / "batches.meta", "rb") as handle:
        meta = pickle.load(handle, encoding="bytes")  # the way the official files are read
    assert meta == {b"num_cases_per_batch": 21, b"label_names": [n.encode() for n in download.CIFAR10_CLASSES],
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
    info = download.download(data_params(source=server.url("/pictures.zip"), sha256=digest))
    assert info["sha256"] == digest and info["images"] == {"train": 6, "test": 2} and info["classes"] == ["cat", "dog"]
    assert [r["range"] for r in server.requests][1].startswith("bytes=")
    requests = len(server.requests)
    download.download(data_params(source=server.url("/pictures.zip"), sha256=digest))
    assert len(server.requests) == requests  # pinned by sha256: the verified copy is reused


def test_image_archive_url_without_sha256_is_not_kept(workdir: Path, server: FileServer, image_zip: bytes) -> None:
    server.files["/dl"] = image_zip  # no extension: the type is read from the content
    info = download.download(data_params(source=server.url("/dl")))
    assert info["images"] == {"train": 6, "test": 2} and info["url"] == server.url("/dl")
    assert not any(Path("data/.download").iterdir())


def test_image_archive_url_with_wrong_sha256(workdir: Path, server: FileServer, image_zip: bytes) -> None:
    server.files["/pictures.zip"] = image_zip
    with pytest.raises(PipelineError, match=r"SHA256 [0-9a-f]{64} does not match the expected a{64}"):
        download.download(data_params(source=server.url("/pictures.zip"), sha256="a" * 64))
    assert not Path("data/raw").exists()


def test_image_archive_url_offline(workdir: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(PipelineError, match=r"unreachable.*copy the archive into data/sources/.*synthetic"):
        download.download(data_params(source=f"http://127.0.0.1:{port}/pictures.zip"))
