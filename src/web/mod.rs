//! Web integration (feature `web`): the tower layer and axum extractor, and
//! the tower-sessions adapter.
//!
//! [`SessionLayer`] wraps an axum `Router` (or any tower service); handlers
//! extract a [`Session`] and read and write its fields. The layer loads the
//! session with one `GET`, writes one `updated` event with only the keys a
//! request changed (nothing when it changed nothing; no session and no cookie
//! for an anonymous request that wrote nothing), and sets the cookie from
//! `SESSION_COOKIE_*` with `Path=/` and the bare token as its value.
//!
//! Security defaults: login rotates the session id and the CSRF token
//! ([`Session::login`]); CSRF tokens are required on unsafe methods
//! ([`CsrfPolicy`]); sessions can be bound to their client
//! ([`Fingerprint`]); a bad cookie is an anonymous request, never an error;
//! an unreachable Redis is a 503, never an empty session. `docs/web.md`
//! explains each choice.
//!
//! [`TowerSessionsStore`] puts the event-sourced store behind tower-sessions'
//! own `SessionManagerLayer`.
//!
//! # Layout
//!
//! - `layer`: [`SessionLayer`] and [`SessionService`], the per-request flow.
//! - `handle`: the [`Session`] handle and extractor.
//! - `cookies`: reading the cookie header, writing `Set-Cookie`.
//! - `csrf`: [`CsrfPolicy`] and token generation.
//! - `fingerprint`: [`Fingerprint`].
//! - `error`: [`SessionError`], the HTTP error.
//! - `adapter`: [`TowerSessionsStore`].

mod adapter;
mod cookies;
mod csrf;
mod error;
mod fingerprint;
mod handle;
mod layer;

pub use adapter::{BASE_KEY, TowerSessionsStore};
pub use csrf::{CSRF_KEY, CsrfPolicy};
pub use error::SessionError;
pub use fingerprint::{FINGERPRINT_KEY, Fingerprint};
pub use handle::Session;
pub use layer::{SessionLayer, SessionService, carry_traceparent};

/// Compiles the Rust examples of `docs/web.md` as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../docs/web.md")]
pub struct WebGuide;
