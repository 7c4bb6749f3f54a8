"""cvserve: serve computer-vision DNNs end to end and show where every millisecond goes."""

__version__ = "0.1.0"
