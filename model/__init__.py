"""The GMTRouter network (PyG HGT + cross-attention head), training, evaluation, checkpoints.

This package never imports ``graphstore`` or ``server``: it takes arrays / ``HeteroData`` and
returns scores (shared/notes/architecture.md).
"""
