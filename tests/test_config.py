"""Daemon settings: one declaration (config.Settings); TOML file, then POCKETEMBED_* env, then flags."""

from pathlib import Path

import pytest

from pocketembed import cli, config, paths

DOCS = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


@pytest.fixture
def clean_env(monkeypatch):
    for var in config.ENV.values():
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("POCKETEMBED_CONFIG", raising=False)
    return monkeypatch


def serve_flags(*argv: str) -> dict:
    return config.flag_values(cli.build_parser().parse_args(["serve", *argv]))


def test_precedence_file_env_flags(tmp_path, clean_env):
    (tmp_path / "config.toml").write_text('socket = "/from/file.sock"\nthreads = 3\nworkers = 3\n'
                                          'models = ["all-minilm-l6-v2:q4_0"]\nkeep_alive = "10m"\n')
    s = config.read(tmp_path)
    assert (s.socket, s.threads, s.workers, s.models, s.keep_alive) == ("/from/file.sock", 3, 3,
                                                                        ["all-minilm-l6-v2:q4_0"], 600)
    assert s.max_collections == 64 and s.on_demand is True  # not in the file: the default
    clean_env.setenv("POCKETEMBED_THREADS", "1")
    clean_env.setenv("POCKETEMBED_WORKERS", "")  # empty: unset
    clean_env.setenv("POCKETEMBED_MODELS", "a:q8_0, b:q4_0")
    clean_env.setenv("POCKETEMBED_ON_DEMAND", "no")
    s = config.read(tmp_path)
    assert (s.threads, s.workers, s.models, s.socket, s.on_demand) == (1, 3, ["a:q8_0", "b:q4_0"], "/from/file.sock", False)
    s = config.read(tmp_path, flags=serve_flags("--threads", "2", "--on-demand", "--model", "c:q8_0", "--keep-alive", "-1"))
    assert (s.threads, s.socket, s.models, s.on_demand, s.keep_alive) == (2, "/from/file.sock", ["c:q8_0"], True,
                                                                          config.FOREVER)
    assert config.load(tmp_path, flags={"threads": 2})["threads"] == 2  # the dict form


def test_job_sources_from_env_split_on_the_path_separator(tmp_path, clean_env):
    clean_env.setenv("POCKETEMBED_JOB_SOURCES", "/a,b:/c")
    assert config.read(tmp_path).job_sources == ["/a,b", "/c"]
    assert config.read(tmp_path, flags=serve_flags("--job-source", "/d", "--job-source", "/e")).job_sources == ["/d", "/e"]


@pytest.mark.parametrize("source", ["file", "env", "flag"])
@pytest.mark.parametrize("key, value, reason", [
    ("threads", "many", "expected int"),
    ("workers", "0", ">= 1"),
    ("power_battery_min", "120", "<= 100"),
    ("power_idle_s", "soon", "expected float"),
    ("keep_alive", "forever", "not a duration"),
    ("allow_remote", "maybe", "expected bool"),
])
def test_a_bad_value_names_its_key_and_source(tmp_path, clean_env, source, key, value, reason):
    flags = None
    if source == "file":
        (tmp_path / "config.toml").write_text(f"{key} = {value!r}\n")
        where = f"config file {tmp_path / 'config.toml'}"
    elif source == "env":
        clean_env.setenv(config.ENV[key], value)
        where = f"environment variable POCKETEMBED_{key.upper()}"
    else:
        flag = "--" + key.replace("_", "-")
        flags = serve_flags(flag) if key == "allow_remote" else serve_flags(flag, value)
        if key == "allow_remote":  # a boolean flag takes no value: give it one the way a caller of read() could
            flags[key] = value
        where = f"flag {flag}"
    with pytest.raises(config.ConfigError) as e:
        config.read(tmp_path, flags=flags)
    assert e.value.code == "invalid_config"
    assert e.value.message.startswith(f"{key} = {value!r} (from {where}): ") and reason in e.value.message, e.value.message


