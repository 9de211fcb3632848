"""Packaging: the compose stack, Prometheus and Grafana configs, the Dockerfile, and the
container's start command (scripts/start.sh) run as a plain process.

No Docker engine runs here, so the compose file is checked by Debian's docker-compose
(`config` parses and interpolates without an engine), the Prometheus config by promtool,
and the start command by running it for real on a free port.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "reid.json"
PROVISIONING = ROOT / "docker" / "grafana" / "provisioning"
READY_TIMEOUT_S = 300


# ---- helpers ---------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without REID_*/GRAFANA_* settings, so the tests see the defaults."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REID_", "GRAFANA_", "POSTGRES_", "PG"))}
    env.update(extra)
    return env


def compose_config(*options: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), *options, "config"],
        cwd=ROOT, env=clean_env(**env), capture_output=True, text=True, timeout=120,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class StartedService:
    """scripts/start.sh running in the background, as the container runs it."""

    def __init__(self, env: dict[str, str], log: Path):
        self.port = int(env["REID_PORT"])
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = env
        self.log = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                ["bash", str(ROOT / "scripts" / "start.sh")],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"start.sh exited with {self.process.returncode}:\n{log_tail(self.log)}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.process.kill()
        pytest.fail(f"not ready after {READY_TIMEOUT_S}s:\n{log_tail(self.log)}")

    def stop(self) -> bool:
        """SIGTERM, as `docker stop` sends it; whether the service shut down cleanly."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                pytest.fail(f"still running 60 s after SIGTERM:\n{log_tail(self.log)}")
        # uvicorn finishes its shutdown, then re-raises the signal it caught: -SIGTERM is clean.
        return self.process.returncode in (0, -signal.SIGTERM) and "shutdown complete" in self.log.read_text()


def start_env(data_dir: Path, **extra: str) -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)
    return clean_env(
        PYTHON=sys.executable,
        PATH=venv_bin + os.pathsep + os.environ.get("PATH", ""),
        REID_DATA_DIR=str(data_dir),
        REID_PORT=str(free_port()),
        REID_HOST="127.0.0.1",
        **extra,
    )


def mounts(service: dict) -> dict[str, str]:
    """{container path: host path or volume name}; docker-compose v1 prints "src:dst:mode"."""
    found = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            found[volume["target"]] = volume.get("source", "")
        else:
            source, target = volume.split(":")[:2]
            found[target] = source
    return found


def dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def metric_names_in(expr: str) -> set[str]:
    without_labels = re.sub(r"\{[^}]*\}", "", expr)
    return set(re.findall(r"\breid_[a-z0-9_]+\b", without_labels))


# ---- docker compose --------------------------------------------------------


def test_compose_file_is_accepted_by_docker_compose():
    result = compose_config(GRAFANA_ADMIN_PASSWORD="not-a-real-secret")
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert {"reid", "prometheus", "grafana"} <= set(services)

    reid = services["reid"]
    assert reid["build"]["context"] == str(ROOT)
    assert any(str(p["target"]) == "8000" and str(p["published"]) == "8000" for p in reid["ports"])
    assert set(mounts(reid)) >= {"/data", "/checkpoints"}
    assert any("/healthz" in part for part in reid["healthcheck"]["test"])
    assert reid["restart"] == "unless-stopped"
    assert reid["environment"]["REID_DEVICE"] == "auto"

    prometheus = services["prometheus"]
    assert mounts(prometheus)["/etc/prometheus/prometheus.yml"] == str(ROOT / "docker" / "prometheus.yml")

    grafana = services["grafana"]
    assert mounts(grafana)["/etc/grafana/provisioning"] == str(PROVISIONING)
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "reid.yml").read_text())["providers"][0]
    assert mounts(grafana)[provider["options"]["path"]] == str(DASHBOARD.parent)


def test_compose_settings_come_from_the_environment():
    result = compose_config(
        GRAFANA_ADMIN_PASSWORD="from-env", REID_DEVICE="cuda", REID_API_KEY="k3y",
        REID_CHECKPOINT="/checkpoints/model.safetensors",
    )
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert services["reid"]["environment"]["REID_DEVICE"] == "cuda"
    assert services["reid"]["environment"]["REID_API_KEY"] == "k3y"
    assert services["reid"]["environment"]["REID_CHECKPOINT"] == "/checkpoints/model.safetensors"
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "from-env"


