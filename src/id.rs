//! Session tokens and session ids.
//!
//! The browser holds a [`Token`]: 256 random bits from the operating system's
//! CSPRNG, base64url without padding (43 characters). Nothing on the server
//! side ever stores it. Redis keys, stream entries, the audit database and
//! logs carry only the [`SessionId`], `hex(SHA-256(token))`, so a copy of any
//! of them lets no one present a valid cookie.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::TryRngCore as _;
use rand::rngs::OsRng;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

/// Number of random bytes in a token.
pub const TOKEN_BYTES: usize = 32;
/// Length of a token's text form.
pub const TOKEN_LEN: usize = 43;
/// Length of a legacy session id: a UUID in its hyphenated text form.
pub const LEGACY_TOKEN_LEN: usize = 36;

/// The bearer secret carried in the cookie. Its `Debug` form is redacted so it
/// cannot leak into logs by accident; use [`Token::expose`] where the value
/// must really be written (the `Set-Cookie` header, the CLI's one-time output).
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// A fresh token from the OS CSPRNG.
    ///
    /// # Panics
    /// Only if the operating system cannot provide randomness at all, in which
    /// case no secure session can be issued.
    #[allow(clippy::expect_used)]
    pub fn generate() -> Self {
        let mut bytes = [0u8; TOKEN_BYTES];
        OsRng
            .try_fill_bytes(&mut bytes)
            .expect("the operating system's random number generator failed");
        Token(URL_SAFE_NO_PAD.encode(bytes))
    }

    /// Parses untrusted cookie text. Anything but 43 base64url characters that
    /// decode to 32 bytes, or a legacy session id (see [`Token::legacy`]), is
    /// refused, without echoing the input.
    pub fn parse(text: &str) -> Result<Self, InvalidToken> {
        if text.len() == LEGACY_TOKEN_LEN {
            return Token::legacy(text);
        }
        if text.len() != TOKEN_LEN {
            return Err(InvalidToken);
        }
        match URL_SAFE_NO_PAD.decode(text) {
            Ok(bytes) if bytes.len() == TOKEN_BYTES => Ok(Token(text.to_owned())),
            _ => Err(InvalidToken),
        }
    }

    /// A session id of the Vedfolnir application's previous session store:
    /// a random UUID (version 4) in lowercase hyphenated form, which its
    /// cookies carry. `vedfolnir-sessions import-legacy` turns each of those
    /// sessions into one whose id is the SHA-256 of this text, so the cookie
    /// a browser already holds keeps working as its token (122 random bits,
    /// where new tokens have 256). Anything else is refused.
    pub fn legacy(text: &str) -> Result<Self, InvalidToken> {
        let b = text.as_bytes();
        let well_formed = b.len() == LEGACY_TOKEN_LEN
            && b.iter().enumerate().all(|(i, c)| match i {
                8 | 13 | 18 | 23 => *c == b'-',
                _ => matches!(c, b'0'..=b'9' | b'a'..=b'f'),
            })
            && b[14] == b'4'
            && matches!(b[19], b'8' | b'9' | b'a' | b'b');
        if well_formed {
            Ok(Token(text.to_owned()))
        } else {
            Err(InvalidToken)
        }
    }

    /// The token text, for the `Set-Cookie` header and nowhere else.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The session id this token stands for.
    pub fn session_id(&self) -> SessionId {
        let digest = Sha256::digest(self.0.as_bytes());
        SessionId(hex::encode(digest))
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// A cookie value that is not a token this product issues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not a valid session token")]
pub struct InvalidToken;

/// `hex(SHA-256(token))`: 64 lowercase hex characters. Safe to store and log.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(String);

/// The step of the lean expiry index's scores, ms (see
/// [`SessionId::expiry_score`]).
const EXPIRY_STEP_MS: f64 = 64.0;

impl SessionId {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The 32 bytes the hex spells: how the lean layout files the id in its
    /// indexes.
    pub fn to_bytes(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        // Checked on construction: 64 lowercase hex characters.
        if hex::decode_to_slice(&self.0, &mut out).is_err() {
            unreachable!("a session id is 64 hex characters");
        }
        out
    }

    /// The id of a user index member: 64 hex characters, or the 32 bytes
    /// they spell (the lean layout). `None` for anything else.
    pub(crate) fn from_member(member: &[u8]) -> Option<SessionId> {
        match member.len() {
            32 => Some(SessionId(hex::encode(member))),
            64 => std::str::from_utf8(member).ok()?.parse().ok(),
            _ => None,
        }
    }

    /// The lean layout's expiry index member: the first 30 bytes of the id.
    /// Its last two bytes are in the entry's score ([`SessionId::expiry_score`]).
    pub fn expiry_member(&self) -> [u8; 30] {
        let mut out = [0u8; 30];
        out.copy_from_slice(&self.to_bytes()[..30]);
        out
    }

    /// The lean layout's expiry index score for this id filed at `at_ms`:
    /// the greatest `64k + f` not after `at_ms`, where the fraction `f`, in
    /// [0, 64), is the id's last two bytes / 1024. A score is thus a time in
    /// ms at most 64 ms early, never late, and a double exactly (below 2^43
    /// ms, the year 2248). The script computes the same (`escore` in
    /// `src/lua/session.lua`).
    pub fn expiry_score(&self, at_ms: i64) -> f64 {
        let bytes = self.to_bytes();
        let f = f64::from(u16::from_be_bytes([bytes[30], bytes[31]])) / 1024.0;
        ((at_ms as f64 - f) / EXPIRY_STEP_MS).floor() * EXPIRY_STEP_MS + f
    }

    /// The id of an expiry index entry: a member of [`SessionId::from_member`],
    /// or the lean layout's 30 bytes with the last two from `score`. `None`
    /// for anything else.
    pub(crate) fn from_expiry_entry(member: &[u8], score: f64) -> Option<SessionId> {
        if member.len() != 30 {
            return SessionId::from_member(member);
        }
        let tail = score.rem_euclid(EXPIRY_STEP_MS) * 1024.0;
        if !(tail.fract() == 0.0 && (0.0..65536.0).contains(&tail)) {
            return None;
        }
        let mut bytes = [0u8; 32];
        bytes[..30].copy_from_slice(member);
        bytes[30..].copy_from_slice(&(tail as u16).to_be_bytes());
        Some(SessionId(hex::encode(bytes)))
    }
}

/// An id that is not 64 lowercase hex characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("session id must be 64 lowercase hex characters")]
pub struct InvalidSessionId;

impl FromStr for SessionId {
    type Err = InvalidSessionId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(SessionId(s.to_owned()))
        } else {
            Err(InvalidSessionId)
        }
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({})", self.0)
    }
}

