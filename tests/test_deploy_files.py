"""The deployment files, checked without Docker or Kubernetes (issue 13, "Production
deployment"): every compose file, the env examples and the Kubernetes manifests.

They only ever run on someone's servers, so what would fail there is checked here: a
command the CLI does not have, a TRAINYARD_* variable the settings ignore (pydantic
drops unknown ones silently), a volume nobody declared, an optional service that starts
by default, a GPU worker without GPUs, a service that nobody restarts or health-checks,
and a KEDA trigger that watches a Redis list no message is ever pushed to. The TLS
settings a worker host uses are replayed against a real redis-server.

tests/test_compose.py holds the checks specific to docker-compose.yml's core services.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared import broker
from shared.celery_app import QUEUES, make_celery, publish_job
from shared.settings import Settings
from tests.test_broker import _free_port
from tests.test_compose import _check_trainyard_command

REPO = Path(__file__).resolve().parents[1]
MAIN = REPO / "docker-compose.yml"
WORKER_HOST = REPO / "deploy" / "worker-host.compose.yml"
EXPOSE = REPO / "deploy" / "expose.compose.yml"
# Complete projects, and the override layered on one of them.
PROJECTS = [MAIN, WORKER_HOST]
OVERRIDES = {EXPOSE: MAIN}
COMPOSE_FILES = [*PROJECTS, *OVERRIDES]
ENV_EXAMPLES = [REPO / ".env.example", REPO / "deploy" / "worker-host.env.example"]
K8S = sorted((REPO / "deploy" / "k8s").glob("*.yaml"))
MAKE_CERTS = REPO / "deploy" / "make-certs.sh"
# What deploy/make-certs.sh writes: bind mounts of these may be absent from a checkout.
GENERATED = {"deploy/tls/ca.crt", "deploy/tls/server.crt", "deploy/tls/server.key"}

# Every optional service and the one profile that starts it.
PROFILES = {
    MAIN: {
        "worker-gpu": ["gpu"],
        "worker-gpu0": ["gpu-per-device"],
        "worker-gpu1": ["gpu-per-device"],
        "flower": ["monitoring"],
        "prometheus": ["monitoring"],
        "grafana": ["monitoring"],
        "minio": ["minio"],
        "minio-init": ["minio"],
    },
    WORKER_HOST: {"worker": ["cpu"]},
}
RESTARTING = {"always", "unless-stopped", "on-failure"}
TOP_LEVEL = {"name", "services", "volumes", "networks", "configs", "secrets"}
SETTING_NAME = re.compile(r"\bTRAINYARD_[A-Z0-9_]*[A-Z0-9]\b")


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _argv(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def _merge(base: Any, override: Any) -> Any:
    """Compose's merge, as far as these files need it: mappings merge key by key, volume
    lists by mount target, other lists and scalars are replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            if key == "volumes" and isinstance(value, list) and isinstance(base.get(key), list):
                by_target = {str(v).split(":")[1]: v for v in base[key]}
                by_target.update({str(v).split(":")[1]: v for v in value})
                merged[key] = list(by_target.values())
            else:
                merged[key] = _merge(base.get(key), value) if key in base else value
        return merged
    return override


def _services(path: Path) -> dict[str, dict[str, Any]]:
    """The services as Compose runs them: an override's merged with its base's."""
    services = _load(path)["services"]
    if path in OVERRIDES:
        base = _load(OVERRIDES[path])["services"]
        return {name: _merge(base[name], services[name]) for name in services}
    return services


def _setting_env_names() -> set[str]:
    """The environment variables Settings reads: its prefix plus each field's name
    (pydantic-settings matches them case-insensitively), or a field's own alias."""
    config = Settings.model_config
    assert not config.get("case_sensitive"), "names below are compared upper-cased"
    prefix = config.get("env_prefix", "")
    names = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias or field.alias
        names.add((alias if isinstance(alias, str) else prefix + name).upper())
    return names


def _unknown_settings(text: str) -> set[str]:
    return set(SETTING_NAME.findall(text)) - _setting_env_names()


