"""The verify path must run on a Raspberry Pi Zero: standard library and cryptography only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import json, sys
from edgekit.trust import load_trust
from edgekit.verify import verify_bundle
policy = load_trust(sys.argv[1]).policy
verify_bundle(sys.argv[2], policy, install_to=sys.argv[3])
# cryptography's Rust binding registers "_openssl"; the rest is the interpreter's own plumbing.
allowed = set(sys.stdlib_module_names) | {"edgekit", "cryptography", "_cffi_backend", "cffi",
                                          "_openssl", "__main__", "_distutils_hack"}
loaded = sorted(m for m in {n.split(".")[0] for n in sys.modules} - allowed
                if not m.startswith("__editable__"))
print(json.dumps(loaded))
"""


def test_verify_and_install_import_only_stdlib_and_cryptography(make_bundle, trust_file, tmp_path):
    bundle = make_bundle()
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(trust_file), str(bundle), str(tmp_path / "slot")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(result.stdout.splitlines()[-1]) == []
    assert (tmp_path / "slot" / "model.onnx").exists()


def test_verify_path_modules_do_not_import_heavy_packages():
    # A static guard too, so a lazy import inside a function is caught before it ships.
    root = Path(__file__).resolve().parents[2] / "edgekit"
    forbidden = ("numpy", "onnx", "tensorflow", "torch", "fastapi", "click", "rich")
    for module in (
        "verify",
        "trust",
        "keys",
        "manifest",
        "archive",
        "_jsonutil",
        "errors",
        "fsutil",
    ):
        text = (root / f"{module}.py").read_text()
        for name in forbidden:
            assert f"import {name}" not in text and f"from {name}" not in text, (module, name)
