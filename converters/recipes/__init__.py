"""Conversion recipes and their registry.

Importing this package registers the ONNX and the TFLite recipes (the TFLite ones import
TensorFlow only when they run).
"""

from __future__ import annotations

from .base import (
    QUANTIZE_MODES,
    RUNTIMES,
    CalibrationFactory,
    CandidateModel,
    LayerDiagnoser,
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
from .tflite import (
    TfliteDynamicConfig,
    TfliteDynamicRecipe,
    TfliteFp16Config,
    TfliteFp16Recipe,
    TfliteFp32Config,
    TfliteFp32Recipe,
    TfliteInt8Config,
    TfliteInt8Recipe,
    TfliteInt16x8Config,
    TfliteInt16x8Recipe,
)

__all__ = [
    "QUANTIZE_MODES",
    "RUNTIMES",
    "CalibrationFactory",
    "CandidateModel",
    "LayerDiagnoser",
    "OnnxDynamicInt8Config",
    "OnnxDynamicInt8Recipe",
    "OnnxFp16Config",
    "OnnxFp16Recipe",
    "OnnxFp32Config",
    "OnnxFp32Recipe",
    "OnnxQdqInt8Config",
    "OnnxQdqInt8Recipe",
    "Recipe",
    "TfliteDynamicConfig",
    "TfliteDynamicRecipe",
    "TfliteFp16Config",
    "TfliteFp16Recipe",
    "TfliteFp32Config",
    "TfliteFp32Recipe",
    "TfliteInt8Config",
    "TfliteInt8Recipe",
    "TfliteInt16x8Config",
    "TfliteInt16x8Recipe",
    "build_recipe",
    "config_from_options",
    "get_recipe",
    "recipes_for",
    "register_recipe",
    "registered_recipes",
]
