"""Operations: the behaviour of SPEC section 4 (claim, complete, pause, resume, the failure
breaker, history, the periodic checks), and :func:`dispatch`, every action by its wire name.

Faces (the CLI, the HTTP API, Celery tasks, workers) call these; these call storage.
"""

from app.ops.dispatch import ACTIONS, MUTATING, dispatch

__all__ = ["ACTIONS", "MUTATING", "dispatch"]
