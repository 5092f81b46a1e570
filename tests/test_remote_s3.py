"""The DVC remote on object storage for real: an S3-compatible server (tests/s3server.py) on 127.0.0.1 with a key
pair kept in the repository's local config, never committed. dvc push; a fresh clone's dvc pull gives equal
bytes; dvc artifacts get fetches the registered model through S3; a server stopped in the middle of a push gives
DVC's error, and a retry completes with nothing lost."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pipeline_repo import Baseline, dvc_executable, environment
from s3server import ACCESS_KEY, SECRET_KEY, S3Server, credentials, use_s3

pytestmark = pytest.mark.slow
OUTPUTS = ("models/model.pth", "models/model.onnx", "models/model.safetensors", "data/prepared/train.pt",
           "data/prepared/test.pt", "data/raw/source.json")


def test_push_pull_and_artifacts_get_through_s3(baseline: Baseline, tmp_path: Path, s3: S3Server) -> None:
    repo = baseline.repo.copy_to(tmp_path / "repo")
    use_s3(repo, s3)
    repo.commit("an S3 remote")
    assert SECRET_KEY not in repo.git("show", "HEAD:.dvc/config")  # the keys stay in the local config
    assert repo.git("status", "--porcelain") == ""
    repo.dvc("push")
    assert s3.stored_files() > 0

    clone = repo.clone_to(tmp_path / "clone")
    credentials(clone)
    clone.dvc("pull")
    assert {path: clone.md5(path) for path in OUTPUTS} == {path: repo.md5(path) for path in OUTPUTS}

    repo.run(dvc_executable().parent / "gto", "register", "cifar-classifier", "--version", "v1.0.0")
    fetched = tmp_path / "fetched"
    fetched.mkdir()
    done = subprocess.run([str(dvc_executable()), "artifacts", "get", str(repo.path), "cifar-classifier", "--rev",
                           "v1.0.0", "--remote-config", f"access_key_id={ACCESS_KEY}",
                           f"secret_access_key={SECRET_KEY}"],
                          cwd=fetched, env=environment(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (fetched / "model.onnx").read_bytes() == (repo.path / "models/model.onnx").read_bytes()


def test_a_server_stopped_mid_push_then_a_retry_loses_nothing(baseline: Baseline, tmp_path: Path,
                                                            s3: S3Server) -> None:
    """The object store is killed while a push is under way and comes back 2 s later: the push retries and
    completes. With the store down, a push fails at once with DVC's one clear error. Either way a later push and
    a fresh clone's pull lose nothing."""
    repo = baseline.repo.copy_to(tmp_path / "repo")
    use_s3(repo, s3)
    many = repo.path / "data" / "many"  # enough objects that the push is still running when the server stops
    many.mkdir()
    for index in range(400):
        (many / f"{index:04d}.bin").write_bytes(os.urandom(32 * 1024))
    repo.dvc("add", "data/many")
    repo.git("add", "data/many.dvc", "data/.gitignore")
    repo.commit("an S3 remote and a folder of many files")
    push = subprocess.Popen([str(dvc_executable()), "push", "-j", "2"], cwd=repo.path, env=environment(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while s3.stored_files() < 20 and push.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    s3.stop(signal.SIGKILL)  # the object store goes away in the middle of the push ...
    time.sleep(2)
    s3.start()  # ... and comes back, the same store on the same port
    output, _ = push.communicate(timeout=300)
    assert push.returncode == 0 and "Traceback" not in output, output

    s3.stop(signal.SIGKILL)
    down = repo.dvc("push", check=False, timeout=120)
    assert down.returncode != 0 and "ERROR: unexpected error - Could not connect to the endpoint URL" in down.output
    assert "Traceback" not in down.output, down.output
    s3.start()
    assert "Everything is up to date" in repo.dvc("push").output
    clone = repo.clone_to(tmp_path / "clone")
    credentials(clone)
    clone.dvc("pull")
    assert sorted(p.name for p in (clone.path / "data" / "many").iterdir()) == sorted(p.name for p in many.iterdir())
    assert all((clone.path / "data" / "many" / p.name).read_bytes() == p.read_bytes() for p in many.iterdir())
    assert clone.md5("models/model.pth") == repo.md5("models/model.pth")
