"""Serving an adapter the way it was trained: its prompt template, length limits, mask and
word bias (the manifest's serving contract, docs/DESIGN.md)."""

from __future__ import annotations

from collections.abc import Mapping
from string import Formatter

from fastapi.exceptions import RequestValidationError

from adapters.manifest import Manifest
from service.engines.base import GenRequest, Tool
from service.errors import invalid


def template_fields(template: str) -> set[str]:
    return {name for _, name, _, _ in Formatter().parse(template) if name}


def render(manifest: Manifest, fields: dict[str, str | None]) -> str:
    """The manifest's prompt with the request's fields; every field the template needs must be
    given and every field given must be used (a silently ignored field would mislead)."""
    needed = template_fields(manifest.prompt_template)
    who = f"adapter {manifest.ref} (task {manifest.task})"
    for name, value in fields.items():
        if value is not None and name not in needed:
            raise invalid(name, f"{who} does not take '{name}'; its prompt takes {sorted(needed) or 'no fields'}")
    if missing := [name for name in sorted(needed) if fields.get(name) is None]:  # all of them, in one answer
        raise RequestValidationError([{"type": "missing", "loc": ("body", name), "msg": f"{who} needs '{name}'",
                                       "input": None} for name in missing])
    return manifest.prompt_template.format(**{name: fields[name] for name in needed})


def check_max_tokens(manifest: Manifest, max_tokens: int | None, cap: int) -> None:
    """``max_tokens`` may only cut the adapter's lengths shorter, and the service's ``cap`` must reach its least."""
    if max_tokens is not None and not manifest.min_len <= max_tokens <= manifest.max_len:
        raise invalid("max_tokens", f"max_tokens is {max_tokens}; adapter {manifest.ref} samples "
                                    f"{manifest.min_len} to {manifest.max_len} tokens", max_tokens)
    if max_tokens is None and manifest.min_len > cap:
        raise invalid("adapter", f"adapter {manifest.ref} samples at least {manifest.min_len} tokens; this service "
                                 f"samples at most {cap} (GFN_MAX_TOKENS)", manifest.ref)


def gen_request(manifest: Manifest, prompt_ids: list[int], n: int, temperature: float, seed: int | None,
                max_tokens: int | None, cap: int, tool: Tool | None = None,
                bias: Mapping[int, float] | None = None) -> GenRequest:
    """Sampling of the trained policy; ``max_tokens`` (default: max_len, at most the service's
    ``cap``, GFN_MAX_TOKENS) may only cut it shorter; ``bias``: the prompt's word bias
    (adapters.manifest.word_bias of the manifest's rules)."""
    check_max_tokens(manifest, max_tokens, cap)
    return GenRequest(prompt_ids=prompt_ids, adapter=manifest.ref, terminator_id=manifest.terminator_id,
                      max_tokens=max_tokens or min(manifest.max_len, cap), min_tokens=manifest.min_len,
                      stop_after=frozenset(manifest.stop_after), mask=manifest.mask,
                      bias=bias or {}, n=n, temperature=temperature, seed=seed, tool=tool)
