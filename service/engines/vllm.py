"""The vLLM engine: one AsyncLLM, every adapter version its own LoRARequest (``name@vN``, own id).

The engine is configured from the adapters present at start: ``max_lora_rank`` (rounded up
to a rank vLLM supports), ``lora_target_modules`` (with any the settings add, for adapters to
come) and ``max_loras``. Naming the target modules
matters (measured on vLLM 0.32's CPU backend): without them the CPU engine crashes on batched prompt log-probs, and
vLLM silently ignores modules not listed, so an adapter loaded later that needs more rank or
other modules is refused with a message saying how to restart.

vLLM 0.32's prompt log-probs break once the engine enables a LoRA on ``lm_head``, base-model
requests included (the CPU engine dies on a batch of them; on GPU an adapter's delta is
dropped: vllm#51594); sampling and its log-probs stay right. With ``lm_head`` among the
targets, ``score`` (which reads the base model only) therefore runs on a transformers copy of
the base model: the base weights' memory once more, so the engine keeps it only when it must.

Sampled log-probs are vLLM's "processed" ones (after the mask, the min-length ban and the
temperature): the distribution actually sampled from, as the transformers engine reports.

vLLM's ``min_tokens`` bans every stop token (eos and stop ids alike), which is the training
policy only when the terminator is eos and nothing else stops a request. Otherwise (a tool
whose trigger tokens must stop generation, another terminator, or a policy that may stop only
after certain tokens) a sample is drawn in rounds, each continuing from prompt + latent: while
the policy may not stop, the terminator is penalised through ``logit_bias`` and a round runs
to ``min_tokens`` or to a ``stop_after`` token; where it may stop only now, a round is one
token; a trigger ends a round and the tool's tokens are appended.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import uuid
from pathlib import Path

from transformers import AutoConfig
from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.inputs import TokensPrompt
from vllm.lora.request import LoRARequest
from vllm.model_executor.models import ModelRegistry
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.platforms import current_platform
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError
from vllm.v1.metrics.loggers import StatLoggerBase

from adapters.manifest import Dtype, LoraSpec, VocabMask
from adapters.store import LoadedAdapter
from service.engines.base import Engine, EngineStopped, GenRequest, GenResult, Sample
from service.engines.hf import HFEngine
from service.errors import AdapterBusy, AdapterRefused
from service.settings import CPU_BLOCK_SIZE

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
SCORED_ELSEWHERE = frozenset({"lm_head"})
"""LoRA targets that break vLLM's prompt log-probs once enabled: with one, scoring runs on transformers."""
HARD_BAN = -50.0
"""A mask penalty at or below this (the default is -99) leaves a token a probability under
1e-21: such an allow-list is served as ``allowed_token_ids``; softer ones as ``logit_bias``."""


