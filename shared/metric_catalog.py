"""The one catalogue of metrics: every key a job reports (in result.metrics or as a
series of points), with its label, unit, better direction, task, job kind, series kind
and display order; the rule that picks a job's key metric; and what counts as a finite
metric value.

Training and evaluation (worker/training) write the keys named here, the job log picks
its per-epoch lines by series kind, and the API, the web pages and the CLI read labels,
directions, order and the key metric from here. The pages' scripts get the catalogue
from the page (`catalog_json`, a JSON block), so no key or label is repeated in
JavaScript. Nothing here imports SQLAlchemy, Flask or torch: the CLI, the web process
and the worker all import this module.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

Direction = Literal["min", "max"]
Task = Literal["classification", "regression", "any"]
JobKind = Literal["train", "evaluate", "any"]
# "epoch": one point per epoch (step = epoch); "step": points every few optimizer steps;
# "final": only in result.metrics, never logged as a series; "time": samples every few
# seconds whose step is the job's running time in seconds (worker/telemetry.py).
SeriesKind = Literal["epoch", "step", "final", "time"]
# "system": how the hardware was used, not how well the model did. Never a key metric,
# never ranked, never the metric a comparison opens on.
Group = Literal["job", "system"]

# job_final_metrics.key is a VARCHAR(64): a longer key cannot be stored or ranked.
MAX_KEY_CHARS = 64

# ---------------------------------------------------------------- keys

# Per-epoch series of a train job (and the same keys, last epoch, in its result).
TRAIN_LOSS = "train_loss"
VAL_LOSS = "val_loss"
VAL_ACCURACY = "val_accuracy"
VAL_F1 = "val_f1"
VAL_MSE = "val_mse"
VAL_MAE = "val_mae"
VAL_R2 = "val_r2"
LR = "lr"
# Per-step series of a train job.
STEP_LOSS = "step_loss"
# A train job's result, besides the last epoch's values.
BEST_METRIC = "best_metric"
BEST_METRIC_VALUE = "best_metric_value"
BEST_EPOCH = "best_epoch"
STOPPED_EARLY = "stopped_early"
EPOCHS_RUN = "epochs_run"
STEPS = "steps"
RESUMED_FROM_EPOCH = "resumed_from_epoch"
RESUMED_FROM_STEP = "resumed_from_step"
TRAIN_TIME_S = "train_time_s"
SAMPLES_PER_S = "samples_per_s"
NUM_TRAIN_SAMPLES = "num_train_samples"
NUM_VAL_SAMPLES = "num_val_samples"
NUM_PARAMETERS = "num_parameters"
TORCH_VERSION = "torch_version"
SEED = "seed"
# An evaluate job's result.
ACCURACY = "accuracy"
PRECISION = "precision"
RECALL = "recall"
F1 = "f1"
MSE = "mse"
MAE = "mae"
R2 = "r2"
LOSS = "loss"
NUM_SAMPLES = "num_samples"
SPLIT = "split"
DATASET = "dataset"
CHECKPOINT = "checkpoint"
CHECKPOINT_EPOCH = "checkpoint_epoch"
# A derived model (prune, quantize, export: worker/training/derive.py). The measures come
# as before_<key> / after_<key> pairs (BEFORE, AFTER); an export reports them once.
BEFORE, AFTER = "before_", "after_"
SIZE_BYTES = "size_bytes"
NONZERO_FRACTION = "nonzero_fraction"
LATENCY_MS = "latency_ms"
SPARSITY_TARGET = "sparsity_target"
SPARSITY_ACHIEVED = "sparsity_achieved"
PRUNED_TENSORS = "pruned_tensors"
PRUNED_CHANNELS = "pruned_channels"
FINE_TUNE_EPOCHS = "fine_tune_epochs"
FINE_TUNE_LR = "fine_tune_lr"
QUANTIZED_LAYERS = "quantized_layers"
FLOAT_LAYERS = "float_layers"
# An export's check of each format: <format>_max_abs_diff, <format>_size_bytes.
MAX_ABS_DIFF_SUFFIX = "_max_abs_diff"
# Both kinds.
DURATION_S = "duration_s"
DEVICE = "device"
# System telemetry of a train job (worker/telemetry.py), every TRAINYARD_TELEMETRY_SECONDS.
GPU_UTIL = "gpu_util"
GPU_MEM_GB = "gpu_mem_gb"
GPU_TEMP_C = "gpu_temp_c"
GPU_POWER_W = "gpu_power_w"
CPU_PERCENT = "cpu_percent"
RSS_GB = "rss_gb"


@dataclass(frozen=True)
class Metric:
    """One key a job reports. `order` is its place on every page and table (lower
    first); keys outside the catalogue come after all of these, by name."""

    key: str
    label: str
    direction: Direction | None  # None: not a quality metric (counts, times, names)
    task: Task
    kind: JobKind
    series: SeriesKind | None  # None: a key outside the catalogue, nothing known
    unit: str | None = None
    hint: str = ""
    order: int = 0
    group: Group = "job"


def _m(
    key: str,
    label: str,
    direction: Direction | None,
    task: Task,
    kind: JobKind,
    series: SeriesKind,
    unit: str | None = None,
    hint: str = "",
) -> Metric:
    return Metric(key, label, direction, task, kind, series, unit, hint)


def _system(key: str, label: str, unit: str, hint: str = "") -> Metric:
    return Metric(key, label, None, "any", "train", "time", unit, hint, group="system")


_MACRO = "macro average"
# Display order: scores before losses and errors (the number people compare first),
# then how the run went, then what it ran on.
_DEFINED = (
    _m(VAL_ACCURACY, "validation accuracy", "max", "classification", "train", "epoch"),
    _m(VAL_F1, "validation F1 (macro)", "max", "classification", "train", "epoch", hint=_MACRO),
    _m(VAL_R2, "validation R²", "max", "regression", "train", "epoch",
       hint="coefficient of determination"),
    _m(VAL_LOSS, "validation loss", "min", "any", "train", "epoch"),
    _m(TRAIN_LOSS, "training loss", "min", "any", "train", "epoch"),
    _m(VAL_MSE, "validation MSE", "min", "regression", "train", "epoch"),
    _m(VAL_MAE, "validation MAE", "min", "regression", "train", "epoch"),
    _m(STEP_LOSS, "training loss per step", "min", "any", "train", "step"),
    _m(ACCURACY, "accuracy", "max", "classification", "evaluate", "final"),
    _m(PRECISION, "precision (macro)", "max", "classification", "evaluate", "final", hint=_MACRO),
    _m(RECALL, "recall (macro)", "max", "classification", "evaluate", "final", hint=_MACRO),
    _m(F1, "F1 (macro)", "max", "classification", "evaluate", "final", hint=_MACRO),
    _m(R2, "R²", "max", "regression", "evaluate", "final", hint="coefficient of determination"),
    _m(MSE, "MSE", "min", "regression", "evaluate", "final"),
    _m(MAE, "MAE", "min", "regression", "evaluate", "final"),
    _m(LOSS, "loss", "min", "any", "evaluate", "final"),
    _m(BEST_METRIC, "monitored metric", None, "any", "train", "final"),
    # Better is min or max by best_metric, which differs between jobs: no direction.
    _m(BEST_METRIC_VALUE, "best value of the monitored metric", None, "any", "train", "final"),
    _m(BEST_EPOCH, "best epoch", None, "any", "train", "final"),
    _m(STOPPED_EARLY, "stopped early", None, "any", "train", "final"),
    _m(EPOCHS_RUN, "epochs run", None, "any", "train", "final"),
    _m(STEPS, "steps", None, "any", "train", "final"),
    _m(RESUMED_FROM_EPOCH, "resumed from epoch", None, "any", "train", "final"),
    _m(RESUMED_FROM_STEP, "resumed from step", None, "any", "train", "final"),
    _m(DURATION_S, "duration", None, "any", "any", "final", unit="s"),
    _m(TRAIN_TIME_S, "training time", None, "any", "train", "final", unit="s"),
    _m(SAMPLES_PER_S, "training speed", None, "any", "train", "final", unit="samples/s"),
    _m(NUM_TRAIN_SAMPLES, "training samples", None, "any", "train", "final"),
    _m(NUM_VAL_SAMPLES, "validation samples", None, "any", "train", "final"),
    _m(NUM_PARAMETERS, "parameters", None, "any", "train", "final"),
    _m(LR, "learning rate", None, "any", "train", "epoch"),
    _m(SEED, "seed", None, "any", "train", "final"),
    _m(NUM_SAMPLES, "samples", None, "any", "evaluate", "final"),
    _m(SPLIT, "split", None, "any", "evaluate", "final"),
    _m(DATASET, "dataset", None, "any", "evaluate", "final"),
    _m(CHECKPOINT, "checkpoint", None, "any", "evaluate", "final"),
    _m(CHECKPOINT_EPOCH, "checkpoint epoch", None, "any", "evaluate", "final"),
    _m(SIZE_BYTES, "size on disk", None, "any", "any", "final", unit="bytes",
       hint="the saved weights (torch.save of the state_dict)"),
    _m(NONZERO_FRACTION, "non-zero weights", None, "any", "any", "final",
       hint="share of the parameters that are not zero"),
    _m(LATENCY_MS, "CPU latency per batch", None, "any", "any", "final", unit="ms",
       hint="median of repeated forward passes of one batch"),
    _m(SPARSITY_TARGET, "target sparsity", None, "any", "any", "final"),
    _m(SPARSITY_ACHIEVED, "sparsity reached", None, "any", "any", "final",
       hint="share of the prunable weights that are zero"),
    _m(PRUNED_TENSORS, "pruned weight tensors", None, "any", "any", "final"),
    _m(PRUNED_CHANNELS, "pruned conv channels", None, "any", "any", "final"),
    _m(FINE_TUNE_EPOCHS, "fine-tuning epochs", None, "any", "any", "final"),
    _m(FINE_TUNE_LR, "fine-tuning learning rate", None, "any", "any", "final"),
    _m(QUANTIZED_LAYERS, "int8 layers", None, "any", "any", "final"),
    _m(FLOAT_LAYERS, "layers left in float", None, "any", "any", "final"),
    _m(DEVICE, "device", None, "any", "any", "final"),
    _m(TORCH_VERSION, "torch version", None, "any", "train", "final"),
    _system(GPU_UTIL, "GPU utilization", "%",
            "share of time a kernel ran; averaged over the job's GPUs"),
    _system(GPU_MEM_GB, "GPU memory used", "GB", "added up over the job's GPUs"),
    _system(GPU_TEMP_C, "GPU temperature", "°C", "the hottest of the job's GPUs"),
    _system(GPU_POWER_W, "GPU power", "W", "added up over the job's GPUs"),
    _system(CPU_PERCENT, "CPU", "%",
            "of one core, the job's process and its children: 200 is two cores busy"),
    _system(RSS_GB, "resident memory", "GB", "the job's process and its children"),
)  # fmt: skip

METRICS: dict[str, Metric] = {m.key: replace(m, order=i) for i, m in enumerate(_DEFINED)}


@dataclass(frozen=True)
class Chart:
    """One chart of the job page: the per-epoch or per-step series drawn together."""

    id: str
    title: str
    keys: tuple[str, ...]
    small: bool = False


CHARTS = (
    Chart("loss", "Loss", (TRAIN_LOSS, VAL_LOSS)),
    Chart("accuracy", "Accuracy and F1", (VAL_ACCURACY, VAL_F1)),
    Chart("error", "Validation error", (VAL_MSE, VAL_MAE)),
    Chart("r2", "Validation R²", (VAL_R2,)),
    Chart("step-loss", "Training loss", (STEP_LOSS,), small=True),
    Chart("lr", "Learning rate", (LR,), small=True),
    Chart("gpu-util", "GPU utilization", (GPU_UTIL,), small=True),
    Chart("gpu-mem", "GPU memory", (GPU_MEM_GB,), small=True),
    Chart("gpu-temp", "GPU temperature", (GPU_TEMP_C,), small=True),
    Chart("gpu-power", "GPU power", (GPU_POWER_W,), small=True),
    Chart("cpu", "CPU", (CPU_PERCENT,), small=True),
    Chart("rss", "Resident memory", (RSS_GB,), small=True),
)

# ---------------------------------------------------------------- lookups

# Keys outside the catalogue (a future metric, an old job's) still get a direction:
# scores are better higher; errors and losses lower; anything else has none.
_HIGHER = ("accuracy", "precision", "recall", "f1", "r2")
_LOWER = ("loss", "mse", "mae")


def _direction_by_name(key: str) -> Direction | None:
    name = key.removeprefix("val_").removeprefix("train_").removeprefix("test_")
    if name in _HIGHER:
        return "max"
    if name in _LOWER or key.endswith("loss"):
        return "min"
    return None


def metric_info(key: str) -> Metric:
    """The catalogue's entry for `key`; for an unknown key, one made up from its name
    (label = key, direction by suffix, after every known key in display order)."""
    known = METRICS.get(key)
    if known is not None:
        return known
    unit = "s" if key.endswith(("duration_s", "time_s")) else None
    kind: JobKind = "train" if key.startswith(("val_", "train_")) else "evaluate"
    return Metric(key, key, _direction_by_name(key), "any", kind, None, unit, "", len(METRICS))


def direction(key: str) -> Direction | None:
    """ "max", "min" or None (not a quality metric) for a metric key."""
    return metric_info(key).direction


def sort_key(key: str) -> tuple[int, str]:
    """Display order: the catalogue's, then unknown keys by name."""
    return metric_info(key).order, key


