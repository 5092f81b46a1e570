"""serve: the exported model (models/model.onnx) behind a small HTTP server, without torch: the Open Inference
Protocol (V2) paths that KServe, Triton, MLServer and Seldon share, and POST /predict for an image file.

    python -m stages.serve models/model.onnx [--host 127.0.0.1] [--port 8000] [--name cifar-classifier]

    GET  /v2/health/live, /v2/health/ready      probes: 200 while the server runs / once the model is loaded
    GET  /v2/models/<name>                      the model: inputs, outputs, class names, image size
    GET  /v2/models/<name>/ready
    POST /v2/models/<name>/infer                V2 JSON: one UINT8 input [N, 3, S, S] -> FP32 logits [N, classes]
    POST /predict?top_k=5                       an image file as the body -> the same JSON as
                                                `python -m stages.predict --format json` (one row, file "request")

Images are decoded by stages/model/deploy.py, as predict decodes them on ONNX Runtime (formats by content, EXIF
rotation, RGB, centre square, its byte and pixel limits). Every request a client can get wrong gets a 4xx with a
one-line JSON error, {"error": "..."}, and the server carries on. It binds 127.0.0.1 unless told otherwise, and
SIGTERM (or Ctrl-C) shuts it down cleanly, finishing the requests in flight. Starlette and uvicorn come with the
`serve` extra (`pip install -e '.[serve]'`)."""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from stages.base.runtime import PipelineError, brief, run_stage
from stages.dataset.imagefiles import MAX_BYTES, over_byte_limit
from stages.model.deploy import INPUT_NAME, OUTPUT_NAME, OnnxClassifier, decode_image, top_classes

DEFAULT_NAME = "cifar-classifier"  # dvc.yaml's artifact name for models/model.onnx
MAX_BATCH = 256  # images in one V2 request
MAX_JSON_BYTES = 64 * 2**20  # a V2 request body: 256 images of 32 px as JSON numbers take about 3 MB


