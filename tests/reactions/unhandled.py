"""A job type another system consumes: declared without a handler, on its own queue."""

from __future__ import annotations

from typing import Any, Final

from pipeline.queue import JobSink
from pipeline.registry import JobType, Reaction
from pipeline.signals import user_signed_up

CRM_EXPORT: Final = JobType("crm_export", queue="crm", handler=None)


async def enqueue_crm_export(sender: Any, **extra: Any) -> None:
    jobs: JobSink = extra["jobs"]
    await jobs.push(CRM_EXPORT, {"user_id": extra["user_id"]})


REACTION: Final = Reaction(
    "unhandled", job_types=[CRM_EXPORT], receivers={user_signed_up: [enqueue_crm_export]}
)
