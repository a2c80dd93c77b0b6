"""The one loading path for base models, tokenizers and LoRAs, shared by trainer and service.

Both sides must see the same weights in the same dtype, or the log-probs the adapter was
trained against differ from the ones it is served with. Accepts a local Hugging Face
directory, or a hub id where the hub is reachable. Kept out of ``adapters/__init__`` because
importing transformers takes seconds.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from adapters.manifest import Dtype, LoraSpec

if TYPE_CHECKING:
    import peft


class BaseModelUnreadable(ValueError):
    """The base model's directory does not load: a config, weights or tokenizer file is damaged."""


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Tokenizer saved alongside the base model."""
    with _naming(path):
        return AutoTokenizer.from_pretrained(str(path))


@contextlib.contextmanager
def _naming(path: str | Path) -> Iterator[None]:
    """transformers' errors for a damaged file ("Expecting property name", a safetensors header)
    name neither the model nor the file: say which model failed to load."""
    try:
        yield
    except (OSError, ValueError, SafetensorError) as error:
        raise BaseModelUnreadable(f"cannot load the model at {path}: {type(error).__name__}: {error}") from error


def document_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special tokens the tokenizer puts before a document (Llama's and Gemma's BOS; none for
    GPT-2 or the demo model). Every text the base model reads from its start begins with them,
    in training and in serving alike: models trained with a BOS degrade without it."""
    full, bare = tokenizer("a")["input_ids"], _plain(tokenizer, "a")
    return full[:next((k for k in range(len(full)) if full[k:k + len(bare)] == bare), 0)]


def context_ids(tokenizer: PreTrainedTokenizerBase, text: str, prefix: list[int]) -> list[int]:
    """Ids of a text the model reads from its start: ``prefix`` (a document prefix: the tokenizer's,
    or the one a manifest records), then the text as the tokenizer spells a document's beginning."""
    return prefix + _plain(tokenizer, text)


def piece_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Ids of a text that continues other text (a latent, an ending, a terminator, a word), as the
    tokenizer spells it inside a document. SentencePiece tokenizers (Llama-2's, Mistral's) mark a
    document's start with a "▁" that a text encoded alone would also get; encoded after a newline
    whose ids are then dropped, it gets none. Where the newline's ids do not lead unchanged (it
    merged with the text), the text is encoded alone. Byte-level BPE spells both alike."""
    anchor = _newline(tokenizer)
    ids = _plain(tokenizer, "\n" + text)
    return ids[len(anchor):] if ids[:len(anchor)] == anchor else _plain(tokenizer, text)


def piece_text(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    """The text of ids that continue other text, the inverse of `piece_ids`: a SentencePiece
    decoder drops the space of a leading "▁" (a document's start), which a piece keeps."""
    anchor = _newline(tokenizer)
    return tokenizer.decode(anchor + list(ids))[len(tokenizer.decode(anchor)):]


def special_token_in(tokenizer: PreTrainedTokenizerBase, text: str) -> str | None:
    """A special token of the tokenizer (those added as special too: Llama-3's "<|eot_id|>") that
    `text` spells, if any: inside a text, it would be read as the control token itself, not as text."""
    return next((token for token in _special_texts(tokenizer) if token in text), None)


@functools.lru_cache(maxsize=8)
def _special_texts(tokenizer: PreTrainedTokenizerBase) -> tuple[str, ...]:
    added = (t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    return tuple(sorted({*tokenizer.all_special_tokens, *added}))


def _plain(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@functools.lru_cache(maxsize=8)
def _newline(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids of "\n", which pieces are spelled after: once per tokenizer, not once per piece (shared:
    callers read it, never change it)."""
    return _plain(tokenizer, "\n")


def tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    """What decides the token ids of every text: the tokenizer's whole pipeline (normalizer,
    pre-tokenizer, vocabulary and merges, special tokens, post-processor). The base model's
    fingerprint covers config and weights only; an adapter's manifest holds token ids (terminator,
    masks, document prefix) that another tokenizer would misread. A chat template does not count."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        spelled = json.dumps(sorted(tokenizer.get_vocab().items()))
    else:  # without truncation and padding: settings of a call (transformers resets them on the first), not of the ids
        from tokenizers import Tokenizer

        copy = Tokenizer.from_str(backend.to_str())
        copy.no_truncation()
        copy.no_padding()
        spelled = copy.to_str()
    return "sha256:" + hashlib.sha256(spelled.encode()).hexdigest()


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that fills padding: the pad token, else eos (GPT-2's and Llama's tokenizers have no
    pad). Padding is masked by length everywhere, so its value never changes a result."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def left_pad(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Token rows batched as both sides feed them to the model: left-padded to end at the last
    column, with position ids that skip the padding, as if each row were alone."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        attention[i, width - len(row):] = 1
    return {"input_ids": ids, "attention_mask": attention, "position_ids": (attention.cumsum(1) - 1).clamp(min=0)}


def load_causal_lm(path: str | Path, dtype: Dtype = "float32") -> PreTrainedModel:
    """Causal LM in eval mode: dropout off, so sampling and scoring are deterministic given a seed."""
    with _naming(path):
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype)).eval()


def attach_lora(model: PreTrainedModel, spec: LoraSpec) -> peft.PeftModel:
    """A trainable LoRA on ``model``. Every target must name a module of it: peft refuses only
    when none does, and would otherwise adapt fewer modules than the manifest records."""
    import peft  # seconds to import: only where a LoRA is made

    names = [name for name, _ in model.named_modules()]
    missing = [t for t in spec.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"})
        raise ValueError(f"lora.target_modules: {', '.join(missing)} name no module of this "
                         f"{type(model).__name__} (the bundled configs name Llama's); its linear modules are "
                         f"{', '.join(linear)}")
    return peft.get_peft_model(model, peft.LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                                                      target_modules=spec.target_modules))


def save_lora(model, out: str | Path) -> None:
    """A peft model's LoRA weights as an adapter directory. With lm_head among the targets
    peft would also copy the base's whole output matrix into the adapter (for resized
    vocabularies); the vocabulary never changes here, so only the LoRA factors are saved."""
    model.save_pretrained(out, save_embedding_layers=False)
    (Path(out) / "README.md").unlink(missing_ok=True)
