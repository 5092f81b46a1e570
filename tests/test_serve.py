"""The HTTP server for an exported model (python -m stages.serve), started on 127.0.0.1 on a free port as a real
process and stopped by its pid: the V2 probes, metadata and inference, POST /predict equal to the predict CLI,
every request a client can get wrong answered with its 4xx and one line (the server still answering after), a
bounded load test, and a clean shutdown on SIGTERM."""

from __future__ import annotations

import concurrent.futures
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from PIL import Image

from repo_root import REPO_ROOT
from test_predict import CLASSES, SIZE, write_onnx_model

NAME = "cifar-classifier"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    def __init__(self, process: subprocess.Popen[str], port: int) -> None:
        self.process, self.port = process, port

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, Any]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            data = response.read()
        finally:
            connection.close()
        return response.status, json.loads(data) if data else None


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    write_onnx_model(root / "model.onnx")
    rng = np.random.default_rng(1)
    for index, size in enumerate([(SIZE, SIZE), (40, 24), (7, 9)]):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(root / f"photo{index}.png")
    return root


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[Server]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "stages.serve", "model.onnx", "--port", str(port)],
                               cwd=model_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    running = Server(process, port)
    deadline = time.monotonic() + 60
    while True:
        try:
            if running.request("GET", "/v2/health/ready")[0] == 200:
                break
        except OSError:
            pass
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        assert time.monotonic() < deadline, "the server did not start within 60 s"
        time.sleep(0.2)
    yield running
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def test_probes_and_metadata(server: Server) -> None:
    assert server.request("GET", "/v2/health/live") == (200, {"live": True})
    assert server.request("GET", "/v2/health/ready") == (200, {"ready": True})
    assert server.request("GET", f"/v2/models/{NAME}/ready") == (200, {"name": NAME, "ready": True})
    status, metadata = server.request("GET", f"/v2/models/{NAME}")
    assert status == 200
    assert metadata["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, 3, SIZE, SIZE]}]
    assert metadata["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, len(CLASSES)]}]
    assert metadata["parameters"] == {"classes": CLASSES, "image_size": SIZE}


def test_predict_answers_as_the_cli_does(server: Server, model_dir: Path) -> None:
    files = sorted(model_dir.glob("photo*.png"))
    cli = subprocess.run([sys.executable, "-m", "stages.predict", "model.onnx", *[f.name for f in files],
                          "--format", "json", "--top-k", "3"], cwd=model_dir, capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    expected = json.loads(cli.stdout)
    for path, row in zip(files, expected):
        status, answer = server.request("POST", "/predict?top_k=3", path.read_bytes(),
                                        {"Content-Type": "image/png"})
        assert status == 200
        (served,) = answer
        assert [p["class"] for p in served["predictions"]] == [p["class"] for p in row["predictions"]]
        for ours, theirs in zip(served["predictions"], row["predictions"]):
            assert ours["probability"] == pytest.approx(theirs["probability"], abs=1e-6)


def test_v2_infer_gives_the_models_logits(server: Server, model_dir: Path) -> None:
    from stages.model.deploy import OnnxClassifier

    images = np.random.default_rng(2).integers(0, 256, (3, 3, SIZE, SIZE), dtype=np.uint8)
    request = {"id": "r1", "inputs": [{"name": "images", "datatype": "UINT8", "shape": list(images.shape),
                                       "data": images.ravel().tolist()}]}
    status, answer = server.request("POST", f"/v2/models/{NAME}/infer", json.dumps(request).encode(),
                                    {"Content-Type": "application/json"})
    assert status == 200 and answer["id"] == "r1" and answer["model_name"] == NAME
    (output,) = answer["outputs"]
    assert output["name"] == "logits" and output["datatype"] == "FP32" and output["shape"] == [3, len(CLASSES)]
    expected = OnnxClassifier(model_dir / "model.onnx", "model.onnx").logits(images)
    np.testing.assert_allclose(np.array(output["data"]).reshape(3, -1), expected, atol=1e-6, rtol=0)


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels (1-bit: small on disk)."""
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


def v2(**changes: Any) -> bytes:
    tensor = {"name": "images", "datatype": "UINT8", "shape": [1, 3, SIZE, SIZE], "data": [0] * (3 * SIZE * SIZE)}
    tensor.update(changes)
    return json.dumps({"inputs": [tensor]}).encode()


BAD_REQUESTS = [  # (method, path, body, headers, status, start of the one-line error)
    ("POST", "/predict", b"not an image at all", {}, 400, "request: cannot read image (not a JPEG, PNG"),
    ("POST", "/predict", b"", {}, 400, "the request has no body"),
    ("POST", "/predict", b"x" * 10, {"Content-Length": str(200 * 2**20)}, 413, "image: 209,715,200 bytes, over the"),
    ("POST", "/predict", png_declaring(9500, 9500), {}, 400, "request: cannot read image (9500x9500 pixels, over"),
    ("POST", "/predict?top_k=0", b"x", {}, 400, "top_k: expected a whole number"),
    ("GET", "/predict", None, {}, 405, "GET /predict: Method Not Allowed"),
    ("GET", "/nowhere", None, {}, 404, "GET /nowhere: Not Found"),
    ("GET", "/v2/models/other", None, {}, 404, "unknown model 'other'"),
    ("POST", "/v2/models/other/infer", v2(), {}, 404, "unknown model 'other'"),
    ("POST", f"/v2/models/{NAME}/infer", b"{not json", {}, 400, "not valid JSON"),
    ("POST", f"/v2/models/{NAME}/infer", b"[1, 2]", {}, 400, "expected a JSON object with 'inputs'"),
    ("POST", f"/v2/models/{NAME}/infer", v2(name="pixels"), {}, 400, "input name 'pixels'; expected one input"),
    ("POST", f"/v2/models/{NAME}/infer", v2(datatype="FP32"), {}, 400, "datatype 'FP32'; expected one input"),
    ("POST", f"/v2/models/{NAME}/infer", v2(shape=[1, 3, 32, 32]), {}, 400, "shape [1, 3, 32, 32]; expected"),
    ("POST", f"/v2/models/{NAME}/infer", v2(shape=[0, 3, SIZE, SIZE], data=[]), {}, 400, "shape [0, 3, 16, 16]"),
    ("POST", f"/v2/models/{NAME}/infer", v2(shape=[10**6, 3, SIZE, SIZE]), {}, 400, "shape [1000000, 3, 16, 16]"),
    ("POST", f"/v2/models/{NAME}/infer", v2(data=[0, 1, 2]), {}, 400, "data: 3 values; expected a flat list of 768"),
    ("POST", f"/v2/models/{NAME}/infer", v2(data=[300] * 768), {}, 400, "data: expected integers 0..255 only"),
    ("POST", f"/v2/models/{NAME}/infer", v2(data=["a"] * 768), {}, 400, "data: expected integers 0..255 only"),
    ("POST", f"/v2/models/{NAME}/infer", v2(data=[[0]] * 768), {}, 400, "data: expected integers 0..255 only"),
]


@pytest.mark.parametrize(("method", "path", "body", "headers", "status", "message"), BAD_REQUESTS,
                         ids=[f"{m} {p} {s} {e[:24]}" for m, p, _, _, s, e in BAD_REQUESTS])
def test_a_bad_request_gets_its_4xx_and_one_line(server: Server, model_dir: Path, method: str, path: str,
                                                 body: bytes | None, headers: dict[str, str], status: int,
                                                 message: str) -> None:
    try:
        got_status, answer = server.request(method, path, body, headers)
    except (ConnectionError, http.client.HTTPException):  # the server may close early on an announced huge body
        got_status, answer = None, None
    if got_status is not None:
        assert got_status == status, answer
        assert list(answer) == ["error"] and answer["error"].startswith(message), answer
        assert "\n" not in answer["error"]
    # and the server answers correctly after it
    status_after, answer_after = server.request("POST", "/predict?top_k=1", (model_dir / "photo0.png").read_bytes())
    assert status_after == 200 and len(answer_after[0]["predictions"]) == 1


@pytest.mark.slow
def test_a_bounded_load_loses_no_request(server: Server, model_dir: Path) -> None:
    """8 concurrent clients, 2,000 requests in all, on 127.0.0.1: every one answered, and answered alike."""
    body = (model_dir / "photo1.png").read_bytes()
    _, reference = server.request("POST", "/predict", body)

    def client(count: int) -> list[Any]:
        return [server.request("POST", "/predict", body) for _ in range(count)]

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        answers = [answer for batch in pool.map(client, [250] * 8) for answer in batch]
    assert len(answers) == 2000 and all(answer == (200, reference) for answer in answers)


def test_sigterm_shuts_the_server_down_cleanly(model_dir: Path) -> None:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "stages.serve", "model.onnx", "--port", str(port)],
                               cwd=model_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    server = Server(process, port)
    for _ in range(300):
        try:
            if server.request("GET", "/v2/health/live")[0] == 200:
                break
        except OSError:
            time.sleep(0.2)
    assert f"on http://127.0.0.1:{port}" in process.stdout.readline()  # binds this machine only by default
    os.kill(process.pid, signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    assert "Traceback" not in process.stderr.read()


@pytest.mark.parametrize(("arguments", "message"), [
    (["missing.onnx"], "error: missing.onnx: ONNX model not found"),
    (["model.pth"], "error: model.pth: expected a .onnx model written by the export stage"),
    (["model.onnx", "--port", "70000"], "error: --port 70000: expected 0 to 65535"),
])
def test_bad_arguments_are_one_line(model_dir: Path, arguments: list[str], message: str) -> None:
    done = subprocess.run([sys.executable, "-m", "stages.serve", *arguments], cwd=model_dir, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode == 2 and done.stderr.startswith(message) and done.stderr.count("\n") == 1, done.stderr


def test_a_taken_port_is_one_line(model_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "stages.serve", "model.onnx", "--port", str(port)],
                              cwd=model_dir, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert done.stderr.startswith(f"error: --host 127.0.0.1 --port {port}: cannot listen there")


def test_the_server_needs_no_torch() -> None:
    code = "import sys, stages.serve; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
