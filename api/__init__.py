"""D3 deepfake detection API: the Flask application factory."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from api.config import load_settings
from api.utils.multipart import Request

if TYPE_CHECKING:  # `import api` stays light (no torch) for the commands that never load a model
    from api.detector.interface import Engine
    from api.detector.registry import DetectorRegistry


def create_app(test_config: Mapping[str, Any] | None = None, *, engine: Engine | None = None,
               detectors: DetectorRegistry | None = None) -> Flask:
    """Build the app: settings from the environment (and `test_config` on top), then services.

    `engine` and `detectors` let tests and benchmarks share an already-started InferenceEngine and
    DetectorRegistry (speech and text).
    """
    from api import auth, errors, limits, metrics, request_log, tasks
    from api.context import build_services
    from api.detector.config import UNTRAINED_WARNING
    from api.routes import audio, docs, health, model_versions, objects, predict, predictions, text, video, web

    settings = load_settings(test_config)
    logging.basicConfig(level=settings.log_level)
    request_log.use_json_logging()  # every line this process logs is JSON, start-up included
    app = Flask(__name__, instance_path=settings.instance_dir)
    app.request_class = Request  # python-multipart parses uploads (see api/utils/multipart.py)
    app.config.from_mapping(
        SETTINGS=settings,
        # The largest body any route accepts; routes lower it for themselves.
        MAX_CONTENT_LENGTH=max(settings.max_video_bytes, settings.max_audio_bytes, settings.max_text_bytes,
                               settings.max_image_bytes * settings.max_batch_files) + 1024 * 1024,
        MAX_FORM_PARTS=settings.max_batch_files + 16,
    )
    app.json.sort_keys = False
    app.extensions["d3"] = build_services(settings, engine, detectors)

    errors.init_app(app)
    for module in (health, predict, predictions, video, audio, text, model_versions, objects, docs, web):
        app.register_blueprint(module.bp)
    # Cross-cutting concerns, in order: the request id and timing cover every later hook, and a
    # verified key decides the rate-limit bucket.
    request_log.init_app(app)
    metrics.init_app(app)
    auth.init_app(app)
    limits.init_app(app)
    tasks.init_app(app)  # starts the video job executor; sweeps temp uploads of dead workers
    app.extensions["d3"].prober.start()  # /health answers from its verdicts
    app.extensions["d3"].reconciler.start()  # objects no row references, older than the grace period
    # Exactly one trusted proxy hop (nginx on the same host) tells the client address.
    app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1)

    @app.after_request
    def _untrained_warning(response):
        engine_ = app.extensions["d3"].engine
        if engine_.ready and not engine_.trained:
            response.headers["X-D3-Warning"] = UNTRAINED_WARNING
        return response

    return app
