"""Where the project keeps its files: GFN_HOME, else ./.gfn (the repo root under make).

    <home>/models/    built base models (the demo world)
    <home>/adapters/  the adapter store (GFN_STORE moves it, for trainer, worker and service alike)
    <home>/runs/      training runs: checkpoints and logs
"""

from __future__ import annotations

import os
from pathlib import Path


def gfn_home() -> Path:
    """An empty GFN_HOME counts as unset: as "." it would put the store into the source tree."""
    return Path(os.environ.get("GFN_HOME") or ".gfn").resolve()


def store_root() -> Path:
    store = os.environ.get("GFN_STORE")
    return Path(store).resolve() if store else gfn_home() / "adapters"


def runs_root() -> Path:
    return gfn_home() / "runs"


def file_in_the_way(directory: Path) -> Path | None:
    """The file at or above `directory` that keeps a directory from being made there, if any
    (a mistyped GFN_HOME, GFN_STORE or --store). A path this user may not look into is no
    file: whatever writes there names that error itself."""
    for path in (directory, *directory.parents):
        try:
            if path.exists() and not path.is_dir():
                return path
        except OSError:
            continue
    return None
