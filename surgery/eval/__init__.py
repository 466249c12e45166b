"""Evaluation: streaming next-token loss (any number of models on identical tokens) and per-layer
fidelity of pruned MoE blocks."""

from surgery.eval.head import Head
from surgery.eval.loss import EvalInputs, EvalOptions, Evaluator, ModelRef, predicted, summarize

__all__ = ["EvalInputs", "EvalOptions", "Evaluator", "Head", "ModelRef", "predicted", "summarize"]
