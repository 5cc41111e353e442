"""Recipe protocol and registry.

A recipe turns a source model into one *candidate* (a converted model file) and nothing else: it
does not measure or choose. Each recipe is a small class with a typed, frozen config dataclass
(``config_type``), a unique ``name``, the runtime it targets and the ``--quantize`` mode that
selects it. ``@register_recipe`` adds it to the registry; ``--quantize auto`` is simply "every
registered recipe for this runtime", so TFLite recipes slot in by registering with
``runtime = "tflite"``.

Options arrive from the CLI as plain dicts (``recipe_options``); :func:`build_recipe` turns
them into the config dataclass and refuses unknown keys or wrong types with :class:`BadOption`
instead of letting a typo silently do nothing.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from ..errors import BadOption

__all__ = [
    "QUANTIZE_MODES",
    "RUNTIMES",
    "CalibrationFactory",
    "CandidateModel",
    "LayerDiagnoser",
    "Recipe",
    "build_recipe",
    "config_from_options",
    "get_recipe",
    "recipes_for",
    "register_recipe",
    "registered_recipes",
]

#: ``--quantize`` values. ``auto`` = every recipe for the runtime; the others pick by ``mode``.
QUANTIZE_MODES: tuple[str, ...] = ("none", "fp16", "dynamic", "int8", "auto")
RUNTIMES: tuple[str, ...] = ("onnxruntime", "tflite")

CalibrationFactory = Callable[[], Iterator[dict[str, Any]]]
"""Returns a fresh iterator of samples (``{input_name: array}``) on every call."""

LayerDiagnoser = Callable[[Path, Sequence[dict[str, Any]], int], Sequence[Mapping[str, Any]]]
"""``diagnose(reference_path, samples, top)``: the ``top`` layers that hurt most, worst first,
each a mapping with the fields of :class:`converters.diagnose.LayerError`. For recipes whose
diagnostics need more than the two model files (TFLite's QuantizationDebugger needs the
converter)."""

ConfigT = TypeVar("ConfigT")


@dataclass(frozen=True)
class CandidateModel:
    """A converted model file produced by a recipe, before any measurement."""

    recipe: str
    path: Path
    runtime: str
    precision: str
    """``fp32``, ``fp16``, ``int8`` (covers mixed graphs with excluded float nodes and int8
    weights with float activations) or ``int16x8`` (int16 activations, int8 weights)."""
    mode: str
    """The ``--quantize`` mode of the recipe that produced it."""
    config: Mapping[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    seconds: float = 0.0
    """Wall time the recipe took (conversion only)."""
    diagnose: LayerDiagnoser | None = field(default=None, compare=False, repr=False)
    """Per-layer diagnostics the recipe can compute for this candidate (``None``: measurement
    uses the runtime's generic method, if it has one)."""

    @property
    def is_reference(self) -> bool:
        return self.precision == "fp32"

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "path": str(self.path),
            "runtime": self.runtime,
            "precision": self.precision,
            "mode": self.mode,
            "config": _jsonable(dict(self.config)),
            "notes": list(self.notes),
            "seconds": round(self.seconds, 4),
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class Recipe(ABC, Generic[ConfigT]):
    """One way of producing a candidate model. Subclasses set the class attributes below."""

    name: ClassVar[str]
    runtime: ClassVar[str]
    precision: ClassVar[str]
    mode: ClassVar[str]
    config_type: ClassVar[type[Any]]
    needs_calibration: ClassVar[bool] = False
    summary: ClassVar[str] = ""
    fallback: ClassVar[bool] = False
    """A fallback recipe runs only when every non-fallback recipe of its ``mode`` selected in the
    same conversion failed or missed the accuracy budget (e.g. TFLite int16x8 activations for
    models that full int8 breaks: it is slower, so it is not worth building otherwise). Selected
    on its own (by name), it runs like any other recipe."""

    def __init__(self, config: ConfigT | None = None) -> None:
        self.config: ConfigT = config if config is not None else self.config_type()

    def applies_to(self, runtime: str) -> bool:
        """Whether this recipe produces models for ``runtime`` (``onnxruntime``, ``tflite``)."""
        return runtime == self.runtime

    @abstractmethod
    def run(
        self,
        src_model_path: Path,
        out_dir: Path,
        calibration: CalibrationFactory | None = None,
    ) -> CandidateModel:
        """Convert ``src_model_path`` into ``out_dir`` and describe the result."""

    def config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)  # type: ignore[call-overload,no-any-return]

    def candidate(
        self,
        path: Path,
        *,
        notes: tuple[str, ...] = (),
        seconds: float = 0.0,
        diagnose: LayerDiagnoser | None = None,
    ) -> CandidateModel:
        """Build this recipe's :class:`CandidateModel` for ``path``."""
        return CandidateModel(
            recipe=self.name,
            path=path,
            runtime=self.runtime,
            precision=self.precision,
            mode=self.mode,
            config=self.config_dict(),
            notes=notes,
            seconds=seconds,
            diagnose=diagnose,
        )


