"""`captioning serve`: a real uvicorn server on loopback, a real trained model, the three protocols."""

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

import pytest
import requests

from conftest import captioning_cli
from helpers.http_mirror import HttpMirror

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, proc=None, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the server exited {proc.returncode}: {proc.stderr.read()}")
        try:
            if requests.get(f"{url}/v2/health/ready", timeout=2).ok:
                return
        except requests.ConnectionError:
            time.sleep(0.2)
    raise AssertionError(f"{url} not ready in {timeout} s")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict:
    """Demo scenes as JPEG files, a file that is no image, and a 9000x9000 PNG declaration (a bomb)."""
    from PIL import Image

    from captioning.data.demo import synthetic_jpegs

    root = tmp_path_factory.mktemp("images")
    paths = synthetic_jpegs(root / "scenes", 4, seed=5)
    (root / "bad").mkdir()
    (root / "bad" / "notes.jpg").write_bytes(b"not an image at all")
    buffer = BytesIO()
    Image.new("L", (9000, 9000)).save(buffer, "PNG")
    (root / "bad" / "bomb.png").write_bytes(buffer.getvalue())
    return {"root": root, "scenes": paths}


@pytest.fixture(scope="module")
def expected(promoted_model, images) -> dict:
    """What `captioning caption` prints for each scene: the server must say the same."""
    proc = captioning_cli("caption", "--model", str(promoted_model["model"]), *map(str, images["scenes"]))
    assert proc.returncode == 0, proc.stderr
    return dict(line.split("\t") for line in proc.stdout.strip().splitlines())


@pytest.fixture(scope="module")
def server(promoted_model, images):
    """The app on a loopback port, with an image server it may fetch from (and only that)."""
    import uvicorn

    from captioning.caption import CaptionModel
    from captioning.serving import Limits, create_app, server_config

    with HttpMirror(images["root"]) as mirror:
        model = CaptionModel(promoted_model["model"], version=promoted_model["version"])
        limits = Limits(max_request_bytes=2 << 20, max_image_bytes=1 << 20, max_instances=8, max_batch=8,
                        window_ms=200, allow_uri=(mirror.url + "/scenes/",))
        port = free_port()
        uv = uvicorn.Server(server_config(create_app(model, "captioner", limits), "127.0.0.1", port))
        thread = threading.Thread(target=uv.run, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        yield {"url": url, "mirror": mirror.url, "version": promoted_model["version"]}
        uv.should_exit = True
        thread.join(timeout=30)


def b64(path: Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


def test_three_protocols_give_the_cli_captions(server, images, expected):
    url, scenes = server["url"], images["scenes"]
    want = [expected[str(p)] for p in scenes]

    v1 = requests.post(f"{url}/v1/models/captioner:predict", json={"instances": [{"b64": b64(p)} for p in scenes]})
    assert v1.status_code == 200, v1.text
    predictions = v1.json()["predictions"]
    assert [p["caption"] for p in predictions] == want
    assert all(p["model_version"] == server["version"] for p in predictions)
    scores = [p["score"] for p in predictions]
    assert all(-50 < s <= 0 for s in scores), scores  # a mean log-probability per token

    v2 = requests.post(f"{url}/v2/models/captioner/infer",
                       json={"id": "r1", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(scenes)],
                                                     "data": [b64(p) for p in scenes]}]})
    assert v2.status_code == 200, v2.text
    outputs = {o["name"]: o for o in v2.json()["outputs"]}
    assert v2.json()["id"] == "r1" and v2.json()["model_version"] == server["version"]
    assert outputs["caption"]["data"] == want and outputs["caption"]["shape"] == [len(scenes)]
    assert outputs["score"]["data"] == pytest.approx(scores, abs=1e-4)

    vertex = requests.post(f"{url}/predict",  # Vertex's instance form, and its default routes
                           json={"instances": [{"image_bytes": {"b64": b64(p)}} for p in scenes]})
    assert [p["caption"] for p in vertex.json()["predictions"]] == want
    assert requests.get(f"{url}/health").status_code == 200

    # by URI, from the prefix the server allows
    by_uri = requests.post(f"{url}/v1/models/captioner:predict",
                           json={"instances": [{"uri": f"{server['mirror']}/scenes/{p.name}"} for p in scenes]})
    assert [p["caption"] for p in by_uri.json()["predictions"]] == want
    v2_uri = requests.post(f"{url}/v2/models/captioner/infer", json={"inputs": [
        {"name": "uri", "datatype": "BYTES", "shape": [1], "data": [f"{server['mirror']}/scenes/{scenes[0].name}"]}]})
    assert v2_uri.json()["outputs"][0]["data"] == want[:1]


