//! Protection of every data-plane frame after the handshake: AES-256-GCM with a
//! per-connection, per-direction session key (derived in `auth`).
//!
//! A sealed record is `[len u32 LE][body; len][tag; 16]`, where `body` is one
//! wire frame (header + payload). With [`Protection::Encrypt`] the body is
//! encrypted; with [`Protection::Integrity`] it travels in clear and the tag is
//! a GMAC over it; with [`Protection::None`] records are bare frames (only the
//! handshake is authenticated: for a dedicated, physically isolated fabric).
//! The nonce is the frame's sequence number, which both ends know without
//! sending it: a replayed, reordered, dropped or forged record fails its tag,
//! and the length prefix is covered too (associated data). Records are sealed
//! and opened in place, so protection adds no copy of the page data.

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};

/// Bytes of the authentication tag.
pub const TAG_SIZE: usize = 16;
/// Bytes of the length prefix.
pub const LEN_SIZE: usize = 4;
/// Bytes of a session key.
pub const KEY_SIZE: usize = 32;

/// What the data plane protects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protection {
    /// Every frame encrypted and authenticated (the default).
    #[default]
    Encrypt,
    /// Every frame authenticated (replay-protected), sent in clear.
    Integrity,
    /// Only the handshake is authenticated.
    None,
}

impl Protection {
    /// The name used in specs, config and status.
    pub fn as_str(self) -> &'static str {
        match self {
            Protection::Encrypt => "encrypt",
            Protection::Integrity => "integrity",
            Protection::None => "none",
        }
    }

    /// Parse a name; None when unknown.
    pub fn parse(s: &str) -> Option<Protection> {
        match s {
            "encrypt" => Some(Protection::Encrypt),
            "integrity" => Some(Protection::Integrity),
            "none" => Some(Protection::None),
            _ => None,
        }
    }

    /// The code bound into the handshake's key derivation (so a downgrade by a
    /// man in the middle breaks the handshake).
    pub fn code(self) -> u8 {
        match self {
            Protection::Encrypt => 1,
            Protection::Integrity => 2,
            Protection::None => 3,
        }
    }

    /// Inverse of [`Protection::code`].
    pub fn from_code(c: u64) -> Option<Protection> {
        match c {
            1 => Some(Protection::Encrypt),
            2 => Some(Protection::Integrity),
            3 => Some(Protection::None),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("sealed record of {len} bytes is larger than any frame ({max})")]
    TooLong { len: usize, max: usize },
    #[error("frame {seq} failed authentication (forged, replayed, reordered or corrupted)")]
    Forged { seq: u64 },
    #[error("frame {seq} too long to seal")]
    Seal { seq: u64 },
}

fn nonce(seq: u64) -> Nonce<aes_gcm::aead::consts::U12> {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&seq.to_le_bytes());
    n.into()
}

/// One direction's cipher (or none).
#[derive(Clone)]
struct Cipher {
    mode: Protection,
    aead: Option<Box<Aes256Gcm>>,
}

impl std::fmt::Debug for Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cipher({})", self.mode.as_str())
    }
}

impl Cipher {
    fn new(mode: Protection, key: &[u8; KEY_SIZE]) -> Cipher {
        let aead = match mode {
            Protection::None => None,
            _ => Some(Box::new(Aes256Gcm::new(key.into()))),
        };
        Cipher { mode, aead }
    }
}

/// The sending half of a protected connection.
#[derive(Debug, Clone)]
pub struct Sealer(Cipher);

impl Sealer {
    /// Bare frames (before the handshake, and in tests of the wire format).
    pub fn plain() -> Sealer {
        Sealer(Cipher {
            mode: Protection::None,
            aead: None,
        })
    }

    pub fn new(mode: Protection, key: &[u8; KEY_SIZE]) -> Sealer {
        Sealer(Cipher::new(mode, key))
    }

    /// Append frame `seq`, written by `enc`, to `out` as one sealed record.
    pub fn seal_into(
        &self,
        seq: u64,
        out: &mut Vec<u8>,
        enc: &dyn Fn(u64, &mut Vec<u8>),
    ) -> Result<(), SealError> {
        let Some(aead) = &self.0.aead else {
            enc(seq, out);
            return Ok(());
        };
        let start = out.len();
        out.extend_from_slice(&[0u8; LEN_SIZE]);
        enc(seq, out);
        let len = out.len() - start - LEN_SIZE;
        let len32 = u32::try_from(len).map_err(|_| SealError::Seal { seq })?;
        out[start..start + LEN_SIZE].copy_from_slice(&len32.to_le_bytes());
        let tag = if self.0.mode == Protection::Encrypt {
            let (prefix, body) = out[start..].split_at_mut(LEN_SIZE);
            aead.encrypt_inout_detached(&nonce(seq), prefix, body.into())
        } else {
            let empty: &mut [u8] = &mut [];
            aead.encrypt_inout_detached(&nonce(seq), &out[start..], empty.into())
        }
        .map_err(|_| SealError::Seal { seq })?;
        out.extend_from_slice(&tag);
        Ok(())
    }
}

