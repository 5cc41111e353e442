"""Helpers for bundle tests: tiny real models, tampering tools, state snapshots.

Tampering is done with the standard library's :mod:`tarfile` — an implementation independent of
edgekit's own archive code — so the tests do not share the verifier's assumptions.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgekit.bundle import signatures_bytes
from edgekit.keys import MANIFEST_PAYLOAD_TYPE, SigningKey


def write_onnx_model(path: Path, *, seed: int = 0, features: int = 16, classes: int = 4) -> Path:
    """A small real ONNX model (MatMul + Add + Softmax) with a symbolic batch dimension."""
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal((features, classes)).astype(np.float32)
    bias = rng.standard_normal(classes).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "W"], ["logits0"]),
            helper.make_node("Add", ["logits0", "b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes])],
        [numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@dataclass
class Member:
    name: str
    data: bytes = b""
    kind: bytes = tarfile.REGTYPE
    linkname: str = ""


def read_members(bundle: Path) -> list[Member]:
    with tarfile.open(bundle, "r:") as archive:
        members = []
        for info in archive.getmembers():
            handle = archive.extractfile(info)
            members.append(Member(info.name, handle.read() if handle else b"", info.type))
    return members


def write_members(bundle: Path, members: Iterable[Member]) -> Path:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for member in members:
            info = tarfile.TarInfo(member.name)
            info.type = member.kind
            info.mode = 0o644
            if member.kind == tarfile.REGTYPE:
                info.size = len(member.data)
                archive.addfile(info, io.BytesIO(member.data))
            else:
                info.linkname = member.linkname
                if member.kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
                    info.devmajor, info.devminor = 1, 3
                archive.addfile(info)
    bundle.write_bytes(buffer.getvalue())
    return bundle


def rewrite(bundle: Path, change: Callable[[list[Member]], list[Member]]) -> Path:
    return write_members(bundle, change(read_members(bundle)))


def resign(members: list[Member], manifest: bytes, *keys: SigningKey) -> list[Member]:
    """Replace the manifest and sign it properly: the attack then passes the signature check."""
    sigs = signatures_bytes([k.sign(MANIFEST_PAYLOAD_TYPE, manifest) for k in keys])
    out = [Member("manifest.json", manifest), Member("signatures.json", sigs)]
    return out + [m for m in members if m.name not in ("manifest.json", "signatures.json")]


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every path below ``root`` with its mode and content: equal snapshots = nothing changed."""
    state: dict[str, tuple[int, bytes]] = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory, name)
            info = path.lstat()
            content = path.read_bytes() if path.is_file() and not path.is_symlink() else b""
            state[str(path.relative_to(root))] = (info.st_mode, content)
    return state