class VllmEngine(Engine):
    name = "vllm"

    def __init__(self, model_dir: str | Path, pad_id: int, eos_id: int, loras: list[LoraSpec], max_loras: int = 4,
                 max_lora_rank: int | None = None, kv_cache_gib: float = 1.0, block_size: int | None = None,
                 torch_threads: int | None = None, target_modules: list[str] | None = None, dtype: Dtype = "float32"):
        specs = loras or [LoraSpec()]
        self.model_dir, self.eos_id, self.kv_cache_gib, self.dtype = model_dir, eos_id, kv_cache_gib, dtype
        self.block_size = block_size or (CPU_BLOCK_SIZE if current_platform.is_cpu() else None)
        self.max_lora_rank = _vllm_rank(max([max_lora_rank or 0] + [s.r for s in specs]))
        self.target_modules = sorted({m for s in specs for m in s.target_modules} | set(target_modules or ()))
        scored_elsewhere = SCORED_ELSEWHERE & set(self.target_modules)
        self.scorer = HFEngine(model_dir, pad_id, threads=torch_threads, dtype=dtype) if scored_elsewhere else None
        self.max_loras = max(max_loras, len(loras))
        self._loras: dict[str, LoRARequest] = {}
        self._ids = itertools.count(1)
        self._load = _SchedulerLoad()
        self._open = 0  # vLLM requests begun and not yet ended (finished, failed or aborted)

    async def start(self) -> None:
        _check_lora_modules(self.model_dir, self.target_modules)
        args = AsyncEngineArgs(
            model=str(self.model_dir), dtype=self.dtype, seed=0, enable_lora=True,
            max_loras=self.max_loras, max_cpu_loras=2 * self.max_loras, max_lora_rank=self.max_lora_rank,
            lora_target_modules=self.target_modules, logprobs_mode="processed_logprobs",
            kv_cache_memory_bytes=int(self.kv_cache_gib * 2**30), block_size=self.block_size,
            # vLLM 0.32 on CPU: a seeded request whose prompt is split across steps kills the
            # engine ("CPU Generator does not use offset"); whole prompts avoid the split.
            enable_chunked_prefill=not current_platform.is_cpu(),
            # not the model's generation_config.json: its extra eos ids (Llama 3, Qwen 2) would end
            # samples the policy (and the transformers engine) lets go on
            generation_config="vllm",
        )
        self.llm = AsyncLLM.from_engine_args(args, stat_loggers=[self._load.logger])
        self.vocab_size = self.llm.model_config.get_vocab_size()
        self.max_model_len = self.llm.model_config.max_model_len
        self._masks: dict[tuple, tuple[list[int] | None, dict[int, float]]] = {}
        if self.scorer is not None:
            await self.scorer.start()
        # a model vLLM loads but cannot run (an attention this CPU lacks) fails here, not at a first request
        await self.generate([GenRequest(prompt_ids=[self.eos_id], adapter=None, terminator_id=self.eos_id, max_tokens=1)])

    async def stop(self) -> None:
        if self.scorer is not None:
            await self.scorer.stop()
        self.llm.shutdown()
        del self.llm  # AsyncLLM.__del__ shuts down again: now, not while the interpreter exits

    async def add_adapter(self, adapter: LoadedAdapter) -> None:
        manifest = adapter.manifest
        ref, lora = manifest.ref, manifest.lora
        if lora.r > self.max_lora_rank:
            raise AdapterRefused(
                f"adapter {ref} has LoRA rank {lora.r}, above the engine's max_lora_rank {self.max_lora_rank} "
                f"(set at start from the adapters present); restart with GFN_MAX_LORA_RANK={lora.r}")
        if len(self._loras) >= 2 * self.max_loras:
            raise AdapterBusy(
                f"cannot load {ref}: {len(self._loras)} adapters are loaded, the most this engine keeps resident "
                f"(2 x max_loras); unload one (DELETE /adapters/...) or restart with a larger GFN_MAX_LORAS")
        missing = sorted(set(lora.target_modules) - set(self.target_modules))
        if missing:
            raise AdapterRefused(
                f"adapter {ref} adapts modules {missing} the engine was not started with ({self.target_modules}); "
                "vLLM would silently skip them: restart the service with this adapter in the store, or with "
                f"GFN_LORA_TARGET_MODULES='{json.dumps(sorted(set(self.target_modules) | set(missing)))}'")
        request = LoRARequest(ref, next(self._ids), str(adapter.path))
        try:
            added = await self.llm.add_lora(request)
        except Exception as error:  # vLLM raises many types; the registry reports which adapter failed
            raise AdapterRefused(f"vLLM could not load adapter {ref}: {error}") from error
        if not added:
            raise AdapterRefused(f"vLLM refused adapter {ref}")
        self._loras[ref] = request

    async def remove_adapter(self, ref: str) -> None:
        await self.llm.remove_lora(self._loras.pop(ref).lora_int_id)

    @property
    def alive(self) -> bool:
        return not self.llm.errored and (self.scorer is None or self.scorer.alive)

    @property
    def running(self) -> int:
        """The scheduler's count. vLLM reports it with a step's outputs, so an abort that empties the
        scheduler is never reported: with no request open, none runs."""
        return self._load.running if self._open else 0

    @property
    def waiting(self) -> int:
        return self._load.waiting if self._open else 0

    # ------------------------------------------------------------------ sampling
    async def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        return list(await asyncio.gather(*(self._generate(r) for r in requests)))

    async def _generate(self, req: GenRequest) -> GenResult:
        """The n samples share the prompt (one vLLM request); tool rounds continue each on its own."""
        out = await self._round(req, [], req.n, req.seed)
        stats = out.metrics
        queue_s = max(0.0, stats.scheduled_ts - stats.queued_ts) if stats is not None else 0.0
        firsts = sorted(out.outputs, key=lambda c: c.index)
        samples = await asyncio.gather(*(self._finish(req, c, i) for i, c in enumerate(firsts)))
        return GenResult(list(samples), queue_s)

    async def _finish(self, req: GenRequest, out: CompletionOutput, index: int) -> Sample:
        tokens: list[int] = []
        log_q, round_ = 0.0, 0
        while True:
            ids = list(out.token_ids)
            log_q += out.cumulative_logprob or 0.0
            if out.finish_reason == "stop" and ids and ids[-1] == req.terminator_id:
                return Sample(tokens + ids[:-1], log_q, True)
            tokens += ids
            triggered = out.finish_reason == "stop" and req.tool is not None and bool(ids) and ids[-1] in req.tool.triggers
            if triggered:
                tokens += (req.tool(tokens) or [])[: req.max_tokens - len(tokens)]
            # a round cut short by a rule (length limit, stop_after token) goes on in the next
            ruled = self._in_rounds(req) and (out.finish_reason == "length"
                                              or out.finish_reason == "stop" and bool(ids) and ids[-1] in req.stop_after)
            if len(tokens) >= req.max_tokens or not (triggered or ruled):
                return Sample(tokens, log_q, False)
            round_ += 1
            seed = None if req.seed is None else round_seed(req.seed + index, round_)
            out = (await self._round(req, tokens, 1, seed)).outputs[0]

    def _in_rounds(self, req: GenRequest) -> bool:
        return (req.tool is not None or bool(req.stop_after)
                or (req.min_tokens > 0 and req.terminator_id != self.eos_id))

    async def _round(self, req: GenRequest, tokens: list[int], n: int, seed: int | None) -> RequestOutput:
        """Continue ``prompt + tokens`` (module docstring): in rounds, with the terminator barred
        to min_tokens or the next stop_after token, or one token where it may stop only now;
        otherwise to max_tokens."""
        rounds = self._in_rounds(req)
        early = rounds and len(tokens) < req.min_tokens
        barred = rounds and not req.may_stop(tokens)
        allowed, bias = self._mask(req.mask, req.terminator_id)
        if req.bias:
            bias = {t: bias.get(t, 0.0) + req.bias.get(t, 0.0) for t in bias.keys() | req.bias.keys()}
        if barred:
            bias = {**bias, req.terminator_id: req.mask.penalty}
        stops = sorted(req.tool.triggers) if req.tool is not None else []
        if barred:
            stops += sorted(req.stop_after)
        if req.terminator_id != self.eos_id:
            stops.append(req.terminator_id)
        if early:
            limit = req.min_tokens
        elif req.stop_after and not barred:  # it may stop only now: one token, then the rules again
            limit = len(tokens) + 1
        else:
            limit = req.max_tokens
        params = SamplingParams(
            n=n, seed=seed, temperature=req.temperature,
            max_tokens=min(limit, req.max_tokens) - len(tokens),
            min_tokens=0 if rounds else req.min_tokens,
            stop_token_ids=stops, ignore_eos=req.terminator_id != self.eos_id,
            allowed_token_ids=allowed, logit_bias=bias or None,
            logprobs=0, detokenize=False, output_kind=RequestOutputKind.FINAL_ONLY,
        )
        return await self._final(req.prompt_ids + tokens, params, req.adapter)

    def _mask(self, mask: VocabMask, terminator_id: int) -> tuple[list[int] | None, dict[int, float]]:
        """The mask as vLLM parameters: (allowed_token_ids, logit_bias); the terminator is never masked."""
        key = mask.key(terminator_id)
        if key not in self._masks:
            listed = set(mask.token_ids)
            if mask.mode == "none":
                self._masks[key] = (None, {})
            elif mask.mode == "allow" and mask.penalty <= HARD_BAN:
                self._masks[key] = (sorted(listed | {terminator_id}), {})
            else:
                masked = listed if mask.mode == "deny" else set(range(self.vocab_size)) - listed
                self._masks[key] = (None, {t: mask.penalty for t in sorted(masked - {terminator_id})})
        return self._masks[key]

    async def _final(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None) -> RequestOutput:
        """Run one vLLM request to its end; cancelling this aborts it in the engine."""
        lora = self._loras[adapter] if adapter is not None else None
        out = None
        self._open += 1
        try:
            async for out in self.llm.generate(TokensPrompt(prompt_token_ids=prompt_ids), params, uuid.uuid4().hex,
                                               lora_request=lora):
                pass
        except EngineDeadError as error:
            raise EngineStopped(f"the vLLM engine stopped: {error}") from None
        finally:
            self._open -= 1
        assert out is not None
        return out

    async def score(self, contexts: list[list[int]], continuations: list[list[int]]) -> list[float]:
        if self.scorer is not None:
            return await self.scorer.score(contexts, continuations)
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        outs = await asyncio.gather(*(self._final(c + x, params, None) for c, x in zip(contexts, continuations)))
        return [sum(position[token].logprob for position, token in zip(out.prompt_logprobs[len(c):], x))
                for out, c, x in zip(outs, contexts, continuations)]