class RequestError(Exception):
    """A request the client got wrong: answered with `status` and {"error": message}."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------- what the routes compute (no HTTP in here)


def model_metadata(classifier: OnnxClassifier, name: str) -> dict[str, Any]:
    size = classifier.image_size
    return {"name": name, "versions": ["1"], "platform": "onnxruntime_onnx",
            "inputs": [{"name": INPUT_NAME, "datatype": "UINT8", "shape": [-1, 3, size, size]}],
            "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, len(classifier.classes)]}],
            "parameters": {"classes": classifier.classes, "image_size": size}}


def v2_images(request: Any, classifier: OnnxClassifier) -> np.ndarray:
    """The uint8 images N x 3 x S x S of a V2 inference request (parsed JSON), or a RequestError saying what is
    wrong with it."""
    size = classifier.image_size
    expected = f"one input {INPUT_NAME!r}, datatype UINT8, shape [N, 3, {size}, {size}] (N <= {MAX_BATCH})"
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list) or len(request["inputs"]) != 1:
        raise RequestError(400, f"expected a JSON object with 'inputs': a list of {expected}")
    tensor = request["inputs"][0]
    if not isinstance(tensor, dict) or tensor.get("name") != INPUT_NAME:
        raise RequestError(400, f"input name {brief(tensor.get('name') if isinstance(tensor, dict) else tensor)}; "
                                f"expected {expected}")
    if tensor.get("datatype") != "UINT8":
        raise RequestError(400, f"datatype {brief(tensor.get('datatype'))}; expected {expected}")
    shape = tensor.get("shape")
    if (not isinstance(shape, list) or len(shape) != 4 or not all(type(d) is int for d in shape)
            or shape[1:] != [3, size, size] or not 1 <= shape[0] <= MAX_BATCH):
        raise RequestError(400, f"shape {brief(shape)}; expected {expected}")
    data = tensor.get("data")
    count = int(np.prod(shape))
    if not isinstance(data, list) or len(data) != count:
        found = f"{len(data)} values" if isinstance(data, list) else brief(data)
        raise RequestError(400, f"data: {found}; expected a flat list of {count:,} integers 0..255 (row-major)")
    try:
        values = np.asarray(data, dtype=np.int64)
    except (ValueError, TypeError, OverflowError):
        raise RequestError(400, "data: expected integers 0..255 only") from None
    if values.ndim != 1 or values.size and (values.min() < 0 or values.max() > 255):
        raise RequestError(400, "data: expected integers 0..255 only")
    return values.astype(np.uint8).reshape(shape)


def v2_response(logits: np.ndarray, name: str, request_id: Any) -> dict[str, Any]:
    response: dict[str, Any] = {"model_name": name, "model_version": "1"}
    if isinstance(request_id, str):
        response["id"] = request_id
    response["outputs"] = [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": list(logits.shape),
                            "data": logits.astype(np.float32).ravel().tolist()}]
    return response


def predict_image(body: bytes, classifier: OnnxClassifier, top_k: int) -> list[dict[str, Any]]:
    """The top-k JSON of `python -m stages.predict --format json` for one image sent as the request body."""
    try:
        image = decode_image(body, classifier.image_size, "request")
    except PipelineError as error:
        raise RequestError(400, str(error)) from None
    probabilities, indices = top_classes(classifier.logits(image[None]), min(top_k, len(classifier.classes)))
    return [{"file": "request", "predictions": [{"class": classifier.classes[i], "probability": round(q, 6)}
                                                for i, q in zip(indices[0].tolist(), probabilities[0].tolist())]}]


def parse_top_k(text: str | None, classes: int) -> int:
    if text is None:
        return 5
    if not text.isdigit() or not 1 <= int(text) <= 1000:
        raise RequestError(400, f"top_k: expected a whole number from 1 to 1000 (the model has {classes} classes), "
                                f"got {brief(text)}")
    return int(text)


# ---------------------------------------------------------------- the HTTP side


def make_app(classifier: OnnxClassifier, name: str) -> Any:
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    def known(request: Request) -> None:
        asked = request.path_params["model"]
        if asked != name:
            raise RequestError(404, f"unknown model {brief(asked)}; this server serves {name!r}")

    async def body_of(request: Request, limit: int, what: str) -> bytes:
        """The request body, refused (413) as soon as it passes `limit` bytes: announced or streamed."""
        announced = request.headers.get("content-length")
        if announced and announced.isdigit() and int(announced) > limit:
            raise RequestError(413, f"{what}: {over_byte_limit(int(announced), limit)}")
        chunks, received = [], 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise RequestError(413, f"{what}: {over_byte_limit(received, limit)} (and more was sent)")
            chunks.append(chunk)
        return b"".join(chunks)

    async def live(request: Request) -> JSONResponse:
        return JSONResponse({"live": True})

    async def ready(request: Request) -> JSONResponse:
        return JSONResponse({"ready": True})

    async def metadata(request: Request) -> JSONResponse:
        known(request)
        return JSONResponse(model_metadata(classifier, name))

    async def model_ready(request: Request) -> JSONResponse:
        known(request)
        return JSONResponse({"name": name, "ready": True})

    async def infer(request: Request) -> JSONResponse:
        known(request)
        body = await body_of(request, MAX_JSON_BYTES, "request body")
        try:
            parsed = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as decode_error:
            raise RequestError(400, f"not valid JSON ({decode_error})") from None
        images = v2_images(parsed, classifier)
        logits = await run_in_threadpool(classifier.logits, images)
        return JSONResponse(v2_response(logits, name, parsed.get("id")))

    async def predict(request: Request) -> JSONResponse:
        top_k = parse_top_k(request.query_params.get("top_k"), len(classifier.classes))
        body = await body_of(request, MAX_BYTES, "image")
        if not body:
            raise RequestError(400, "the request has no body: send the image file's bytes")
        return JSONResponse(await run_in_threadpool(predict_image, body, classifier, top_k))

    async def request_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestError)
        return error(exc.status, str(exc))

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        return error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    async def server_error(request: Request, exc: Exception) -> JSONResponse:  # a bug: still one line, and alive
        message = str(exc) if isinstance(exc, PipelineError) else f"internal error ({type(exc).__name__})"
        return error(500, message)

    routes = [Route("/v2/health/live", live), Route("/v2/health/ready", ready),
              Route("/v2/models/{model}", metadata), Route("/v2/models/{model}/ready", model_ready),
              Route("/v2/models/{model}/infer", infer, methods=["POST"]), Route("/predict", predict, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={RequestError: request_error, HTTPException: http_error,
                                                       Exception: server_error})


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stages.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="a .onnx model written by the export stage (models/model.onnx)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--name", default=DEFAULT_NAME,
                        help=f"the model's name in the V2 paths (default {DEFAULT_NAME})")
    return parser.parse_args(argv)


def serve(args: argparse.Namespace) -> None:
    if args.model.suffix.lower() != ".onnx":
        raise PipelineError(f"{args.model}: expected a .onnx model written by the export stage (models/model.onnx)")
    if not 0 <= args.port <= 65535:
        raise PipelineError(f"--port {args.port}: expected 0 to 65535")
    classifier = OnnxClassifier(args.model, str(args.model))
    with socket.socket() as probe:  # a taken port is one line here, not uvicorn's log and exit
        try:
            probe.bind((args.host, args.port))
        except OSError as error:
            raise PipelineError(f"--host {args.host} --port {args.port}: cannot listen there "
                                f"({error.strerror or error})") from None
    try:
        import uvicorn
    except ImportError:
        raise PipelineError("uvicorn and starlette are not installed: pip install -e '.[serve]'") from None
    app = make_app(classifier, args.name)
    print(f"serving {args.model} as {args.name!r} ({len(classifier.classes)} classes, {classifier.image_size} px) "
          f"on http://{args.host}:{args.port}", flush=True)
    # uvicorn finishes the requests in flight on SIGTERM, then raises the signal again for the handler it found:
    # make that one an ordinary exit (status 0), as a supervisor expects of a clean shutdown
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    run_stage(lambda: serve(args))


if __name__ == "__main__":
    main()
