"""The ``yolo_pose`` task: an Ultralytics YOLO pose export (see :mod:`cvserve.tasks.yolo`)."""

from cvserve.tasks.yolo import YoloPoseHead

HEAD = YoloPoseHead