def test_compose_ships_no_secret_and_starts_without_configuration():
    raw = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert raw["reid"]["environment"]["REID_API_KEY"] == "${REID_API_KEY:-}"
    assert raw["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "${GRAFANA_ADMIN_PASSWORD}"

    # `docker compose up` must work with nothing set.
    result = compose_config()
    assert result.returncode == 0, result.stderr
    grafana = yaml.safe_load(result.stdout)["services"]["grafana"]["environment"]
    assert not grafana.get("GF_SECURITY_ADMIN_PASSWORD")
    assert grafana["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


SCALE = ("postgres", "reid-1", "reid-2", "nginx")
NGINX_CONF = ROOT / "docker" / "nginx" / "nginx.conf"


def test_compose_scale_profile_runs_replicas_over_postgres_behind_nginx():
    result = compose_config("--profile", "scale", POSTGRES_PASSWORD="from-env")
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    for name in SCALE:
        assert services[name]["profiles"] == ["scale"], name
    assert "profiles" not in services["reid"]  # `docker compose up` alone: the single service as before

    postgres = services["postgres"]
    assert postgres["environment"]["POSTGRES_PASSWORD"] == "from-env"
    assert mounts(postgres)["/var/lib/postgresql/data"] == "postgres-data"
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])

    replicas = [services["reid-1"], services["reid-2"]]
    data_volumes = [mounts(r)["/data"] for r in replicas]
    assert len(set(data_volumes)) == 2, "each replica needs its own data dir (index snapshot)"
    for r in replicas:
        env = r["environment"]
        assert env["REID_DATABASE_URL"] == "postgresql://reid@postgres:5432/reid"  # no password in it
        assert env["PGPASSWORD"] == "from-env"
        assert env["REID_CHECKPOINT"] == "/checkpoints/model.safetensors"  # one model for all replicas
        assert mounts(r)["/checkpoints"] == str(ROOT / "checkpoints")
        assert r["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert r["build"]["context"] == str(ROOT)

    nginx = services["nginx"]
    assert mounts(nginx)["/etc/nginx/nginx.conf"] == str(NGINX_CONF)
    assert set(nginx["depends_on"]) == {"reid-1", "reid-2"}
    assert any(str(p["target"]) == "8080" for p in nginx["ports"])

    jobs = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())["scrape_configs"]
    scraped = {t for job in jobs for c in job["static_configs"] for t in c["targets"]}
    assert {"reid-1:8000", "reid-2:8000"} <= scraped


def test_compose_writes_no_database_password():
    raw = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert raw["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"] == "${POSTGRES_PASSWORD}"
    assert raw["x-replica"]["environment"]["PGPASSWORD"] == "${POSTGRES_PASSWORD}"
    assert "password" not in raw["x-replica"]["environment"]["REID_DATABASE_URL"].lower()


def test_nginx_config_passes_nginx_t_and_balances_every_replica(tmp_path):
    upstreams = re.findall(r"^\s*server\s+([\w.-]+):(\d+)", NGINX_CONF.read_text(), re.M)
    replicas = {name for name in yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
                if name.startswith("reid-")}
    assert {host for host, _ in upstreams} == replicas and {port for _, port in upstreams} == {"8000"}
    # nginx resolves upstream names when it checks the config: give the compose service names
    # addresses in a private mount namespace, as the compose network's DNS would.
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n" + "".join(f"127.0.0.1 {name}\n" for name in sorted(replicas)))
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    as_root = [] if os.geteuid() == 0 else ["--map-root-user"]
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", *as_root, "sh", "-c",
         'mount --bind "$1" /etc/hosts && exec "$2" -t -c "$3" -e "$4" -g "pid $5;"', "sh",
         str(hosts), nginx, str(NGINX_CONF), str(tmp_path / "error.log"), str(tmp_path / "nginx.pid")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "syntax is ok" in result.stderr and "test is successful" in result.stderr


# ---- Prometheus and Grafana -------------------------------------------------


