"""The README's example errors are what the server says today.

A newcomer copies these examples first; an error message in the README that the
server no longer prints (a model list that has grown, a renamed field) teaches them
the wrong thing. Each example is read out of README.md and replayed against the app:
the HTTP 422 example with the test client, the CLI one through `trainyard submit`
against a live server.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from click.testing import CliRunner

from server.cli import main

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _http_422_example() -> tuple[dict, dict]:
    """The body the README posts, and the `fields` it says come back."""
    block = README[README.index("A mistake is a 4xx with one error shape everywhere") :]
    body = json.loads(re.search(r"-d '(\{.*?\})'", block, re.S).group(1))
    start = block.index("# 422 ") + len("# 422 ")
    answer = block[start : block.index("curl", start)]
    text = " ".join(line.lstrip("#").strip() for line in answer.splitlines())
    return body, json.loads(text)["error"]["fields"]


def test_the_http_422_example_matches_the_server(client) -> None:  # type: ignore[no-untyped-def]
    body, fields = _http_422_example()
    resp = client.post("/api/v1/jobs", json=body)
    assert resp.status_code == 422
    assert resp.get_json()["error"]["fields"] == fields


def test_the_cli_invalid_spec_example_matches_the_server(
    live_server: str, api_token: str, tmp_path: Path
) -> None:
    block = README[README.index("$ cat bad.json") :]
    block = block[: block.index("```")]
    spec = block.splitlines()[1]
    expected = block[block.index("error: invalid job spec") :].strip()
    (tmp_path / "bad.json").write_text(spec)
    result = CliRunner().invoke(
        main,
        ["submit", str(tmp_path / "bad.json"), "--url", live_server],
        env={"TRAINYARD_TOKEN": api_token, "COLUMNS": "200"},
    )
    assert result.exit_code == 1
    assert result.output.strip() == expected
