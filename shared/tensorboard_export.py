"""A job's metrics as TensorBoard event files, written without TensorFlow or torch.

One run directory per job, `job-<id>-<name>`, holding one event file with:

- every metric series as scalars, at the step and worker wall time each point was
  logged with, under tags grouped the way TensorBoard folds its charts: `train/loss`,
  `val/accuracy`, `train/lr`, system telemetry under `system/`;
- the job's final metrics (its result) as `final/<key>` scalars at the last step, the
  values the HPARAMS tab compares runs by;
- the HParams plugin's session start (the JobSpec flattened: `model.name`,
  `optimizer.lr`, `batch_size`, ...) and, for a finished job, its session end.

Exporting several jobs into one directory adds one experiment summary at its top
(`write_experiment`), naming every hyperparameter and final metric, so the HPARAMS tab
lines the runs up in one table. Nothing depends on the clock or the host: file names
come from the job, so exporting the same job twice gives the same bytes.

The records are framed by TensorBoard's own RecordWriter and built from its protos;
the tests read them back with TensorBoard's EventAccumulator. The web process, the CLI
and a worker writing live files (LiveRun) import this module, each lazily: the protobuf
modules take half a second to load.
"""

from __future__ import annotations

import gzip
import json
import re
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from shared.metric_catalog import LR, STEP_LOSS, final_metrics, is_system

# (step, value, wall time in seconds since the epoch): one point as the worker logged it.
ScalarPoint = tuple[int, float, float]
HParamValue = str | float | bool

FINAL_PREFIX = "final/"
SYSTEM_PREFIX = "system/"
# Tags the export writes itself: a series whose key starts with one of these is moved
# under "series/" so it cannot be taken for a final metric or the plugin's own data.
_RESERVED = (FINAL_PREFIX, "_hparams_/")
_SPLIT_PREFIXES = {"train_": "train/", "val_": "val/", "test_": "test/"}
_RENAMED = {LR: "train/lr", STEP_LOSS: "train/step_loss"}

# Spec fields about queueing, not about the model or how it was trained.
_NOT_HPARAMS = frozenset({"name", "tags", "priority", "preemptible", "max_runtime_s"})
# A script's free-form params could be large; the HPARAMS table needs a handful.
MAX_HPARAMS = 100
_MAX_HPARAM_CHARS = 200

EVENT_FILE_PREFIX = "events.out.tfevents."
EXPERIMENT_FILE = f"{EVENT_FILE_PREFIX}0000000000.trainyard.experiment"
_FILE_VERSION = "brain.Event:2"
_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")

_STATUS = {
    "succeeded": api_pb2.Status.STATUS_SUCCESS,
    "failed": api_pb2.Status.STATUS_FAILURE,
    # The plugin has no "aborted": a cancelled job neither succeeded nor failed.
    "cancelled": api_pb2.Status.STATUS_UNKNOWN,
}


@dataclass(frozen=True)
class RunData:
    """What one job's run directory is written from (times in seconds since the epoch)."""

    job_id: int
    name: str | None
    state: str
    spec: Mapping[str, Any]
    result: Mapping[str, Any] | None
    created_at: float
    finished_at: float | None = None
    # Metric key -> its points in step order, one point per step.
    series: Mapping[str, Sequence[ScalarPoint]] = field(default_factory=dict)

    @property
    def dirname(self) -> str:
        return run_dir_name(self.job_id, self.name)

    @property
    def hparams(self) -> dict[str, HParamValue]:
        return flatten_hparams(self.spec)

    @property
    def final(self) -> dict[str, float]:
        return final_metric_tags(self.result)


def run_dir_name(job_id: int, name: str | None) -> str:
    """`job-<id>-<name>`, the name cut to characters safe in any file system."""
    slug = _NAME_CHARS.sub("-", name or "").strip("-.")[:60]
    return f"job-{job_id}-{slug}" if slug else f"job-{job_id}"


def event_file_name(job_id: int, created_at: float) -> str:
    # TensorBoard finds event files by "tfevents" in the name and orders a run's files
    # by name: the job's creation time keeps that order meaningful, the id unique.
    return f"{EVENT_FILE_PREFIX}{int(max(created_at, 0)):010d}.trainyard.job-{job_id}"


