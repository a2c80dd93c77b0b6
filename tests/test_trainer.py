"""The training loop: configs, kill-and-resume, and what a run leaves in the store."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from adapters.store import AdapterStore
from trainer.config import OptimConfig, load_config
from trainer.loop import CheckpointUnreadable, RunInUse, Trainer, _digest

REPO = Path(__file__).resolve().parent.parent
# a decaying rate, so that resuming must restore the schedule too
SHORT = ["steps=10", "checkpoint_every=2", "samples_per_prompt=16", "task.eval_samples=200", "optim.final_lr_ratio=0.5"]


def test_unknown_config_key_is_an_error_naming_it():
    with pytest.raises(ValidationError, match="lerning_rate"):
        load_config("rng", ["optim.lerning_rate=0.1"])
    with pytest.raises(ValidationError, match="steps"):
        load_config("rng", ["steps=-3"])
    with pytest.raises(ValueError, match="key.path=value"):
        load_config("rng", ["steps"])
    with pytest.raises(ValidationError, match="min_len 3 is above max_len 2"):
        load_config("rng", ["task.min_len=3"])  # max_len derived from the target: two digits
    with pytest.raises(ValidationError, match="barred_flow_offset"):
        load_config("infill", ["barred_flow_offset=.inf"])


def test_overrides_are_typed_and_nested():
    config = load_config("rng", ["optim.lr=0.01", "task.target={kind: binomial, n: 20, p: 0.3}"])
    assert config.optim.lr == 0.01
    assert config.task.target.kind == "binomial" and config.task.target.n == 20


def test_lr_warms_up_then_decays_to_its_final_ratio():
    optim = OptimConfig(lr=1e-3, warmup_steps=4, final_lr_ratio=0.1)
    factors = [optim.factor(step, 20) for step in range(20)]
    assert factors[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert all(a > b for a, b in zip(factors[4:], factors[5:]))
    assert factors[-1] == pytest.approx(0.1)
    assert {OptimConfig(warmup_steps=0).factor(step, 20) for step in range(20)} == {1.0}


def _cli_train(run_dir: Path, store: Path, demo_model: Path) -> subprocess.Popen:
    sets = [a for s in SHORT + [f"base_model={demo_model}"] for a in ("--set", s)]
    return subprocess.Popen(
        [sys.executable, "-m", "gfn.cli", "train", "rng", *sets, "--run-dir", str(run_dir), "--store", str(store)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))},
    )


def _steps_logged(run_dir: Path) -> int:
    log = run_dir / "metrics.jsonl"
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_a_killed_run_resumes_and_ends_as_if_never_killed(tmp_path, demo_model):
    run_dir, store_root = tmp_path / "run", tmp_path / "store"
    process = _cli_train(run_dir, store_root, demo_model)
    deadline = time.time() + 300
    while _steps_logged(run_dir) < 5 and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = run_dir / "checkpoint.pt"
    if not saved.exists():  # killed between the checkpoint write's two renames: the run resumes from the one before
        saved = run_dir / "checkpoint.prev.pt"
    assert 2 <= torch.load(saved, weights_only=False)["step"] < 10

    resumed = _cli_train(run_dir, store_root, demo_model)
    output = resumed.communicate(timeout=600)[0].decode()
    assert resumed.returncode == 0, output
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))

    store = AdapterStore(store_root)
    assert store.versions("rng") == [1]
    killed = store.load("rng", 1)

    config = load_config("rng", SHORT + [f"base_model={demo_model}"])
    straight = Trainer(config, tmp_path / "straight", AdapterStore(tmp_path / "store2"), quiet=True).run()
    a = load_file(killed.path / "adapter_model.safetensors")
    b = load_file(AdapterStore(tmp_path / "store2").load("rng", straight.version).path / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    assert killed.manifest.metrics["samples"] == 200


def test_resuming_with_another_config_is_refused(tmp_path, demo_model):
    config = load_config("rng", SHORT + [f"base_model={demo_model}", "steps=2", "evaluate=false"])
    Trainer(config, tmp_path / "run", AdapterStore(tmp_path / "store"), quiet=True).run()
    other = load_config("rng", SHORT + [f"base_model={demo_model}", "steps=3", "evaluate=false"])
    with pytest.raises(ValueError, match="another config"):
        Trainer(other, tmp_path / "run", AdapterStore(tmp_path / "store"), quiet=True)


def test_a_run_directory_trains_one_run_at_a_time(tmp_path, demo_model):
    """A job re-queued while its first attempt still trains (Redis was away) must not train beside it."""
    config = load_config("rng", SHORT + [f"base_model={demo_model}", "steps=1", "evaluate=false"])
    first = Trainer(config, tmp_path / "run", AdapterStore(tmp_path / "store"), quiet=True)
    with pytest.raises(RunInUse, match="another process"):
        Trainer(config, tmp_path / "run", AdapterStore(tmp_path / "store"), quiet=True)
    first.run()
    Trainer(config, tmp_path / "run", AdapterStore(tmp_path / "store"), quiet=True)  # released when it ended


def test_a_checkpoint_from_before_the_dtype_setting_resumes_as_float32(tmp_path, demo_model):
    """A run killed before an upgrade resumes after it: its config has no `dtype`, and ran in float32."""
    config = load_config("rng", SHORT + [f"base_model={demo_model}", "steps=2", "evaluate=false"])
    store, run_dir = AdapterStore(tmp_path / "store"), tmp_path / "run"
    assert Trainer(config, run_dir, store, quiet=True, should_stop=lambda: True).run() is None
    state = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    del state["config"]["dtype"], state["digest"]
    state["digest"] = _digest(state)
    torch.save(state, run_dir / "checkpoint.pt")
    resumed = Trainer(config, run_dir, store, quiet=True)
    assert resumed.run().base_model.dtype == "float32" and [h["step"] for h in resumed.history] == [1, 2]
    with pytest.raises(ValueError, match=r"another config \(dtype differ\)"):
        Trainer(load_config("rng", SHORT + [f"base_model={demo_model}", "steps=2", "evaluate=false",
                                            "dtype=bfloat16"]), run_dir, store, quiet=True)


def test_a_fresh_start_is_refused_while_the_run_trains_and_a_failed_resume_lets_the_lock_go(tmp_path, demo_model):
    """--fresh must not wipe the checkpoints of a run training in that directory; a resume that
    fails (another config) must not leave the directory locked for the next attempt."""
    config = load_config("rng", SHORT + [f"base_model={demo_model}", "steps=2", "evaluate=false"])
    store, run_dir = AdapterStore(tmp_path / "store"), tmp_path / "run"
    assert Trainer(config, run_dir, store, quiet=True, should_stop=lambda: True).run() is None
    first = Trainer(config, run_dir, store, quiet=True)
    with pytest.raises(RunInUse):
        Trainer(config, run_dir, store, quiet=True, fresh=True)
    assert (run_dir / "checkpoint.pt").exists()
    assert first.run().version == 1 and [h["step"] for h in first.history] == [1, 2]
    other = load_config("rng", SHORT + [f"base_model={demo_model}", "steps=3", "evaluate=false"])
    with pytest.raises(ValueError, match=r"another config \(steps differ\)"):
        Trainer(other, run_dir, store, quiet=True)
    fresh = Trainer(other, run_dir, store, quiet=True, fresh=True)  # not RunInUse: the failed one let go
    assert fresh.step == 0 and not (run_dir / "checkpoint.pt").exists() and (run_dir / ".lock").exists()
    assert fresh.run().version == 2


def test_a_run_in_use_is_refused_before_the_model_loads_and_a_refused_run_leaves_no_directory(tmp_path, demo_model):
    """A job's second attempt loaded the whole base model before finding its run in use (on a GPU
    beside the first: out of memory, a failure, a retry spent); a run refused at setup left its
    directory behind."""
    config = load_config("rng", SHORT + [f"base_model={demo_model}", "steps=1", "evaluate=false"])
    store, run_dir = AdapterStore(tmp_path / "store"), tmp_path / "run"
    first = Trainer(config, run_dir, store, quiet=True)
    absent = load_config("rng", SHORT + [f"base_model={tmp_path / 'absent'}", "steps=1", "evaluate=false"])
    with pytest.raises(RunInUse):  # not the absent model's FileNotFoundError: nothing was loaded
        Trainer(absent, run_dir, store, quiet=True)
    assert first.run().version == 1
    with pytest.raises(FileNotFoundError):
        Trainer(absent, tmp_path / "runs" / "refused", store, quiet=True)
    assert not (tmp_path / "runs" / "refused").exists()


def test_a_directory_holding_other_files_is_refused_as_a_run_directory_never_cleared(tmp_path, demo_model):
    """`--run-dir ~/project --fresh` emptied the directory; a run's end rewrote any adapter/ in it."""
    config = load_config("rng", SHORT + [f"base_model={demo_model}", "steps=1", "evaluate=false"])
    store, mine = AdapterStore(tmp_path / "store"), tmp_path / "project"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    for fresh in (False, True):
        with pytest.raises(ValueError, match=r"not a training run's \(notes.txt, sub\)"):
            Trainer(config, mine, store, quiet=True, fresh=fresh)
    assert (mine / "notes.txt").read_text() == "mine" and (mine / "sub").is_dir()
    with pytest.raises(NotADirectoryError):
        Trainer(config, mine / "notes.txt", store, quiet=True)
    run = tmp_path / "run"  # a run's own files, a killed write's temporary one among them
    assert Trainer(config, run, store, quiet=True, should_stop=lambda: True).run() is None
    (run / ".checkpoint.pt.0123.tmp").write_bytes(b"")
    assert Trainer(config, run, store, quiet=True).run().version == 1
    assert Trainer(config, run, store, quiet=True, fresh=True).run().version == 2


