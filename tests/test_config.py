"""Daemon settings: TOML file, then POCKETEMBED_* env, then flags."""

import pytest

from pocketembed import config, paths


def test_precedence_file_env_flags(tmp_path, monkeypatch):
    (tmp_path / "config.toml").write_text('socket = "/from/file.sock"\nthreads = 3\nmodels = ["all-minilm-l6-v2:q4_0"]\n')
    for var in config.ENV.values():
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("POCKETEMBED_CONFIG", raising=False)
    assert config.load(tmp_path) == {"socket": "/from/file.sock", "threads": 3, "models": ["all-minilm-l6-v2:q4_0"]}
    monkeypatch.setenv("POCKETEMBED_THREADS", "1")
    monkeypatch.setenv("POCKETEMBED_MODELS", "a:q8_0, b:q4_0")
    s = config.load(tmp_path)
    assert s["threads"] == 1 and s["models"] == ["a:q8_0", "b:q4_0"] and s["socket"] == "/from/file.sock"
    s = config.load(tmp_path, flags={"threads": 2, "socket": None})
    assert s["threads"] == 2 and s["socket"] == "/from/file.sock"


def test_bad_config_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("POCKETEMBED_CONFIG", raising=False)
    (tmp_path / "config.toml").write_text("threads = 'many'\n")
    with pytest.raises(config.ConfigError, match="threads must be int"):
        config.load(tmp_path)
    (tmp_path / "config.toml").write_text("colour = 'blue'\n")
    with pytest.raises(config.ConfigError, match="unknown setting"):
        config.load(tmp_path)
    (tmp_path / "config.toml").write_text("not toml [")
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load(tmp_path)


def test_socket_path_and_endpoint(monkeypatch, tmp_path):
    monkeypatch.setenv(paths.ENV_SOCKET, str(tmp_path / "x.sock"))
    assert paths.endpoint() == f"ipc://{tmp_path}/x.sock"
    assert paths.endpoint("tcp://127.0.0.1:5") == "tcp://127.0.0.1:5"
    monkeypatch.delenv(paths.ENV_SOCKET)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert paths.socket_path() == tmp_path / "pocketembed" / "pe.sock"


def test_per_model_settings_are_checked(tmp_path, monkeypatch):
    monkeypatch.delenv("POCKETEMBED_CONFIG", raising=False)
    (tmp_path / "config.toml").write_text('keep_alive = "10m"\n[model."all-minilm-l6-v2:q4_0"]\nthreads = 1\nquery_prefix = "q: "\n')
    s = config.load(tmp_path)
    assert s["keep_alive"] == "10m" and s["model"]["all-minilm-l6-v2:q4_0"] == {"threads": 1, "query_prefix": "q: "}
    (tmp_path / "config.toml").write_text('[model."all-minilm-l6-v2:q4_0"]\ncolour = 1\n')
    with pytest.raises(config.ConfigError, match="unknown setting 'colour'"):
        config.load(tmp_path)
    (tmp_path / "config.toml").write_text('[model."all-minilm-l6-v2:q4_0"]\nthreads = "two"\n')
    with pytest.raises(config.ConfigError, match="threads must be int"):
        config.load(tmp_path)


def test_power_policy_from_file_and_env(tmp_path, monkeypatch):
    from pocketembed.daemon.power import policy_from_settings

    for var in config.ENV.values():
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("POCKETEMBED_CONFIG", raising=False)
    (tmp_path / "config.toml").write_text('power_battery_min = 70\npower_on_charger = false\npower_source = "sysfs"\n')
    monkeypatch.setenv("POCKETEMBED_POWER_IDLE_S", "12.5")
    s = config.load(tmp_path)
    p = policy_from_settings(s)
    assert (p.battery_min, p.on_charger, p.idle_s, s["power_source"]) == (70, False, 12.5, "sysfs")
    monkeypatch.setenv("POCKETEMBED_POWER_IDLE_S", "soon")
    with pytest.raises(config.ConfigError, match="POCKETEMBED_POWER_IDLE_S must be a number"):
        config.load(tmp_path)
