"""shared/metric_catalog.py: directions, the finite rule, final metrics, the key metric
rule, keys outside the catalogue; and the CLI, the API and the jobs page agreeing on a
job's key metric."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from shared import metric_catalog as mc
from shared.metric_catalog import (
    METRICS,
    direction,
    final_metrics,
    finite_number,
    key_metric,
    metric_info,
    sort_key,
)

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- directions


def test_direction_of_catalogue_and_unknown_keys() -> None:
    assert direction("val_accuracy") == "max" and direction("val_r2") == "max"
    assert direction("val_loss") == "min" and direction("mse") == "min"
    assert direction("step_loss") == "min"
    assert direction("epochs_run") is None and direction("lr") is None
    # Better is min or max by which metric was monitored: no direction of its own.
    assert direction("best_metric_value") is None
    # Keys outside the catalogue: by their name.
    assert direction("test_accuracy") == "max" and direction("train_f1") == "max"
    assert direction("val_precision") == "max"
    assert direction("test_mae") == "min" and direction("contrastive_loss") == "min"
    assert direction("wall_clock") is None


def test_catalogue_directions_agree_with_the_name_rules() -> None:
    # The suffix rules are the fallback for unknown keys: a known key must not read
    # differently from how the same name would read if it were unknown.
    for key, metric in METRICS.items():
        assert mc._direction_by_name(key) == metric.direction, key


def test_catalogue_entries_are_consistent() -> None:
    orders = [m.order for m in METRICS.values()]
    assert orders == list(range(len(METRICS)))
    for metric in METRICS.values():
        assert 0 < len(metric.key) <= mc.MAX_KEY_CHARS and metric.label
        assert metric.direction in (None, "min", "max")
        assert metric.task in typing.get_args(mc.Task)
        assert metric.kind in typing.get_args(mc.JobKind)
        assert metric.series in typing.get_args(mc.SeriesKind)
    for chart in mc.CHARTS:
        series = {METRICS[k].series for k in chart.keys}
        assert len(series) == 1 and series <= {"epoch", "step", "time"}, chart
    charted = [k for c in mc.CHARTS for k in c.keys]
    logged = [k for k, m in METRICS.items() if m.series in ("epoch", "step", "time")]
    assert sorted(charted) == sorted(logged)  # every series has its chart, once
    # The pages embed it as JSON.
    doc = json.loads(json.dumps(mc.catalog_json()))
    assert [m["key"] for m in doc["metrics"]] == list(METRICS)
    assert doc["charts"][0] == {
        "id": "loss",
        "title": "Loss",
        "keys": ["train_loss", "val_loss"],
        "series": "epoch",
        "small": False,
    }


def test_unknown_keys_still_have_an_entry() -> None:
    info = metric_info("val_top5_accuracy")
    assert info.label == "val_top5_accuracy" and info.series is None
    assert info.kind == "train" and info.order == len(METRICS)
    assert metric_info("kappa").kind == "evaluate"
    assert metric_info("eval_duration_s").unit == "s"
    assert metric_info("samples_per_s").unit == "samples/s"
    keys = ["zeta", "train_loss", "alpha", "val_accuracy", "duration_s"]
    assert sorted(keys, key=sort_key) == [
        "val_accuracy",
        "train_loss",
        "duration_s",
        "alpha",
        "zeta",
    ]


# ---------------------------------------------------------------- values


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.5, 0.5),
        (3, 3.0),
        (-0.0, 0.0),
        (10**300, 1e300),
        (True, None),
        (False, None),
        (float("nan"), None),
        (float("inf"), None),
        (-float("inf"), None),
        (10**400, None),  # a JSON int too big for a float
        ("0.5", None),
        (None, None),
        ([0.5], None),
    ],
)
def test_finite_number(value: Any, expected: float | None) -> None:
    got = finite_number(value)
    assert got == expected and (got is None or type(got) is float)


def test_final_metrics_keeps_finite_numbers_under_short_keys() -> None:
    result = {
        "metrics": {
            "val_accuracy": 0.9,
            "epochs_run": 3,
            "stopped_early": True,
            "val_f1": float("nan"),
            "device": "cpu",
            "per_class": [{"class": 0}],
            "k" * 64: 1.0,
            "k" * 65: 1.0,
            "": 1.0,
            "huge": 10**400,
        }
    }
    assert final_metrics(result) == {"val_accuracy": 0.9, "epochs_run": 3.0, "k" * 64: 1.0}
    assert final_metrics(None) == final_metrics({"metrics": None}) == final_metrics([]) == {}


def test_the_state_machine_writes_the_catalogues_final_metrics() -> None:
    from shared import state_machine
    from shared.orm import JobMetric

    assert state_machine.final_metrics is final_metrics
    assert JobMetric.__table__.c.key.type.length == mc.MAX_KEY_CHARS


# ---------------------------------------------------------------- key metric


def test_key_metric_of_train_and_evaluate_jobs() -> None:
    classification = {"train_loss": 0.1, "val_loss": 0.2, "val_accuracy": 0.95, "val_f1": 0.9}
    regression = {"train_loss": 0.3, "val_loss": 0.25, "val_mse": 0.25, "val_r2": 0.8}
    assert key_metric("train", classification) == ("val_accuracy", 0.95)
    assert key_metric("train", regression) == ("val_loss", 0.25)
    assert key_metric("evaluate", {"accuracy": 0.9, "f1": 0.88, "loss": 0.3}) == ("accuracy", 0.9)
    # An evaluation's loss is its source's loss function: mse compares regressions.
    assert key_metric("evaluate", {"mse": 0.5, "mae": 0.4, "loss": 0.2}) == ("mse", 0.5)


def test_key_metric_skips_what_is_not_a_finite_number() -> None:
    diverged = {"val_accuracy": float("nan"), "val_loss": 2.5}
    assert key_metric("train", diverged) == ("val_loss", 2.5)
    assert key_metric("train", {"val_accuracy": True, "val_loss": None}) is None
    assert key_metric("train", {"train_loss": 0.1}) is None  # no validation: nothing to show
    assert key_metric("train", {"accuracy": 0.9}) is None  # another kind's key
    assert key_metric("evaluate", {"val_accuracy": 0.9}) is None
    assert key_metric("sweep", {"val_accuracy": 0.9}) is None  # an unknown kind
    assert key_metric("train", None) is None and key_metric("train", ["val_loss"]) is None


# ---------------------------------------------------------------- its readers


def test_training_logs_the_catalogues_per_epoch_series() -> None:
    from worker.job_log import EPOCH_KEYS
    from worker.training.train import CLASSIFICATION_EPOCH_KEYS, REGRESSION_EPOCH_KEYS

    assert set(CLASSIFICATION_EPOCH_KEYS) == mc.per_epoch_keys("classification")
    assert set(REGRESSION_EPOCH_KEYS) == mc.per_epoch_keys("regression")
    assert "step_loss" not in EPOCH_KEYS
    assert set(EPOCH_KEYS) == mc.per_epoch_keys()


def test_early_stopping_watches_catalogued_validation_series() -> None:
    from shared.spec import CLASSIFICATION_METRICS, REGRESSION_METRICS, EarlyStoppingSpec

    allowed = typing.get_args(EarlyStoppingSpec.model_fields["metric"].annotation)
    assert set(allowed) == set(CLASSIFICATION_METRICS) | set(REGRESSION_METRICS)
    for task, keys in (
        ("classification", CLASSIFICATION_METRICS),
        ("regression", REGRESSION_METRICS),
    ):
        assert set(keys) <= mc.per_epoch_keys(task)
    modes = {m: EarlyStoppingSpec(metric=m).mode for m in allowed}
    assert modes == {m: METRICS[m].direction for m in allowed}


def test_the_catalogue_imports_no_database_web_or_torch() -> None:
    # The CLI, the web process and the worker all import it.
    code = (
        "import sys, shared.metric_catalog; "
        "bad = [m for m in ('sqlalchemy', 'flask', 'torch', 'server', 'worker') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_cli_api_and_jobs_page_show_the_same_key_metric(
    app: Flask, db_url: str, users: Any
) -> None:
    from server.cli import display
    from tests.conftest import as_user
    from tests.job_rows import add_jobs
    from tests.test_authorization import session_client

    a = users.alice.id
    jobs = [
        {"name": "cls", "metrics": {"train_loss": 0.1, "val_loss": 0.2, "val_accuracy": 0.97}},
        {"name": "reg", "dataset_name": "synthetic_regression",
         "metrics": {"train_loss": 0.3, "val_loss": 0.25, "val_mse": 0.25, "val_r2": 0.8}},
        {"name": "eval-cls", "kind": "evaluate", "metrics": {"accuracy": 0.9, "f1": 0.88, "loss": 0.3}},
        # The CLI used to show `loss` here, and `train_loss` below; the web never did.
        {"name": "eval-reg", "kind": "evaluate", "dataset_name": "synthetic_regression",
         "metrics": {"loss": 0.2, "mse": 0.5, "mae": 0.4}},
        {"name": "no-validation", "metrics": {"train_loss": 0.1}},
    ]  # fmt: skip
    ids = add_jobs(db_url, [{"owner": a, **job} for job in jobs])
    expected = {
        ids[0]: ("val_accuracy", 0.97),
        ids[1]: ("val_loss", 0.25),
        ids[2]: ("accuracy", 0.9),
        ids[3]: ("mse", 0.5),
        ids[4]: None,
    }

    html = session_client(app, db_url, users.alice).get("/").get_data(as_text=True)
    cells = dict(
        re.findall(
            r'<tr id="job-row-(\d+)".*?<td class="col-metric" data-label="Key metric">(.*?)</td>',
            html,
            re.S,
        )
    )
    api = as_user(app, users.alice)
    for job_id, want in expected.items():
        page_words = re.sub(r"<[^>]+>", "", cells[str(job_id)]).split()
        job = api.get(f"/api/v1/jobs/{job_id}").get_json()
        cli_words = display.key_metric(job).split()
        if want is None:
            assert page_words == ["—"] and cli_words == [] and job["key_metric"] is None
            continue
        key, value = want
        assert job["key_metric"] == {"key": key, "value": value}
        assert page_words == [f"{value:.4g}", key]
        assert cli_words == [key, f"{value:.4g}"]


def test_the_job_and_compare_pages_carry_the_catalogue_for_their_scripts(
    app: Flask, db_url: str, users: Any
) -> None:
    from tests.job_rows import add_jobs
    from tests.test_authorization import session_client

    ids = add_jobs(db_url, [{"owner": users.alice.id, "metrics": {"val_accuracy": 0.9}}] * 2)
    client = session_client(app, db_url, users.alice)
    for url in (f"/jobs/{ids[0]}", f"/compare?ids={ids[0]},{ids[1]}"):
        html = client.get(url).get_data(as_text=True)
        block = re.search(
            r'<script type="application/json" id="metric-catalog">(.*?)</script>', html, re.S
        )
        assert block, url
        # A data block, not script: the CSP (script-src 'self') has nothing to run.
        assert json.loads(block.group(1)) == json.loads(json.dumps(mc.catalog_json())), url