def per_epoch_keys(task: str | None = None) -> frozenset[str]:
    """The keys logged once per epoch (for `task`'s jobs, or any job's)."""
    return frozenset(
        m.key
        for m in METRICS.values()
        if m.series == "epoch" and (task is None or m.task in ("any", task))
    )


def is_system(key: str) -> bool:
    """Whether `key` is hardware telemetry rather than a result of the job."""
    return metric_info(key).group == "system"


def ranked_metrics(tasks: Sequence[str]) -> tuple[str, ...]:
    """The quality metrics of final results (what the leaderboard can rank) that jobs
    on data of these tasks report, the train key metric first, then in display order."""
    keys = [
        m.key
        for m in METRICS.values()
        if m.direction is not None
        and m.series not in ("step", "time")
        and m.group != "system"
        and (m.task == "any" or m.task in tasks)
    ]
    first = next((k for k in KEY_METRIC_KEYS["train"] if k in keys), None)
    return tuple(sorted(keys, key=lambda k: (k != first, sort_key(k))))


def best_positions(key: str, values: Sequence[Any]) -> set[int]:
    """Positions of the best value(s) among `values` (None: missing) for metric `key`;
    empty when the metric has no better direction or the values do not differ."""
    way = direction(key)
    present = [(i, n) for i, v in enumerate(values) if (n := finite_number(v)) is not None]
    if way is None or len(present) < 2 or len({n for _, n in present}) == 1:
        return set()  # nothing to tell apart
    best = max(n for _, n in present) if way == "max" else min(n for _, n in present)
    return {i for i, n in present if n == best}