_REGISTRY: dict[str, type[Recipe[Any]]] = {}

RecipeT = TypeVar("RecipeT", bound=type[Recipe[Any]])


def register_recipe(cls: RecipeT) -> RecipeT:
    """Class decorator: add a recipe to the registry (names must be unique)."""
    for attr in ("name", "runtime", "precision", "mode", "config_type"):
        if not hasattr(cls, attr):
            raise TypeError(f"recipe {cls.__name__} must define {attr!r}")
    if not dataclasses.is_dataclass(cls.config_type):
        raise TypeError(f"recipe {cls.name}: config_type must be a dataclass")
    if cls.mode not in QUANTIZE_MODES or cls.mode == "auto":
        raise TypeError(f"recipe {cls.name}: mode {cls.mode!r} is not a quantize mode")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise TypeError(f"recipe name {cls.name!r} already registered by {existing.__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def registered_recipes(runtime: str | None = None) -> list[type[Recipe[Any]]]:
    """Registered recipe classes (for ``runtime`` if given), in registration order."""
    return [c for c in _REGISTRY.values() if runtime is None or c.runtime == runtime]


def get_recipe(name: str) -> type[Recipe[Any]]:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise BadOption(f"unknown recipe {name!r} (known: {known})") from None


def recipes_for(runtime: str, quantize: str) -> list[type[Recipe[Any]]]:
    """Recipes that ``--quantize <quantize>`` runs for ``runtime``.

    ``auto`` -> all of them; a mode (``none``, ``fp16``, ``dynamic``, ``int8``) -> the recipes
    with that mode; a recipe name -> that recipe. The fp32 reference is not added here: the
    pipeline always builds it, since every measurement compares against it.
    """
    available = registered_recipes(runtime)
    if quantize == "auto":
        chosen = available
    elif quantize in QUANTIZE_MODES:
        chosen = [c for c in available if c.mode == quantize]
    else:
        chosen = [c for c in available if c.name == quantize]
    if not chosen:
        modes = ", ".join(QUANTIZE_MODES)
        names = ", ".join(c.name for c in available)
        raise BadOption(
            f"--quantize {quantize!r} selects no recipe for {runtime} (modes: {modes};"
            f" recipes: {names})"
        )
    return chosen


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check/convert one option value against a dataclass field type (JSON-ish inputs)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except BadOption as exc:
                errors.append(str(exc))
        raise BadOption(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise BadOption(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise BadOption(f"{where}: expected a list, got {value!r}")
        item_hint = args[0] if args else Any
        return tuple(_coerce(v, item_hint, where) for v in items)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise BadOption(f"{where}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadOption(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BadOption(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise BadOption(f"{where}: expected a string, got {value!r}")
        return value
    return value


def config_from_options(config_type: type[ConfigT], options: Mapping[str, Any] | None) -> ConfigT:
    """Build a config dataclass from a plain mapping, refusing unknown keys and wrong types."""
    if not options:
        return config_type()
    if not dataclasses.is_dataclass(config_type):
        raise TypeError(f"{config_type!r} is not a dataclass")
    hints = typing.get_type_hints(config_type)
    names = [f.name for f in dataclasses.fields(config_type)]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise BadOption(
            f"unknown option(s) {', '.join(unknown)} for {config_type.__name__}"
            f" (known: {', '.join(names)})"
        )
    values = {key: _coerce(value, hints[key], f"option {key!r}") for key, value in options.items()}
    try:
        return config_type(**values)
    except (TypeError, ValueError) as exc:
        raise BadOption(f"{config_type.__name__}: {exc}") from exc


def build_recipe(name: str, options: Mapping[str, Any] | None = None) -> Recipe[Any]:
    """Instantiate the recipe ``name`` with options given as a plain mapping."""
    cls = get_recipe(name)
    return cls(config_from_options(cls.config_type, options))
