"""The streaming rewrite (plan -> pruned checkpoint on disk), what it will write (`plan_summary`, before
anything is written) and its structural verification."""

from surgery.rewrite.layout import OutShard, OutTensor, plan_layout
from surgery.rewrite.run import rewrite_checkpoint
from surgery.rewrite.summary import plan_summary
from surgery.rewrite.verify import verify_checkpoint

__all__ = ["OutShard", "OutTensor", "plan_layout", "plan_summary", "rewrite_checkpoint", "verify_checkpoint"]
