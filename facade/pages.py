"""The pages a person opens: the playground at ``/`` and Swagger UI at ``/docs``.

Static files shipped in the package (facade/static) and Swagger UI's bundle from
the swagger-ui-py wheel: nothing is fetched from a CDN and nothing is built at
run time. The pages hold no data, so they are open even when API_KEY is set; the
playground asks for the key and sends it with its API calls.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from aiohttp import web

STATIC = Path(__file__).resolve().parent / "static"


def _swagger_ui_assets() -> Path:
    """swagger-ui-py's static folder, found without importing the package (it imports its web adapters)."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("swagger-ui-py is not installed (a dependency of switchyard)")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


async def playground(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "playground.html")


async def docs(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "docs.html")


#: Paths served without an API key (prefixes end with "/").
OPEN_PREFIXES = ("/static/", "/docs/assets/")
OPEN_PAGES = frozenset({"/", "/docs", "/openapi.json"})


def is_open_page(request: web.Request) -> bool:
    return request.method == "GET" and (request.path in OPEN_PAGES or request.path.startswith(OPEN_PREFIXES))


ROUTES = [
    web.get("/", playground),
    web.get("/docs", docs),
    web.static("/static", STATIC),
    web.static("/docs/assets", _swagger_ui_assets()),
]
