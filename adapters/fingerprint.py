"""Base-model fingerprint: an adapter is only valid on the exact weights it was trained on.

The fingerprint is ``"sha256:" + hex`` over the canonical JSON of ``config.json`` followed by
the name and sha256 of every weight file (``*.safetensors``, ``*.bin``) in sorted order, so
it does not depend on key order, paths or mtimes. Hashing multi-GB weights is slow, so
results are cached in ``$GFN_CACHE_DIR/fingerprints.json`` (default ``~/.cache/gfn``), keyed
by the resolved directory and each file's (name, size, mtime_ns). The model directory is
never written to: it may be read-only.
"""

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from adapters._fs import sha256_file, write_atomic

WEIGHT_SUFFIXES = (".safetensors", ".bin")


def fingerprint(model_dir: str | Path) -> str:
    """Fingerprint of a local Hugging Face model directory, from the cache when still valid."""
    model_dir = Path(model_dir).resolve()
    files = [model_dir / "config.json", *_weight_files(model_dir)]
    stamp = [_stamp(f) for f in files]
    cache_path = _cache_dir() / "fingerprints.json"
    cache = _read_cache(cache_path)
    entry = cache.get(str(model_dir))
    if entry is not None and entry.get("files") == stamp:
        return str(entry["fingerprint"])
    value = _compute(files[0], files[1:])
    cache[str(model_dir)] = {"files": stamp, "fingerprint": value}
    _write_cache(cache_path, cache)
    return value


def _weight_files(model_dir: Path) -> list[Path]:
    """Weight files in name order; none at all means this is not a usable model directory."""
    weights = sorted(p for p in model_dir.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not weights:
        raise FileNotFoundError(f"no *.safetensors or *.bin weight files in {model_dir}")
    return weights


def _stamp(path: Path) -> list[str | int]:
    """What invalidates a cached fingerprint: a file renamed, resized or rewritten."""
    st = path.stat()
    return [path.name, st.st_size, st.st_mtime_ns]


def _compute(config: Path, weights: list[Path]) -> str:
    """Hash the canonical config JSON, then ``\\n<name>\\0<sha256>`` per weight file.

    Compact JSON has no raw newline, file names no NUL and digests are 64 hex characters,
    so distinct inputs cannot be framed alike.
    """
    try:
        canonical = json.dumps(json.loads(config.read_text()), sort_keys=True, separators=(",", ":"))
    except ValueError as error:  # json's message names no file
        raise ValueError(f"{config} is not JSON: {error}") from error
    digest = hashlib.sha256(canonical.encode())
    for path in weights:
        digest.update(f"\n{path.name}\0{sha256_file(path)}".encode())
    return "sha256:" + digest.hexdigest()


def _cache_dir() -> Path:
    if os.environ.get("GFN_CACHE_DIR"):
        return Path(os.environ["GFN_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gfn"


def _read_cache(path: Path) -> dict[str, Any]:
    """The cache is only an optimisation: an unreadable or corrupt one counts as empty."""
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _write_cache(path: Path, cache: dict[str, Any]) -> None:
    """Best effort: a read-only home must not stop fingerprinting, only make it slower."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(cache, indent=1).encode())
    except OSError:
        pass
