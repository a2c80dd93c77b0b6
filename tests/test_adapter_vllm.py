"""A trained adapter loads in vLLM (a LoRARequest) and in transformers+peft, and both give
the same log-probabilities (float32)."""

from __future__ import annotations

import asyncio

import peft
import pytest
import torch

from adapters.models import load_causal_lm, load_tokenizer


def vllm_prompt_logprobs(llm, sequences, lora=None) -> list[list[float]]:
    from vllm import SamplingParams

    outputs = llm.generate([{"prompt_token_ids": s} for s in sequences],
                           SamplingParams(max_tokens=1, prompt_logprobs=0), lora_request=lora, use_tqdm=False)
    return [[entry[token].logprob for token, entry in zip(s[1:], out.prompt_logprobs[1:])]
            for s, out in zip(sequences, outputs)]


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
    store, manifest = train_adapter("rng", steps=20)
    return store.load(manifest.name, manifest.version)


HEAD_TARGETS = "[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head]"


@pytest.fixture(scope="module")
def with_lm_head(train_adapter):
    store, manifest = train_adapter("rng", steps=5, **{"name": "rng-head", "lora.target_modules": HEAD_TARGETS})
    return store.load(manifest.name, manifest.version)


def test_an_lm_head_lora_is_saved_as_factors_only(with_lm_head, demo_model):
    """The adapter holds lm_head's LoRA factors, not a copy of the base's output matrix (which
    peft adds by default), and training moved them off their zero start."""
    from safetensors import safe_open

    with safe_open(with_lm_head.path / "adapter_model.safetensors", "pt") as weights:
        names = {n for n in weights.keys() if "lm_head" in n}
    assert names == {"base_model.model.lm_head.lora_A.weight", "base_model.model.lm_head.lora_B.weight"}
    model = peft.PeftModel.from_pretrained(load_causal_lm(demo_model), with_lm_head.path).eval()
    assert model.base_model.model.lm_head.lora_B["default"].weight.abs().max() > 0


def test_the_vllm_engine_refuses_an_lm_head_lora_naming_why(with_lm_head, demo_model):
    """vLLM 0.32 dies on prompt log-probs once lm_head has a LoRA, so the engine never enables
    it: such an adapter is refused with the reason and the engine that serves it."""
    from service.engines.vllm import VllmEngine
    from service.errors import AdapterRefused

    engine = VllmEngine(demo_model, 0, [with_lm_head.manifest.lora])
    assert "lm_head" not in engine.target_modules and "q_proj" in engine.target_modules
    with pytest.raises(AdapterRefused, match=r"rng-head@v1 adapts \['lm_head'\].*GFN_ENGINE=transformers"):
        asyncio.run(engine.add_adapter(with_lm_head))


def test_adapter_gives_the_same_log_probs_in_vllm_and_peft(trained, demo_model):
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    tok = load_tokenizer(demo_model)
    prompt = trained.manifest.prompt_template
    sequences = [tok(prompt + n)["input_ids"] + [tok.eos_token_id] for n in ("7", "42", "100", "3")]

    llm = LLM(model=str(demo_model), dtype="float32", max_model_len=128, enforce_eager=True, enable_lora=True,
              max_lora_rank=trained.manifest.lora.r, max_loras=1,
              lora_target_modules=trained.manifest.lora.target_modules,
              seed=0)
    lora = LoRARequest(trained.manifest.ref, 1, str(trained.path))
    served = vllm_prompt_logprobs(llm, sequences, lora)
    served_base = vllm_prompt_logprobs(llm, sequences)

    model = peft.PeftModel.from_pretrained(load_causal_lm(demo_model), trained.path).eval()
    reference = peft_logprobs(model, sequences)
    for ours, theirs in zip(served, reference):
        torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=1e-3, atol=1e-4)
    # and the adapter really is applied: it moves the digits' log-probs away from the base
    moved = max(abs(a - b) for s, t in zip(served, served_base) for a, b in zip(s, t))
    assert moved > 1e-2
