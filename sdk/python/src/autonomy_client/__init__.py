"""autonomy-client: the worker SDK for an autonomy server, over its HTTP API.

Imports nothing of the server (no ``app``): install it into any project beside its own
packages. ``Client`` calls the actions; ``LaneWorker`` consumes a lane with it.
"""

from autonomy_client.client import Client
from autonomy_client.errors import (
    AuthError,
    AutonomyError,
    Conflict,
    Forbidden,
    InvalidInput,
    LanePaused,
    NotFound,
    NotInProgress,
    StaleLease,
    TaskCancelled,
    TaskNotFound,
    Unavailable,
)
from autonomy_client.job import Job, JobHandler, ReleaseTask, ValidationFailed, WorkerStats
from autonomy_client.worker import LaneWorker

__version__ = "0.1.0"

__all__ = [
    "AuthError", "AutonomyError", "Client", "Conflict", "Forbidden", "InvalidInput", "Job",
    "JobHandler", "LanePaused", "LaneWorker", "NotFound", "NotInProgress", "ReleaseTask",
    "StaleLease", "TaskCancelled", "TaskNotFound", "Unavailable", "ValidationFailed", "WorkerStats",
]
