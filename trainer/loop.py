"""The training loop: behaviour batch -> rewards -> SubTB -> LoRA update, with
checkpoints that make a killed run resume and end as if it had never stopped."""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import random
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import peft
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from adapters._fs import is_partial, write_atomic
from adapters.device import resolve_device
from adapters.fingerprint import fingerprint
from adapters.manifest import BaseModelRef, Manifest
from adapters.models import attach_lora, load_causal_lm, load_tokenizer, pad_id, save_lora
from adapters.store import AdapterStore
from trainer import plots
from trainer.config import TrainConfig, as_today
from trainer.jsonl import data_digest
from trainer.objective import subtb_loss
from trainer.policy import policy_log_probs
from trainer.publish import publish
from trainer.replay import ReplayBuffer
from trainer.rollout import Rollout, sample, sampler
from trainer.scoring import Scorer
from trainer.setup import check_prompts, resolve_base_model
from trainer.tasks import Prompt, make_task

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"  # the one before, kept until the next is durable: a fallback if the newest is damaged
METRICS = "metrics.jsonl"  # one line a step
ADAPTER = "adapter"  # the adapter as the run saved it, before the store took it
PLAIN_EVERY_S = 30.0  # off a terminal (a log file, `docker logs`) the bar is drawn once, at the end: a line this often

log = logging.getLogger("gfn.trainer")


class RunInUse(RuntimeError):
    """Another process is training in this run directory."""


class CheckpointUnreadable(ValueError):
    """No checkpoint of the run directory can be read (a disk fault, or files edited by hand)."""


