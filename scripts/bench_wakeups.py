"""Wake-ups per second of an idle daemon, per thread: every wake-up costs a phone battery.

Counts each thread's context switches (voluntary + involuntary, from
/proc/PID/task/*/status) over a window, for daemons started side by side and
measured over the same seconds:

* idle: a model loaded, no request, no job;
* waiting: a job queued while the (injected) battery says "on battery at 40%",
  so it waits for the charger.

With ``--baseline REV`` the same two run from that commit's tree too (laid out
as installed, as scripts/bench_protocol.py does), so before/after come from one run.

    python scripts/bench_wakeups.py --seconds 60 --baseline d3ec208
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_protocol import baseline_tree, cpu_model  # noqa: E402

from pocketembed import paths  # noqa: E402
from pocketembed.ipc import Client  # noqa: E402

GOALS = {"idle": 0.2, "waiting": 1.0}


def switches(pid: int) -> dict[int, int]:
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "status").read_text()
        except OSError:
            continue
        n = sum(int(line.split()[1]) for line in text.splitlines() if "ctxt_switches:" in line)
        out[int(task.name)] = n
    return out


def start(tree: Path | None, home: Path, sock: Path, env_extra: dict[str, str]) -> subprocess.Popen:
    env = dict(os.environ, POCKETEMBED_HOME=str(home), **env_extra)
    env.pop("POCKETEMBED_SOCKET", None)
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    return subprocess.Popen([sys.executable, "-m", "pocketembed.cli", "serve", "--socket", str(sock), "--model",
                             "all-minilm-l6-v2:q8_0"], env=env, cwd=str(tree) if tree else None,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def ready(sock: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sock.exists():
            try:
                with Client(f"ipc://{sock}", timeout=2) as c:
                    c.ping()
                return
            except Exception:
                pass
        time.sleep(0.1)
    raise RuntimeError(f"daemon on {sock} did not start")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--baseline", help="git revision to measure in the same run")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        trees = {"this tree": None}
        if args.baseline:
            trees[f"baseline {args.baseline}"] = baseline_tree(args.baseline, tmp / "base")
        sensors = tmp / "sensors.json"
        sensors.write_text(json.dumps({"battery": {"percent": 40, "plugged": False}, "cpu_percent": 3}))
        sources = tmp / "sources"
        sources.mkdir()
        db = sources / "sms.db"
        with sqlite3.connect(db) as conn:
            conn.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY, body TEXT)")
            conn.executemany("INSERT INTO messages VALUES (?, ?)", [(i, f"message {i}") for i in range(200)])
        runs = {}
        for tree_name, tree in trees.items():
            for scenario in ("idle", "waiting"):
                key = (tree_name, scenario)
                home = tmp / f"home-{len(runs)}"
                home.mkdir()
                (home / "models").symlink_to(paths.models_dir(paths.home()))
                sock = tmp / f"s{len(runs)}.sock"
                env = {"POCKETEMBED_JOB_SOURCES": str(sources)}
                if scenario == "waiting":
                    env["POCKETEMBED_POWER_SOURCE"] = f"file:{sensors}"
                runs[key] = (start(tree, home, sock, env), sock)
        try:
            for key, (proc, sock) in runs.items():
                ready(sock)
                if key[1] == "waiting":
                    with Client(f"ipc://{sock}", timeout=30) as c:
                        job = c.index_table(str(db), "messages", "id", "body")
                        time.sleep(1.0)
                        state = c.job(job["id"])
                        assert state["state"] in ("queued", "waiting"), state
            time.sleep(3.0)  # let start-up work settle
            before = {key: switches(proc.pid) for key, (proc, _) in runs.items()}
            time.sleep(args.seconds)
            after = {key: switches(proc.pid) for key, (proc, _) in runs.items()}
            names = {}
            for key, (proc, sock) in runs.items():
                with Client(f"ipc://{sock}", timeout=30) as c:
                    names[key] = {t["native_id"]: t["name"] for t in c.stats().get("threads", [])}
        finally:
            for proc, _ in runs.values():
                proc.terminate()
                proc.wait(30)
    print(f"CPU: {cpu_model()}; wake-ups per second over {args.seconds:g} s (context switches, voluntary + involuntary)")
    for key in runs:
        per = {tid: (after[key].get(tid, n) - n) / args.seconds for tid, n in before[key].items()}
        total = sum(per.values())
        goal = GOALS[key[1]]
        print(f"\n{key[0]}, {key[1]}: {total:.2f}/s in {len(per)} threads (goal ≤ {goal}/s: "
              f"{'met' if total <= goal else 'NOT met'})")
        for tid, rate in sorted(per.items(), key=lambda kv: -kv[1]):
            if rate > 0:
                print(f"  {rate:7.2f}/s  {names[key].get(tid, f'thread {tid}')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
