"""``GET /docs``: Swagger UI 5 for ``/openapi.json``, served whole by the app itself.

Its script and stylesheet come from the installed ``swagger-ui-bundle-v2`` package, so the page
works offline and on a locked-down network, and trusts no other host: its
``Content-Security-Policy`` allows scripts, styles and requests from this origin only (the
page's own start-up script is a file too, so no inline script is needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from quart import Blueprint, Response, abort, send_from_directory, url_for
from quart_schema import hide
from swagger_ui_bundle import swagger_ui_path

docs = Blueprint("docs", __name__)

#: The files of the Swagger UI distribution the page uses; nothing else of it is served.
_ASSETS: Final = frozenset(
    {"swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png", "favicon-16x16.png"}
)
#: The assets change only with the installed package, whose version is in their URL's query.
_ASSET_MAX_AGE: Final = 86400
_VERSION: Final = Path(str(swagger_ui_path)).name.removeprefix("swagger-ui-")

#: Same origin only; Swagger UI sets inline style attributes, and shows images as data: URLs.
_POLICY: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; font-src 'self'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)

_PAGE: Final = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Signup service: API</title>
  <link rel="icon" type="image/png" href="{favicon}">
  <link rel="stylesheet" href="{css}">
</head>
<body>
  <div id="swagger-ui" data-url="{document}"></div>
  <script src="{bundle}"></script>
  <script src="{start}"></script>
</body>
</html>
"""

#: Reads the document's URL from the page, so the script itself is constant.
_START: Final = """window.addEventListener("load", function () {
  var root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.dataset.url,
    dom_id: "#swagger-ui",
    deepLinking: true,
    layout: "BaseLayout",
    presets: [SwaggerUIBundle.presets.apis],
    showExtensions: true,
    showCommonExtensions: true
  });
});
"""


def _asset(name: str) -> str:
    return url_for("docs.asset", name=name, v=_VERSION)


@docs.get("/docs")
@hide
async def page() -> Response:
    """The Swagger UI page."""
    html = _PAGE.format(
        favicon=_asset("favicon-32x32.png"),
        css=_asset("swagger-ui.css"),
        bundle=_asset("swagger-ui-bundle.js"),
        start=url_for("docs.start", v=_VERSION),
        document=url_for("openapi"),
    )
    response = Response(html, mimetype="text/html")
    response.headers["Content-Security-Policy"] = _POLICY
    return response


@docs.get("/docs/start.js")
@hide
async def start() -> Response:
    """The page's start-up script."""
    response = Response(_START, mimetype="text/javascript")
    response.cache_control.max_age = _ASSET_MAX_AGE
    return response


@docs.get("/docs/<name>")
@hide
async def asset(name: str) -> Response:
    """One file of the installed Swagger UI distribution."""
    if name not in _ASSETS:
        abort(404)
    response = await send_from_directory(Path(str(swagger_ui_path)), name)
    response.cache_control.max_age = _ASSET_MAX_AGE
    response.cache_control.public = True
    return response
