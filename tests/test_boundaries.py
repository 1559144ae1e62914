"""The house rules that keep concepts in one place, checked on the source.

- imports flow server -> shared <- worker; the web side never imports torch; training
  code is plain PyTorch (no Celery, Flask, SQLAlchemy, database or broker); the CLI
  talks to the server over HTTP and uses only `shared`; nothing else in `server`
  imports the CLI;
- job state is written only by shared/state_machine.py, and there only through its
  transition table;
- passwords, roles and active flags are written only by shared/accounts.py, which ends
  the user's sessions with each change;
- nobody imports another module's private names;
- the repository explains itself: nothing cites a design document it does not hold.

Every checker is a plain function over source text, and `test_every_rule_can_fail`
feeds each one a planted violation: a rule that cannot fire is worse than none.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PRODUCT = ("server", "shared", "worker")


# ----------------------------------------------------------------------------- reading


def python_files(*folders: str) -> Iterator[Path]:
    for folder in folders:
        yield from sorted((REPO / folder).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = REPO.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """Full dotted names of every module `source` imports, anywhere in the file
    (function-level and TYPE_CHECKING imports included), relative imports resolved.
    `from pkg import name` counts as `pkg.name` when that is a module, else `pkg`."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                parent = ".".join(base + ([node.module] if node.module else []))
            else:
                parent = node.module or ""
            for alias in node.names:
                child = f"{parent}.{alias.name}"
                found.add(child if _is_module(child) else parent)
    return found


