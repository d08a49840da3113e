"""Peak memory of `captioning serve` under a flood of near-limit images, for docs/serving.md (not run by CI).

Starts the real server (the bench-sized untrained model: decoding does not depend on training) with
each decode budget given, sends CONCURRENCY requests at once, each one PNG of 16 KB that declares
7000x7000 pixels (just under the default pixel limit), ROUNDS times, and reads the server's resident
set: after loading (the model), and its peak (VmHWM) after the flood.

    python scripts/serve_memory.py [--budgets 4096,1024,100000] [--concurrency 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests


def rss_mib(pid: int) -> tuple[float, float]:
    """(current, peak) resident set of a process, MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return tuple(int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budgets", default="4096,1024,100000", help="decode budgets to run, MiB")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from PIL import Image

    from captioning.bench import bench_model

    buffer = io.BytesIO()
    Image.new("L", (7000, 7000)).save(buffer, "PNG")
    body = json.dumps({"instances": [base64.b64encode(buffer.getvalue()).decode()]})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = bench_model(Path(tmp))
        for budget in (int(b) for b in args.budgets.split(",")):
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            exe = Path(sys.executable).parent / "captioning"
            proc = subprocess.Popen([str(exe), "serve", "--model", str(model), "--host", "127.0.0.1", "--port",
                                     str(port), "--decode-budget-mb", str(budget)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            url = f"http://127.0.0.1:{port}"
            try:
                for _ in range(600):
                    try:
                        if requests.get(f"{url}/v2/health/ready", timeout=2).ok:
                            break
                    except requests.ConnectionError:
                        time.sleep(0.5)
                loaded = rss_mib(proc.pid)[0]
                codes: dict[int, int] = {}
                for _ in range(args.rounds):
                    with ThreadPoolExecutor(args.concurrency) as pool:
                        for resp in pool.map(lambda _: requests.post(f"{url}/v1/models/captioner:predict",
                                                                     data=body, timeout=600),
                                             range(args.concurrency)):
                            codes[resp.status_code] = codes.get(resp.status_code, 0) + 1
                now, peak = rss_mib(proc.pid)
                stats = requests.get(f"{url}/v2/models/captioner/stats").json()["decode_budget"]
                rows.append({"budget_mib": budget, "loaded_rss_mib": round(loaded), "peak_rss_mib": round(peak),
                             "after_rss_mib": round(now), "peak_admitted_mib": stats["peak_mib"],
                             "answers": codes})
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    print(json.dumps({"concurrency": args.concurrency, "rounds": args.rounds, "image": "PNG 7000x7000, "
                      f"{len(buffer.getvalue())} bytes", "cpus": os.cpu_count(), "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
