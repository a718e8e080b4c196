//! Optional binding of a session to its client.
//!
//! A [`Fingerprint`] hashes the `User-Agent` and/or a prefix of the client's
//! IP address (`/24` for IPv4 and `/64` for IPv6 by default, so a client that
//! moves within its network keeps its session). The hash (hex SHA-256, never
//! the raw values) is stored in the session under `_fingerprint` when the
//! layer creates or rotates a session. On every later request the layer
//! recomputes it; on a mismatch the session is destroyed with reason
//! `fingerprint` and the request continues with a fresh anonymous session, so
//! a stolen cookie replayed from another browser or network is worth nothing
//! and the theft is in the audit log.
//!
//! The client address comes from axum's `ConnectInfo<SocketAddr>` (serve the
//! app with `into_make_service_with_connect_info::<SocketAddr>()`), or, behind
//! a reverse proxy, from a header the proxy sets
//! ([`Fingerprint::with_client_ip_header`]; its rightmost address is used,
//! the one the proxy appended). Only name a header your proxy overwrites:
//! otherwise clients choose their own address.

use std::net::{IpAddr, SocketAddr};

use axum::extract::ConnectInfo;
use axum::http::{HeaderName, header};
use sha2::{Digest, Sha256};

/// The session key holding the fingerprint hash.
pub const FINGERPRINT_KEY: &str = "_fingerprint";

/// What a session is bound to. Off unless given to
/// [`SessionLayer::with_fingerprint`](super::SessionLayer::with_fingerprint).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    user_agent: bool,
    ip_prefix: Option<(u8, u8)>,
    client_ip_header: Option<HeaderName>,
}

impl Fingerprint {
    /// Binds sessions to the `User-Agent` header.
    pub fn user_agent() -> Self {
        Fingerprint {
            user_agent: true,
            ip_prefix: None,
            client_ip_header: None,
        }
    }

    /// Binds sessions to the client's network: the first `v4_bits` of an
    /// IPv4 address, the first `v6_bits` of an IPv6 address (IPv4-mapped IPv6
    /// addresses count as IPv4).
    pub fn ip_prefix(v4_bits: u8, v6_bits: u8) -> Self {
        Fingerprint {
            user_agent: false,
            ip_prefix: Some((v4_bits.min(32), v6_bits.min(128))),
            client_ip_header: None,
        }
    }

    /// Builder: also bind to the `User-Agent`.
    pub fn with_user_agent(mut self) -> Self {
        self.user_agent = true;
        self
    }

    /// Builder: also bind to the client's network (see [`Fingerprint::ip_prefix`]).
    pub fn with_ip_prefix(mut self, v4_bits: u8, v6_bits: u8) -> Self {
        self.ip_prefix = Some((v4_bits.min(32), v6_bits.min(128)));
        self
    }

    /// Builder: take the client address from this header (rightmost entry of
    /// a comma-separated list, as `X-Forwarded-For` appends) instead of the
    /// connection. Use only behind a proxy that sets the header.
    pub fn with_client_ip_header(mut self, header: HeaderName) -> Self {
        self.client_ip_header = Some(header);
        self
    }

    /// The fingerprint of a request: hex SHA-256 of the bound attributes.
    pub fn compute<B>(&self, req: &axum::http::Request<B>) -> String {
        let mut h = Sha256::new();
        h.update(b"vedfolnir-fingerprint-v1\0");
        if self.user_agent {
            h.update(b"ua\0");
            if let Some(ua) = req.headers().get(header::USER_AGENT) {
                h.update(ua.as_bytes());
            }
            h.update(b"\0");
        }
        if let Some((v4, v6)) = self.ip_prefix {
            h.update(b"ip\0");
            if let Some(ip) = self.client_ip(req) {
                h.update(prefix(ip, v4, v6).as_bytes());
            }
            h.update(b"\0");
        }
        hex::encode(h.finalize())
    }

    fn client_ip<B>(&self, req: &axum::http::Request<B>) -> Option<IpAddr> {
        match &self.client_ip_header {
            Some(name) => {
                let v = req.headers().get_all(name).iter().next_back()?;
                let text = std::str::from_utf8(v.as_bytes()).ok()?;
                text.rsplit(',').next()?.trim().parse().ok()
            }
            None => req
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip()),
        }
    }
}

/// The network prefix of an address, as text (`192.0.2.0/24`).
fn prefix(ip: IpAddr, v4_bits: u8, v6_bits: u8) -> String {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let mask = u32::MAX.checked_shl(32 - u32::from(v4_bits)).unwrap_or(0);
            format!("{}/{v4_bits}", std::net::Ipv4Addr::from(bits & mask))
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let mask = u128::MAX.checked_shl(128 - u32::from(v6_bits)).unwrap_or(0);
            format!("{}/{v6_bits}", std::net::Ipv6Addr::from(bits & mask))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Request;

    fn req(ua: &str, xff: &str) -> Request<()> {
        Request::builder()
            .header("user-agent", ua)
            .header("x-forwarded-for", xff)
            .body(())
            .expect("request")
    }

    #[test]
    fn prefixes() {
        let ip: IpAddr = "192.0.2.77".parse().expect("ip");
        assert_eq!(prefix(ip, 24, 64), "192.0.2.0/24");
        assert_eq!(prefix(ip, 0, 64), "0.0.0.0/0");
        assert_eq!(prefix(ip, 32, 64), "192.0.2.77/32");
        let ip: IpAddr = "2001:db8:1:2:3:4:5:6".parse().expect("ip");
        assert_eq!(prefix(ip, 24, 64), "2001:db8:1:2::/64");
        let mapped: IpAddr = "::ffff:192.0.2.77".parse().expect("ip");
        assert_eq!(prefix(mapped, 24, 64), "192.0.2.0/24");
    }

    #[test]
    fn fingerprints_follow_the_bound_attributes() {
        let f = Fingerprint::user_agent()
            .with_ip_prefix(24, 64)
            .with_client_ip_header(HeaderName::from_static("x-forwarded-for"));
        let a = f.compute(&req("Firefox", "10.0.0.1, 198.51.100.7"));
        assert_eq!(a.len(), 64);
        assert_eq!(a, f.compute(&req("Firefox", "10.9.9.9, 198.51.100.200")));
        assert_ne!(a, f.compute(&req("Chrome", "198.51.100.7")));
        assert_ne!(a, f.compute(&req("Firefox", "198.51.101.7")));
        let ua_only = Fingerprint::user_agent();
        assert_eq!(
            ua_only.compute(&req("Firefox", "1.1.1.1")),
            ua_only.compute(&req("Firefox", "2.2.2.2"))
        );
    }
}