def test_a_relative_base_model_path_is_stored_absolute(tmp_path, demo_model, monkeypatch):
    """The service and `gfn eval` read the manifest's base model path from other directories."""
    monkeypatch.chdir(demo_model.parent)
    config = load_config("rng", SHORT + [f"base_model=./{demo_model.name}", "steps=1", "evaluate=false"])
    manifest = Trainer(config, tmp_path / "run", AdapterStore(tmp_path / "store"), quiet=True).run()
    assert manifest.base_model.path == str(demo_model.resolve())


def test_a_behaviour_mix_that_leaves_no_on_policy_sample_is_refused():
    with pytest.raises(ValidationError, match="no on-policy sample after 2 tempered and 2 replayed"):
        load_config("rng", ["samples_per_prompt=3", "behaviour.on_policy=0", "behaviour.tempered=0.5",
                            "behaviour.replay=0.5"])
    assert load_config("rng", ["samples_per_prompt=3", "behaviour.on_policy=0.34", "behaviour.tempered=0.33",
                               "behaviour.replay=0.33"]).behaviour.counts(3) == (1, 1)


def test_resuming_on_other_base_weights_is_refused(tmp_path, demo_model):
    base = tmp_path / "base"
    shutil.copytree(demo_model, base)
    config = load_config("rng", SHORT + [f"base_model={base}", "evaluate=false"])
    assert Trainer(config, tmp_path / "run", AdapterStore(tmp_path / "store"), quiet=True, should_stop=lambda: True).run() is None
    settings = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**settings, "rope_theta": 20000.0}))  # same path, another model
    with pytest.raises(ValueError, match="another base model"):
        Trainer(config, tmp_path / "run", AdapterStore(tmp_path / "store"), quiet=True)


