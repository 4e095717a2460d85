"""``GET /metrics``: Prometheus text."""

from __future__ import annotations

from ..metrics import CONTENT_TYPE, REGISTRY, Metrics
from ..services import Services
from ..web import Request, Response, Route


def routes(services: Services, registry: Metrics = REGISTRY) -> list[Route]:
    def handler(request: Request) -> Response:
        text = registry.render(services.store, services.clock(), services.config.litestream_socket)
        return Response(raw=text.encode("utf-8"), content_type=CONTENT_TYPE)

    return [Route("GET", "/metrics", handler, "Prometheus metrics", tag="ops", media_type="text/plain")]
