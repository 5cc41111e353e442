"""The contract every runtime adapter fulfils.

The agent's service code talks to :class:`Runtime` only, whichever library runs the model, so
the parts that must behave identically on every runtime live here rather than in the adapters:
name checking, input validation and conversion, the per-sample loop for fixed-batch models and
the dequantization of outputs. An adapter only describes its model's tensors and runs one
already-validated request (:meth:`Runtime._run`).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, ClassVar, TypeAlias

import numpy as np
import numpy.typing as npt

from device_agent.errors import InferenceError, InputError
from device_agent.runtime.spec import TensorSpec, format_shape
from device_agent.runtime.validate import check_shared_dims, finish_output, prepare_input

__all__ = ["Runtime", "TensorSpec"]

Array: TypeAlias = "npt.NDArray[Any]"


class Runtime(abc.ABC):
    """A loaded model ready to answer :meth:`predict`; also a context manager.

    Subclasses describe their tensors by calling ``super().__init__`` and implement
    :meth:`_run`, :meth:`close`, :attr:`version` and :attr:`providers`.
    """

    #: Name of the runtime library family (``"onnxruntime"``, ``"tflite"``).
    name: ClassVar[str]

    def __init__(self, *, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> None:
        self._inputs = tuple(inputs)
        self._outputs = tuple(outputs)
        self._input_names = frozenset(spec.name for spec in self._inputs)
        # A model with a fixed batch of 1 on every input accepts any leading size: N > 1
        # samples are run one at a time (most TFLite exports are fixed at batch 1, and
        # refusing would make every caller split batches itself).
        self._loopable = bool(self._inputs) and all(
            spec.shape and spec.shape[0] == 1 for spec in self._inputs
        )
        self._fast_inputs = _fast_inputs(self._inputs)
        self._shared_dims = _shared_dims(self._inputs)
        #: The one input's check when the model has one input that can take the fast path and
        #: no named size appears twice in it; adapters may inline :meth:`_fast_feeds` for it.
        self._one_input = (
            self._fast_inputs[0]
            if self._fast_inputs is not None
            and len(self._fast_inputs) == 1
            and not self._shared_dims
            else None
        )
        self._plain_outputs: tuple[str, ...] | None = tuple(
            spec.name for spec in self._outputs if spec.quantization is None
        )
        if len(self._plain_outputs) != len(self._outputs):
            self._plain_outputs = None

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    @property
    @abc.abstractmethod
    def version(self) -> str:
        """Version of the runtime library actually used."""

    @property
    @abc.abstractmethod
    def providers(self) -> tuple[str, ...]:
        """Execution providers / backends in use, in priority order."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the session; later :meth:`predict` calls raise :class:`InferenceError`."""

    @abc.abstractmethod
    def _run(self, feeds: dict[str, Array]) -> dict[str, Array]:
        """Run one validated request (keys: public input names) and return the raw outputs."""

    def predict(self, inputs: Mapping[str, npt.ArrayLike] | npt.ArrayLike) -> dict[str, Array]:
        """Run the model on real-valued inputs and return real-valued outputs by name.

        ``inputs`` maps every input name to an array; a bare array is accepted when the model
        has exactly one input. Values are converted to the model's dtype (quantized when the
        input is quantized) and checked first, so a bad request raises :class:`InputError`
        before the runtime sees it. A model with a fixed batch of 1 given a batch of N is run
        once per sample and the outputs are concatenated.
        """
        feeds = self._fast_feeds(inputs)
        if feeds is not None:
            raw = self._run(feeds)
            plain = self._plain_outputs
            if plain is not None:
                return {name: np.asarray(raw[name]) for name in plain}
            return {spec.name: finish_output(spec, raw[spec.name]) for spec in self._outputs}
        arrays = self._by_name(inputs)
        loopable = self._loopable
        feeds = {
            spec.name: prepare_input(spec, arrays[spec.name], any_batch=loopable)
            for spec in self._inputs
        }
        check_shared_dims(self._inputs, {n: v.shape for n, v in feeds.items()}, any_batch=loopable)
        batch = self._batch_size(feeds) if loopable else 1
        raw = self._run(feeds) if batch == 1 else self._run_per_sample(feeds, batch)
        return {spec.name: finish_output(spec, raw[spec.name]) for spec in self._outputs}

    def _fast_feeds(
        self, inputs: Mapping[str, npt.ArrayLike] | npt.ArrayLike
    ) -> dict[str, Array] | None:
        """``inputs`` as the runtime's feeds when nothing needs converting, else None.

        The request qualifies when every input is a C-contiguous ``numpy.ndarray`` of exactly
        the model's dtype whose rank and fixed sizes match, the named sizes agree, and no input
        is quantized or a string. :meth:`prepare_input` would hand such arrays over unchanged
        (an integer input only as an equal copy), so skipping it changes no result. Anything
        else - including every request that would be refused - returns None and takes the full
        path, whose errors stay the only ones callers see.

        This runs on every request, so it is written for speed: the dtype is compared by
        identity (NumPy's built-in dtypes are singletons; an equal dtype that is another object,
        such as one with metadata, merely takes the full path), and a caller's dict is returned
        as it is rather than copied (the runtime only reads it).
        """
        checks = self._fast_inputs
        if checks is None:
            return None
        if type(inputs) is dict:
            if len(inputs) != len(checks):
                return None
            feeds = inputs
        elif type(inputs) is np.ndarray:
            if len(checks) != 1:
                return None
            feeds = {checks[0][0]: inputs}
        else:
            return None
        for name, dtype, rank, fixed in checks:
            arr = feeds.get(name)
            if type(arr) is not np.ndarray or arr.dtype is not dtype:
                return None
            shape = arr.shape
            if rank is not None and len(shape) != rank:
                return None
            for axis, size in fixed:
                if shape[axis] != size:
                    return None
            if not arr.flags.c_contiguous:
                return None
        for places in self._shared_dims:
            first_name, first_axis = places[0]
            want = feeds[first_name].shape[first_axis]
            for name, axis in places[1:]:
                if feeds[name].shape[axis] != want:
                    return None
        return feeds

    def _by_name(self, inputs: Mapping[str, npt.ArrayLike] | npt.ArrayLike) -> dict[str, Any]:
        if not isinstance(inputs, Mapping):
            if len(self._inputs) != 1:
                raise InputError(
                    f"the model has {len(self._inputs)} inputs ({self._expected()}); pass a "
                    "mapping of name to array"
                )
            return {self._inputs[0].name: inputs}
        names = self._input_names
        for key in inputs:
            if key not in names:
                raise InputError(
                    f"unknown input {key!r}; the model's inputs are {self._expected()}"
                )
        for spec in self._inputs:
            if spec.name not in inputs:
                raise InputError(
                    f"missing input {spec.name!r} ({spec.dtype}, shape {format_shape(spec.shape)})"
                )
        return dict(inputs)

    def _expected(self) -> str:
        return ", ".join(repr(spec.name) for spec in self._inputs)

    def _batch_size(self, feeds: Mapping[str, Array]) -> int:
        """The common leading size of all inputs of a fixed-batch-1 model (at least 1)."""
        sizes = {name: int(value.shape[0]) for name, value in feeds.items()}
        if len(set(sizes.values())) > 1:
            got = ", ".join(f"{name!r} has {size}" for name, size in sizes.items())
            raise InputError(
                f"inputs disagree on the batch size ({got}); the model runs one sample at a "
                "time and needs the same number of samples on every input"
            )
        name, size = next(iter(sizes.items()))
        if size < 1:
            raise InputError(f"input {name!r}: empty batch; send at least one sample")
        return size

    def _run_per_sample(self, feeds: Mapping[str, Array], batch: int) -> dict[str, Array]:
        parts: dict[str, list[Array]] = {spec.name: [] for spec in self._outputs}
        for i in range(batch):
            raw = self._run({name: value[i : i + 1] for name, value in feeds.items()})
            for name, value in raw.items():
                if name not in parts:
                    continue
                if np.ndim(value) == 0 or np.shape(value)[0] != 1:
                    raise InferenceError(
                        f"output {name!r} has shape {list(np.shape(value))}, without a batch "
                        f"dimension of 1; cannot run a batch of {batch} on a model with a fixed "
                        "batch of 1 - send one sample per request"
                    )
                parts[name].append(np.asarray(value))
        return {name: np.concatenate(values, axis=0) for name, values in parts.items()}

    def __enter__(self) -> Runtime:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        ins = ", ".join(f"{s.name}:{s.dtype}{format_shape(s.shape)}" for s in self._inputs)
        return f"<{type(self).__name__} {self.name} {self.version} inputs=({ins})>"


