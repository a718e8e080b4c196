"""One session, two languages, over HTTP.

The Rust example app server (``examples/app-server``) and a Flask app with
this package run on the same Redis and namespace. A cookie from either is
accepted by the other, data written on one side is read on the other, a
logout on either side ends the session on both, Python's events are in the
stream with the same fields as Rust's, and the audit worker records them so
that ``vedfolnir-sessions history`` shows them.

The binaries are built with cargo (a no-op when ``cargo test`` built them)
into ``$CARGO_TARGET_DIR`` (default ``~/.cache/vedfolnir-sessions/target``).
"""

import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from flask import Flask, jsonify, request, session
from werkzeug.serving import make_server

from vedfolnir_sessions import SessionStore, session_id_of
from vedfolnir_sessions.flask import (
    VedfolnirSessions,
    create_user_session,
    destroy_current_session,
    get_current_session_context,
)

from conftest import REDIS_URL, stream_events

REPO = Path(__file__).resolve().parents[2]
TARGET = Path(
    os.environ.get("CARGO_TARGET_DIR") or Path.home() / ".cache/vedfolnir-sessions/target"
)
DEBUG = TARGET / "debug"


@pytest.fixture(scope="module")
def binaries():
    subprocess.run(
        ["cargo", "build", "--quiet", "--bins",
         "-p", "vedfolnir-app-server", "-p", "vedfolnir-cli", "-p", "vedfolnir-worker"],
        cwd=REPO, check=True, env=dict(os.environ, CARGO_TARGET_DIR=str(TARGET)),
    )
    bins = {
        "app": DEBUG / "app_server",
        "cli": DEBUG / "vedfolnir-sessions",
        "worker": DEBUG / "vedfolnir-worker",
    }
    for path in bins.values():
        assert path.is_file(), path
    return bins


def rust_env(namespace, db):
    return {
        "PATH": os.environ.get("PATH", ""),
        "RUST_LOG": "warn",
        "REDIS_URL": REDIS_URL,
        "REDIS_SESSION_PREFIX": f"{namespace}session:",
        "REDIS_EVENT_STREAM": f"{namespace}events",
        "DATABASE_URL": f"sqlite://{db}?mode=rwc",
    }


class RustApp:
    def __init__(self, binary, env):
        self.proc = subprocess.Popen(
            [str(binary)], env=dict(env, APP_LISTEN="127.0.0.1:0"),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True,
        )
        deadline = time.monotonic() + 60
        self.base = None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            prefix = "vedfolnir example app listening on "
            if line.startswith(prefix):
                self.base = line[len(prefix):].strip()
                break
        assert self.base, "the example app server did not start"

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(30) == 0


class FlaskApp:
    def __init__(self, store):
        app = Flask("cross")
        VedfolnirSessions(app, store=store)

        @app.post("/login/<int:user_id>")
        def login(user_id):
            sid = create_user_session(user_id, 123, username="admin", role="admin")
            return jsonify(session_id=sid)

        @app.get("/context")
        def context():
            return jsonify(get_current_session_context())

        @app.get("/data/<key>")
        def get_data(key):
            return jsonify(session.get(key))

        @app.put("/data/<key>")
        def put_data(key):
            session[key] = request.get_json()
            return "", 204

        @app.post("/logout")
        def logout():
            destroy_current_session()
            return "", 204

        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.base = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.thread.join(10)


