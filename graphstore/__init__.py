"""The durable interaction graph: the ``GraphStore`` interface and its implementations.

This package never imports ``model`` or ``server`` (shared/notes/architecture.md).
"""
