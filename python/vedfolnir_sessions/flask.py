"""Flask integration: Flask's ``session`` on event-sourced sessions.

::

    from flask import Flask, session
    from vedfolnir_sessions.flask import VedfolnirSessions, create_user_session

    app = Flask(__name__)
    VedfolnirSessions(app)          # or VedfolnirSessions().init_app(app)

What a request does, the same as the Rust layer (``SessionLayer``):

1. The cookie named ``SESSION_COOKIE_NAME`` is read. A value that is not a
   token this product issues is ignored (an anonymous request, never an
   error page), and costs no Redis call.
2. With a token, the session is loaded (one ``GET``, plus a ``touched``
   event at most once per ``SESSION_TOUCH_INTERVAL``). An unknown, expired or
   destroyed session is an anonymous request. Redis unreachable: served from
   the audit database when the store has it attached (``audit=True``) and
   it is current, else a 503 before the view runs.
3. The view reads and writes ``session`` like a dict. Keys it reads are
   remembered.
4. When the response is ready, the keys that changed are stored as **one
   ``updated`` event holding only the difference**, checked against the
   session's version: concurrent requests that change different keys all
   keep their changes, and a change computed from a key another request
   changed meanwhile is refused with 409 (``session_conflict``) instead of
   overwriting it. Nothing changed: nothing is written and no cookie is
   set. An anonymous request that wrote creates its session then; one that
   wrote nothing stores nothing. A 5xx response stores nothing.
5. ``Set-Cookie`` (the token only, with the ``SESSION_COOKIE_*`` attributes)
   when the session is new or rotated or the store recorded activity; a
   removal cookie after a logout.

The keys the store maintains (``created_at``, ``last_activity``,
``_last_updated``) can be assigned, as the Vedfolnir application does with
``last_activity``; the store keeps its own value (activity is recorded by
the sliding expiry). ``user_id`` is set only by :func:`create_user_session`,
which always rotates the session id. ``session.clear()`` ends the session
(a logout) when the response is stored.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from datetime import datetime, timezone
from typing import Any, Iterable

from flask import current_app, jsonify, request
from flask.sessions import SessionInterface, SessionMixin

from ._native import (
    ConflictError,
    InvalidInputError,
    SessionEndedError,
    SessionStore,
    StaleReadError,
    StoreUnavailableError,
    TooLargeError,
    VedfolnirSessionError,
    session_id_of,
)

__all__ = [
    "SessionManager",
    "VedfolnirSession",
    "VedfolnirSessionInterface",
    "VedfolnirSessions",
    "create_user_session",
    "destroy_current_session",
    "get_current_session_context",
    "switch_platform",
]

log = logging.getLogger("vedfolnir_sessions")

#: Keys the store maintains: writes to them are accepted and not stored.
STORE_KEYS = frozenset(("_version", "_last_updated", "created_at", "last_activity"))
#: Keys the application cannot set or remove through ``session``.
MANAGED_KEYS = frozenset(("user_id", "_fingerprint"))
#: Keys that are never a precondition of a change (the store's and the
#: layer's own, as in the Rust layer).
NOT_EXPECTED = STORE_KEYS | MANAGED_KEYS | {"csrf_token"}

SAFE_METHODS = frozenset(("GET", "HEAD", "OPTIONS", "TRACE"))

_MISSING = object()

# The error bodies of the Rust layer: status, code, public message.
_ERRORS = {
    "unauthenticated": (401, "log in first"),
    "csrf": (403, "missing or invalid X-CSRF-Token"),
    "session_ended": (
        409,
        "the session ended while this request was running; its changes were not saved",
    ),
    "session_conflict": (
        409,
        "another request changed what this one read; nothing was saved, try again",
    ),
    "session_too_large": (413, "the session would be too large; nothing was saved"),
    "session_store_unavailable": (503, "the session store is unavailable; try again shortly"),
    "session_busy": (503, "the session is busy; nothing was changed, try again"),
    "internal": (500, "internal error"),
}


def _code_of(err: BaseException) -> str:
    """The error code a store exception answers with."""
    if isinstance(err, StoreUnavailableError):
        return "session_store_unavailable"
    if isinstance(err, SessionEndedError):
        return "session_ended"
    if isinstance(err, StaleReadError):
        return "session_conflict"
    if isinstance(err, ConflictError):
        return "session_busy"
    if isinstance(err, TooLargeError):
        return "session_too_large"
    return "internal"


def _error_body(code: str) -> tuple[int, dict]:
    status, message = _ERRORS[code]
    return status, {"error": code, "message": message}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _clone(value: Any) -> Any:
    """A copy of a JSON value whose containers are not shared (a view may
    change a list in place, as ``flash`` does)."""
    t = type(value)
    if t is dict:
        return {k: _clone(v) for k, v in value.items()}
    if t is list:
        return [_clone(v) for v in value]
    return value


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def _diff(base: dict, data: dict) -> tuple[dict, list]:
    """The application keys that differ: what one ``updated`` event carries."""
    changed = {
        k: v
        for k, v in data.items()
        if k not in STORE_KEYS and not _same(base.get(k, _MISSING), v)
    }
    removed = [k for k in base if k not in STORE_KEYS and k not in data]
    return changed, removed


def _new_csrf_token() -> str:
    # 256 bits from the OS CSPRNG, base64url: the Rust layer's format.
    return secrets.token_urlsafe(32)


class VedfolnirSession(dict, SessionMixin):
    """The request's session: a dict of its fields (without ``_version``).

    Reads and writes touch this working copy; the interface stores the
    difference when the response is ready. Besides the dict methods:
    :attr:`session_id`, :attr:`csrf_token` and :meth:`increment`.
    """

    def __init__(self, interface, token=None, session_id=None, stored=None, presented=False):
        stored = dict(stored or {})
        version = stored.pop("_version", 0)
        super().__init__(_clone(stored))
        self._interface = interface
        self._token = token
        self._id = session_id
        self._base = stored
        self._version = version
        self._presented = presented
        self._read: set = set()
        self._read_all = False
        self._cookie = "keep"  # keep | set | clear
        self._end_pending = False
        self._id_before_clear: str | None = None
        self._failure: str | None = None  # an error code: the request is refused
        self.modified = False

    # --- what the request sees ---------------------------------------------

    @property
    def session_id(self) -> str | None:
        """``hex(SHA-256(token))``; ``None`` while anonymous."""
        return self._id

    @property
    def new(self) -> bool:  # Flask's SessionMixin.new
        return self._id is None

    @property
    def csrf_token(self) -> str | None:
        """The session's CSRF token, for the client's ``X-CSRF-Token``."""
        value = dict.get(self, "csrf_token")
        return value if isinstance(value, str) else None

    # --- reads: remembered, so a concurrent change of them refuses ours ----

    def __getitem__(self, key):
        self._read.add(key)
        return dict.__getitem__(self, key)

    def get(self, key, default=None):
        self._read.add(key)
        return dict.get(self, key, default)

    def __contains__(self, key):
        self._read.add(key)
        return dict.__contains__(self, key)

    def __iter__(self):
        self._read_all = True
        return dict.__iter__(self)

    def keys(self):
        self._read_all = True
        return dict.keys(self)

    def values(self):
        self._read_all = True
        return dict.values(self)

    def items(self):
        self._read_all = True
        return dict.items(self)

    def copy(self):
        self._read_all = True
        return dict(dict.items(self))

    # --- writes ------------------------------------------------------------

    def _check(self, key):
        if key in MANAGED_KEYS:
            raise InvalidInputError(
                f"`{key}` is maintained by the session layer; log in with create_user_session"
            )

    def __setitem__(self, key, value):
        if not isinstance(key, str):
            raise InvalidInputError("session keys are strings")
        self._check(key)
        self.modified = True
        dict.__setitem__(self, key, value)

    def __delitem__(self, key):
        self._check(key)
        self._read.add(key)
        self.modified = True
        dict.__delitem__(self, key)

    def setdefault(self, key, default=None):
        self._read.add(key)
        if dict.__contains__(self, key):
            return dict.__getitem__(self, key)
        self[key] = default
        return default

    def pop(self, key, *default):
        self._check(key)
        self._read.add(key)
        self.modified = True
        return dict.pop(self, key, *default)

    def popitem(self):
        raise InvalidInputError("popitem is not supported on a session; use pop(key)")

    def update(self, *args, **kwargs):
        for k, v in dict(*args, **kwargs).items():
            self[k] = v

    def clear(self):
        """Forgets everything: the session ends (``destroyed``, reason
        ``logout``) when the response is stored, and keys written after this
        start a new anonymous session."""
        self.modified = True
        if self._id is not None:
            self._id_before_clear = self._id
            self._end_pending = True
        dict.clear(self)
        self._forget()

    def increment(self, key: str, by: int = 1) -> int:
        """Adds ``by`` to an integer field (absent counts as 0) and returns
        the new value. Stored at once and never loses a concurrent increment
        (a read-then-write of the same counter in two concurrent requests
        would conflict instead)."""
        self._check(key)
        store = self._interface.store
        if self._id is None:
            fields = self._new_session_fields({key: dict.get(self, key, 0) + by})
            self._adopt(*store.create(fields))
            return dict.__getitem__(self, key)
        value = store.increment(self._id, key, by)
        self._base[key] = value
        dict.__setitem__(self, key, value)
        if self._cookie == "keep":
            self._cookie = "set"
        return value

    # --- state changes -----------------------------------------------------

    def _forget(self):
        self._token = None
        self._id = None
        self._base = {}
        self._version = 0
        self._read = set()
        self._read_all = False
        self._cookie = "clear" if self._presented else "keep"

    def _end(self):
        dict.clear(self)
        self._end_pending = False
        self._id_before_clear = None
        self._forget()

    def _adopt(self, token, session_id, stored):
        stored = dict(stored)
        self._version = stored.pop("_version", 0)
        self._token = token
        self._id = session_id
        self._base = stored
        dict.clear(self)
        dict.update(self, _clone(stored))
        self._read = set()
        self._read_all = False
        self._cookie = "set"

    def _rebase(self, stored):
        """Takes a newer stored state as the base, keeping pending changes."""
        changed, removed = _diff(self._base, dict(dict.items(self)))
        stored = dict(stored)
        self._version = stored.pop("_version", 0)
        self._base = stored
        dict.clear(self)
        dict.update(self, _clone(stored))
        for k in removed:
            dict.pop(self, k, None)
        dict.update(self, changed)

    def _base_with_version(self) -> dict:
        base = dict(self._base)
        base["_version"] = self._version
        return base

    def _expectations(self) -> tuple[dict, list]:
        keys = set(self._base) | set(dict.keys(self)) if self._read_all else self._read
        expect, absent = {}, []
        for k in keys:
            if k in NOT_EXPECTED or not isinstance(k, str):
                continue
            if k in self._base:
                expect[k] = self._base[k]
            else:
                absent.append(k)
        return expect, absent

    def _new_session_fields(self, extra: dict) -> dict:
        fields = {k: v for k, v in dict.items(self) if k not in STORE_KEYS}
        fields.update(extra)
        fields["csrf_token"] = _new_csrf_token()
        return fields

    def context(self) -> dict | None:
        """The fields plus ``session_id``; ``None`` when anonymous."""
        if self._id is None:
            return None
        ctx = {k: v for k, v in dict.items(self) if k != "_fingerprint"}
        ctx["session_id"] = self._id
        return ctx


class VedfolnirSessionInterface(SessionInterface):
    """Flask's session interface on a :class:`SessionStore`."""

    session_class = VedfolnirSession

    def __init__(self, store: SessionStore):
        self.store = store
        self.cookie = store.cookie

    # Flask asks for it; the name comes from SESSION_COOKIE_NAME as the
    # Rust layer reads it.
    def get_cookie_name(self, app) -> str:
        return self.cookie["name"]

    def open_session(self, app, request) -> VedfolnirSession:
        name = self.cookie["name"]
        values = request.cookies.getlist(name)
        for value in values:
            sid = session_id_of(value)
            if sid is None:
                continue
            started = _now()
            try:
                stored = self.store.load(value)
            except VedfolnirSessionError as e:
                log.warning("session load failed: %s", type(e).__name__)
                s = VedfolnirSession(self, presented=True)
                s._failure = _code_of(e)
                return s
            if stored is None:
                return VedfolnirSession(self, presented=True)
            s = VedfolnirSession(self, value, sid, stored, presented=True)
            if s._base.get("last_activity", "") >= started:
                # The load recorded activity: the cookie's Max-Age slides too.
                s._cookie = "set"
            return s
        return VedfolnirSession(self, presented=bool(values))

    def is_null_session(self, obj) -> bool:
        return not isinstance(obj, VedfolnirSession)

    def save_session(self, app, session: VedfolnirSession, response) -> None:
        if session._failure is None and response.status_code < 500:
            code = self._commit(session)
            if code is not None:
                self._refuse(response, code)
        self._apply_cookie(session, response)

    def _commit(self, session: VedfolnirSession) -> str | None:
        """Stores what the request changed; an error code when refused."""
        store = self.store
        try:
            if session._end_pending:
                old = session._id_before_clear
                store.destroy(old, "logout")
                log.info("session destroyed: %s (cleared)", old)
                session._end_pending = False
                session._id_before_clear = None
            changed, removed = _diff(session._base, dict(dict.items(session)))
            if not changed and not removed:
                return None
            if session._id is not None:
                expect, absent = session._expectations()
                stored = store.update(
                    session._id,
                    set=changed,
                    unset=removed,
                    expect=expect,
                    expect_absent=absent,
                    base=session._base_with_version(),
                )
                session._rebase(stored)
                if session._cookie == "keep":
                    session._cookie = "set"
            else:
                token, sid, stored = store.create(session._new_session_fields({}))
                session._adopt(token, sid, stored)
                log.info("session created: %s", sid)
            return None
        except VedfolnirSessionError as e:
            code = _code_of(e)
            log.log(
                logging.INFO if code in ("session_conflict", "session_ended") else logging.ERROR,
                "session changes not stored (%s): %s",
                code,
                e,
            )
            return code

    @staticmethod
    def _refuse(response, code: str) -> None:
        status, body = _error_body(code)
        response.status_code = status
        response.set_data(jsonify(body).get_data())
        response.mimetype = "application/json"
        if status == 503:
            response.headers["Retry-After"] = "1"

    def _apply_cookie(self, session: VedfolnirSession, response) -> None:
        if session.accessed:
            response.vary.add("Cookie")
        c = self.cookie
        if session._cookie == "set" and session._token is not None:
            value, tail = session._token, f"; Max-Age={c['max_age']}"
        elif session._cookie == "clear":
            value, tail = "", "; Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT"
        else:
            return
        # The attributes in the order the Rust layer writes them.
        parts = [f"{c['name']}={value}"]
        if c["http_only"]:
            parts.append("HttpOnly")
        parts.append(f"SameSite={c['same_site']}")
        if c["secure"]:
            parts.append("Secure")
        parts.append("Path=/")
        response.headers.add("Set-Cookie", "; ".join(parts) + tail)
        if "Cache-Control" not in response.headers:
            # A response that sets a session cookie must never come from a
            # shared cache.
            response.headers["Cache-Control"] = "no-store"


