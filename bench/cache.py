"""The rationale cache: /reason latency on a miss (sample the rationales, read the answers)
and on a hit (the same question again), against a real redis-server.

    .venv/bin/python bench/cache.py [--questions 20] [--rationales 10] [--engine transformers]

The reasoning adapter is the bench store's (trained once with configs/reasoning.yaml for
--train-steps steps and reused while that config and the base model are unchanged).
Last stdout line: {"questions", "n_rationales", "engine", "miss_p50_ms", "hit_p50_ms", "speedup"}.
Goal: a hit at least 20 times faster than a miss.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ modules import each other

import httpx  # noqa: E402

from bench.adapter_cache import bench_store, gfn_adapter, log  # noqa: E402
from bench.serve_load import Service  # noqa: E402
from gfn.local import RedisServer  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.setup import resolve_base_model  # noqa: E402


def questions(count: int) -> list[str]:
    rng = random.Random(0)
    return [" ".join(f"{rng.randint(0, 9)} {rng.choice('+-')}" for _ in range(3)) + f" {rng.randint(0, 9)}"
            for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--rationales", type=int, default=10)
    parser.add_argument("--engine", default="transformers")
    parser.add_argument("--train-steps", type=int, default=20)
    args = parser.parse_args()

    store = bench_store()
    config = load_config("reasoning", [f"steps={args.train_steps}", "evaluate=false"])
    manifest, _ = gfn_adapter(store, config)
    redis = RedisServer(Path(tempfile.mkdtemp(prefix="bench-cache-redis-")))
    redis.start()
    os.environ["GFN_REDIS_URL"] = redis.url
    service = Service(args.engine, store, Path(resolve_base_model("demo")), manifest.ref, concurrency=1)
    try:
        service.wait_ready()
        log(f"serving {manifest.ref} on {args.engine}; redis at {redis.url}")
        misses, hits = [], []
        with httpx.Client(base_url=service.url, timeout=300) as client:
            for i, question in enumerate(questions(args.questions)):
                body = {"question": question, "adapter": manifest.ref, "n_rationales": args.rationales, "seed": i}
                for latencies in (misses, hits):
                    start = time.perf_counter()
                    answer = client.post("/reason", json=body)
                    latencies.append(1000 * (time.perf_counter() - start))
                    answer.raise_for_status()
                assert answer.json()["cached"] == args.rationales, "the second ask was not a cache hit"
    finally:
        service.stop()
        redis.stop()
    miss, hit = statistics.median(misses), statistics.median(hits)
    print(json.dumps({"questions": args.questions, "n_rationales": args.rationales, "engine": args.engine,
                      "adapter": manifest.ref, "miss_p50_ms": round(miss, 1), "hit_p50_ms": round(hit, 1),
                      "speedup": round(miss / hit, 1)}))


if __name__ == "__main__":
    main()
