"""Adapter store: versioned, atomically written, verified adapters on disk.

Layout::

    <root>/<name>/v<N>/            peft files, extras (plots, metrics), manifest.json (with
                                   every other file's sha256) and manifest.sha256 (its own)
    <root>/<name>/.lock            flock held by every writer of <name>
    <root>/<name>/.last_version    highest version ever allocated
    <root>/.tmp/<name>~<hex>/      staging and deletion; a crash's leftovers go at the name's next
                                   save or delete

A version appears by one ``os.rename`` of a fully written, fsynced staging directory, so no
reader ever sees half a version. Its files never change afterwards and its number is never
reused, even after a delete, so ``name@vN`` always means the same weights: a server caching
adapters by ref can never serve one request with another adapter's weights.
"""

from __future__ import annotations

import builtins
import fcntl
import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, Field, ValidationError

from adapters._fs import fsync_path, sha256_file, write_atomic
from adapters.errors import (AdapterCorrupt, AdapterError, AdapterNotFound, BaseModelMismatch, InvalidAdapterName,
                             StoreNotADirectory)
from adapters.home import file_in_the_way
from adapters.manifest import Manifest, format_ref

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
MANIFEST = "manifest.json"
MANIFEST_DIGEST = "manifest.sha256"
WEIGHTS = "adapter_model.safetensors"
REQUIRED_FILES = ("adapter_config.json", WEIGHTS)
_STORE_FIELDS = frozenset({"name", "version", "created_at", "job_id", "files"})
_VERSION_RE = re.compile(r"v([1-9][0-9]*)")
_REF_VERSION_RE = re.compile(r"[1-9][0-9]{0,9}")
MAX_VERSION = 2**31 - 1
_LAST_VERSION = ".last_version"


@dataclass(frozen=True)
class LoadedAdapter:
    """A verified version: ``path`` is what peft or vLLM load, ``manifest`` how to serve it."""

    path: Path
    manifest: Manifest


