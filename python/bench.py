"""Flask requests per second: this package against Flask-Session (Redis).

Two Flask apps on the same Redis, each with a logged-in session holding the
Vedfolnir application's fields, driven through Flask's test client in one
process, alternating between the two in every round:

- read: a request that reads two fields and changes nothing;
- write: a request that sets one key to a new value.

Each app runs with its defaults: Flask-Session 0.8 with ``SESSION_TYPE =
"redis"`` (permanent sessions, refreshed on every request, msgpack), this
package with ``VedfolnirSessions(app)`` (one ``updated`` event per changed
request, no write for an unchanged one). Prints the median requests/s of
each, the ratios and the targets (read >= 1.0x, write >= 0.6x).

    python bench.py [--requests 2000] [--rounds 7] [--json]

``REDIS_URL`` names the Redis (default ``redis://127.0.0.1:6379/0``); the
keys live under two fresh namespaces removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid

import redis
from flask import Flask, session

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")

SEED_FIELDS = {
    "username": "admin",
    "email": "admin@example.com",
    "role": "admin",
    "platform_name": "My Platform",
    "platform_type": "mastodon",
    "platform_instance_url": "https://mastodon.example.com",
}


def add_routes(app: Flask) -> None:
    counter = {"n": 0}

    @app.get("/read")
    def read():
        user_id = session.get("user_id")
        platform_id = session.get("platform_connection_id")
        return f"{user_id}:{platform_id}"

    @app.post("/write")
    def write():
        counter["n"] += 1
        session["last_page"] = counter["n"]
        return "ok"


def ours(namespace: str) -> Flask:
    from vedfolnir_sessions import SessionStore
    from vedfolnir_sessions.flask import VedfolnirSessions, create_user_session

    app = Flask("ours")
    store = SessionStore.from_env(
        env={
            "REDIS_URL": REDIS_URL,
            "REDIS_SESSION_PREFIX": f"{namespace}session:",
            "REDIS_EVENT_STREAM": f"{namespace}events",
            # The test client speaks plain HTTP.
            "SESSION_COOKIE_SECURE": "false",
        }
    )
    VedfolnirSessions(app, store=store)
    add_routes(app)

    @app.post("/login")
    def login():
        create_user_session(1, 123, **SEED_FIELDS)
        return "ok"

    return app


def flask_session(namespace: str) -> Flask:
    from flask_session import Session

    app = Flask("flask_session")
    app.config.update(
        SESSION_TYPE="redis",
        SESSION_REDIS=redis.Redis.from_url(REDIS_URL),
        SESSION_KEY_PREFIX=f"{namespace}session:",
    )
    Session(app)
    add_routes(app)

    @app.post("/login")
    def login():
        session.clear()
        session.update(SEED_FIELDS, user_id=1, platform_connection_id=123)
        return "ok"

    return app


def rate(client, method: str, path: str, n: int) -> float:
    call = client.get if method == "GET" else client.post
    started = time.perf_counter()
    for _ in range(n):
        res = call(path)
        if res.status_code != 200:
            raise SystemExit(f"{path} answered {res.status_code}: {res.get_data()[:200]!r}")
    return n / (time.perf_counter() - started)


def unlink(client: redis.Redis, namespace: str) -> None:
    batch = list(client.scan_iter(match=f"{namespace}*", count=1000))
    for i in range(0, len(batch), 500):
        client.unlink(*batch[i : i + 500])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000, help="requests per measurement")
    ap.add_argument("--rounds", type=int, default=7, help="alternating rounds")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args()

    r = redis.Redis.from_url(REDIS_URL)
    ns = {name: f"vbench-py:{name}:{uuid.uuid4().hex}:" for name in ("ours", "flask_session")}
    apps = {"ours": ours(ns["ours"]), "flask_session": flask_session(ns["flask_session"])}
    clients = {}
    for name, app in apps.items():
        c = app.test_client()
        assert c.post("/login").status_code == 200
        # Warm up both paths.
        rate(c, "GET", "/read", 200)
        rate(c, "POST", "/write", 200)
        clients[name] = c
    results = {name: {"read": [], "write": []} for name in apps}
    try:
        for rnd in range(args.rounds):
            order = list(apps) if rnd % 2 == 0 else list(reversed(list(apps)))
            for kind, method, path in (("read", "GET", "/read"), ("write", "POST", "/write")):
                for name in order:
                    results[name][kind].append(rate(clients[name], method, path, args.requests))
        # The write benchmark must really have written on our side: one
        # `updated` event per write request.
        stream_len = r.xlen(f"{ns['ours']}events")
    finally:
        for n in ns.values():
            unlink(r, n)
    summary = {
        "requests_per_measurement": args.requests,
        "rounds": args.rounds,
        "redis": "local",
        "median_rps": {
            name: {kind: round(statistics.median(v), 1) for kind, v in res.items()}
            for name, res in results.items()
        },
        "our_events_written": stream_len,
    }
    med = summary["median_rps"]
    summary["ratio"] = {
        kind: round(med["ours"][kind] / med["flask_session"][kind], 2) for kind in ("read", "write")
    }
    summary["targets_met"] = {
        "read": summary["ratio"]["read"] >= 1.0,
        "write": summary["ratio"]["write"] >= 0.6,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{'request':<8} {'vedfolnir_sessions':>20} {'Flask-Session':>15} {'ratio':>7} target")
        for kind, target in (("read", 1.0), ("write", 0.6)):
            print(
                f"{kind:<8} {med['ours'][kind]:>16.0f} r/s {med['flask_session'][kind]:>11.0f} r/s "
                f"{summary['ratio'][kind]:>6.2f}x >= {target}x "
                f"{'met' if summary['targets_met'][kind] else 'MISSED'}"
            )
        print(f"({args.rounds} alternating rounds of {args.requests} requests; medians; "
              f"{stream_len} events written by our side)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
