"""The ``edgekit`` CLI contract: keys → trust → sign → co-sign → verify → inspect."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgekit.cli import cli
from edgekit.trust import load_trust


def run(*args: str, env: dict[str, str] | None = None, code: int = 0) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args], env=env, catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result.output


@pytest.fixture
def workdir(tmp_path: Path, model_file: Path) -> Path:
    (tmp_path / "model.onnx").write_bytes(model_file.read_bytes())
    run("keys", "generate", "release", "--dir", tmp_path / "keys")
    run("keys", "generate", "second", "--dir", tmp_path / "keys")
    return tmp_path


def test_keys_generate_writes_private_key_0600(workdir):
    private = workdir / "keys" / "release.key"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in private.read_bytes()
    assert b"PUBLIC KEY" in (workdir / "keys" / "release.pub").read_bytes()
    keyid = run("keys", "show", workdir / "keys" / "release.pub").strip()
    assert keyid == run("keys", "show", private).strip()
    assert len(keyid) == 64


def test_keys_generate_refuses_to_overwrite(workdir):
    out = run("keys", "generate", "release", "--dir", workdir / "keys", code=1)
    assert "refusing to overwrite" in out


def test_encrypted_key_needs_its_passphrase(workdir):
    env = {"MY_PASS": "correct horse"}
    run(
        "keys", "generate", "enc", "--dir", workdir / "keys", "--passphrase-env", "MY_PASS", env=env
    )
    assert b"ENCRYPTED" in (workdir / "keys" / "enc.key").read_bytes()
    run("trust", "init", "--key", workdir / "keys" / "enc.pub", "-o", workdir / "trust.json")
    sign = [
        "sign",
        workdir / "model.onnx",
        "--key",
        workdir / "keys" / "enc.key",
        "--name",
        "m",
        "--version",
        "1",
        "-o",
        workdir / "m.ekb",
    ]
    out = run(*sign, env={"EDGEKIT_KEY_PASSPHRASE": "wrong"}, code=1)
    assert "wrong passphrase" in out
    run(*sign, "--passphrase-env", "MY_PASS", env=env)
    run("verify", workdir / "m.ekb", "--trust", workdir / "trust.json")


def test_full_flow_with_threshold_two(workdir):
    keys = workdir / "keys"
    run(
        "trust",
        "init",
        "--key",
        keys / "release.pub",
        "--key",
        keys / "second.pub",
        "--threshold",
        "2",
        "-o",
        workdir / "trust.json",
    )
    np.savez(
        workdir / "golden.npz",
        **{
            "input:input": np.zeros((2, 1, 16), np.float32),
            "output:probabilities": np.zeros((2, 1, 4), np.float32),
        },
    )
    out = run(
        "sign",
        workdir / "model.onnx",
        "--key",
        keys / "release.key",
        "--name",
        "digits",
        "--version",
        "7",
        "--display-version",
        "1.2.0",
        "--golden",
        workdir / "golden.npz",
        "--arch",
        "arm64",
        "--arch",
        "x86_64",
        "--expires",
        "30d",
    )
    bundle = workdir / "digits-7.ekb"
    assert str(bundle) in out

    rejected = run("verify", bundle, "--trust", workdir / "trust.json", code=1)
    assert rejected.startswith("REJECTED [threshold-not-met]")
    assert rejected.count("\n") == 1

    run("sign", bundle, "--key", keys / "second.key", "--add")
    assert run("verify", bundle, "--trust", workdir / "trust.json").startswith("OK: digits v7")
    assert "rollback" in run(
        "verify", bundle, "--trust", workdir / "trust.json", "--installed-version", "7", code=1
    )
    assert "incompatible" in run(
        "verify", bundle, "--trust", workdir / "trust.json", "--arch", "armv7l", code=1
    )
    assert "incompatible" in run(
        "verify", bundle, "--trust", workdir / "trust.json", "--runtime", "tflite", code=1
    )
    run(
        "verify",
        bundle,
        "--trust",
        workdir / "trust.json",
        "--runtime",
        "onnx=1.20",
        "--arch",
        "aarch64",
    )

    info = json.loads(
        run("inspect", bundle, "--json", "--trust", workdir / "trust.json", "--check")
    )
    assert info["manifest"]["name"] == "digits"
    assert info["manifest"]["display_version"] == "1.2.0"
    assert info["manifest"]["targets"]["architectures"] == ["aarch64", "x86_64"]
    assert [s["status"] for s in info["signatures"]] == ["valid, trusted"] * 2
    assert {f["name"] for f in info["files"]} == {"model.onnx", "golden.npz"}
    assert all(f["hash_ok"] for f in info["files"])
    assert info["manifest"]["inputs"][0]["shape"] == ["batch", 16]
    table = run("inspect", bundle)
    assert "digits" in table and "golden.npz" in table and "not checked" in table
    assert "[batch, 16]" in table  # user text is shown literally, never as rich markup


def test_trust_rotation_via_cli(workdir):
    keys = workdir / "keys"
    run("keys", "generate", "third", "--dir", keys)
    run("trust", "init", "--key", keys / "release.pub", "-o", workdir / "trust.json")
    out = run(
        "trust",
        "rotate",
        "--trust",
        workdir / "trust.json",
        "--key",
        keys / "third.pub",
        "--sign-key",
        keys / "release.key",
        "-o",
        workdir / "trust-v2.json",
    )
    assert "not yet acceptable" in out
    before = (workdir / "trust.json").read_bytes()
    assert "untrusted-key" in run(
        "trust", "update", "--trust", workdir / "trust.json", workdir / "trust-v2.json", code=1
    )
    assert (workdir / "trust.json").read_bytes() == before
    out = run(
        "trust",
        "sign",
        workdir / "trust-v2.json",
        "--key",
        keys / "third.key",
        "--trust",
        workdir / "trust.json",
    )
    assert "acceptable by devices on v1" in out
    run("trust", "update", "--trust", workdir / "trust.json", workdir / "trust-v2.json")
    assert load_trust(workdir / "trust.json").policy.version == 2
    # The revoked release key no longer signs anything this device accepts.
    run(
        "sign",
        workdir / "model.onnx",
        "--key",
        keys / "release.key",
        "--name",
        "m",
        "--version",
        "1",
        "-o",
        workdir / "m.ekb",
    )
    assert "untrusted-key" in run(
        "verify", workdir / "m.ekb", "--trust", workdir / "trust.json", code=1
    )
    assert json.loads(run("trust", "show", workdir / "trust.json", "--json"))["version"] == 2
    assert "third" in run("trust", "show", workdir / "trust.json")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--version", "-3"], "is negative"),
        (["--version", "x"], "not a whole number"),
        (["--expires", "tomorrow"], "duration"),
        (["--runtime", "tensorrt"], "tensorrt"),
    ],
)
def test_sign_rejects_bad_options_before_work(workdir, args, message):
    base = [
        "sign",
        workdir / "model.onnx",
        "--key",
        workdir / "keys" / "release.key",
        "--name",
        "m",
        "--version",
        "1",
    ]
    result = CliRunner().invoke(cli, [str(a) for a in base + args])
    assert result.exit_code == 2
    assert message in result.output


def test_sign_refuses_a_file_that_is_not_a_model(workdir):
    (workdir / "notes.onnx").write_text("hello")
    out = run(
        "sign",
        workdir / "notes.onnx",
        "--key",
        workdir / "keys" / "release.key",
        "--name",
        "m",
        "--version",
        "1",
        code=1,
    )
    assert out.startswith("error [bundle]")


def test_sign_with_public_key_is_a_clear_error(workdir):
    out = run(
        "sign",
        workdir / "model.onnx",
        "--key",
        workdir / "keys" / "release.pub",
        "--name",
        "m",
        "--version",
        "1",
        code=1,
    )
    assert "is a public key" in out


def test_console_script_runs_in_a_subprocess(workdir):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    exe = Path(sys.executable).with_name("edgekit")
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, env=env, check=True)
    assert "sign" in result.stdout and "verify" in result.stdout
