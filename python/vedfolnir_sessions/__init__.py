"""Event-sourced web sessions on Redis Streams, for Python and Flask.

The package is a binding of the Rust library ``vedfolnir-sessions``: every
call runs the library's own code (the one fold, the one Lua script, the same
key layout), so a Flask server and a Rust server on the same Redis and
namespace share sessions, their event log and their audit trail.

- :class:`SessionStore`: the store (``SessionStore.from_env()``).
- :mod:`vedfolnir_sessions.flask`: the Flask integration
  (``VedfolnirSessions(app)``, ``create_user_session`` …).
- The exceptions, all subclasses of :class:`VedfolnirSessionError`.
"""

from ._native import (
    ConfigError,
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
    "ConfigError",
    "ConflictError",
    "InvalidInputError",
    "SessionEndedError",
    "SessionStore",
    "StaleReadError",
    "StoreUnavailableError",
    "TooLargeError",
    "VedfolnirSessionError",
    "session_id_of",
]