def _env_assignments(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of an env example, commented-out examples included."""
    found = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^#?\s?([A-Z][A-Z0-9_]*)=(.*)$", line.strip())
        if match:
            found[match.group(1)] = match.group(2)
    return found


def _k8s_documents() -> list[dict[str, Any]]:
    return [doc for path in K8S for doc in yaml.safe_load_all(path.read_text()) if doc]


def _k8s(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in _k8s_documents() if doc["kind"] == kind]


def _containers() -> list[dict[str, Any]]:
    return [c for d in _k8s("Deployment") for c in d["spec"]["template"]["spec"]["containers"]]


def _queues_of(argv: list[str]) -> list[str]:
    return argv[argv.index("--queues") + 1].split(",")


# ----------------------------------------------------------------------------- files


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=_rel)
def test_compose_files_load(path: Path) -> None:
    data = _load(path)
    assert data["services"], path
    assert {k for k in data if not k.startswith("x-")} <= TOP_LEVEL
    for name in data["services"]:
        assert re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name), name
        if path in OVERRIDES:
            assert name in _load(OVERRIDES[path])["services"], f"{name}: not in the base file"


def test_the_expected_files_exist() -> None:
    assert K8S == [
        REPO / "deploy" / "k8s" / "keda-scaledobject.yaml",
        REPO / "deploy" / "k8s" / "worker-deployment.yaml",
    ]
    for path in (*ENV_EXAMPLES, MAKE_CERTS, REPO / "deploy" / "postgres" / "pg_hba.conf"):
        assert path.is_file(), path
    # Secrets made from the examples never reach git.
    ignored = subprocess.run(
        ["git", "check-ignore", ".env", "deploy/worker-host.env", "deploy/tls/server.key"],
        cwd=REPO, capture_output=True, text=True, check=False,
    ).stdout.split()  # fmt: skip
    assert ignored == [".env", "deploy/worker-host.env", "deploy/tls/server.key"]
    # ...nor a build context (`docker compose build` sends the whole directory).
    assert {".env", "deploy"} <= set((REPO / ".dockerignore").read_text().split())


# ----------------------------------------------------------------------------- commands


def test_every_trainyard_command_is_real() -> None:
    """Every `trainyard ...` a container runs parses as the CLI would parse it."""
    used = []
    for path in COMPOSE_FILES:
        for name, service in _load(path)["services"].items():
            argv = _argv(service.get("command") or [])
            if argv[:1] == ["trainyard"]:
                used.append((_rel(path), name, _check_trainyard_command(argv[1:])))
    for container in _containers():
        argv = container["command"]
        assert argv[0] == "trainyard", container["name"]
        used.append(("k8s", container["name"], _check_trainyard_command(argv[1:])))
    assert {sub for *_, sub in used} == {"db upgrade", "web", "worker", "reconcile", "serve"}
    assert len([u for u in used if u[0] == _rel(WORKER_HOST)]) == 2


def test_other_commands_run_what_their_image_has() -> None:
    services = _load(MAIN)["services"]
    assert _argv(services["redis"]["command"])[0] == "redis-server"
    flower = _argv(services["flower"]["command"])
    assert services["flower"]["image"].startswith("mher/flower:")
    assert flower[:2] == ["sh", "-c"] and flower[2].endswith("exec celery flower --port=5555")
    minio = services["minio"]["entrypoint"]
    assert minio[:2] == ["sh", "-c"] and "exec minio server /data" in minio[2]
    init = services["minio-init"]["entrypoint"]
    assert init[:2] == ["sh", "-ec"] and 'mc mb --ignore-existing "local/$$bucket"' in init[2]
    # Both MinIO services run the same (pinned) image: mc comes with the server.
    assert services["minio"]["image"] == services["minio-init"]["image"]
    assert not services["minio"]["image"].endswith(":latest")
    expose = _services(EXPOSE)
    assert _argv(expose["postgres"]["command"])[0] == "postgres"


# ----------------------------------------------------------------------------- settings


def test_the_settings_checker_catches_a_typo() -> None:
    assert _unknown_settings("TRAINYARD_REDIS_URL=x TRAINYARD_REDIS_URI=y") == {
        "TRAINYARD_REDIS_URI"
    }
    assert "TRAINYARD_ARTIFACTS_URL" in _setting_env_names()
    assert "TRAINYARD_S3_ENDPOINT_URL" in _setting_env_names()


@pytest.mark.parametrize("path", [*COMPOSE_FILES, *ENV_EXAMPLES, *K8S, MAKE_CERTS], ids=_rel)
def test_every_trainyard_variable_is_a_setting(path: Path) -> None:
    """Anywhere in these files, comments included: a name the settings do not know is
    silently ignored at run time."""
    assert not _unknown_settings(path.read_text()), path


@pytest.mark.parametrize("path", ENV_EXAMPLES, ids=_rel)
def test_the_env_examples_values_are_accepted(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each example value (commented-out ones too) passes the settings' own checks."""
    checked = 0
    for key, value in _env_assignments(path).items():
        if not key.startswith("TRAINYARD_") or not value:
            continue
        monkeypatch.setenv(key, value)
        Settings()
        monkeypatch.delenv(key)
        checked += 1
    assert checked >= 3


@pytest.mark.parametrize("path", PROJECTS, ids=_rel)
def test_app_services_get_only_known_variables(path: Path) -> None:
    for name, service in _load(path)["services"].items():
        image = str(service.get("image", ""))
        if not image.startswith(("trainyard", "${WORKER")):
            continue
        for key in service["environment"]:
            assert key.startswith(("TRAINYARD_", "AWS_")), f"{name}: {key}"
        # Optional ones are passed through (no value): an unset one is absent, never "".
        for key in ("TRAINYARD_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert key in service["environment"] and service["environment"][key] is None


# ----------------------------------------------------------------------------- volumes


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=_rel)
def test_volumes_are_declared_and_bind_mounts_exist(path: Path) -> None:
    project = OVERRIDES.get(path, path)
    declared = set(_load(project).get("volumes") or {})
    used = set()
    for name, service in _load(path)["services"].items():
        for volume in service.get("volumes") or []:
            source = str(volume).split(":")[0]
            if source.startswith((".", "/")):
                # Relative to the project directory: the first file's.
                target = (project.parent / source).resolve()
                rel = str(target.relative_to(REPO))
                assert target.exists() or rel in GENERATED, f"{name}: {source} missing"
            else:
                assert source in declared, f"{name}: volume {source} not declared"
                used.add(source)
    if path in PROJECTS:
        assert declared == used, "declared but unused volumes"


# ----------------------------------------------------------------------------- profiles


@pytest.mark.parametrize("path", PROJECTS, ids=_rel)
def test_profiles(path: Path) -> None:
    services = _load(path)["services"]
    actual = {name: s["profiles"] for name, s in services.items() if "profiles" in s}
    assert actual == PROFILES[path]
    for name, service in services.items():
        mine = set(service.get("profiles") or [])
        for dep, spec in (service.get("depends_on") or {}).items():
            theirs = set(services[dep].get("profiles") or [])
            # A dependency that may be off must be marked optional, or `docker compose
            # up` refuses to start without its profile.
            assert not theirs or theirs <= mine or spec.get("required") is False, (name, dep)


def test_workers_wait_for_the_bucket_only_where_minio_runs() -> None:
    services = _load(MAIN)["services"]
    for name in ("web", "worker", "worker-gpu", "worker-gpu0", "worker-gpu1"):
        dep = services[name]["depends_on"]["minio-init"]
        assert dep == {"condition": "service_completed_successfully", "required": False}
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert services["minio-init"]["restart"] == "no"


# ----------------------------------------------------------------------------- GPUs


@pytest.mark.parametrize("path", PROJECTS, ids=_rel)
def test_gpu_workers_reserve_nvidia_gpus(path: Path) -> None:
    device_ids: list[str] = []
    gpu_workers = 0
    for name, service in _load(path)["services"].items():
        argv = _argv(service.get("command") or [])
        if argv[:2] != ["trainyard", "worker"]:
            continue
        devices = (
            service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
        )
        if _queues_of(argv) != ["gpu"]:
            assert not devices, f"{name}: a CPU worker holds GPUs"
            continue
        gpu_workers += 1
        [device] = devices
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"], name
        # The container sees only what it reserves, so `--gpus all` means exactly that.
        assert argv[argv.index("--gpus") + 1] == "all", name
        if "device_ids" in device:
            assert "count" not in device, name
            device_ids += device["device_ids"]
        else:
            assert device["count"] == "all", name
    assert gpu_workers >= 1
    assert len(device_ids) == len(set(device_ids)), "two services reserve one GPU"


def test_kubernetes_gpu_workers_request_a_gpu() -> None:
    for container in _containers():
        if _queues_of(container["command"]) == ["gpu"]:
            assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


# ----------------------------------------------------------------------------- health


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=_rel)
def test_every_long_running_service_is_health_checked_and_restarted(path: Path) -> None:
    for name, service in _services(path).items():
        if service.get("restart") == "no":
            assert "healthcheck" not in service, f"{name}: one-shot with a healthcheck"
            continue
        assert service.get("restart") in RESTARTING, f"{name}: no restart policy"
        test = _argv(service["healthcheck"]["test"])
        assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, name


