"""TensorBoard event files written by the worker while a train job runs
(TRAINYARD_TENSORBOARD_LIVE), next to the attempt's checkpoints:
`<attempt dir>/tensorboard/events.out.tfevents.*`.

The metric sink hands each batch of points it has stored to the attempt's LiveRun
(shared/tensorboard_export.py), so the file holds what the database holds, with the
same tags as the download. Built-in train jobs only: a script job's directory is its
own (any file in it counts as its checkpoint), and it can write TensorBoard files itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from shared.settings import Settings
from shared.state_machine import Claim

LIVE_DIR = "tensorboard"

Writer = Callable[[Iterable[Mapping[str, Any]]], None]


def writer(settings: Settings, claim: Claim, attempt_dir: Path) -> Writer | None:
    """The sink's `on_written` for this attempt, or None when live files are off."""
    if not settings.tensorboard_live or claim.kind != "train":
        return None
    # Imported here: workers with live files off never load the protobuf modules.
    from shared.tensorboard_export import LiveRun

    live = LiveRun(attempt_dir / LIVE_DIR, claim.job_id, claim.attempt, claim.spec, time.time())
    return live.write
