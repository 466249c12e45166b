"""Reports for people: the calibration/pruning report of a work directory, and the pruned model's card."""

from surgery.report.card import write_model_card
from surgery.report.report import build_report

__all__ = ["build_report", "write_model_card"]