def call(method, url, token=None, body=None, csrf=None):
    """One HTTP request; returns (status, JSON body or None, Set-Cookie token)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token is not None:
        req.add_header("Cookie", f"session={token}")
    if csrf is not None:
        req.add_header("X-CSRF-Token", csrf)
    try:
        res = urllib.request.urlopen(req, timeout=30)
    except urllib.error.HTTPError as e:
        res = e
    raw = res.read()
    cookie = None
    for line in res.headers.get_all("Set-Cookie") or []:
        if line.startswith("session="):
            cookie = line[len("session="):].split(";", 1)[0]
    try:
        payload = json.loads(raw) if raw else None
    except ValueError:
        payload = raw.decode(errors="replace")
    return res.status, payload, cookie


@pytest.fixture
def sides(binaries, namespace, tmp_path):
    db = tmp_path / "audit.sqlite"
    env = rust_env(namespace, db)
    rust = RustApp(binaries["app"], env)
    flask_app = FlaskApp(SessionStore.from_env(env={k: v for k, v in env.items()
                                                    if k != "DATABASE_URL"}))
    try:
        yield rust, flask_app, env
    finally:
        flask_app.stop()
        rust.stop()


def test_a_flask_cookie_works_on_the_rust_server_and_back(sides, redis_client, namespace):
    rust, fl, _ = sides
    status, body, token = call("POST", f"{fl.base}/login/1")
    assert status == 200 and token
    sid = body["session_id"]
    assert session_id_of(token) == sid

    # The Rust server accepts the Flask cookie and reads Flask's fields.
    status, me, _ = call("GET", f"{rust.base}/me", token)
    assert status == 200, me
    assert (me["user_id"], me["username"], me["platform_connection_id"]) == (1, "admin", 123)
    csrf = me["csrf_token"]

    # Flask writes, Rust reads; Rust writes, Flask reads.
    assert call("PUT", f"{fl.base}/data/theme", token, "dark")[0] == 204
    status, value, _ = call("GET", f"{rust.base}/session/data/theme", token)
    assert (status, value) == (200, "dark")
    assert call("PUT", f"{rust.base}/session/data/color", token, {"r": 1}, csrf)[0] == 204
    assert call("GET", f"{fl.base}/data/color", token)[1] == {"r": 1}

    # A logout on the Flask side ends the session for the Rust server too.
    assert call("POST", f"{fl.base}/logout", token)[0] == 204
    assert call("GET", f"{rust.base}/me", token)[0] == 401
    assert call("GET", f"{fl.base}/context", token)[1] is None

    # Python's and Rust's events share one stream with the same fields.
    events = [e for e in stream_events(redis_client, namespace) if e["session_id"] == sid]
    assert [e["type"] for e in events] == ["created", "updated", "updated", "destroyed"]
    assert [e["seq"] for e in events] == ["1", "2", "3", "4"]
    assert set(events[1]) == set(events[2]), "a Python update and a Rust update"
    assert json.loads(events[1]["payload"]) == {"set": {"theme": "dark"}, "unset": []}
    assert json.loads(events[2]["payload"]) == {"set": {"color": {"r": 1}}, "unset": []}


def test_a_rust_cookie_works_on_flask_and_a_rust_logout_ends_it(sides):
    rust, fl, _ = sides
    status, body, token = call("POST", f"{rust.base}/login",
                               body={"username": "admin", "password": "admin123"})
    assert status == 200 and token
    ctx = call("GET", f"{fl.base}/context", token)[1]
    assert ctx["username"] == "admin" and ctx["session_id"] == session_id_of(token)
    assert call("PUT", f"{fl.base}/data/lang", token, "fr")[0] == 204
    assert call("GET", f"{rust.base}/session/data/lang", token)[1] == "fr"
    assert call("POST", f"{rust.base}/logout", token, csrf=body["csrf_token"])[0] == 204
    assert call("GET", f"{fl.base}/context", token)[1] is None
    assert call("PUT", f"{fl.base}/data/lang", token, "de")[0] == 204
    assert call("GET", f"{rust.base}/me", token)[0] == 401


def test_the_worker_audits_python_events_and_history_shows_them(sides, binaries):
    rust, fl, env = sides
    _, body, token = call("POST", f"{fl.base}/login/1")
    sid = body["session_id"]
    call("PUT", f"{fl.base}/data/theme", token, "dark")
    call("POST", f"{fl.base}/logout", token)

    subprocess.run([str(binaries["cli"]), "migrate"], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    worker = subprocess.Popen(
        [str(binaries["worker"]), "--only", "audit"],
        env=dict(env, AUDIT_BLOCK_MS="100", AUDIT_STREAM_RETENTION_SECS="600"),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        rows = []
        while time.monotonic() < deadline:
            out = subprocess.run([str(binaries["cli"]), "history", sid, "--json"], env=env,
                                 capture_output=True, text=True)
            if out.returncode == 0:
                rows = json.loads(out.stdout)
                if len(rows) >= 3:
                    break
            time.sleep(0.2)
        assert [r["event_type"] for r in rows] == ["created", "updated", "destroyed"]
        assert rows[0]["payload"]["fields"]["username"] == "admin"
        assert rows[1]["payload"] == {"set": {"theme": "dark"}, "unset": []}
        assert rows[2]["payload"] == {"reason": "logout"}
        assert all(r["source"] == "stream" for r in rows), "recorded by the worker"
        assert [r["seq"] for r in rows] == [1, 2, 3]
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