# ---------------------------------------------------------------- values


def finite_number(value: Any) -> float | None:
    """`value` as a float when it is a finite number; None otherwise. The one rule for
    "is this a metric value": bools are not numbers (True is an int to Python, not a
    score), NaN and infinities are not, and neither is an int too large for a float
    (JSON carries such ints; float() raises on them)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def final_metrics(result: Any) -> dict[str, float]:
    """result["metrics"]'s finite numbers by key: the values a job can be compared and
    ranked by (no per-class lists, matrices, names or flags). Keys that do not fit the
    job_final_metrics column (1..64 characters) are left out, so the leaderboard's rows
    and every page agree on what a job's final metrics are."""
    metrics = result.get("metrics") if isinstance(result, Mapping) else None
    if not isinstance(metrics, Mapping):
        return {}
    return {
        key: number
        for key, value in metrics.items()
        if isinstance(key, str)
        and 0 < len(key) <= MAX_KEY_CHARS
        and (number := finite_number(value)) is not None
    }


# Per job kind, the keys that can be its key metric, in order of preference.
KEY_METRIC_KEYS: dict[str, tuple[str, ...]] = {
    "train": (VAL_ACCURACY, VAL_LOSS),
    "evaluate": (ACCURACY, MSE),
    # A script names its own metrics: the common names, held-out data first.
    "script": (VAL_ACCURACY, ACCURACY, VAL_LOSS, LOSS),
}


