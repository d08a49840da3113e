"""What guards the server and the batch pipeline, without a model: the batcher's failures, URI allowlists,
hostile URIs and bucket object names."""

import contextlib
import os
import threading
import time
from concurrent.futures import Future

import pytest

from captioning.caption import Captioned
from captioning.images import ImageUnavailable, read_image
from captioning.serving import Batcher, Busy, uri_allowed


class FakeModel:
    """Captions "cap-N" for pixel N; raises for the pixel "poison" (as a model might on one odd input)."""

    def __init__(self, delay: float = 0.0):
        self.delay, self.calls = delay, []

    def caption(self, pixels):
        self.calls.append(list(pixels))
        time.sleep(self.delay)
        if "poison" in pixels:
            raise RuntimeError("the model choked")
        return [Captioned("", f"cap-{p}", [], None, -1.0) for p in pixels]


def test_a_failing_image_fails_only_its_own_request():
    batcher = Batcher(FakeModel(), max_batch=8, window_ms=100)
    futures = [batcher.submit(p) for p in ("a", "poison", "b")]
    assert futures[0].result(timeout=10).caption == "cap-a" and futures[2].result(timeout=10).caption == "cap-b"
    with pytest.raises(RuntimeError, match="choked"):
        futures[1].result(timeout=10)
    assert batcher.thread.is_alive()
    batcher.close()


def test_a_request_given_up_does_not_stop_the_worker():
    model = FakeModel(delay=0.3)
    batcher = Batcher(model, max_batch=8, window_ms=50)
    first = batcher.submit("x")  # the worker is busy with it for 0.3 s
    time.sleep(0.1)
    gone, kept = batcher.submit("gone"), batcher.submit("kept")
    assert gone.cancel()
    assert first.result(timeout=10).caption == "cap-x" and kept.result(timeout=10).caption == "cap-kept"
    assert batcher.thread.is_alive() and ["gone"] not in model.calls
    batcher.close()


def test_a_full_queue_is_refused_not_buffered():
    batcher = Batcher(FakeModel(delay=0.5), max_batch=1, window_ms=0, max_pending=2)
    batcher.submit("a")
    time.sleep(0.1)  # the worker holds "a"; two may wait
    batcher.submit("b"), batcher.submit("c")
    with pytest.raises(Busy):
        batcher.submit("d")
    batcher.close()


@pytest.mark.parametrize("uri, allowed", [
    ("gs://photos/2026/a.jpg", True),
    ("gs://photos-other/a.jpg", False),
    ("gs://photos/../x.jpg", True),  # the bucket is the host: a path cannot climb out of it
    ("gs://photos@other/x.jpg", False),
    ("http://images.example.com/a/b.jpg", True),
    ("http://images.example.com@127.0.0.1:1/x.jpg", False),  # userinfo: the host is 127.0.0.1
    ("http://images.example.com:8080/a/x.jpg", False),  # another port
    ("http://images.example.com/a/../../admin", False),
    ("http://images.example.com/ab/x.jpg", False),  # a sibling folder is no child
    ("http://[::1/x.jpg", False),
    ("/srv/images/cat.jpg", True),
    ("/srv/images/../../etc/hostname", False),
    ("file:///srv/images/cat.jpg", True),
])
def test_uris_are_allowed_by_what_they_reach_not_by_their_text(uri, allowed):
    assert uri_allowed(uri, ("gs://photos/", "http://images.example.com/a/", "/srv/images/")) is allowed


