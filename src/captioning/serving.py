"""The online endpoint behind ``captioning serve``: one model, three protocols, batched on the device.

FastAPI on uvicorn, speaking what the platforms call:

- KServe's v1 protocol: ``GET /v1/models/NAME``, ``POST /v1/models/NAME:predict``;
- KServe's v1 protocol: also ``GET /`` (liveness);
- the Open Inference (v2) protocol: ``GET /v2`` (server metadata), ``/v2/health/live``, ``/v2/health/ready``,
  ``/v2/models/NAME[/versions/V]``, ``.../ready``, ``POST .../infer`` (input ``image``: BYTES, raw with the
  binary tensor extension or base64 in JSON; or ``uri``), codec in captioning.open_inference;
- Vertex AI's custom-container contract: ``AIP_HEALTH_ROUTE`` and ``AIP_PREDICT_ROUTE`` (``AIP_HTTP_PORT``
  is the port), ``{"instances": [...]}`` -> ``{"predictions": [...]}``.

An instance is ``{"b64": ...}``, ``{"image_bytes": {"b64": ...}}`` (Vertex's convention), a base64 string,
or ``{"uri": ...}`` where the server was started with ``--allow-uri PREFIX`` (a server that fetches any URL
it is handed is a way into the cluster's network). Each prediction is ``{"caption", "score",
"model_version"}``; ``score`` is the caption's mean log-probability per token.

Requests are decoded on the request threads and their images captioned together: a worker thread
takes what arrived within a short window (``window_ms``), up to ``max_batch`` images, as one batch; it
waits only while other requests' images are still being decoded, so a lone request does not wait.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import queue
import threading
from collections import Counter
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from captioning import __version__
from captioning.caption import CaptionModel
from captioning.errors import CaptioningError
from captioning.features import decode_cost
from captioning.open_inference import (EXTENSIONS, HEADER_LENGTH, INPUTS, OUTPUTS, ProtocolError, TooLarge,
                                       encode_response, parse_request)

log = logging.getLogger(__name__)

DEFAULT_NAME = "captioner"
DEFAULT_PORT = 8080
# Vertex AI sets these in the container; the defaults serve a container run elsewhere.
VERTEX_HEALTH_DEFAULT, VERTEX_PREDICT_DEFAULT = "/health", "/predict"
LIVE_ROUTE, READY_ROUTE = "/v2/health/live", "/v2/health/ready"  # manifests/serving's probes
MIB = 1 << 20


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int = 32 * MIB
    max_instances: int = 64
    max_image_bytes: int = 16 * MIB
    max_batch: int = 32
    window_ms: float = 50.0  # only waited while other requests are being decoded
    allow_uri: tuple[str, ...] = ()  # URI prefixes an instance may name; none: URIs are refused
    uri_timeout_s: float = 30.0
    max_pending: int = 1024  # images waiting for the device; past it, 503 (the client retries elsewhere or later)
    header_timeout_s: float = 10.0  # a request's headers must arrive within this, or the connection is closed
    # Memory all requests may decode into at once, by what their headers declare (features.decode_cost): the
    # InferenceService's 8 GiB less TensorFlow and the model (about 0.8 GiB at the bench sizes) and a margin.
    decode_budget_bytes: int = 4096 * MIB
    body_timeout_s: float = 60.0  # and its body within this (408)


class RequestError(Exception):
    """``close``: the body was left unread, so the connection cannot carry another request."""

    def __init__(self, status: int, message: str, close: bool = False):
        super().__init__(message)
        self.status, self.close = status, close


class Busy(Exception):
    pass


class Batcher:
    """One worker thread captioning what arrives within a window as one batch."""

    def __init__(self, model: CaptionModel, max_batch: int, window_ms: float, max_pending: int = 1024):
        self.model, self.max_batch, self.window_s = model, max_batch, window_ms / 1000.0
        self.queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self.batch_sizes: Counter = Counter()  # size -> batches run, for /stats and the bench
        self.preparing = 0  # images of requests still being decoded: worth waiting for, up to the window
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._work, name="caption-batcher", daemon=True)
        self.thread.start()

    @contextlib.contextmanager
    def expecting(self, images: int):
        """Images on their way (being decoded): the worker waits for them rather than run a smaller batch."""
        with self._lock:
            self.preparing += images
        try:
            yield
        finally:
            with self._lock:
                self.preparing -= images

    def submit(self, pixels) -> Future:
        future: Future = Future()
        try:
            self.queue.put_nowait((pixels, future))
        except queue.Full:
            raise Busy() from None
        return future

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=30)

    def _work(self) -> None:
        import time

        while (first := self.queue.get()) is not None:
            batch, stop = [first], False
            deadline = time.monotonic() + self.window_s
            while len(batch) < self.max_batch:
                if self.queue.empty() and not self.preparing:
                    break  # nothing else on its way: a lone request does not wait out the window
                try:
                    item = self.queue.get(timeout=min(max(deadline - time.monotonic(), 0), 0.002))
                except queue.Empty:
                    if time.monotonic() >= deadline:
                        break
                    continue
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._run([item for item in batch if not item[1].cancelled()])
            self.batch_sizes[len(batch)] += 1
            if stop:
                return

    def _run(self, batch: list) -> None:
        """Caption a batch; if it fails, each image alone, so one bad image fails only its own request."""
        if not batch:
            return
        try:
            results = self.model.caption([pixels for pixels, _ in batch])
        except Exception as exc:  # noqa: BLE001 - whatever the model raises goes to the requests that waited
            if len(batch) > 1:
                for item in batch:
                    self._run([item])
                return
            log.exception("captioning an image failed")
            results = [exc]
        for (_, future), result in zip(batch, results):
            if not future.done():  # a request given up meanwhile has no one to tell
                with contextlib.suppress(InvalidStateError):
                    (future.set_exception if isinstance(result, Exception) else future.set_result)(result)


def _normalised(uri: str) -> tuple[str, str, int | None, str] | None:
    """(scheme, host, port, path) with the path normalised; None for what is never allowed (userinfo)."""
    import posixpath
    from urllib.parse import unquote, urlsplit

    if "://" not in uri:
        return "file", "", None, os.path.realpath(uri)
    try:
        parsed = urlsplit(uri)
        port = parsed.port
    except ValueError:
        return None
    if parsed.username is not None or parsed.password is not None:
        return None
    path = posixpath.normpath(unquote(parsed.path) or "/")
    if parsed.scheme.lower() == "file":
        return "file", "", None, os.path.realpath(path)
    return parsed.scheme.lower(), (parsed.hostname or "").lower(), port, path


def uri_allowed(uri: str, prefixes: tuple[str, ...]) -> bool:
    """Under one of the prefixes by scheme, host, port and normalised path: not by text, so
    ``http://allowed.example@127.0.0.1/`` or ``/srv/images/../../etc/x`` are outside ``http://allowed.example``
    and ``/srv/images/``."""
    target = _normalised(uri)
    if target is None:
        return False
    for prefix in prefixes:
        allowed = _normalised(prefix)
        if allowed and allowed[:3] == target[:3]:
            base = allowed[3].rstrip("/") + "/"
            if target[3] == allowed[3] or target[3].startswith(base):
                return True
    return False


def _instance_image(index: int, instance: Any, limits: Limits) -> bytes:
    """The bytes of one instance's image (raw, decoded base64, or fetched from an allowed URI)."""
    b64 = None
    if isinstance(instance, bytes):  # a v2 binary tensor element
        if len(instance) > limits.max_image_bytes:
            raise RequestError(413, f"instance {index}: the image is larger than the limit of "
                                    f"{limits.max_image_bytes} bytes")
        return instance
    if isinstance(instance, str):
        b64 = instance
    elif isinstance(instance, dict) and isinstance(instance.get("b64"), str):
        b64 = instance["b64"]
    elif isinstance(instance, dict) and isinstance(instance.get("image_bytes"), dict) \
            and isinstance(instance["image_bytes"].get("b64"), str):
        b64 = instance["image_bytes"]["b64"]
    elif isinstance(instance, dict) and isinstance(instance.get("uri"), str):
        return _fetch(index, instance["uri"], limits)
    else:
        raise RequestError(400, f"instance {index}: expected {{\"b64\": ...}}, {{\"image_bytes\": {{\"b64\": ...}}}}, "
                                f"{{\"uri\": ...}} or a base64 string")
    if len(b64) > limits.max_image_bytes * 4 // 3 + 4:
        raise RequestError(413, f"instance {index}: the image is larger than the limit of {limits.max_image_bytes} "
                                "bytes")
    try:
        return base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"instance {index}: not valid base64") from None


