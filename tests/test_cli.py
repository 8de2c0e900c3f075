"""The command line as a user runs it: output formats, errors, --help."""

import io
import json
import re
import shutil

import numpy as np
import pytest

from conftest import fresh_home, run_cli
from daemon_proc import write_battery
from pocketembed.gguf_models import manifest
from pocketembed.gguf_models.catalog import get


def assert_clean_error(proc, code):
    assert proc.returncode == 1, proc
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pocketembed: error[{code}]:"), proc.stderr


def test_help_for_every_command():
    for args in ([], ["models"], ["models", "list"], ["models", "prepare"], ["embed"], ["demo"], ["ping"], ["items"],
                 ["items", "enqueue"]):
        proc = run_cli(*args, "--help")
        assert proc.returncode == 0 and "usage: pocketembed" in proc.stdout, args


def test_models_list_reads_dims_and_pooling_from_the_files(home):
    proc = run_cli("models", "list", "--json", home=home)
    assert proc.returncode == 0, proc.stderr
    rows = {m["name"]: m for m in json.loads(proc.stdout)["models"]}
    assert set(rows) == {"all-minilm-l6-v2:q8_0", "all-minilm-l6-v2:q4_0", "all-minilm-l6-v2:f16", "all-minilm-l6-v2:bf16"}
    for r in rows.values():
        assert r["present"] and r["gguf"]["dims"] == 384 and r["gguf"]["pooling"] == "mean"
        assert r["gguf"]["context_length"] == 512 and r["catalog"]["max_tokens"] == 256
    assert rows["all-minilm-l6-v2:q8_0"]["default"]
    table = run_cli("models", "list", home=home).stdout
    assert "all-minilm-l6-v2:q4_0" in table and "mean" in table


def test_embed_json_from_arguments(home, engines):
    proc = run_cli("embed", "hello there", "see you soon", home=home)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["model"] == "all-minilm-l6-v2:q8_0" and out["dims"] == 384
    vecs = np.array(out["embeddings"], dtype=np.float32)
    assert np.allclose(vecs, engines["q8_0"].embed(["hello there", "see you soon"]), atol=1e-6)


def test_embed_npy_from_stdin_with_dims(home, engines):
    proc = run_cli("embed", "--format", "npy", "--dims", "32", "--model", "all-minilm-l6-v2:q4_0", home=home,
                   stdin=b"first line\nsecond line\nthird\n", text=False)
    assert proc.returncode == 0, proc.stderr
    arr = np.load(io.BytesIO(proc.stdout))
    assert arr.shape == (3, 32) and arr.dtype == np.float32
    assert np.allclose(np.linalg.norm(arr, axis=1), 1, atol=1e-5)
    assert np.allclose(arr, engines["q4_0"].embed(["first line", "second line", "third"], dims=32), atol=1e-6)


def test_demo_indexes_the_sms_through_a_daemon_it_starts_and_shows_the_messages_found(home, tmp_path):
    from pocketembed.cli import DEMO_QUERIES
    from pocketembed.sms import load_sms

    sock = tmp_path / "pe.sock"
    root = fresh_home(home, tmp_path / "home")
    proc = run_cli("demo", "--limit", "400", home=root, env={"POCKETEMBED_SOCKET": str(sock)})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "started `pocketembed serve`" in out and f"on ipc://{sock}" in out and "stopped the daemon (exit 0)" in out
    done = re.search(r"indexed 400 SMS .*: (\d+) embedded by .*, (\d+) unchanged, (\d+) reused", out)
    assert done, out
    embedded, unchanged, reused = map(int, done.groups())
    assert embedded + reused == 400 and unchanged == 0 and embedded >= 390  # repeated texts are embedded once
    texts = set(load_sms()[:400])
    for query in DEMO_QUERIES:
        block = out.split(f"search {query!r}: ", 1)[1].split("\nsearch ", 1)[0]
        lines = [ln for ln in block.splitlines()[1:] if ln.strip()][:3]
        assert len(lines) == 3, block
        for line in lines:  # score, which side matched, id, label, then the message itself
            score, sides, ident, label, text = line.split(maxsplit=4)
            assert -1 <= float(score) <= 2 and ident.startswith("#") and label in ("ham", "spam")
            assert sides in ("vector", "lexical", "lexical+vector"), line
            assert any(t.startswith(text.rstrip("…")) or " ".join(t.split()).startswith(text.rstrip("…")) for t in texts)
    assert not sock.exists()  # the daemon it started is gone

    again = run_cli("demo", "--limit", "400", home=root, env={"POCKETEMBED_SOCKET": str(sock)})
    assert again.returncode == 0 and "0 embedded" in again.stdout and "400 unchanged" in again.stdout