def key_metric(kind: str, metrics: Any) -> tuple[str, float] | None:
    """The one number that sums a job up: the jobs table, the job page, the API's
    `key_metric` and `trainyard jobs` all show this.

    A train job: val_accuracy (classification), else val_loss (regression). Accuracy on
    held-out data is what classification runs are compared by and reads without knowing
    the loss; regression has no accuracy, and val_loss is what picks best.pt unless
    early stopping names another metric, and what the leaderboard ranks regression runs
    by. An evaluate job: accuracy (classification), else mse. Not an evaluation's
    `loss`: that is the source job's loss function (cross-entropy, mse or l1), so it
    would compare different things between evaluations; mse is the same measure for
    every regression evaluation.

    The job's task is not in its result, but its metrics tell it (only classification
    reports accuracy), so the first of those keys with a finite value wins: a diverged
    (NaN) accuracy falls through to the loss rather than showing nothing.
    """
    if not isinstance(metrics, Mapping):
        return None
    for key in KEY_METRIC_KEYS.get(kind, ()):
        number = finite_number(metrics.get(key))
        if number is not None:
            return key, number
    return None


def catalog_json() -> dict[str, Any]:
    """The catalogue for the pages' scripts (a JSON block on the page): metrics in
    display order and the job page's charts, each with its series kind."""
    return {
        "metrics": [
            {
                "key": m.key,
                "label": m.label,
                "unit": m.unit,
                "direction": m.direction,
                "task": m.task,
                "kind": m.kind,
                "series": m.series,
                "order": m.order,
                "group": m.group,
            }
            for m in METRICS.values()
        ],
        "charts": [
            {
                "id": c.id,
                "title": c.title,
                "keys": list(c.keys),
                "series": METRICS[c.keys[0]].series,
                "small": c.small,
            }
            for c in CHARTS
        ],
    }
