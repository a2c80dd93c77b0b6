"""Errors of the adapter store.

One base class so that callers (the service, the CLI) can catch every store failure with a
single ``except AdapterError`` and map the subclasses to distinct responses. Messages are
built where the error is raised and name the adapter, version, file and the expected vs
found values, so the reader can act without a debugger.
"""


class AdapterError(Exception):
    """Base of every error the adapter store raises."""


class AdapterNotFound(AdapterError):
    """The requested adapter name or version does not exist in the store."""


class AdapterCorrupt(AdapterError):
    """A stored version does not match its manifest (bad checksum, missing or extra file)."""


class BaseModelMismatch(AdapterError):
    """The adapter was trained on a different base model than the one it is applied to."""


class InvalidAdapterName(AdapterError, ValueError):
    """The name is not a safe single path component (it would allow path traversal)."""


class StoreNotADirectory(AdapterError, NotADirectoryError):
    """The store's root is a file: no adapter can be stored under it (a mistyped --store or GFN_STORE)."""
