"""Float32 -> float16 conversion of an ONNX graph that keeps float32 inputs and outputs.

Why our own: onnxconverter-common's converter is the usual tool, but it is an extra dependency
with a history of pinning protobuf; what edgekit needs is small and easy to check. Device code
(and the golden-set check) then feeds and reads float32 whatever precision runs inside.

How: every standard-domain node that is not on the block list computes in float16. Its float32
initializers and constant attributes are stored as float16, ``Cast(to=float)`` becomes
``Cast(to=float16)``, and a ``Cast`` is inserted wherever a tensor crosses between a float16 node
and a float32 one (graph inputs/outputs, blocked nodes, inputs that the ONNX spec requires to be
float32 such as ``Resize`` scales). Values beyond float16's range are clipped to +-65504 rather
than becoming ``inf``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "DEFAULT_FP16_BLOCK_LIST",
    "Fp16Stats",
    "convert_to_float16",
]

FLOAT = TensorProto.FLOAT
FLOAT16 = TensorProto.FLOAT16
_FP16_MAX = float(np.finfo(np.float16).max)

#: Ops kept in float32: index/geometry ops whose float16 rounding changes results qualitatively,
#: random generators (their dtype attribute says float32), and existing (de)quantization ops.
DEFAULT_FP16_BLOCK_LIST: frozenset[str] = frozenset(
    {
        "NonMaxSuppression",
        "RoiAlign",
        "TopK",
        "Range",
        "CumSum",
        "EyeLike",
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Multinomial",
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
    }
)

#: Inputs that the ONNX spec types as float32 regardless of the node's data type.
_FLOAT32_ONLY_INPUTS: dict[str, frozenset[int]] = {
    "Resize": frozenset({2}),
    "Upsample": frozenset({1}),
}


@dataclass(frozen=True)
class Fp16Stats:
    """What the conversion did (recorded in the candidate's notes)."""

    fp16_nodes: int
    fp32_nodes: int
    casts_inserted: int
    clipped_values: int


def _to_fp16_array(array: np.ndarray[Any, Any]) -> tuple[np.ndarray[Any, Any], int]:
    clipped = int(np.count_nonzero(np.abs(array[np.isfinite(array)]) > _FP16_MAX))
    return np.clip(array, -_FP16_MAX, _FP16_MAX).astype(np.float16), clipped


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute
    )


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    types: dict[str, int] = {}
    graph = inferred.graph
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.HasField("tensor_type"):
            types[value.name] = value.type.tensor_type.elem_type
    for init in graph.initializer:
        types[init.name] = init.data_type
    return types


