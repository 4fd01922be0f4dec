//! The session token: 16 random bytes that the daemon hands out when it creates a session and
//! that every client presents (in the region header, the data-socket hello and HTTP's bearer
//! header). One type, so that its parse, format and comparison exist once.

use crate::error::{Error, Result};

/// A session's credential. Its `Debug` does not print it; `Display` gives the 32 hex
/// characters that HTTP carries.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SessionToken([u8; SessionToken::BYTES]);

impl SessionToken {
    /// Bytes of a token.
    pub const BYTES: usize = 16;

    /// The token of these bytes.
    pub const fn from_bytes(bytes: [u8; Self::BYTES]) -> Self {
        Self(bytes)
    }

    /// The token's bytes (as the region header and the hello carry them).
    pub const fn as_bytes(&self) -> &[u8; Self::BYTES] {
        &self.0
    }

    /// The token as two little-endian words, as the region header stores it.
    pub fn words(&self) -> [u64; 2] {
        let (lo, hi) = self.0.split_at(8);
        let word = |b: &[u8]| {
            let mut w = [0u8; 8];
            w.copy_from_slice(b);
            u64::from_le_bytes(w)
        };
        [word(lo), word(hi)]
    }

    /// Parses 32 hex characters (either case).
    pub fn parse(hex: &str) -> Result<Self> {
        let bad = || {
            Error::BadRequest(format!(
                "token must be {} hex characters, got {} characters",
                2 * Self::BYTES,
                hex.chars().count()
            ))
        };
        if hex.len() != 2 * Self::BYTES || !hex.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; Self::BYTES];
        for (o, pair) in out.iter_mut().zip(hex.as_bytes().chunks_exact(2)) {
            let pair = std::str::from_utf8(pair).map_err(|_| bad())?;
            *o = u8::from_str_radix(pair, 16).map_err(|_| bad())?;
        }
        Ok(Self(out))
    }

    /// Whether `presented` is this token, in time independent of where they differ.
    pub fn matches(&self, presented: &[u8; Self::BYTES]) -> bool {
        let diff = self
            .0
            .iter()
            .zip(presented)
            .fold(0u8, |acc, (x, y)| acc | (x ^ y));
        std::hint::black_box(diff) == 0
    }

    /// [`SessionToken::matches`] for the two words of a region header.
    pub fn matches_words(&self, presented: [u64; 2]) -> bool {
        let mut bytes = [0u8; Self::BYTES];
        bytes[..8].copy_from_slice(&presented[0].to_le_bytes());
        bytes[8..].copy_from_slice(&presented[1].to_le_bytes());
        self.matches(&bytes)
    }
}

impl std::fmt::Display for SessionToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl std::fmt::Debug for SessionToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionToken(..)")
    }
}

impl std::str::FromStr for SessionToken {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_errors() {
        let t = SessionToken::from_bytes(std::array::from_fn(|i| (i * 17) as u8));
        assert_eq!(SessionToken::parse(&t.to_string()).unwrap(), t);
        assert_eq!(
            SessionToken::parse(&t.to_string().to_uppercase()).unwrap(),
            t
        );
        for bad in ["abc", &"zz".repeat(16), &"é".repeat(16), &"0".repeat(33)] {
            let e = SessionToken::parse(bad).unwrap_err().to_string();
            assert!(e.contains("32 hex characters"), "{e}");
        }
        assert_eq!(format!("{t:?}"), "SessionToken(..)");
    }

    #[test]
    fn matches_bytes_and_words() {
        let t = SessionToken::from_bytes(std::array::from_fn(|i| i as u8 + 1));
        assert!(t.matches(t.as_bytes()));
        assert!(t.matches_words(t.words()));
        let mut other = *t.as_bytes();
        other[15] ^= 1;
        assert!(!t.matches(&other));
        assert!(!t.matches_words([t.words()[0], t.words()[1] ^ 1]));
    }
}
