"""The transformers engine's continuous batch: requests that join a running batch (other prompt
lengths, other adapters), rows that finish and leave it, and caches that outgrow their slab all
sample exactly the policy: each sample's log q is the teacher-forced log-probability of its tokens."""

from __future__ import annotations

import asyncio
import threading

import peft
import pytest

from adapters.models import load_causal_lm, load_tokenizer
from adapters.store import AdapterStore
from tests.service_world import policy_log_q, save_adapter, task_fields


def test_joined_and_trimmed_batches_sample_the_policy(demo_model, tmp_path):
    from service.engines.base import GenRequest
    from service.engines.hf import HFEngine

    tok = load_tokenizer(demo_model)
    store = AdapterStore(tmp_path / "adapters")
    manifest = save_adapter(store, "rng", demo_model, task_fields(tok)["rng"], seed=0, scale=1.0)
    loaded = store.load(manifest.name, manifest.version)
    short = tok("The dog", add_special_tokens=False)["input_ids"]
    long = tok("Anna lived in a big city. Every morning she walked to the market.", add_special_tokens=False)["input_ids"]

    def request(prompt: list[int], adapter: str | None, seed: int, min_tokens: int) -> GenRequest:
        return GenRequest(prompt, adapter, tok.eos_token_id, max_tokens=48, min_tokens=min_tokens, n=3, seed=seed)

    sizes: list[int] = []

    async def serve():
        loop, stepping, later_queued = asyncio.get_running_loop(), asyncio.Event(), threading.Event()

        def on_batch(live: int) -> None:  # called by the engine's thread after each step
            sizes.append(live)
            loop.call_soon_threadsafe(stepping.set)
            later_queued.wait(60)  # the first step ends once the later requests wait: a loaded machine alike

        engine = HFEngine(demo_model, tok.pad_token_id, batch_max_size=24, batch_wait_ms=0, on_batch=on_batch)
        await engine.start()
        try:
            await engine.add_adapter(loaded)
            first = [request(short, manifest.ref, 1, 40), request(short, None, 2, 40)]  # 40+ steps: outgrows a slab
            running = asyncio.gather(*(engine.generate([r]) for r in first))
            await stepping.wait()  # the first 6 rows are stepping, 40 tokens to go
            later = [request(long, None, 3, 0), request(long, manifest.ref, 4, 0), request(short, manifest.ref, 5, 0)]
            joining = asyncio.gather(*(engine.generate([r]) for r in later))
            while engine.waiting < len(later):
                await asyncio.sleep(0.01)
            later_queued.set()
            joined = await joining
            return list(zip(first + later, [r for out in (await running) + joined for r in out]))
        finally:
            later_queued.set()
            await engine.stop()

    results = asyncio.run(serve())
    assert max(sizes) > 9  # the later 9 rows joined the first 6: no batch of either alone is larger
    model = peft.PeftModel.from_pretrained(load_causal_lm(demo_model), loaded.path).eval()

    def log_q(req: GenRequest, sample) -> float:
        return policy_log_q(model, req.prompt_ids, sample.token_ids, sample.stopped, tok.eos_token_id,
                            req.min_tokens, req.mask.penalty)

    for req, result in results:
        for sample in result.samples:
            assert len(sample.token_ids) >= req.min_tokens
            if req.adapter is None:
                with model.disable_adapter():
                    expected = log_q(req, sample)
            else:
                expected = log_q(req, sample)
            assert sample.log_q == pytest.approx(expected, rel=1e-3)


def test_an_engine_whose_thread_fails_fails_its_callers_instead_of_hanging(demo_model):
    """A thread count torch refuses killed the worker thread, and start() (so `gfn serve`) waited forever."""
    from service.engines.base import EngineStopped
    from service.engines.hf import HFEngine

    async def start() -> None:
        engine = HFEngine(demo_model, 0, threads=10**11)
        with pytest.raises(EngineStopped, match="the transformers engine stopped"):
            await asyncio.wait_for(engine.start(), 60)
        errors = []
        for _ in range(2):  # and so does every later call, each with an error of its own
            with pytest.raises(EngineStopped, match="the transformers engine stopped") as error:
                await asyncio.wait_for(engine.score([[1, 2]], [[3]]), 10)
            errors.append(error.value)
        assert errors[0] is not errors[1] and not engine.alive  # one shared error gathered every caller's frames

    asyncio.run(start())


