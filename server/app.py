"""Flask app factory. Nothing happens at import time; `create_app()` builds everything."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, current_app, jsonify
from flask.typing import ResponseReturnValue
from sqlalchemy import text
from werkzeug.middleware.proxy_fix import ProxyFix

from server import (
    api,
    artifacts_api,
    auth,
    bundles_api,
    cluster_api,
    database,
    enqueue,
    openapi,
    prometheus,
    quotas,
    registry_api,
    sweeps_api,
    tensorboard_api,
    timeline_api,
    tokens_api,
    uploads_api,
    users_api,
    web,
    web_metrics,
    webhooks_api,
)
from server.database import get_session
from server.errors import register_error_handlers
from shared import broker
from shared.settings import Settings, load_settings

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, config: dict[str, Any] | None = None) -> Flask:
    settings = settings or load_settings()
    app = Flask(__name__)
    # "//" in a path is a 404 like any other bad path, not a redirect that rewrites it
    # (an artifact name must never be reinterpreted on the way to its check).
    app.url_map.merge_slashes = False
    app.config.update(
        TRAINYARD_SETTINGS=settings,
        DATABASE_URL=settings.resolved_database_url,
        # Werkzeug refuses larger bodies with 413 before anything parses them.
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        JSON_SORT_KEYS=False,
    )
    if config:
        app.config.update(config)
    if settings.trusted_proxies:
        # Behind N proxies, the address a proxy saw is the Nth X-Forwarded-For entry from
        # the right; entries further left were written by the client and are ignored.
        # Without a proxy the headers are not read at all: the login throttle sees the
        # socket's peer, which a client cannot choose.
        n = settings.trusted_proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n, x_host=n)  # type: ignore[method-assign]

    database.init_app(app)
    enqueue.init_app(app, settings)
    auth.init_app(app, settings)
    quotas.check_rate_settings(settings)
    register_error_handlers(app)
    app.register_blueprint(api.bp)
    app.register_blueprint(uploads_api.bp)
    app.register_blueprint(bundles_api.bp)
    app.register_blueprint(sweeps_api.bp)
    app.register_blueprint(registry_api.bp)
    app.register_blueprint(artifacts_api.bp)
    app.register_blueprint(tokens_api.bp)
    app.register_blueprint(users_api.bp)
    app.register_blueprint(timeline_api.bp)
    app.register_blueprint(tensorboard_api.bp)
    app.register_blueprint(cluster_api.bp)
    app.register_blueprint(webhooks_api.bp)
    app.register_blueprint(prometheus.bp)
    app.register_blueprint(web.bp)
    web.filters.init_app(app)
    app.register_blueprint(openapi.bp)
    app.add_url_rule("/healthz", "healthz", healthz)
    openapi.init_app(app)
    app.after_request(security_headers)
    web_metrics.install(app)
    return app


# Scripts and styles only from this origin: no inline script, so an injected <script>
# in a job name cannot run; no framing (clickjacking); forms post only here.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
    "form-action 'self'"
)


def security_headers(response: Response) -> Response:
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    if response.mimetype == "text/html":
        response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Cross-Origin-Opener-Policy", "same-origin")
    return response


def healthz() -> ResponseReturnValue:
    status: dict[str, str] = {}
    ok = True
    try:
        get_session().execute(text("SELECT 1"))
        status["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 - the health check reports, it does not raise
        ok = False
        status["database"] = f"error: {type(exc).__name__}"
    redis_url = current_app.config["TRAINYARD_SETTINGS"].redis_url
    if not redis_url:
        status["broker"] = "not configured"
    else:
        try:
            broker.ping(redis_url, timeout_s=1)
            status["broker"] = "ok"
        except Exception as exc:  # noqa: BLE001
            ok = False
            status["broker"] = f"error: {type(exc).__name__}"
    return jsonify({"status": "ok" if ok else "degraded", **status}), 200 if ok else 503