def test_demo_uses_a_running_daemon(home, tmp_path):
    from daemon_proc import DaemonProcess
    from pocketembed.cli import DEMO_QUERIES

    sock = tmp_path / "pe.sock"
    root = fresh_home(home, tmp_path / "home")
    daemon = DaemonProcess(root, sock).wait_ready()
    try:
        proc = run_cli("demo", "--socket", str(sock), "--limit", "100", home=root)
        assert proc.returncode == 0, proc.stderr
        assert f"using the daemon already running on ipc://{sock}" in proc.stdout and "started" not in proc.stdout
        with daemon.client() as c:
            by_op = c.stats()["by_op"]
            assert by_op["index.add"] == 1 and by_op["search"] == len(DEMO_QUERIES)  # the demo's requests reached it
            assert {x["name"]: x for x in c.collections()}["demo:all-minilm-l6-v2:q8_0"]["items"] == 100
    finally:
        assert daemon.stop() == 0


def test_bad_input_errors(home):
    assert_clean_error(run_cli("embed", "", home=home), "empty_text")
    assert_clean_error(run_cli("embed", "word " * 400, home=home), "text_too_long")
    assert_clean_error(run_cli("embed", "--model", "nope:q8_0", "hi", home=home), "unknown_model")
    assert_clean_error(run_cli("embed", "--dims", "1000", "hi", home=home), "invalid_input")
    assert_clean_error(run_cli("embed", home=home, stdin=""), "invalid_input")
    ok = run_cli("embed", "--truncate", "word " * 400, home=home)
    assert ok.returncode == 0


@pytest.fixture
def copied_home(home, tmp_path):
    """A private copy of the prepared models, safe to damage."""
    dst = tmp_path / "home"
    shutil.copytree(home / "models", dst / "models")
    return dst


def test_missing_model_file(copied_home):
    (copied_home / "models" / get(None).file).unlink()
    proc = run_cli("embed", "hi", home=copied_home)
    assert_clean_error(proc, "model_not_prepared")
    assert "pocketembed models prepare" in proc.stderr


def test_truncated_model_file(copied_home):
    path = copied_home / "models" / get(None).file
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    proc = run_cli("embed", "hi", home=copied_home)
    assert_clean_error(proc, "model_corrupt")
    assert "truncated" in proc.stderr


def test_wrong_sha256_is_refused(copied_home):
    path = copied_home / "models" / get(None).file
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # same size, one flipped byte in the weights
    path.write_bytes(bytes(data))
    proc = run_cli("embed", "hi", home=copied_home)
    assert_clean_error(proc, "model_corrupt")
    assert "sha256" in proc.stderr


def test_not_gguf_is_refused(copied_home):
    path = copied_home / "models" / get(None).file
    path.write_bytes(b"<html>not a model</html>")
    assert_clean_error(run_cli("embed", "hi", home=copied_home), "model_corrupt")


def test_swapped_file_is_refused(copied_home):
    """A valid GGUF of another quantization in the q8_0 slot: the sha256 catches it."""
    models = copied_home / "models"
    shutil.copyfile(models / get("all-minilm-l6-v2:q4_0").file, models / get(None).file)
    assert_clean_error(run_cli("embed", "hi", home=copied_home), "model_corrupt")
    assert manifest.is_current(copied_home, get("all-minilm-l6-v2:q4_0"))


