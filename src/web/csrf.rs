//! Cross-site request forgery protection.
//!
//! Every session the layer creates carries a `csrf_token` (256 bits from the
//! OS CSPRNG, base64url), renewed at every login and rotation. Requests with
//! an unsafe method (anything but `GET`, `HEAD`, `OPTIONS`, `TRACE`) must
//! present it in the `X-CSRF-Token` header unless their path is exempt; the
//! comparison runs in constant time. A missing session, a missing header or a
//! wrong token is a 403 before the handler runs, and nothing is written.
//!
//! `SameSite=Lax` already keeps the cookie off most cross-site unsafe
//! requests; the token is the second, independent line, and the only one for
//! browsers or deployments where `SameSite` does not apply (same-site
//! subdomains, `SameSite=None`).

use axum::http::{HeaderMap, HeaderName, Method};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::TryRngCore as _;
use rand::rngs::OsRng;
use subtle::ConstantTimeEq as _;

/// The session key holding the CSRF token (a seed application field).
pub const CSRF_KEY: &str = "csrf_token";

/// Which requests need the CSRF token, and where they carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsrfPolicy {
    enabled: bool,
    header: HeaderName,
    exempt: Vec<String>,
}

impl Default for CsrfPolicy {
    /// On, header `X-CSRF-Token`, no exemptions.
    fn default() -> Self {
        CsrfPolicy {
            enabled: true,
            header: HeaderName::from_static("x-csrf-token"),
            exempt: Vec::new(),
        }
    }
}

impl CsrfPolicy {
    /// No CSRF checks at all (for APIs that authenticate every request by
    /// other means; not for cookie sessions used by browsers).
    pub fn disabled() -> Self {
        CsrfPolicy {
            enabled: false,
            ..Self::default()
        }
    }

    /// Builder: read the token from another header.
    pub fn with_header(mut self, header: HeaderName) -> Self {
        self.header = header;
        self
    }

    /// Builder: exempt a path. An exact path (`/login`) matches only itself;
    /// a path ending in `/*` (`/webhooks/*`) matches everything below it. A
    /// request path with `.` or `..` segments is never exempt.
    pub fn exempt(mut self, path: impl Into<String>) -> Self {
        self.exempt.push(path.into());
        self
    }

    /// The header the token is read from.
    pub fn header(&self) -> &HeaderName {
        &self.header
    }

    /// True when a request with this method and path must carry the token.
    pub fn requires_token(&self, method: &Method, path: &str) -> bool {
        if !self.enabled || is_safe(method) {
            return false;
        }
        // A path with dot segments is never exempt: a proxy or router that
        // resolves them later could land it outside the exempt prefix.
        if path.split('/').any(|seg| seg == "." || seg == "..") {
            return true;
        }
        !self.exempt.iter().any(|e| match e.strip_suffix("/*") {
            Some(prefix) => path
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with('/')),
            None => e == path,
        })
    }

    /// True when the request's header carries `expected`, compared in
    /// constant time. False when either side is missing.
    pub(crate) fn verify(&self, headers: &HeaderMap, expected: Option<&str>) -> bool {
        let (Some(expected), Some(got)) = (expected, headers.get(&self.header)) else {
            return false;
        };
        if expected.is_empty() {
            return false;
        }
        bool::from(got.as_bytes().ct_eq(expected.as_bytes()))
    }
}

fn is_safe(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

/// A fresh CSRF token: 32 bytes from the OS CSPRNG, base64url.
///
/// # Panics
/// Only if the operating system cannot provide randomness at all.
#[allow(clippy::expect_used)]
pub(crate) fn generate() -> String {
    let mut bytes = [0u8; 32];
    OsRng
        .try_fill_bytes(&mut bytes)
        .expect("the operating system's random number generator failed");
    URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn unsafe_methods_need_the_token_unless_exempt() {
        let p = CsrfPolicy::default().exempt("/login").exempt("/hooks/*");
        assert!(!p.requires_token(&Method::GET, "/me"));
        assert!(!p.requires_token(&Method::HEAD, "/me"));
        assert!(p.requires_token(&Method::POST, "/logout"));
        assert!(p.requires_token(&Method::PUT, "/session/data/x"));
        assert!(p.requires_token(&Method::DELETE, "/x"));
        assert!(!p.requires_token(&Method::POST, "/login"));
        assert!(p.requires_token(&Method::POST, "/login/other"));
        assert!(!p.requires_token(&Method::POST, "/hooks/github"));
        assert!(p.requires_token(&Method::POST, "/hooksx/github"));
        assert!(p.requires_token(&Method::POST, "/hooks/../admin"));
        assert!(p.requires_token(&Method::POST, "/hooks/./x"));
        assert!(!CsrfPolicy::disabled().requires_token(&Method::POST, "/x"));
    }

    #[test]
    fn verify_compares_the_whole_token() {
        let p = CsrfPolicy::default();
        let token = generate();
        assert_eq!(token.len(), 43);
        let mut h = HeaderMap::new();
        assert!(!p.verify(&h, Some(&token)), "missing header");
        h.insert(
            "x-csrf-token",
            HeaderValue::from_str(&token).expect("ascii"),
        );
        assert!(p.verify(&h, Some(&token)));
        assert!(!p.verify(&h, None), "no session token");
        assert!(!p.verify(&h, Some(&token[..42])), "prefix");
        assert!(!p.verify(&h, Some(&generate())), "other token");
        assert_ne!(generate(), generate());
    }
}
