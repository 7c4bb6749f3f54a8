"""Task heads: one module per task turns a model's output row into a result."""

from cvserve.tasks.base import TaskHead, get_head
from cvserve.tasks.classify import ClassifyHead

__all__ = ["ClassifyHead", "TaskHead", "get_head"]