class Trainer:
    method = "subtb"  # recorded in the manifest; subclasses train the same LoRA another way

    def __init__(
        self,
        config: TrainConfig,
        run_dir: Path,
        store: AdapterStore,
        job_id: str | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        quiet: bool = False,
        fresh: bool = False,
    ):
        self.config, self.run_dir, self.store, self.fresh = config, Path(run_dir), store, fresh
        self.run_id = job_id or uuid.uuid4().hex  # what the store knows this run's save by; kept on resume
        self.on_progress, self.should_stop, self.quiet = on_progress, should_stop, quiet
        self.history: list[dict[str, Any]] = []
        self.step = 0
        self._setup()

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        _check_run_dir(self.run_dir)  # before anything loads: a refusal costs nothing
        self.store.check_writable()  # these two not after training, at the save
        self.store.check_task(self.config.name, self.config.task.name)
        new = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._claim = _claim(self.run_dir)  # before the model loads: a second attempt steps aside at no cost
        for partial in [p for p in self.run_dir.iterdir() if is_partial(p.name)]:  # a killed writer's, under the lock
            partial.unlink()
        try:
            self._build()
            if self.fresh:  # only under the lock: a run training here keeps its checkpoints
                _clear(self.run_dir)
            elif (self.run_dir / CHECKPOINT).exists() or (self.run_dir / PREVIOUS).exists():
                self._restore()
        except BaseException:
            if new:  # a run refused at setup leaves no directory behind
                shutil.rmtree(self.run_dir, ignore_errors=True)
            self._claim.close()
            raise

    def _build(self) -> None:
        """The model with its LoRA, the task and the optimiser, as the config says."""
        config = self.config
        torch.manual_seed(config.seed)
        self.model_dir = resolve_base_model(config.base_model)
        self.base_fingerprint = fingerprint(self.model_dir)
        self.data_digest = data_digest(config.task)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.pad_id = pad_id(self.tokenizer)
        base = load_causal_lm(self.model_dir, config.dtype)
        self.model = attach_lora(base, config.lora).to(resolve_device(config.device))
        # Eval mode throughout (gradients flow all the same): rewards and the loss's log-probs
        # must be those of the network that samples and serves; under dropout, log R would be
        # noise kept in the replay buffer and E[r²] would fit a noisy residual's mean.
        self.model.eval()
        self.task = make_task(config.task, self.tokenizer)
        self.spec, self.tool = self.task.spec(), self.task.tool()
        self.scorer = Scorer(self.model, self.pad_id)
        self.prompts = self.task.train_prompts()
        check_prompts(self.task, self.prompts, self.model.config)
        self.lora_params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.lora_params, lr=config.optim.lr, weight_decay=config.optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: config.optim.factor(s, config.steps))
        self.replay = ReplayBuffer(config.replay.capacity, config.replay.dedup_distance)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.rng = random.Random(config.seed)

    # ------------------------------------------------------------------ the loop
    def run(self) -> Manifest | None:
        """Train to `steps` and store the adapter; None when stopped early (after saving
        a checkpoint), so the same run can resume later. Releases the run directory."""
        try:
            return self._run()
        finally:
            self._claim.close()

    def _run(self) -> Manifest | None:
        start = time.time() - sum(h["seconds"] for h in self.history)
        total = self.config.steps
        columns = [TextColumn(f"{self.config.name}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("loss {task.fields[loss]:.3g} logR {task.fields[log_reward]:.2f} T {task.fields[temperature]:.2f}"),
                   TimeRemainingColumn()]
        with Progress(*columns, disable=self.quiet) as bar:
            task = bar.add_task("train", total=total, completed=self.step, loss=float("nan"),
                                log_reward=float("nan"), temperature=self.config.reward_temperature.at(self.step))
            plain, said = not self.quiet and not bar.console.is_terminal, time.time()  # off a terminal: lines
            while self.step < total:
                if self.should_stop is not None and self.should_stop():
                    self.checkpoint()
                    return None
                tick = time.time()
                metrics = self.train_step()
                metrics.update(step=self.step + 1, seconds=time.time() - tick)
                self.history.append(metrics)
                self._log(metrics)
                self.step += 1
                bar.update(task, completed=self.step, **{k: metrics[k] for k in ("loss", "log_reward", "temperature")})
                if plain and (time.time() - said >= PLAIN_EVERY_S or self.step == total):
                    said = time.time()
                    bar.console.print(f"{self.config.name} step {self.step}/{total} loss {metrics['loss']:.3g} "
                                      f"logR {metrics['log_reward']:.2f} T {metrics['temperature']:.2f} "
                                      f"({said - start:.0f} s)")
                if self.on_progress is not None:
                    elapsed = time.time() - start
                    self.on_progress({**metrics, "total": total, "elapsed": elapsed,
                                      "eta": elapsed / self.step * (total - self.step)})
                if self.step % self.config.checkpoint_every == 0 or self.step == total:
                    self.checkpoint()
        return self.finish(time.time() - start)

    def train_step(self) -> dict[str, Any]:
        config = self.config
        temperature = config.reward_temperature.at(self.step)
        parts = []
        for _ in range(config.optim.accumulate):
            prompts = [self.rng.choice(self.prompts) for _ in range(config.prompts_per_step)]
            loss, metrics = self.batch_loss(prompts, temperature)
            if not torch.isfinite(loss):  # one such step turns every LoRA weight into NaN
                raise FloatingPointError(f"step {self.step + 1}: the loss is {loss.item()}; the run stops, its last "
                                         "checkpoint intact (a setting too extreme, e.g. a log-reward of -inf?)")
            (loss / config.optim.accumulate).backward()
            parts.append({"loss": loss.item(), **metrics})
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.optim.grad_clip)
        self.optimizer.step()
        if not torch.stack([torch.isfinite(p).all() for p in self.lora_params]).all():  # one host sync; never stored
            raise FloatingPointError(f"step {self.step + 1}: the adapter's weights are no longer finite; the run "
                                     "stops, its last checkpoint intact (a setting too extreme, e.g. optim.lr?)")
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        mean = {key: sum(part[key] for part in parts) / len(parts) for key in parts[0]}
        return {**mean, "temperature": temperature, "lr": self.scheduler.get_last_lr()[0], "replay": len(self.replay)}

    def batch_loss(self, prompts: list[Prompt], temperature: float) -> tuple[torch.Tensor, dict[str, float]]:
        """SubTB on a behaviour batch for these prompts, and the mean log-reward and length
        of its on-policy samples."""
        batch, log_r, fresh = self.behaviour_batch(prompts)
        log_pf, log_pterm = policy_log_probs(self.model, self.spec, batch.prompts, batch.tokens, self.pad_id,
                                             batch.bias)
        loss = subtb_loss(self.tempered(log_r, batch.tokens, temperature), log_pf, log_pterm, batch.lengths,
                          self.config.subtb_lambda, batch.forced)
        return loss, {"log_reward": log_r[fresh, batch.lengths[fresh]].mean().item(),
                      "length": batch.lengths[fresh].float().mean().item()}

    def floor_barred(self, log_r: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Stopping where the policy may not (before min_len, away from stop_after) gets the
        log-reward floor (docs/DESIGN.md, Conventions): the policy's stop penalty there, so that the two
        cancel in every residual and those states' flows are the policy's own to learn, plus
        barred_flow_offset, so that they start near the rewards."""
        barred = self.spec.barred(tokens)[:, : log_r.shape[1]]
        barred[:, : self.spec.min_len] = True
        return log_r.masked_fill_(barred, self.spec.mask.penalty + self.config.barred_flow_offset)

    def tempered(self, log_r: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
        """log R / T, with the floor left untempered: the policy's stop penalty it mirrors is
        not tempered either, so dividing it would leave a residual of penalty * (1/T - 1) on
        every sub-trajectory that starts at a barred state."""
        return self.floor_barred(log_r / temperature, tokens)

    def behaviour_batch(self, prompts: list[Prompt]) -> tuple[Rollout, torch.Tensor, torch.Tensor]:
        """New samples (on-policy at T=1 and tempered with T ~ U[low, high]) plus replayed
        ones; returns the batch, its untempered log-rewards and which rows are on-policy."""
        n, mix = self.config.samples_per_prompt, self.config.behaviour
        n_tempered, n_replay = mix.counts(n)
        new_prompts, temperatures, on_policy, replayed = [], [], [], []
        for prompt in prompts:
            entries = self.replay.sample(prompt.key, n_replay, self.generator)
            n_on = n - len(entries) - n_tempered
            low, high = mix.temperature_low, mix.temperature_high
            temps = low + (high - low) * torch.rand(n_tempered, generator=self.generator)
            new_prompts += [prompt] * (n_on + n_tempered)
            temperatures += [1.0] * n_on + temps.tolist()
            on_policy += [True] * n_on + [False] * n_tempered
            replayed += [(prompt, e) for e in entries]
        rollout = sample(self.model, self.spec, [p.ids for p in new_prompts], self.pad_id,
                         torch.tensor(temperatures), self.generator, self.tool, [p.bias for p in new_prompts])
        log_r = self.task.log_rewards(self.scorer, new_prompts, rollout)
        self.floor_barred(log_r, rollout.tokens)
        for prompt, tokens, n_b, forced, row in zip(new_prompts, rollout.tokens, rollout.lengths, rollout.forced, log_r):
            self.replay.add(prompt.key, tokens[:n_b].tolist(), row[: n_b + 1], forced[:n_b].tolist())
        batch, log_r = _append_replayed(rollout, log_r, replayed, self.pad_id)
        fresh = torch.tensor(on_policy + [False] * len(replayed))
        return batch, log_r, fresh

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self) -> None:
        """Everything the next steps depend on, written atomically and durably."""
        state = {
            "step": self.step,
            "config": self.config.model_dump(),
            "base_fingerprint": self.base_fingerprint,
            "data_digest": self.data_digest,
            "run_id": self.run_id,
            "adapter": peft.get_peft_model_state_dict(self.model, save_embedding_layers=False),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "replay": self.replay.state_dict(),
            "generator": self.generator.get_state(),
            "python_rng": self.rng.getstate(),
            "torch_rng": torch.get_rng_state(),
            "history": self.history,
        }
        state["digest"] = _digest(state)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        write_atomic(self.run_dir / CHECKPOINT, buffer.getvalue(), previous=self.run_dir / PREVIOUS)

    def _read_checkpoint(self) -> dict[str, Any]:
        """The newest checkpoint that reads; a damaged one falls back to the one before it."""
        failures = []
        for name in (CHECKPOINT, PREVIOUS):
            path = self.run_dir / name
            if not path.exists():
                continue
            try:
                state = torch.load(path, map_location="cpu", weights_only=False)  # loading puts each part on its device
                if "digest" in state and state.pop("digest") != _digest(state):  # torch.load checks no checksum
                    raise ValueError("its contents do not match the digest written with them")
                if failures:
                    log.warning("resuming from the previous checkpoint: %s", "; ".join(failures))
                return state
            except Exception as error:  # torch and pickle raise many types for a damaged file
                failures.append(f"{path} is unreadable ({type(error).__name__}: {error})")
        raise CheckpointUnreadable(f"{'; '.join(failures)}; start the run over with --fresh or another run directory")

    def _restore(self) -> None:
        state = self._read_checkpoint()
        stored = as_today(type(self.config), state["config"])  # from before a field was added: at its default
        if changed := _changed(_identity(stored.model_dump() if stored else state["config"]),
                               _identity(self.config.model_dump())):
            raise ValueError(f"{self.run_dir} holds a run with another config ({', '.join(changed[:5])} differ); "
                             "use another run directory or --fresh")
        # .get: checkpoints written before these were recorded still resume
        if state.get("base_fingerprint", self.base_fingerprint) != self.base_fingerprint:
            raise ValueError(f"{self.run_dir} holds a run on another base model ({state['base_fingerprint']}, "
                             f"now {self.base_fingerprint}); use another run directory or --fresh")
        if state.get("data_digest", self.data_digest) != self.data_digest:
            raise ValueError(f"{self.run_dir} holds a run on other data: the task's data files changed since; "
                             "use another run directory or --fresh")
        self.run_id = state.get("run_id", self.run_id)
        peft.set_peft_model_state_dict(self.model, state["adapter"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.replay.load_state_dict(state["replay"])
        self.generator.set_state(state["generator"])
        self.rng.setstate(state["python_rng"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.history = state["step"], state["history"]
        with open(self.run_dir / METRICS, "w") as log:  # drop steps after the checkpoint
            log.writelines(json.dumps(h) + "\n" for h in self.history)

    def _log(self, metrics: dict[str, Any]) -> None:
        with open(self.run_dir / METRICS, "a") as log:
            log.write(json.dumps(metrics) + "\n")

    # ------------------------------------------------------------------ the result
    def finish(self, train_seconds: float) -> Manifest:
        """Evaluate and store the adapter; a run whose adapter is stored already (run again after it
        finished) gets that version back at once, not after another evaluation."""
        if (saved := self.store.saved_by(self.config.name, self.run_id)) is not None:
            return saved
        out = self.run_dir / ADAPTER
        shutil.rmtree(out, ignore_errors=True)
        save_lora(self.model, out)
        shutil.copy(self.run_dir / METRICS, out / "training_log.jsonl")
        plots.loss_curve(out / "loss.png", [h["step"] for h in self.history],
                         [h["loss"] for h in self.history], [h["log_reward"] for h in self.history])
        base = BaseModelRef(path=self.model_dir, fingerprint=self.base_fingerprint, dtype=self.config.dtype)
        return publish(self.store, self.config.name, out, self.task, base=base, lora=self.config.lora,
                       training={"method": self.method, "config": self.config.model_dump(), "steps": self.step,
                                 "data_digest": self.data_digest},
                       metrics={"train_seconds": round(train_seconds, 1), "final_loss": self.history[-1]["loss"]},
                       evaluation=(sampler(self.model, self.spec, self.pad_id, self.generator, self.tool), self.scorer) if self.config.evaluate else None, job_id=self.run_id)


def _identity(config: dict[str, Any]) -> dict[str, Any]:
    """What makes a run the same run: its config but the device (a run may resume on another)."""
    return {key: value for key, value in config.items() if key != "device"}


def _changed(old: Any, new: Any, at: str = "") -> list[str]:
    """The dotted keys whose values differ between two configs."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [key for k in sorted(old.keys() | new.keys(), key=str)
                for key in _changed(old.get(k), new.get(k), f"{at}{k}.")]
    return [] if old == new else [at.rstrip(".") or "config"]


