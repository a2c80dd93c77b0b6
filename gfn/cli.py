"""The `gfn` command: the demo world, training and evaluation, the adapter store, the service, training jobs.

Heavy imports (torch, transformers, vLLM) happen inside the commands, so `gfn --help`
and `gfn adapters list` stay fast.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from adapters.home import file_in_the_way, gfn_home, runs_root, store_root

if TYPE_CHECKING:
    from adapters.store import AdapterStore
    from service.settings import Settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__.split("\n\n")[0],
                  rich_markup_mode="markdown")  # markdown: a docstring's line breaks are not kept
demo = typer.Typer(no_args_is_help=True, help="The demo world: corpus, tokenizer and base model.")
adapters_app = typer.Typer(no_args_is_help=True, help="The adapter store.")
jobs_app = typer.Typer(no_args_is_help=True, help="Training jobs on the Redis queue (`gfn worker` runs them).")
configs_app = typer.Typer(no_args_is_help=True, help="The bundled training configs (configs/).")
app.add_typer(demo, name="demo")
app.add_typer(adapters_app, name="adapters")
app.add_typer(jobs_app, name="jobs")
app.add_typer(configs_app, name="configs")


def _redis_url(url: str) -> str:
    """A URL redis can parse, checked before anything connects."""
    from jobs.queue import check_redis_url

    try:
        return check_redis_url(url)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None


RedisUrl = Annotated[str, typer.Option(envvar="GFN_REDIS_URL", help="the Redis of the job queue", callback=_redis_url)]
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
JobId = Annotated[str, typer.Argument(help="as `gfn jobs submit` printed it, or `gfn jobs list` shows it")]
StoreOption = Annotated[Optional[Path], typer.Option(help="adapter store root; default: GFN_STORE, else GFN_HOME/adapters")]
# Rich breaks lines at the terminal's width, so a path or a command copies in pieces, and where output is
# no terminal and COLUMNS is unset it cuts tables at 80 columns. Here a line stays whole (the terminal
# wraps it), a table off a terminal takes its natural width, and errors and warnings go to stderr.
_WIDTH = None if sys.stdout.isatty() or "COLUMNS" in os.environ else 10_000
console = Console(soft_wrap=True, width=_WIDTH)
complaints = Console(soft_wrap=True, stderr=True)


def _warn_unknown_variables() -> None:
    """A mistyped variable (GFN_STOR, GFN_REDIS_ULR) would leave its default in force unnoticed."""
    from service.settings import unknown_variables

    for warning in unknown_variables(os.environ):
        complaints.print(f"[yellow]warning:[/yellow] {escape(warning)}")


def _fail(message: str) -> None:
    complaints.print("[red]error:[/red]", escape(message))  # a message may hold brackets: a pattern, pydantic's [type=...]
    raise typer.Exit(2)


@app.callback()
def _check_home() -> None:
    if (file := file_in_the_way(gfn_home())) is not None:  # every command keeps something under it
        _fail(f"GFN_HOME {gfn_home()}: {file} is a file, not a directory")


@demo.command("build")
def demo_build(quiet: Annotated[bool, typer.Option(help="no progress bar; print the directory alone")] = False) -> None:
    """Build (or find cached) the demo base model and print its directory."""
    from world.base_model import build

    path = build(quiet=quiet)
    stats = json.loads((path / "world.json").read_text())
    console.print(path if quiet else f"demo base model: {path} ({stats['parameters']:,} parameters, built in "
                  f"{stats['build_seconds']} s)")


@app.command()
def train(
    config: Annotated[str, typer.Argument(help="a YAML file or a bundled config name (rng, infill, ...)")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override: key.path=value")] = None,
    run_dir: Annotated[Optional[Path], typer.Option(help="checkpoints and logs; the same dir resumes")] = None,
    fresh: Annotated[bool, typer.Option(help="discard an existing checkpoint in the run dir")] = False,
    store: StoreOption = None,
) -> None:
    """Train an adapter with SubTB and save it to the store (resumes a killed run)."""
    _warn_unknown_variables()
    from jobs.configs import ConfigError
    from jobs.validate import load

    try:  # the check `gfn jobs submit` makes: the same messages, before torch loads
        data = load(config, set_ or [])  # the config with its overrides, data paths resolved
    except ConfigError as error:
        _fail("\n".join(error.errors))
    from pydantic import ValidationError

    from adapters.errors import AdapterError
    from trainer.config import config_errors, load_config
    from trainer.loop import RunInUse, Trainer

    try:
        cfg = load_config(data)
    except ValidationError as error:
        _fail("\n".join(config_errors(error)))
    except (ValueError, FileNotFoundError) as error:
        _fail(str(error))
    run_dir = run_dir or runs_root() / cfg.name
    try:  # a missing base model, a store that takes no version, a run dir in use or holding another run
        trainer = Trainer(cfg, run_dir, _store(store), fresh=fresh)
    except (RunInUse, ValueError, OSError) as error:
        _fail(str(error))
    try:
        manifest = trainer.run()
    except (FloatingPointError, OSError, AdapterError) as error:  # a setting too extreme, a full disk
        _fail(f"{error}\nthe run stopped; the same command resumes it from its last checkpoint in {run_dir}")
    # stored now, or by this run before (run again once finished): true either way
    console.print(f"{manifest.ref} stored in {trainer.store.root}: {json.dumps(manifest.metrics)}")


@app.command("eval")
def evaluate(
    adapter: Annotated[str, typer.Argument(help="name or name@vN")],
    samples: Annotated[Optional[int], typer.Option(min=1, help="samples to draw (default: the task's)")] = None,
    store: StoreOption = None,
) -> None:
    """Evaluate a stored adapter with its task's evaluation."""
    from pydantic import ValidationError

    from adapters.errors import AdapterError
    from adapters.store import parse_ref
    from trainer.config import config_errors
    from trainer.evaluate import evaluate_adapter

    try:
        metrics = evaluate_adapter(_store(store), *parse_ref(adapter), samples)
    except ValidationError as error:  # its task's config, read back: its data file gone or changed
        _fail(f"{adapter}: the task config it was trained with no longer loads: {'; '.join(config_errors(error))}")
    except (AdapterError, ValueError, FileNotFoundError) as error:
        _fail(str(error))
    console.print_json(json.dumps(metrics))


