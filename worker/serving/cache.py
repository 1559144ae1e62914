"""Loaded model versions, least recently used first out, bounded in bytes
(TRAINYARD_SERVE_CACHE_BYTES).

A version is loaded once, on its first request: its pinned files are downloaded from
the artifact store (a local directory or a bucket) into a temporary directory, each
file's SHA-256 and size compared with what the registry recorded (the bytes checked are
the bytes loaded), the model built on the CPU in eval mode, and one forward pass run on
a zero batch (the first real request then pays no lazy initialisation). Concurrent
first requests for one version wait for the one load. Each loaded version has its own
Batcher. A version pushed out of the budget is closed (its queued requests are still
answered) and loaded again if asked for; the version just loaded always stays, even
alone over the budget.
"""

from __future__ import annotations

import collections
import logging
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shared.artifact_store import ArtifactStore, ArtifactStoreError
from worker.serving.batcher import Batcher
from worker.serving.errors import ServeError
from worker.serving.inputs import InputSpec, input_spec
from worker.serving.loader import check_files, load_version_files
from worker.serving.stats import ServeStats
from worker.training.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VersionRef:
    """What loading a version needs, read from its row while the session was open."""

    id: int
    model: str
    version: int
    job_kind: str
    model_file: str
    files: tuple[tuple[str, str, str, int], ...]  # (name, store key, sha256, size_bytes)


@dataclass
class Served:
    ref: VersionRef
    model: torch.nn.Module
    task: str
    num_classes: int
    inputs: InputSpec
    batcher: Batcher
    nbytes: int
    loaded_at: float
    load_s: float

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.ref.model,
            "version": self.ref.version,
            "job_kind": self.ref.job_kind,
            "task": self.task,
            "num_classes": self.num_classes,
            "input": self.inputs.describe(),
            "bytes": self.nbytes,
            "load_s": round(self.load_s, 3),
        }


def model_bytes(model: torch.nn.Module) -> int:
    total = 0
    for value in model.state_dict().values():
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
    return total


class ModelCache:
    def __init__(
        self,
        store: ArtifactStore,
        stats: ServeStats,
        *,
        budget_bytes: int,
        max_batch: int,
        max_wait_s: float,
        queue_limit: int,
        batching: bool,
    ) -> None:
        self.store, self.stats, self.budget = store, stats, budget_bytes
        self.batcher_options = {
            "max_batch": max_batch, "max_wait_s": max_wait_s,
            "queue_limit": queue_limit, "enabled": batching,
        }  # fmt: skip
        self._lock = threading.Lock()
        self._loaded: collections.OrderedDict[int, Served] = collections.OrderedDict()
        self._loading: dict[int, threading.Lock] = {}
        self.evictions = 0

    def get(self, ref: VersionRef) -> Served:
        with self._lock:
            found = self._loaded.get(ref.id)
            if found is not None:
                self._loaded.move_to_end(ref.id)
                return found
            gate = self._loading.setdefault(ref.id, threading.Lock())
        with gate:  # one load per version; the others wait for it
            with self._lock:
                found = self._loaded.get(ref.id)
                if found is not None:
                    self._loaded.move_to_end(ref.id)
                    return found
            served = self._load(ref)
            with self._lock:
                self._loaded[ref.id] = served
                self._loading.pop(ref.id, None)
                self._evict(keep=ref.id)
            return served

    def loaded(self) -> list[Served]:
        with self._lock:
            return list(self._loaded.values())

    def total_bytes(self) -> int:
        with self._lock:
            return sum(s.nbytes for s in self._loaded.values())

    def _evict(self, keep: int) -> None:
        total = sum(s.nbytes for s in self._loaded.values())
        for version_id in list(self._loaded):
            if total <= self.budget:
                break
            if version_id == keep:
                continue
            gone = self._loaded.pop(version_id)
            gone.batcher.close()
            total -= gone.nbytes
            self.evictions += 1
            log.info("unloaded %s version %d (cache over %d bytes)",
                     gone.ref.model, gone.ref.version, self.budget)  # fmt: skip

    def _load(self, ref: VersionRef) -> Served:
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="trainyard-serve-") as tmp:
            directory = Path(tmp)
            try:
                for name, key, _sha, _size in ref.files:
                    self.store.get_file(key, directory / name)
            except ArtifactStoreError as exc:
                log.warning("cannot fetch %s version %d: %s", ref.model, ref.version, exc)
                raise ServeError(503, "store_unavailable", "the model's files cannot be read "
                                 "from the artifact store now; try again",
                                 headers={"Retry-After": "5"}) from None  # fmt: skip
            pinned = [{"name": n, "sha256": s, "size_bytes": z} for n, _k, s, z in ref.files]
            problems = check_files(directory, pinned)
            if problems:
                log.error("%s version %d: files changed since registration: %s",
                          ref.model, ref.version, problems)  # fmt: skip
                raise ServeError(500, "model_files_changed",
                                 f"{ref.model} version {ref.version}'s files are not what was "
                                 "registered; it is not served", problems)  # fmt: skip
            try:
                loaded = load_version_files(directory, ref.job_kind, ref.model_file)
            except UserError as exc:
                raise ServeError(500, "model_unloadable",
                                 f"{ref.model} version {ref.version} cannot be loaded: {exc}",
                                 {}) from None  # fmt: skip
        model = loaded.model.eval()
        spec = input_spec(loaded)
        dtype = torch.long if spec.kind == "sequence" else torch.float32
        with torch.inference_mode():
            model(torch.zeros((1, *spec.shape), dtype=dtype))  # warm-up
        file_bytes = next((z for n, _k, _s, z in ref.files if n == ref.model_file), 0)
        batcher = Batcher(
            model,
            name=f"{ref.model}-{ref.version}",
            on_batch=lambda rows: self.stats.batch(ref.model, ref.version, rows),
            **self.batcher_options,
        )
        load_s = time.perf_counter() - started
        log.info("loaded %s version %d in %.2f s", ref.model, ref.version, load_s)
        return Served(
            ref=ref,
            model=model,
            task=loaded.info.task,
            num_classes=loaded.info.num_classes,
            inputs=spec,
            batcher=batcher,
            nbytes=max(model_bytes(model), file_bytes, 1),
            loaded_at=time.time(),
            load_s=load_s,
        )
