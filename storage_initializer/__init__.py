"""storage-initializer: download a model once for many replicas sharing one volume."""

__version__ = "0.1.0"
