"""Structured logs (shared/log_setup.py): one JSON object a line, the job on every line
about a job (its threads' lines too), the text format naming it as well."""

from __future__ import annotations

import io
import json
import logging
import threading

import pytest

from shared.log_setup import configure_logging, job_context, job_fields


@pytest.fixture
def captured() -> io.StringIO:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    yield stream
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in saved[0]:
        root.addHandler(h)
    root.setLevel(saved[1])


def _configure(stream: io.StringIO, log_format: str) -> None:
    handler = configure_logging(log_format, "worker")  # type: ignore[arg-type]
    handler.setStream(stream)


def test_json_lines_name_the_job_in_every_thread(captured: io.StringIO) -> None:
    _configure(captured, "json")
    log = logging.getLogger("trainyard.test")
    log.info("before any job")
    with job_context(42, 3):
        log.info("claimed")
        thread = threading.Thread(target=lambda: log.warning("lease renewed"))
        thread.start()
        thread.join()
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("training failed")
    log.info("reconciler: job %s requeued", 7, extra=job_fields(7))
    lines = [json.loads(line) for line in captured.getvalue().splitlines()]
    assert [line["message"] for line in lines] == [
        "before any job", "claimed", "lease renewed", "training failed", "reconciler: job 7 requeued"
    ]  # fmt: skip
    first, claimed, thread_line, failed, other = lines
    assert "job_id" not in first and first["process"] == "worker" and first["level"] == "INFO"
    assert first["logger"] == "trainyard.test" and first["time"].startswith("20")
    for line in (claimed, thread_line, failed):
        assert (line["job_id"], line["attempt"]) == (42, 3)
    assert "ValueError: boom" in failed["exc_info"]
    assert other["job_id"] == 7 and "attempt" not in other


def test_text_lines_name_the_job_too(captured: io.StringIO) -> None:
    _configure(captured, "text")
    with job_context(5, 1):
        logging.getLogger("x").info("epoch 1 done")
    logging.getLogger("x").info("idle")
    first, second = captured.getvalue().splitlines()
    assert first.endswith("epoch 1 done [job 5 attempt 1]") and "[worker] INFO x:" in first
    assert second.endswith("idle")


def test_celerys_own_task_lines_name_the_job(captured: io.StringIO) -> None:
    """Celery logs "received" in the worker's main process and "succeeded in" after the
    job's context ended; made here with the calls Celery makes (its strategy module's
    logger with the context as `data`, trace.info), each line names the job."""
    from celery.app import trace
    from celery.worker import strategy

    from shared.celery_app import TRAIN_TASK

    _configure(captured, "json")
    received = {"id": "job-12-a1", "name": TRAIN_TASK, "args": "(12,)", "kwargs": "{}",
                "eta": None}  # fmt: skip
    strategy.logger.info(trace.LOG_RECEIVED, received, extra={"data": received})
    trace.info(
        trace.LOG_SUCCESS,
        {
            "id": "job-12-a1",
            "name": TRAIN_TASK,
            "return_value": "'succeeded'",
            "runtime": 2.5,
            "args": "[12]",
            "kwargs": "{}",
        },
    )
    other = {"id": "x", "name": "celery.ping", "args": "(12,)", "kwargs": "{}", "eta": None}
    strategy.logger.info(trace.LOG_RECEIVED, other, extra={"data": other})
    with job_context(5, 2):  # the slot's own job wins over the line's arguments
        trace.info(
            trace.LOG_SUCCESS,
            {
                "id": "y",
                "name": TRAIN_TASK,
                "return_value": "None",
                "runtime": 1.0,
                "args": "(12,)",
                "kwargs": "{}",
            },
        )
    lines = [json.loads(line) for line in captured.getvalue().splitlines()]
    assert [line.get("job_id") for line in lines] == [12, 12, None, 5]
    assert "received" in lines[0]["message"] and "succeeded in" in lines[1]["message"]
    assert "attempt" not in lines[0] and lines[3]["attempt"] == 2