def _digest(state: Any) -> str:
    """sha256 of a checkpoint's contents (every tensor's bytes, every other value's repr): a bit
    flipped on disk inside a tensor would otherwise load as a silently different run."""
    digest = hashlib.sha256()

    def add(node: Any) -> None:
        if isinstance(node, torch.Tensor):
            digest.update(node.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(node, dict):
            for key in node:
                digest.update(repr(key).encode())
                add(node[key])
        elif isinstance(node, (list, tuple)):
            for item in node:
                add(item)
        else:
            digest.update(repr(node).encode())

    add(state)
    return digest.hexdigest()


def _claim(run_dir: Path) -> IO[str]:
    """An exclusive lock on the run directory, held until the run ends (or its process dies).
    RQ re-queues a job whose heartbeats stopped while Redis was away; the first attempt may
    still be training, and two in one directory would tear its checkpoint and adapter."""
    handle = open(run_dir / ".lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RunInUse(f"{run_dir} is being trained by another process; wait for it, or use another run directory") from None
    return handle


def _check_run_dir(run_dir: Path) -> None:
    """A run directory holds one run's files and nothing else: --fresh empties it and a run's end
    rewrites its adapter/, so a directory that holds other files (a mistyped --run-dir) is refused,
    never cleared."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise NotADirectoryError(f"run directory {run_dir} is a file")
    ours = {".lock", CHECKPOINT, PREVIOUS, METRICS, ADAPTER}
    other = sorted(p.name for p in run_dir.iterdir() if p.name not in ours and not is_partial(p.name))
    if other:
        raise ValueError(f"{run_dir} holds files that are not a training run's ({', '.join(other[:5])}"
                         f"{', ...' if len(other) > 5 else ''}): pass a new or empty run directory")


def _clear(run_dir: Path) -> None:
    """Empty a run directory for a fresh start, all but its lock (held by this process)."""
    for path in run_dir.iterdir():
        if path.name != ".lock":
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def _append_replayed(rollout: Rollout, log_r: torch.Tensor, replayed: list, pad_id: int) -> tuple[Rollout, torch.Tensor]:
    """The new rollout followed by replayed entries, padded to the same width."""
    if not replayed:
        return rollout, log_r
    width = rollout.tokens.shape[1]
    tokens = torch.full((len(replayed), width), pad_id, dtype=torch.long)
    forced = torch.zeros((len(replayed), width), dtype=torch.bool)
    rewards = torch.zeros((len(replayed), width + 1))
    for row, (_, entry) in enumerate(replayed):
        n = len(entry.tokens)
        tokens[row, :n] = torch.tensor(entry.tokens, dtype=torch.long)
        if entry.forced is not None:
            forced[row, :n] = torch.tensor(entry.forced)
        rewards[row, : n + 1] = entry.log_r
    batch = Rollout(
        prompts=rollout.prompts + [p.ids for p, _ in replayed],
        tokens=torch.cat([rollout.tokens, tokens]),
        lengths=torch.cat([rollout.lengths, torch.tensor([len(e.tokens) for _, e in replayed])]),
        forced=torch.cat([rollout.forced, forced]),
        bias=(rollout.bias or [{}] * len(rollout.prompts)) + [p.bias for p, _ in replayed],
    )
    return batch, torch.cat([log_r, rewards])
