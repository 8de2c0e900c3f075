"""A hostile or unlucky app on the phone, over loopback TCP with client tokens, against a real daemon.

Each test is a case an app with a low-permission token could try: kill the
daemon with an extreme argument, learn about other apps' data from the way it
is refused, lock another app out, keep it out after a passing fault, or grow
the daemon until the low-memory killer takes it. Storage is real SQLite, the
sockets are real ZeroMQ; nothing is faked but the resource limit of item 9,
which the test lowers on the daemon process itself.
"""

from __future__ import annotations

import resource
import time

import psutil
import pytest
import zmq

from conftest import fresh_home, run_cli
from daemon_proc import DaemonProcess
from pocketembed.config import parse_duration
from pocketembed.errors import InvalidInput
from pocketembed.ipc import Client, DaemonError
from pocketembed.ipc import protocol as P
from test_auth import add_client, free_port

Q8 = "all-minilm-l6-v2:q8_0"
MAX_TCP_CONNECTIONS = 64  # daemon/server.py's; the test below checks the daemon holds to it
MAX_DURATION_S = 30 * 86_400.0  # pocketembed.config's longest keep_alive


def dealer(endpoint: str, routing_id: bytes | None = None, **options: int) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if routing_id is not None:
        s.setsockopt(zmq.ROUTING_ID, routing_id)
    for name, value in options.items():
        s.setsockopt(getattr(zmq, name), value)
    s.connect(endpoint)
    return s


def ask(s: zmq.Socket, op: str, args: dict | None = None, auth: str | None = None, req_id: int = 1,
        timeout_ms: int = 30_000) -> dict:
    s.send(P.request(req_id, op, args or {}, auth=auth))
    assert s.poll(timeout_ms), f"no reply to {op}"
    return P.unpack(s.recv())