def _check_lora_modules(model_dir: str | Path, modules: list[str]) -> None:
    """vLLM 0.32 serves a LoRA on lm_head only for the model classes that list it among their
    embedding modules (Llama's; not Mistral's, Qwen2's or Gemma2's): refused at start, naming the
    engine that serves it, rather than every such adapter refused at its load."""
    if "lm_head" not in modules:
        return
    architecture = (AutoConfig.from_pretrained(model_dir).architectures or ["?"])[0]
    model_class = ModelRegistry._try_load_model_cls(architecture)
    if "lm_head" not in (getattr(model_class, "embedding_modules", None) or {}):
        raise ValueError(f"vLLM serves no LoRA on lm_head for {architecture}, which adapters (or "
                         "GFN_LORA_TARGET_MODULES) ask for: serve them with GFN_ENGINE=transformers")


def _vllm_rank(rank: int) -> int:
    fits = [r for r in VLLM_RANKS if r >= rank]
    if not fits:
        raise ValueError(f"LoRA rank {rank} is above the largest rank vLLM serves ({VLLM_RANKS[-1]})")
    return fits[0]


def round_seed(sample_seed: int, round_: int) -> int:
    """The seed of a sample's later round (vLLM seeds sample i of the first round with seed + i).
    A function of the sample's own seed and the round alone, so that a pool topped up from
    seed + cached draws what one drawn at once would; hashed into 63 bits, so that it meets
    no request's small consecutive sample seeds (two requests' samples must not share noise)."""
    digest = hashlib.blake2b(f"{sample_seed}:{round_}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


class _SchedulerLoad:
    """Running and waiting requests as vLLM's scheduler last reported them."""

    def __init__(self) -> None:
        self.running = self.waiting = 0

    def logger(self, vllm_config: object, engine_index: int = 0) -> StatLoggerBase:
        load = self

        class Logger(StatLoggerBase):
            def __init__(self) -> None:
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
                if scheduler_stats is not None:
                    load.running, load.waiting = scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs

            def log_engine_initialized(self) -> None:
                pass

        return Logger()
