"""Small file-system helpers shared by the store and the fingerprint cache."""

import hashlib
import os
import uuid
from pathlib import Path

PARTIAL = ".tmp"  # how write_atomic's temporary files end: one a killed writer left is no content


def is_partial(name: str) -> bool:
    """A temporary file of `write_atomic`, left by a process killed while writing."""
    return name.startswith(".") and name.endswith(PARTIAL)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed so multi-GB weights never sit in memory."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fsync_path(path: Path) -> None:
    """Flush a file's content or a directory's entries (a rename is durable only once synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, previous: Path | None = None) -> None:
    """Replace ``path`` with ``data`` so readers see the old or the new content, never a torn one.
    With ``previous``, the old content moves there once the new one is durable: only a crash
    between those two renames leaves ``previous`` alone."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}{PARTIAL}")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # a full disk: a second copy left at each retry would fill it further
        tmp.unlink(missing_ok=True)
        raise
    if previous is not None and path.exists():
        os.replace(path, previous)
    os.replace(tmp, path)
    fsync_path(path.parent)