def _fetch(index: int, uri: str, limits: Limits) -> bytes:
    from captioning.images import ImageUnavailable, read_image
    from captioning.redact import redact

    if not uri_allowed(uri, limits.allow_uri):
        allowed = ", ".join(limits.allow_uri) if limits.allow_uri else "none: start the server with --allow-uri PREFIX"
        raise RequestError(400, f"instance {index}: {redact(uri)} is not under an allowed URI prefix ({allowed})")
    try:  # no redirects: an allowed host must not lead the server elsewhere
        return read_image(uri, limits.max_image_bytes, limits.uri_timeout_s, follow_redirects=False)
    except ImageUnavailable as exc:
        # The reason only where it tells the client nothing about the network behind the server.
        reason = str(exc)
        if "limit of" in reason:
            raise RequestError(413, f"instance {index}: {redact(uri)}: {reason}") from None
        shown = reason if reason.startswith("HTTP ") else "it could not be fetched"
        raise RequestError(400, f"instance {index}: {redact(uri)}: {shown}") from None


def _check_count(instances: Any, limits: Limits) -> None:
    if not isinstance(instances, list) or not instances:
        raise RequestError(400, "no instances: send {\"instances\": [...]} with at least one image")
    if len(instances) > limits.max_instances:
        raise RequestError(413, f"{len(instances)} instances, more than the limit of {limits.max_instances} "
                                "per request")