def test_hostile_uris_are_a_reason_not_a_crash_or_a_hang(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    started = time.monotonic()
    for uri, reason in ((str(fifo), "not a regular file"), ("http://[::1", "not a usable URI"),
                        (str(tmp_path / "none.jpg"), "file not found"), ("ftp://host/x.jpg", "unsupported scheme")):
        with pytest.raises(ImageUnavailable, match=reason):
            read_image(uri, 1 << 20, timeout_s=1)
    assert time.monotonic() - started < 5


def test_a_redirect_is_refused_when_the_server_says_so(tmp_path):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Redirect(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_HEAD(self):
            self.send_response(302)
            self.send_header("Location", "http://127.0.0.1:9/internal")
            self.end_headers()

        do_GET = do_HEAD

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ImageUnavailable):
            read_image(f"http://127.0.0.1:{server.server_port}/a.jpg", 1 << 20, 5, follow_redirects=False)
    finally:
        server.shutdown()


def test_a_bucket_object_cannot_land_outside_the_model_folder(gcs_emulator, tmp_path):
    from captioning.gcs import storage_client
    from captioning.model_source import resolve_model

    bucket = storage_client().create_bucket("models")
    bucket.blob("v1/captioner.keras").upload_from_string(b"x")
    bucket.blob(f"v1/{tmp_path}/evil.txt").upload_from_string(b"owned")  # "v1//tmp/...": an absolute name
    resolved = resolve_model("gs://models/v1", cache=tmp_path / "cache")
    assert not (tmp_path / "evil.txt").exists()  # kept inside the model folder
    assert (resolved.path / str(tmp_path).lstrip("/") / "evil.txt").read_bytes() == b"owned"
    # ("v1/../../x" is refused too; the emulator will not store such a name, so it is not tested here)


def test_relative_uris_in_a_bucket_list_are_the_lists_neighbours(gcs_emulator):
    from captioning.gcs import storage_client
    from captioning.images import list_images

    bucket = storage_client().create_bucket("lists")
    bucket.blob("jobs/today.jsonl").upload_from_string('{"uri": "a.jpg"}\n"gs://other/b.jpg"\n')
    assert list_images("gs://lists/jobs/today.jsonl") == ["gs://lists/jobs/a.jpg", "gs://other/b.jpg"]


def test_a_future_set_by_nobody_is_never_waited_on_forever():
    """The server waits on futures with asyncio; a cancelled one must not be set again (InvalidStateError)."""
    future = Future()
    future.cancel()
    batcher = Batcher(FakeModel(), max_batch=2, window_ms=10)
    batcher._run([("a", future)])  # must not raise
    assert batcher.thread.is_alive()
    batcher.close()


def test_online_a_bare_alias_is_looked_up_in_the_wandb_registry_with_a_stand_in_for_the_wandb_server(
        monkeypatch, tmp_path):
    """Online, promote links the model into the W&B Registry, so the batch pipeline's default
    (batch.model=production) must look there; the W&B server cannot run here, so its call is replaced."""
    from captioning import model_source
    from captioning.config import load_config
    from captioning.errors import ConfigError
    from captioning.steps.batch_caption import resolve_model_step

    asked = []

    def wandb_registry(spec, collection, cache, setting):
        asked.append((spec, collection))
        raise ConfigError("the stand-in has no models")

    monkeypatch.setattr(model_source, "_from_wandb_registry", wandb_registry)
    monkeypatch.setenv("WANDB_MODE", "online")
    with pytest.raises(ConfigError, match="stand-in"):
        resolve_model_step(load_config(overrides=["batch.model=production"]))
    assert asked == [("wandb:production", "captioning-model")]
    monkeypatch.setenv("WANDB_MODE", "offline")  # offline: the registry folder promote wrote
    with pytest.raises(ConfigError, match="an alias needs the registry folder"):
        resolve_model_step(load_config(overrides=["batch.model=production"]))
    assert len(asked) == 1


def test_a_lone_request_does_not_wait_out_the_window_but_one_being_decoded_is_waited_for():
    model = FakeModel()
    batcher = Batcher(model, max_batch=8, window_ms=60_000)  # a window no request should ever sit out alone
    assert batcher.submit("alone").result(timeout=10).caption == "cap-alone"
    with batcher.expecting(1):  # another request's image is still being decoded
        first = batcher.submit("a")
        time.sleep(0.3)
        assert not first.done()  # held for the image on its way
        second = batcher.submit("b")
    assert first.result(timeout=10).caption == "cap-a" and second.result(timeout=10).caption == "cap-b"
    assert ["a", "b"] in model.calls  # one batch
    batcher.close()


def test_an_image_sent_without_content_length_is_read_up_to_the_limit(tmp_path):
    """Issue 26, point 5: a server answering in chunks (no Content-Length, to HEAD or GET) is read as a stream,
    and refused once it passes the limit, without reading the rest."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    body = os.urandom(50_000)  # read_image returns bytes; the server decodes them later
    sent = {"bytes": 0}

    class Chunked(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_HEAD(self):
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

        def do_GET(self):
            self.do_HEAD()
            repeat = 200 if self.path == "/endless.jpg" else 1  # 10 MB where the limit is 1 MiB
            try:
                for _ in range(repeat):
                    for at in range(0, len(body), 8192):
                        piece = body[at:at + 8192]
                        self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                        sent["bytes"] += len(piece)
                self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Chunked)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        assert read_image(f"{base}/a.jpg", 1 << 20, 5) == body
        with pytest.raises(ImageUnavailable, match=f"more than the limit of {1 << 20} bytes"):
            read_image(f"{base}/endless.jpg", 1 << 20, 5)
        time.sleep(0.2)
        assert sent["bytes"] < len(body) * 200  # it stopped reading, not the server
    finally:
        server.shutdown()


class SlowDecodeModel(FakeModel):
    """The app's model interface: ``prepare`` (decoding) takes ``decode_s`` per image and is counted."""

    version = "v-test"

    def __init__(self, decode_s: float = 0.0):
        super().__init__()
        self.decode_s, self.prepared = decode_s, 0

    def prepare(self, data: bytes):
        time.sleep(self.decode_s)
        self.prepared += 1
        return data.decode()


@contextlib.contextmanager
def running_app(model, **limits):
    """The real app on uvicorn (serve's own settings and protocol) on a loopback port, in a thread."""
    import socket

    import uvicorn

    from captioning.serving import Limits, create_app, server_config

    settings = Limits(**limits)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(server_config(create_app(model, "captioner", settings), "127.0.0.1", port,
                                          settings.header_timeout_s))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", port
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _predict_body(count: int) -> bytes:
    import base64
    import json

    return json.dumps({"instances": [base64.b64encode(f"img{i}".encode()).decode() for i in range(count)]}).encode()


def test_slow_clients_are_cut_off_and_others_are_still_answered():
    """Issue 26, point 3: 40 clients trickling their headers and 10 trickling a body, for longer than the limits
    (1 s here); each is closed (a body trickler after a 408), and a normal request meanwhile is answered at once."""
    import socket

    import requests

    with running_app(SlowDecodeModel(), header_timeout_s=1.0, body_timeout_s=1.0) as (url, port):
        header_tricklers = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
        body_tricklers = [socket.create_connection(("127.0.0.1", port)) for _ in range(10)]
        for sock in body_tricklers:
            sock.sendall(b"POST /v1/models/captioner:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{")
        started = time.monotonic()
        answered_within = None
        closed: dict[int, bytes] = {}
        while time.monotonic() - started < 4 and len(closed) < 50:
            for n, sock in enumerate(header_tricklers + body_tricklers):
                if n in closed:
                    continue
                try:
                    sock.sendall(b"G" if n < 40 else b" ")  # a byte at a time
                    sock.settimeout(0.001)
                    got = sock.recv(4096)
                    closed[n] = got or b"closed"
                except (BlockingIOError, socket.timeout):
                    pass
                except OSError:  # reset: closed by the server
                    closed[n] = b"closed"
            if answered_within is None:
                t0 = time.monotonic()
                resp = requests.post(f"{url}/v1/models/captioner:predict", data=_predict_body(1), timeout=5)
                assert resp.status_code == 200 and resp.json()["predictions"][0]["caption"] == "cap-img0"
                answered_within = time.monotonic() - t0
            time.sleep(0.1)
        elapsed = time.monotonic() - started
        for sock in header_tricklers + body_tricklers:
            sock.close()
    assert len(closed) == 50, f"{50 - len(closed)} slow connections still open after {elapsed:.1f} s"
    assert elapsed < 3.5  # about the 1 s limits, not the test's 4 s
    assert answered_within < 1.0
    assert all(b"408" in closed[n] for n in range(40, 50)), {n: closed[n][:40] for n in range(40, 50)}


def test_a_client_that_goes_away_is_not_decoded_or_captioned_and_is_one_info_line(caplog):
    """Issue 26, point 3: the client sends 8 images (0.3 s of decoding each) and hangs up after 0.2 s; the
    server stops decoding, captions none of them, and says so in one INFO line (no traceback, no ERROR)."""
    import logging
    import socket

    model = SlowDecodeModel(decode_s=0.3)
    with caplog.at_level(logging.INFO, logger="captioning.serving"), running_app(model) as (url, port):
        body = _predict_body(8)
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"POST /v1/models/captioner:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(0.2)
        sock.close()
        time.sleep(2.0)  # longer than the 8 decodes would take
    assert model.prepared <= 2 and model.calls == [], (model.prepared, model.calls)
    gone = [r for r in caplog.records if "went away" in r.getMessage()]
    assert len(gone) == 1 and gone[0].levelno == logging.INFO
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


class DecodingModel(SlowDecodeModel):
    """Decodes for real with PIL (the declared pixels are allocated), noting the most bytes decoded at once."""

    def __init__(self):
        super().__init__()
        self.live = self.most = 0
        self._lock = threading.Lock()

    def prepare(self, data: bytes):
        from io import BytesIO

        from PIL import Image

        with Image.open(BytesIO(data)) as image:
            cost = image.size[0] * image.size[1] * 4
            with self._lock:
                self.live += cost
                self.most = max(self.most, self.live)
            image.load()
            time.sleep(0.2)
        with self._lock:
            self.live -= cost
            self.prepared += 1
        return "pixels"


def test_decoding_memory_is_admitted_from_the_headers_before_any_decode():
    """Issue 26, point 4: images declaring 2000x2000 (16 MB to decode each) against a 40 MB budget: 12 requests
    at once decode at most two images at a time, the others are refused at once (503, nothing decoded), a
    request that can never fit is 413, and overload by queue length is refused before decoding too."""
    import base64
    import io
    import json
    from concurrent.futures import ThreadPoolExecutor

    import requests
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (2000, 2000)).save(buffer, "PNG")  # 16 KB that decodes to 16 MB (by the estimate)
    big = base64.b64encode(buffer.getvalue()).decode()
    model = DecodingModel()
    with running_app(model, decode_budget_bytes=40 << 20) as (url, _):
        predict = f"{url}/v1/models/captioner:predict"

        def one(_):
            started = time.monotonic()
            resp = requests.post(predict, data=json.dumps({"instances": [big]}), timeout=30)
            return resp.status_code, time.monotonic() - started, resp.json()

        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(one, range(12)))
        codes = [code for code, _, _ in answers]
        assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
        # refused before decoding: never decoded (prepared counts only the 200s, below), and answered sooner than
        # any admitted request, whose decode alone takes 0.2 s (no fixed bound: the machine may be busy)
        refused, admitted = ([s for c, s, _ in answers if c == code] for code in (503, 200))
        assert max(refused) < min(admitted), (refused, admitted)
        assert all("MiB of decoding memory in use" in body["error"] for code, _, body in answers if code == 503)
        assert model.most <= 40 << 20  # never more decoded at once than the budget
        assert model.most <= 40 << 20 and model.prepared == codes.count(200)
        stats = requests.get(f"{url}/v2/models/captioner/stats").json()["decode_budget"]
        assert stats["total_mib"] == 40 and stats["in_use_mib"] == 0 and 16 <= stats["peak_mib"] <= 40

        # several images decode one after another: the largest counts, and the decoded ones kept till captioned
        three = requests.post(predict, data=json.dumps({"instances": [big] * 3}), timeout=30)
        assert three.status_code == 200, three.text
        buffer = io.BytesIO()
        Image.new("L", (3500, 3500)).save(buffer, "PNG")  # 49 MB to decode: never fits in 40
        huge = requests.post(predict, data=json.dumps({"instances": [base64.b64encode(buffer.getvalue()).decode()]}),
                             timeout=30)
        assert huge.status_code == 413 and "need 47 MiB to decode, more than this server's decode budget of 40" \
            in huge.json()["error"]
    with running_app(SlowDecodeModel(decode_s=0.5), max_pending=4, max_instances=8) as (url, _):
        slow = ThreadPoolExecutor(1).submit(requests.post, f"{url}/v1/models/captioner:predict",
                                            data=_predict_body(3), timeout=30)
        time.sleep(0.2)  # 3 images being decoded: 2 more would pass 4
        started = time.monotonic()
        over = requests.post(f"{url}/v1/models/captioner:predict", data=_predict_body(2), timeout=30)
        assert over.status_code == 503 and time.monotonic() - started < 0.3
        assert "4 images are waiting" in over.json()["error"]
        assert slow.result().status_code == 200


