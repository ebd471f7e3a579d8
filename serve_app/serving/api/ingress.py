"""The HTTP ingress deployment: the router engineer's `SpeechRouter` + FastAPI app, wrapped for Ray Serve.

`SpeechIngressReplica` is the plain class (tests construct it with fake handles and call
`__serve_build_asgi_app__()`); `SpeechIngress` is the deployment, using `@serve.ingress()`'s late-bound form so
the FastAPI app is built per replica around that replica's router.
"""
from __future__ import annotations

import logging
from typing import Any

from ray import serve

from serve_app.serving.api.app import build_app
from serve_app.serving.api.router import SpeechRouter
from serve_app.serving.router_settings import RouterSettings
from serve_app.serving.stages.stage_common import configure_replica_logging

log = logging.getLogger(__name__)


class SpeechIngressReplica:
    def __init__(self, t3_handle: Any, s3gen_handle: Any, voice_handle: Any, settings: dict | None = None,
                 *, watermarker: Any = None) -> None:
        configure_replica_logging()
        kwargs = {} if watermarker is None else {"watermarker": watermarker}
        self.router = SpeechRouter(t3_handle, s3gen_handle, voice_handle, RouterSettings(**(settings or {})), **kwargs)
        s = self.router.settings
        log.info("router ready: model=%s weights=%s%s watermark=%s auth=%s max_new_tokens=%d", s.model_name,
                 s.checkpoint_source, " (RANDOM)" if s.is_random_weights else "", "on" if s.watermark else "off",
                 "on" if s.api_keys else "off", s.max_new_tokens)

    def __serve_build_asgi_app__(self):
        return build_app(self.router)


SpeechIngress = serve.deployment(serve.ingress()(SpeechIngressReplica), name="SpeechIngress")
