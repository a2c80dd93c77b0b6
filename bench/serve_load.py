"""Load on the inference service: the real server (``gfn serve``) on 127.0.0.1 with the demo
infilling adapter, a fixed workload of /infill requests from concurrent clients, per engine.

    .venv/bin/python bench/serve_load.py [--engines vllm transformers] [--requests 256] [--n 4]
                                         [--concurrency 64] [--sequential 32] [--train-steps 10]

The adapter is the newest stored infill adapter on the demo base model (the user's store, then
the bench store), else one trained now with configs/infill.yaml for --train-steps steps.
Per engine:
  throughput_rps, p50_ms, p99_ms, errors   the workload over HTTP, ``--concurrency`` clients
  raw_rps                                  the same requests handed to the engine directly, all
                                           at once, in-process (no HTTP, no service), after the
                                           same warm-up: the limit
  sequential_rps                           one request at a time over HTTP
Warm-up, sequential and measured requests are distinct bodies (their own seeds).
Goals: throughput_rps >= 0.8 x raw_rps and >= 5 x sequential_rps, errors 0.
Last stdout line: {"requests", "n", "concurrency", "adapter", "engines": {engine: {...}}, "goals": {...}}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

from adapters.fingerprint import fingerprint  # noqa: E402
from adapters.home import store_root  # noqa: E402
from adapters.manifest import Manifest  # noqa: E402
from adapters.store import AdapterStore  # noqa: E402
from bench.adapter_cache import bench_store, log  # noqa: E402
from world.base_model import build  # noqa: E402
from world.stories import all_frames  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def workload(count: int, n: int, adapter: str) -> list[dict]:
    """Fixed /infill bodies for ``adapter``: beginnings and endings of the demo world's stories, seeded."""
    rng = random.Random(0)
    frames = all_frames()
    bodies = []
    for i in range(count):
        frame = rng.choice(frames)
        bodies.append({"prefix": frame.beginning, "suffix": frame.ending(rng.randrange(len(frame.events()))),
                       "adapter": adapter, "n": n, "seed": i})
    return bodies


def infill_adapter(train_steps: int) -> tuple[AdapterStore, Manifest]:
    """The demo infilling adapter: the newest one on the demo base model in the user's store
    (``gfn up`` trains it), else in the bench store, else one trained now for ``train_steps``
    steps (the weights do not change the cost of serving)."""
    from trainer.config import load_config
    from trainer.loop import Trainer

    base = fingerprint(build(quiet=True))
    for store in (AdapterStore(store_root()), bench_store()):
        found = [m for m in store.list() if m.task == "infill" and m.base_model.fingerprint == base]
        if found:
            manifest = max(found, key=lambda m: m.created_at)
            log(f"adapter {manifest.ref} from {store.root}")
            return store, manifest
    config = load_config("infill", [f"steps={train_steps}"])
    store = bench_store()
    with tempfile.TemporaryDirectory() as runs:
        manifest = Trainer(config, Path(runs), store, quiet=True).run()
    log(f"adapter {manifest.ref} trained for {train_steps} steps into {store.root}")
    return store, manifest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """``gfn serve`` in a child process; its logs go to a file shown when it fails."""

    def __init__(self, engine: str, store: AdapterStore, model_dir: Path, adapter: str, concurrency: int, dtype: str):
        self.port, self.logs = free_port(), tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        env = {**os.environ, "GFN_ENGINE": engine, "GFN_STORE": str(store.root), "GFN_BASE_MODEL": str(model_dir),
               "GFN_ADAPTERS": json.dumps([adapter]), "GFN_PORT": str(self.port), "GFN_LOG_LEVEL": "warning",
               "GFN_MAX_IN_FLIGHT": str(max(256, 2 * concurrency)), "GFN_DTYPE": dtype}
        env.setdefault("GFN_TORCH_THREADS", "1")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self.process = subprocess.Popen([sys.executable, "-m", "gfn.cli", "serve"], cwd=ROOT, env=env,
                                        stdout=self.logs, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 600) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the service exited:\n{Path(self.logs.name).read_text()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError("the service did not become ready")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)
        Path(self.logs.name).unlink(missing_ok=True)


async def over_http(port: int, bodies: list[dict], concurrency: int) -> dict:
    """All bodies POSTed to /infill over ``concurrency`` keep-alive connections: rps, latency
    quantiles, errors. A lean HTTP/1.1 client on asyncio streams: it shares the machine's cores
    with the service, and a full client (httpx: 3.5 ms of CPU a request) took a tenth of them."""
    queue = list(reversed(bodies))
    latencies, errors = [], 0

    async def connection() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while queue:
                body = queue.pop()
                started = time.perf_counter()
                try:
                    status, answer = await asyncio.wait_for(post(reader, writer, "/infill", body), 300)
                    ok = status == 200 and len(json.loads(answer)["samples"]) == body["n"]
                except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError, KeyError):
                    ok = False
                latencies.append(time.perf_counter() - started)
                errors += not ok
                if not ok:  # the stream may be mid-answer: start a fresh connection
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(min(concurrency, len(bodies)))))
    elapsed = time.perf_counter() - started
    latencies.sort()
    quantile = lambda q: round(1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1)  # noqa: E731
    return {"rps": len(bodies) / elapsed, "p50_ms": quantile(0.5), "p99_ms": quantile(0.99), "errors": errors}