def test_a_progressive_jpeg_and_a_gif_are_costed_as_they_decode():
    """Review of issue 26: a progressive JPEG keeps every coefficient until its last scan (2 bytes per component
    sample beside the image); a GIF is one canvas and each frame's pixels, not frames x canvas."""
    import io

    from PIL import Image

    from captioning.features import decode_cost

    def saved(image, fmt, **options):
        buffer = io.BytesIO()
        image.save(buffer, fmt, **options)
        return buffer.getvalue()

    rgb = Image.new("RGB", (1000, 800))
    assert decode_cost(saved(rgb, "JPEG")) == 1000 * 800 * 4
    assert decode_cost(saved(rgb, "JPEG", progressive=True)) == 1000 * 800 * (4 + 2 * 3)
    assert decode_cost(saved(Image.new("L", (1000, 800)), "JPEG", progressive=True)) == 1000 * 800 * (4 + 2)
    from captioning.features import gif_frames

    frames = [Image.new("L", (1000, 800), color=n) for n in range(20)]
    gif = saved(frames[0], "GIF", save_all=True, append_images=frames[1:])
    count, pixels, width, height = gif_frames(gif)
    assert count == 20 and (width, height) == (1000, 800)
    assert decode_cost(gif) == width * height * 4 + pixels < count * width * height * 4


