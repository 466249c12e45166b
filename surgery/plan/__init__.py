"""Pruning plans: made from calibration saliency, edited by people, validated before every rewrite."""

from surgery.plan.core import (
    METHODS,
    PLAN_METHODS,
    check_request,
    kept_count,
    kept_map,
    load_plan,
    make_plan,
    n_keep_for,
    normalized,
    plan_file_name,
    plan_hash,
    plan_json,
    save_plan,
    validate_plan,
)
from surgery.plan.summary import plan_summary

__all__ = ["METHODS", "PLAN_METHODS", "check_request", "kept_count", "kept_map", "load_plan", "make_plan", "n_keep_for",
           "normalized", "plan_file_name", "plan_hash", "plan_json", "plan_summary", "save_plan", "validate_plan"]
