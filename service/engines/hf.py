"""The transformers + peft engine: one base model, many LoRA adapters, batches that mix them.

One worker thread owns the model and batches continuously. When idle it collects requests
for up to ``batch_wait_ms`` or until ``batch_max_size`` samples are queued; while generating, it
lets waiting requests join the running batch between steps (a prompt is read once, its cache
shared by its n samples), drops finished and cancelled samples, and answers each request as
soon as its own samples are done, so no request waits for a slower batch-mate. Scoring and
adapter loads run in the same thread between steps: the event loop never waits on compute and
nothing changes the model during a forward pass.
"""

from __future__ import annotations

import asyncio
import ctypes
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from inspect import signature
from pathlib import Path
from typing import Any

import peft
import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers.cache_utils import Cache, DynamicLayer

from adapters.device import resolve_device
from adapters.manifest import Dtype
from adapters.models import left_pad, load_causal_lm
from adapters.store import LoadedAdapter
from service.engines.base import Engine, EngineStopped, GenRequest, GenResult, Sample
from service.errors import AdapterRefused

BASE_ROW = "__base__"
"""peft's adapter name for a row of a mixed batch that runs on the base model."""
MIXED = ":mixed"
"""The engine's name for peft running each row's adapter (no adapter name holds ":")."""


def _peft_name(ref: str | None) -> str:
    """peft's name for a request's adapter (BASE_ROW: none). peft names cannot hold ".", which
    adapter names may; ":" no adapter name holds, so no two names meet."""
    return BASE_ROW if ref is None else ref.replace(".", ":")


@dataclass(eq=False)
class _Work:
    """A call waiting for the worker: generate (``requests``), score (``pairs``) or ``call``."""

    future: asyncio.Future
    requests: list[GenRequest] | None = None
    pairs: tuple[list[list[int]], list[list[int]]] | None = None
    call: Callable[[], Any] | None = None
    queued: float = field(default_factory=time.perf_counter)
    samples: list[list[Sample | None]] = field(default_factory=list)
    left: int = 0
    started: float = 0.0

    @property
    def rows(self) -> int:
        return sum(r.n for r in self.requests) if self.requests else 0


@dataclass(eq=False)
class _Row:
    """One sample in generation: the latent so far, tool tokens still to write, its log q."""

    work: _Work
    request: int
    index: int
    req: GenRequest
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)
    log_q: float = 0.0
    stopped: bool = False
    done: bool = False

    def advance(self, choice: int, log_prob: float) -> bool:
        """Take this step's sampled token (or the tool's); True once the sample is complete."""
        if len(self.tokens) == self.req.max_tokens:
            return True
        if self.pending:
            self.tokens.append(self.pending.pop(0))
            return False
        self.log_q += log_prob
        if choice == self.req.terminator_id:
            self.stopped = True
            return True
        self.tokens.append(choice)
        tool = self.req.tool
        if tool is not None and choice in tool.triggers:
            self.pending = list(tool(self.tokens) or [])
        return False


class _Slab(DynamicLayer):
    """One layer's keys and values for the rows of a batch, with spare columns.

    A decoding step writes its column in place where a DynamicLayer copies the whole cache
    (torch.cat: half of a step at 256 rows); attention reads the columns written so far (a view).
    Rows are aligned at their last column: a shorter cache joins left-padded (masked out)."""

    GROW = 32

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor):
        super().__init__()
        self.is_initialized = True
        self.used = keys.shape[2]
        self.keys, self.values = (_aligned([(t, rows)], self.used, self.GROW) for t in (keys, values))

    def _width(self, new: int) -> int:
        """The slab's width once ``new`` columns are written: the same while they fit."""
        width = self.keys.shape[2]
        return width if self.used + new <= width else self.used + new + self.GROW

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        new, width = key_states.shape[2], self._width(key_states.shape[2])
        if width != self.keys.shape[2]:
            self.keys, self.values = (_aligned([(t[:, :, :self.used], None)], self.used, width - self.used)
                                      for t in (self.keys, self.values))
        self.keys[:, :, self.used:self.used + new] = key_states
        self.values[:, :, self.used:self.used + new] = value_states
        self.used += new
        return self.keys[:, :, :self.used], self.values[:, :, :self.used]

    def get_seq_length(self) -> int:
        return self.used

    def stack(self, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor) -> None:
        """Add ``rows`` of another cache below these; the narrower side is left-padded."""
        width = max(self.used, keys.shape[2])
        self.keys, self.values = (_aligned([(mine[:, :, :self.used], None), (theirs, rows)], width, self.GROW)
                                  for mine, theirs in ((self.keys, keys), (self.values, values)))
        self.used = width

    def select(self, rows: torch.Tensor, start: int) -> None:
        """Keep these rows, from column ``start`` on."""
        self.keys, self.values = (torch.index_select(t[:, :, start:], 0, rows) for t in (self.keys, self.values))
        self.used -= start


