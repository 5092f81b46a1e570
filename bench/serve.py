"""Serving latency and throughput at batch 1, side by side in one run: the HTTP server (python -m stages.serve,
POST /predict with a PNG, one client and then 8 concurrent clients), the predict CLI (one process per image, as a
shell script would call it) and ONNX Runtime in process (decode + logits, no HTTP). p50 and p99 latency in
milliseconds and images per second.

    python bench/serve.py [--model models/model.onnx] [--requests 400]

Without --model it exports the default airnet (random weights: the speed does not depend on them) at 32 px."""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from workspace import REPO_ROOT, header

sys.path.insert(0, str(REPO_ROOT))
import stages  # noqa: E402,F401  (the stages' thread and allocator settings)


def default_model(folder: Path) -> Path:
    """The default airnet with random weights, exported as the export stage does."""
    import torch
    import yaml

    from stages.base.specs import model_config_of
    from stages.export import export_onnx
    from stages.model.checkpoint import make_checkpoint
    from stages.model.nets import build_model

    train = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["train"]
    torch.manual_seed(0)
    model = build_model("airnet", model_config_of(train), 10, 32, [0.5] * 3, [0.25] * 3).eval()
    checkpoint = make_checkpoint(model="airnet", model_config=model_config_of(train),
                                 classes=[f"class{i}" for i in range(10)], image_size=32, mean=[0.5] * 3,
                                 std=[0.25] * 3, state_dicts=[model.state_dict()], train={})
    path = folder / "model.onnx"
    path.write_bytes(export_onnx(model, checkpoint, 18))
    return path


def percentiles(seconds: list[float]) -> str:
    ms = np.array(seconds) * 1e3
    return f"{np.percentile(ms, 50):7.2f} | {np.percentile(ms, 99):7.2f}"


def post(port: int, body: bytes) -> float:
    start = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("POST", "/predict?top_k=1", body=body)
    response = connection.getresponse()
    response.read()
    connection.close()
    if response.status != 200:
        raise SystemExit(f"the server answered {response.status}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--requests", type=int, default=400)
    args = parser.parse_args()
    header("serving at batch 1: HTTP server, predict CLI, ONNX Runtime in process")
    folder = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    model = args.model.resolve() if args.model else default_model(folder)
    from stages.model.deploy import OnnxClassifier, decode_image

    classifier = OnnxClassifier(model, str(model))
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (classifier.image_size, classifier.image_size, 3))
    Image.fromarray(pixels.astype(np.uint8), "RGB").save(buffer, "PNG")
    body = buffer.getvalue()
    (folder / "photo.png").write_bytes(body)
    rows = []

    times = []
    for _ in range(args.requests):
        start = time.perf_counter()
        classifier.logits(decode_image(body, classifier.image_size, "photo")[None])
        times.append(time.perf_counter() - start)
    rows.append(("ONNX Runtime in process (decode + logits)", times, sum(times)))

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "stages.serve", str(model), "--port", str(port)],
                              stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    try:
        for _ in range(300):
            try:
                post(port, body)
                break
            except OSError:
                time.sleep(0.2)
        times = [post(port, body) for _ in range(args.requests)]
        rows.append(("HTTP server, 1 client", times, sum(times)))
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            times = list(pool.map(lambda _: post(port, body), range(args.requests)))
        rows.append(("HTTP server, 8 concurrent clients", times, time.perf_counter() - start))
    finally:
        os.kill(server.pid, signal.SIGTERM)
        server.wait(timeout=30)

    times = []
    for _ in range(min(20, args.requests)):  # a process per image: a handful is enough
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "stages.predict", str(model), "photo.png", "--top-k", "1"],
                       cwd=folder, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        times.append(time.perf_counter() - start)
    rows.append(("predict CLI, one process per image", times, sum(times)))

    print(f"\nmodel: {model.name} ({len(classifier.classes)} classes, {classifier.image_size} px), {args.requests} "
          "requests (the CLI: 20)\n")
    print("| path | p50 ms | p99 ms | images/s |")
    print("|---|---|---|---|")
    for name, times, wall in rows:
        print(f"| {name} | {percentiles(times)} | {len(times) / wall:,.0f} |")


if __name__ == "__main__":
    main()
