"""Pruning plans: made from calibration saliency, edited by people, validated before every rewrite."""

from surgery.plan.core import (
    METHODS,
    kept_map,
    load_plan,
    make_plan,
    n_keep_for,
    normalized,
    plan_hash,
    plan_json,
    save_plan,
    validate_plan,
)
from surgery.plan.summary import plan_summary

__all__ = ["METHODS", "kept_map", "load_plan", "make_plan", "n_keep_for", "normalized", "plan_hash", "plan_json",
           "plan_summary", "save_plan", "validate_plan"]
