"""``[mqtt]`` in agent.toml: documented in the example, checked with one-line errors, and
turned into a working LinkConfig."""

from __future__ import annotations

import re
import socket
from dataclasses import fields
from pathlib import Path

import pytest

from device_agent.config import AgentConfig, MqttConfig, MqttTlsConfig
from device_agent.errors import ConfigError
from device_agent.fleet_link import link_config
from device_agent.mqtt_link import MqttVersion

EXAMPLE = Path(__file__).resolve().parents[3] / "device_agent" / "agent.example.toml"


def _load(tmp_path: Path, text: str) -> AgentConfig:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return AgentConfig.load(path)


def test_example_documents_every_mqtt_key_with_its_default(tmp_path: Path):
    text = EXAMPLE.read_text()
    assert AgentConfig.load(EXAMPLE).mqtt == MqttConfig()
    mqtt = text[text.index("[mqtt]") :]
    for cls in (MqttConfig, MqttTlsConfig):
        for field in fields(cls):
            if field.name != "tls":
                assert re.search(rf"\b{field.name} = ", mqtt), f"{cls.__name__}.{field.name}"
    uncommented = re.sub(r"(?m)^# (\w+ = .*)$", r"\1", text)
    config = _load(tmp_path, uncommented).mqtt
    assert config.fleet == "plant-1" and config.device == "cam-7"
    assert config.tls.cert_file == tmp_path / "/etc/edgekit/cam-7.crt"


def test_a_full_mqtt_section(tmp_path: Path):
    config = _load(
        tmp_path,
        "[mqtt]\nenabled = true\nhost = 'broker.lan'\nport = 8883\nfleet = 'f1'\n"
        "device = 'd-1'\nversion = '3.1.1'\nusername = 'u'\npassword_file = 'pw'\n"
        "telemetry_interval_s = 2.5\n[mqtt.tls]\nenabled = true\nca_file = 'ca.pem'\n",
    ).mqtt
    assert config.port == 8883 and config.version == "3.1.1"
    assert config.password_file == tmp_path / "pw" and config.tls.ca_file == tmp_path / "ca.pem"
    (tmp_path / "pw").write_text("s3cret\n")
    link = link_config(config)
    assert link.password == "s3cret" and link.version is MqttVersion.V311
    assert link.tls is not None and link.tls.ca_file == tmp_path / "ca.pem"
    assert link.fleet == "f1" and link.device == "d-1" and link.client_id is None
    assert _load(tmp_path, "[mqtt]\nversion = 5\n").mqtt.version == "5"


def test_the_device_defaults_to_the_host_name():
    assert MqttConfig(fleet="f").device_id == socket.gethostname()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[mqtt]\nenabled = true\n", "mqtt.fleet must be set when mqtt.enabled = true"),
        ("[mqtt]\nversion = '4'\n", 'mqtt.version must be "5" or "3.1.1"'),
        ("[mqtt]\nfleet = 'a/b'\n", "mqtt.fleet 'a/b' is not"),
        ("[mqtt]\ndevice = '+'\n", "mqtt.device '+' is not"),
        ("[mqtt]\npassword = 'x'\npassword_file = 'y'\n", "give one, not both"),
        ("[mqtt]\nport = 0\n", "mqtt.port must be at least 1"),
        ("[mqtt]\ntelemetry_interval_s = 0\n", "mqtt.telemetry_interval_s must be > 0"),
        ("[mqtt]\nreconnect_initial_s = 9.0\nreconnect_max_s = 1.0\n", "reconnect_max_s must"),
        ("[mqtt.tls]\nkey_file = 'k'\n", "mqtt.tls.key_file needs mqtt.tls.cert_file"),
        ("[mqtt.tls]\ncafile = 'x'\n", "mqtt.tls.cafile is not a known key"),
        ("[mqtt]\nintervall = 3\n", "mqtt.intervall is not a known key"),
    ],
)
def test_bad_mqtt_settings_are_one_clear_line(tmp_path: Path, text: str, message: str):
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, text)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_link_config_errors_name_the_key(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"mqtt\.password_file: cannot read"):
        link_config(MqttConfig(fleet="f", device="d", password_file=tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"set mqtt\.device"):
        link_config(MqttConfig(fleet="f", device="-bad"))
