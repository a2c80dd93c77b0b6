"""Where a model runs: one setting for training configs and the transformers engine alike."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pydantic import Field

if TYPE_CHECKING:
    import torch

Device = Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:[0-9]{1,4})?)$", description=(
    "where the model runs: auto (the GPU where CUDA is available, else the CPU), cpu, cuda or cuda:N"))]


def resolve_device(name: str) -> torch.device:
    """The device ``name`` means here; auto: the (first visible) GPU where CUDA is available, else
    the CPU. A GPU that is not here is a ValueError naming the setting, not a failure at first use."""
    import torch  # local: settings and configs validate without importing torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind, _, index = name.partition(":")  # read here: torch keeps an index in 8 bits (cuda:999 is cuda:-25)
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name} asked for, but CUDA is not available here (use auto or cpu)")
    if kind == "cuda" and int(index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device: {name} asked for, but {torch.cuda.device_count()} GPUs are visible here")
    return torch.device(name)