impl Serialize for SessionId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for SessionId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_has_256_bits_and_round_trips() {
        let t = Token::generate();
        assert_eq!(t.expose().len(), TOKEN_LEN);
        assert_eq!(Token::parse(t.expose()), Ok(t.clone()));
        assert_ne!(Token::generate(), t, "two tokens must differ");
    }

    proptest::proptest! {
        /// The lean expiry entry names its session exactly, at most 64 ms
        /// early and never late, also after the score's round trip through
        /// text (Redis answers scores with 17 significant digits, `%.17g`).
        #[test]
        fn an_expiry_entry_names_its_session(
            bytes in proptest::array::uniform32(proptest::num::u8::ANY),
            at in 0i64..(1i64 << 43) - 64,
        ) {
            let id = SessionId(hex::encode(bytes));
            let score = id.expiry_score(at);
            proptest::prop_assert!(score <= at as f64 && score > (at - 64) as f64, "{score} for {at}");
            let back = format!("{score:.16e}").parse::<f64>().expect("a number");
            proptest::prop_assert_eq!(back, score);
            let member = id.expiry_member();
            proptest::prop_assert_eq!(SessionId::from_expiry_entry(&member, back), Some(id.clone()));
            // Another id's score names another id.
            let other = score + 1.0 / 1024.0;
            if other.rem_euclid(64.0) != 0.0 {
                proptest::prop_assert_ne!(SessionId::from_expiry_entry(&member, other), Some(id));
            }
        }
    }

    #[test]
    fn expiry_entries_of_other_forms_are_read_by_their_member() {
        let id = Token::generate().session_id();
        let hex = id.as_str().as_bytes().to_vec();
        assert_eq!(SessionId::from_expiry_entry(&hex, 1234.0), Some(id.clone()));
        assert_eq!(
            SessionId::from_expiry_entry(&id.to_bytes(), 1234.0),
            Some(id.clone())
        );
        // A 30-byte member whose score has no id in it: a score of another
        // form, or a fraction finer than 1/1024.
        let m = id.expiry_member();
        assert!(SessionId::from_expiry_entry(&m, 1234.5 + 1.0 / 4096.0).is_none());
        assert!(SessionId::from_expiry_entry(&m[..29], 1234.0).is_none());
    }

    #[test]
    fn session_id_is_sha256_hex_of_token() {
        let t = Token::parse("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA").expect("valid");
        let id = t.session_id();
        assert_eq!(id.as_str().len(), 64);
        assert_eq!(
            id.as_str(),
            hex::encode(Sha256::digest(
                b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
            ))
        );
        assert!(!id.as_str().contains(t.expose()));
    }

    #[test]
    fn bad_tokens_are_refused() {
        for bad in [
            "",
            "short",
            "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!",
            "é",
        ] {
            assert_eq!(Token::parse(bad), Err(InvalidToken));
        }
        let t = Token::generate();
        assert!(Token::parse(&t.expose()[..42]).is_err(), "truncated");
        assert_eq!(format!("{t:?}"), "Token(<redacted>)");
    }

    #[test]
    fn legacy_session_ids_are_tokens() {
        let uuid = "3f2a9c1e-7b4d-4e8a-9c2f-0123456789ab";
        let t = Token::parse(uuid).expect("a legacy id");
        assert_eq!(t, Token::legacy(uuid).expect("same"));
        assert_eq!(
            t.session_id().as_str(),
            hex::encode(Sha256::digest(uuid.as_bytes()))
        );
        for bad in [
            "3F2A9C1E-7B4D-4E8A-9C2F-0123456789AB", // upper case
            "3f2a9c1e-7b4d-1e8a-9c2f-0123456789ab", // version 1
            "3f2a9c1e-7b4d-4e8a-7c2f-0123456789ab", // wrong variant
            "3f2a9c1e07b4d-4e8a-9c2f-0123456789ab",
            "3f2a9c1e-7b4d-4e8a-9c2f-0123456789ag",
        ] {
            assert_eq!(Token::parse(bad), Err(InvalidToken), "{bad}");
        }
    }

    #[test]
    fn session_id_parsing() {
        assert!("A".repeat(64).parse::<SessionId>().is_err());
        assert!("a".repeat(63).parse::<SessionId>().is_err());
        assert!("a".repeat(64).parse::<SessionId>().is_ok());
    }
}
