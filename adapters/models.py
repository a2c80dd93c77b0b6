"""The one loading path for base models and tokenizers, shared by trainer and service.

Both sides must see the same weights in the same dtype, or the log-probs the adapter was
trained against differ from the ones it is served with. Accepts a local Hugging Face
directory, or a hub id where the hub is reachable. Kept out of ``adapters/__init__`` because
importing transformers takes seconds.
"""

import itertools
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Tokenizer saved alongside the base model."""
    return AutoTokenizer.from_pretrained(str(path))


def document_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special tokens the tokenizer puts before a document (Llama's and Gemma's BOS; none for
    GPT-2 or the demo model). Every text the base model reads from its start begins with them,
    in training and in serving alike: models trained with a BOS degrade without it."""
    special = set(tokenizer.all_special_ids)
    return list(itertools.takewhile(special.__contains__, tokenizer("a")["input_ids"]))


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Causal LM in eval mode: dropout off, so sampling and scoring are deterministic given a seed."""
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def save_lora(model, out: str | Path) -> None:
    """A peft model's LoRA weights as an adapter directory. With lm_head among the targets
    peft would also copy the base's whole output matrix into the adapter (for resized
    vocabularies); the vocabulary never changes here, so only the LoRA factors are saved."""
    model.save_pretrained(out, save_embedding_layers=False)
    (Path(out) / "README.md").unlink(missing_ok=True)
