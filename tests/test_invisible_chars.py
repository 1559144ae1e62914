"""Visual spoofing (issue 11, "Leaks"): bidi overrides, zero-width and other invisible
format characters (Unicode Cf) are refused in job names and tags, with a 422 naming the
field, through the API and the submit form; uploaded file names are stored without them.
"""

from __future__ import annotations

import io

import pytest
from flask import Flask

from shared.db import transaction
from shared.invisible_chars import first_invisible, strip_invisible
from shared.orm import Job, Upload
from shared.spec import load_stored_spec, spec_to_json
from tests.helpers import train_spec
from tests.test_authorization import session_client
from tests.test_submit_page import FormReader, errors_text, page, post, set_name, set_value

# Each spoofing character the issue names, and a few other Cf ones.
INVISIBLE = [
    "\u202a", "\u202b", "\u202c", "\u202d", "\u202e",  # bidi embeddings and overrides
    "\u2066", "\u2067", "\u2068", "\u2069",  # bidi isolates
    "\u200e", "\u200f", "\u061c",  # direction marks
    "\u200b", "\u200c", "\u200d", "\u2060", "\ufeff",  # zero-width
    "\u00ad", "\u2061", "\U000e0001",  # soft hyphen, invisible function application, tag
]  # fmt: skip
CSV = "x1,x2,label\n" + "".join(f"{i},{i * 2},{i % 2}\n" for i in range(20))


@pytest.mark.parametrize("char", INVISIBLE, ids=lambda c: f"U+{ord(c):04X}")
def test_every_invisible_character_is_found(char: str) -> None:
    assert first_invisible(f"run{char}1") is not None
    assert strip_invisible(f"run{char}1") == "run1"


def test_visible_text_passes() -> None:
    for text in ("baseline", "résumé café", "نموذج", "模型-1", "emoji 🚂", "a b\tc"):
        assert first_invisible(text) is None, text


@pytest.mark.parametrize("char", ["\u202e", "\u200b", "\u2066", "\ufeff", "\u061c"])
def test_api_refuses_invisible_characters_in_names_and_tags(client, char: str) -> None:  # type: ignore[no-untyped-def]
    resp = client.post("/api/v1/jobs", json=train_spec(name=f"final{char}gpj.exe"))
    assert resp.status_code == 422
    fields = resp.get_json()["error"]["fields"]
    assert set(fields) == {"name"} and f"U+{ord(char):04X}" in fields["name"]

    resp = client.post("/api/v1/jobs", json=train_spec(tags=["ok", f"prod{char}"]))
    assert resp.status_code == 422
    fields = resp.get_json()["error"]["fields"]
    assert set(fields) == {"tags.1"} and "invisible" in fields["tags.1"]

    assert client.post("/api/v1/jobs", json=train_spec(name="fine", tags=["ok"])).status_code == 201


def test_the_form_refuses_invisible_characters_in_name_and_tags(
    app: Flask, db_url: str, users
) -> None:  # type: ignore[no-untyped-def]
    alice = session_client(app, db_url, users.alice)
    _, form = page(alice)
    fields = form.fields(js=True)
    set_value(fields, "f-name", "resnet\u202e50")
    set_value(fields, "f-tags", "web, zero\u200bwidth")
    resp = post(alice, fields)
    assert resp.status_code == 422
    errors = errors_text(resp.get_data(as_text=True))
    assert "U+202E" in errors["f-name"]
    assert any("U+200B" in text for target, text in errors.items() if "tags" in target), errors
    with transaction(db_url) as s:
        assert s.query(Job).count() == 0


def test_uploaded_file_names_are_stored_without_invisible_characters(
    app: Flask, client, db_url: str, users
) -> None:  # type: ignore[no-untyped-def]
    # "invoice\u202ecsv.exe" reads as "invoiceexe.vsc"-ish garbage designed to mislead.
    resp = client.post(
        "/api/v1/uploads",
        data={"file": (io.BytesIO(CSV.encode()), "data\u202etxt.\u200bcsv")},
        content_type="multipart/form-data",
    )
    assert resp.status_code == 201, resp.get_json()
    assert resp.get_json()["filename"] == "datatxt.csv"
    upload_id = resp.get_json()["id"]
    assert client.get(f"/api/v1/uploads/{upload_id}").get_json()["filename"] == "datatxt.csv"

    # A raw text/csv body names its file in the query string.
    resp = client.post(
        "/api/v1/uploads?filename=%E2%80%AEraw%E2%81%A6.csv",
        data=CSV.encode(),
        content_type="text/csv",
    )
    assert resp.status_code == 201, resp.get_json()
    assert resp.get_json()["filename"] == "raw.csv"

    # The submit form's no-JS upload goes through the same view.
    alice = session_client(app, db_url, users.alice)
    _, form = page(alice)
    fields = form.fields(js=False)
    set_name(fields, "dataset.name", "csv")
    set_name(fields, "model.name", "mlp")
    resp = post(alice, fields, file=(io.BytesIO(CSV.encode()), "form\u2067\u200d.csv", "text/csv"))
    html = resp.get_data(as_text=True)
    upload_id = FormReader(html).control("f-train-dataset-csv-params-upload_id").value
    assert "Stored form.csv as upload" in html
    with transaction(db_url) as s:
        names = [u.filename for u in s.query(Upload).order_by(Upload.id)]
    assert names == ["datatxt.csv", "raw.csv", "form.csv"] and upload_id.isdigit()
    assert all(first_invisible(n) is None for n in names)


def test_a_spec_stored_before_the_check_still_loads_cleaned() -> None:
    stored = spec_to_json(load_stored_spec(train_spec(name="plain", tags=["a"])))
    stored["name"], stored["tags"] = "old\u202ename", ["t\u200bag"]
    spec = load_stored_spec(stored)
    assert (spec.name, spec.tags) == ("oldname", ["tag"])


def test_csv_column_names_with_invisible_characters_are_refused(client) -> None:  # type: ignore[no-untyped-def]
    """A header cell is a name a spec refers to and pages show: refused like job names."""
    spoofed = "x1,x\u202e2,label\n0.1,0.2,a\n0.3,0.4,b\n"
    resp = client.post(
        "/api/v1/uploads",
        data={"file": (io.BytesIO(spoofed.encode()), "cols.csv")},
        content_type="multipart/form-data",
    )
    assert resp.status_code == 422
    message = resp.get_json()["error"]["fields"]["file"]
    assert (
        message
        == "column 2's name contains the invisible character U+202E (RIGHT-TO-LEFT OVERRIDE)"
    )
    assert client.get("/api/v1/uploads").get_json()["uploads"] == []