def test_serve_reports_a_bad_flag_before_it_starts(tmp_path, clean_env, capsys):
    assert cli.main(["--home", str(tmp_path), "serve", "--threads", "0"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "error[invalid_config]: threads = '0' (from flag --threads): expected int >= 1" in err


def test_a_file_with_unknown_keys_or_bad_toml_is_refused(tmp_path, clean_env):
    (tmp_path / "config.toml").write_text("colour = 'blue'\n")
    with pytest.raises(config.ConfigError, match=r"unknown setting 'colour' \(from config file .*config.toml\); known: socket, "):
        config.read(tmp_path)
    (tmp_path / "config.toml").write_text("not toml [")
    with pytest.raises(config.ConfigError, match="cannot read config file"):
        config.read(tmp_path)
    with pytest.raises(config.ConfigError, match="cannot read config file"):
        config.read(tmp_path, str(tmp_path / "missing.toml"))  # named, so it must exist
    clean_env.setenv("POCKETEMBED_CONFIG", str(tmp_path / "other.toml"))
    (tmp_path / "other.toml").write_text("threads = 4\n")
    assert config.read(tmp_path).threads == 4


def test_socket_path_and_endpoint(monkeypatch, tmp_path):
    monkeypatch.setenv(paths.ENV_SOCKET, str(tmp_path / "x.sock"))
    assert paths.endpoint() == f"ipc://{tmp_path}/x.sock"
    assert paths.endpoint("tcp://127.0.0.1:5") == "tcp://127.0.0.1:5"
    monkeypatch.delenv(paths.ENV_SOCKET)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert paths.socket_path() == tmp_path / "pocketembed" / "pe.sock"


def test_per_model_settings_are_checked(tmp_path, clean_env):
    (tmp_path / "config.toml").write_text('keep_alive = "10m"\n[model."all-minilm-l6-v2:q4_0"]\nthreads = 1\nquery_prefix = "q: "\n'
                                          'keep_alive = -1\n')
    s = config.read(tmp_path)
    table = s.model["all-minilm-l6-v2:q4_0"]
    assert s.keep_alive == 600 and (table.threads, table.query_prefix, table.keep_alive, table.pooling) == (1, "q: ", -1, None)
    (tmp_path / "config.toml").write_text('[model."all-minilm-l6-v2:q4_0"]\ncolour = 1\n')
    with pytest.raises(config.ConfigError, match=r"model.\"all-minilm-l6-v2:q4_0\" \(from config file .*\): "
                                                 r"unknown setting 'colour'; known: threads, batch_tokens"):
        config.read(tmp_path)
    (tmp_path / "config.toml").write_text('[model."a:q8_0"]\nthreads = 2\n[model."b:q8_0"]\nthreads = "two"\n')
    with pytest.raises(config.ConfigError, match=r"model.\"b:q8_0\".threads = 'two' \(from config file .*\): expected int"):
        config.read(tmp_path)
    (tmp_path / "config.toml").write_text('[model."a:q8_0"]\npooling = "max"\n')
    with pytest.raises(config.ConfigError, match=r"model.\"a:q8_0\".pooling = 'max' .*invalid enum value 'max'; use one of cls, last, mean, rank"):
        config.read(tmp_path)
    (tmp_path / "config.toml").write_text('[model]\n"a:q8_0" = 3\n')
    with pytest.raises(config.ConfigError, match=r"model.\"a:q8_0\" = 3 .*expected table"):
        config.read(tmp_path)


def test_power_policy_from_file_and_env(tmp_path, clean_env):
    from pocketembed.daemon.power import policy_from_settings

    (tmp_path / "config.toml").write_text('power_battery_min = 70\npower_on_charger = false\npower_source = "sysfs"\n')
    clean_env.setenv("POCKETEMBED_POWER_IDLE_S", "12.5")
    s = config.read(tmp_path)
    p = policy_from_settings(s)
    assert (p.battery_min, p.on_charger, p.idle_s, s.power_source) == (70, False, 12.5, "sysfs")
    clean_env.setenv("POCKETEMBED_POWER_IDLE_S", "soon")
    with pytest.raises(config.ConfigError, match="power_idle_s = 'soon' .from environment variable POCKETEMBED_POWER_IDLE_S"):
        config.read(tmp_path)


def test_serve_config_is_the_settings_translated(tmp_path, clean_env):
    from pocketembed.daemon.power import PowerPolicy
    from pocketembed.daemon.scheduler import SchedulerConfig
    from pocketembed.daemon.settings import ServeConfig
    from pocketembed.gguf_models.catalog import DEFAULT_MODEL

    cfg = ServeConfig.from_settings(config.Settings(), tmp_path)
    # The scheduler's and the power policy's own defaults are the settings' defaults.
    assert cfg.scheduler == SchedulerConfig() and cfg.power_policy == PowerPolicy()
    assert (cfg.preload, cfg.keep_alive, cfg.memory_budget_bytes, cfg.job_sources, cfg.on_demand) == (
        [DEFAULT_MODEL], 300.0, None, [], True)
    (tmp_path / "config.toml").write_text(f'job_sources = ["~/sms"]\n[model."{DEFAULT_MODEL}"]\nbatch_tokens = 300\n')
    s = config.read(tmp_path, flags=serve_flags("--model", "none", "--memory-budget-mb", "60", "--workers", "1",
                                                "--queue-texts", "10", "--background-batch-tokens", "64",
                                                "--no-power-on-charger", "--power-poll-s", "0.2"))
    cfg = ServeConfig.from_settings(s, tmp_path)
    assert cfg.preload == [] and cfg.memory_budget_bytes == 60 << 20 and cfg.job_sources == [Path("~/sms").expanduser()]
    assert (cfg.scheduler.workers, cfg.scheduler.interactive.max_texts, cfg.scheduler.background.batch_tokens) == (1, 10, 64)
    assert cfg.power_policy.on_charger is False and cfg.power_policy.poll_s == 0.2
    assert cfg.model_settings[DEFAULT_MODEL].batch_tokens == 300 and cfg.model_settings[DEFAULT_MODEL].threads is None


def test_every_setting_is_in_the_docs_and_in_serve_help(capsys):
    page = DOCS.read_text()
    assert page == config.markdown(), "docs/configuration.md is stale: python -m pocketembed.config --markdown > docs/configuration.md"
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    usage = capsys.readouterr().out
    for f in config.fields():
        assert f"| `{f.name}` |" in page or f.kind == "table" and f'[{f.name}."NAME"]' in page
        if f.flag:
            assert f.flag in usage and f"${f.env}" in usage
    for f in config.fields(config.ModelTable):
        assert f"| `{f.name}` |" in page
    # The flags scripts and the Termux service have always used are still there.
    for flag in ("--socket", "--tcp", "--allow-remote", "--model", "--threads", "--workers", "--keep-alive",
                 "--memory-budget-mb", "--no-on-demand", "--power-source", "--job-source", "--require-auth-unix", "--config"):
        assert flag in usage
    assert {f.name for f in config.fields() if not f.flag} == {"token", "model"}
