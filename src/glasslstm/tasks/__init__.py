"""Long-term-memory tasks: where an LSTM keeps a dependency that a vanilla RNN loses.

    adding   (Hochreiter & Schmidhuber 1997)  sum two marked values, up to T steps apart
    copy     (Arjovsky et al. 2016)           recall 10 symbols after T blanks
    subject  (the article's examples)         fill "For his contributions, brave ___" with
                                              the name introduced T tokens earlier

Each is a :class:`Task` (see :mod:`.base`): ``batch(batch_size, generator)`` ->
``(x (B, L, input_size) float32, target, mask or None)``, plus ``loss``, ``metric``,
``baseline`` and ``solved``. Build one with ``make_task(name, T)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from glasslstm.config import TASKS

from .adding import AddingTask
from .base import Task
from .copy_memory import CopyTask
from .subject import SubjectTask

__all__ = ["TASKS", "AddingTask", "CopyTask", "SubjectTask", "Task", "make_task"]

_CLASSES: dict[str, Callable[..., Any]] = {
    "adding": AddingTask,
    "copy": CopyTask,
    "subject": SubjectTask,
}


def make_task(name: str, T: int, **kw) -> Task:
    """The task ``name`` (one of :data:`TASKS`) with lag ``T``; ValueError on a bad name or T."""
    if name not in _CLASSES:
        raise ValueError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}")
    return _CLASSES[name](T, **kw)
