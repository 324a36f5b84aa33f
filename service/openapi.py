"""The HTTP API described for OpenAPI: its models, and ``/openapi.json`` and ``/docs``.

The models document the API; they do not validate it. Requests are parsed and checked by
``service.validation`` (so a bad signup keeps its 422 body naming each field), and the views
build their JSON with orjson. ``tests/test_openapi.py`` decodes real responses with these
models, so the document cannot drift from what the API answers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from quart import Quart
from quart_schema import DataSource, Info, QuartSchema, document_response
from quart_schema.openapi import OpenAPIProvider
from werkzeug.routing import Rule

from pipeline.keys import CORE_COUNTERS
from pipeline.registry import Registry
from pipeline.version import __version__
from service.docs import docs
from service.validation import EMAIL_MAX, FORM_TYPE, JSON_TYPE, USERNAME_MAX, USERNAME_MIN

F = TypeVar("F", bound=Callable[..., Any])
REF_TEMPLATE = "#/components/schemas/{name}"

Message = Annotated[str, msgspec.Meta(description="What went wrong, for a person to read.")]
REQUEST_ID_PARAMETER = {
    "name": "X-Request-ID",
    "in": "header",
    "required": False,
    "description": "Your id for the request, echoed in `X-Request-ID` and carried into the "
    "logs of the jobs it causes. Ignored unless it is 1 to 128 of letters, digits and "
    "`. _ : / + = -`.",
    "schema": {"type": "string"},
}
IDEMPOTENCY_KEY_PARAMETER = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "Makes the signup safe to retry (the IETF httpapi draft's semantics): a "
    "retry with the same key and the same body gets the original 201 with the same `user_id`, "
    "also after a 503 whose commit did happen; the same key with another body is a 422 "
    "`idempotency_key_reused`. 1 to 255 printable ASCII characters, as a Structured Field "
    'string (`"…"`) or bare; anything else is a 400 `invalid_idempotency_key`. Remembered for '
    "IDEMPOTENCY_KEY_TTL seconds.",
    "schema": {"type": "string"},
}
REQUEST_ID_HEADER = {
    "required": True,
    "description": "The request's id: the client's own `X-Request-ID` if it is sane "
    "(1 to 128 of letters, digits and `. _ : / + = -`), else a generated one.",
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:/+=-]{1,128}$"},
}


class Struct(msgspec.Struct, forbid_unknown_fields=True):
    """A model whose JSON has exactly these fields."""


# Requests.


class SignupRequest(Struct):
    """A signup, as JSON or as a URL-encoded form (UTF-8)."""

    username: Annotated[
        str,
        msgspec.Meta(
            description=f"{USERNAME_MIN} to {USERNAME_MAX} letters, digits, '_', '.' or '-' "
            "(Unicode letters and combining marks count as letters), counted after NFKC "
            "normalisation. Stored NFKC-normalised with its case kept; unique ignoring case "
            "and Unicode width."
        ),
    ]
    email: Annotated[
        str,
        msgspec.Meta(
            description=f"A valid address of at most {EMAIL_MAX} characters (syntax only, no "
            "DNS). Unique ignoring case and Unicode width."
        ),
    ]


# Successful responses.


class SignupCreated(Struct):
    """The user was created, and its welcome email, marketing-list update and profile are
    queued."""

    user_id: Annotated[str, msgspec.Meta(description="32 hexadecimal digits.")]
    username: Annotated[str, msgspec.Meta(description="As stored (NFKC-normalised).")]
    email: Annotated[str, msgspec.Meta(description="As stored (the domain lower-cased).")]


class User(Struct):
    """The user, with what the reactions keep for it (see :func:`user_model`)."""

    user_id: str
    username: str
    email: str
    created_at: Annotated[float, msgspec.Meta(description="Unix time, in seconds.")]


class Percentiles(Struct):
    """Nearest-rank percentiles in milliseconds; null before any sample."""

    p50: float | None
    p99: float | None


class Latency(Struct):
    """One queue's recent jobs (its last 1000)."""

    samples: int
    wait_ms: Annotated[
        Percentiles,
        msgspec.Meta(description="From enqueue (or a retry falling due) to the start of the run."),
    ]
    run_ms: Percentiles


class Stats(Struct):
    """Stands for the app's :func:`stats_model`, which has a field per counter of its
    reactions (see :func:`resolve`)."""


