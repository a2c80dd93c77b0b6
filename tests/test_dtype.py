"""A base model in bfloat16: trained so (the LoRA's own weights stay float32), recorded in the
manifest, and served so by default by both engines, each sample's log q the bfloat16 policy's."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import peft
import pytest
import torch
from safetensors import safe_open

from adapters.manifest import BaseModelRef, Manifest
from adapters.models import load_causal_lm, load_tokenizer
from adapters.store import AdapterStore
from service.app import create_app
from service.settings import Settings
from service.state import serving_dtype
from tests.service_world import Server, policy_log_q, save_adapter, task_fields
from trainer.config import load_config
from trainer.loop import Trainer


def test_a_bfloat16_run_trains_a_float32_lora_on_a_bfloat16_base_and_records_it(demo_model: Path, tmp_path: Path):
    config = load_config("rng", [f"base_model={demo_model}", "steps=2", "samples_per_prompt=16", "evaluate=false",
                                 "dtype=bfloat16"])
    trainer = Trainer(config, tmp_path / "run", AdapterStore(tmp_path / "store"), quiet=True)
    manifest = trainer.run()
    assert manifest.base_model.dtype == "bfloat16"
    dtypes = {name: p.dtype for name, p in trainer.model.named_parameters()}
    assert {d for name, d in dtypes.items() if "lora_" in name} == {torch.float32}  # the optimiser's updates
    assert {d for name, d in dtypes.items() if "lora_" not in name} == {torch.bfloat16}
    with safe_open(str(AdapterStore(tmp_path / "store").load("rng").path / "adapter_model.safetensors"), "pt") as saved:
        assert {saved.get_tensor(k).dtype for k in saved.keys()} == {torch.float32}
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.history)


def _manifest(dtype: str) -> Manifest:
    return Manifest.model_construct(base_model=BaseModelRef(path="m", fingerprint="f", dtype=dtype))


def test_auto_serves_the_start_up_adapters_dtype_and_float32_when_they_differ(tmp_path: Path):
    settings = Settings(store=tmp_path)
    assert serving_dtype(settings, [_manifest("bfloat16"), _manifest("bfloat16")]) == "bfloat16"
    assert serving_dtype(settings, [_manifest("bfloat16"), _manifest("float32")]) == "float32"
    assert serving_dtype(settings, []) == "float32"
    assert serving_dtype(Settings(store=tmp_path, dtype="float16"), [_manifest("bfloat16")]) == "float16"


class Logged(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_the_service_serves_its_adapters_dtype_and_warns_of_one_trained_in_another(demo_model: Path, tmp_path: Path):
    tok = load_tokenizer(demo_model)
    store = AdapterStore(tmp_path / "adapters")
    fields = task_fields(tok)["rng"]
    save_adapter(store, "rng", demo_model, fields, seed=0, dtype="bfloat16")
    settings = Settings(engine="transformers", store=store.root, base_model=str(demo_model), torch_threads=1)
    with Server(create_app(settings)) as server, server.client() as client:
        assert client.get("/ready").json()["dtype"] == "bfloat16"
        assert server.state.engine.model.dtype == torch.bfloat16
        assert client.post("/generate", json={"adapter": "rng", "n": 4}).status_code == 200
        save_adapter(store, "other", demo_model, fields, seed=1)  # trained in float32
        logged = Logged()
        logger = logging.getLogger("gfn.service")  # whether it propagates to the root depends on what ran before
        logger.addHandler(logged)
        try:
            assert client.post("/adapters", json={"name": "other"}).status_code == 201
        finally:
            logger.removeHandler(logged)
    [warned] = [r for r in logged.records if r.getMessage() == "adapter trained in another dtype"]
    assert (warned.adapter, warned.trained, warned.served) == ("other@v1", "float32", "bfloat16")


@pytest.mark.parametrize("engine", ["transformers", "vllm"])
def test_engines_sample_the_bfloat16_policy(engine: str, demo_model: Path, tmp_path: Path):
    """vLLM's CPU attention runs AMX tiles in bfloat16 without asking Linux for them: with LoRA on,
    its first step died of an illegal instruction on AMX machines until the plugin asked."""
    from service.engines.base import GenRequest
    from service.engines.hf import HFEngine
    from service.engines.vllm import VllmEngine

    tok = load_tokenizer(demo_model)
    store = AdapterStore(tmp_path / "adapters")
    manifest = save_adapter(store, "rng", demo_model, task_fields(tok)["rng"], seed=0, scale=1.0, dtype="bfloat16")
    loaded = store.load(manifest.name, manifest.version)
    prompt = tok("The little dog ran", add_special_tokens=False)["input_ids"]
    requests = [GenRequest(prompt, manifest.ref if k else None, tok.eos_token_id, max_tokens=12, n=4, seed=k)
                for k in range(2)]

    async def serve():
        served = (HFEngine(demo_model, tok.pad_token_id, threads=1, dtype="bfloat16") if engine == "transformers" else
                  VllmEngine(demo_model, tok.pad_token_id, tok.eos_token_id, [manifest.lora], kv_cache_gib=0.25,
                             dtype="bfloat16"))
        await served.start()
        try:
            await served.add_adapter(loaded)
            return [(k > 0, s) for k, r in enumerate(await served.generate(requests)) for s in r.samples]
        finally:
            await served.stop()

    drawn = asyncio.run(serve())
    model = peft.PeftModel.from_pretrained(load_causal_lm(demo_model, "bfloat16"), loaded.path).eval()
    for adapted, sample in drawn:
        expected = policy_log_q(model, prompt, sample.token_ids, sample.stopped, tok.eos_token_id)
        with model.disable_adapter():
            other = policy_log_q(model, prompt, sample.token_ids, sample.stopped, tok.eos_token_id)
        if not adapted:
            expected, other = other, expected
        assert sample.log_q == pytest.approx(expected, rel=2e-2)  # bfloat16 rounds at the third digit
        assert abs(sample.log_q - other) > 4 * abs(sample.log_q - expected)  # and the adapter is its own
