"""docker-compose.yml and the Dockerfile, checked without Docker.

Docker is not available in CI, so these tests read the files and check what would
otherwise only fail on a deployment: commands that are not real `trainyard`
subcommands, a broker without persistence, services that start before what they need.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from server.cli import main
from shared.settings import Settings

REPO = Path(__file__).resolve().parents[1]
SERVICES = {"redis", "postgres", "migrate", "web", "proxy", "worker", "worker-gpu", "reconciler",
            "serve"}  # fmt: skip
ONE_SHOT = {"migrate", "minio-init"}
# Started only with their profile (tests/test_deploy_files.py checks which).
OPTIONAL = {"worker-gpu", "worker-gpu0", "worker-gpu1", "flower", "prometheus", "grafana",
            "minio", "minio-init"}  # fmt: skip
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _argv(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def _check_trainyard_command(args: list[str]) -> str:
    """Parse `trainyard ARGS` as click would; return the subcommand path or raise.

    A group's own options come first; what follows them names a subcommand, unless the
    group runs by itself (`trainyard worker --queues gpu`: invoke_without_command).
    """
    command: click.Command = main
    name, parent, path = "trainyard", None, []
    remaining = list(args)
    while isinstance(command, click.Group):
        ctx = click.Context(command, info_name=name, parent=parent, resilient_parsing=True)
        _, rest, _ = command.make_parser(ctx).parse_args(args=list(remaining))
        if not rest and command.invoke_without_command:
            break
        sub_name, sub, rest = command.resolve_command(ctx, rest)
        assert sub is not None, f"`trainyard {' '.join(args)}`: no subcommand {sub_name!r}"
        path.append(str(sub_name))
        command, name, parent, remaining = sub, str(sub_name), ctx, rest
    # Not resilient this time: unknown options and bad values raise here.
    command.make_context(name, list(remaining), parent=parent)
    return " ".join(path)


def test_services_exist(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) >= SERVICES


def test_redis_persists_and_never_evicts(services: dict[str, dict[str, Any]]) -> None:
    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    argv = _argv(redis["command"])
    assert argv[0] == "redis-server"
    assert argv[argv.index("--appendonly") + 1] == "yes"
    assert argv[argv.index("--maxmemory-policy") + 1] == "noeviction"
    assert any(v.endswith(":/data") for v in redis["volumes"]), "the AOF must outlive the container"


def test_postgres(services: dict[str, dict[str, Any]]) -> None:
    assert services["postgres"]["image"].startswith("postgres:16")
    assert "pg_isready" in _argv(services["postgres"]["healthcheck"]["test"])


def test_every_trainyard_command_is_real(services: dict[str, dict[str, Any]]) -> None:
    used = {}
    for name, service in services.items():
        if "command" not in service:
            continue
        argv = _argv(service["command"])
        if argv[0] == "trainyard":
            used[name] = _check_trainyard_command(argv[1:])
    assert used == {
        "migrate": "db upgrade",
        "web": "web",
        "worker": "worker",
        "worker-gpu": "worker",
        "worker-gpu0": "worker",
        "worker-gpu1": "worker",
        "reconciler": "reconcile",
        "serve": "serve",
    }


def test_the_checker_catches_mistakes() -> None:
    for bad in (["db", "migrate"], ["wrker"], ["worker", "--queue", "cpu"], ["web", "--port", "x"]):
        with pytest.raises((AssertionError, click.UsageError)):
            _check_trainyard_command(bad)


def test_reconciler_healthcheck_watches_the_file_it_touches(
    services: dict[str, dict[str, Any]],
) -> None:
    service = services["reconciler"]
    argv = _argv(service["command"])
    alive = argv[argv.index("--alive-file") + 1]
    test = _argv(service["healthcheck"]["test"])
    assert alive in test[3] and "getmtime" in test[3]
    assert "profiles" not in service, "the reconciler must start by default"


def test_worker_queues(services: dict[str, dict[str, Any]]) -> None:
    def queues(service: str) -> str:
        argv = _argv(services[service]["command"])
        return argv[argv.index("--queues") + 1]

    assert queues("worker") == "cpu"
    assert queues("worker-gpu") == "gpu"


def test_gpu_worker_reserves_gpus_and_is_opt_in(services: dict[str, dict[str, Any]]) -> None:
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"], "must not start on CPU-only hosts"
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    others = [s for n, s in services.items() if n not in OPTIONAL]
    assert not any("profiles" in s for s in others), "core services must start by default"
    assert all("profiles" in services[n] for n in OPTIONAL)


def test_health_checks(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if name in ONE_SHOT:
            assert service.get("restart") == "no", "a one-shot service must not be restarted"
            continue
        check = service.get("healthcheck")
        assert check and check.get("test"), f"{name} has no healthcheck"
        assert _argv(check["test"])[0] in ("CMD", "CMD-SHELL"), name
    assert "/healthz" in " ".join(_argv(services["web"]["healthcheck"]["test"]))


def test_worker_healthcheck_pings_its_own_node_name(services: dict[str, dict[str, Any]]) -> None:
    for name in ("worker", "worker-gpu"):
        argv = _argv(services[name]["command"])
        node = argv[argv.index("--name") + 1]
        prefix, host = node.split("@")
        test = _argv(services[name]["healthcheck"]["test"])
        assert host == "%h" and "socket.gethostname()" in test[3]
        assert test[4] == prefix, f"{name}: the healthcheck pings a different node"
        assert "import torch" not in test[3] and "worker." not in test[3]


def test_depends_on_is_sane(services: dict[str, dict[str, Any]]) -> None:
    graph: dict[str, set[str]] = {}
    for name, service in services.items():
        deps = service.get("depends_on") or {}
        if isinstance(deps, list):
            deps = {d: {"condition": "service_started"} for d in deps}
        graph[name] = set(deps)
        for dep, spec in deps.items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            # An optional dependency: one of the same profile, or one marked not required.
            assert (
                "profiles" not in services[dep]
                or services[dep]["profiles"] == service.get("profiles")
                or spec.get("required") is False
            ), f"{name} depends on optional {dep}"
            condition = spec.get("condition", "service_started")
            assert condition in CONDITIONS, (name, dep, condition)
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy"
            if condition == "service_completed_successfully":
                assert dep in ONE_SHOT, f"{dep} never completes"
            if dep in ONE_SHOT:
                assert condition == "service_completed_successfully", (name, dep)

    # What must be ready before each app service starts.
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("web", "worker", "worker-gpu", "reconciler", "serve"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["redis"]["condition"] == "service_healthy", name

    # No cycles.
    done: set[str] = set()

    def visit(node: str, stack: tuple[str, ...]) -> None:
        assert node not in stack, f"depends_on cycle: {' -> '.join((*stack, node))}"
        if node not in done:
            for dep in graph[node]:
                visit(dep, (*stack, node))
            done.add(node)

    for node in graph:
        visit(node, ())


def test_app_services_share_settings_and_artifacts(compose: dict[str, Any]) -> None:
    services = compose["services"]
    expected = {
        "TRAINYARD_DATABASE_URL": "postgresql+psycopg://trainyard:${POSTGRES_PASSWORD:?set "
        "POSTGRES_PASSWORD in .env (openssl rand -hex 32)}@postgres:5432/trainyard",
        "TRAINYARD_REDIS_URL": "redis://:${REDIS_PASSWORD:?set REDIS_PASSWORD in .env "
        "(openssl rand -hex 32)}@redis:6379/0",
        "TRAINYARD_ARTIFACTS_DIR": "/data/artifacts",
    }
    fields = set(Settings.model_fields)
    for name in ("migrate", "web", "worker", "worker-gpu", "reconciler", "serve"):
        env = services[name]["environment"]
        assert {k: env.get(k) for k in expected} == expected, name
        for key in env:
            # A typo here would be silently ignored by pydantic-settings (extra="ignore").
            # AWS_*: the object store's credentials, read by boto3 itself.
            assert key.startswith("AWS_") or (
                key.startswith("TRAINYARD_") and key.removeprefix("TRAINYARD_").lower() in fields
            ), key
        if name != "migrate":
            assert "artifacts:/data/artifacts" in services[name]["volumes"], name
    assert "artifacts" in compose["volumes"]


def test_web_is_reached_only_through_the_proxy(services: dict[str, dict[str, Any]]) -> None:
    """nginx in front (issue 11, slow clients): the web port is not published, the proxy's
    is, the proxy's config is the repository's, and the web service trusts one proxy."""
    web, proxy = services["web"], services["proxy"]
    assert "ports" not in web, "gunicorn must not be reachable from outside the proxy"
    assert web["environment"]["TRAINYARD_TRUSTED_PROXIES"] == "1"
    assert proxy["image"].startswith("nginx:")
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in proxy["volumes"]
    assert proxy["ports"] == ["8000:80"]
    assert proxy["depends_on"]["web"]["condition"] == "service_healthy"


def test_nginx_config_buffers_requests_and_streams_live_updates() -> None:
    text = (REPO / "deploy" / "nginx.conf").read_text()
    assert "server web:8000;" in text
    # Slow clients wait in nginx: bounded header and body reads.
    assert re.search(r"^\s*client_header_timeout \d+s;", text, re.M)
    assert re.search(r"^\s*client_body_timeout \d+s;", text, re.M)
    # Uploads: the app's limit plus multipart framing, so the app's own 413 answers.
    [limit] = re.findall(r"^\s*client_max_body_size (\d+);", text, re.M)
    assert int(limit) == Settings().max_upload_bytes + (1 << 20)
    root = text[text.index("location / {") :]
    root = root[: root.index("}")]
    assert "proxy_buffering on;" in root and "proxy_request_buffering on;" in root
    stream = text[text.index("location ~ ^/jobs/[0-9]+/stream$ {") :]
    stream = stream[: stream.index("}")]
    assert "proxy_buffering off;" in stream
    # The client's X-Forwarded-For is replaced, never appended to.
    assert "proxy_set_header X-Forwarded-For $remote_addr;" in text


def test_dockerfile() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu$", text, re.M)
    torch_line = text.index('--index-url "${TORCH_INDEX_URL}"')
    assert torch_line < text.index('pip install ".[worker]"'), "CPU torch must be installed first"
    # Everything pyproject.toml needs to build must be copied in.
    for path in ("pyproject.toml", "README.md", "shared", "server", "worker", "migrations"):
        assert re.search(rf"^COPY .*\b{re.escape(path)}\b", text, re.M), path
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".trainyard" in ignored and ".git" in ignored


def test_serve_scales_behind_the_proxy(services: dict[str, dict[str, Any]]) -> None:
    """`--scale serve=N`: no fixed name or host port; nginx routes predictions to it."""
    serve = services["serve"]
    assert "container_name" not in serve and "ports" not in serve
    argv = _argv(serve["command"])
    port = argv[argv.index("--port") + 1]
    assert serve["expose"] == [port]
    assert f"127.0.0.1:{port}/healthz" in " ".join(_argv(serve["healthcheck"]["test"]))
    assert services["proxy"]["depends_on"]["serve"]["condition"] == "service_healthy"
    text = (REPO / "deploy" / "nginx.conf").read_text()
    assert f"server serve:{port};" in text
    route = text[text.index("location ~ ^/api/v1/models/") :]
    assert "proxy_pass http://trainyard_serve;" in route[: route.index("}")]
