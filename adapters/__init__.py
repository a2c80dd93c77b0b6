"""Adapter store, manifest and base-model fingerprint: the contract between trainer and service.

``adapters.models`` is not re-exported: it imports transformers, which takes seconds.
"""

from adapters.errors import (
    AdapterCorrupt,
    AdapterError,
    AdapterNotFound,
    BaseModelMismatch,
    InvalidAdapterName,
)
from adapters.fingerprint import fingerprint
from adapters.manifest import BaseModelRef, LoraSpec, Manifest, VocabMask
from adapters.store import AdapterStore, LoadedAdapter, check_name, parse_ref

__all__ = [
    "AdapterCorrupt",
    "AdapterError",
    "AdapterNotFound",
    "AdapterStore",
    "BaseModelMismatch",
    "BaseModelRef",
    "InvalidAdapterName",
    "LoadedAdapter",
    "LoraSpec",
    "Manifest",
    "VocabMask",
    "check_name",
    "fingerprint",
    "parse_ref",
]
