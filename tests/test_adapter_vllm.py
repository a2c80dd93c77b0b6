"""A trained adapter loads in vLLM (a LoRARequest, through the service's engine) and in
transformers+peft, and both give the same log-probabilities (float32)."""

from __future__ import annotations

import asyncio

import peft
import pytest
import torch

from adapters.models import load_causal_lm, load_tokenizer


def peft_logprobs(model, sequences) -> list[list[float]]:
    result = []
    with torch.no_grad():
        for s in sequences:
            ids = torch.tensor([s])
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            result.append(logp.gather(-1, ids[0, 1:, None])[:, 0].tolist())
    return result


@pytest.fixture(scope="module")
def trained(train_adapter):
    """The bundled rng config, whose LoRA adapts lm_head too."""
    store, manifest = train_adapter("rng", steps=20)
    return store.load(manifest.name, manifest.version)


def test_an_lm_head_lora_is_saved_as_factors_only(trained, demo_model):
    """The adapter holds lm_head's LoRA factors, not a copy of the base's output matrix (which
    peft adds by default), and training moved them off their zero start."""
    from safetensors import safe_open

    assert "lm_head" in trained.manifest.lora.target_modules
    with safe_open(trained.path / "adapter_model.safetensors", "pt") as weights:
        names = {n for n in weights.keys() if "lm_head" in n}
    assert names == {"base_model.model.lm_head.lora_A.weight", "base_model.model.lm_head.lora_B.weight"}
    model = peft.PeftModel.from_pretrained(load_causal_lm(demo_model), trained.path).eval()
    assert model.base_model.model.lm_head.lora_B["default"].weight.abs().max() > 0


def test_adapter_gives_the_same_log_probs_in_vllm_and_peft(trained, demo_model):
    """Through the service's vLLM engine: each sample's log q is what peft computes for its tokens
    (and it is not the base model's), and base-model scores are peft's with the adapter off. With
    lm_head adapted, vLLM's prompt log-probs are broken (vllm#51594), so the engine scores on its
    transformers copy of the base model."""
    from service.engines.base import GenRequest
    from service.engines.vllm import VllmEngine

    tok = load_tokenizer(demo_model)
    manifest = trained.manifest
    prompt = tok(manifest.prompt_template, add_special_tokens=False)["input_ids"]
    contexts = [prompt, tok("Tom went to the market.", add_special_tokens=False)["input_ids"]]
    continuations = [tok("42", add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
                     tok(" He ate it.", add_special_tokens=False)["input_ids"]]

    async def serve():
        engine = VllmEngine(demo_model, tok.pad_token_id, tok.eos_token_id, [manifest.lora], kv_cache_gib=0.25)
        assert engine.scorer is not None
        await engine.start()
        try:
            await engine.add_adapter(trained)
            drawn = await engine.generate([GenRequest(prompt, manifest.ref, tok.eos_token_id, 4, n=16, seed=3)])
            return drawn[0].samples, await engine.score(contexts, continuations)
        finally:
            await engine.stop()

    samples, scores = asyncio.run(serve())
    sequences = [prompt + s.token_ids + ([tok.eos_token_id] if s.stopped else []) for s in samples]
    model = peft.PeftModel.from_pretrained(load_causal_lm(demo_model), trained.path).eval()
    adapted = [sum(lp[len(prompt) - 1:]) for lp in peft_logprobs(model, sequences)]
    with model.disable_adapter():
        base = [sum(lp[len(prompt) - 1:]) for lp in peft_logprobs(model, sequences)]
        expected_scores = [sum(peft_logprobs(model, [c + x])[0][len(c) - 1:]) for c, x in zip(contexts, continuations)]
    assert [s.log_q for s in samples] == pytest.approx(adapted, rel=1e-3)
    assert max(abs(a - b) for a, b in zip(adapted, base)) > 1e-2  # the adapter really is applied
    assert scores == pytest.approx(expected_scores, rel=1e-4)


def test_the_vllm_engine_keeps_no_second_copy_without_lm_head(demo_model):
    """The transformers scorer costs the base weights' memory once more: only when lm_head is adapted."""
    from adapters.manifest import LoraSpec
    from service.engines.vllm import VllmEngine

    assert VllmEngine(demo_model, 0, 1, [LoraSpec(target_modules=["q_proj", "v_proj"])]).scorer is None
    assert VllmEngine(demo_model, 0, 1, [LoraSpec(target_modules=["q_proj", "lm_head"])]).scorer is not None