def _store(root: Path | None) -> AdapterStore:
    """The store at `root` (default: GFN_STORE, else under GFN_HOME); one that is a file is named."""
    from adapters.errors import StoreNotADirectory
    from adapters.store import AdapterStore

    try:
        return AdapterStore(root or store_root())
    except StoreNotADirectory as error:
        _fail(str(error))


def _table(*columns: str, folded: tuple[str, ...]) -> Table:
    """A table whose cells are never cut ("fini…"): the long ones (`folded`) fold at a narrow
    terminal, the others (a ref, a job id, a time) keep their line."""
    return Table(*(Column(c, overflow="fold") if c in folded else Column(c, no_wrap=True) for c in columns))


@adapters_app.command("list")
def adapters_list(store: StoreOption = None) -> None:
    """Every stored adapter version with its task and headline metrics."""

    adapters, damaged = _store(store), {}
    table = _table("adapter", "task", "created", "base model", "metrics", folded=("metrics",))
    for m in adapters.list(damaged):
        headline = {k: round(v, 4) if isinstance(v, float) else v for k, v in m.metrics.items() if not isinstance(v, dict)}
        table.add_row(m.ref, m.task, m.created_at[:19], m.base_model.fingerprint[:19], json.dumps(headline))
    console.print(table if table.row_count else f"no adapters in {adapters.root}")
    for ref, why in damaged.items():
        console.print(f"[red]damaged[/red] {ref}: {escape(why)}")


@adapters_app.command("show")
def adapters_show(adapter: Annotated[str, typer.Argument(help="name or name@vN")], store: StoreOption = None) -> None:
    """A version's manifest (the newest for a bare name): task, base model, template, masks,
    training config, metrics and checksums."""
    from adapters.errors import AdapterError
    from adapters.store import parse_ref

    try:
        manifest = _store(store).manifest(*parse_ref(adapter))
    except AdapterError as error:
        _fail(str(error))
    console.print_json(manifest.model_dump_json())