# What a decoded image weighs until it is captioned: 299x299x3 float32.
PREPARED_BYTES = 299 * 299 * 3 * 4


def _gather(model: CaptionModel, instances: list, limits: Limits, gone: threading.Event) -> tuple[list[bytes], int]:
    """Every instance's bytes (decoded base64, or fetched), each header checked (a bomb is the request's 400
    here), and the memory decoding them will take: they are decoded one after another, so the largest
    decode plus the decoded images kept until they are captioned. Nothing is decoded yet. Runs off the
    event loop (header parsing costs time on crafted files); stops when the client goes."""
    from captioning.features import image_problem

    max_pixels = getattr(model, "max_pixels", None)
    gathered, largest = [], 0
    for index, instance in enumerate(instances):
        if gone.is_set():
            return [], 0
        data = _instance_image(index, instance, limits)
        if max_pixels and (problem := image_problem(data, max_pixels)):
            raise RequestError(400, f"instance {index}: cannot caption it: {problem}")
        largest = max(largest, decode_cost(data))
        gathered.append(data)
    return gathered, largest + len(gathered) * PREPARED_BYTES


def _decode(model: CaptionModel, images: list[bytes], gone: threading.Event) -> list:
    """Every image checked and decoded before any is captioned: one bad image is the request's 4xx."""
    prepared = []
    for index, data in enumerate(images):
        if gone.is_set():
            return []
        try:
            prepared.append(model.prepare(data))
        except CaptioningError as exc:
            raise RequestError(400, f"instance {index}: cannot caption it: {exc}") from None
    return prepared