/// The receiving half of a protected connection.
#[derive(Debug, Clone)]
pub struct Opener(Cipher);

/// Where the frame is inside an opened record, and the record's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    pub body_start: usize,
    pub body_end: usize,
    pub consumed: usize,
}

impl Opener {
    pub fn plain() -> Opener {
        Opener(Cipher {
            mode: Protection::None,
            aead: None,
        })
    }

    pub fn new(mode: Protection, key: &[u8; KEY_SIZE]) -> Opener {
        Opener(Cipher::new(mode, key))
    }

    /// Whether records carry a length prefix and a tag.
    pub fn is_sealed(&self) -> bool {
        self.0.aead.is_some()
    }

    /// Open the record at the start of `buf` in place, if all of it is there.
    /// `max_body` bounds the length before anything is buffered for it.
    pub fn open(
        &self,
        seq: u64,
        buf: &mut [u8],
        max_body: usize,
    ) -> Result<Option<Opened>, SealError> {
        let Some(aead) = &self.0.aead else {
            return Ok(Some(Opened {
                body_start: 0,
                body_end: buf.len(),
                consumed: 0,
            }));
        };
        let Some(prefix) = buf.get(..LEN_SIZE) else {
            return Ok(None);
        };
        let len = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        if len > max_body {
            return Err(SealError::TooLong { len, max: max_body });
        }
        let total = LEN_SIZE + len + TAG_SIZE;
        if buf.len() < total {
            return Ok(None);
        }
        let (rec, _) = buf.split_at_mut(total);
        let (head, tag) = rec.split_at_mut(LEN_SIZE + len);
        let tag = Tag::<aes_gcm::aead::consts::U16>::try_from(&tag[..])
            .map_err(|_| SealError::Forged { seq })?;
        let ok = if self.0.mode == Protection::Encrypt {
            let (prefix, body) = head.split_at_mut(LEN_SIZE);
            aead.decrypt_inout_detached(&nonce(seq), prefix, body.into(), &tag)
        } else {
            let empty: &mut [u8] = &mut [];
            aead.decrypt_inout_detached(&nonce(seq), head, empty.into(), &tag)
        };
        ok.map_err(|_| SealError::Forged { seq })?;
        Ok(Some(Opened {
            body_start: LEN_SIZE,
            body_end: LEN_SIZE + len,
            consumed: total,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(seq: u64, out: &mut Vec<u8>) {
        out.extend_from_slice(b"frame-");
        out.extend_from_slice(&seq.to_le_bytes());
    }

    #[test]
    fn round_trip_each_mode() {
        for mode in [Protection::Encrypt, Protection::Integrity] {
            let k = [7u8; KEY_SIZE];
            let (s, o) = (Sealer::new(mode, &k), Opener::new(mode, &k));
            let mut buf = Vec::new();
            s.seal_into(5, &mut buf, &frame).unwrap();
            s.seal_into(6, &mut buf, &frame).unwrap();
            let clear = buf.windows(6).any(|w| w == b"frame-");
            assert_eq!(clear, mode == Protection::Integrity, "{mode:?}");
            let r = o.open(5, &mut buf, 64).unwrap().unwrap();
            assert_eq!(&buf[r.body_start..r.body_start + 6], b"frame-");
            let rest = &mut buf[r.consumed..];
            let r2 = o.open(6, rest, 64).unwrap().unwrap();
            assert_eq!(r2.consumed, rest.len());
        }
    }

    #[test]
    fn replay_reorder_and_tamper_fail() {
        let k = [9u8; KEY_SIZE];
        let (s, o) = (
            Sealer::new(Protection::Integrity, &k),
            Opener::new(Protection::Integrity, &k),
        );
        let mut buf = Vec::new();
        s.seal_into(3, &mut buf, &frame).unwrap();
        // Wrong sequence number (replay in another slot / reordering).
        assert_eq!(
            o.open(4, &mut buf.clone(), 64),
            Err(SealError::Forged { seq: 4 })
        );
        // One flipped bit of the clear body.
        let mut t = buf.clone();
        t[LEN_SIZE] ^= 1;
        assert_eq!(o.open(3, &mut t, 64), Err(SealError::Forged { seq: 3 }));
        // Wrong key.
        let other = Opener::new(Protection::Integrity, &[1u8; KEY_SIZE]);
        assert!(other.open(3, &mut buf.clone(), 64).is_err());
        // Oversized length prefix refused before buffering.
        let mut big = vec![0xff, 0xff, 0, 0];
        assert!(matches!(
            o.open(3, &mut big, 64),
            Err(SealError::TooLong { .. })
        ));
        // Incomplete record: wait for more.
        assert_eq!(o.open(3, &mut buf[..10], 64), Ok(None));
    }
}