class SessionManager:
    """``app.session_manager``: operations on any session by id, with the
    Vedfolnir application's names."""

    def __init__(self, store: SessionStore):
        self.store = store

    def get_session_data(self, session_id: str) -> dict | None:
        """The session's fields (without ``_version``), or ``None``."""
        try:
            data = self.store.get(session_id)
        except InvalidInputError:
            return None
        if data is not None:
            data.pop("_version", None)
        return data

    def update_session(self, session_id: str, data: dict) -> bool:
        """Stores these keys as one ``updated`` event; the keys the store
        maintains are left out. False when no live session has this id."""
        changes = {k: v for k, v in data.items() if k not in STORE_KEYS}
        if not changes:
            return self.get_session_data(session_id) is not None
        try:
            self.store.update(session_id, set=changes)
        except (SessionEndedError, InvalidInputError) as e:
            if isinstance(e, InvalidInputError) and session_id_is_valid(session_id):
                raise
            return False
        return True

    def destroy_session(self, session_id: str, reason: str = "logout") -> bool:
        """Ends the session; False when it was not live."""
        if not session_id_is_valid(session_id):
            return False
        return self.store.destroy(session_id, reason)

    def cleanup_user_sessions(self, user_id, reason: str = "logout_all") -> int:
        """Ends every session of the user; returns how many ended."""
        return len(self.store.destroy_all_for_user(user_id, reason))

    def get_user_sessions(self, user_id) -> list:
        """The user's live sessions: ``[(session_id, fields), …]``."""
        out = []
        for sid, data in self.store.user_sessions(user_id):
            data.pop("_version", None)
            out.append((sid, data))
        return out

    def get_session_stats(self, top: int = 10) -> dict:
        return self.store.stats(top)

    def health_check(self) -> dict:
        return self.store.health()