class DecodeBudget:
    """Memory for decoding, taken by a request before it decodes (from its images' headers) and given back
    after: a request that does not fit now is refused at once (503), one that never fits is 413."""

    def __init__(self, total: int):
        self.total, self.in_use, self.peak = total, 0, 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def taken(self, cost: int):
        if cost > self.total:
            raise RequestError(413, f"the images need {cost >> 20} MiB to decode, more than this server's decode "
                                    f"budget of {self.total >> 20} MiB (--decode-budget-mb); send them apart or "
                                    "smaller")
        with self._lock:
            if self.in_use + cost > self.total:
                raise RequestError(503, f"busy: {self.in_use >> 20} of {self.total >> 20} MiB of decoding memory "
                                        f"in use, this request needs {cost >> 20}; retry later")
            self.in_use += cost
            self.peak = max(self.peak, self.in_use)
        try:
            yield
        finally:
            with self._lock:
                self.in_use -= cost


def create_app(model: CaptionModel, name: str = DEFAULT_NAME, limits: Limits = Limits()):
    """The ASGI app for one loaded model (the batcher starts and stops with the app)."""
    state: dict = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state["batcher"] = Batcher(model, limits.max_batch, limits.window_ms, limits.max_pending)
        state["budget"] = DecodeBudget(limits.decode_budget_bytes)
        yield
        state["batcher"].close()

    app = FastAPI(title="captioning", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError):
        headers = {"Connection": "close"} if exc.close else {}
        if exc.status == 503:
            headers["Retry-After"] = "1"
        return JSONResponse({"error": str(exc)}, status_code=exc.status, headers=headers or None)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect):
        log.info("%s %s: the client went away before the request was answered", request.method, request.url.path)
        return Response(status_code=499)  # nobody reads it; nginx's code for "client closed the request"

    @app.exception_handler(StarletteHTTPException)
    async def routing_error(request: Request, exc: StarletteHTTPException):
        """A route not here (404) or a method a route does not take (405), in the protocols' error shape."""
        return JSONResponse({"error": f"{request.method} {request.url.path}: {exc.detail}"},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    def ready() -> bool:
        return "batcher" in state and state["batcher"].thread.is_alive()

    def check_name(model_name: str) -> None:
        if model_name != name:
            raise RequestError(404, f"no model {model_name!r} here; this server serves {name!r}")

    async def read_body(request: Request) -> bytes:
        """The body, refused once it passes the limit (declared or received: chunked bodies count too) or the
        time limit (a client trickling it holds no connection for long)."""
        if request.headers.get("content-encoding", "identity").lower() != "identity":
            raise RequestError(415, f"Content-Encoding {request.headers['content-encoding']!r}: send the body "
                                    "uncompressed (images do not compress)")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_request_bytes:
            raise RequestError(413, f"request body of {declared} bytes, more than the limit of "
                                    f"{limits.max_request_bytes}", close=True)
        body = bytearray()
        deadline = asyncio.get_running_loop().time() + limits.body_timeout_s
        chunks = request.stream()
        while True:
            try:
                chunk = await asyncio.wait_for(anext(chunks, None),
                                               max(deadline - asyncio.get_running_loop().time(), 0))
            except asyncio.TimeoutError:
                raise RequestError(408, f"the request body did not arrive within {limits.body_timeout_s:g} s",
                                   close=True) from None
            if chunk is None:
                return bytes(body)
            body += chunk
            if len(body) > limits.max_request_bytes:
                raise RequestError(413, f"request body larger than the limit of {limits.max_request_bytes} bytes",
                                   close=True)

    async def read_json(request: Request) -> Any:
        if request.headers.get(HEADER_LENGTH) is not None:
            raise RequestError(400, f"{HEADER_LENGTH}: binary tensor data is for the v2 infer route "
                                    f"(/v2/models/{name}/infer)")
        body = await read_body(request)
        try:  # off the event loop: 32 MiB of JSON takes a while
            return await run_in_threadpool(json.loads, body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise RequestError(400, "the request body is not JSON (or nested too deeply)") from None

    async def caption(request: Request, instances: list) -> list[dict]:
        """Decode, then caption with other requests' images; a client that goes away meanwhile stops both."""
        batcher = state["batcher"]
        gone = threading.Event()  # _gather and _decode look at it between images

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            gone.set()

        _check_count(instances, limits)
        # Overload is found out before any work: the queue's room, then (from the headers) the decoding memory.
        if batcher.queue.qsize() + batcher.preparing + len(instances) > limits.max_pending:
            raise RequestError(503, f"busy: {limits.max_pending} images are waiting for the device; retry later")
        watcher = asyncio.create_task(watch())
        try:
            images, cost = await run_in_threadpool(_gather, model, instances, limits, gone)
            try:
                with state["budget"].taken(cost), batcher.expecting(len(images)):
                    prepared = await run_in_threadpool(_decode, model, images, gone)
                    if gone.is_set():
                        raise ClientDisconnect()
                    futures = [asyncio.wrap_future(batcher.submit(p)) for p in prepared]
            except Busy:
                raise RequestError(503, f"busy: {limits.max_pending} images are waiting for the device; retry "
                                        "later") from None
            results = asyncio.gather(*futures)
            done, _ = await asyncio.wait({results, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if results not in done:
                for future in futures:
                    future.cancel()  # the batcher skips cancelled images
                # retrieved, so that asyncio does not log the cancellation as an error nobody saw
                results.add_done_callback(lambda f: f.cancelled() or f.exception())
                raise ClientDisconnect()
        finally:
            watcher.cancel()
        return [{"caption": r.caption, "score": round(r.score, 6), "model_version": model.version}
                for r in results.result()]

    async def predict(request: Request) -> dict:
        body = await read_json(request)
        if not isinstance(body, dict) or "instances" not in body:
            raise RequestError(400, "expected {\"instances\": [...]}")
        return {"predictions": await caption(request, body["instances"])}

    # -- KServe v1
    @app.get("/")
    async def v1_live():  # kserve's InferenceRESTClient.is_server_live (v1)
        return {"status": "alive"}

    @app.get("/v1/models/{model_name}")
    async def v1_model(model_name: str):
        if model_name.endswith(":predict"):  # the predict route, asked with GET
            return JSONResponse({"error": f"GET /v1/models/{model_name}: use POST"}, status_code=405,
                                headers={"Allow": "POST"})
        check_name(model_name)
        return {"name": name, "ready": ready()}

    @app.post("/v1/models/{model_name}:predict")
    async def v1_predict(model_name: str, request: Request):
        check_name(model_name)
        return await predict(request)

    # -- Open Inference (v2)
    @app.get(LIVE_ROUTE)
    async def v2_live():  # the worker thread is what can die: then restart the pod
        alive = "batcher" not in state or state["batcher"].thread.is_alive()
        return JSONResponse({"live": alive}, status_code=200 if alive else 503)

    @app.get(READY_ROUTE)
    async def v2_ready():
        return JSONResponse({"ready": ready()}, status_code=200 if ready() else 503)

    @app.get("/v2")
    async def v2_server_metadata():
        return {"name": "captioning", "version": __version__, "extensions": EXTENSIONS}

    def check_version(version: str | None) -> None:
        if version is not None and version != model.version:
            raise RequestError(404, f"model {name!r} has no version {version!r} here; it serves "
                                    f"{model.version or 'one unversioned model'}")

    @app.get("/v2/models/{model_name}")
    @app.get("/v2/models/{model_name}/versions/{version}")
    async def v2_metadata(model_name: str, version: str | None = None):
        check_name(model_name)
        check_version(version)
        return {"name": name, "versions": [model.version] if model.version else [], "platform": "tensorflow",
                "inputs": [{"name": n, "datatype": t, "shape": [-1]} for n, t in INPUTS.items()],
                "outputs": [{"name": n, "datatype": t, "shape": [-1]} for n, t in OUTPUTS.items()],
                # what Open Inference leaves open, as an extension's fields would say it
                "parameters": {"inputs": "one of them per request", "max_instances": limits.max_instances,
                               "max_batch": limits.max_batch, "window_ms": limits.window_ms}}

    @app.get("/v2/models/{model_name}/ready")
    @app.get("/v2/models/{model_name}/versions/{version}/ready")
    async def v2_model_ready(model_name: str, version: str | None = None):
        check_name(model_name)
        check_version(version)
        return JSONResponse({"name": name, "ready": ready()}, status_code=200 if ready() else 503)

    @app.get("/v2/models/{model_name}/stats")
    async def v2_stats(model_name: str):
        check_name(model_name)
        sizes = state["batcher"].batch_sizes if "batcher" in state else {}
        budget = state.get("budget")
        memory = {"total_mib": budget.total >> 20, "in_use_mib": budget.in_use >> 20,
                  "peak_mib": budget.peak >> 20} if budget else {}
        return {"name": name, "batch_sizes": {str(k): v for k, v in sorted(sizes.items())}, "decode_budget": memory}

    @app.post("/v2/models/{model_name}/infer")
    @app.post("/v2/models/{model_name}/versions/{version}/infer")
    async def v2_infer(model_name: str, request: Request, version: str | None = None):
        check_name(model_name)
        check_version(version)
        body = await read_body(request)
        try:  # off the event loop: 32 MiB of JSON takes a while
            infer = await run_in_threadpool(parse_request, body, request.headers.get(HEADER_LENGTH),
                                            limits.max_instances)
        except ProtocolError as exc:
            raise RequestError(413 if isinstance(exc, TooLarge) else 400, str(exc)) from None
        predictions = await caption(request, infer.instances)
        values = {"caption": [p["caption"] for p in predictions], "score": [p["score"] for p in predictions]}
        content, headers = encode_response(infer, name, model.version, values)
        return Response(content, headers=headers)

    # -- Vertex AI
    health_route = os.environ.get("AIP_HEALTH_ROUTE") or VERTEX_HEALTH_DEFAULT
    predict_route = os.environ.get("AIP_PREDICT_ROUTE") or VERTEX_PREDICT_DEFAULT

    @app.get(health_route)
    async def vertex_health():
        return JSONResponse({"ready": ready()}, status_code=200 if ready() else 503)

    @app.post(predict_route)
    async def vertex_predict(request: Request):
        return await predict(request)

    return app


def serve(model: CaptionModel, name: str, host: str, port: int, limits: Limits) -> None:
    """Run until stopped (SIGTERM: uvicorn finishes the requests in flight)."""
    import uvicorn

    log.info("serving %s (version %s) on %s:%d", name, model.version or "-", host, port)
    uvicorn.Server(server_config(create_app(model, name, limits), host, port, limits.header_timeout_s)).run()


def server_config(app, host: str, port: int, header_timeout_s: float = Limits.header_timeout_s):
    """uvicorn's settings for the app (``serve``, the bench and the tests): h11 and asyncio whatever else is
    installed (uvicorn's "auto" takes httptools and uvloop where present), so it behaves the same everywhere,
    with a time limit on each request's headers (uvicorn has none)."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                          http=_timed_h11(header_timeout_s), loop="asyncio")


def _timed_h11(header_timeout_s: float):
    """uvicorn's h11 protocol, closing a connection whose request headers have not all arrived within the time
    limit: on a new connection and between keep-alive requests (uvicorn's keep-alive timer stops at the first
    byte, so a client sending one byte at a time would hold the connection forever)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            if not self.transport.is_closing():
                log.info("closed a connection from %s: its request headers did not arrive within %g s",
                         self.client[0] if self.client else "?", header_timeout_s)
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # a request is being answered: its body has a timer of its own

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return TimedH11
