"""The transformers + peft engine: one base model, many LoRA adapters, batches that mix them.

A dynamic batcher collects requests until ``batch_max_size`` samples are queued or
``batch_wait_ms`` has passed, then runs the whole batch in one worker thread. That thread
is the only one touching the model (adapter loads run there too), so the event loop never
waits on compute and a load never races a forward pass.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peft
import torch

from adapters.manifest import VocabMask
from adapters.models import load_causal_lm
from adapters.store import LoadedAdapter
from service.engines.base import Engine, GenRequest, GenResult, Sample
from service.errors import AdapterRefused

BASE_ROW = "__base__"
"""peft's adapter name for a row of a mixed batch that runs on the base model."""


@dataclass
class _Work:
    """One call to generate (``requests``) or score (``pairs``), waiting for a batch."""

    future: asyncio.Future
    rows: int
    requests: list[GenRequest] | None = None
    pairs: tuple[list[list[int]], list[list[int]]] | None = None
    queued: float = field(default_factory=time.perf_counter)


class HFEngine(Engine):
    name = "transformers"

    def __init__(self, model_dir: str | Path, pad_id: int, batch_max_size: int = 256, batch_wait_ms: float = 5.0,
                 on_batch: Callable[[int], None] | None = None, threads: int | None = None):
        self.model_dir, self.pad_id, self.threads = model_dir, pad_id, threads
        self.batch_max_size, self.batch_wait_s, self.on_batch = batch_max_size, batch_wait_ms / 1000, on_batch
        self.model: Any = None
        self.peft: peft.PeftModel | None = None  # wraps self.model once an adapter is loaded
        self._queue: deque[_Work] = deque()
        self._wake = asyncio.Event()
        self._running = 0
        self._biases: dict[tuple, torch.Tensor] = {}
        self._seeds = random.Random()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="hf-engine")
        if self.threads is not None:
            await self._in_worker(torch.set_num_threads, self.threads)  # in the thread that computes
        self.model = await self._in_worker(load_causal_lm, self.model_dir)
        self.vocab_size = self.model.config.vocab_size
        self.max_model_len = self.model.config.max_position_embeddings
        self._batcher = asyncio.create_task(self._batch_loop())

    async def stop(self) -> None:
        self._batcher.cancel()
        for work in self._queue:
            work.future.cancel()
        self._executor.shutdown(wait=True)

    async def add_adapter(self, adapter: LoadedAdapter) -> None:
        await self._in_worker(self._load, adapter)

    async def remove_adapter(self, ref: str) -> None:
        await self._in_worker(self._unload, ref)

    def _load(self, adapter: LoadedAdapter) -> None:
        ref = adapter.manifest.ref
        try:
            if self.peft is None:
                self.peft = peft.PeftModel.from_pretrained(self.model, str(adapter.path), adapter_name=ref)
            else:
                self.peft.load_adapter(str(adapter.path), adapter_name=ref)
        except Exception as error:  # peft raises many types; the registry reports which adapter failed
            raise AdapterRefused(f"adapter {ref} could not be loaded by peft: {error}") from error

    def _unload(self, ref: str) -> None:
        assert self.peft is not None
        if list(self.peft.peft_config) == [ref]:  # peft cannot run with no adapter left: take the base back
            self.model, self.peft = self.peft.unload(), None
        else:
            self.peft.delete_adapter(ref)

    # ------------------------------------------------------------------ requests
    async def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        if not requests:
            return []
        return await self._submit(_Work(asyncio.get_running_loop().create_future(), sum(r.n for r in requests),
                                        requests=requests))

    async def score(self, contexts: list[list[int]], continuations: list[list[int]]) -> list[float]:
        if not contexts:
            return []
        return await self._submit(_Work(asyncio.get_running_loop().create_future(), len(contexts),
                                        pairs=(contexts, continuations)))

    @property
    def alive(self) -> bool:
        return not self._batcher.done()

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return sum(not w.future.done() for w in self._queue)

    async def _submit(self, work: _Work) -> Any:
        """Queue the work and wait; a cancelled caller cancels the future, and the batcher skips it."""
        self._queue.append(work)
        self._wake.set()
        return await work.future

    async def _in_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # ------------------------------------------------------------------ the batcher
    async def _batch_loop(self) -> None:
        while True:
            await self._wake.wait()
            if sum(w.rows for w in self._queue) < self.batch_max_size:
                await asyncio.sleep(self.batch_wait_s)  # let concurrent requests join
            batch = self._take()
            if not self._queue:
                self._wake.clear()
            if batch:
                await self._run(batch)

    def _take(self) -> list[_Work]:
        batch, rows = [], 0
        while self._queue and (not batch or rows + self._queue[0].rows <= self.batch_max_size):
            work = self._queue.popleft()
            if not work.future.done():
                batch.append(work)
                rows += work.rows
        return batch

    async def _run(self, batch: list[_Work]) -> None:
        started = time.perf_counter()
        self._running = len(batch)
        if self.on_batch is not None:
            self.on_batch(sum(w.rows for w in batch))
        try:
            results = await self._in_worker(self._compute, batch)
        except Exception as error:  # noqa: BLE001 - delivered to every caller of the batch
            results = [error] * len(batch)
        finally:
            self._running = 0
        for work, result in zip(batch, results):
            if work.future.done():
                continue
            if isinstance(result, Exception):
                work.future.set_exception(result)
            elif work.requests is not None:
                work.future.set_result([GenResult(samples, started - work.queued) for samples in result])
            else:
                work.future.set_result(result)

    def _compute(self, batch: list[_Work]) -> list[Any]:
        """Every generate call of the batch in one sampling pass; score calls one pass each."""
        requests = [r for w in batch if w.requests is not None for r in w.requests]
        samples = iter(self._sample(requests) if requests else [])
        return [[next(samples) for _ in w.requests] if w.requests is not None else self._score(*w.pairs)
                for w in batch]

    # ------------------------------------------------------------------ the model
    def _forward(self, adapters: list[str], **inputs: Any) -> Any:
        if self.peft is None:
            return self.model(**inputs)
        return self.peft(**inputs, adapter_names=adapters)

    def _bias(self, mask: VocabMask, terminator_id: int) -> torch.Tensor:
        key = (mask.mode, tuple(mask.token_ids), mask.penalty, terminator_id)
        if key not in self._biases:
            self._biases[key] = mask.bias(self.vocab_size, terminator_id)
        return self._biases[key]

    @torch.no_grad()
    def _sample(self, requests: list[GenRequest]) -> list[list[Sample]]:
        """All samples of all requests as rows of one KV-cached batch, each row with its own
        adapter, policy, temperature and random stream (Gumbel-max with a per-row generator)."""
        rows = [(r, r.seed + i if r.seed is not None else self._seeds.getrandbits(63))
                for r in requests for i in range(r.n)]
        reqs = [r for r, _ in rows]
        batch = len(rows)
        generators = [torch.Generator().manual_seed(seed) for _, seed in rows]
        adapters = [r.adapter or BASE_ROW for r in reqs]
        bias = torch.stack([self._bias(r.mask, r.terminator_id) for r in reqs])
        temperature = torch.tensor([[r.temperature or 1.0] for r in reqs])
        greedy = torch.tensor([r.temperature == 0 for r in reqs])
        terminators = torch.tensor([r.terminator_id for r in reqs])
        early_stop_penalty = torch.tensor([r.mask.penalty for r in reqs])
        min_tokens = torch.tensor([r.min_tokens for r in reqs])
        tokens: list[list[int]] = [[] for _ in rows]
        pending: list[list[int]] = [[] for _ in rows]
        log_q, stopped, done = [0.0] * batch, [False] * batch, [False] * batch

        inputs = _pack([r.prompt_ids for r in reqs], self.pad_id)
        out = self._forward(adapters, **inputs, use_cache=True)
        attention, position = inputs["attention_mask"], inputs["position_ids"][:, -1:]
        for step in range(max(r.max_tokens for r in reqs) + 1):
            logits = out.logits[:, -1].float() + bias
            logits[torch.arange(batch), terminators] += torch.where(step < min_tokens, early_stop_penalty, 0.0)
            log_probs = torch.log_softmax(logits / temperature, dim=-1)
            gumbel = -torch.log(-torch.log(torch.stack([torch.rand(self.vocab_size, generator=g) for g in generators])))
            picked = torch.where(greedy, logits.argmax(-1), (log_probs + gumbel).argmax(-1))
            choice, picked_lp = picked.tolist(), log_probs.gather(1, picked.unsqueeze(1)).squeeze(1).tolist()
            for b, r in enumerate(reqs):
                if done[b]:
                    continue
                if step == r.max_tokens:
                    done[b] = True
                elif pending[b]:
                    tokens[b].append(pending[b].pop(0))
                elif choice[b] == r.terminator_id:
                    log_q[b] += picked_lp[b]
                    done[b] = stopped[b] = True
                else:
                    log_q[b] += picked_lp[b]
                    tokens[b].append(choice[b])
                    if r.tool is not None and choice[b] in r.tool.triggers:
                        pending[b] = list(r.tool(tokens[b]) or [])
            if all(done):
                break
            last = torch.tensor([[self.pad_id if done[b] else tokens[b][-1]] for b in range(batch)])
            attention = torch.cat([attention, torch.ones((batch, 1), dtype=attention.dtype)], dim=1)
            position = position + 1
            out = self._forward(adapters, input_ids=last, attention_mask=attention, position_ids=position,
                                past_key_values=out.past_key_values, use_cache=True)

        samples = iter(Sample(t, q, s) for t, q, s in zip(tokens, log_q, stopped))
        return [[next(samples) for _ in range(r.n)] for r in requests]

    @torch.no_grad()
    def _score(self, contexts: list[list[int]], continuations: list[list[int]]) -> list[float]:
        inputs = _pack([c + x for c, x in zip(contexts, continuations)], self.pad_id)
        logits = self._forward([BASE_ROW] * len(contexts), **inputs, use_cache=False).logits[:, :-1].float()
        targets = inputs["input_ids"][:, 1:]
        token_lp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        width = token_lp.shape[1]
        return [float(token_lp[b, width - len(x):].sum()) for b, x in enumerate(continuations)]


def _pack(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad rows so that they all end at the last column; position ids skip the padding."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        attention[i, width - len(row):] = 1
    return {"input_ids": ids, "attention_mask": attention, "position_ids": (attention.cumsum(1) - 1).clamp(min=0)}