def check_name(name: str) -> str:
    """Return ``name`` if it is a safe single path component, so no name can escape the store root.

    Public so that a training job can refuse a bad name before it trains, not when it saves.
    """
    if not _is_name(name):
        raise InvalidAdapterName(
            f"invalid adapter name {name!r}: use 1-64 characters from a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit and without '..'"
        )
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``name`` or ``name@vN`` as (name, N or None), or InvalidAdapterName saying which form to use."""
    name, at, version = ref.partition("@v")
    if at and not (_REF_VERSION_RE.fullmatch(version) and int(version) <= MAX_VERSION):
        raise InvalidAdapterName(f"invalid adapter {ref!r}: use 'name' or 'name@vN' (N from 1 to {MAX_VERSION})")
    return check_name(name), int(version) if at else None


def _valid_ref(ref: str) -> str:
    parse_ref(ref)
    return ref


AdapterName = Annotated[str, AfterValidator(check_name), Field(json_schema_extra={"pattern": f"^{NAME_RE.pattern}$"})]
AdapterRef = Annotated[str, AfterValidator(_valid_ref),
                       Field(json_schema_extra={"pattern": f"^{NAME_RE.pattern}(@v{_REF_VERSION_RE.pattern})?$"})]
"""Field types: a malformed name or ref fails validation with the field named (a 422 in the
service, a settings error at start), before any adapter is looked up."""


class AdapterStore:
    """Adapters under ``root``, shared by the trainer (writes) and the service (reads)."""

    def __init__(self, root: str | Path) -> None:
        """A root that does not exist yet is an empty store; one that is a file is refused now,
        not when a training run ends and saves into it."""
        self.root = Path(root)
        if (file := file_in_the_way(self.root)) is not None:
            raise StoreNotADirectory(f"adapter store {self.root}: {file} is a file, not a directory")

    def save(
        self, name: str, src_dir: str | Path, manifest_fields: dict[str, Any], job_id: str | None = None
    ) -> Manifest:
        """Store ``src_dir`` (a saved peft adapter plus any extras) as the next version of ``name``.

        ``manifest_fields`` are all manifest fields except those the store owns (name, version,
        created_at, job_id, files). With a ``job_id`` the call is idempotent: a retried job gets
        the version it already saved instead of a second one. A name keeps one task (`check_task`).
        """
        check_name(name)
        src = Path(src_dir)
        _check_source(src, manifest_fields)
        with self._lock(name) as name_dir:
            if job_id is not None and (saved := self.saved_by(name, job_id)) is not None:
                return saved
            self.check_task(name, manifest_fields.get("task"))
            self._clean_staging(name)
            version = self._next_version(name_dir)
            manifest = Manifest.model_validate(
                {
                    **manifest_fields,
                    "name": name,
                    "version": version,
                    "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "job_id": job_id,
                    "files": {},
                }
            )
            manifest = self._write_version(src, self._staging_dir(name), name_dir, manifest)
            fsync_path(name_dir)
            fsync_path(self.root)  # the name's directory itself, new on a name's first save
        return manifest

    @staticmethod
    def _write_version(src: Path, staging: Path, name_dir: Path, manifest: Manifest) -> Manifest:
        """Copy `src` into `staging` with its checksummed manifest, durably, then rename it into
        place as the version: a crash at any point leaves either no version or a whole one."""
        try:
            shutil.copytree(src, staging)
            files = {rel: sha256_file(path) for rel, path in _files(staging).items()}
            manifest = manifest.model_copy(update={"files": files})
            data = manifest.model_dump_json(indent=2).encode()
            (staging / MANIFEST).write_bytes(data)
            (staging / MANIFEST_DIGEST).write_text(hashlib.sha256(data).hexdigest())
            for path in [*staging.rglob("*"), staging]:
                fsync_path(path)
            write_atomic(name_dir / _LAST_VERSION, str(manifest.version).encode())
            os.rename(staging, name_dir / f"v{manifest.version}")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return manifest

    def load(
        self, name: str, version: int | None = None, base_fingerprint: str | None = None,
        base_tokenizer: str | None = None,
    ) -> LoadedAdapter:
        """Return a version (latest if None) after checking it is intact and fits the base model.

        Every file's sha256 must match the manifest, with nothing missing or added; with
        ``base_fingerprint``, the adapter must have been trained on that exact base model, and with
        ``base_tokenizer`` (a tokenizer_digest) on that tokenizer, where its manifest records one.
        """
        path = self._locate(name, version)
        manifest = _read_manifest(path, verify=True)
        trained_on = manifest.base_model
        if base_fingerprint is not None and base_fingerprint != trained_on.fingerprint:
            raise BaseModelMismatch(
                f"adapter {manifest.ref} was trained on base model {trained_on.fingerprint} "
                f"({trained_on.path}), but the base model given has fingerprint {base_fingerprint}; "
                "use the base model it was trained on, or retrain the adapter on this one"
            )
        if None not in (base_tokenizer, trained_on.tokenizer) and base_tokenizer != trained_on.tokenizer:
            raise BaseModelMismatch(
                f"adapter {manifest.ref} was trained with another tokenizer ({trained_on.tokenizer}) on these "
                f"weights ({trained_on.path}); this base model's tokenizer is {base_tokenizer}, which would read "
                "its token ids (terminator, masks) as other text: restore that tokenizer, or retrain the adapter"
            )
        _verify_files(path, manifest)
        return LoadedAdapter(path=path, manifest=manifest)

    def manifest(self, name: str, version: int | None = None) -> Manifest:
        """Manifest of a version (latest if None) without checksums: cheap, for listings."""
        return _read_manifest(self._locate(name, version))

    def task_of(self, name: str) -> str | None:
        """The task of a name's newest readable version; None for a name not stored yet."""
        return next((m.task for m in self._manifests(name, reversed(self.versions(name)))), None)

    def check_task(self, name: str, task: str | None) -> None:
        """A name keeps one task: the service routes a task's requests by name, and another task's
        version would take them. A ValueError saying so; checked again at save, under the lock."""
        held = self.task_of(name)
        if held is not None and held != task:
            raise ValueError(f"adapter name {name!r} holds {held} adapters, not {task}: a name keeps one task; "
                             "pick another name")

    def check_writable(self) -> None:
        """A ValueError where no version could be saved (a store that cannot be made, a read-only
        one): a run checks before it trains, not at its save."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(f"adapter store {self.root} cannot be made: {error.strerror or error}") from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise ValueError(f"adapter store {self.root} is not writable: no version could be saved there")

    def versions(self, name: str) -> list[int]:
        """Stored versions of ``name`` in increasing order; empty if there are none. Only directories
        a ref can name count: a file called `v2`, or a `v99999999999` made by hand, is no version."""
        name_dir = self.root / check_name(name)
        if not name_dir.is_dir():
            return []
        try:
            return sorted(n for p in name_dir.iterdir()
                          if (m := _VERSION_RE.fullmatch(p.name)) and (n := int(m[1])) <= MAX_VERSION and p.is_dir())
        except OSError as error:
            raise AdapterCorrupt(f"adapter {name!r}: {name_dir} cannot be read ({error.strerror})") from None

    def latest(self, name: str) -> int:
        """Highest stored version of ``name``."""
        versions = self.versions(name)
        if not versions:
            raise AdapterNotFound(
                f"no adapter named {name!r} in {self.root}; "
                f"stored adapters: {', '.join(self.names()) or 'none'}"
            )
        return versions[-1]

    def names(self) -> list[str]:
        """Names with at least one stored version, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if _is_name(p.name) and self._listed(p.name))

    def _listed(self, name: str) -> bool:
        """Whether `name` holds versions; an unreadable name is listed, for whoever reads it to say why."""
        try:
            return bool(self.versions(name))
        except AdapterCorrupt:
            return True

    def delete(self, name: str, version: int) -> None:
        """Remove one version; its number is not reused by later saves."""
        self._locate(name, version)  # fail before a lock file is created for an unknown name
        with self._lock(name) as name_dir:
            path = self._locate(name, version)  # again under the lock: a concurrent delete may have won
            self._clean_staging(name)
            trash = self._staging_dir(name)
            trash.mkdir()
            os.rename(path, trash / path.name)  # atomic: a crash leaves the version whole or gone
            fsync_path(name_dir)
            shutil.rmtree(trash)

    def _locate(self, name: str, version: int | None) -> Path:
        """Directory of a stored version (latest if None), or AdapterNotFound listing what exists."""
        if version is None:
            version = self.latest(name)
        path = self.root / check_name(name) / f"v{version}"
        if isinstance(version, bool) or not isinstance(version, int) or not path.is_dir():
            raise AdapterNotFound(
                f"adapter {format_ref(name, version)} not found in {self.root}; "
                f"versions of {name!r}: {self.versions(name) or 'none'}"
            )
        return path

    @contextmanager
    def _lock(self, name: str) -> Iterator[Path]:
        """Serialise the writers of one name: job lookup, version allocation and cleanup."""
        name_dir = self.root / name
        with _in_the_way(name_dir / ".lock"):
            name_dir.mkdir(parents=True, exist_ok=True)
            lock = (name_dir / ".lock").open("a")
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield name_dir

    def _staging_dir(self, name: str) -> Path:
        """A fresh path under ``.tmp``: same file system as the versions, so rename is atomic."""
        tmp = self.root / ".tmp"
        with _in_the_way(tmp):
            tmp.mkdir(parents=True, exist_ok=True)
        return tmp / f"{name}~{uuid.uuid4().hex}"

    def _clean_staging(self, name: str) -> None:
        """Remove leftovers of crashed writers of ``name``; called under its lock, so none is live."""
        for leftover in (self.root / ".tmp").glob(f"{name}~*"):
            shutil.rmtree(leftover, ignore_errors=True)

    def _next_version(self, name_dir: Path) -> int:
        """One past the highest version ever allocated, deleted ones included."""
        last = name_dir / _LAST_VERSION
        try:
            allocated = int(last.read_text()) if last.exists() else 0
        except (OSError, ValueError):  # damaged by hand: the versions present still bound it
            allocated = 0
        version = max([allocated, *self.versions(name_dir.name)]) + 1
        while (name_dir / f"v{version}").exists():  # a file of that name, left by hand
            version += 1
        if version > MAX_VERSION:
            raise AdapterCorrupt(f"{name_dir}: no version is left to allocate past {MAX_VERSION} (see {last})")
        return version

    def saved_by(self, name: str, job_id: str) -> Manifest | None:
        """The version a job already saved, if any. A damaged version is skipped: it must not
        fail every later save of its name (at worst the job saves once more)."""
        return next((m for m in self._manifests(name, self.versions(name)) if m.job_id == job_id), None)

    def _manifests(self, name: str, versions: Iterable[int], damaged: dict[str, str] | None = None) -> Iterator[Manifest]:
        """The readable manifests of these versions; a damaged one is skipped (its reason kept in
        ``damaged``, by ref, when given)."""
        for version in versions:
            try:
                yield self.manifest(name, version)
            except AdapterError as error:  # damaged, or gone since it was listed
                if damaged is not None:
                    damaged[format_ref(name, version)] = str(error)

    def list(self, damaged: dict[str, str] | None = None) -> builtins.list[Manifest]:
        """Manifests of every readable version of every adapter, by name then version: one damaged
        version must not hide the others (with ``damaged``, a dict, it gets why each was skipped).

        Defined last: in the class body, ``list`` names this method from here on.
        """
        manifests = []
        for name in self.names():
            try:
                manifests += self._manifests(name, self.versions(name), damaged)
            except AdapterCorrupt as error:  # the name's directory cannot be read
                if damaged is not None:
                    damaged[name] = str(error)
        return manifests


