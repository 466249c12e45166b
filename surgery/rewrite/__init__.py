"""The streaming rewrite (plan -> pruned checkpoint on disk) and its structural verification."""

from surgery.rewrite.layout import OutShard, OutTensor, plan_layout
from surgery.rewrite.run import rewrite_checkpoint
from surgery.rewrite.verify import verify_checkpoint

__all__ = ["OutShard", "OutTensor", "plan_layout", "rewrite_checkpoint", "verify_checkpoint"]