@pytest.mark.parametrize("case", ["input-parameters", "request-parameters", "output-parameters", "header-digit",
                                  "too-many"])
def test_malformed_v2_fields_are_a_400_or_413_not_a_500(case):
    import base64
    import json

    import requests

    tensor = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(b"img").decode()]}
    bodies = {
        "input-parameters": {"inputs": [{**tensor, "parameters": "x"}]},
        "request-parameters": {"inputs": [tensor], "parameters": [1]},
        "output-parameters": {"inputs": [tensor], "outputs": [{"name": "caption", "parameters": 5}]},
        "header-digit": {"inputs": [tensor]},
        "too-many": {"inputs": [{**tensor, "shape": [10**9], "data": []}]},
    }
    want = {"input-parameters": (400, "input 'image': parameters must be an object, not str"),
            "request-parameters": (400, "the request: parameters must be an object, not list"),
            "output-parameters": (400, "output 'caption': parameters must be an object, not int"),
            "header-digit": (400, "Inference-Header-Content-Length"),
            "too-many": (413, "holds 1000000000 images, more than the limit of 64")}[case]
    headers = {"Inference-Header-Content-Length": "\u00b2".encode().decode("latin-1")} if case == "header-digit" else {}
    with running_app(SlowDecodeModel()) as (url, _):
        resp = requests.post(f"{url}/v2/models/captioner/infer", data=json.dumps(bodies[case]).encode(),
                             headers=headers, timeout=10)
    assert resp.status_code == want[0], resp.text
    assert want[1] in resp.json()["error"]