def session_id_is_valid(session_id: str) -> bool:
    return (
        isinstance(session_id, str)
        and len(session_id) == 64
        and all(c in "0123456789abcdef" for c in session_id)
    )


class VedfolnirSessions:
    """The Flask extension: ``VedfolnirSessions(app)`` or ``init_app(app)``.

    ``store``: a :class:`SessionStore`; by default one from the environment
    (``SessionStore.from_env(lazy=True, audit=audit)``), which reads the same
    ``REDIS_*``, ``SESSION_*`` and ``SESSION_COOKIE_*`` variables as the Rust
    side. ``audit``: attach the audit database at ``DATABASE_URL`` (its
    fallback serves sessions while Redis is unreachable). ``csrf``: refuse
    unsafe requests without the session's token in ``X-CSRF-Token`` (403),
    except on the paths in ``csrf_exempt``.
    """

    def __init__(
        self,
        app=None,
        store: SessionStore | None = None,
        audit: bool = False,
        csrf: bool = False,
        csrf_exempt: Iterable[str] = (),
    ):
        self.store = store
        self.audit = audit
        self.csrf = csrf
        self.csrf_exempt = frozenset(csrf_exempt)
        if app is not None:
            self.init_app(app)

    def init_app(self, app) -> None:
        if self.store is None:
            self.store = SessionStore.from_env(lazy=True, audit=self.audit)
        interface = VedfolnirSessionInterface(self.store)
        app.session_interface = interface
        app.session_manager = SessionManager(self.store)
        app.extensions["vedfolnir_sessions"] = self
        # First of the app's hooks: a request whose session could not be
        # opened is answered before any other code sees an empty session.
        app.before_request_funcs.setdefault(None, []).insert(0, self._before_request)
        for exc in (StoreUnavailableError, SessionEndedError, ConflictError, TooLargeError):
            app.register_error_handler(exc, _handle_store_error)

    def _before_request(self):
        s = request_session()
        if s is None:
            return None
        if s._failure is not None:
            return _error_response(s._failure)
        if (
            self.csrf
            and request.method not in SAFE_METHODS
            and request.path not in self.csrf_exempt
        ):
            expected = s.csrf_token
            sent = request.headers.get("X-CSRF-Token", "")
            if expected is None or not hmac.compare_digest(sent.encode(), expected.encode()):
                log.info("refused an unsafe request without a valid csrf token")
                return _error_response("csrf")
        return None