def test_status_and_jobs_list_an_apps_queue_job(home, tmp_path):
    """A queue job (index.enqueue, no source table) shows in `status`, `jobs` and `jobs status ID` as a user runs them.

    The battery reads unplugged, so the job stays waiting with its items: what a
    phone shows between a first install's enqueue and the charger. Then plugged,
    it drains and `jobs` shows it done.
    """
    import time

    from daemon_proc import DaemonProcess
    from pocketembed.sms import load_sms

    sensors = tmp_path / "battery.json"

    def battery(plugged: bool) -> None:
        write_battery(sensors, 40, plugged)

    battery(plugged=False)
    sock = tmp_path / "pe.sock"
    root = fresh_home(home, tmp_path / "home")
    daemon = DaemonProcess(root, sock, "--power-source", f"file:{sensors}",
                           env={"POCKETEMBED_POWER_POLL_S": "0.2", "POCKETEMBED_POWER_SETTLE_S": "0.2"}).wait_ready()
    try:
        texts = load_sms()[:30]
        with daemon.client() as c:
            job = c.index_enqueue("sms", [{"id": i + 1, "text": s} for i, s in enumerate(texts)])
        assert job["kind"] == "queue"
        line = re.compile(rf"job {job['id']} \w+ .*queue → sms, 30 waiting")

        status = run_cli("status", "--socket", str(sock), home=root)
        assert status.returncode == 0 and "Traceback" not in status.stderr, status.stderr
        assert line.search(status.stdout), status.stdout
        listed = run_cli("jobs", "--socket", str(sock), home=root)
        assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
        assert line.search(listed.stdout), listed.stdout
        one = run_cli("jobs", "status", str(job["id"]), "--socket", str(sock), home=root)
        assert one.returncode == 0 and "Traceback" not in one.stderr, one.stderr
        assert line.search(one.stdout) and "0/30 items" in one.stdout, one.stdout

        battery(plugged=True)
        with daemon.client() as c:
            deadline = time.monotonic() + 120  # a wedge guard: 30 short texts take well under a second
            while c.job(job["id"])["state"] != "done":
                assert time.monotonic() < deadline, c.job(job["id"])
                time.sleep(0.1)
        listed = run_cli("jobs", "--socket", str(sock), home=root)
        assert listed.returncode == 0, listed.stderr
        assert re.search(rf"job {job['id']} done .* 30/30 items  queue → sms(?!, \d+ waiting)", listed.stdout), listed.stdout
        waited = run_cli("jobs", "wait", str(job["id"]), "--socket", str(sock), home=root)
        assert waited.returncode == 0 and "job %d done: 30 items" % job["id"] in waited.stdout, (waited.stdout, waited.stderr)
    finally:
        assert daemon.stop() == 0


def test_ping_items_and_models_list_against_the_daemon(home, tmp_path):
    """The commands of the ops that had none: ping, items add / enqueue / delete, models list --daemon."""
    from daemon_proc import DaemonProcess

    sock = tmp_path / "pe.sock"
    root = fresh_home(home, tmp_path / "home")
    daemon = DaemonProcess(root, sock, "--model", "all-minilm-l6-v2:q8_0").wait_ready()
    on = ("--socket", str(sock))
    try:
        pong = run_cli("ping", *on, home=root)
        assert pong.returncode == 0 and pong.stdout.startswith("pong: pocketembed "), pong.stderr
        lines = "\n".join(json.dumps({"id": i, "text": t, "metadata": {"n": i}})
                          for i, t in enumerate(["dinner at eight?", "the train is late", "happy birthday!"], 1))
        added = run_cli("items", "add", "-c", "notes", "--store-text", *on, home=root, stdin=lines + "\n\n")
        assert added.returncode == 0 and "3 items added to notes" in added.stdout, added.stderr
        found = run_cli("search", "when is dinner", "-c", "notes", "-k", "1", "--json", *on, home=root)
        hit = json.loads(found.stdout)[0]
        assert hit["id"] == 1 and hit["text"] == "dinner at eight?" and hit["metadata"] == {"n": 1}
        deleted = run_cli("items", "delete", "-c", "notes", "1", "2", "404", "--json", *on, home=root)
        assert deleted.returncode == 0 and json.loads(deleted.stdout) == {"deleted": 2}, deleted.stderr
        queued = run_cli("items", "enqueue", "-c", "notes", "--delete", "3", "--json", *on, home=root,
                         stdin=json.dumps({"id": "later", "text": "on the charger"}))
        assert queued.returncode == 0, queued.stderr
        job = json.loads(queued.stdout)
        assert job["kind"] == "queue" and job["collection"] == "notes" and job["enqueued"] == 1 and job["deletions"] == 1
        bad = run_cli("items", "add", "-c", "notes", *on, home=root, stdin='{"id": 1}\n')
        assert_clean_error(bad, "invalid_input")
        models = run_cli("models", "list", "--daemon", "--json", *on, home=root)
        loaded = {m["name"] for m in json.loads(models.stdout) if m["loaded"]}
        assert loaded == {"all-minilm-l6-v2:q8_0"}, models.stdout
        table = run_cli("models", "list", "--daemon", *on, home=root)
        assert re.search(r"^all-minilm-l6-v2:q8_0 \*\s+embed\s+384\s+yes\s+yes\s", table.stdout, re.M), table.stdout
    finally:
        assert daemon.stop() == 0
