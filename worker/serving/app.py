"""The prediction server's WSGI app (werkzeug; the worker side never imports Flask).

    POST /api/v1/models/<name>/predict                      the production version
         ...?stage=staging                                  the newest staging version
    POST /api/v1/models/<name>/versions/<version>/predict   exactly that version
    GET  /api/v1/serve/stats                                this process's statistics
    GET  /metrics                                           the same, for Prometheus
    GET  /healthz                                           no token needed

Tokens and ownership as in the API (server/auth.py, shared/model_registry.py): a
Bearer token, else 401; a member predicts with their own models, an admin with any;
another user's model reads as missing (404). Errors have the API's shape,
{"error": {"code", "message", "fields"}}.

Hot swap: which version a name and stage mean is looked up again once
TRAINYARD_SERVE_RESOLVE_SECONDS have passed, so a version moved to production answers
the next requests without a restart; the old one leaves the cache by LRU. Tokens are
re-checked as often (a revoked token stops working within that time).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from typing import Any

import torch
from prometheus_client import CONTENT_TYPE_LATEST
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request, Response

from shared import accounts
from shared import model_registry as registry
from shared.artifact_store import ArtifactStore, store_for
from shared.db import session_factory
from shared.settings import Settings
from worker.serving.batcher import BatcherClosed, QueueFull
from worker.serving.cache import ModelCache, Served, VersionRef
from worker.serving.errors import ServeError, invalid
from worker.serving.inputs import parse_body
from worker.serving.metrics import render as render_metrics
from worker.serving.stats import Publisher, ServeStats

log = logging.getLogger(__name__)

SERVED_STAGES = ("production", "staging")


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    text = json.dumps(body, separators=(",", ":"), allow_nan=False)
    return Response(text, status=status, headers=headers, mimetype="application/json")


def _unauthorized(message: str) -> ServeError:
    return ServeError(401, "unauthorized", message,
                      {"Authorization": "send 'Authorization: Bearer <token>'"},
                      headers={"WWW-Authenticate": 'Bearer realm="trainyard"'})  # fmt: skip


def _not_found(field: str, problem: str) -> ServeError:
    return ServeError(404, "not_found", problem, {field: problem})


class _Ttl:
    """A small dict whose entries expire after `ttl_s` (0: nothing is kept)."""

    def __init__(self, ttl_s: float, max_entries: int = 10_000) -> None:
        self.ttl_s, self.max_entries = ttl_s, max_entries
        self._data: dict[Any, tuple[float, Any]] = {}
        self._lock = threading.Lock()

    def get(self, key: Any) -> tuple[bool, Any]:
        with self._lock:
            found = self._data.get(key)
        if found is None or found[0] < time.monotonic():
            return False, None
        return True, found[1]

    def put(self, key: Any, value: Any) -> None:
        if self.ttl_s <= 0:
            return
        with self._lock:
            if len(self._data) >= self.max_entries:
                now = time.monotonic()
                self._data = {k: v for k, v in self._data.items() if v[0] >= now}
                if len(self._data) >= self.max_entries:
                    self._data.clear()
            self._data[key] = (time.monotonic() + self.ttl_s, value)


class ServeApp:
    def __init__(self, settings: Settings, store: ArtifactStore | None = None) -> None:
        self.settings = settings
        self.sessions = session_factory(settings.resolved_database_url)
        self.store = store or store_for(settings)
        self.stats = ServeStats()
        self.cache = ModelCache(
            self.store,
            self.stats,
            budget_bytes=settings.serve_cache_bytes,
            max_batch=settings.serve_max_batch,
            max_wait_s=settings.serve_max_wait_ms / 1000.0,
            queue_limit=settings.serve_queue_limit,
            batching=settings.serve_batching,
        )
        self._names = _Ttl(settings.serve_resolve_seconds)
        self._tokens = _Ttl(settings.serve_resolve_seconds)
        self.url_map = Map(
            [
                Rule("/healthz", endpoint="health", methods=["GET"]),
                Rule("/api/v1/serve/stats", endpoint="stats", methods=["GET"]),
                Rule("/metrics", endpoint="metrics", methods=["GET"]),
                Rule("/api/v1/models/<name>/predict", endpoint="predict", methods=["POST"]),
                Rule(
                    "/api/v1/models/<name>/versions/<int(signed=True):version>/predict",
                    endpoint="predict",
                    methods=["POST"],
                ),  # fmt: skip
            ],
            strict_slashes=False,
        )
        self.publisher: Publisher | None = None
        if settings.redis_url:
            self.publisher = Publisher(self.stats, settings.redis_url, settings.serve_stats_seconds)
            self.publisher.start()

    # ------------------------------------------------------------ WSGI

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        request = Request(environ)
        request.max_content_length = self.settings.max_body_bytes
        try:
            response = self.dispatch(request)
        except ServeError as exc:
            response = json_response(exc.body(), exc.status, exc.headers)
        except HTTPException as exc:
            code = (exc.name or "error").lower().replace(" ", "_")
            body = {"error": {"code": code, "message": exc.description or exc.name, "fields": {}}}
            response = json_response(body, exc.code or 500)
        except Exception:  # noqa: BLE001 - the client gets a 500, the log the traceback
            log.exception("%s %s failed", request.method, request.path)
            body = {"error": {"code": "internal", "message": "internal error", "fields": {}}}
            response = json_response(body, 500)
        return response(environ, start_response)

    def dispatch(self, request: Request) -> Response:
        adapter = self.url_map.bind_to_environ(request.environ)
        endpoint, args = adapter.match()
        if endpoint == "health":
            return json_response({"status": "ok", "loaded": len(self.cache.loaded())})
        if endpoint == "metrics":
            self.allow_scrape(request)
            return Response(render_metrics(self.stats), content_type=CONTENT_TYPE_LATEST)
        actor = self.authenticate(request)
        if endpoint == "stats":
            return json_response(self.stats_json(actor))
        return self.predict(request, actor, args["name"], args.get("version"))

    # ------------------------------------------------------------ who asks

    def allow_scrape(self, request: Request) -> None:
        """GET /metrics: the scrape token (TRAINYARD_METRICS_TOKEN), or an admin's token,
        as on the web's own /metrics."""
        token = self.settings.metrics_token
        sent = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if token and hmac.compare_digest(sent.encode(), token.encode()):
            return
        if not self.authenticate(request).is_admin:
            raise ServeError(403, "forbidden", "metrics are for admins and the scrape token",
                             {"Authorization": "an admin's token or TRAINYARD_METRICS_TOKEN"})  # fmt: skip

    def authenticate(self, request: Request) -> registry.Actor:
        header = request.headers.get("Authorization")
        if header is None:
            raise _unauthorized("authentication required")
        scheme, _, secret = header.partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            raise _unauthorized("the Authorization header must be 'Bearer <token>'")
        key = hashlib.sha256(secret.encode()).digest()
        hit, actor = self._tokens.get(key)
        if hit:
            return actor
        with self.sessions() as session:
            user = accounts.user_for_token(session, secret)
            if user is None:
                raise _unauthorized("invalid or revoked API token")
            actor = registry.Actor(user.id, user.role == "admin")
            session.commit()  # user_for_token may have stamped last_used_at
        self._tokens.put(key, actor)
        return actor

    # ------------------------------------------------------------ which version

    def resolve(
        self, name: str, stage: str | None, version: int | None
    ) -> tuple[bool, int | None, VersionRef | None]:
        """(whether the model exists, its owner's id, the version or None) for a name
        and a stage or version number. Kept for TRAINYARD_SERVE_RESOLVE_SECONDS."""
        key = (name, stage, version)
        hit, found = self._names.get(key)
        if hit:
            return found
        with self.sessions() as session:
            model = registry.find_model(session, name)
            if model is None:
                found = (False, None, None)
            else:
                row = registry.resolve(session, name, stage=stage, version=version)
                ref = None
                if row is not None:
                    files = tuple(
                        (f["name"], registry.file_key(session, row, f["name"]), f["sha256"],
                         int(f["size_bytes"]))
                        for f in row.files
                    )  # fmt: skip
                    ref = VersionRef(row.id, name, row.version, row.job_kind, row.model_file, files)
                found = (True, model.owner_id, ref)
        self._names.put(key, found)
        return found

    # ------------------------------------------------------------ predict

    def predict(
        self, request: Request, actor: registry.Actor, name: str, version: int | None
    ) -> Response:
        started = time.perf_counter()
        stage = None
        if version is None:
            stage = request.args.get("stage", "production")
            if stage not in SERVED_STAGES:
                raise invalid("stage", f"one of {', '.join(SERVED_STAGES)} (or ask for a version)")
        exists, owner, ref = self.resolve(name, stage, version)
        if not exists or not actor.may_use(owner):
            # Another user's model reads as missing, as in the API.
            raise _not_found("name", f"no model named {name!r}")
        if ref is None:
            if version is not None:
                raise _not_found("version", f"{name} has no version {version}")
            raise _not_found("stage", f"{name} has no {stage} version")
        status, rows = 500, 0
        try:
            served = self.cache.get(ref)
            body = self._json(request)
            x = parse_body(body, served.inputs, self.settings.serve_max_rows)
            rows = x.shape[0]
            out = self._forward(served, x)
            status = 200
        except ServeError as exc:
            status = exc.status
            raise
        finally:
            ms = (time.perf_counter() - started) * 1000.0
            self.stats.request(ref.model, ref.version, status, ms, rows if status == 200 else 0)
        return json_response(
            {"model": name, "version": ref.version, "predictions": predictions(served, out)},
            headers={"X-Model-Version": str(ref.version)},
        )

    def _json(self, request: Request) -> Any:
        try:
            data = request.get_data(cache=False)
        except RequestEntityTooLarge:
            raise ServeError(413, "too_large",
                             f"the body is over {self.settings.max_body_bytes:,} bytes",
                             {"body": f"at most {self.settings.max_body_bytes:,} bytes "
                                      "(TRAINYARD_MAX_BODY_BYTES)"}) from None  # fmt: skip
        if len(data) > self.settings.max_body_bytes:
            raise ServeError(413, "too_large", "the body is too large",
                             {"body": f"at most {self.settings.max_body_bytes:,} bytes"})  # fmt: skip
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise ServeError(400, "invalid_json", "the body is not JSON",
                             {"body": f"not JSON: {exc}"}) from None  # fmt: skip

    def _forward(self, served: Served, x: torch.Tensor) -> torch.Tensor:
        for _ in range(2):
            try:
                return served.batcher.submit(x)
            except QueueFull:
                raise ServeError(503, "overloaded",
                                 f"{served.ref.model} version {served.ref.version} has "
                                 f"{self.settings.serve_queue_limit} requests waiting; try again",
                                 {}, headers={"Retry-After": "1"}) from None  # fmt: skip
            except TimeoutError:
                raise ServeError(503, "timeout", "no forward pass in time; try again", {},
                                 headers={"Retry-After": "1"}) from None  # fmt: skip
            except BatcherClosed:
                served = self.cache.get(served.ref)  # unloaded meanwhile: load it again
        raise ServeError(503, "overloaded", "the model was unloaded; try again", {},
                         headers={"Retry-After": "1"})  # fmt: skip

    # ------------------------------------------------------------ stats

    def stats_json(self, actor: registry.Actor) -> dict[str, Any]:
        snapshot = self.stats.snapshot()
        loaded = [s.describe() for s in self.cache.loaded()]
        if not actor.is_admin:
            with self.sessions() as session:
                names = {n for n in snapshot["models"] if registry.visible_model(session, n, actor)}
            snapshot["models"] = {n: v for n, v in snapshot["models"].items() if n in names}
            loaded = [d for d in loaded if d["model"] in names]
        snapshot["loaded"] = loaded
        snapshot["settings"] = {
            "batching": self.settings.serve_batching,
            "max_batch": self.settings.serve_max_batch,
            "max_wait_ms": self.settings.serve_max_wait_ms,
            "queue_limit": self.settings.serve_queue_limit,
            "cache_bytes": self.settings.serve_cache_bytes,
        }
        if actor.is_admin:
            snapshot["cache"] = {
                "bytes": self.cache.total_bytes(),
                "evictions": self.cache.evictions,
            }
        return snapshot


def predictions(served: Served, out: torch.Tensor) -> list[dict[str, Any]]:
    out = out.float()
    if served.task == "classification":
        probs = torch.softmax(out, dim=1)
        classes = probs.argmax(dim=1).tolist()
        return [
            {"class": c, "probabilities": p} for c, p in zip(classes, probs.tolist(), strict=True)
        ]
    return [{"value": v} for v in out.reshape(out.shape[0], -1)[:, 0].tolist()]


def create_app(settings: Settings) -> ServeApp:
    return ServeApp(settings)