@pytest.mark.parametrize("path", PROJECTS, ids=_rel)
def test_each_worker_healthcheck_pings_its_own_node(path: Path) -> None:
    for name, service in _load(path)["services"].items():
        argv = _argv(service.get("command") or [])
        if argv[:2] != ["trainyard", "worker"]:
            continue
        prefix, host = argv[argv.index("--name") + 1].split("@")
        test = _argv(service["healthcheck"]["test"])
        assert host == "%h" and "socket.gethostname()" in test[3], name
        assert test[4] == prefix, f"{name}: the healthcheck pings another node"
        assert "import torch" not in test[3]
        assert service.get("stop_grace_period"), name


def test_kubernetes_workers_probe_their_own_node() -> None:
    for container in _containers():
        prefix = container["command"][container["command"].index("--name") + 1].split("@")[0]
        probe = container["livenessProbe"]["exec"]["command"]
        assert probe[:2] == ["python", "-c"] and "socket.gethostname()" in probe[2]
        assert probe[3] == prefix


# ----------------------------------------------------------------------------- services


def test_cpu_workers_scale() -> None:
    """`--scale worker=N` needs a service with no fixed name or host port."""
    for path in PROJECTS:
        worker = _load(path)["services"]["worker"]
        assert "container_name" not in worker and "ports" not in worker
        assert _argv(worker["command"])[-1] == "cpu@%h"


