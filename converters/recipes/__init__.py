"""Conversion recipes and their registry (importing this package registers the ONNX recipes)."""

from __future__ import annotations

from .base import (
    QUANTIZE_MODES,
    RUNTIMES,
    CalibrationFactory,
    CandidateModel,
    Recipe,
    build_recipe,
    config_from_options,
    get_recipe,
    recipes_for,
    register_recipe,
    registered_recipes,
)
from .onnx_float import OnnxFp16Config, OnnxFp16Recipe, OnnxFp32Config, OnnxFp32Recipe
from .onnx_int8 import (
    OnnxDynamicInt8Config,
    OnnxDynamicInt8Recipe,
    OnnxQdqInt8Config,
    OnnxQdqInt8Recipe,
)

__all__ = [
    "QUANTIZE_MODES",
    "RUNTIMES",
    "CalibrationFactory",
    "CandidateModel",
    "OnnxDynamicInt8Config",
    "OnnxDynamicInt8Recipe",
    "OnnxFp16Config",
    "OnnxFp16Recipe",
    "OnnxFp32Config",
    "OnnxFp32Recipe",
    "OnnxQdqInt8Config",
    "OnnxQdqInt8Recipe",
    "Recipe",
    "build_recipe",
    "config_from_options",
    "get_recipe",
    "recipes_for",
    "register_recipe",
    "registered_recipes",
]