def series_tags(keys: Iterable[str]) -> dict[str, str]:
    """Metric key -> scalar tag, one tag per key.

    Catalogue keys are grouped by what they measure (`val_accuracy` -> `val/accuracy`);
    a key that already has a slash is a script's own grouping and stays as it is. When
    two keys would meet on one tag, the later one (by name) keeps its key as the tag.
    """
    ordered = sorted(set(keys))
    # Keys with a slash first: they are named as their authors meant, and win ties.
    tags = {key: _own_tag(key) for key in ordered if "/" in key}
    taken = set(tags.values())
    for key in ordered:
        if key not in tags:
            tags[key] = _free_tag(key, taken)
    return tags


def _own_tag(key: str) -> str:
    return f"series/{key}" if key.startswith(_RESERVED) else key


def _free_tag(key: str, taken: set[str]) -> str:
    """The grouped tag for a key without a slash, or the key itself if that is taken;
    adds it to `taken`."""
    tag = _grouped(key)
    if tag in taken:
        tag = key
    taken.add(tag)
    return tag


def _grouped(key: str) -> str:
    if key in _RENAMED:
        return _RENAMED[key]
    if is_system(key):
        return SYSTEM_PREFIX + key
    for prefix, group in _SPLIT_PREFIXES.items():
        if key.startswith(prefix) and len(key) > len(prefix):
            return group + key[len(prefix) :]
    return key


def flatten_hparams(spec: Mapping[str, Any]) -> dict[str, HParamValue]:
    """The JobSpec as flat hyperparameters: nested objects joined with dots
    (`model.params.hidden`), lists as JSON text, queueing fields and nulls left out."""
    flat: dict[str, HParamValue] = {}

    def visit(prefix: str, value: Any) -> None:
        if len(flat) >= MAX_HPARAMS or value is None:
            return
        if isinstance(value, Mapping):
            for key in sorted(value, key=str):
                visit(f"{prefix}.{key}" if prefix else str(key), value[key])
            return
        if isinstance(value, bool):
            flat[prefix] = value
        elif isinstance(value, (int, float)):
            flat[prefix] = float(value)
        elif isinstance(value, str):
            flat[prefix] = value[:_MAX_HPARAM_CHARS]
        else:
            text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
            flat[prefix] = text[:_MAX_HPARAM_CHARS]

    visit("", {k: v for k, v in spec.items() if k not in _NOT_HPARAMS})
    return flat


def final_metric_tags(result: Mapping[str, Any] | None) -> dict[str, float]:
    """`final/<key>` -> value for each finite final metric of a job's result."""
    return {FINAL_PREFIX + key: value for key, value in final_metrics(result).items()}


# ---------------------------------------------------------------- protos


def _scalar_event(tag: str, point: ScalarPoint) -> Event:
    step, value, wall_time = point
    return Event(
        wall_time=wall_time,
        step=step,
        summary=Summary(value=[Summary.Value(tag=tag, simple_value=value)]),
    )


def _plugin_event(tag: str, data: plugin_data_pb2.HParamsPluginData, wall_time: float) -> Event:
    summary = Summary(
        value=[Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(data))]
    )
    return Event(wall_time=wall_time, step=0, summary=summary)


def _hparam_value(info: plugin_data_pb2.SessionStartInfo, name: str, value: HParamValue) -> None:
    if isinstance(value, bool):
        info.hparams[name].bool_value = value
    elif isinstance(value, float):
        info.hparams[name].number_value = value
    else:
        info.hparams[name].string_value = value


def _session_start(run: RunData) -> Event:
    info = plugin_data_pb2.SessionStartInfo(group_name=run.dirname, start_time_secs=run.created_at)
    for name, value in run.hparams.items():
        _hparam_value(info, name, value)
    data = plugin_data_pb2.HParamsPluginData(session_start_info=info)
    return _plugin_event(metadata.SESSION_START_INFO_TAG, data, run.created_at)


def _session_end(run: RunData) -> Event | None:
    status = _STATUS.get(run.state)
    if status is None or run.finished_at is None:
        return None  # still queued or running: no end yet
    info = plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=run.finished_at)
    data = plugin_data_pb2.HParamsPluginData(session_end_info=info)
    return _plugin_event(metadata.SESSION_END_INFO_TAG, data, run.finished_at)


