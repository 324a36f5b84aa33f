"""The project's exception tree. Third-party errors are translated into these at the edge."""


class PipelineError(Exception):
    """Base of every error this project raises on purpose."""


class SettingsError(PipelineError):
    """A setting is malformed, or does not fit the others. ``variable`` names it, ``value`` is
    its value as shown (secrets masked), ``problem`` says what is wrong; the message is one
    line of the three: ``VARIABLE='value': problem``."""

    def __init__(self, variable: str, value: str, problem: str) -> None:
        super().__init__(f"{variable}={value!r}: {problem}")
        self.variable = variable
        self.value = value
        self.problem = problem


class JobDecodeError(PipelineError):
    """Bytes fetched from a queue are not a valid job envelope; the message says why."""


class ReactionError(PipelineError):
    """A reaction is declared wrongly, or a process's reactions do not fit together (a
    receiver no reaction declares, a served queue without a handler); one line saying which."""


class UnknownJobTypeError(ReactionError):
    """A job was pushed with a type that no reaction declares: a bug in the receiver, not a
    failure of the signup."""


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