def test_prometheus_config_passes_promtool_and_scrapes_the_service():
    result = subprocess.run(
        ["promtool", "check", "config", str(ROOT / "docker" / "prometheus.yml")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())["scrape_configs"]
    reid = next(job for job in jobs if job["job_name"] == "reid")
    assert reid.get("metrics_path", "/metrics") == "/metrics"
    assert reid["static_configs"][0]["targets"] == ["reid:8000"]


def test_grafana_datasource_points_at_the_compose_prometheus():
    sources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"]
    (source,) = sources
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    dashboard = json.loads(DASHBOARD.read_text())
    used = {p["datasource"]["uid"] for p in dashboard["panels"]}
    assert used == {source["uid"]}


def test_dashboard_queries_are_valid_promql(tmp_path):
    queries = dashboard_queries()
    assert len(queries) >= 8
    # promtool parses PromQL in rule files; Grafana's $__rate_interval becomes a literal range.
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": q.replace("$__rate_interval", "5m")}
        for i, q in enumerate(queries)
    ]}]}
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_covers_rate_latency_stages_batches_gallery_errors_admission():
    used = set().union(*(metric_names_in(q) for q in dashboard_queries()))
    assert {
        "reid_request_duration_seconds_count", "reid_request_duration_seconds_bucket",
        "reid_stage_duration_seconds_bucket", "reid_batch_size_bucket",
        "reid_gallery_entries", "reid_gallery_identities", "reid_errors_total",
        "reid_queue_images", "reid_queue_limit", "reid_requests_shed_total", "reid_requests_timed_out_total",
        "reid_requests_cancelled_total", "reid_images_dropped_total",
    } <= used
    assert any("histogram_quantile" in q and "by (le, stage)" in q for q in dashboard_queries())


# ---- Dockerfile ------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


def test_dockerfile_runs_start_sh_as_non_root_with_a_healthcheck():
    instructions = dockerfile_instructions()
    last = {}
    for keyword, args in instructions:
        last[keyword.upper()] = args
    assert json.loads(last["CMD"]) == ["bash", "scripts/start.sh"]
    assert last["USER"] not in ("root", "0")
    keywords = [k.upper() for k, _ in instructions]
    assert keywords.index("USER") < keywords.index("CMD")
    assert "/healthz" in last["HEALTHCHECK"]
    assert "8000" in last["EXPOSE"].split()
    assert {"/data", "/checkpoints"} <= set(json.loads(last["VOLUME"]))
    env = " ".join(args for k, args in instructions if k.upper() == "ENV")
    assert "REID_HOST=0.0.0.0" in env
    assert "REID_DATA_DIR=/data" in env
    installs = [args for k, args in instructions if k.upper() == "RUN" and "pip install" in args]
    assert any("pip install ." in args for args in installs)
    assert not any("[dev]" in args for args in installs)


def test_dockerfile_copies_only_what_exists_and_is_not_dockerignored():
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for keyword, args in dockerfile_instructions():
        if keyword.upper() != "COPY":
            continue
        *sources, _dest = shlex.split(args)
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such file"
            assert source.rstrip("/") not in ignored, f"COPY {source}: excluded by .dockerignore"


# ---- the start command, run as a process ------------------------------------


