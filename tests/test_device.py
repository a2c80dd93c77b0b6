"""The one device setting of training configs and the transformers engine: a device that is not
here is refused when the setting is read, naming it, not at the first tensor that meets it."""

from __future__ import annotations

import pydantic
import pytest
import torch

from adapters.device import resolve_device
from service.settings import Settings
from trainer.config import load_config


def test_auto_is_the_gpu_where_there_is_one_and_absent_gpus_are_named():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device: cuda:999 asked for"):
        resolve_device("cuda:999")


def test_the_setting_takes_only_device_names():
    for bad in ("gpu", "cuda:", "cuda:x", "mps", "cuda:999"):
        with pytest.raises(pydantic.ValidationError, match="device"):
            Settings(device=bad)
        if bad != "cuda:999":  # a training config names where it trains, not where it was submitted
            with pytest.raises(pydantic.ValidationError, match="device"):
                load_config("rng", [f"device={bad}"])


def test_the_transformers_engine_refuses_an_absent_gpu_when_made(demo_model):
    from service.engines.hf import HFEngine

    with pytest.raises(ValueError, match="device: cuda:999"):
        HFEngine(demo_model, pad_id=0, device="cuda:999")
    assert HFEngine(demo_model, pad_id=0, device="auto").device == resolve_device("auto")