def test_health_metadata_and_readiness_routes(server):
    url = server["url"]
    assert requests.get(f"{url}/v2/health/live").json() == {"live": True}
    assert requests.get(f"{url}/v2/health/ready").json() == {"ready": True}
    assert requests.get(f"{url}/v1/models/captioner").json() == {"name": "captioner", "ready": True}
    assert requests.get(f"{url}/v2/models/captioner/ready").status_code == 200
    meta = requests.get(f"{url}/v2/models/captioner").json()
    assert meta["versions"] == [server["version"]] and {i["name"] for i in meta["inputs"]} == {"image", "uri"}
    missing = requests.post(f"{url}/v1/models/other:predict", json={"instances": []})
    assert missing.status_code == 404 and "no model 'other'" in missing.json()["error"]


@pytest.mark.parametrize("case", ["body", "instances", "base64", "not-image", "bomb", "image-size", "uri-outside",
                                  "uri-missing", "shape", "json"])
def test_bad_requests_get_a_clear_4xx(server, images, case):
    url, scene = server["url"], images["scenes"][0]
    predict = f"{url}/v1/models/captioner:predict"
    big = base64.b64encode(os.urandom(1_200_000)).decode()  # 1.6 MB of base64: over the 1 MiB image limit
    sent = {
        "body": (predict, {"instances": [{"b64": big}, {"b64": big}]}),  # 3.2 MB: over the 2 MiB body limit
        "instances": (predict, {"instances": [{"b64": b64(scene)}] * 9}),
        "base64": (predict, {"instances": [{"b64": b64(scene)}, {"b64": "@@not base64@@"}]}),
        "not-image": (predict, {"instances": [{"b64": b64(images["root"] / "bad" / "notes.jpg")}]}),
        "bomb": (predict, {"instances": [{"b64": b64(images["root"] / "bad" / "bomb.png")}]}),
        "image-size": (predict, {"instances": [{"b64": big}]}),
        "uri-outside": (predict, {"instances": [{"uri": f"{server['mirror']}/bad/notes.jpg"}]}),
        "uri-missing": (predict, {"instances": [{"uri": f"{server['mirror']}/scenes/none.jpg"}]}),
        "shape": (f"{url}/v2/models/captioner/infer", {"inputs": [{"name": "image", "datatype": "FP32",
                                                                   "data": [1.0]}]}),
        "json": (predict, None),
    }[case]
    want = {
        "body": (413, "more than the limit of 2097152"),
        "instances": (413, "9 instances, more than the limit of 8"),
        "base64": (400, "instance 1: not valid base64"),
        "not-image": (400, "instance 0: cannot caption it: not an image"),
        "bomb": (400, "instance 0: cannot caption it: decompression bomb: declares 9000x9000"),
        "image-size": (413, "instance 0: the image is larger than the limit of 1048576"),
        "uri-outside": (400, "is not under an allowed URI prefix"),
        "uri-missing": (400, "HTTP 404"),
        "shape": (400, "datatype 'FP32', expected BYTES"),
        "json": (400, "not JSON"),
    }[case]
    target, body = sent
    resp = requests.post(target, json=body) if body is not None else requests.post(target, data=b"{nope")
    assert resp.status_code == want[0], resp.text
    assert want[1] in resp.json()["error"]
    assert requests.get(f"{url}/v2/health/ready").status_code == 200  # the server carries on


