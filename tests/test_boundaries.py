"""Import boundaries: server -> shared <- worker, and the web process never imports torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def imported_modules(package: str) -> set[str]:
    found: set[str] = set()
    for path in (REPO / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


def test_import_direction() -> None:
    assert not imported_modules("shared") & {"server", "worker", "flask", "torch"}
    assert not imported_modules("server") & {"worker", "torch"}
    assert "server" not in imported_modules("worker")
    assert not imported_modules("worker/training") & {"celery", "flask", "sqlalchemy", "shared.db"}


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
