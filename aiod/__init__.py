"""aiod: a daemon that owns pools of Linux kernel AIO contexts."""

__version__ = "0.1.0"
