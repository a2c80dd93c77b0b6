"""A byte-level BPE tokenizer trained on the corpus, saved as a transformers tokenizer.

Numbers are read digit by digit, and a digit takes the space before it: " 7" is one
token, so copying a value (the answer after a rationale, an operand into a step) is
copying one token, which a tiny model learns; with a lone space token in between, the
first demo models never did. The exception is a space after "<digit>:", which stays its
own token: the random-number prompt ends in "100: ", and its number must follow the
prompt's ids as it followed them in training. No BOS is added, so a prompt's ids followed
by a latent's ids equal the ids of the joined text whenever the latent starts with a
space or punctuation.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"
DIGIT = Regex(r"(?<![0-9]:) ?[0-9]")  # one digit and the space before it (module docstring)


def train_tokenizer(lines: list[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(DIGIT, behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(lines, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=EOS, bos_token=EOS)


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: Path) -> None:
    tokenizer.save_pretrained(directory)