def test_an_adapter_peft_refuses_leaves_no_layers_behind(demo_model, tmp_path):
    """A refused load stayed in peft: its layers held memory, it became the active adapter once the
    others left, and the base model was never given back."""
    from service.engines.hf import HFEngine
    from service.errors import AdapterRefused

    store = AdapterStore(tmp_path / "adapters")
    fields = task_fields(load_tokenizer(demo_model))["rng"]
    bad = store.load("bad", save_adapter(store, "bad", demo_model, fields, 0, peft_config={"r": 4}).version)
    good = store.load("good", save_adapter(store, "good", demo_model, fields, 1).version)
    engine = HFEngine(demo_model, 0, threads=1)

    def lora_layers() -> int:
        return sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in engine.model.modules())

    async def serve() -> None:
        await engine.start()
        with pytest.raises(AdapterRefused, match="bad@v1"):  # the first adapter: no peft model yet
            await engine.add_adapter(bad)
        assert engine.peft is None and lora_layers() == 0
        await engine.add_adapter(good)
        with pytest.raises(AdapterRefused, match="bad@v1"):  # beside another
            await engine.add_adapter(bad)
        assert list(engine.peft.peft_config) == ["good@v1"]
        await engine.remove_adapter("good@v1")
        assert engine.peft is None and lora_layers() == 0  # the base model given back
        await engine.stop()

    asyncio.run(serve())


def test_batches_of_one_adapter_after_another_each_sample_their_own(demo_model, tmp_path):
    """A batch of one adapter (or of the base model alone) takes peft's single-adapter path, which
    the engine switches only when the batch's adapter changes: each batch must still run its own
    adapter, mixed batches each row's, across loads and unloads."""
    from service.engines.base import GenRequest
    from service.engines.hf import HFEngine

    tok = load_tokenizer(demo_model)
    store = AdapterStore(tmp_path / "adapters")
    fields = task_fields(tok)["rng"]
    loaded = {name: store.load(name, save_adapter(store, name, demo_model, fields, seed, scale=1.0).version)
              for seed, name in enumerate(["a", "b", "c"])}
    prompt = tok("The dog", add_special_tokens=False)["input_ids"]
    # -/+: unload/load; a tuple: one batch mixing those adapters
    order = ["a@v1", "b@v1", "a@v1", None, "a@v1", None, ("b@v1", None), None, "-a@v1", "b@v1", "+c@v1", "c@v1",
             ("c@v1", "b@v1"), "b@v1"]

    async def serve() -> list[tuple[str | None, object]]:
        engine = HFEngine(demo_model, tok.pad_token_id, threads=1)
        await engine.start()
        for name in ("a", "b"):
            await engine.add_adapter(loaded[name])
        results = []
        for seed, step in enumerate(order):
            if isinstance(step, str) and step[0] in "-+":
                await (engine.remove_adapter(step[1:]) if step[0] == "-" else engine.add_adapter(loaded[step[1]]))
                continue
            refs = step if isinstance(step, tuple) else (step,)
            requests = [GenRequest(prompt, ref, tok.eos_token_id, max_tokens=8, n=2, seed=seed) for ref in refs]
            for ref, result in zip(refs, await engine.generate(requests)):
                results += [(ref, sample) for sample in result.samples]
        await engine.stop()
        return results

    models = {f"{name}@v1": peft.PeftModel.from_pretrained(load_causal_lm(demo_model), item.path).eval()
              for name, item in loaded.items()}
    models[None] = load_causal_lm(demo_model).eval()
    for ref, sample in asyncio.run(serve()):
        expected = policy_log_q(models[ref], prompt, sample.token_ids, sample.stopped, tok.eos_token_id)
        assert sample.log_q == pytest.approx(expected, rel=1e-3), ref
