"""Pruning plans: made from calibration saliency, edited by people, validated before every rewrite.

`counts` decides how many experts a layer keeps and what the routing allows, `make` ranks and
chooses, `validate` re-checks a (possibly hand-edited) plan, `files` saves, loads and hashes it.
What a plan will write (sizes, shards) is the rewrite's to say: `surgery.rewrite.summary`."""

from surgery.plan.counts import kept_count, n_keep_for
from surgery.plan.files import kept_map, load_plan, normalized, plan_file_name, plan_hash, plan_json, save_plan
from surgery.plan.make import METHODS, PLAN_METHODS, check_request, make_plan
from surgery.plan.validate import validate_plan

__all__ = ["METHODS", "PLAN_METHODS", "check_request", "kept_count", "kept_map", "load_plan", "make_plan", "n_keep_for",
           "normalized", "plan_file_name", "plan_hash", "plan_json", "save_plan", "validate_plan"]
