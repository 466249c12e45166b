"""Calibration data: dataset SPECs, schemas and chat templates, sampling, recipes, and an offline default.

The rest of surgery needs only `load_tokenizer`, `build_calibration_set` (-> `CalibrationSet`) and
`load_recipe` (-> `Recipe`); see docs/data.md for the SPEC syntax, the formats and the recipe file.
"""

from surgery.data.calibration import CalibrationSet, Source, build_calibration_set, collect, open_sources
from surgery.data.default_corpus import DEFAULT_NOTE
from surgery.data.recipe import Recipe, load_recipe, shipped_recipes
from surgery.data.sampling import CategoryStats
from surgery.data.spec import DatasetSpec, parse_spec
from surgery.data.tokenizer import load_tokenizer, pad_id_of

__all__ = [
    "DEFAULT_NOTE",
    "CalibrationSet",
    "CategoryStats",
    "DatasetSpec",
    "Recipe",
    "build_calibration_set",
    "Source",
    "collect",
    "open_sources",
    "load_recipe",
    "load_tokenizer",
    "pad_id_of",
    "parse_spec",
    "shipped_recipes",
]
