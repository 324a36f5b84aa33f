"""The project's exception tree. Third-party errors are translated into these at the edge."""


class PipelineError(Exception):
    """Base of every error this project raises on purpose."""


class SettingsError(PipelineError):
    """A setting is missing or malformed; the message is one line naming it."""


class JobDecodeError(PipelineError):
    """Bytes fetched from a queue are not a valid job envelope; the message says why."""


class UnknownJobTypeError(PipelineError):
    """A job names a type that no handler serves."""


class InvalidJobError(PipelineError):
    """A job whose payload can never be handled (a field missing or unsafe): a handler
    raises it, and the job is dead-lettered at once instead of retried."""


class NotReplicatedError(PipelineError):
    """Fewer replicas than required confirmed a write within the time allowed (``WAIT``). The
    write is on the primary, and would be lost if the primary failed before a replica got it."""

    def __init__(self, acknowledged: int, required: int) -> None:
        super().__init__(f"{acknowledged} of {required} replicas confirmed the write in time")
        self.acknowledged = acknowledged
        self.required = required
