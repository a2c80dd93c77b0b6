"""The command line refuses bad input with a message and exit code 2, before it starts anything."""

from __future__ import annotations

import socket

from typer.testing import CliRunner

from gfn.cli import app


def test_up_refuses_a_bad_engine_and_a_taken_port():
    bad = CliRunner().invoke(app, ["up", "--engine", "tensorrt"])
    assert bad.exit_code == 2 and "engine" in bad.output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = CliRunner().invoke(app, ["up", "--port", str(port)])
    said = " ".join(busy.output.split())  # rich wraps lines
    assert busy.exit_code == 2 and f"127.0.0.1:{port}" in said and "--port" in said


def test_up_takes_its_address_from_gfn_variables_unless_given():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = CliRunner().invoke(app, ["up"], env={"GFN_PORT": str(port)})
    assert busy.exit_code == 2 and f"127.0.0.1:{port}" in " ".join(busy.output.split())
    bad = CliRunner().invoke(app, ["up", "--engine", "tensorrt"], env={"GFN_ENGINE": "transformers"})
    assert bad.exit_code == 2 and "engine" in bad.output
    pinned = CliRunner().invoke(app, ["up"], env={"GFN_ADAPTERS": '["rng@v1x"]'})  # refused at start, not at load
    assert pinned.exit_code == 2 and "adapters" in pinned.output and "name@vN" in pinned.output, pinned.output


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
    for args, said in ((["train", str(broken)], "is not a readable YAML file"),
                       (["train", str(tmp_path)], "is not a readable YAML file"),
                       (["train", "rng", "--set", "steps=[1"], "steps: '[1' is not a YAML value"),
                       (["jobs", "submit", "rng", "--set", "name=../x"], "[a-z0-9][a-z0-9._-]{0,63}")):  # brackets kept
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and said in " ".join(result.output.split()), result.output