def test_resuming_on_changed_data_is_refused(tmp_path, demo_model):
    """The run's config names its data by path: an edited file would otherwise be trained on half-way,
    or a finished run handed back as if trained on it."""
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"The dog ran in the park {k}."}) for k in range(20)) + "\n")
    config = load_config("continuation", [f"task.data={data}", f"base_model={demo_model}", "steps=1", "evaluate=false",
                                          "samples_per_prompt=4", "prompts_per_step=1"])
    store = AdapterStore(tmp_path / "store")
    assert Trainer(config, tmp_path / "run", store, quiet=True).run().version == 1
    data.write_text(data.read_text().replace("dog", "cat"))
    with pytest.raises(ValueError, match="holds a run on other data"):
        Trainer(config, tmp_path / "run", store, quiet=True)


def test_running_a_finished_run_again_stores_no_second_version(tmp_path, demo_model):
    config = load_config("rng", SHORT + [f"base_model={demo_model}", "steps=2"])
    store = AdapterStore(tmp_path / "store")
    first = Trainer(config, tmp_path / "run", store, quiet=True).run()
    evaluated = (tmp_path / "run" / "adapter" / "eval.json").stat().st_mtime_ns
    again = Trainer(config, tmp_path / "run", store, quiet=True).run()  # e.g. the command run twice
    assert again.version == first.version == 1 and store.versions("rng") == [1]
    assert (tmp_path / "run" / "adapter" / "eval.json").stat().st_mtime_ns == evaluated  # not evaluated again
    assert Trainer(config, tmp_path / "other", store, quiet=True).run().version == 2  # a new run is a new version