@contextmanager
def _in_the_way(path: Path) -> Iterator[None]:
    """A store path the store cannot make or open (a `.lock` that is a directory, a `.tmp` that
    is a file, a permission) is a damaged store, named, not a traceback."""
    try:
        yield
    except OSError as error:
        raise AdapterCorrupt(f"cannot use {path} ({error.strerror}): make it writable, or remove what is in the "
                             "way") from error


def _is_name(name: object) -> bool:
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None and ".." not in name


def _check_source(src: Path, manifest_fields: dict[str, Any]) -> None:
    """Refuse a save that could not be served, before anything is written."""
    if not src.is_dir():
        raise NotADirectoryError(f"adapter source {src} is not a directory")
    missing = [f for f in REQUIRED_FILES if not (src / f).is_file()]
    if missing:
        raise FileNotFoundError(f"adapter source {src} lacks {missing}; save the peft model there")
    if (src / MANIFEST).exists():
        raise ValueError(f"adapter source {src} already has a {MANIFEST}; the store writes it")
    owned = sorted(_STORE_FIELDS & manifest_fields.keys())
    if owned:
        raise ValueError(f"manifest fields {owned} are set by the store; leave them out")


def _files(version_dir: Path) -> dict[str, Path]:
    """Every file of a version by relative POSIX path, its manifest and digest excluded."""
    own = {version_dir / MANIFEST, version_dir / MANIFEST_DIGEST}
    return {
        path.relative_to(version_dir).as_posix(): path
        for path in sorted(version_dir.rglob("*"))
        if path.is_file() and path not in own
    }


