"""Per-user limits: the role's settings, and an admin's overrides for one user.

Every limit is a pair of settings in shared/settings.py, `<name>_per_user` for members
and `<name>_per_admin` for admins (a few quotas have only the member setting, which
then applies to both roles). An admin overrides one user's limit in users.limits, a
JSON object keyed by the `<name>_per_user` setting; a missing key (or users.limits
NULL) means the role's setting. The admin API and `trainyard user limits` name limits
by the short `<name>` (`max_params`), as LIMITS lists them.

`check_job` holds a job to the submission limits (its size, batch, epochs, runtime);
the other limits are enforced where they apply (uploads and tokens in server/quotas.py,
running jobs and GPU-hours when a worker claims a job).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shared.settings import Settings

if TYPE_CHECKING:
    # Only for annotations: the CLI imports this module to name its options, and
    # the spec's pydantic models would slow every `trainyard` command's start.
    from shared.job_estimate import JobEstimate
    from shared.spec import AnySpec

GIB = 1024**3


@dataclass(frozen=True)
class Limit:
    name: str  # short name: API field, CLI option (dashed), key of effective limits
    kind: type  # int or float
    description: str
    has_admin_setting: bool = True
    zero_means_unlimited: bool = False

    @property
    def user_setting(self) -> str:
        """The member setting, which is also the key of an override in users.limits."""
        return f"{self.name}_per_user"

    @property
    def admin_setting(self) -> str:
        return f"{self.name}_per_admin" if self.has_admin_setting else self.user_setting


LIMITS: dict[str, Limit] = {
    limit.name: limit
    for limit in (
        Limit("max_params", int, "parameters of a job's model"),
        Limit("max_memory_gib", float, "estimated memory of a job, GiB (shared/job_estimate.py)"),
        Limit("max_batch_size", int, "batch_size of a job"),
        Limit("max_epochs", int, "epochs of a train job"),
        Limit("default_runtime_s", int, "max_runtime_s a job gets when its spec sets none"),
        Limit("max_runtime_s", int, "the largest max_runtime_s a job may set"),
        Limit("max_running_jobs", int, "jobs running at once", zero_means_unlimited=True),
        Limit("gpu_hours_per_day", float, "GPU-hours in the last 24 h", zero_means_unlimited=True),
        Limit("max_upload_bytes", int, "bytes of CSV uploads kept", has_admin_setting=False),
        Limit("max_uploads", int, "CSV uploads kept", has_admin_setting=False),
        Limit("max_tokens", int, "unrevoked API tokens", has_admin_setting=False),
    )
}
# The limits a submission checks; the rest are enforced elsewhere (see the docstring).
SUBMISSION_LIMITS = (
    "max_params", "max_memory_gib", "max_batch_size", "max_epochs", "default_runtime_s",
    "max_runtime_s",
)  # fmt: skip


class LimitsError(ValueError):
    """A bad override; `field` names the limit."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def role_limits(settings: Settings, role: str) -> dict[str, int | float]:
    """Every limit's value for a role, from the settings."""
    return {
        name: getattr(settings, limit.admin_setting if role == "admin" else limit.user_setting)
        for name, limit in LIMITS.items()
    }


def effective_limits(
    settings: Settings, role: str, overrides: Mapping[str, Any] | None
) -> dict[str, int | float]:
    """A user's limits: the role's, with the admin's overrides (users.limits) on top."""
    limits = role_limits(settings, role)
    for name in limits:
        value = (overrides or {}).get(LIMITS[name].user_setting)
        if isinstance(value, int | float) and not isinstance(value, bool):
            limits[name] = value
    return limits


def overrides_by_name(overrides: Mapping[str, Any] | None) -> dict[str, int | float]:
    """users.limits keyed by the short names (keys this build does not know are left out)."""
    by_setting = {limit.user_setting: name for name, limit in LIMITS.items()}
    return {by_setting[k]: v for k, v in (overrides or {}).items() if k in by_setting}