def test_a_damaged_checkpoint_falls_back_to_the_one_before(tmp_path, demo_model):
    """A checkpoint damaged on disk costs the steps since the previous one, not the run; with
    both damaged, the error says so and how to start over."""
    config = load_config("rng", SHORT + [f"base_model={demo_model}", "steps=4", "evaluate=false"])
    store, run_dir = AdapterStore(tmp_path / "store"), tmp_path / "run"
    first = Trainer(config, run_dir, store, quiet=True).run()  # checkpoints at steps 2 and 4
    newest = run_dir / "checkpoint.pt"
    intact = newest.read_bytes()
    _flip_a_tensor_byte(newest)  # reads as well as ever: only its digest tells
    assert Trainer(config, run_dir, store, quiet=True).step == 2
    newest.write_bytes(intact[: 1000])
    resumed = Trainer(config, run_dir, store, quiet=True)
    assert resumed.step == 2 and [h["step"] for h in resumed.history] == [1, 2]
    assert resumed.run().version == first.version and store.versions("rng") == [1]
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (run_dir / name).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointUnreadable, match="--fresh"):
        Trainer(config, run_dir, store, quiet=True)


def _flip_a_tensor_byte(path: Path) -> None:
    """Flip one byte inside the largest tensor's bytes of a torch.save file (a zip, stored uncompressed)."""
    with zipfile.ZipFile(path) as archive:
        member = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[member.header_offset + 26: member.header_offset + 30])
    at = member.header_offset + 30 + name_len + extra_len + member.file_size // 2
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_every_lora_target_must_name_a_module_of_the_base_model(tmp_path, demo_model):
    """peft refuses only when no target matches; a GPT-2 user keeping the bundled (Llama) names
    with lm_head among them would get an lm_head-only adapter whose manifest lists them all."""
    config = load_config("rng", SHORT + [f"base_model={demo_model}", "lora.target_modules=[lm_head, c_attn, c_proj]"])
    with pytest.raises(ValueError, match=r"lora.target_modules: c_attn, c_proj name no module .* q_proj"):
        Trainer(config, tmp_path / "run", AdapterStore(tmp_path / "store"), quiet=True)
    config = load_config("rng", SHORT + [f"base_model={demo_model}", "lora.target_modules=[lm_head, v_proj]"])
    model = Trainer(config, tmp_path / "run", AdapterStore(tmp_path / "store"), quiet=True).model
    adapted = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert adapted == {"lm_head", "v_proj"}


@pytest.mark.parametrize("task, overrides", [
    ("rng", ["task.prompt=" + "pick one number " * 200]),  # the prompt itself
    ("reasoning", ["task.reward_shots=30"]),  # the reward's few-shot context, not the policy's prompt
])
def test_what_the_model_would_read_beyond_its_positions_is_refused(tmp_path, demo_model, task, overrides):
    config = load_config(task, [f"base_model={demo_model}", "steps=1"] + overrides)
    with pytest.raises(ValueError, match=r"comes to \d+ tokens, beyond the base model's 512 positions"):
        Trainer(config, tmp_path / "run", AdapterStore(tmp_path / "store"), quiet=True)


def test_data_that_is_too_long_or_spells_a_special_token_is_refused_naming_its_record(tmp_path, demo_model):
    """Before the first step: the record is named, as a JSONL line would be."""
    for text, said in (("The dog ran." * 200, r"the prompt 'The dog ran\.The dog ran.* comes to \d+ tokens"),
                       ("The dog ran.<|endoftext|>The cat sat.", "holds '<\\|endoftext\\|>', the tokenizer's special")):
        data = tmp_path / "data.jsonl"
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["The cat sat in the sun."] * 20 + [text]))
        config = load_config("continuation", [f"task.data={data}", f"task.eval_data={data}", f"base_model={demo_model}"])
        with pytest.raises(ValueError, match=said):
            Trainer(config, tmp_path / "run", AdapterStore(tmp_path / "store"), quiet=True)