@adapters_app.command("verify")
def adapters_verify(adapter: Annotated[Optional[str], typer.Argument(help="name or name@vN; default: all")] = None,
                    store: StoreOption = None) -> None:
    """Check every file of every version (of a name, or one version) against its manifest's
    checksums, as loading does; exit 1 if any is damaged, 2 if there is no store or no such adapter."""
    from adapters.errors import AdapterCorrupt, AdapterError, AdapterNotFound
    from adapters.store import parse_ref

    adapters = _store(store)
    if not adapters.root.is_dir():  # a mistyped --store must not pass a deploy's check as "0 checked"
        _fail(f"no adapter store at {adapters.root}")
    try:
        name, version = parse_ref(adapter) if adapter else (None, None)
        if name:
            adapters.latest(name)  # an unknown name is named, not checked as zero versions
    except AdapterCorrupt as error:  # the name's directory cannot be read: damaged, not a usage error
        console.print(f"[red]damaged[/red] {adapter}: {escape(str(error))}")
        raise typer.Exit(1) from None
    except AdapterError as error:  # a malformed ref, an unknown name
        _fail(str(error))
    refs, damaged = [], 0
    for n in [name] if name else adapters.names():
        try:
            refs += [(n, v) for v in ([version] if version else adapters.versions(n))]
        except AdapterCorrupt as error:
            damaged += 1
            console.print(f"[red]damaged[/red] {n}: {escape(str(error))}")
    for name, version in refs:
        try:
            adapters.load(name, version)
            console.print(f"[green]ok[/green] {name}@v{version}")
        except AdapterNotFound as error:  # a version named that is not there
            _fail(str(error))
        except AdapterError as error:
            damaged += 1
            console.print(f"[red]damaged[/red] {name}@v{version}: {escape(str(error))}")
    console.print(f"{len(refs)} versions checked, {damaged} damaged")
    if damaged:
        raise typer.Exit(1)


@adapters_app.command("delete")
def adapters_delete(adapter: Annotated[str, typer.Argument(help="name@vN")],
                    yes: Annotated[bool, typer.Option("--yes", help="do not ask")] = False,
                    store: StoreOption = None) -> None:
    """Delete one version, a damaged one too. Its number is never given again, so name@vN keeps meaning
    the weights it meant; a service holding it loaded keeps serving it until it is unloaded."""
    from adapters.errors import AdapterCorrupt, AdapterError
    from adapters.store import parse_ref

    try:
        name, version = parse_ref(adapter)
        if version is None:
            raise ValueError(f"adapter: name the version to delete ({adapter}@vN); "
                             "`gfn adapters list` shows them")
        adapters = _store(store)
        try:
            adapters.manifest(name, version)  # names what is missing before asking
            damaged = ""
        except AdapterCorrupt as error:  # a damaged version is deleted as any other
            damaged = f" (damaged: {error})"
        if not yes:
            typer.confirm(f"delete {adapter}{damaged} from {adapters.root}?", abort=True)
        adapters.delete(name, version)
    except (AdapterError, ValueError) as error:
        _fail(str(error))
    console.print(f"deleted {adapter}")


@app.command()
def worker(
    redis_url: RedisUrl = DEFAULT_REDIS_URL,
    metrics_port: Annotated[int, typer.Option(min=0, max=65535, help="serve Prometheus /metrics on this port; 0: none")] = 0,
) -> None:
    """Run queued training jobs, each in a fresh process; one worker per device."""
    _warn_unknown_variables()
    from redis import Redis
    from redis.exceptions import AuthenticationError, RedisError, ResponseError

    from gfn.local import bind_error
    from jobs.queue import shown_url
    from jobs.worker import run

    if metrics_port and (error := bind_error("0.0.0.0", metrics_port)) is not None:  # where /metrics binds
        _fail(f"--metrics-port {metrics_port}: {error.strerror or error}")
    try:  # a wrong password or database never heals; Redis not up yet, or slow, does: the worker waits for it
        with Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=2) as redis:
            redis.ping()
    except (AuthenticationError, ResponseError) as error:
        hint = " (a password goes into the URL: redis://:PASSWORD@host:port/db)" * ("auth" in str(error).lower())
        _fail(f"--redis-url {shown_url(redis_url)}: {' '.join(str(error).split())}{hint}")
    except RedisError:
        pass
    run(redis_url, metrics_port)


@contextmanager
def _job_errors(redis_url: str) -> Iterator[None]:
    from redis.exceptions import RedisError

    from jobs.configs import ConfigError
    from jobs.queue import JobNotFound, shown_url

    try:
        yield
    except ConfigError as error:
        _fail("\n".join(error.errors))
    except JobNotFound as error:
        _fail(str(error))
    except RedisError as error:
        _fail(f"Redis at {shown_url(redis_url)}: {error}")


