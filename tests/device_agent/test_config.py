"""agent.toml: every key known, documented in the example file, checked with one-line errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from device_agent.config import AgentConfig, HealthConfig, HttpConfig, SerialConfig
from device_agent.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "device_agent" / "agent.example.toml"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_example_file_loads_and_equals_the_defaults():
    loaded = AgentConfig.load(EXAMPLE)
    defaults = AgentConfig()
    for name in ("state_dir", "trust_file", "architecture", "require_golden", "verify_on_boot"):
        assert getattr(loaded, name) == getattr(defaults, name), name
    for section in ("runtime", "health", "http", "serial", "events"):
        assert getattr(loaded, section) == getattr(defaults, section), section


def test_example_file_documents_every_key(tmp_path):
    """Uncommenting every optional key still loads, and every key the parser knows appears."""
    text = EXAMPLE.read_text()
    uncommented = re.sub(r"(?m)^# (\w+ = .*)$", r"\1", text)
    config = AgentConfig.load(_write(tmp_path, uncommented))
    assert config.trust_file is not None and config.architecture == "aarch64"
    assert config.runtime.threads == 4 and config.health.max_p95_ms == 250.0
    assert config.http.unix_socket == Path("/run/edgekit/agent.sock")
    assert config.http.socket_mode == 0o660 and config.serial.hop == 1
    keys = set(re.findall(r"(?m)^#? ?(\w+) = ", text))
    for section in (HealthConfig, HttpConfig, SerialConfig):
        for name in section.__dataclass_fields__:
            assert name in keys, f"{section.__name__}.{name} is not in the example"


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    config = AgentConfig.load(_write(tmp_path, 'state_dir = "state"\ntrust_file = "t.json"\n'))
    assert config.state_dir == tmp_path / "state"
    assert config.trust_path == tmp_path / "t.json"
    assert AgentConfig(state_dir="/x").trust_path == Path("/x/trust.json")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stat_dir = '/x'\n", "stat_dir is not a known key"),
        ("[health]\nmax_p59_ms = 3\n", "health.max_p59_ms is not a known key"),
        ("[healthz]\n", "healthz is not a known key"),
        ("[health]\nmin_inferences = '50'\n", "health.min_inferences must be an integer"),
        ("[health]\nmax_error_rate = 2.0\n", "health.max_error_rate must be at most 1"),
        ("[health]\nmax_seconds = 0\n", "health.max_seconds must be > 0"),
        ("[health]\non_timeout = 'wait'\n", "health.on_timeout must be"),
        ("[runtime]\nproviders = 'CPUExecutionProvider'\n", "runtime.providers must be a list"),
        ("[runtime]\nthreads = 0\n", "runtime.threads must be at least 1"),
        (
            "[runtime]\ndisabled_optimizers = 'QDQPropagationTransformer'\n",
            "runtime.disabled_optimizers must be a list of optimizer names",
        ),
        ("[runtime]\ndisabled_optimizers = ['']\n", "runtime.disabled_optimizers must be a list"),
        ("[runtime]\ndisabled_optimizers = [1]\n", "runtime.disabled_optimizers must be a list"),
        ("require_golden = 'yes'\n", "require_golden must be true or false"),
        ("[http]\nport = 70000\n", "http.port must be at least 0 and at most 65535"),
        ("http = 5\n", "http must be a table"),
        ("[serial]\nwindow = true\n", "serial.window must be an integer"),
        ("architecture = ''\n", "architecture must not be empty"),
        ("state_dir = \n", "invalid TOML"),
    ],
)
def test_bad_config_is_one_clear_line(tmp_path, text, message):
    with pytest.raises(ConfigError) as caught:
        AgentConfig.load(_write(tmp_path, text))
    text_of_error = str(caught.value)
    assert message in text_of_error
    assert text_of_error.startswith("agent.toml: ") and "\n" not in text_of_error
    assert caught.value.reason == "config"


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        AgentConfig.load(tmp_path / "nope.toml")


def test_runtime_options_are_passed_through(tmp_path):
    config = AgentConfig.load(
        _write(tmp_path, '[runtime]\nproviders = ["CUDAExecutionProvider"]\nthreads = 2\n')
    )
    options = config.runtime.options()
    assert options.providers == ("CUDAExecutionProvider",) and options.threads == 2


def test_disabled_optimizers_left_out_follows_the_bundle_and_a_list_replaces_it(tmp_path):
    assert AgentConfig.load(_write(tmp_path, "[runtime]\n")).runtime.disabled_optimizers is None
    config = AgentConfig.load(_write(tmp_path, "[runtime]\ndisabled_optimizers = []\n"))
    assert config.runtime.disabled_optimizers == ()
    assert config.runtime.options().disabled_optimizers == ()
    text = '[runtime]\ndisabled_optimizers = ["QDQPropagationTransformer", "ConstantFolding"]\n'
    config = AgentConfig.load(_write(tmp_path, text))
    expected = ("QDQPropagationTransformer", "ConstantFolding")
    assert config.runtime.disabled_optimizers == expected
    assert config.runtime.options().disabled_optimizers == expected
