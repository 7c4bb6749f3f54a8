"""The ``yolo_segment`` task: an Ultralytics YOLO segment export (see :mod:`cvserve.tasks.yolo`)."""

from cvserve.tasks.yolo import YoloSegmentHead

HEAD = YoloSegmentHead