def parse_value(name: str, value: Any) -> int | float | None:
    """An override as an admin gave it (5e9 and "5e9" are fine for integers); None resets."""
    limit = LIMITS.get(name)
    if limit is None:
        raise LimitsError(name, f"unknown limit; choose from: {', '.join(LIMITS)}")
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value.replace("_", ""))
        except ValueError:
            raise LimitsError(name, f"{value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise LimitsError(name, "must be a number, or null for the role's default")
    if value < 0 or (value == 0 and not limit.zero_means_unlimited):
        raise LimitsError(
            name,
            "must be 0 (no limit) or more" if limit.zero_means_unlimited else "must be positive",
        )
    if limit.kind is int:
        if value != int(value):
            raise LimitsError(name, "must be a whole number")
        if value > 2**53:
            raise LimitsError(name, "too large")
        return int(value)
    return float(value)


def apply_changes(
    current: Mapping[str, Any] | None, changes: Mapping[str, Any]
) -> dict[str, Any] | None:
    """users.limits after an admin's changes (short names; None resets one to the role's).

    Keys this build does not know are kept as they are: another version may use them.
    """
    merged = dict(current or {})
    for name, raw in changes.items():
        value = parse_value(name, raw)
        key = LIMITS[name].user_setting
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged or None


# ---------------------------------------------------------------- submission


def apply_defaults(spec: AnySpec, limits: Mapping[str, int | float]) -> None:
    """Fill in what the limits decide for a spec that leaves it open (max_runtime_s)."""
    if spec.max_runtime_s is None:
        spec.max_runtime_s = int(min(limits["default_runtime_s"], limits["max_runtime_s"]))


def size_text(n: int) -> str:
    """Bytes for people: 3 significant digits in the largest unit that fits."""
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def memory_text(estimate: JobEstimate) -> str:
    parts = [
        f"weights {size_text(estimate.weights)}",
        f"gradients {size_text(estimate.gradients)}" if estimate.gradients else "",
        f"optimizer state {size_text(estimate.optimizer_state)}"
        if estimate.optimizer_state
        else "",
        f"activations of a {estimate.batch:,}-sample batch {size_text(estimate.activations)}",
        f"data {size_text(estimate.data)}" if estimate.data else "",
    ]
    return ", ".join(p for p in parts if p)


def check_job(
    spec: AnySpec,
    estimate: JobEstimate | None,
    limits: Mapping[str, int | float],
) -> dict[str, str]:
    """{field: message} for each limit the job exceeds (empty: within every limit)."""
    problems: dict[str, str] = {}

    def add(field: str, message: str) -> None:
        problems[field] = f"{problems[field]}; {message}" if field in problems else message

    if estimate is not None:
        if estimate.params > limits["max_params"]:
            add(
                estimate.size_field,
                f"the model would have {estimate.params:,} parameters; the limit is "
                f"{int(limits['max_params']):,}",
            )
        max_bytes = limits["max_memory_gib"] * GIB
        if estimate.total_bytes > max_bytes:
            # Name what would bring it down most: the batch when activations dominate.
            biggest = max(
                ("activations", "data", "model"),
                key=lambda p: {
                    "activations": estimate.activations,
                    "data": estimate.data,
                    "model": estimate.weights + estimate.gradients + estimate.optimizer_state,
                }[p],
            )
            field = {"activations": "batch_size", "data": "dataset.name"}.get(
                biggest, estimate.size_field
            )
            add(
                field,
                f"the job would need about {size_text(estimate.total_bytes)} of memory "
                f"({memory_text(estimate)}); the limit is {limits['max_memory_gib']:g} GiB",
            )
    memory_gb = spec.resources.memory_gb
    if memory_gb is not None and memory_gb * 1e9 > limits["max_memory_gib"] * GIB:
        # What a script job asks for is all there is to hold it to (no estimate).
        add(
            "resources.memory_gb",
            f"{memory_gb:g} GB is over the limit of {limits['max_memory_gib']:g} GiB",
        )
    batch_size = getattr(spec, "batch_size", None)  # script jobs have none
    if batch_size is not None and batch_size > limits["max_batch_size"]:
        add(
            "batch_size",
            f"{batch_size:,} is over the limit of {int(limits['max_batch_size']):,}",
        )
    if spec.kind == "train" and spec.epochs > limits["max_epochs"]:
        add("epochs", f"{spec.epochs:,} is over the limit of {int(limits['max_epochs']):,}")
    tune = getattr(spec, "fine_tune_epochs", 0)  # a prune job's fine-tuning is training
    if tune > limits["max_epochs"]:
        add("fine_tune_epochs", f"{tune:,} is over the limit of {int(limits['max_epochs']):,}")
    if spec.max_runtime_s is not None and spec.max_runtime_s > limits["max_runtime_s"]:
        add(
            "max_runtime_s",
            f"{spec.max_runtime_s:,} s is over the limit of {int(limits['max_runtime_s']):,} s",
        )
    return problems
