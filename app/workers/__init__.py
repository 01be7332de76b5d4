"""Lane workers: the Python API (:class:`LaneWorker`), the command runner behind
``autonomy worker``, and the clients they talk through (in-process or HTTP)."""

from app.workers.job import Job, JobHandler, ReleaseTask, ValidationFailed, WorkerStats
from app.workers.lane_worker import LaneWorker

__all__ = ["Job", "JobHandler", "LaneWorker", "ReleaseTask", "ValidationFailed", "WorkerStats"]
