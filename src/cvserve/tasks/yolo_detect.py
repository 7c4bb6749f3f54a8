"""The ``yolo_detect`` task: an Ultralytics YOLO detect export (see :mod:`cvserve.tasks.yolo`)."""

from cvserve.tasks.yolo import YoloDetectHead

HEAD = YoloDetectHead
