"""The command line refuses bad input with a message and exit code 2, before it starts anything."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from gfn.cli import app, service_url


def test_up_and_serve_refuse_a_bad_engine_a_taken_port_and_an_unknown_host(tmp_path):
    for command in ("up", "serve"):
        bad = CliRunner().invoke(app, [command, "--engine", "tensorrt"])
        assert bad.exit_code == 2 and "engine" in bad.output
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            busy = CliRunner().invoke(app, [command, "--port", str(port)])
        said = " ".join(busy.output.split())  # rich wraps lines
        assert busy.exit_code == 2 and f"127.0.0.1:{port}" in said and "pass another --port" in said, said
        nowhere = CliRunner().invoke(app, [command, "--host", "999.1.1.1"])
        said = " ".join(nowhere.output.split())
        assert nowhere.exit_code == 2 and "999.1.1.1:8000" in said and "pass another --host" in said, said


def test_a_bad_setting_is_named_as_the_user_wrote_it_without_a_secret():
    """Pydantic's dump named `max_n` (not GFN_MAX_N), linked its docs, and echoed a Redis password."""
    for env, args, said in (({"GFN_MAX_N": "abc"}, [], "error: GFN_MAX_N: Input should be a valid integer"),
                            ({}, ["--port", "99999"], "error: --port: Input should be less than or equal to 65535"),
                            ({"GFN_REDIS_URL": "redis://:s3cret@h:1/x"}, [],
                             "error: GFN_REDIS_URL: 'redis://:***@h:1/x'")):
        result = CliRunner().invoke(app, ["serve", *args], env=env)
        assert result.exit_code == 2 and result.output.startswith(said), result.output
        assert "s3cret" not in result.output and "pydantic.dev" not in result.output


def test_serve_and_train_check_their_addresses_and_store_as_they_will_use_them(tmp_path):
    """An IPv6 host is probed as IPv6 (uvicorn serves it); a store that cannot be made is named before training."""
    env = {"GFN_STORE": str(tmp_path / "store"), "GFN_PORT": "0"}
    if socket.has_ipv6:
        try:
            with socket.socket(socket.AF_INET6) as probe:
                probe.bind(("::1", 0))
        except OSError:
            pass  # no IPv6 loopback here
        else:
            result = CliRunner().invoke(app, ["serve", "--host", "::1"], env=env)
            assert result.exit_code == 2 and "no base model" in " ".join(result.output.split()), result.output
    store = "/proc/no-store-here"  # /proc takes no new directory, even from root
    result = CliRunner().invoke(app, ["train", "rng", "--set", "steps=1", "--store", store],
                                env={"GFN_HOME": str(tmp_path / "home")})
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and f"adapter store {store} cannot be made" in said, said


def test_train_and_worker_name_a_mistyped_variable_before_they_start(tmp_path):
    """`GFN_STOR=...` trained into the default store, `GFN_REDIS_ULR` sent a worker to wait on the default Redis."""
    env = {"GFN_HOME": str(tmp_path / "home"), "GFN_STOR": str(tmp_path / "mine"), "GFN_REDIS_ULR": "redis://x:1/0"}
    with socket.socket() as taken:  # the worker stops at once, on a taken --metrics-port
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        for args in (["train", "rng", "--set", "steps=1", "--store", "/proc/no-store-here"],
                     ["worker", "--metrics-port", str(taken.getsockname()[1])]):
            said = " ".join(CliRunner().invoke(app, args, env=env).output.split())
            assert "GFN_STOR is no setting and is ignored: did you mean GFN_STORE?" in said, said
            assert "GFN_REDIS_ULR is no setting and is ignored: did you mean GFN_REDIS_URL?" in said, said


def test_errors_go_to_stderr_and_output_stays_what_it_says(tmp_path):
    """`gfn adapters show rng@v9 > manifest.json` wrote the error into the file and showed nothing."""
    def gfn(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "gfn.cli", *args], capture_output=True, text=True, timeout=60)

    shown = gfn("adapters", "show", "rng@v9", "--store", str(tmp_path))
    assert shown.returncode == 2 and shown.stdout == "" and "error:" in shown.stderr and "rng" in shown.stderr
    listed = gfn("adapters", "list", "--store", str(tmp_path / "none"))  # an empty table did not say which store
    assert listed.returncode == 0 and listed.stdout.strip() == f"no adapters in {tmp_path / 'none'}", listed