def test_passwords_come_from_the_env_file() -> None:
    services = _load(MAIN)["services"]
    env = services["web"]["environment"]
    assert "${POSTGRES_PASSWORD:?" in env["TRAINYARD_DATABASE_URL"]
    assert env["TRAINYARD_REDIS_URL"].startswith("redis://:${REDIS_PASSWORD:?")
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith(
        "${POSTGRES_PASSWORD:?"
    )
    redis = _argv(services["redis"]["command"])
    assert redis[redis.index("--requirepass") + 1].startswith("${REDIS_PASSWORD:?")
    assert services["redis"]["environment"]["REDISCLI_AUTH"].startswith("${REDIS_PASSWORD:?")
    assert "grep -q PONG" in _argv(services["redis"]["healthcheck"]["test"])[1]

    # Compose interpolates the whole file before it looks at profiles: a `${VAR:?}` in
    # an optional service would make every `docker compose up` fail without VAR. Only
    # variables the core services require anyway may be required there.
    def required(optional: bool) -> set[str]:
        chosen = {n: s for n, s in services.items() if ("profiles" in s) == optional}
        return set(re.findall(r"\$\{(\w+):\?", yaml.safe_dump(chosen)))

    assert required(optional=False) == {
        "POSTGRES_PASSWORD",
        "REDIS_PASSWORD",
        "TRAINYARD_SECRET_KEY",
    }
    assert required(optional=True) <= required(optional=False)


def test_flower_watches_the_same_broker_behind_a_password() -> None:
    services = _load(MAIN)["services"]
    flower = services["flower"]
    broker_url = services["worker"]["environment"]["TRAINYARD_REDIS_URL"]
    assert flower["environment"]["CELERY_BROKER_URL"] == broker_url
    assert 'test -n "$$FLOWER_BASIC_AUTH"' in flower["command"][2]
    assert flower["ports"] == ["127.0.0.1:5555:5555"]
    assert "/healthcheck" in " ".join(_argv(flower["healthcheck"]["test"]))


def test_minio_never_starts_with_default_credentials() -> None:
    minio = _load(MAIN)["services"]["minio"]
    assert 'test -n "$$MINIO_ROOT_USER" -a -n "$$MINIO_ROOT_PASSWORD"' in minio["entrypoint"][2]
    assert all(p.startswith("127.0.0.1:") for p in minio["ports"])


def _shell_scripts() -> dict[str, tuple[list[str], str]]:
    """The inline shell scripts of the main compose file: service -> (argv prefix, script
    as the container's shell gets it, after Compose turned `$$` into `$`)."""
    services = _load(MAIN)["services"]
    found = {}
    for name, key in (("flower", "command"), ("minio", "entrypoint"), ("minio-init", "entrypoint")):
        argv = services[name][key]
        # A single `$` would be Compose's to interpolate, from the host's environment.
        assert not re.search(r"(?<!\$)\$(?!\$)", argv[2].replace("$$", "")), name
        found[name] = (argv[:2], argv[2].replace("$$", "$"))
    return found