def _queue(redis_url: str):
    from redis import Redis

    from jobs.queue import JobQueue

    return JobQueue(Redis.from_url(redis_url))


@jobs_app.command("submit")
def jobs_submit(
    config: Annotated[str, typer.Argument(help="a YAML file or a bundled config name (rng, infill, ...)")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override: key.path=value")] = None,
    redis_url: RedisUrl = DEFAULT_REDIS_URL,
) -> None:
    """Check a training config and queue it; prints the job id. Relative data paths are queued
    absolute, as `gfn train` reads them (the worker runs elsewhere)."""
    from jobs.configs import rebase_data_paths
    from jobs.validate import load

    with _job_errors(redis_url):
        data = load(config, set_ or [])
        rebase_data_paths(data, Path.cwd())
        typer.echo(_queue(redis_url).submit(data))


@jobs_app.command("status")
def jobs_status(job_id: JobId, redis_url: RedisUrl = DEFAULT_REDIS_URL) -> None:
    """A job's status, progress, adapter version or error, as JSON."""
    with _job_errors(redis_url):
        console.print_json(_queue(redis_url).status(job_id).model_dump_json())


@jobs_app.command("cancel")
def jobs_cancel(job_id: JobId, redis_url: RedisUrl = DEFAULT_REDIS_URL) -> None:
    """Stop a job at its next step boundary, after a checkpoint (by force after a grace period)."""
    with _job_errors(redis_url):
        console.print_json(_queue(redis_url).cancel(job_id).model_dump_json())


@jobs_app.command("list")
def jobs_list(limit: Annotated[int, typer.Option(min=1, help="jobs to show")] = 20,
              redis_url: RedisUrl = DEFAULT_REDIS_URL) -> None:
    """The most recent jobs, newest first."""
    table = _table("job", "adapter", "status", "step", "result", "queued at", folded=("adapter", "result"))
    with _job_errors(redis_url):
        for job in _queue(redis_url).list(limit):
            step = f"{job.progress.step}/{job.progress.total}" if job.progress else ""
            queued = job.enqueued_at.isoformat(timespec="seconds") if job.enqueued_at else ""
            table.add_row(job.id, job.name, job.status, step, job.adapter or job.error or "", queued)
    console.print(table)


@configs_app.command("schema")
def configs_schema() -> None:
    """Write configs/schema.json from the trainer's config model (commit it with config changes)."""
    from jobs.configs import SCHEMA
    from trainer.config import schema_json

    try:
        SCHEMA.write_text(schema_json())
    except OSError as error:
        _fail(f"cannot write {SCHEMA}: {error.strerror or error}")
    console.print(f"wrote {SCHEMA}")


@configs_app.command("list")
def configs_list() -> None:
    """The bundled configs, by the name `gfn train` and `gfn jobs submit` take, with their task and steps."""
    from jobs.configs import bundled_configs, config_data

    table = _table("config", "task", "steps", "base model", folded=("base model",))
    for name in bundled_configs():
        data = config_data(name)
        table.add_row(name, data["task"]["name"], str(data.get("steps", "")), str(data.get("base_model", "demo")))
    console.print(table)


EngineOption = Annotated[Optional[str], typer.Option(help="vllm, transformers or auto (default: GFN_ENGINE, else auto)")]
HostOption = Annotated[Optional[str], typer.Option(help="default: GFN_HOST, else 127.0.0.1")]
PortOption = Annotated[Optional[int], typer.Option(help="default: GFN_PORT, else 8000")]


def _settings(**options: Any) -> Settings:
    """The service settings: GFN_* variables, overridden by the options given."""
    from pydantic import ValidationError

    from service.settings import Settings

    given = {k: v for k, v in options.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as error:
        _fail("\n".join(_setting_error(e, given) for e in error.errors()))


def _setting_error(error: Any, given: dict[str, Any]) -> str:
    """A settings problem named as the user wrote it (GFN_MAX_N, --port), with the value given,
    except for the two that may hold a secret (the key; a password in the Redis URL)."""
    field, *inner = error["loc"]
    name = f"--{field}" if field in given else f"GFN_{str(field).upper()}"
    value = "" if field in ("api_key", "redis_url") else f" (got {error['input']!r})"
    return f"{name}{''.join(f'[{i}]' for i in inner)}: {error['msg'].removeprefix('Value error, ')}{value}"


def _check_address(settings: Settings) -> None:
    """Refuse a taken port or an address this machine lacks now, not after the model has loaded."""
    from gfn.local import bind_error

    if (error := bind_error(settings.host, settings.port)) is not None:
        fix = "pass another --port" if error.errno in (errno.EADDRINUSE, errno.EACCES) else "pass another --host"
        _fail(f"cannot serve on {settings.host}:{settings.port}: {error.strerror or error}; {fix}")


@app.command()
def serve(engine: EngineOption = None, host: HostOption = None, port: PortOption = None) -> None:
    """Serve the stored adapters over HTTP; every other setting comes from GFN_* variables (service/settings.py)."""
    import uvicorn

    from service.app import create_app
    from service.state import NoBaseModel, base_model_of

    settings = _settings(engine=engine, host=host, port=port)
    _check_address(settings)
    try:
        settings = settings.model_copy(update={"base_model": base_model_of(settings)})
    except NoBaseModel as error:
        _fail(str(error))
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_config=None, access_log=False)

EXAMPLE = """The service is up on {url} (OpenAPI: /docs). Try:

  curl -s {url}/infill -H 'content-type: application/json' -d '{{
    "prefix": "Anna lived in a big city. Every morning she walked to the market. One day she found an old key.",
    "suffix": "Anna cried all night.", "n": 4}}'
"""
TRAINING = ("The demo adapters {names} are training as jobs, in that order (once; on 2 cores rng and reasoning "
            "take minutes, infill and constrained half an hour each); each goes live as it is stored, and a request "
            "for one still training answers 404 meanwhile. Follow them with\n"
            "  .venv/bin/gfn jobs list --redis-url {url}\n")


def service_url(host: str, port: int) -> str:
    """The service's URL as curl takes it: an IPv6 address in brackets."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@app.command()
def up(engine: EngineOption = None, host: HostOption = None, port: PortOption = None) -> None:
    """Run the whole system locally: the demo world (built once), a redis-server on loopback,
    one training worker and the service. The first start queues the demo adapters' training as
    jobs and serves at once; each adapter goes live as its job stores it. Ctrl-C stops it all."""
    import uvicorn

    from gfn.local import (RedisServer, ensure_demo_adapters, lora_settings, queue_demo_adapters, start_worker,
                           stop_process)
    from service.app import create_app
    from world.base_model import build

    settings = _settings(engine=engine, host=host, port=port)  # bad options fail before anything starts
    host, port = settings.host, settings.port
    if port == 0:
        _fail("port 0 would serve on a port chosen at random, which the example printed could not name; give one")
    _check_address(settings)
    if ignored := [f"GFN_{name.upper()}" for name in ("base_model", "redis_url") if getattr(settings, name)]:
        complaints.print(f"[yellow]gfn up serves the demo model with a Redis of its own: {' and '.join(ignored)} "
                         "ignored here (gfn serve and gfn worker take them)[/yellow]")
    model = build()
    redis, worker, training = RedisServer(gfn_home() / "redis", persist=True), None, []
    try:
        redis.start()
    except RuntimeError as error:
        complaints.print(f"[yellow]{error}: serving without Redis (in-process cache, /jobs answers 503), "
                         "once the demo adapters are trained here[/yellow]")
        redis = None
    try:
        if redis is None:
            ensure_demo_adapters(model)
        else:
            worker = start_worker(redis.url)
            training = queue_demo_adapters(redis.url, model)
        settings = settings.model_copy(update={"base_model": str(model), "redis_url": redis.url if redis else None,
                                               **(lora_settings(training, settings) if training else {})})
        console.print(EXAMPLE.format(url=service_url(host, port)))
        if training:
            console.print(TRAINING.format(names=", ".join(training), url=redis.url))
        signal.signal(signal.SIGHUP, lambda *_: os.kill(os.getpid(), signal.SIGTERM))  # a closed terminal stops it as Ctrl-C
        uvicorn.run(create_app(settings), host=host, port=port, log_config=None, access_log=False)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave the worker or Redis behind
        try:
            if worker is not None:
                console.print("stopping: a running training job checkpoints and goes back to the queue (up to a minute)")
                stop_process(worker)
        finally:
            if redis is not None:
                redis.stop()


if __name__ == "__main__":
    app()
