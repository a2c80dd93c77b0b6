"""The vLLM plugin's LoRA ops for the CPU backend (service/engines/vllm_cpu_lora.py): the same
products as vLLM's per-token ops, by adapter groups, and no delta on rows without an adapter."""

from __future__ import annotations

import asyncio

import peft
import pytest
import torch

from adapters.models import load_causal_lm, load_tokenizer
from adapters.store import AdapterStore
from service.engines.vllm_cpu_lora import add_lora, bgmv_expand, bgmv_expand_slice, bgmv_shrink
from tests.service_world import policy_log_q, save_adapter, task_fields


def per_row(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The reference: each row times its own adapter's matrix; index -1 adds nothing."""
    return torch.stack([scale * weights[i, 0] @ x if i >= 0 else weights.new_zeros(weights.shape[2])
                        for x, i in zip(inputs, indices.tolist())])


@pytest.mark.parametrize("indices", [[1, 1, 1, 1, 1, 1], [0, 2, -1, 0, 2, 2], [-1, -1, 1, -1, -1, -1]],
                         ids=["one adapter", "mixed with base rows", "mostly base rows"])
def test_products_match_per_row_products(indices):
    generator = torch.Generator().manual_seed(0)
    slots, rank, width = 3, 4, 10
    x = torch.randn(6, width, generator=generator)
    a = torch.randn(slots, 1, rank, width, generator=generator)
    b = torch.randn(slots, 1, 2 * width, rank, generator=generator)
    index = torch.tensor(indices)

    shrunk = torch.full((6, rank), float("nan"))  # overwritten, NaN and all
    bgmv_shrink(x, a, shrunk, index, 0.5)
    torch.testing.assert_close(shrunk, per_row(x, a, index, 0.5))

    out = torch.ones(6, 3 * width)
    bgmv_expand_slice(shrunk, b, out, index, width, 2 * width, add_inputs=True)
    expected = torch.ones(6, 3 * width)
    expected[:, width:] += per_row(shrunk, b, index)
    torch.testing.assert_close(out, expected)


def test_expand_cuts_padded_adapters_and_broadcasts_one_row():
    """As vLLM's op: an adapter padded wider than the output is cut to it, and a single input row
    is added to every output row."""
    b = torch.arange(2 * 7 * 2, dtype=torch.float32).reshape(2, 1, 7, 2)  # 7 outputs; the model has 5
    out = torch.zeros(3, 5)
    bgmv_expand(torch.tensor([[1.0, 1.0]]), b, out, torch.tensor([1]), add_inputs=True)
    torch.testing.assert_close(out, (b[1, 0, :5] @ torch.ones(2)).expand(3, 5))


def test_without_add_the_target_is_replaced():
    weights = torch.ones(1, 2, 3)
    target = torch.full((2, 2), 9.0)
    add_lora(target, torch.ones(2, 3), weights, torch.tensor([0, -1]), add=False)
    torch.testing.assert_close(target, torch.tensor([[3.0, 3.0], [0.0, 0.0]]))


def test_base_requests_beside_a_full_set_of_adapters_are_served_by_the_base_model(demo_model, tmp_path):
    """vLLM's own CPU ops index the adapter slots with -1 for base-model rows, which is the last
    slot: with every slot holding an adapter, base requests batched beside adapter requests got that
    adapter's delta. With the plugin each sample's log q is its own model's."""
    from service.engines.base import GenRequest
    from service.engines.vllm import VllmEngine

    tok = load_tokenizer(demo_model)
    store = AdapterStore(tmp_path / "adapters")
    manifest = save_adapter(store, "rng", demo_model, task_fields(tok)["rng"], seed=0, scale=1.0)
    loaded = store.load(manifest.name, manifest.version)
    prompt = tok("The little dog ran", add_special_tokens=False)["input_ids"]

    def request(adapter: str | None, seed: int) -> GenRequest:
        return GenRequest(prompt, adapter, tok.eos_token_id, max_tokens=6, n=4, seed=seed)

    async def serve():
        engine = VllmEngine(demo_model, tok.pad_token_id, tok.eos_token_id, [manifest.lora], max_loras=1,
                            kv_cache_gib=0.25)
        await engine.start()
        try:
            await engine.add_adapter(loaded)  # the one slot is full
            results = await engine.generate([request(None if k % 2 else manifest.ref, k) for k in range(8)])
            return [(k % 2 == 0, s) for k, r in enumerate(results) for s in r.samples]
        finally:
            await engine.stop()

    drawn = asyncio.run(serve())
    model = peft.PeftModel.from_pretrained(load_causal_lm(demo_model), loaded.path).eval()

    def log_prob(sample) -> float:
        return policy_log_q(model, prompt, sample.token_ids, sample.stopped, tok.eos_token_id)

    adapted = [log_prob(s) for uses, s in drawn if uses]
    with model.disable_adapter():
        base = [log_prob(s) for uses, s in drawn if not uses]
        base_of_adapted = [log_prob(s) for uses, s in drawn if uses]
    assert [s.log_q for uses, s in drawn if not uses] == pytest.approx(base, rel=1e-3)
    assert [s.log_q for uses, s in drawn if uses] == pytest.approx(adapted, rel=1e-3)
    assert max(abs(a - b) for a, b in zip(adapted, base_of_adapted)) > 0.1  # the adapter moves log q