#: Per input: name, numpy dtype, rank (None: unknown) and the (axis, size) of each fixed size.
_FastInput: TypeAlias = "tuple[str, np.dtype[Any], int | None, tuple[tuple[int, int], ...]]"


def _fast_inputs(specs: Sequence[TensorSpec]) -> tuple[_FastInput, ...] | None:
    """What :meth:`Runtime._fast_feeds` checks per input; None when some input never qualifies.

    Quantized inputs always need converting and string inputs accept several dtypes, so a
    model with either always takes the full path. So does a model without inputs.
    """
    if not specs:
        return None
    out: list[_FastInput] = []
    for spec in specs:
        if spec.quantization is not None or spec.dtype == "string":
            return None
        shape = spec.shape
        fixed = (
            ()
            if shape is None
            else tuple((axis, dim) for axis, dim in enumerate(shape) if isinstance(dim, int))
        )
        out.append((spec.name, np.dtype(spec.dtype), spec.rank, fixed))
    return tuple(out)


def _shared_dims(specs: Sequence[TensorSpec]) -> tuple[tuple[tuple[str, int], ...], ...]:
    """Every named size that appears more than once, as the (input, axis) places it appears."""
    places: dict[str, list[tuple[str, int]]] = {}
    for spec in specs:
        for axis, dim in enumerate(spec.shape or ()):
            if isinstance(dim, str):
                places.setdefault(dim, []).append((spec.name, axis))
    return tuple(tuple(p) for p in places.values() if len(p) > 1)