@pytest.fixture(scope="module")
def served(home, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile-tcp")
    root = fresh_home(home, tmp / "home")
    port = free_port()
    d = DaemonProcess(root, tmp / "pe.sock", "--model", Q8, "--tcp", f"127.0.0.1:{port}").wait_ready()
    yield d, root, f"tcp://127.0.0.1:{port}"
    assert d.stop() == 0


def alive(d: DaemonProcess) -> None:
    with d.client(timeout=60) as owner:
        assert owner.ping()["pong"]
        assert owner.embed(["still serving"]).shape == (1, 384)
    assert d.proc.poll() is None


# -- 1. extreme durations ----------------------------------------------------------


@pytest.mark.parametrize("value", [1e10, float("inf"), "3000000h", "-", "-junk", "", "1e10", MAX_DURATION_S + 1])
def test_durations_past_the_limit_or_malformed_are_refused(value):
    with pytest.raises(InvalidInput):
        parse_duration(value)


@pytest.mark.parametrize("value,seconds", [(-1, -1.0), ("-1", -1.0), ("-5m", -1.0), (float("-inf"), -1.0), (0, 0.0),
                                           ("90s", 90.0), ("1h30m", 5400.0), (MAX_DURATION_S, MAX_DURATION_S)])
def test_durations_in_range_parse(value, seconds):
    assert parse_duration(value) == seconds


def test_an_embed_token_cannot_stop_the_daemon_with_a_keep_alive(served):
    d, root, tcp = served
    token = add_client(root, "ka-app", "embed")
    s = dealer(tcp)
    try:
        for i, value in enumerate([1e10, float("inf"), "3000000h", "-", "-junk"]):
            reply = ask(s, "embed", {"texts": ["hi"], "keep_alive": value}, auth=token, req_id=i)
            assert reply["error"]["code"] == P.INVALID_ARGS, (value, reply)
        # The longest allowed keep_alive is honoured, and the keep-alive thread lives on with it.
        assert ask(s, "embed", {"texts": ["hi"], "keep_alive": MAX_DURATION_S}, auth=token)["ok"]
        with d.client() as owner:
            owner.unload(Q8)
            owner.load(Q8, keep_alive=MAX_DURATION_S)
            assert owner.models()[0]["name"]
            keep = {m["name"]: m.get("keep_alive_s") for m in owner.models()}
            assert keep[Q8] == MAX_DURATION_S
    finally:
        s.close()
    alive(d)


# -- 7. refusals reveal nothing; authenticate, authorise, then validate -----------


def test_no_token_and_an_unknown_op_is_unauthorized_without_the_op_list(served):
    _, _, tcp = served
    s = dealer(tcp)
    try:
        reply = ask(s, "no.such.op")
        assert reply["error"]["code"] == P.UNAUTHORIZED, reply
        assert "known:" not in reply["error"]["message"] and "models.list" not in reply["error"]["message"]
        assert ask(s, "ping")["ok"]
    finally:
        s.close()


def test_a_token_without_the_permission_is_forbidden_whatever_its_arguments(served):
    d, root, tcp = served
    embed_only = add_client(root, "embed-only", "embed")
    searcher = add_client(root, "searcher", "search:mine")
    with d.client() as owner:
        owner.index_add("theirs", [{"id": 1, "text": "a message of another app"}])
    s = dealer(tcp)
    try:
        cases = [
            (embed_only, "index.add", {"collection": "theirs", "items": "not a list"}),
            (embed_only, "index.add", {"items": []}),
            (embed_only, "stats", {"unknown": 1}),
            (embed_only, "search", {"collection": 5}),
            (embed_only, "jobs.status", {"job": "x"}),
            (searcher, "search", {"collection": "theirs", "query": "", "k": -1}),
            (searcher, "search", {"collection": "theirs", "bogus": True}),
            (searcher, "index.add", {"collection": "mine"}),
        ]
        for token, op, args in cases:
            reply = ask(s, op, args, auth=token)
            assert reply["error"]["code"] == P.FORBIDDEN, (op, args, reply)
            assert "theirs" not in reply["error"]["message"]
        # With the permission, the same kind of bad arguments are named.
        reply = ask(s, "search", {"collection": "mine", "query": "", "k": -1}, auth=searcher)
        assert reply["error"]["code"] == P.INVALID_ARGS, reply
    finally:
        s.close()


def test_job_ids_cannot_be_probed(served):
    d, root, tcp = served
    embed_only = add_client(root, "prober", "embed")
    other_app = add_client(root, "other-index", "index:elsewhere")
    with d.client() as owner:
        job = owner.index_enqueue("private", [{"id": 1, "text": "a private message"}])["id"]
    s = dealer(tcp)
    try:
        for token, code in ((embed_only, P.FORBIDDEN), (other_app, P.UNKNOWN_JOB)):
            real = ask(s, "jobs.status", {"job": job}, auth=token)["error"]
            missing = ask(s, "jobs.status", {"job": job + 10_000}, auth=token)["error"]
            assert real["code"] == missing["code"] == code, (real, missing)
            assert real["message"].replace(str(job), "N") == missing["message"].replace(str(job + 10_000), "N")
            assert "private" not in real["message"]
    finally:
        s.close()


# -- 8. the bad-token block cannot be aimed at someone else ------------------------


def test_an_impostor_cannot_lock_out_a_victims_routing_id(served):
    d, root, tcp = served
    victim_token = add_client(root, "victim", "embed")
    impostor = dealer(tcp, routing_id=b"victim-app")
    try:
        codes = [ask(impostor, "models.list", auth=f"pe_wrong-{i}", req_id=i)["error"]["code"] for i in range(15)]
        assert codes == [P.UNAUTHORIZED] * 15
        # Blocked itself: its next request, with the victim's good token even, is not checked.
        assert ask(impostor, "models.list", auth=victim_token)["error"]["code"] == P.UNAUTHORIZED
    finally:
        impostor.close()
    with d.client() as owner:
        assert owner.stats()["auth"]["blocked"] >= 5
    victim = dealer(tcp, routing_id=b"victim-app")  # the same routing id, a new connection of its own
    try:
        deadline = time.monotonic() + 60
        while True:  # the impostor's connection may still hold the routing id for a moment
            victim.send(P.request(1, "models.list", {}, auth=victim_token))
            if victim.poll(2000):
                break
            assert time.monotonic() < deadline, "the victim never got a reply"
        assert P.unpack(victim.recv())["ok"]
    finally:
        victim.close()


# -- 9. a clients file that cannot be read for a moment ----------------------------


def test_a_clients_file_unreadable_for_want_of_fds_keeps_the_last_table(served):
    d, root, tcp = served
    token = add_client(root, "fd-app", "embed")
    s = dealer(tcp)
    daemon = psutil.Process(d.proc.pid)
    try:
        assert ask(s, "models.list", auth=token)["ok"]
        limits = daemon.rlimit(psutil.RLIMIT_NOFILE)
        daemon.rlimit(psutil.RLIMIT_NOFILE, (daemon.num_fds(), limits[1]))  # no fd left to open anything
        try:
            later = add_client(root, "fd-later", "embed")  # the file changes while the daemon cannot read it
            reply = ask(s, "embed", {"texts": ["hi"]}, auth=token)
            assert reply["ok"], reply  # the last table read still holds
        finally:
            daemon.rlimit(psutil.RLIMIT_NOFILE, limits)
        assert ask(s, "models.list", auth=later)["ok"]  # re-read once fds are free again: no restart needed
        assert ask(s, "models.list", auth=token)["ok"]
    finally:
        s.close()
    alive(d)


# -- 10. replies nobody reads, connections nobody closes ---------------------------


def test_a_client_that_never_reads_its_replies_cannot_grow_the_daemon(served):
    d, root, tcp = served
    token = add_client(root, "unread", "search:big")
    with d.client(timeout=120) as owner:
        for start in range(0, 1000, 250):
            owner.index_add("big", [{"id": i, "text": f"message number {i} about the weekend",
                                     "metadata": {"pad": "x" * 4000}} for i in range(start, start + 250)])
        searches_before = owner.stats()["by_op"].get("search", 0)
    rss_before = psutil.Process(d.proc.pid).memory_info().rss
    # Its own ZeroMQ stops reading the socket at once: as an app that never calls recv.
    s = dealer(tcp, RCVHWM=1, RCVBUF=4096)
    try:
        n = 64
        for i in range(n):
            s.send(P.request(i, "search", {"collection": "big", "query": "weekend", "k": 1000}, auth=token))
        with d.client() as owner:
            deadline = time.monotonic() + 300
            while owner.stats()["by_op"].get("search", 0) < searches_before + n:
                assert time.monotonic() < deadline, "the searches were never answered"
                time.sleep(0.2)
            stats = owner.stats()
        grown = psutil.Process(d.proc.pid).memory_info().rss - rss_before
        # Unbounded, 64 replies of ~4 MB wait in the daemon (~256 MB); bounded, REPLY_HWM (8) of them at most.
        assert grown < 100e6, f"the daemon grew by {grown / 1e6:.0f} MB"
        assert stats["replies_dropped"] > 0
        alive(d)
    finally:
        s.close()


def test_connections_beyond_the_cap_are_refused_and_others_still_served(served):
    d, root, tcp = served
    token = add_client(root, "many", "embed")
    socks = [dealer(tcp) for _ in range(MAX_TCP_CONNECTIONS + 6)]
    try:
        with d.client() as owner:
            deadline = time.monotonic() + 60
            while owner.stats()["connections_refused"] < 6:
                assert time.monotonic() < deadline, "no connection was refused"
                time.sleep(0.1)
        for i, s in enumerate(socks):
            s.send(P.request(i, "models.list", {}, auth=token))
        poller = zmq.Poller()
        for s in socks:
            poller.register(s, zmq.POLLIN)
        answered: set[int] = set()
        deadline = time.monotonic() + 60
        while len(answered) < MAX_TCP_CONNECTIONS and time.monotonic() < deadline:
            for s, _ in poller.poll(1000):
                answered.add(P.unpack(s.recv())["id"])
        for s, _ in poller.poll(1000):  # a moment for replies that should not come
            answered.add(P.unpack(s.recv())["id"])
        # Other processes' TCP connections (a test's own clients) count too: at most the cap are served.
        assert len(answered) <= MAX_TCP_CONNECTIONS
        assert len(answered) >= MAX_TCP_CONNECTIONS - 2
        alive(d)  # the owner's Unix socket is not capped
    finally:
        for s in socks:
            s.close()
    with Client(tcp, token=token, timeout=5) as c:  # slots are free again once they close
        deadline = time.monotonic() + 60
        while True:
            try:
                c.call("models.list")
                break
            except DaemonError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