def test_concurrent_requests_are_captioned_as_one_batch(server, images, expected):
    url = server["url"]
    before = requests.get(f"{url}/v2/models/captioner/stats").json()["batch_sizes"]
    scenes = images["scenes"] * 2

    def one(path):
        resp = requests.post(f"{url}/v1/models/captioner:predict", json={"instances": [{"b64": b64(path)}]})
        return resp.json()["predictions"][0]["caption"]

    with ThreadPoolExecutor(8) as pool:
        captions = list(pool.map(one, scenes))
    assert captions == [expected[str(p)] for p in scenes]  # batched with others, each still gets its own
    after = requests.get(f"{url}/v2/models/captioner/stats").json()["batch_sizes"]
    new = {int(k): v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
    assert sum(k * v for k, v in new.items()) == 8
    assert max(new) > 1, new  # within the 200 ms window, requests were captioned together


def test_bench_serve_reports_both_modes_against_a_running_server(server):
    proc = captioning_cli("bench", "serve", "--url", server["url"], "--requests", "4", "--concurrency", "2",
                          "--repeats", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    for mode in ("concurrent", "one_at_a_time"):
        assert result[mode]["captions_per_s"] > 0 and result[mode]["p95_ms"] >= result[mode]["p50_ms"] > 0
    assert sum(int(k) * v for k, v in result["batch_sizes"].items()) == 4 * 2  # one timed run of each mode
    # what the remote server runs, as it says (the fixture's server: max_batch 8, window 200 ms), not the
    # command's own defaults (32, 50 ms)
    assert (result["model"], result["max_batch"], result["window_ms"]) == (
        f"captioner {server['version']}", 8, 200.0)


def test_serve_command_resolves_the_alias_and_stops_on_sigterm(promoted_model, images, expected, tmp_path):
    """As a pod runs it: the alias from the registry, Vertex's port and routes from the environment."""
    port = free_port()
    env = dict(os.environ, AIP_HTTP_PORT=str(port), AIP_HEALTH_ROUTE="/vertex/health",
               AIP_PREDICT_ROUTE="/vertex/predict")
    exe = Path(sys.executable).parent / "captioning"
    proc = subprocess.Popen([str(exe), "serve", "--model", "production", "--registry", str(promoted_model["registry"]),
                             "--host", "127.0.0.1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc)
        assert requests.get(f"{url}/vertex/health").status_code == 200
        scene = images["scenes"][0]
        resp = requests.post(f"{url}/vertex/predict", json={"instances": [{"b64": b64(scene)}]})
        assert resp.json()["predictions"][0]["caption"] == expected[str(scene)]
        assert resp.json()["predictions"][0]["model_version"] == promoted_model["version"]
        proc.send_signal(signal.SIGTERM)  # uvicorn shuts down, then re-raises the signal (exit 143 in a pod)
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        assert "Traceback" not in proc.stderr.read()
    finally:
        proc.kill()


@pytest.mark.parametrize("model, message", [
    ("staging", "no model holds the alias 'staging'"),
    ("other:production", "no collection 'other' in the registry"),
    ("/nowhere/model", "/nowhere/model: no such model folder"),
])
def test_serve_refuses_a_model_it_cannot_find(promoted_model, model, message):
    proc = captioning_cli("serve", "--model", model, "--registry", str(promoted_model["registry"]), timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_serve_reads_an_s3_model_with_the_environment_the_inference_service_sets(promoted_model, images, expected,
                                                                                 s3_server, tmp_path):
    """Issue 25, point 3: promote.deploy hands KServe KFP's minio:// store as s3://; the server reads it itself
    (no storage initializer), with the endpoint and KFP's Secret the InferenceService puts in its environment."""
    import boto3

    from captioning.deploy.kserve import S3Access, inference_service

    keys = {"accesskey": "kfp-access", "secretkey": "kfp-secret-never-logged"}  # mlpipeline-minio-artifact's data
    s3 = boto3.client("s3", endpoint_url=s3_server, aws_access_key_id=keys["accesskey"],
                      aws_secret_access_key=keys["secretkey"], region_name="us-east-1")
    s3.create_bucket(Bucket="mlpipeline")
    model = Path(promoted_model["model"])
    for path in model.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), "mlpipeline", f"v2/artifacts/run-1/train/model/{path.relative_to(model)}")
    uri = "s3://mlpipeline/v2/artifacts/run-1/train/model"

    isvc = inference_service("img", uri, s3=S3Access(s3_server, "mlpipeline-minio-artifact"))
    (container,) = isvc["spec"]["predictor"]["containers"]
    # The container's environment as the kubelet fills it in from the Secret.
    env = {e["name"]: e.get("value") or keys[e["valueFrom"]["secretKeyRef"]["key"]] for e in container["env"]}
    assert set(env) == {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    args = container["args"]
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    exe = Path(sys.executable).parent / "captioning"
    proc = subprocess.Popen([str(exe), *args[:-2], "--port", str(port), "--host", "127.0.0.1"],
                            env={**base, **env, "HOME": str(tmp_path)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc)
        scene = images["scenes"][1]
        resp = requests.post(f"{url}/v1/models/captioner:predict", json={"instances": [{"b64": b64(scene)}]})
        assert resp.status_code == 200, resp.text
        assert resp.json()["predictions"][0]["caption"] == expected[str(scene)]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        assert keys["secretkey"] not in proc.stderr.read()
    finally:
        proc.kill()

    # Without the Secret's keys, or with a bucket that is not there: exit 2 naming the URI, before any port opens.
    for extra, message in (({"AWS_ENDPOINT_URL": s3_server}, "Unable to locate credentials"),
                           ({**env}, "NoSuchBucket")):
        missing = uri.replace("mlpipeline", "elsewhere") if "AWS_ACCESS_KEY_ID" in extra else uri
        proc = subprocess.run([str(exe), "serve", "--model", missing], env={**base, **extra, "HOME": str(tmp_path)},
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert f"--model={missing}: cannot read the bucket" in proc.stderr and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_stock_open_inference_clients_at_their_defaults_get_the_cli_captions(server, images, expected):
    """Issue 26, points 1-2: tritonclient[http] and the kserve SDK as their users call them, with no setting
    changed: raw image bytes as binary BYTES tensors (Inference-Header-Content-Length), binary answers where they
    ask for them, and the routes each client walks."""
    import asyncio

    import numpy as np
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    url, scenes = server["url"], images["scenes"]
    want = [expected[str(p)] for p in scenes]
    raw = np.array([p.read_bytes() for p in scenes], dtype=np.object_)

    client = triton.InferenceServerClient(url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("captioner")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    meta = client.get_model_metadata("captioner")
    assert {o["name"]: o["datatype"] for o in meta["outputs"]} == {"caption": "BYTES", "score": "FP32"}
    image = triton.InferInput("image", [len(scenes)], "BYTES")
    image.set_data_from_numpy(raw)  # binary_data=True: the client's default
    result = client.infer("captioner", [image])  # no outputs named: the client asks for all of them in binary
    assert [c.decode() for c in result.as_numpy("caption")] == want
    scores = result.as_numpy("score")
    assert scores.dtype == np.float32 and all(-50 < s <= 0 for s in scores)
    only = client.infer("captioner", [image], model_version=server["version"],
                        outputs=[triton.InferRequestedOutput("caption", binary_data=False)])
    assert list(only.as_numpy("caption")) == want and only.get_output("score") is None  # JSON: strings
    for call, message in ((lambda: client.infer("captioner", [image], outputs=[triton.InferRequestedOutput("nope")]),
                           "unknown output 'nope'"),
                          (lambda: client.get_model_metadata("other"), "no model 'other'"),
                          (lambda: client.infer("captioner", [image], model_version="v999"), "no version 'v999'")):
        with pytest.raises(InferenceServerException, match=message):
            call()
    client.close()

    async def kserve_calls():
        v2 = InferenceRESTClient(RESTConfig(protocol="v2"))
        assert await v2.is_server_live(url) and await v2.is_server_ready(url)
        assert await v2.is_model_ready(url, "captioner")
        tensor = InferInput("image", [len(scenes)], "BYTES")
        tensor.set_data_from_numpy(raw)  # binary_data=True by default
        plain = await v2.infer(url, InferRequest("captioner", [tensor]), model_name="captioner")
        asked = await v2.infer(url, InferRequest("captioner", [tensor], parameters={"binary_data_output": True}),
                               model_name="captioner")
        await v2.close()
        v1 = InferenceRESTClient(RESTConfig(protocol="v1"))
        live = await v1.is_server_live(url)
        ready = await v1.is_model_ready(url, "captioner")
        v1_result = await v1.infer(url, {"instances": [{"b64": b64(p)} for p in scenes]}, model_name="captioner")
        await v1.close()
        return plain, asked, live, ready, v1_result

    plain, asked, live, ready, v1_result = asyncio.run(kserve_calls())
    for response in (plain, asked):
        captions = {o.name: o for o in response.outputs}["caption"].as_numpy()
        assert [c.decode() if isinstance(c, bytes) else c for c in captions] == want
    assert live and ready and [p["caption"] for p in v1_result["predictions"]] == want


@pytest.mark.parametrize("case", ["shape", "id", "unknown-input", "both-inputs", "header-length", "unclaimed",
                                  "truncated", "binary-on-v1", "compressed"])
def test_v2_requests_the_protocol_refuses_are_400_naming_the_field(server, images, case):
    import struct

    url, scene = server["url"], images["scenes"][0]
    infer = f"{url}/v2/models/captioner/infer"
    image = scene.read_bytes()
    element = struct.pack("<I", len(image)) + image

    def binary(head: dict, blob: bytes, length=None):
        text = json.dumps(head).encode()
        return requests.post(infer, data=text + blob,
                             headers={"Inference-Header-Content-Length": str(length or len(text))})

    tensor = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(scene)]}
    sent = {
        "shape": lambda: requests.post(infer, json={"inputs": [{**tensor, "shape": [2]}]}),
        "id": lambda: requests.post(infer, json={"id": {"a": 1}, "inputs": [tensor]}),
        "unknown-input": lambda: requests.post(infer, json={"inputs": [{**tensor, "name": "pixels"}]}),
        "both-inputs": lambda: requests.post(infer, json={"inputs": [tensor, {**tensor, "name": "uri"}]}),
        "header-length": lambda: binary({"inputs": []}, b"", length=10**6),
        "unclaimed": lambda: binary({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                                 "parameters": {"binary_data_size": len(element)}}]}, element + b"xx"),
        "truncated": lambda: binary({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                                 "parameters": {"binary_data_size": len(element)}}]}, element[:-5]),
        "binary-on-v1": lambda: requests.post(f"{url}/v1/models/captioner:predict", data=b"{}",
                                              headers={"Inference-Header-Content-Length": "2"}),
        "compressed": lambda: requests.post(infer, data=b"x", headers={"Content-Encoding": "gzip"}),
    }[case]
    want = {
        "shape": (400, "input 'image': shape [2] holds 2 elements, the data 1"),
        "id": (400, "id must be a string, not dict"),
        "unknown-input": (400, "input 'pixels': this model takes 'image' or 'uri'"),
        "both-inputs": (400, "not both"),
        "header-length": (400, "Inference-Header-Content-Length: '1000000' is not a length within"),
        "unclaimed": (400, "2 bytes of binary data no input claims"),
        "truncated": (400, "binary_data_size"),
        "binary-on-v1": (400, "binary tensor data is for the v2 infer route"),
        "compressed": (415, "Content-Encoding 'gzip'"),
    }[case]
    resp = sent()
    assert resp.status_code == want[0], resp.text
    assert want[1] in resp.json()["error"], resp.json()


def test_the_v2_and_v1_surface_a_client_walks(server, images):
    url, scene = server["url"], images["scenes"][0]
    assert requests.get(f"{url}/v2").json()["extensions"] == ["binary_tensor_data"]
    assert requests.get(f"{url}/").json() == {"status": "alive"}
    version = server["version"]
    assert requests.get(f"{url}/v2/models/captioner/versions/{version}").json()["versions"] == [version]
    assert requests.get(f"{url}/v2/models/captioner/versions/{version}/ready").status_code == 200
    tensor = {"name": "image", "datatype": "BYTES", "shape": [1, 1], "data": [[b64(scene)]]}  # nested, row-major
    given = requests.post(f"{url}/v2/models/captioner/infer", json={"id": "req-7", "inputs": [tensor]}).json()
    assert given["id"] == "req-7" and [o["name"] for o in given["outputs"]] == ["caption", "score"]
    unnamed = requests.post(f"{url}/v2/models/captioner/infer", json={"inputs": [tensor],
                                                                      "outputs": [{"name": "score"}]}).json()
    assert isinstance(unnamed["id"], str) and [o["name"] for o in unnamed["outputs"]] == ["score"]
    # a known route asked with the wrong method: 405 in the protocols' error shape; an unknown route: 404
    for method, path in (("GET", "/v1/models/captioner:predict"), ("GET", "/v2/models/captioner/infer"),
                         ("POST", "/v2/health/live"), ("DELETE", "/v2/models/captioner"), ("GET", "/predict")):
        resp = requests.request(method, f"{url}{path}")
        assert resp.status_code == 405 and path in resp.json()["error"], (method, path, resp.text)
    resp = requests.get(f"{url}/v3/anything")
    assert resp.status_code == 404 and "/v3/anything" in resp.json()["error"]
