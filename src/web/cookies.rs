//! Reading the session cookie from a request and writing `Set-Cookie`.
//!
//! Cookie headers are untrusted bytes. They are read as bytes (a header that
//! is not UTF-8 is not an error, only a cookie that is not ours), split on
//! `;`, and the value of the configured name must parse as a
//! [`Token`]; anything else is treated as no cookie at all, so a forged,
//! truncated, oversized or binary cookie starts a fresh anonymous session
//! instead of failing the request. The value is never echoed or logged.

use axum::http::HeaderMap;
use axum::http::header::COOKIE;
use cookie::Cookie;
use cookie::time::Duration as CookieDuration;

use crate::config::{CookieConfig, SameSite};
use crate::id::Token;

/// What the request's cookie header says about the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Presented {
    /// No cookie of the configured name.
    Absent,
    /// A cookie of the configured name that is not a token this product
    /// issues (the value is dropped, never kept).
    Invalid,
    /// A well-formed token (it may still be unknown or ended).
    Token(Token),
}

/// Finds the session cookie among all `Cookie` headers. The first value of
/// the configured name that parses as a token wins; values that do not parse
/// are skipped (a browser may send a stale duplicate from another path).
pub(crate) fn presented(headers: &HeaderMap, name: &str) -> Presented {
    let mut seen_invalid = false;
    for value in headers.get_all(COOKIE) {
        for pair in value.as_bytes().split(|b| *b == b';') {
            let pair = pair.trim_ascii();
            let Some(eq) = pair.iter().position(|b| *b == b'=') else {
                continue;
            };
            let (k, v) = (pair[..eq].trim_ascii(), pair[eq + 1..].trim_ascii());
            if k != name.as_bytes() {
                continue;
            }
            let v = v
                .strip_prefix(b"\"")
                .and_then(|v| v.strip_suffix(b"\""))
                .unwrap_or(v);
            match std::str::from_utf8(v).ok().map(Token::parse) {
                Some(Ok(token)) => return Presented::Token(token),
                _ => seen_invalid = true,
            }
        }
    }
    if seen_invalid {
        Presented::Invalid
    } else {
        Presented::Absent
    }
}

fn same_site(s: SameSite) -> cookie::SameSite {
    match s {
        SameSite::Strict => cookie::SameSite::Strict,
        SameSite::Lax => cookie::SameSite::Lax,
        SameSite::None => cookie::SameSite::None,
    }
}

fn base(config: &CookieConfig, value: String) -> Cookie<'static> {
    Cookie::build((config.name.clone(), value))
        .path("/")
        .http_only(config.http_only)
        .secure(config.secure)
        .same_site(same_site(config.same_site))
        .build()
}

/// The `Set-Cookie` value that hands the token to the browser: the token and
/// nothing else as the value, `Path=/`, and the configured `HttpOnly`,
/// `Secure`, `SameSite` and `Max-Age`.
pub(crate) fn set_cookie(config: &CookieConfig, token: &Token) -> String {
    let mut c = base(config, token.expose().to_owned());
    let secs = i64::try_from(config.max_age.as_secs()).unwrap_or(i64::MAX);
    c.set_max_age(CookieDuration::seconds(secs));
    c.to_string()
}

/// The `Set-Cookie` value that makes the browser drop the cookie.
pub(crate) fn removal_cookie(config: &CookieConfig) -> String {
    let mut c = base(config, String::new());
    c.make_removal();
    c.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(values: &[&[u8]]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(COOKIE, HeaderValue::from_bytes(v).expect("header bytes"));
        }
        h
    }

    #[test]
    fn finds_the_token_among_other_cookies() {
        let t = Token::generate();
        let line = format!("theme=dark; session={}; other=1", t.expose());
        assert_eq!(
            presented(&headers(&[line.as_bytes()]), "session"),
            Presented::Token(t.clone())
        );
        // Split across two headers (HTTP/2), with a bad duplicate first.
        let second = format!("session={}", t.expose());
        assert_eq!(
            presented(
                &headers(&[b"session=garbage", second.as_bytes()]),
                "session"
            ),
            Presented::Token(t)
        );
    }

    #[test]
    fn bad_values_are_invalid_not_errors() {
        let t = Token::generate();
        let truncated = format!("session={}", &t.expose()[..42]);
        for bad in [
            truncated.as_bytes(),
            b"session=\xff\xfe\x80binary",
            b"session=",
            b"session=%00%00",
        ] {
            assert_eq!(
                presented(&headers(&[bad]), "session"),
                Presented::Invalid,
                "{bad:?}"
            );
        }
        assert_eq!(
            presented(&headers(&[b"\xff\xfe; x=1"]), "session"),
            Presented::Absent
        );
        assert_eq!(presented(&HeaderMap::new(), "session"), Presented::Absent);
    }

    #[test]
    fn set_cookie_has_exactly_the_configured_attributes() {
        let cfg = crate::Config::default().cookie;
        let t = Token::generate();
        let line = set_cookie(&cfg, &t);
        assert_eq!(
            line,
            format!(
                "session={}; HttpOnly; SameSite=Lax; Secure; Path=/; Max-Age=7200",
                t.expose()
            )
        );
        let gone = removal_cookie(&cfg);
        assert!(gone.starts_with("session=; HttpOnly; SameSite=Lax; Secure; Path=/; Max-Age=0"));
    }
}