@pytest.fixture(scope="module")
def checkpoint_service(tmp_path_factory):
    """start.sh serving a checkpoint made by `python -m training init`."""
    tmp = tmp_path_factory.mktemp("start-checkpoint")
    checkpoint = tmp / "init.safetensors"
    made = subprocess.run(
        [sys.executable, "-m", "training", "init", "--arch", "hacnn", "--out", str(checkpoint)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert made.returncode == 0, made.stderr
    service = StartedService(start_env(tmp / "data", REID_CHECKPOINT=str(checkpoint)), tmp / "service.log")
    service.wait_ready()
    yield service
    assert service.stop(), log_tail(service.log)


def test_start_sh_serves_the_given_checkpoint_without_building_the_demo(checkpoint_service):
    gallery = httpx.get(f"{checkpoint_service.url}/gallery", timeout=10).json()
    assert gallery["total"] == 0
    data_dir = Path(checkpoint_service.env["REID_DATA_DIR"])
    assert not (data_dir / "demo").exists()
    page = httpx.get(f"{checkpoint_service.url}/", timeout=10)
    assert page.status_code == 200 and "<title>" in page.text


def healthcheck_commands() -> dict[str, list[str]]:
    """The Dockerfile's and the compose file's health checks, as argument lists."""
    dockerfile = dict((k.upper(), args) for k, args in dockerfile_instructions())["HEALTHCHECK"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["reid"]["healthcheck"]["test"]
    assert compose[0] == "CMD"
    return {"Dockerfile": json.loads(dockerfile.split(" CMD ", 1)[1]), "docker-compose.yml": compose[1:]}


def test_health_checks_pass_on_a_live_service_and_fail_without_one(checkpoint_service):
    for origin, command in healthcheck_commands().items():
        assert command[0] == "python"
        command = [sys.executable, *command[1:]]
        live = subprocess.run(command, env=clean_env(REID_PORT=str(checkpoint_service.port)),
                              capture_output=True, text=True, timeout=30)
        assert live.returncode == 0, f"{origin}: {live.stderr}"
        dead = subprocess.run(command, env=clean_env(REID_PORT=str(free_port())),
                              capture_output=True, text=True, timeout=30)
        assert dead.returncode != 0, f"{origin}: health check passed with nothing listening"


def test_dashboard_queries_use_metrics_the_service_exports(checkpoint_service, tmp_path):
    url = checkpoint_service.url
    # Exercise every path so that labelled series exist: embed, query, a client error.
    crop = tmp_path / "crop.jpg"
    Image.new("RGB", (64, 128), (120, 40, 200)).save(crop)
    assert httpx.post(f"{url}/embed", files={"image": crop.read_bytes()}, timeout=60).status_code == 200
    assert httpx.post(f"{url}/query", files={"image": crop.read_bytes()}, timeout=60).status_code == 200
    rejected = httpx.post(f"{url}/query", files={"image": b"not an image"}, timeout=60)
    assert 400 <= rejected.status_code < 500

    exported: set[str] = set()
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        exported.add(family.name)
        exported.update(sample.name for sample in family.samples)
        if family.type == "histogram":
            exported.update(f"{family.name}_{suffix}" for suffix in ("bucket", "count", "sum"))
        if family.type == "counter":
            exported.add(f"{family.name}_total")

    used = set().union(*(metric_names_in(q) for q in dashboard_queries()))
    assert used - exported == set(), f"dashboard queries metrics the service does not export: {used - exported}"


def test_start_sh_builds_the_demo_once_seeds_the_gallery_and_stops_on_sigterm(tmp_path):
    data_dir = tmp_path / "data"
    # A leftover of an interrupted build must not be taken for a finished demo.
    (data_dir / "demo.partial").mkdir(parents=True)
    (data_dir / "demo.partial" / "model.safetensors").write_bytes(b"half written")
    demo_args = "--identities 16 --epochs 1"

    first = StartedService(start_env(data_dir, REID_DEMO_ARGS=demo_args), tmp_path / "first.log")
    first.wait_ready()
    seeded = httpx.get(f"{first.url}/gallery", timeout=10).json()["total"]
    assert first.stop(), log_tail(first.log)
    assert seeded > 0
    assert (data_dir / "demo" / "model.safetensors").is_file()
    assert not (data_dir / "demo.partial").exists()
    assert "building the demo" in first.log.read_text()

    # The second start reuses the demo and does not enrol it twice.
    second = StartedService(start_env(data_dir, REID_DEMO_ARGS=demo_args), tmp_path / "second.log")
    second.wait_ready()
    again = httpx.get(f"{second.url}/gallery", timeout=10).json()["total"]
    assert second.stop(), log_tail(second.log)
    assert again == seeded
    assert "building the demo" not in second.log.read_text()


def processes_mentioning(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:  # the process ended while we looked
            pass
    return found


def test_sigterm_during_the_demo_build_stops_the_build_too(tmp_path):
    data_dir = tmp_path / "data"
    partial = data_dir / "demo.partial"
    service = StartedService(start_env(data_dir, REID_DEMO_ARGS="--identities 16 --epochs 1"), tmp_path / "log")
    deadline = time.monotonic() + 60
    while not partial.exists() and service.process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert partial.exists(), log_tail(service.log)

    service.process.send_signal(signal.SIGTERM)
    assert service.process.wait(timeout=60) != 0
    assert processes_mentioning(str(partial)) == []
    assert not (data_dir / "demo").exists()