def test_a_client_that_goes_away_while_its_images_wait_is_not_captioned_and_logs_no_error(caplog):
    """Review of issue 26: the images already decoded wait behind another request's batch; the client leaves; they
    are dropped from the queue, and the only line is the INFO one (no asyncio ERROR about a cancelled future)."""
    import gc
    import logging
    import socket
    from concurrent.futures import ThreadPoolExecutor

    import requests

    model = SlowDecodeModel()
    model.delay = 1.0  # each batch holds the device for a second
    with caplog.at_level(logging.INFO), running_app(model, max_batch=1) as (url, port):
        first = ThreadPoolExecutor(1).submit(requests.post, f"{url}/v1/models/captioner:predict",
                                             data=_predict_body(1), timeout=30)
        time.sleep(0.3)  # the device is busy with it
        body = _predict_body(2)
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"POST /v1/models/captioner:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(0.3)  # decoded, waiting in the queue
        sock.close()
        assert first.result().status_code == 200
        time.sleep(2.5)
        gc.collect()
    assert [c for call in model.calls for c in call] == ["img0"], model.calls  # only the first request's image
    assert len([r for r in caplog.records if "went away" in r.getMessage()]) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


def test_a_jpeg_scan_bomb_is_refused_from_its_markers_before_decoding():
    """Issue 27, case 10: a small progressive JPEG with thousands of scans passed the pixel check and took
    minutes to decode (each scan covers the whole image). The scans are counted from the bytes first, in the
    check process_data, caption, batch and serve all run (features.image_problem)."""
    import base64
    import io
    import json

    import requests
    from PIL import Image

    from captioning.features import MAX_JPEG_SCANS, image_problem

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, "JPEG", progressive=True)
    real = buffer.getvalue()
    assert image_problem(real) is None and 1 < real.count(b"\xff\xda") <= 12  # an encoder's own few scans
    last_scan = real[real.rindex(b"\xff\xda"):-2]  # repeated refinement scans, as a bomb carries them
    bomb = real[:-2] + last_scan * 2000 + b"\xff\xd9"
    assert len(bomb) < 200_000
    problem = image_problem(bomb)
    assert problem.startswith("a JPEG of 2010 scans (a scan bomb") and f"at most {MAX_JPEG_SCANS} are read" in problem

    # The scans are found by walking the segments: an MPF segment (PIL then says "MPO", TensorFlow decodes the
    # JPEG) does not hide them, and 0xFFDA pairs inside a comment are not scans.
    mpo = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(mpo, "MPO", save_all=True, append_images=[Image.new("RGB", (64, 64))])
    data, at, app2 = mpo.getvalue(), 2, b""
    while not app2:  # the MPF APP2 segment of PIL's own MPO file
        length = int.from_bytes(data[at + 2:at + 4], "big")
        if data[at + 1] == 0xE2 and data[at + 4:at + 8] == b"MPF\0":
            app2 = data[at:at + 2 + length]
        at += 2 + length
    tagged = bomb[:2] + app2 + bomb[2:]
    assert Image.open(io.BytesIO(tagged)).format == "MPO" and "a JPEG of 2010 scans" in image_problem(tagged)
    comment = b"\xff\xfe" + (2 + 202).to_bytes(2, "big") + b"\xff\xda" * 101
    assert image_problem(real[:2] + comment + real[2:]) is None

    model = SlowDecodeModel()
    model.max_pixels = 50_000_000
    with running_app(model) as (url, _):
        resp = requests.post(f"{url}/v1/models/captioner:predict",
                             data=json.dumps({"instances": [base64.b64encode(bomb).decode()]}), timeout=10)
    assert resp.status_code == 400 and "instance 0: cannot caption it: a JPEG of" in resp.json()["error"]
    assert model.prepared == 0  # refused before the decoder saw it