def convert_to_float16(
    model: onnx.ModelProto,
    *,
    keep_io_types: bool = True,
    op_block_list: Iterable[str] = DEFAULT_FP16_BLOCK_LIST,
    node_block_list: Iterable[str] = (),
) -> tuple[onnx.ModelProto, Fp16Stats]:
    """Return a float16 copy of ``model`` (the input proto is not modified) and statistics.

    ``keep_io_types`` keeps graph inputs/outputs float32 (casts at the boundary); nodes whose
    op type is in ``op_block_list`` or whose name is in ``node_block_list`` stay float32.
    """
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    blocked_ops = frozenset(op_block_list)
    blocked_nodes = frozenset(node_block_list)
    types = _elem_types(result)
    clipped = 0

    def is_fp16_node(node: onnx.NodeProto) -> bool:
        return (
            node.domain in ("", "ai.onnx")
            and node.op_type not in blocked_ops
            and node.name not in blocked_nodes
            and not _has_subgraph(node)
        )

    fp16_node = [is_fp16_node(n) for n in graph.node]

    # 1. Which float32 initializers can be stored as float16: all consumers compute in fp16.
    init_names = {init.name for init in graph.initializer}
    needs_fp32: set[str] = set()
    for node, in_fp16 in zip(graph.node, fp16_node, strict=True):
        keep = _FLOAT32_ONLY_INPUTS.get(node.op_type, frozenset())
        for index, name in enumerate(node.input):
            if name in init_names and (not in_fp16 or index in keep):
                needs_fp32.add(name)
    graph_output_names = {o.name for o in graph.output}
    current: dict[str, int] = {}  # tensor -> element type after conversion (floats only)
    for init in graph.initializer:
        if init.data_type == FLOAT and init.name not in needs_fp32 | graph_output_names:
            array, count = _to_fp16_array(numpy_helper.to_array(init))
            clipped += count
            init.CopyFrom(numpy_helper.from_array(array, init.name))
            current[init.name] = FLOAT16
        elif init.data_type in (FLOAT, FLOAT16):
            current[init.name] = init.data_type
    for value in graph.input:
        elem = value.type.tensor_type.elem_type
        if elem == FLOAT and not keep_io_types and value.name not in init_names:
            value.type.tensor_type.elem_type = FLOAT16
            elem = FLOAT16
        if elem in (FLOAT, FLOAT16):
            current.setdefault(value.name, elem)

    # 2. Walk nodes in (topological) graph order, fixing inputs with casts and typing outputs.
    new_nodes: list[onnx.NodeProto] = []
    casts: dict[tuple[str, int], str] = {}
    casts_inserted = 0

    def cast_to(name: str, elem: int) -> str:
        nonlocal casts_inserted
        key = (name, elem)
        if key not in casts:
            suffix = "fp16" if elem == FLOAT16 else "fp32"
            out = f"{name}__to_{suffix}"
            new_nodes.append(
                helper.make_node("Cast", [name], [out], name=f"{name}__cast_{suffix}", to=elem)
            )
            casts[key] = out
            casts_inserted += 1
        return casts[key]

    for node, in_fp16 in zip(list(graph.node), fp16_node, strict=True):
        keep = _FLOAT32_ONLY_INPUTS.get(node.op_type, frozenset())
        for index, name in enumerate(node.input):
            have = current.get(name)
            if not name or have is None:
                continue
            want = FLOAT16 if in_fp16 and index not in keep else FLOAT
            if have != want:
                node.input[index] = cast_to(name, want)
        if in_fp16:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == FLOAT:
                    array, count = _to_fp16_array(numpy_helper.to_array(attr.t))
                    clipped += count
                    attr.t.CopyFrom(numpy_helper.from_array(array, attr.t.name))
                elif node.op_type == "Cast" and attr.name == "to" and attr.i == FLOAT:
                    attr.i = FLOAT16
            if node.op_type == "ConstantOfShape" and not any(
                a.name == "value" for a in node.attribute
            ):
                node.attribute.append(
                    helper.make_attribute(
                        "value", numpy_helper.from_array(np.zeros(1, dtype=np.float16), "value")
                    )
                )
        new_nodes.append(node)
        for name in node.output:
            elem = types.get(name)
            if elem == FLOAT:
                current[name] = FLOAT16 if in_fp16 else FLOAT
            elif elem == FLOAT16:
                current[name] = FLOAT16

    # 3. Graph outputs: keep float32 by renaming the float16 tensor and casting back.
    for value in graph.output:
        if current.get(value.name) != FLOAT16:
            continue
        if not keep_io_types:
            value.type.tensor_type.elem_type = FLOAT16
            continue
        inner = f"{value.name}__fp16"
        for node in new_nodes:
            for i, name in enumerate(node.input):
                if name == value.name:
                    node.input[i] = inner
            for i, name in enumerate(node.output):
                if name == value.name:
                    node.output[i] = inner
        new_nodes.append(
            helper.make_node(
                "Cast", [inner], [value.name], name=f"{value.name}__cast_fp32", to=FLOAT
            )
        )
        casts_inserted += 1

    del graph.node[:]
    graph.node.extend(new_nodes)
    # Intermediate types changed: drop stale annotations and let inference recompute them.
    del graph.value_info[:]
    result = onnx.shape_inference.infer_shapes(result)
    stats = Fp16Stats(
        fp16_nodes=sum(fp16_node),
        fp32_nodes=len(fp16_node) - sum(fp16_node),
        casts_inserted=casts_inserted,
        clipped_values=clipped,
    )
    return result, stats