def run_events(run: RunData) -> Iterable[Event]:
    """The events of a job's run, in the order they are written."""
    yield Event(wall_time=run.created_at, step=0, file_version=_FILE_VERSION)
    yield _session_start(run)
    tags = series_tags(run.series)
    last_step, last_time = 0, run.finished_at or run.created_at
    for key in sorted(run.series):
        points = run.series[key]
        for point in points:
            yield _scalar_event(tags[key], point)
        if points:
            last_time = max(last_time, points[-1][2])
            if not is_system(key):  # telemetry steps are seconds, not training steps
                last_step = max(last_step, points[-1][0])
    # At the last step trained, so a final value sits at the end of its series' chart.
    when = run.finished_at or last_time
    for tag, value in sorted(run.final.items()):
        yield _scalar_event(tag, (last_step, value, when))
    end = _session_end(run)
    if end is not None:
        yield end


def _write_events(path: Path, events: Iterable[Event], mode: str = "wb") -> None:
    with path.open(mode) as f:
        writer = RecordWriter(f)
        for event in events:
            writer.write(event.SerializeToString())


def write_run(run: RunData, logdir: Path) -> Path:
    """Write the job's run directory under `logdir`; returns the directory."""
    run_dir = logdir / run.dirname
    run_dir.mkdir(parents=True, exist_ok=True)
    for old in run_dir.glob(f"{EVENT_FILE_PREFIX}*.trainyard.job-{run.job_id}"):
        old.unlink()  # a re-export replaces the job's file rather than adding a second
    _write_events(run_dir / event_file_name(run.job_id, run.created_at), run_events(run))
    return run_dir


# A live event file grows for as long as its job trains; past this size the next points
# start a new file beside it. With a bucket as the store, the worker re-uploads a changed
# file whole every few seconds (worker/artifact_sync.py): parts keep that to the newest
# few MB however long the job runs. TensorBoard reads a run's files in name order.
LIVE_PART_BYTES = 4 << 20


class LiveRun:
    """A running attempt's event files, appended to as its points are stored
    (TRAINYARD_TENSORBOARD_LIVE), so `tensorboard --logdir` on the worker's job
    directory follows the job while it trains.

    Files per attempt (a resumed job starts new ones beside them): the first holds the
    session start, then scalars as the metric sink writes them; once a file reaches
    `part_bytes`, the next points go to `<name>.part-00001` and so on, which sort after
    it. No session end: the outcome is recorded after the last points, and the download
    has it.
    """

    def __init__(self, directory: Path, job_id: int, attempt: int, spec: Mapping[str, Any],
                 started_at: float, part_bytes: int = LIVE_PART_BYTES) -> None:  # fmt: skip
        self.run = RunData(job_id, spec.get("name"), "running", spec, None, started_at)
        self._first = directory / f"{event_file_name(job_id, started_at)}.attempt-{attempt}"
        self.path = self._first  # the file being appended to
        self._part = 0
        self._part_bytes = part_bytes
        self._tags: dict[str, str] = {}

    def _tag(self, key: str) -> str:
        tag = self._tags.get(key)
        if tag is None:
            taken = set(self._tags.values())
            tag = self._tags[key] = _own_tag(key) if "/" in key else _free_tag(key, taken)
        return tag

    def write(self, points: Iterable[Mapping[str, Any]]) -> None:
        """Append points ({"key", "step", "value", "wall_time"}, as stored). A new file
        starts with the version; the first also with the session start."""
        if self.path.exists() and self.path.stat().st_size >= self._part_bytes:
            self._part += 1
            self.path = self._first.with_name(f"{self._first.name}.part-{self._part:05d}")
        events: list[Event] = []
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            events.append(Event(wall_time=self.run.created_at, step=0, file_version=_FILE_VERSION))
            if self._part == 0:
                events.append(_session_start(self.run))
        for p in points:
            events.append(
                _scalar_event(self._tag(p["key"]), (p["step"], p["value"], p["wall_time"]))
            )
        # Opened per batch: nothing to close when the attempt ends, however it ends.
        _write_events(self.path, events, "ab")


