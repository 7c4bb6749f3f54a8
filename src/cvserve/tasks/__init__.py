"""Task heads: one module per task turns a model's output row into a result."""

from cvserve.tasks.base import TaskHead, get_head
from cvserve.tasks.classify import ClassifyHead
from cvserve.tasks.depth import DepthHead
from cvserve.tasks.detect import DetectHead
from cvserve.tasks.segment import SegmentHead

__all__ = ["ClassifyHead", "DepthHead", "DetectHead", "SegmentHead", "TaskHead", "get_head"]