class _Batch:
    """The samples in generation: their rows, the KV cache, and per-row tensors (next-token
    logits, attention mask, positions and the policy's bias, temperature and limits)."""

    def __init__(self) -> None:
        self.rows: list[_Row] = []
        self.cache: Cache | None = None
        self.state: dict[str, torch.Tensor] = {}

    def join(self, rows: list[_Row], cache: Cache, prompts: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        """Add rows reading the prompts' cache (row i: prompt ``prompts[i]``); the shorter side is
        left-padded (masked out)."""
        if not self.rows:
            self.rows, self.state = rows, state
            self.cache = Cache(layers=[_Slab(layer.keys, layer.values, prompts) for layer in cache.layers])
            return
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.stack(theirs.keys, theirs.values, prompts)
        width = max(self.state["attention"].shape[1], state["attention"].shape[1])
        state["attention"] = _left_pad(state["attention"], width)
        self.state["attention"] = _left_pad(self.state["attention"], width)
        self.state = {name: torch.cat([tensor, state[name]]) for name, tensor in self.state.items()}
        self.rows += rows

    def keep(self, index: list[int]) -> None:
        """Keep only these rows (in this order), and trim the padding none of them needs any more."""
        if not index:
            self.rows, self.cache, self.state = [], None, {}
            return
        selected = torch.tensor(index, device=self.state["attention"].device)
        self.state = {name: tensor[selected] for name, tensor in self.state.items()}
        self.rows = [self.rows[i] for i in index]
        padding = int((self.state["attention"].cumsum(1) == 0).sum(1).min())  # columns no row attends to
        self.state["attention"] = self.state["attention"][:, padding:]
        for layer in self.cache.layers:
            layer.select(selected, padding)


class HFEngine(Engine):
    name = "transformers"

    def __init__(self, model_dir: str | Path, pad_id: int, batch_max_size: int = 256, batch_wait_ms: float = 5.0,
                 on_batch: Callable[[int], None] | None = None, threads: int | None = None, device: str = "cpu",
                 dtype: Dtype = "float32"):
        self.model_dir, self.pad_id, self.threads, self.dtype = model_dir, pad_id, threads, dtype
        self.device = resolve_device(device)
        self.batch_max_size, self.batch_wait_s, self.on_batch = batch_max_size, batch_wait_ms / 1000, on_batch
        self.model: Any = None
        self.peft: peft.PeftModel | None = None  # wraps self.model once an adapter is loaded
        self._mode: str | None = None  # what peft runs, as last set by _switch; None: unknown
        self._inbox: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._held: deque[_Work] = deque()  # taken from the inbox, waiting for room in the batch
        self._batch = _Batch()
        self._biases: dict[tuple, torch.Tensor] = {}
        self._seeds = random.Random()
        self._stopping = False
        self._dead: str | None = None  # why the worker thread stopped: each caller gets its own error

    # ------------------------------------------------------------------ the event loop's side
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._serve, name="hf-engine", daemon=True)
        self._thread.start()
        await self._submit(_Work(self._loop.create_future(), call=self._load_model))

    async def stop(self) -> None:
        self._inbox.put(None)
        await asyncio.to_thread(self._thread.join)
        self._dead = self._dead or "the transformers engine was stopped"
        while not self._inbox.empty():
            self._hold(self._inbox.get())
        for work in [*self._held, *(row.work for row in self._batch.rows)]:  # queued or mid-generation
            work.future.cancel()

    async def add_adapter(self, adapter: LoadedAdapter) -> None:
        await self._submit(_Work(self._loop.create_future(), call=lambda: self._load(adapter)))

    async def remove_adapter(self, ref: str) -> None:
        await self._submit(_Work(self._loop.create_future(), call=lambda: self._unload(ref)))

    async def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        return await self._submit(_Work(self._loop.create_future(), requests=requests)) if requests else []

    async def score(self, contexts: list[list[int]], continuations: list[list[int]]) -> list[float]:
        return await self._submit(_Work(self._loop.create_future(), pairs=(contexts, continuations))) if contexts else []

    async def _submit(self, work: _Work) -> Any:
        """Hand the work to the worker and wait; cancelling the caller cancels the future, and the
        worker then drops the work (its samples leave the batch at the next step)."""
        self._inbox.put(work)
        if self._dead is not None:  # set before the dying worker fails what waits: checked after the put
            raise EngineStopped(self._dead)
        return await work.future

    @property
    def alive(self) -> bool:
        """False as soon as the worker has failed, not only once its thread has ended."""
        return self._dead is None and self._thread.is_alive()

    @property
    def running(self) -> int:
        return len({id(row.work) for row in self._batch.rows if not row.done})

    @property
    def waiting(self) -> int:
        return self._inbox.qsize() + len(self._held)

    # ------------------------------------------------------------------ the worker thread
    def _serve(self) -> None:
        """The worker thread. If it fails, every waiting and later caller gets the error: none waits
        forever on a thread that is gone (`gfn serve` hung at start on one)."""
        try:
            self._serve_batches()
        except Exception as error:  # noqa: BLE001 - delivered to every caller
            self._dead = f"the transformers engine stopped: {type(error).__name__}: {error}"
            while not self._inbox.empty():
                self._hold(self._inbox.get())
            for work in [*self._held, *(row.work for row in self._batch.rows)]:
                self._settle(work, EngineStopped(self._dead))

    def _serve_batches(self) -> None:
        _keep_freed_memory()
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        while not self._stopping:
            works = [w for w in self._collect(len(self._batch.rows)) if not w.future.done()]  # not cancelled
            for work in works:
                if work.requests is None:
                    self._run(work)
            generate = [w for w in works if w.requests is not None]
            if generate:
                self._or_fail(generate, lambda: self._admit(generate))
            if self._batch.rows:
                self._or_fail([row.work for row in self._batch.rows], self._step)

    def _collect(self, rows: int) -> list[_Work]:
        """Works to begin now, in order. Idle: the first to come and those arriving within
        batch_wait while there is room. Busy: those queued; requests join the batch once a quarter
        of it is free, so that joins (which copy the KV cache) come in groups."""
        if rows == 0 and not self._held:
            self._hold(self._inbox.get())
            deadline = time.perf_counter() + self.batch_wait_s
            while not self._stopping and sum(w.rows for w in self._held) < self.batch_max_size:
                try:
                    self._hold(self._inbox.get(timeout=max(0.0, deadline - time.perf_counter())))
                except queue.Empty:
                    break
        while not self._inbox.empty():
            self._hold(self._inbox.get())
        room = self.batch_max_size - rows
        joining = rows == 0 or room >= self.batch_max_size // 4
        begin: list[_Work] = []
        while self._held:
            work = self._held[0]
            if work.rows and not (joining and (work.rows <= room or rows + len(begin) == 0)):
                break
            begin.append(self._held.popleft())
            room -= work.rows
        return begin

    def _hold(self, work: _Work | None) -> None:
        if work is None:
            self._stopping = True
        else:
            self._held.append(work)

    def _run(self, work: _Work) -> None:
        """An engine change or a scoring call, between two steps."""
        try:
            self._settle(work, work.call() if work.call is not None else self._score(*work.pairs))  # type: ignore[misc]
        except Exception as error:  # noqa: BLE001 - delivered to the caller
            self._settle(work, error)

    def _or_fail(self, works: list[_Work], operation: Callable[[], None]) -> None:
        """Run a batch operation; if it fails, its works get the error and their rows leave the batch."""
        try:
            operation()
        except Exception as error:  # noqa: BLE001 - delivered to the callers; the engine goes on
            failed = {id(work): work for work in works}
            for work in failed.values():
                self._settle(work, error)
            self._batch.keep([i for i, row in enumerate(self._batch.rows) if id(row.work) not in failed])

    def _settle(self, work: _Work, result: Any) -> None:
        self._loop.call_soon_threadsafe(_resolve, work.future, result)

    # ------------------------------------------------------------------ the model
    def _load_model(self) -> None:
        self.model = load_causal_lm(self.model_dir, self.dtype).to(self.device)
        # One new token against a contiguous cache: two small matmuls beat the CPU SDPA kernel
        # (1.6 against 4.2 ms a layer at 256 rows on the demo model).
        self.model.set_attn_implementation("eager")
        self.vocab_size = self.model.config.vocab_size
        # Admission needs the prompts' last logits only (most causal LMs can skip the others).
        self._last_logits = {"logits_to_keep": 1} if "logits_to_keep" in signature(self.model.forward).parameters else {}
        self.max_model_len = self.model.config.max_position_embeddings

    def _load(self, adapter: LoadedAdapter) -> None:
        ref, self._mode = adapter.manifest.ref, None
        try:
            if self.peft is None:
                self.peft = peft.PeftModel.from_pretrained(self.model, str(adapter.path), adapter_name=_peft_name(ref),
                                                           torch_device=str(self.device))
            else:
                self.peft.load_adapter(str(adapter.path), adapter_name=_peft_name(ref), torch_device=str(self.device))
        except Exception as error:  # peft raises many types; the registry reports which adapter failed
            self._forget(ref)
            raise AdapterRefused(f"adapter {ref} could not be loaded by peft: {error}") from error

    def _forget(self, ref: str) -> None:
        """Undo a load peft failed part-way: its layers may be in the model already (the first
        adapter's with no wrapper yet to unload them), and would take the base model's place."""
        if self.peft is not None:
            if _peft_name(ref) in self.peft.peft_config:
                self._unload(ref)
            return
        for name, module in list(self.model.named_modules()):
            if isinstance(module, BaseTunerLayer):
                parent, _, child = name.rpartition(".")
                setattr(self.model.get_submodule(parent), child, module.get_base_layer())
        vars(self.model).pop("peft_config", None)  # else the next adapter's load reads this one's config too

    def _unload(self, ref: str) -> None:
        assert self.peft is not None
        self._mode = None
        if list(self.peft.peft_config) == [_peft_name(ref)]:  # peft cannot run with no adapter left: take the base back
            self.model, self.peft = self.peft.unload(), None
        else:
            self.peft.delete_adapter(_peft_name(ref))

    def _forward(self, adapters: list[str], **inputs: Any) -> Any:
        """A mixed batch names each row's adapter; a uniform one takes peft's faster path."""
        if self.peft is None:
            return self.model(**inputs)
        uniform = adapters[0] if len(set(adapters)) == 1 else None
        self._switch(uniform)
        return self.peft(**inputs) if uniform is not None else self.peft(**inputs, adapter_names=adapters)

    def _switch(self, adapter: str | None) -> None:
        """Have peft run ``adapter`` alone (BASE_ROW: none), or each row's (None). peft's switches
        walk every module (on the demo model, set_adapter 1.5 ms and a disable_adapter block 4 ms,
        a decoding step's worth), so they are made only when the batch's adapter changes."""
        mode = MIXED if adapter is None else adapter
        if mode == self._mode:
            return
        assert self.peft is not None
        if mode == BASE_ROW:
            self.peft.base_model.disable_adapter_layers()
        else:
            self.peft.base_model.enable_adapter_layers()  # a disabled layer ignores adapter_names too
            if adapter is not None:
                self.peft.set_adapter(adapter)
        self._mode = mode

    def _bias(self, req: GenRequest) -> torch.Tensor:
        """The request's logit bias: its mask's (cached), plus its word bias."""
        mask = req.mask
        key = mask.key(req.terminator_id)
        if key not in self._biases:
            self._biases[key] = mask.bias(self.vocab_size, req.terminator_id).to(self.device)
        if not req.bias:
            return self._biases[key]
        bias = self._biases[key].clone()
        bias[list(req.bias)] += torch.tensor(list(req.bias.values()), device=self.device)
        return bias

    @torch.no_grad()
    def _admit(self, works: list[_Work]) -> None:
        """Read the works' prompts in one pass; each sample gets a row sharing its prompt's cache."""
        requests = [r for work in works for r in work.requests or []]
        inputs = self._on_device(left_pad([r.prompt_ids for r in requests], self.pad_id))
        out = self._forward([_peft_name(r.adapter) for r in requests], **inputs, **self._last_logits, use_cache=True)
        expand = self._tensor([k for k, r in enumerate(requests) for _ in range(r.n)])
        rows = [_Row(work, k, i, r, torch.Generator(self.device).manual_seed(
                    r.seed + i if r.seed is not None else self._seeds.getrandbits(63)))
                for work in works for k, r in enumerate(work.requests or []) for i in range(r.n)]
        for work in works:
            work.samples = [[None] * r.n for r in work.requests or []]
            work.left, work.started = work.rows, time.perf_counter()
        reqs = [row.req for row in rows]
        self._batch.join(rows, out.past_key_values, expand, {
            "logits": out.logits[expand, -1].float(),
            "attention": inputs["attention_mask"][expand],
            "position": inputs["position_ids"][expand, -1:],
            "bias": torch.stack([self._bias(r) for r in reqs]),
            "temperature": self._tensor([[r.temperature or 1.0] for r in reqs]),
            "greedy": self._tensor([r.temperature == 0 for r in reqs]),
            "terminator": self._tensor([r.terminator_id for r in reqs]),
            "early_stop_penalty": self._tensor([r.mask.penalty for r in reqs]),
        })

    @torch.no_grad()
    def _step(self) -> None:
        """One token for every row: the masked, tempered policy sampled with each row's own
        generator (Gumbel-max). Finished and cancelled rows idle on padding until a quarter of
        the batch has finished; then they leave it (which copies the cache)."""
        batch, state = self._batch, self._batch.state
        rows = batch.rows
        barred = self._tensor([not row.req.may_stop(row.tokens) for row in rows])
        logits = state["logits"] + state["bias"]
        stop_penalty = torch.where(barred, state["early_stop_penalty"], 0.0)
        logits[torch.arange(len(rows), device=self.device), state["terminator"]] += stop_penalty
        log_probs = torch.log_softmax(logits / state["temperature"], dim=-1)
        uniform = torch.stack([torch.rand(self.vocab_size, generator=row.generator, device=self.device)
                               for row in rows])
        picked = torch.where(state["greedy"], logits.argmax(-1), (log_probs - torch.log(-torch.log(uniform))).argmax(-1))
        choices, picked_lp = picked.tolist(), log_probs.gather(1, picked.unsqueeze(1)).squeeze(1).tolist()
        for i, row in enumerate(rows):
            if row.done:
                continue
            if row.work.future.done():  # cancelled
                row.done = True
            elif row.advance(choices[i], picked_lp[i]):
                row.done = True
                self._finish(row)
        live = [i for i, row in enumerate(rows) if not row.done]
        if len(live) <= 0.75 * len(rows):
            batch.keep(live)
        if not batch.rows:
            return
        state = batch.state
        state["attention"] = torch.cat([state["attention"], torch.ones_like(state["attention"][:, :1])], dim=1)
        state["position"] = state["position"] + 1
        # Finished rows idle on a running row's adapter: their own may have left the engine already,
        # and a batch of one adapter keeps peft's fast path (a mixed batch is split per adapter).
        adapters = [_peft_name(row.req.adapter) for row in batch.rows]
        running = next(adapter for row, adapter in zip(batch.rows, adapters) if not row.done)
        out = self._forward([running if row.done else adapter for row, adapter in zip(batch.rows, adapters)],
                            input_ids=self._tensor([[self.pad_id if row.done else row.tokens[-1]] for row in batch.rows]),
                            attention_mask=state["attention"], position_ids=state["position"],
                            past_key_values=batch.cache, use_cache=True)
        state["logits"] = out.logits[:, -1].float()
        if self.on_batch is not None:
            self.on_batch(len(live))

    def _tensor(self, data: list) -> torch.Tensor:
        return torch.tensor(data, device=self.device)

    def _on_device(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: tensor.to(self.device) for name, tensor in inputs.items()}

    def _finish(self, row: _Row) -> None:
        work = row.work
        work.samples[row.request][row.index] = Sample(row.tokens, row.log_q, row.stopped)
        work.left -= 1
        if work.left == 0:
            queue_s = work.started - work.queued
            self._settle(work, [GenResult(samples, queue_s) for samples in work.samples])  # type: ignore[arg-type]

    @torch.no_grad()
    def _score(self, contexts: list[list[int]], continuations: list[list[int]]) -> list[float]:
        inputs = self._on_device(left_pad([c + x for c, x in zip(contexts, continuations)], self.pad_id))
        logits = self._forward([BASE_ROW] * len(contexts), **inputs, use_cache=False).logits[:, :-1].float()
        targets = inputs["input_ids"][:, 1:]
        token_lp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        width = token_lp.shape[1]
        return [float(token_lp[b, width - len(x):].sum()) for b, x in enumerate(continuations)]