def _read_manifest(path: Path, verify: bool = False) -> Manifest:
    """Parse ``<path>/manifest.json`` and check it describes the directory it sits in; with
    ``verify``, also that it is byte for byte the manifest that was saved (a changed field
    that still parses, such as a mask or the base model's fingerprint, is caught too)."""
    ref = f"{path.parent.name}@{path.name}"
    try:
        data = (path / MANIFEST).read_bytes()
        if verify and hashlib.sha256(data).hexdigest() != (path / MANIFEST_DIGEST).read_text().strip():
            raise AdapterCorrupt(f"adapter {ref}: {path / MANIFEST} changed since it was saved "
                                 f"(its sha256 is not the one in {MANIFEST_DIGEST}); save the adapter again")
        manifest = Manifest.model_validate_json(data)
    except (OSError, ValidationError) as e:
        raise AdapterCorrupt(f"adapter {ref}: cannot read {path / MANIFEST}: {e}") from e
    if manifest.ref != ref:
        raise AdapterCorrupt(
            f"{path / MANIFEST} describes {manifest.ref}, not {ref}; was the directory moved by hand?"
        )
    return manifest


def _verify_files(path: Path, manifest: Manifest) -> None:
    """Raise AdapterCorrupt unless the files on disk are exactly those of the manifest."""
    found = _files(path)
    missing = sorted(manifest.files.keys() - found.keys())
    added = sorted(found.keys() - manifest.files.keys())
    advice = f"delete {manifest.ref} and save it again from its training run"
    if missing:
        raise AdapterCorrupt(
            f"adapter {manifest.ref}: file(s) {missing} listed in the manifest are missing "
            f"from {path}; {advice}"
        )
    if added:
        raise AdapterCorrupt(
            f"adapter {manifest.ref}: file(s) {added} in {path} are not listed in the manifest; "
            "remove them"
        )
    for rel, expected in manifest.files.items():
        try:
            found_sha = sha256_file(found[rel])
        except OSError as error:  # a permission, a disk fault: this version's trouble, not the caller's crash
            raise AdapterCorrupt(f"adapter {manifest.ref}: file {rel!r} cannot be read ({error.strerror})") from None
        if found_sha != expected:
            raise AdapterCorrupt(
                f"adapter {manifest.ref}: file {rel!r} has sha256 {found_sha}, "
                f"the manifest says {expected}; {advice}"
            )
