"""What every way of training an adapter (SubTB, SFT, RL) checks and resolves before it trains."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapters.models import special_token_in
from trainer.tasks import Prompt, Task


def resolve_base_model(name: str) -> str:
    """A local model directory for `name`: 'demo' is the demo world's base model (built on
    first use), a directory is itself, anything else a hub id, fetched or found in the hub
    cache, so that loading and the base-model fingerprint read the same files."""
    if name == "demo":
        from world.base_model import build
        return str(build())
    path = Path(name).expanduser()
    if path.is_dir():  # absolute: the manifest records it, and it is read from other directories
        return str(path.resolve())
    if path.is_absolute() or name.startswith((".", "~")) or path.exists():
        where = "" if path.is_absolute() else f", read from the current directory {Path.cwd()}"
        raise FileNotFoundError(f"base model directory {name} does not exist (or is not a directory{where})")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(name)
    except (OSError, ValueError) as error:  # not found, offline, not a valid id: the hub's errors say neither
        raise FileNotFoundError(f"base model {name!r} is no directory here, nor found on the hub: "
                                f"{' '.join(str(error).split())}") from error


def check_prompts(task: Task, prompts: list[Prompt], model_config: Any) -> None:
    """Each prompt, training's and evaluation's, before any training: a record's text is text (a
    special token spelled in it would be read as the control token), and what the model reads for
    it, sample and reward alike, fits its positions: beyond them training fails deep in the
    embedding (learned positions), after hours if only an evaluation prompt is long, or reads what
    the model never learned (RoPE)."""
    everything = prompts + task.eval_prompts()
    for prompt in everything:
        texts = [v for value in prompt.fields.values() for v in (value if isinstance(value, list) else [value])]
        if found := next(filter(None, (special_token_in(task.tokenizer, v) for v in texts if isinstance(v, str))), None):
            raise ValueError(f"task: the record of prompt {prompt.key[:80]!r} holds {found!r}, the tokenizer's special "
                             "token, which would be read as that token, not as text; remove it from the data")
    limit = getattr(model_config, "max_position_embeddings", None)
    longest = max(everything, key=task.read_length, default=None)
    if limit is not None and longest is not None and task.read_length(longest) > limit:
        raise ValueError(f"task: the prompt {longest.key[:80]!r}, with task.max_len {task.config.max_len} tokens after it "
                         f"and what its reward reads, comes to {task.read_length(longest)} tokens, beyond the base "
                         f"model's {limit} positions; shorten the data or lower task.max_len")