def _resolve(future: asyncio.Future, result: Any) -> None:
    """On the event loop: deliver a worker's result, unless the caller has gone."""
    if future.done():
        return
    if isinstance(result, Exception):
        future.set_exception(result)
    else:
        future.set_result(result)


def _left_pad(mask: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros before the positions of a mask [rows, L], up to ``width`` (caches: _aligned)."""
    return F.pad(mask, (width - mask.shape[1], 0))


def _keep_freed_memory() -> None:
    """Have glibc keep freed memory for reuse instead of returning it to the system: the batch's
    caches are reallocated at every join and trim, and fresh pages fault in one by one (the
    copies cost several times more). Without glibc (musl, macOS) nothing changes."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)  # the most glibc takes: blocks up to 32 MiB come from the heap
    libc.mallopt(m_trim_threshold, 1 << 30)


def _aligned(parts: list[tuple[torch.Tensor, torch.Tensor | None]], width: int, room: int) -> torch.Tensor:
    """Caches [rows, heads, length, dim] (each part: those ``rows`` of it, or all) stacked into one
    new tensor of ``width + room`` columns, each right-aligned at column ``width``. Zeros before
    (masked out, but read: they must be finite); the ``room`` after is left unset, as nothing reads
    a column before it is written. index_select writes in place (t[rows] would copy twice, slower)."""
    first = parts[0][0]
    heights = [len(rows) if rows is not None else part.shape[0] for part, rows in parts]
    out = first.new_empty(sum(heights), first.shape[1], width + room, first.shape[3])
    row = 0
    for (part, rows), height in zip(parts, heights):
        block, pad = out[row:row + height], width - part.shape[2]
        block[:, :, :pad] = 0
        if rows is None:
            block[:, :, pad:width] = part
        else:
            torch.index_select(part, 0, rows, out=block[:, :, pad:width])
        row += height
    return out
