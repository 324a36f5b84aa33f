"""The web side's API errors. One handler (in ``service.app``) renders each as JSON."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An error answered to the client as ``{"error": code, "message": text, **details}``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        **details: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.details = details

    def body(self) -> dict[str, Any]:
        """The JSON body."""
        return {"error": self.code, "message": self.message, **self.details}


class ValidationError(ApiError):
    """422: fields that are missing or invalid, each with a message."""

    def __init__(self, fields: dict[str, str]) -> None:
        names = ", ".join(sorted(fields))
        super().__init__(422, "validation", f"invalid fields: {names}", fields=fields)


class ConflictError(ApiError):
    """409: a username or email is already taken."""

    def __init__(self, field: str) -> None:
        super().__init__(409, "conflict", f"that {field} is already taken", field=field)


class RateLimitedError(ApiError):
    """429: this client has signed up too often; retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: int) -> None:
        retry_after = max(1, retry_after)
        super().__init__(
            429,
            "rate_limited",
            f"too many signups from your address; retry in {retry_after} s",
            headers={"Retry-After": str(retry_after)},
            retry_after=retry_after,
        )


class UnavailableError(ApiError):
    """503: Redis could not be reached in time. Nothing was written; retry."""

    RETRY_AFTER = 1

    def __init__(self) -> None:
        super().__init__(
            503,
            "unavailable",
            "the service is temporarily unavailable; nothing was saved, please retry",
            headers={"Retry-After": str(self.RETRY_AFTER)},
        )


class InvalidIdempotencyKeyError(ApiError):
    """400: the ``Idempotency-Key`` header is empty, too long or not printable ASCII."""

    def __init__(self, problem: str) -> None:
        super().__init__(400, "invalid_idempotency_key", f"the Idempotency-Key header {problem}")


class IdempotencyKeyReusedError(ApiError):
    """422: the ``Idempotency-Key`` was already used for a different signup."""

    def __init__(self) -> None:
        super().__init__(
            422,
            "idempotency_key_reused",
            "that Idempotency-Key was used for a different signup; nothing was saved",
            fields={"Idempotency-Key": "already used for a different signup"},
        )


class NotReplicatedApiError(ApiError):
    """503: the signup was written on the Redis primary, but fewer replicas than
    ``REDIS_MIN_REPLICAS`` confirmed it in time, so a failover could still lose it."""

    def __init__(self, acknowledged: int, required: int) -> None:
        super().__init__(
            503,
            "not_replicated",
            f"the signup was saved but only {acknowledged} of {required} replicas confirmed it "
            "in time; retry with the same Idempotency-Key to get its answer",
            headers={"Retry-After": str(UnavailableError.RETRY_AFTER)},
        )