def _within(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


# ----------------------------------------------------------------------------- imports


@dataclass(frozen=True)
class ImportRule:
    why: str
    folder: str  # the rule covers every .py file below this folder...
    forbidden: tuple[str, ...]  # ...which must import no module within these
    allowed: tuple[str, ...] = ()  # except within these
    skip_folder: str | None = None  # ...and files below this folder are not covered

    def covers(self, relpath: str) -> bool:
        inside = relpath.startswith(self.folder + "/")
        return inside and not (self.skip_folder and relpath.startswith(self.skip_folder + "/"))

    def violations(self, relpath: str, source: str) -> list[str]:
        if not self.covers(relpath):
            return []
        module = relpath.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
        names = imported_modules(source, module, relpath.endswith("__init__.py"))
        return sorted(
            f"{relpath} imports {name}"
            for name in names
            if _within(name, self.forbidden) and not _within(name, self.allowed)
        )


IMPORT_RULES = (
    ImportRule(
        "shared/ is what both sides need: no web, worker or torch code in it",
        "shared",
        ("server", "worker", "flask", "torch", "torchvision", "sklearn", "numpy"),
    ),
    ImportRule(
        "the web side never imports the worker or torch (the web process stays small)",
        "server",
        ("worker", "torch", "torchvision", "sklearn"),
    ),
    ImportRule("the worker never imports the web side", "worker", ("server", "flask")),
    ImportRule(
        "training code is plain PyTorch over a spec, a device and a sink",
        "worker/training",
        (
            "celery",
            "kombu",
            "flask",
            "sqlalchemy",
            "redis",
            "shared.db",
            "shared.orm",
            "shared.state_machine",
            "shared.broker",
            "shared.celery_app",
            "worker.runner",
            "worker.tasks",
            "worker.metric_sink",
        ),
    ),  # fmt: skip
    ImportRule(
        "the CLI talks to the server over HTTP and uses only shared/",
        "server/cli",
        ("server", "worker"),
        allowed=("server.cli",),
    ),
    ImportRule(
        "nothing else in server/ imports the CLI",
        "server",
        ("server.cli",),
        skip_folder="server/cli",
    ),
)


def import_violations(rule: ImportRule) -> list[str]:
    found = []
    for path in python_files(rule.folder):
        relpath = path.relative_to(REPO).as_posix()
        found += rule.violations(relpath, path.read_text())
    return found


@pytest.mark.parametrize("rule", IMPORT_RULES, ids=lambda r: r.why)
def test_import_rule(rule: ImportRule) -> None:
    assert import_violations(rule) == [], rule.why


# ----------------------------------------------------------------------------- job state

STATE_MACHINE = "shared/state_machine.py"
# The columns the state machine owns: state, the attempt (fencing token) and the lease.
OWNED_COLUMNS = {"state", "attempt", "max_attempts", "lease_expires_at"}
SQL_UPDATE_JOBS = re.compile(r"\bupdate\s+[\"`]?jobs[\"`]?\s+set\b", re.IGNORECASE)


def _is_job_table(node: ast.AST) -> bool:
    """`Job`, `orm.Job`, `Job.__table__`."""
    if isinstance(node, ast.Attribute) and node.attr == "__table__":
        node = node.value
    return (isinstance(node, ast.Name) and node.id == "Job") or (
        isinstance(node, ast.Attribute) and node.attr == "Job"
    )


def _mentions_job_table(node: ast.AST) -> bool:
    """A chain built on the Job table somewhere, e.g. `session.query(Job).filter(...)`."""
    return any(_is_job_table(sub) for sub in ast.walk(node))


def job_update_violations(relpath: str, source: str) -> list[str]:
    """UPDATEs of the jobs table, and writes to the state columns, outside the state
    machine: `update(Job)`, `session.query(Job)...update(...)`, SQL text, `job.state = x`."""
    if relpath == STATE_MACHINE:
        return []
    found = []
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if name == "update" and node.args and _mentions_job_table(node.args[0]):
                found.append(f"{relpath}:{line}: update(Job)")
            elif (
                name == "update"
                and isinstance(func, ast.Attribute)
                and _mentions_job_table(func.value)
            ):
                found.append(f"{relpath}:{line}: ORM query update of Job")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if SQL_UPDATE_JOBS.search(node.value):
                found.append(f"{relpath}:{line}: SQL UPDATE jobs")
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                owned = isinstance(target, ast.Attribute) and target.attr in OWNED_COLUMNS
                on_self = (
                    isinstance(target, ast.Attribute) and getattr(target.value, "id", "") == "self"
                )
                if owned and not on_self:
                    found.append(f"{relpath}:{line}: assigns .{target.attr}")
    return found


def state_machine_violations(source: str) -> list[str]:
    """Inside the state machine, only `Transition.update` may set `state`: every other
    UPDATE goes through `_write`, which must never be handed a new state."""
    found = []
    tree = ast.parse(source)
    owners: dict[ast.AST, str] = {}
    for func in ast.walk(tree):
        if isinstance(func, ast.FunctionDef):
            for sub in ast.walk(func):
                owners.setdefault(sub, func.name)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = getattr(node.func, "id", getattr(node.func, "attr", None))
        owner = owners.get(node)
        builds_update = name == "update" and node.args and _is_job_table(node.args[0])
        if builds_update and owner not in ("update", "_write"):
            found.append(f"line {node.lineno}: update(Job) in {owner}")
        sets_state = any(k.arg == "state" for k in node.keywords)
        if name in ("_write", "values") and sets_state and owner != "update":
            found.append(f"line {node.lineno}: sets state outside Transition.update")
    return found


def test_job_state_is_written_only_by_the_state_machine() -> None:
    found = []
    for path in python_files(*PRODUCT, "bench", "scripts"):
        found += job_update_violations(path.relative_to(REPO).as_posix(), path.read_text())
    assert found == []


def test_the_state_machine_writes_state_only_through_its_transitions() -> None:
    assert state_machine_violations((REPO / STATE_MACHINE).read_text()) == []


# ----------------------------------------------------------------------------- accounts

ACCOUNTS = "shared/accounts.py"
# A change to any of these must end the user's sessions (shared/accounts.py bumps
# users.session_version): written anywhere else, old sessions would live on.
SESSION_COLUMNS = {"password_hash", "role", "is_active", "session_version"}


def account_write_violations(relpath: str, source: str) -> list[str]:
    """`user.role = ...` and the like outside shared/accounts.py."""
    if relpath == ACCOUNTS:
        return []
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if (
                    isinstance(target, ast.Attribute)
                    and target.attr in SESSION_COLUMNS
                    and getattr(target.value, "id", "") != "self"
                ):
                    found.append(f"{relpath}:{node.lineno}: assigns .{target.attr}")
    return found


def test_passwords_roles_and_disabling_go_through_accounts() -> None:
    found = []
    for path in python_files(*PRODUCT, "bench", "scripts"):
        found += account_write_violations(path.relative_to(REPO).as_posix(), path.read_text())
    assert found == []


def test_the_account_write_rule_can_fail() -> None:
    for source in ("user.role = 'admin'", "u.is_active = False", "user.password_hash = h"):
        assert account_write_violations("server/x.py", source), source
        assert not account_write_violations(ACCOUNTS, source)
    assert not account_write_violations("server/x.py", "self.role = role\nrole = user.role")


# ----------------------------------------------------------------------------- privates


def private_import_violations(relpath: str, source: str) -> list[str]:
    """`from project.module import _private`: the name is the other module's business."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] not in PRODUCT:
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{relpath}:{node.lineno}: {node.module}.{alias.name}")
    return found


def test_no_module_imports_another_modules_private_names() -> None:
    found = []
    for path in python_files(*PRODUCT, "bench"):
        found += private_import_violations(path.relative_to(REPO).as_posix(), path.read_text())
    assert found == []


# ----------------------------------------------------------------------------- citations

# Spelled in two parts so this file does not cite it either.
OUTSIDE_DOCUMENT = "design" + ".md"
TEXT_SUFFIXES = {".py", ".md", ".html", ".js", ".css", ".yml", ".yaml", ".toml", ".sh", ".ini"}


def outside_citation_violations(relpath: str, text: str) -> list[str]:
    return [
        f"{relpath}:{n}" for n, line in enumerate(text.splitlines(), 1) if OUTSIDE_DOCUMENT in line
    ]


def test_the_repository_cites_only_what_it_holds() -> None:
    """Comments and docs cite docs/architecture.md: whoever picks the project up gets
    only the repository."""
    assert (REPO / "docs" / "architecture.md").is_file()
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    found = []
    for name in files:
        path = REPO / name
        if path.suffix in TEXT_SUFFIXES and path.is_file():
            found += outside_citation_violations(name, path.read_text(errors="replace"))
    assert found == []


# ----------------------------------------------------------------------------- each can fail

PLANTED = [
    (IMPORT_RULES[0], "shared/x.py", "from server.app import create_app"),
    (IMPORT_RULES[0], "shared/x.py", "def f():\n    import torch.nn\n"),
    (IMPORT_RULES[1], "server/web/x.py", "from worker.training import train_job"),
    (IMPORT_RULES[1], "server/x.py", "import torch"),
    (IMPORT_RULES[2], "worker/x.py", "from server import submission"),
    (IMPORT_RULES[3], "worker/training/x.py", "from sqlalchemy import select"),
    (IMPORT_RULES[3], "worker/training/x.py", "from shared.db import transaction"),
    (IMPORT_RULES[3], "worker/training/x.py", "from shared import db"),
    (IMPORT_RULES[3], "worker/training/x.py", "import celery"),
    (IMPORT_RULES[4], "server/cli/x.py", "from server.auth import Principal"),
    (IMPORT_RULES[4], "server/cli/local/x.py", "from ...web import pages"),
    (IMPORT_RULES[5], "server/api.py", "from server.cli.display import jobs_table"),
    (IMPORT_RULES[5], "server/web/x.py", "from ..cli import main"),
]


@pytest.mark.parametrize("rule, relpath, source", PLANTED)
def test_every_import_rule_can_fail(rule: ImportRule, relpath: str, source: str) -> None:
    assert rule.violations(relpath, source), (rule.why, source)


def test_import_rules_let_the_allowed_through() -> None:
    assert not IMPORT_RULES[4].violations("server/cli/x.py", "from server.cli.display import x")
    assert not IMPORT_RULES[4].violations("server/cli/x.py", "from shared.settings import S")
    assert not IMPORT_RULES[5].violations("server/cli/x.py", "from server.cli import local")
    assert not IMPORT_RULES[3].violations("worker/training/x.py", "from shared.spec import S")


@pytest.mark.parametrize(
    "source",
    [
        "stmt = update(Job).where(Job.id == 1).values(state='failed')",
        "stmt = sa.update(orm.Job).values(attempt=2)",
        "session.query(Job).filter(Job.id == 1).update({'state': 'queued'})",
        "session.execute(text('UPDATE jobs SET state = :s WHERE id = :i'))",
        "job.state = 'failed'",
        "job.lease_expires_at = None",
    ],
)
def test_the_job_update_rule_can_fail(source: str) -> None:
    assert job_update_violations("server/x.py", source)
    assert not job_update_violations(STATE_MACHINE, source)


def test_the_job_update_rule_lets_reads_and_inserts_through() -> None:
    source = (
        "stmt = select(Job).where(Job.state == 'queued')\n"
        "session.add(Job(kind='train'))\nself.state = 1\nparams.update(x=1)\n"
    )
    assert job_update_violations("server/x.py", source) == []


def test_the_state_machine_rule_can_fail() -> None:
    planted = (
        "def sneaky(session):\n"
        "    session.execute(update(Job).values(state='failed'))\n"
        "def also(session):\n"
        "    session.execute(_write(Job.id == 1, state='queued'))\n"
    )
    found = state_machine_violations(planted)
    assert any(f.startswith("line 2: update(Job)") for f in found)
    assert any(f.startswith("line 4: sets state") for f in found)


def test_the_private_and_citation_rules_can_fail() -> None:
    assert private_import_violations("x.py", "from shared.reconciler import _queue_lists")
    assert not private_import_violations("x.py", "from shared.broker import queue_lists")
    assert outside_citation_violations("x.py", f"# see {OUTSIDE_DOCUMENT} 4.1")


# ----------------------------------------------------------------------------- at run time


def test_web_process_never_imports_torch(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from server.app import create_app\n"
        "from shared import accounts\n"
        "from shared.db import transaction\n"
        "from shared.migrate import upgrade_database\n"
        "from shared.settings import Settings\n"
        f"url = 'sqlite:///{tmp_path}/t.db'\n"
        "upgrade_database(url)\n"
        "with transaction(url) as s:\n"
        "    token = accounts.create_token(s, accounts.create_user(s, 'u')).secret\n"
        "    accounts.create_user(s, 'page-user', password='page-password')\n"
        f"app = create_app(Settings(database_url=url, home='{tmp_path}'), {{'WTF_CSRF_ENABLED': False}})\n"
        "browser = app.test_client()\n"
        "r = browser.post('/login', data={'username': 'page-user', 'password': 'page-password'})\n"
        "assert r.status_code == 302, r.status_code\n"
        "for page in ('/', '/submit', '/workers', '/leaderboard', '/api/docs'):\n"
        "    assert browser.get(page).status_code == 200, page\n"
        "c = app.test_client()\n"
        "c.environ_base['HTTP_AUTHORIZATION'] = 'Bearer ' + token\n"
        "assert c.get('/login').status_code == 200\n"
        "c.get('/api/v1/models'); c.get('/api/v1/datasets'); c.get('/healthz')\n"
        "r = c.post('/api/v1/jobs', json={'kind': 'train', 'dataset': {'name': 'digits'}, 'model': {'name': 'cnn'}})\n"
        "assert r.status_code == 201, r.get_json()\n"
        "job = r.get_json()['id']\n"
        "browser.get(f'/jobs/{job}'); browser.get(f'/compare?ids={job}')\n"
        "import server.cli\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'worker', 'sklearn'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)