def test_training_runs_without_dropout(tmp_path, demo_model):
    """Rewards and the loss's log-probs are those of the network that samples (docs/DESIGN.md)."""
    config = load_config("rng", SHORT + [f"base_model={demo_model}", "steps=1", "evaluate=false"])
    trainer = Trainer(config, tmp_path / "run", AdapterStore(tmp_path / "store"), quiet=True)
    trainer.train_step()
    assert not any(module.training for module in trainer.model.modules())
    with pytest.raises(ValidationError, match="dropout"):
        load_config("rng", SHORT + ["lora.dropout=0.1"])


def test_stopping_early_checkpoints_and_stores_nothing(tmp_path, demo_model):
    config = load_config("rng", SHORT + [f"base_model={demo_model}", "evaluate=false"])
    calls = iter(range(100))
    trainer = Trainer(config, tmp_path / "run", AdapterStore(tmp_path / "store"), quiet=True,
                      should_stop=lambda: next(calls) >= 3)
    assert trainer.run() is None
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["step"] == 3
    assert AdapterStore(tmp_path / "store").names() == []


def test_a_run_stores_a_complete_adapter(train_adapter):
    store, manifest = train_adapter("rng", steps=3)
    loaded = store.load(manifest.name, manifest.version)
    files = set(loaded.manifest.files)
    assert {"adapter_config.json", "adapter_model.safetensors", "loss.png", "training_log.jsonl"} <= files
    assert loaded.manifest.task == "rng" and loaded.manifest.mask.mode == "allow"
    assert loaded.manifest.base_model.fingerprint.startswith("sha256:")


def test_states_barred_from_stopping_get_the_floor_and_their_flow_is_the_policys(tmp_path, demo_model):
    """With stop_after, a state that may not stop gets the log-reward floor (the stop penalty plus
    barred_flow_offset), so in log F = log R - log P(⊤) the penalty cancels: the flow is the offset
    minus the policy's unmasked stop logit against the other tokens' (log p / (1 - p), p the
    unmasked stop probability). States after "." keep the task's reward."""
    from trainer.policy import PolicySpec, policy_log_probs

    config = load_config("infill", [f"base_model={demo_model}", "evaluate=false", "task.stop_after=['.']",
                                    "barred_flow_offset=-20", "behaviour.replay=0", "behaviour.on_policy=0.75"])
    trainer = Trainer(config, tmp_path / "run", AdapterStore(tmp_path / "store"), quiet=True)
    batch, log_r, _ = trainer.behaviour_batch(trainer.prompts[:2])
    spec = trainer.spec
    barred = spec.barred(batch.tokens)
    width = batch.tokens.shape[1] + 1
    states = torch.arange(width)[None, :] <= batch.lengths[:, None]
    assert (barred & states).any() and (~barred & states & (torch.arange(width) > 0)).any()
    floor = spec.mask.penalty + config.barred_flow_offset
    assert (log_r[barred & states] == floor).all()
    assert (log_r[~barred & states] > floor + 10).all()
    with torch.no_grad():
        _, log_pterm = policy_log_probs(trainer.model, spec, batch.prompts, batch.tokens, trainer.pad_id)
        unbarred = PolicySpec(spec.terminator_id, spec.min_len, spec.max_len, spec.mask)
        _, raw_pterm = policy_log_probs(trainer.model, unbarred, batch.prompts, batch.tokens, trainer.pad_id)
    flow = (log_r - log_pterm.cpu())[barred & states]  # the model's outputs are on its device
    raw = raw_pterm.cpu()[barred & states].double()
    expected = config.barred_flow_offset - raw + torch.log1p(-raw.exp())
    assert flow.tolist() == pytest.approx(expected.tolist(), abs=1e-3)