def _run_script(name: str, env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    """Run a service's script with stand-ins for the programs it calls, which log
    their arguments to calls.log."""
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    for program in ("celery", "minio", "mc"):
        stub = stubs / program
        stub.write_text(f'#!/bin/sh\necho "{program} $*" >> "{tmp_path}/calls.log"\n')
        stub.chmod(0o755)
    prefix, script = _shell_scripts()[name]
    return subprocess.run(
        [*prefix, script],
        env={"PATH": f"{stubs}:/usr/bin:/bin", **env},
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def test_the_optional_services_refuse_to_start_without_their_secrets(tmp_path: Path) -> None:
    for name, env, program in (
        ("flower", {"FLOWER_BASIC_AUTH": "admin:pw"}, "celery flower --port=5555"),
        (
            "minio",
            {"MINIO_ROOT_USER": "root", "MINIO_ROOT_PASSWORD": "0123456789"},
            "minio server /data --address :9000 --console-address :9001 --certs-dir /certs",
        ),
    ):
        (tmp_path / "calls.log").unlink(missing_ok=True)
        refused = _run_script(name, {}, tmp_path)
        assert refused.returncode == 1 and "in .env" in refused.stderr, name
        assert not (tmp_path / "calls.log").exists(), f"{name} started anyway"
        started = _run_script(name, env, tmp_path)
        assert started.returncode == 0, started.stderr
        assert (tmp_path / "calls.log").read_text() == program + "\n"


def test_minio_init_makes_the_bucket_and_a_user_for_it_alone(tmp_path: Path) -> None:
    env = {
        "MINIO_ROOT_USER": "root",
        "MINIO_ROOT_PASSWORD": "root-password",
        "TRAINYARD_ARTIFACTS_URL": "s3://team-bucket/trainyard/artifacts",
        "TRAINYARD_S3_ENDPOINT_URL": "https://minio:9000",
        "AWS_ACCESS_KEY_ID": "trainyard",
        "AWS_SECRET_ACCESS_KEY": "trainyard-secret",
    }
    done = _run_script("minio-init", env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "bucket team-bucket ready for user trainyard" in done.stdout
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert calls == [
        "mc alias set local https://minio:9000 root root-password",
        "mc mb --ignore-existing local/team-bucket",
        "mc admin policy create local trainyard /tmp/trainyard-policy.json",
        "mc admin user add local trainyard trainyard-secret",
        "mc admin policy attach local trainyard --user trainyard",
    ]
    written = Path("/tmp/trainyard-policy.json")  # the container's /tmp, here the host's
    policy = json.loads(written.read_text())
    written.unlink()
    resources = {r for statement in policy["Statement"] for r in statement["Resource"]}
    assert resources == {"arn:aws:s3:::team-bucket", "arn:aws:s3:::team-bucket/*"}
    assert all(a.startswith("s3:") for st in policy["Statement"] for a in st["Action"])

    for missing in ("TRAINYARD_ARTIFACTS_URL", "AWS_SECRET_ACCESS_KEY"):
        refused = _run_script("minio-init", {**env, missing: ""}, tmp_path)
        assert refused.returncode == 1 and missing in refused.stderr
    not_a_bucket = _run_script("minio-init", {**env, "TRAINYARD_ARTIFACTS_URL": "/data"}, tmp_path)
    assert not_a_bucket.returncode == 1


def test_a_worker_host_shares_only_urls() -> None:
    data = _load(WORKER_HOST)
    assert set(data["services"]) == {"worker-gpu", "worker"}
    for name, service in data["services"].items():
        env = service["environment"]
        for key in ("TRAINYARD_DATABASE_URL", "TRAINYARD_REDIS_URL", "TRAINYARD_ARTIFACTS_URL"):
            assert env[key] == "${" + key + ":?" + env[key].split(":?", 1)[1], (name, key)
        assert "./tls/ca.crt:/tls/ca.crt:ro" in service["volumes"]
        assert service["build"]["context"] == "..", "relative to deploy/"
    example = _env_assignments(REPO / "deploy" / "worker-host.env.example")
    assert example["TRAINYARD_REDIS_URL"].startswith("rediss://")
    assert "sslmode=verify-full" in example["TRAINYARD_DATABASE_URL"]
    assert example["TRAINYARD_ARTIFACTS_URL"].startswith("s3://")


def test_the_main_host_opens_only_tls_ports() -> None:
    base, exposed = _load(MAIN)["services"], _services(EXPOSE)
    published = {p for s in _load(EXPOSE)["services"].values() for p in s.get("ports", [])}
    assert published == {"6380:6380", "5432:5432", "9000:9000"}
    # The override replaces Redis's command: persistence and the password must stay.
    redis = _argv(exposed["redis"]["command"])
    assert redis[: len(_argv(base["redis"]["command"]))] == _argv(base["redis"]["command"])
    assert redis[redis.index("--tls-port") + 1] == "6380"
    postgres = _argv(exposed["postgres"]["command"])
    assert "ssl=on" in postgres and "hba_file=/etc/trainyard/pg_hba.conf" in postgres
    # The CA's key is never mounted into a container.
    mounts = [str(v) for s in _load(EXPOSE)["services"].values() for v in s.get("volumes", [])]
    assert not any("ca.key" in m or m.startswith("./deploy/tls:") for m in mounts)


def test_pg_hba_requires_tls_from_outside() -> None:
    rules = [
        line.split()
        for line in (REPO / "deploy" / "postgres" / "pg_hba.conf").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[-1] == ["hostssl", "all", "all", "all", "scram-sha-256"]
    for rule in rules:
        if rule[0] != "local":
            assert rule[-1] == "scram-sha-256", rule
            assert rule[3] in ("127.0.0.1/32", "::1/128", "samenet") or rule[0] == "hostssl"


def test_the_readme_compose_commands_name_real_files_profiles_and_services() -> None:
    """Every `docker compose ...` line in the README's shell blocks: its -f files exist,
    the profiles, services and --scale targets it names are theirs, and a `trainyard`
    command it runs in a container is one the CLI has."""
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"^ *```sh\n(.*?)^ *```", readme, re.M | re.S)
    lines = [line for block in blocks for line in block.splitlines() if "docker compose" in line]
    for line in lines:
        argv = shlex.split(line[line.index("docker compose") :], comments=True)
        argv = argv[: argv.index("|")] if "|" in argv else argv
        files = [REPO / argv[i + 1] for i, a in enumerate(argv) if a == "-f"] or [MAIN]
        services: dict[str, dict[str, Any]] = {}
        for path in files:
            assert path.is_file(), line
            services.update(_services(path))
        profiles = {p for s in services.values() for p in s.get("profiles", [])}
        for i, arg in enumerate(argv):
            if arg == "--profile":
                assert argv[i + 1] in profiles, line
            if arg == "--scale":
                assert argv[i + 1].split("=")[0] in services, line
        for verb in {"exec", "run", "logs"} & set(argv):
            after = argv[argv.index(verb) + 1 :]
            service = next(a for a in after if not a.startswith("-"))
            assert service in services, line
            command = after[after.index(service) + 1 :]
            if command[:1] == ["trainyard"]:
                _check_trainyard_command(command[1:])
    assert len(lines) >= 18


# ----------------------------------------------------------------------------- KEDA


def test_keda_watches_the_list_its_workers_consume() -> None:
    deployments = {d["metadata"]["name"]: d for d in _k8s("Deployment")}
    auths = {a["metadata"]["name"]: a for a in _k8s("TriggerAuthentication")}
    [scaled] = _k8s("ScaledObject")
    target = deployments[scaled["spec"]["scaleTargetRef"]["name"]]
    [container] = target["spec"]["template"]["spec"]["containers"]
    [queue] = _queues_of(container["command"])
    triggers = {t["name"]: t for t in scaled["spec"]["triggers"]}
    for trigger in triggers.values():
        assert trigger["authenticationRef"]["name"] in auths
    waiting = triggers["waiting"]
    assert waiting["type"] == "redis"
    assert waiting["metadata"]["listName"] == queue == broker.queue_lists(queue)[0]
    assert queue in QUEUES
    running = triggers["running"]
    assert running["type"] == "metrics-api"
    assert running["metadata"]["url"].endswith("/api/v1/queues")
    assert running["metadata"]["valueLocation"] == f'queues.#(name=="{queue}").running_jobs'
    modifiers = scaled["spec"]["advanced"]["scalingModifiers"]
    assert set(re.findall(r"[a-z_]+", modifiers["formula"])) == set(triggers)
    parameters = {p["parameter"] for p in auths["trainyard-redis"]["spec"]["secretTargetRef"]}
    assert parameters == {"password", "tls", "ca"}


def test_the_queues_api_has_the_running_count_keda_reads(client) -> None:  # type: ignore[no-untyped-def]
    body = client.get("/api/v1/queues").get_json()
    for queue in QUEUES:
        [row] = [q for q in body["queues"] if q["name"] == queue]
        assert isinstance(row["running_jobs"], int) and isinstance(row["messages"], int)


# ----------------------------------------------------------------------------- TLS, live


def _make_certs(tls: Path, *more: str) -> None:
    subprocess.run(
        [str(MAKE_CERTS), "main.example.org", "10.0.0.5", *more],
        env={"PATH": "/usr/bin:/bin", "TLS_DIR": str(tls), "TLS_DAYS": "2"},
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip


def _pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


# The "worker host": a network namespace joined by a veth pair whose two ends have
# /32 addresses, so it is not on any network the server is on (pg_hba.conf's samenet).
MAIN_IP, OUTSIDE_IP = "198.18.77.1", "198.18.77.2"


@contextlib.contextmanager
def _outside_host() -> Iterator[list[str]]:
    """A network namespace at OUTSIDE_IP that reaches MAIN_IP; yields the argv prefix
    that runs a command in it."""
    tag = f"ty{os.getpid() % 100000}"
    ns, here, there = f"{tag}ns", f"{tag}h", f"{tag}n"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)

    ip("netns", "add", ns)
    try:
        ip("link", "add", here, "type", "veth", "peer", "name", there)
        ip("link", "set", there, "netns", ns)
        ip("addr", "add", f"{MAIN_IP}/32", "dev", here)
        ip("link", "set", here, "up")
        ip("route", "add", f"{OUTSIDE_IP}/32", "dev", here)
        ip("-n", ns, "addr", "add", f"{OUTSIDE_IP}/32", "dev", there)
        ip("-n", ns, "link", "set", there, "up")
        ip("-n", ns, "route", "add", f"{MAIN_IP}/32", "dev", there)
        yield ["ip", "netns", "exec", ns]
    finally:
        subprocess.run(["ip", "link", "del", here], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


@pytest.mark.skipif(
    _pg_bin() is None
    or shutil.which("runuser") is None
    or shutil.which("openssl") is None
    or shutil.which("ip") is None,
    reason="needs PostgreSQL's server binaries, runuser, ip and openssl",
)
def test_a_worker_host_reaches_the_exposed_postgres_over_tls() -> None:
    """PostgreSQL started with the override's TLS options, deploy/make-certs.sh's key
    (PostgreSQL checks its permissions) and deploy/postgres/pg_hba.conf: the worker
    host's example URL connects over TLS with the certificate verified, a wrong
    password is refused, and from another network nothing gets in without TLS."""
    import pwd
    import tempfile

    import sqlalchemy as sa

    if os.geteuid() != 0:
        pytest.skip("runs PostgreSQL as the postgres user and makes a netns: needs root")
    bin_dir = _pg_bin()
    assert bin_dir is not None
    user = pwd.getpwnam("postgres")
    password = "s3cret-for-the-test"

    def as_postgres(program: str, *args: str) -> list[str]:
        # From "/": the working directory (a clone under a 0700 temp directory) may be
        # one the postgres user cannot enter.
        return ["runuser", "-u", "postgres", "--", "env", "-C", "/", str(bin_dir / program), *args]

    with contextlib.ExitStack() as stack:
        # Not under pytest's tmp_path: the postgres user cannot enter root's directories.
        root = Path(tempfile.mkdtemp(prefix="trainyard-pg-tls-"))
        stack.callback(shutil.rmtree, root, ignore_errors=True)
        outside = stack.enter_context(_outside_host())
        root.chmod(0o755)
        _make_certs(root / "tls", MAIN_IP)
        (root / "pw").write_text(password + "\n")
        # A copy the postgres user can read: a fresh clone lives in a 0700 directory.
        shutil.copy(REPO / "deploy" / "postgres" / "pg_hba.conf", root / "pg_hba.conf")
        for path in (root, *root.rglob("*")):
            os.chown(path, user.pw_uid, user.pw_gid)
        data = root / "data"
        subprocess.run(
            as_postgres("initdb", "-D", str(data), "-U", "trainyard", "--pwfile",
                        str(root / "pw"), "--auth", "scram-sha-256"),
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        port = _free_port()
        hba = str(root / "pg_hba.conf")
        options = [
            arg.replace("/tls/", f"{root}/tls/").replace("/etc/trainyard/pg_hba.conf", hba)
            for arg in _argv(_load(EXPOSE)["services"]["postgres"]["command"])[1:]
        ]
        proc = subprocess.Popen(
            as_postgres("postgres", "-D", str(data), "-c", f"port={port}",
                        "-c", f"listen_addresses=127.0.0.1,{MAIN_IP}",
                        "-c", f"unix_socket_directories={root}", *options),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        stack.callback(proc.wait, 30)
        stack.callback(proc.terminate)
        socket_args = ["-h", str(root), "-p", str(port)]
        deadline = time.monotonic() + 30
        while subprocess.run(
            as_postgres("pg_isready", *socket_args), capture_output=True
        ).returncode:
            if proc.poll() is not None:
                pytest.fail(f"postgres exited: {proc.stderr.read().decode()}")
            assert time.monotonic() < deadline, "postgres did not start"
            time.sleep(0.2)
        # What the image's POSTGRES_DB does, over the socket pg_hba.conf trusts.
        subprocess.run(
            as_postgres("createdb", *socket_args, "-U", "trainyard", "trainyard"),
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip

        example = _env_assignments(REPO / "deploy" / "worker-host.env.example")
        url = (
            example["TRAINYARD_DATABASE_URL"]
            .replace("POSTGRES_PASSWORD", password)
            .replace("main.example.org:5432", f"127.0.0.1:{port}")
            .replace("/tls/ca.crt", f"{root}/tls/ca.crt")
        )
        Settings(database_url=url)
        engine = sa.create_engine(url)
        with engine.connect() as conn:
            query = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
            assert conn.execute(sa.text(query)).scalar_one() is True
        engine.dispose()
        wrong = sa.create_engine(url.replace(password, "wrong"))
        with pytest.raises(sa.exc.OperationalError, match="password authentication failed"):
            wrong.connect()
        wrong.dispose()

        # From the other network: the same URL gets in, without TLS nothing does.
        def connect_from_outside(sslmode: str) -> subprocess.CompletedProcess[str]:
            conninfo = (
                f"host={MAIN_IP} port={port} dbname=trainyard user=trainyard "
                f"password={password} sslmode={sslmode} sslrootcert={root}/tls/ca.crt "
                "connect_timeout=10"
            )
            code = "import psycopg, sys; psycopg.connect(sys.argv[1]).close()"
            return subprocess.run(
                [*outside, sys.executable, "-c", code, conninfo],
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip

        assert connect_from_outside("verify-full").returncode == 0
        refused = connect_from_outside("disable")
        assert refused.returncode != 0
        assert f'no pg_hba.conf entry for host "{OUTSIDE_IP}"' in refused.stderr
        assert "no encryption" in refused.stderr


@pytest.mark.skipif(
    shutil.which("redis-server") is None or shutil.which("openssl") is None,
    reason="needs redis-server (built with TLS) and openssl",
)
def test_a_worker_host_reaches_the_exposed_redis_over_tls(tmp_path: Path) -> None:
    """deploy/make-certs.sh's certificates, Redis run with the override's own arguments,
    and the worker host's example URL: the worker's broker connection verifies the
    certificate, needs the password, and its jobs land in the list KEDA watches."""
    tls = tmp_path / "tls"
    _make_certs(tls)
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(tls / "ca.crt"), str(tls / "server.crt")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stderr
    assert oct((tls / "server.key").stat().st_mode & 0o777) == "0o600"

    password = "0123456789abcdef"
    port, tls_port = _free_port(), _free_port()
    argv = []
    for arg in _argv(_load(EXPOSE)["services"]["redis"]["command"]):
        arg = arg.replace("/tls/", f"{tls}/")
        argv.append(password if arg.startswith("${REDIS_PASSWORD") else arg)
    argv[argv.index("--tls-port") + 1] = str(tls_port)
    argv += ["--bind", "127.0.0.1", "--port", str(port), "--dir", str(tmp_path)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = _env_assignments(REPO / "deploy" / "worker-host.env.example")["TRAINYARD_REDIS_URL"]
        url = (
            url.replace("REDIS_PASSWORD", password)
            .replace("main.example.org:6380", f"127.0.0.1:{tls_port}")
            .replace("/tls/ca.crt", str(tls / "ca.crt"))
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                broker.ping(url)
                break
            except Exception:
                assert proc.poll() is None, "redis-server exited (no TLS in this build?)"
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        with pytest.raises(Exception, match="(?i)auth|password"):
            broker.ping(url.replace(password, "wrong-password"))
        # A CA the server's certificate does not chain to: refused.
        with pytest.raises(Exception, match="(?i)certificate"):
            broker.ping(url.replace(str(tls / "ca.crt"), str(tls / "server.crt")))

        settings = Settings(home=tmp_path / "home", redis_url=url)
        celery = make_celery(settings)
        try:
            publish_job(celery, 7, "train", "gpu")
        finally:
            celery.close()
        client = broker.redis_client(url)
        try:
            [keda] = _k8s("ScaledObject")
            [waiting] = [t for t in keda["spec"]["triggers"] if t["type"] == "redis"]
            assert client.llen(waiting["metadata"]["listName"]) == 1
            assert broker.queue_depths(client, QUEUES) == {"gpu": 1, "cpu": 0}
        finally:
            client.close()
    finally:
        proc.terminate()
        proc.wait(10)