def test_configs_list_names_every_bundled_config_as_train_takes_it():
    from jobs.configs import bundled_configs

    listed = CliRunner().invoke(app, ["configs", "list"])
    rows = {line.split()[1]: line.split()[3] for line in listed.output.splitlines() if line.startswith("│")}
    assert listed.exit_code == 0 and set(rows) == set(bundled_configs()) >= {"rng", "infill", "reasoning"}
    assert rows["infill"] == "infill" and rows["rng"] == "rng", listed.output


def test_train_piped_to_a_log_prints_progress_lines_and_where_it_saved(tmp_path, demo_model):
    """Off a terminal rich draws the bar once, at the end: a log showed nothing while the run trained."""
    store = tmp_path / "store"
    run = subprocess.run([sys.executable, "-m", "gfn.cli", "train", "rng", "--set", "steps=2", "--set", "evaluate=false",
                          "--set", f"base_model={demo_model}", "--store", str(store), "--run-dir", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "rng step 2/2 loss " in run.stdout, run.stdout + run.stderr[-2000:]
    assert f"rng@v1 stored in {store}: " in run.stdout


def test_serve_names_a_missing_base_model_in_one_line_before_starting(tmp_path):
    empty = {"GFN_STORE": str(tmp_path / "store"), "GFN_PORT": "0"}
    weightless = tmp_path / "weightless"  # a config.json copied alone: a traceback once the fingerprint read it
    weightless.mkdir()
    (weightless / "config.json").write_text('{"model_type": "llama"}')
    for env, said in (({}, f"no base model: set GFN_BASE_MODEL, or train an adapter into {tmp_path / 'store'} first"),
                      ({"GFN_BASE_MODEL": str(tmp_path)}, f"GFN_BASE_MODEL {tmp_path} is no model directory"),
                      ({"GFN_BASE_MODEL": str(weightless)}, f"GFN_BASE_MODEL {weightless} holds no weights")):
        result = CliRunner().invoke(app, ["serve", "--engine", "transformers"], env={**empty, **env})
        shown = " ".join(result.output.split())
        assert result.exit_code == 2 and said in shown and "Traceback" not in shown, shown


def test_up_takes_its_address_from_gfn_variables_unless_given():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = CliRunner().invoke(app, ["up"], env={"GFN_PORT": str(port)})
    assert busy.exit_code == 2 and f"127.0.0.1:{port}" in " ".join(busy.output.split())
    bad = CliRunner().invoke(app, ["up", "--engine", "tensorrt"], env={"GFN_ENGINE": "transformers"})
    assert bad.exit_code == 2 and "engine" in bad.output
    anywhere = CliRunner().invoke(app, ["up", "--port", "0"])  # it printed http://127.0.0.1:0 to try
    assert anywhere.exit_code == 2 and "port 0" in anywhere.output
    assert service_url("::1", 8000) == "http://[::1]:8000" and service_url("127.0.0.1", 80) == "http://127.0.0.1:80"
    listed = CliRunner().invoke(app, ["up"], env={"GFN_LORA_TARGET_MODULES": '["gate_proj"'})  # torn JSON
    assert listed.exit_code == 2 and "GFN_LORA_TARGET_MODULES:" in listed.output and "not a JSON list" in listed.output
    pinned = CliRunner().invoke(app, ["up"], env={"GFN_ADAPTERS": '["rng@v1x"]'})  # refused at start, not at load
    assert pinned.exit_code == 2 and "GFN_ADAPTERS[0]:" in pinned.output and "name@vN" in pinned.output, pinned.output


def test_eval_names_what_it_cannot_find(tmp_path):
    for ref, said in (("absent", "absent"), ("absent@vX", "use 'name' or 'name@vN'"), ("absent@v", "use 'name'")):
        missing = CliRunner().invoke(app, ["eval", ref, "--store", str(tmp_path / "store")])
        assert missing.exit_code == 2 and said in " ".join(missing.output.split()), missing.output


def test_train_names_a_missing_base_model(tmp_path):
    missing = CliRunner().invoke(app, ["train", "rng", "--set", f"base_model={tmp_path / 'nope'}",
                                       "--run-dir", str(tmp_path / "run"), "--store", str(tmp_path / "store")])
    assert missing.exit_code == 2 and "does not exist" in " ".join(missing.output.split()), missing.output


def test_unreadable_configs_and_overrides_are_named_not_tracebacks(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [x\n")
    list_key = tmp_path / "list_key.yaml"
    list_key.write_text("name: rng\n? [a]\n: 1\n")
    deep = "[" * 3000 + "]" * 3000  # past Python's recursion limit as it is read
    deep_file = tmp_path / "deep.yaml"
    deep_file.write_text(f"steps: {deep}\n")
    for args, said in ((["train", str(broken)], "is not a readable YAML file"),
                       (["train", str(tmp_path)], "is not a readable YAML file"),
                       (["train", "rng", "--set", "steps=[1"], "steps: '[1' is not a YAML value"),
                       (["train", "continuation", "--set", "task.data="], "task.data: no value after '='"),  # $UNSET
                       (["train", str(list_key)], f"{list_key}: the key on line 2 is a list, not a name"),
                       (["jobs", "submit", "rng", "--set", "task={[a]: 1}"], "the key on line 1 is a list"),
                       (["train", "rng", "--set", f"steps={deep}"], "is not a YAML value (nested too deeply)"),
                       (["train", str(deep_file)], "nested too deeply"),
                       (["jobs", "submit", "rng", "--set", "name=../x"], "[a-z0-9][a-z0-9._-]{0,63}")):  # brackets kept
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and said in " ".join(result.output.split()), result.output


def test_out_of_range_options_are_refused_naming_them(tmp_path):
    for args, option in ((["jobs", "list", "--limit", "0"], "--limit"), (["jobs", "list", "--limit", "-1"], "--limit"),
                         (["worker", "--metrics-port", "70000"], "--metrics-port"),
                         (["worker", "--metrics-port", "-1"], "--metrics-port"),
                         (["worker", "--redis-url", "foo"], "--redis-url"),
                         (["jobs", "status", "x", "--redis-url", "foo"], "--redis-url"),
                         (["jobs", "submit", "rng", "--redis-url", "redis://h:port"], "--redis-url"),
                         (["jobs", "list", "--redis-url", "redis://127.0.0.1:1/abc"], "--redis-url"),
                         (["jobs", "list", "--redis-url", "redis://127.0.0.1:1/0?x=1"], "--redis-url"),  # a traceback
                         (["eval", "rng@v1", "--samples", "0", "--store", str(tmp_path)], "--samples"),
                         (["eval", "rng@v1", "--samples", "-5", "--store", str(tmp_path)], "--samples")):
        result = CliRunner().invoke(app, args)
        said = " ".join(result.output.split())
        assert result.exit_code == 2 and f"Invalid value for '{option}'" in said and "Traceback" not in said, said
    unparsed = CliRunner().invoke(app, ["jobs", "list", "--redis-url", "redis://:s3cret@127.0.0.1:port/0"])
    assert unparsed.exit_code == 2 and "redis://:***@" in unparsed.output and "s3cret" not in unparsed.output
    from_env = CliRunner().invoke(app, ["jobs", "status", "x"], env={"GFN_REDIS_URL": "foo"})
    assert from_env.exit_code == 2 and "GFN_REDIS_URL" in from_env.output and "redis://" in from_env.output


def test_eval_refuses_a_sample_count_below_one_before_loading_anything(tmp_path):
    from adapters.store import AdapterStore
    from trainer.evaluate import evaluate_adapter

    for bad in (0, -5):  # 0 once meant the default, fewer divided by zero after the model loaded
        with pytest.raises(ValueError, match=f"samples: must be at least 1, got {bad}"):
            evaluate_adapter(AdapterStore(tmp_path), "absent", samples=bad)  # not AdapterNotFound: checked first


def test_train_and_submit_name_the_field_of_a_bad_config(tmp_path):
    """Refused as the config is read, before a model loads or Redis is asked (nothing listens on port 1),
    in the same words (train spoke pydantic's, 4 s later, once torch had loaded)."""
    for override, said in (("task.target={kind: uniform, low: 0, high: 1e9}", "task.target.high: must be <= 9999"),
                           ("stepz=2", "stepz: unknown field (known: "),
                           ("lora.r=1.5", "lora.r: must be of type integer, got 1.5")):
        for args in (["train", "rng", "--set", override, "--store", str(tmp_path)],
                     ["jobs", "submit", "rng", "--set", override, "--redis-url", "redis://127.0.0.1:1/0"]):
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 2 and said in " ".join(result.output.split()), result.output


def test_a_rate_written_1e_3_is_a_number_for_train_and_submit_alike(tmp_path):
    """YAML 1.1 reads 1e-3 as text: the schema at submit refused it while pydantic in train took it."""
    from jobs.configs import config_data

    written = tmp_path / "rates.yaml"
    written.write_text("name: rng\ntask: {name: rng}\noptim: {lr: 5E-4}\n")
    assert config_data(written, ["optim.warmup_steps=1e1"])["optim"] == {"lr": 5e-4, "warmup_steps": 10.0}
    queued = CliRunner().invoke(app, ["jobs", "submit", "rng", "--set", "optim.lr=1e-3", "--redis-url",
                                      "redis://127.0.0.1:1/0"])  # valid, so it gets as far as Redis (none on port 1)
    assert queued.exit_code == 2 and "Redis at" in queued.output and "optim.lr" not in queued.output, queued.output


def test_duplicate_keys_in_a_yaml_config_are_refused(tmp_path):
    config = tmp_path / "dup.yaml"
    config.write_text("name: rng\ntask:\n  name: rng\n  target: {kind: uniform, low: 0, high: 9}\nname: other\n")
    for command in (["train", str(config), "--store", str(tmp_path)],
                    ["jobs", "submit", str(config), "--redis-url", "redis://127.0.0.1:1/0"]):
        result = CliRunner().invoke(app, command)
        said = " ".join(result.output.split())
        assert result.exit_code == 2 and f"{config}: key 'name' appears twice (lines 1 and 5)" in said, said
    nested = CliRunner().invoke(app, ["train", "rng", "--set", "task.target={kind: uniform, kind: weights}"])
    assert nested.exit_code == 2 and "key 'kind' appears twice" in " ".join(nested.output.split()), nested.output



def test_yaml_numbers_read_as_written_and_merge_keys_work(tmp_path):
    """YAML 1.1 read `seed: 010` as 8 and `steps=1:30` as 90 (base 60), silently; a merge key
    (`<<: *defaults`) was refused with a message about constructors."""
    from jobs.configs import config_data

    config = tmp_path / "merged.yaml"
    config.write_text("defaults: &d {lr: 1.0e-3, warmup_steps: 5}\nname: rng\ntask: {name: rng}\nseed: 010\n"
                      "optim: {<<: *d, warmup_steps: 1}\n")
    data = config_data(config, [])
    assert data["seed"] == 10 and data["optim"] == {"lr": 1e-3, "warmup_steps": 1}
    sexagesimal = CliRunner().invoke(app, ["train", "rng", "--set", "steps=1:30"])
    assert sexagesimal.exit_code == 2 and "steps" in sexagesimal.output, sexagesimal.output


def test_worker_refuses_what_never_heals_at_once_and_never_prints_a_password(redis_server):
    """A wrong password, a database Redis lacks or a taken metrics port would have the worker retry
    forever (or crash); an unreachable Redis is not refused: the worker waits for it (test_jobs)."""
    host_port = redis_server.url.removeprefix("redis://").partition("/")[0]
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        port = taken.getsockname()[1]
        for args, said in ((["--redis-url", f"redis://someone:s3cret@{host_port}/0"], "invalid username-password"),
                           (["--redis-url", f"redis://{host_port}/99999"], "DB index is out of range"),
                           (["--redis-url", redis_server.url, "--metrics-port", str(port)], f"--metrics-port {port}")):
            result = CliRunner().invoke(app, ["worker", *args])
            shown = " ".join(result.output.split())
            assert result.exit_code == 2 and said in shown and "s3cret" not in shown, shown
    for url, shown in ((f"redis://someone:s3cret@{host_port}/0", "redis://someone:***@"),
                       (f"redis://someone@{host_port}/0?password=s3cret", "?password=***")):
        listed = CliRunner().invoke(app, ["jobs", "list", "--redis-url", url])
        said = " ".join(listed.output.split())
        assert listed.exit_code == 2 and shown in said and "s3cret" not in said, said


def test_jobs_list_shows_whole_job_ids(redis_server, demo_model):
    """At 80 columns the ids were cut ("e37bb309-51bc-477d…"), and a cut id cannot be passed on."""
    submitted = CliRunner().invoke(app, ["jobs", "submit", "rng", "--set", f"base_model={demo_model}",
                                         "--set", "name=" + "a-rather-long-adapter-name" * 2, "--redis-url",
                                         redis_server.url])
    job_id = submitted.output.strip()
    listed = CliRunner().invoke(app, ["jobs", "list", "--redis-url", redis_server.url], env={"COLUMNS": "80"})
    assert submitted.exit_code == listed.exit_code == 0 and job_id in listed.output, listed.output
    # piped (no terminal, no COLUMNS), every cell was cut to fit 80 columns ("queu…")
    env = {name: value for name, value in os.environ.items() if name != "COLUMNS"}
    piped = subprocess.run([sys.executable, "-m", "gfn.cli", "jobs", "list", "--redis-url", redis_server.url],
                           env=env, capture_output=True, text=True, timeout=60)
    row = next(line for line in piped.stdout.splitlines() if job_id in line)
    assert "a-rather-long-adapter-name" * 2 in row and " queued " in row, piped.stdout


def test_a_worker_whose_redis_does_not_answer_yet_waits_for_it(tmp_path):
    """A Redis that accepts but stays silent (starting, a slow network) is not refused: the worker waits."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        worker = subprocess.Popen([sys.executable, "-m", "gfn.cli", "worker", "--redis-url",
                                   f"redis://127.0.0.1:{silent.getsockname()[1]}/0"],
                                  env={**os.environ, "GFN_HOME": str(tmp_path)}, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        try:
            with pytest.raises(subprocess.TimeoutExpired):
                worker.wait(8)  # past the start-up check's 2 s timeout
        finally:
            worker.kill()
    assert "Traceback" not in worker.communicate()[0]


def test_a_file_where_a_directory_belongs_is_named_before_anything_runs(tmp_path):
    """A mistyped GFN_HOME or --store, even one below a file, is refused with the file named, before
    a world is built or a model trained (steps=1 would still train and then fail to save)."""
    file = tmp_path / "a-file"
    file.write_text("")
    for home in (file, file / "below"):
        for args in (["demo", "build"], ["adapters", "list"], ["train", "rng", "--set", "steps=1"]):
            result = CliRunner().invoke(app, args, env={"GFN_HOME": str(home)})
            said = " ".join(result.output.split())
            assert result.exit_code == 2 and f"GFN_HOME {home}: {file} is a file, not a directory" in said, said
    store = file / "store"
    result = CliRunner().invoke(app, ["train", "rng", "--set", "steps=1", "--store", str(store)],
                                env={"GFN_HOME": str(tmp_path / "home")})
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and f"adapter store {store}: {file} is a file, not a directory" in said, said
    assert not (tmp_path / "home" / "runs").exists()


def test_submit_queues_a_relative_data_path_as_this_directory_reads_it(tmp_path, redis_server, monkeypatch):
    """The worker runs in another directory, on another machine maybe: it must read the file meant here."""
    from redis import Redis

    from jobs.queue import JobQueue

    (tmp_path / "data.jsonl").write_text('{"text": "The dog ran in the park."}\n')
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["jobs", "submit", "continuation", "--set", "task.data=data.jsonl",
                                      "--redis-url", redis_server.url])
    assert result.exit_code == 0, result.output
    queued = JobQueue(Redis.from_url(redis_server.url)).config(result.output.strip())
    assert queued["task"]["data"] == str(tmp_path / "data.jsonl")


def test_a_data_path_in_a_yaml_file_is_read_beside_the_file(tmp_path, redis_server, monkeypatch):
    """A config and its data travel together: the path in the file does not depend on where the
    command runs; one on the command line does."""
    from redis import Redis

    from jobs.queue import JobQueue
    from trainer.config import load_config

    project = tmp_path / "project"
    project.mkdir()
    for name in ("train.jsonl", "held.jsonl"):
        (project / name).write_text("".join(f'{{"text": "The dog ran in the park {k}."}}\n' for k in range(5)))
    (project / "mine.yaml").write_text("name: mine\ntask: {name: continuation, data: train.jsonl}\n")
    monkeypatch.chdir(tmp_path)
    config = load_config("project/mine.yaml", ["task.eval_data=project/held.jsonl"])
    assert (config.task.data, config.task.eval_data) == (str(project / "train.jsonl"), str(project / "held.jsonl"))
    result = CliRunner().invoke(app, ["jobs", "submit", "project/mine.yaml", "--redis-url", redis_server.url])
    assert result.exit_code == 0, result.output
    assert JobQueue(Redis.from_url(redis_server.url)).config(result.output.strip())["task"]["data"] == config.task.data


def test_eval_names_a_data_file_gone_since_training(tmp_path, demo_model):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(f'{{"text": "The dog ran in the park {k}."}}\n' for k in range(20)))
    store = str(tmp_path / "store")
    sets = [f"task.data={data}", f"base_model={demo_model}", "steps=1", "evaluate=false", "samples_per_prompt=4",
            "prompts_per_step=1"]
    trained = CliRunner().invoke(app, ["train", "continuation", "--store", store, "--run-dir", str(tmp_path / "run"),
                                       *[a for s in sets for a in ("--set", s)]])
    assert trained.exit_code == 0, trained.output
    data.unlink()
    result = CliRunner().invoke(app, ["eval", "continuation@v1", "--store", store])
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "continuation@v1: the task config it was trained with no longer loads" in said
    assert f"{data}: no such data file" in said and "errors.pydantic.dev" not in said, said