def test_a_name_holding_another_tasks_adapters_is_refused_before_training(tmp_path, demo_model):
    """The refusal came at the save, after every step: a queued job trained for nothing, three times."""
    store = AdapterStore(tmp_path / "store")
    sets = ["steps=1", "evaluate=false", f"base_model={demo_model}", "name=mine"]
    Trainer(load_config("rng", sets), tmp_path / "rng", store, quiet=True).run()
    with pytest.raises(ValueError, match="adapter name 'mine' holds rng adapters, not continuation"):
        Trainer(load_config("continuation", sets), tmp_path / "continuation", store, quiet=True)
    assert not (tmp_path / "continuation" / "metrics.jsonl").exists()


def test_a_step_that_leaves_non_finite_weights_stops_the_run_before_they_are_kept(tmp_path, demo_model):
    """An extreme weight decay stored an adapter whose weights were all NaN, and `verify` passed it."""
    config = load_config("rng", SHORT + [f"base_model={demo_model}", "checkpoint_every=1", "evaluate=false"])
    store, run_dir = AdapterStore(tmp_path / "store"), tmp_path / "run"
    trainer = Trainer(config, run_dir, store, quiet=True)
    trainer.lora_params[0].register_hook(lambda grad: grad * float("inf"))  # what such a setting does to a step
    with pytest.raises(FloatingPointError, match="step 1: the adapter's weights are no longer finite"):
        trainer.run()
    assert store.names() == [] and not (run_dir / "checkpoint.pt").exists()


@pytest.mark.parametrize("setting", ["optim.lr=2", "optim.weight_decay=1e300", "optim.weight_decay=-1",
                                     "reward_temperature.end=1e-300", "behaviour.temperature_low=1e-300",
                                     "subtb_lambda=1e300", "barred_flow_offset=1e308"])
def test_settings_that_turn_a_step_into_nan_are_refused_naming_them(setting):
    """Each passed validation, then failed at step 1 with a traceback naming no field."""
    with pytest.raises(ValidationError, match=setting.partition("=")[0].rpartition(".")[2]):
        load_config("rng", [setting])


def test_a_store_that_takes_no_version_is_refused_before_training(tmp_path, demo_model):
    """A read-only store was found out at the save, after every step, as a 'damaged' store."""
    from test_store import _unprivileged

    store = tmp_path / "store"
    store.mkdir()
    store.chmod(0o555)
    try:
        trained = subprocess.run([*_unprivileged(), sys.executable, "-m", "gfn.cli", "train", "rng", "--set",
                                  f"base_model={demo_model}", "--set", "steps=1", "--run-dir", str(tmp_path / "run"),
                                  "--store", str(store)], capture_output=True, text=True, cwd=REPO)
    finally:
        store.chmod(0o755)
    said = " ".join(trained.stderr.split())
    assert trained.returncode == 2 and f"adapter store {store} is not writable" in said, trained.stdout + trained.stderr
    assert not (tmp_path / "run").exists()


def test_a_killed_writers_partial_file_is_removed_when_the_run_resumes(tmp_path, demo_model):
    """A checkpoint write cut short (a kill, a full disk) left its temporary file for good."""
    config = load_config("rng", SHORT + [f"base_model={demo_model}", "evaluate=false"])
    store, run_dir = AdapterStore(tmp_path / "store"), tmp_path / "run"
    assert Trainer(config, run_dir, store, quiet=True, should_stop=lambda: True).run() is None
    partial = run_dir / ".checkpoint.pt.0123abcd.tmp"
    partial.write_bytes(b"torn")
    Trainer(config, run_dir, store, quiet=True)  # resumes from the checkpoint the stop wrote
    assert (run_dir / "checkpoint.pt").exists() and not partial.exists()


def test_evaluating_an_adapter_whose_base_model_is_gone_names_it(tmp_path, demo_model):
    """It said "Repo id must be in the form 'repo_name'" (the path read as a hub id)."""
    from trainer.evaluate import LoadedPolicy

    base = Path(shutil.copytree(demo_model, tmp_path / "base"))
    store = AdapterStore(tmp_path / "store")
    config = load_config("rng", ["steps=1", "evaluate=false", f"base_model={base}"])
    manifest = Trainer(config, tmp_path / "run", store, quiet=True).run()
    shutil.rmtree(base)
    with pytest.raises(FileNotFoundError, match=f"rng@v1 was trained on the base model at {base}, which is gone"):
        LoadedPolicy(store, manifest.name, manifest.version)
