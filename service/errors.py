"""Errors a request can end with.

They carry no transport detail: service/server.py holds the one table that turns
each into a gRPC status code, so the scheduler and the engine stay free of gRPC.
"""


class ServiceError(Exception):
    """Base class; the message is meant for the client."""


class InvalidProblem(ServiceError):
    """The problem text is not one the model can solve."""


class InvalidArgument(ServiceError):
    """A request field other than the problem is out of range."""


class QueueFull(ServiceError):
    """Too many problems are waiting; the client should retry later."""


class NotReady(ServiceError):
    """The models are still loading or warming up."""


class ShuttingDown(ServiceError):
    """The server is draining and takes no new problems."""


class DeadlineExceeded(ServiceError):
    """The request's deadline passed before it was answered."""


class Cancelled(ServiceError):
    """The client went away before it was answered."""


class ExecutionFailed(ServiceError):
    """The model runtime failed on this problem."""


class Unsupported(ServiceError):
    """The served model cannot do what was asked, whatever the input (Inspect on the
    baseline, which writes no program); retrying will not help, another server might."""
