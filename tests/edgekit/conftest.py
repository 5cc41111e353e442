from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from support.bundles import write_onnx_model

from edgekit.bundle import build_bundle
from edgekit.keys import SigningKey, generate_key
from edgekit.trust import TrustEnvelope, TrustPolicy


@pytest.fixture(scope="session")
def signers() -> dict[str, SigningKey]:
    """Four independent release keys, A to D."""
    return {name: generate_key() for name in "ABCD"}


@pytest.fixture(scope="session")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_onnx_model(tmp_path_factory.mktemp("model") / "model.onnx")


@pytest.fixture
def trust_file(tmp_path: Path, signers: dict[str, SigningKey]) -> Path:
    """A device trust anchor: key A alone, threshold 1."""
    policy = TrustPolicy.create([("A", signers["A"].public)], threshold=1)
    path = tmp_path / "trust.json"
    path.write_bytes(TrustEnvelope.unsigned(policy).to_bytes())
    return path


@pytest.fixture
def make_bundle(
    tmp_path: Path, model_file: Path, signers: dict[str, SigningKey]
) -> Callable[..., Path]:
    counter = iter(range(10_000))

    def make(
        *, version: int = 2, keys: str = "A", model: Path | None = None, **options: Any
    ) -> Path:
        out = tmp_path / f"bundle-{next(counter)}.ekb"
        options.setdefault("created", datetime.now(timezone.utc) - timedelta(minutes=1))
        build_bundle(
            model or model_file,
            out,
            name="tiny",
            version=version,
            keys=[signers[k] for k in keys],
            **options,
        )
        return out

    return make