@functools.cache
def stats_model(registry: Registry) -> type[Struct]:
    """The ``GET /stats`` model of ``registry``'s counters and queues."""

    def described(kind: type[Any], text: str) -> Any:
        return Annotated[kind, msgspec.Meta(description=text)]

    counting = {t.counter: t for t in registry.job_types.values() if t.counter is not None}
    queues = ", ".join(registry.queues)
    fields: list[tuple[str, Any]] = [
        (
            name,
            described(int, CORE_COUNTERS[name])
            if name in CORE_COUNTERS
            else described(int, f"Jobs of {counting[name].name!r} done."),
        )
        for name in registry.counters
    ]
    fields += [
        ("queues", described(dict[str, int], f"Jobs waiting, by queue: {queues}.")),
        ("processing", described(dict[str, int], f"Jobs held by consumers, by queue: {queues}.")),
        ("delayed", described(dict[str, int], f"Jobs waiting for a retry, by queue: {queues}.")),
        ("dead_letter", int),
        ("consumers", described(int, "Consumers holding a live lease.")),
        ("latency", described(dict[str, Latency], f"By queue: {queues}.")),
    ]
    model: type[Struct] = msgspec.defstruct(  # type: ignore[assignment]  # bases=(Struct,)
        "Stats", fields, bases=(Struct,), module=__name__
    )
    model.__doc__ = (
        "Counters (the pipeline's and one per job type that keeps one), queue depths, jobs "
        "held and waiting to be retried, dead letters, live consumers and recent latency per "
        "queue."
    )
    return model


@functools.cache
def user_model(registry: Registry) -> type[Struct]:
    """The ``GET /users/<id>`` model: :class:`User`'s fields, then each of ``registry``'s
    user fields (null until written), as the profile reaction declares ``profile``."""
    fields: list[tuple[str, Any]] = [
        (f.name, Annotated[f.schema | None, msgspec.Meta(description=f.description)])
        if f.description
        else (f.name, f.schema | None)
        for f in registry.user_fields
    ]
    model: type[Struct] = msgspec.defstruct(  # type: ignore[assignment]  # bases=(Struct,)
        "User", fields, bases=(User,), module=__name__
    )
    names = ", ".join(f.name for f in registry.user_fields)
    model.__doc__ = f"The user, with {names} (null until written)." if names else User.__doc__
    return model


_MODELS = "signup.openapi_models"


def resolve(app: Quart, model: type[Any]) -> type[Any]:
    """The model ``app`` documents where a view names ``model``: its own :func:`stats_model`
    for :class:`Stats` and :func:`user_model` for :class:`User`, else ``model`` itself."""
    models: dict[type[Any], type[Any]] = app.extensions.get(_MODELS, {})
    return models.get(model, model)


class Live(Struct):
    """The process answers (no Redis call)."""

    status: Literal["ok"]


class Ready(Struct):
    """Redis answered PING within a second."""

    status: Literal["ready"]


# Error responses: every one is {"error": code, "message": text, ...details}.


class MalformedBody(Struct):
    """The body is not JSON, not UTF-8, not a JSON object, nested too deep, or a malformed
    form (`malformed_body`); or the Idempotency-Key header is empty, too long or not printable
    ASCII (`invalid_idempotency_key`)."""

    error: Literal["malformed_body", "invalid_idempotency_key"]
    message: Message


class NotFound(Struct):
    """No such user (or no such resource)."""

    error: Literal["not_found"]
    message: Message


class Conflict(Struct):
    """The username or the email is already taken; nothing was written."""

    error: Literal["conflict"]
    message: Message
    field: Literal["username", "email"]


class RequestTimeout(Struct):
    """The body did not all arrive within BODY_TIMEOUT seconds."""

    error: Literal["request_timeout"]
    message: Message


class TooLarge(Struct):
    """The body is larger than MAX_BODY_BYTES."""

    error: Literal["request_entity_too_large"]
    message: Message


class UnsupportedMediaType(Struct):
    """The content type is neither JSON nor a URL-encoded form, or the charset is not
    UTF-8."""

    error: Literal["unsupported_media_type"]
    message: Message


class Invalid(Struct):
    """Fields are missing, of the wrong type, invalid, given twice or unknown (`validation`);
    or the Idempotency-Key was used for a different signup (`idempotency_key_reused`, with
    the field `Idempotency-Key`). Nothing was written."""

    error: Literal["validation", "idempotency_key_reused"]
    message: Message
    fields: Annotated[dict[str, str], msgspec.Meta(description="Field name -> what is wrong.")]


class RateLimited(Struct):
    """Too many signups from this client address (RATE_LIMIT); nothing was written. Retry
    after Retry-After seconds."""

    error: Literal["rate_limited"]
    message: Message
    retry_after: Annotated[int, msgspec.Meta(ge=1, description="Seconds, as in Retry-After.")]


