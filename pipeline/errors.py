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