def _error_response(code: str):
    status, body = _error_body(code)
    res = jsonify(body)
    res.status_code = status
    if status == 503:
        res.headers["Retry-After"] = "1"
    return res


def _handle_store_error(err):
    return _error_response(_code_of(err))


def request_session() -> VedfolnirSession | None:
    """The current request's session object (``flask.session``)."""
    from flask import session

    s = session._get_current_object()
    return s if isinstance(s, VedfolnirSession) else None


def _store() -> SessionStore:
    return current_app.extensions["vedfolnir_sessions"].store


def _require_session() -> VedfolnirSession:
    s = request_session()
    if s is None:
        raise RuntimeError("VedfolnirSessions is not installed on this app")
    return s


def create_user_session(user_id, platform_id=None, **fields) -> str:
    """Logs a user in, after the application authenticated them; returns
    the new session id.

    The current session, if any, ends as ``rotated`` and a new one is made in
    the same atomic step, with its fields (none of them when it belonged to
    another user), this request's pending changes, ``user_id``,
    ``platform_connection_id`` (when given), ``fields`` and a fresh
    ``csrf_token``. The response carries the new cookie.
    """
    s = _require_session()
    user = dict(fields)
    user["user_id"] = user_id
    if platform_id is not None:
        user["platform_connection_id"] = platform_id
    bad = [k for k in user if k in STORE_KEYS or k == "_fingerprint"]
    if bad:
        raise InvalidInputError(f"`{bad[0]}` is maintained by the store")
    user["csrf_token"] = _new_csrf_token()
    store = _store()
    if s._end_pending:
        # Cleared earlier in this request: that session ends first.
        store.destroy(s._id_before_clear, "logout")
        s._end_pending = False
        s._id_before_clear = None
    created = None
    if s._id is not None:
        previous = s._base.get("user_id")
        if previous is not None and str(previous) != str(user_id):
            # Another user's session: start clean.
            changed = {}
            removed = [k for k in s._base if k not in STORE_KEYS]
        else:
            changed, removed = _diff(s._base, dict(dict.items(s)))
        removed = [k for k in removed if k not in user]
        changed.update(user)
        try:
            created = store.rotate(s._id, set=changed, unset=removed)
            log.info("login rotated the session id: %s -> %s", s._id, created[1])
        except SessionEndedError:
            created = None  # ended meanwhile (a logout elsewhere): start afresh
    if created is None:
        if s._id is None:
            fresh = {k: v for k, v in dict.items(s) if k not in STORE_KEYS}
        else:
            fresh = {}
        fresh.update(user)
        created = store.create(fresh)
        log.info("login created a session: %s", created[1])
    s._adopt(*created)
    s.modified = True
    return created[1]


def destroy_current_session() -> bool:
    """Logs out: the session ends (``destroyed``, reason ``logout``) and the
    cookie is cleared. False when there was no live session."""
    s = _require_session()
    ended = False
    if s._id is not None:
        ended = _store().destroy(s._id, "logout")
        log.info("session destroyed: %s", s._id)
    s._end()
    s.modified = True
    return ended


def get_current_session_context() -> dict | None:
    """The session's fields plus ``session_id``; ``None`` when anonymous."""
    s = request_session()
    return None if s is None else s.context()


def switch_platform(
    platform_connection_id: int,
    platform_name: str,
    platform_type: str,
    platform_instance_url: str,
) -> bool:
    """Moves the session to another platform connection: one
    ``platform_switched`` event, stored at once. False when anonymous."""
    s = _require_session()
    if s._id is None:
        return False
    stored = _store().switch_platform(
        s._id, int(platform_connection_id), platform_name, platform_type, platform_instance_url
    )
    s._rebase(stored)
    if s._cookie == "keep":
        s._cookie = "set"
    return True