class Unavailable(Struct):
    """Redis is unreachable, timed out or refusing writes; nothing was saved (`unavailable`).
    Or the signup was saved on the primary but fewer than REDIS_MIN_REPLICAS replicas
    confirmed it in time (`not_replicated`): retry with the same Idempotency-Key for its 201.
    Retry after Retry-After seconds."""

    error: Literal["unavailable", "not_replicated"]
    message: Message


class RetryAfter(Struct):
    """Response headers of a 429 or a 503."""

    retry_after: Annotated[int, msgspec.Meta(description="Seconds to wait before retrying.")]


class NotReady(Struct):
    """Redis did not answer PING within a second; `message` says why."""

    error: Literal["not_ready"]
    message: Message


def responses(*documented: tuple[int, type[Struct]]) -> Callable[[F], F]:
    """Document a view's responses by status (a 429 or 503 with its Retry-After header)."""

    def decorator(func: F) -> F:
        for status, model in documented:
            func = document_response(model, status, RetryAfter if status in (429, 503) else None)(
                func
            )
        return func

    return decorator


def _nested(model: type[Any]) -> dict[str, Any]:
    """The schemas of the models ``model`` refers to. (quart-schema 0.25 drops them with
    msgspec, leaving dangling ``$ref``s: pgjones/quart-schema#117.)"""
    _, components = msgspec.json.schema_components([model], ref_template=REF_TEMPLATE)
    components.pop(model.__name__, None)  # inlined where it is used
    return components


class _Provider(OpenAPIProvider):
    """quart-schema's document, fixed and completed for this API."""

    def build_paths(self, rule: Rule) -> tuple[dict[str, Any], dict[str, Any]]:
        """Every operation takes an optional ``X-Request-ID``; descriptions are trimmed."""
        paths, components = super().build_paths(rule)
        for operations in paths.values():
            for operation in operations.values():
                extra = [REQUEST_ID_PARAMETER]
                if rule.endpoint == "api.signup":
                    extra.insert(0, IDEMPOTENCY_KEY_PARAMETER)
                operation["parameters"] = [*operation["parameters"], *extra]
                description = operation.pop("description", "").strip()
                if description:
                    operation["description"] = description
        return paths, components

    def build_request_body(
        self, model: type[Any], source: DataSource
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """A signup is JSON or a URL-encoded form, with the same fields."""
        body, definitions = super().build_request_body(model, source)
        content = body["content"]
        content[FORM_TYPE] = content[JSON_TYPE]
        body["required"] = True
        return body, {**definitions, **_nested(model)}

    def build_response_object(
        self, model: type[Any], headers_model: type[Any] | None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Response headers where OpenAPI wants them: beside ``content``, not in it as
        quart-schema 0.25 puts them, and ``X-Request-ID`` on every response."""
        model = resolve(self._app, model)  # type: ignore[arg-type]  # a weak proxy of it
        response, definitions = super().build_response_object(model, headers_model)
        definitions = {**definitions, **_nested(model)}
        if model is SignupCreated:
            response["links"] = {
                "GetUser": {
                    "operationId": "get_user",
                    "parameters": {"user_id": "$response.body#/user_id"},
                    "description": "The new user, by the `user_id` in the body.",
                }
            }
        response["headers"] = {"X-Request-ID": REQUEST_ID_HEADER}
        for name, header in response["content"].pop("headers", {}).items():
            schema = dict(header["schema"])
            response["headers"][name.title()] = {
                "description": schema.pop("description", ""),
                "required": True,
                "schema": schema,
            }
        return response, definitions


def document_api(app: Quart, registry: Registry) -> None:
    """Serve ``/openapi.json``, and Swagger UI at ``/docs`` (from :mod:`service.docs`, which
    serves its script and stylesheet itself). The stats model is ``registry``'s."""
    app.extensions[_MODELS] = {Stats: stats_model(registry), User: user_model(registry)}
    app.register_blueprint(docs)
    schema = QuartSchema(
        openapi_path="/openapi.json",
        swagger_ui_path=None,
        redoc_ui_path=None,
        scalar_ui_path=None,
        info=Info(
            title="Signup service",
            version=__version__,
            description="Sign a user up; a welcome email, a marketing-list update and a "
            "profile follow through Redis queues. Every error is JSON: "
            '`{"error": code, "message": text, ...details}`.',
        ),
        conversion_preference="msgspec",
        openapi_provider_class=_Provider,
    )
    # The views return finished Responses, so quart-schema's make_response wrapper (which
    # turns returned models into JSON) would only cost every request its checks.
    make_response = app.make_response
    schema.init_app(app)
    app.make_response = make_response  # type: ignore[method-assign]
