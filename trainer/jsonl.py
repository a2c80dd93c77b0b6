"""Users' own data for a task: one JSON object per line, validated line by line, so that
a bad line is reported by its number and field instead of failing somewhere in training."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ValidationError

from adapters._fs import sha256_file
from adapters.unique_json import DuplicateKey, unique_keys
from jobs.configs import DATA_KEYS

Record = TypeVar("Record", bound=BaseModel)


class DataError(ValueError):
    """A data file that cannot be used, with the line and field at fault."""


def load_jsonl(path: str | Path, record_type: type[Record]) -> list[Record]:
    """Every non-blank line of `path` as a `record_type`; the first bad line raises
    DataError naming the file, the line number and the field."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {'a directory, not a data file' if path.is_dir() else 'no such data file'}")
    raw = path.read_bytes()
    try:  # a BOM (as some editors write) is no error; lines end at "\n" only, as JSON Lines says
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise DataError(f"{path} line {line}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    records = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line, object_pairs_hook=unique_keys)
        except json.JSONDecodeError as error:
            raise DataError(f"{path} line {number}: not valid JSON ({error.msg})") from None
        except DuplicateKey as error:
            raise DataError(f"{path} line {number}: field '{error.key}' appears twice") from None
        if not isinstance(data, dict):
            raise DataError(f"{path} line {number}: expected a JSON object, got {type(data).__name__}")
        try:
            records.append(record_type.model_validate(data))
        except ValidationError as error:
            first = error.errors()[0]
            field = ".".join(str(part) for part in first["loc"]) or "(record)"
            raise DataError(f"{path} line {number}: field '{field}': {first['msg']}") from None
    if not records:
        raise DataError(f"{path}: no records (expected one JSON object per line)")
    return records


def data_digest(task: Any) -> str | None:
    """sha256 of the user's data files (task.data, task.eval_data), or None for the demo world's:
    a path names a run's data only while the file stays as it was."""
    files = [path for key in DATA_KEYS if (path := getattr(task, key, None)) is not None]
    return " ".join(sha256_file(Path(path)) for path in files) or None


def split_data(data: str, eval_data: str | None, record_type: type[Record],
               held_out: Callable[[Record], bool]) -> tuple[list[Record], list[Record]]:
    """(training, evaluation) records of a user's data: all of `data` and all of
    `eval_data` when it is given, else `data` split by a stable `held_out` predicate (about a
    tenth held out). A split that leaves either side empty is an error: evaluating on the
    training records would report memorisation as quality."""
    records = load_jsonl(data, record_type)
    if eval_data is not None:
        return records, load_jsonl(eval_data, record_type)
    train = [r for r in records if not held_out(r)]
    held = [r for r in records if held_out(r)]
    if not train or not held:
        raise DataError(f"{data}: the held-out split of its {len(records)} records leaves "
                        f"{'none to train on' if not train else 'none to evaluate on'}; add records or give eval_data")
    return train, held


def task_records(config: Any, record_type: type[Record], held_out: Callable[[Record], bool],
                 demo: Callable[[], list[Record]], demo_held: Callable[[list[Record]], list[Record]]
                 ) -> tuple[list[Record], list[Record]]:
    """(training, evaluation) records of a task config with `data`, `eval_data` and `eval_prompts`:
    the user's data (split_data), else the demo world's (`demo()`, evaluated on `eval_data` or on
    `demo_held(training)`); the first `eval_prompts` evaluation records."""
    if config.data is not None:
        train, held = split_data(config.data, config.eval_data, record_type, held_out)
    else:
        train = demo()
        held = load_jsonl(config.eval_data, record_type) if config.eval_data is not None else demo_held(train)
    return train, held[: config.eval_prompts]


def data_file(record_type: type[BaseModel]) -> Any:
    """The type of a config field naming a JSONL file of `record_type` (or None): the file
    is read when the config is, so a bad line fails there, naming the line and field. A relative
    path is made absolute, so the manifest's config finds the file from any directory."""
    def check(path: str | None) -> str | None:
        if path is not None:
            load_jsonl(path, record_type)
            path = str(Path(path).resolve())
        return path
    return Annotated[str | None, AfterValidator(check)]


def stable_tenth(key: str) -> bool:
    """True for one key in ten, the same on every run and machine (a hash, not a seed)."""
    return hashlib.sha256(key.encode()).digest()[0] % 10 == 0