@dataclass(frozen=True)
class SessionSummary:
    """What the experiment summary needs of one run: its hyperparameters and the tags
    of its final metrics."""

    hparams: Mapping[str, HParamValue]
    final_tags: Iterable[str]

    @classmethod
    def of(cls, spec: Mapping[str, Any], result: Mapping[str, Any] | None) -> SessionSummary:
        """From a job's spec and result, as its run's session start and final scalars."""
        return cls(flatten_hparams(spec), sorted(final_metric_tags(result)))


def experiment(sessions: Sequence[SessionSummary]) -> api_pb2.Experiment:
    """Every hyperparameter and final metric of the runs, so the HPARAMS tab shows
    one column each; text and yes/no hyperparameters list the values the runs took."""
    values: dict[str, list[HParamValue]] = {}
    for session in sessions:
        for name, value in session.hparams.items():
            values.setdefault(name, []).append(value)
    infos = []
    for name in sorted(values):
        seen = values[name]
        # TensorBoard lists the hyperparameters that differ between runs first (and
        # keeps only those when it is asked for fewer columns).
        differs = len({(type(v), v) for v in seen}) > 1 or len(seen) < len(sessions)
        info = api_pb2.HParamInfo(name=name, differs=differs)
        if all(isinstance(v, bool) for v in seen):
            info.type = api_pb2.DataType.DATA_TYPE_BOOL
            info.domain_discrete.values.add().bool_value = False
            info.domain_discrete.values.add().bool_value = True
        elif all(isinstance(v, float) for v in seen):
            info.type = api_pb2.DataType.DATA_TYPE_FLOAT64
        else:
            # Mixed types across runs (a number in one spec, text in another) read as text.
            info.type = api_pb2.DataType.DATA_TYPE_STRING
            for text in sorted({str(v) for v in seen}):
                info.domain_discrete.values.add().string_value = text
        infos.append(info)
    tags = sorted({tag for session in sessions for tag in session.final_tags})
    metrics = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag)) for tag in tags]
    return api_pb2.Experiment(hparam_infos=infos, metric_infos=metrics)


def write_experiment(logdir: Path, sessions: Sequence[SessionSummary]) -> Path:
    """The experiment summary at the top of `logdir` (replacing an earlier one)."""
    logdir.mkdir(parents=True, exist_ok=True)
    data = plugin_data_pb2.HParamsPluginData(experiment=experiment(sessions))
    path = logdir / EXPERIMENT_FILE
    _write_events(
        path,
        [
            Event(wall_time=0.0, step=0, file_version=_FILE_VERSION),
            _plugin_event(metadata.EXPERIMENT_TAG, data, 0.0),
        ],
    )
    return path


# ---------------------------------------------------------------- archive


def tar_run(run_dir: Path, out: IO[bytes], mtime: float = 0.0) -> None:
    """`run_dir` as a .tar.gz into `out`: the directory and its files, sorted, with
    fixed owners, modes and times, so the same run gives the same bytes."""
    # mtime=0 keeps the export time out of the gzip header too.
    with (
        gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        tar.addfile(_tar_info(run_dir.name, mtime, directory=True))
        for path in sorted(p for p in run_dir.iterdir() if p.is_file()):
            info = _tar_info(f"{run_dir.name}/{path.name}", mtime, size=path.stat().st_size)
            with path.open("rb") as f:
                tar.addfile(info, f)


def _tar_info(
    name: str, mtime: float, *, size: int = 0, directory: bool = False
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = 0o755 if directory else 0o644
    info.size = size
    info.mtime = int(mtime)
    return info


def extract_runs(archive: IO[bytes], logdir: Path) -> list[str]:
    """Unpack an export's .tar.gz into `logdir`; returns the run directories it held.
    Only plain files and directories with relative names: the archive comes over the
    network, and nothing in it may land outside `logdir`."""
    logdir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=archive, mode="r:gz") as tar:
        members = tar.getmembers()
        for member in members:
            parts = PurePosixPath(member.name).parts
            if (
                not (member.isfile() or member.isdir())
                or member.name.startswith("/")
                or ".." in parts
            ):
                raise ValueError(f"not a TensorBoard export: it holds {member.name!r}")
        # The "data" filter also fixes modes; Pythons before 3.10.12 / 3.11.4 lack it.
        if hasattr(tarfile, "data_filter"):
            tar.extractall(logdir, members=members, filter="data")
        else:
            tar.extractall(logdir, members=members)  # the members were checked above
    return sorted({m.name.split("/", 1)[0] for m in members})