async def post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, body: dict) -> tuple[int, bytes]:
    """One JSON POST on a keep-alive connection: (status, body of the answer)."""
    payload = json.dumps(body).encode()
    writer.write(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(payload), payload))
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
    status = int(head.split(" ", 2)[1])
    length = int(head.split("content-length:", 1)[1].split("\r\n", 1)[0])
    return status, await reader.readexactly(length)


async def raw(engine_name: str, store: AdapterStore, model_dir: Path, adapter: str, warm: list[dict],
              bodies: list[dict], dtype: str) -> float:
    """Requests per second of the same work handed to the engine directly, all at once (the
    largest batches it can make: a limit no number of clients beats), after the same warm-up."""
    from adapters.models import context_ids, load_tokenizer, pad_id
    from service.engines import start_engine
    from service.policy import gen_request, render
    from service.settings import Settings

    settings = Settings(engine=engine_name, torch_threads=int(os.environ.get("GFN_TORCH_THREADS", "1")))
    tokenizer = load_tokenizer(model_dir)
    name, version = adapter.split("@v")
    loaded = store.load(name, int(version))
    manifest = loaded.manifest
    engine = await start_engine(settings, model_dir, pad_id(tokenizer), tokenizer.eos_token_id, [manifest.lora], dtype)
    await engine.add_adapter(loaded)
    def request(body: dict):
        text = render(manifest, {"prefix": body["prefix"], "suffix": body["suffix"]})
        prompt = context_ids(tokenizer, text, manifest.document_prefix)  # as the service encodes it
        return gen_request(manifest, prompt, body["n"], 1.0, body["seed"], None, settings.max_tokens)

    await asyncio.gather(*(engine.generate([request(b)]) for b in warm))
    requests = [request(b) for b in bodies]
    started = time.perf_counter()
    await asyncio.gather(*(engine.generate([r]) for r in requests))  # the engine batches them as it can
    elapsed = time.perf_counter() - started
    await engine.stop()
    return len(bodies) / elapsed


def measure(engine: str, store: AdapterStore, model_dir: Path, adapter: str, bodies: list[dict],
            concurrency: int, sequential: int, dtype: str) -> dict:
    """`bodies`: warm-up (`concurrency`), then sequential (`sequential`), then the measured ones."""
    warm, one_at_a_time, measured = (bodies[:concurrency], bodies[concurrency:concurrency + sequential],
                                     bodies[concurrency + sequential:])
    service = Service(engine, store, model_dir, adapter, concurrency, dtype)
    try:
        log(f"{engine}: starting the service")
        service.wait_ready()
        asyncio.run(over_http(service.port, warm, concurrency))
        log(f"{engine}: {sequential} requests one at a time")
        one_by_one = asyncio.run(over_http(service.port, one_at_a_time, 1))
        log(f"{engine}: {len(measured)} requests, {concurrency} concurrent")
        loaded = asyncio.run(over_http(service.port, measured, concurrency))
    finally:
        service.stop()
    log(f"{engine}: the same requests on the engine directly")
    raw_rps = asyncio.run(raw(engine, store, model_dir, adapter, warm, measured, dtype))
    return {"throughput_rps": round(loaded["rps"], 2), "p50_ms": loaded["p50_ms"], "p99_ms": loaded["p99_ms"],
            "errors": loaded["errors"] + one_by_one["errors"], "raw_rps": round(raw_rps, 2),
            "sequential_rps": round(one_by_one["rps"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", nargs="+", default=["vllm", "transformers"], choices=["vllm", "transformers"])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--sequential", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=10, help="when no infill adapter is stored")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="the base model's, in both engines (GFN_DTYPE)")
    args = parser.parse_args()

    model_dir = build(quiet=True)
    store, manifest = infill_adapter(args.train_steps)
    bodies = workload(args.concurrency + args.sequential + args.requests, args.n, manifest.name)
    engines = {engine: measure(engine, store, model_dir, manifest.ref, bodies, args.concurrency, args.sequential,
                               args.dtype) for engine in args.engines}
    goals = {engine: {"throughput_vs_raw": r["throughput_rps"] >= 0.8 * r["raw_rps"],
                      "throughput_vs_sequential": r["throughput_rps"] >= 5 * r["sequential_rps"],
                      "no_errors": r["errors"] == 0} for engine, r in engines.items()}
    print(json.dumps({"requests": args.requests, "n": args.n, "concurrency": args.concurrency, "dtype": args.dtype,
                      "adapter": manifest.ref, "engines": engines, "goals": goals}))


if __name__ == "__main__":
    main()
