//! Mutual authentication of a peer with the cluster secret (HMAC-SHA256
//! challenge/response, both directions, fresh nonces on both sides).
//!
//! ```text
//! connector -> acceptor  HELLO     arg0 = connector id, arg1 = lane, payload = Nc (32 B)
//! acceptor  -> connector CHALLENGE arg0 = acceptor id, payload = Ns (32 B) || MACa
//! connector -> acceptor  RESPONSE  payload = MACc
//! acceptor  -> connector AUTH_OK
//! MACa = HMAC(K, "dvmm-a" || Nc || Ns || ids || lane)
//! MACc = HMAC(K, "dvmm-c" || Ns || Nc || ids || lane)
//! ```
//!
//! The acceptor proves the key before the connector answers, and the connector's
//! MAC covers the acceptor's fresh nonce, so a captured response cannot be
//! replayed in another session. A peer without the key (or with another key)
//! cannot produce either MAC and is refused. MACs are compared in constant time.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::protocol::NodeId;
use super::wire::{self, ty, Decoder, Frame, Limits};

/// Minimum secret length in bytes.
pub const MIN_SECRET: usize = 16;
const NONCE: usize = 32;
const MAC: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no cluster secret (at least {MIN_SECRET} bytes are required)")]
    NoKey,
    #[error("peer failed authentication: {0}")]
    Refused(&'static str),
    #[error("handshake: {0}")]
    Wire(#[from] wire::WireError),
    #[error("handshake i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("no randomness: {0}")]
    Random(std::io::Error),
}

type Result<T> = std::result::Result<T, AuthError>;

/// The cluster secret.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    pub fn new(bytes: &[u8]) -> Result<Self> {
        if bytes.len() < MIN_SECRET {
            return Err(AuthError::NoKey);
        }
        Ok(Secret(bytes.to_vec()))
    }

    fn mac(&self, parts: &[&[u8]]) -> [u8; MAC] {
        // HMAC accepts keys of any length.
        let mut m = match <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0) {
            Ok(m) => m,
            Err(_) => unreachable!("HMAC takes any key length"),
        };
        for p in parts {
            m.update(p);
        }
        let mut out = [0u8; MAC];
        out.copy_from_slice(&m.finalize().into_bytes());
        out
    }

    fn verify(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        let Ok(mut m) = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0) else {
            return false;
        };
        for p in parts {
            m.update(p);
        }
        m.verify_slice(tag).is_ok()
    }
}

/// Fill a buffer with random bytes from the kernel.
pub fn random_bytes(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`.
        let r = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += r as usize;
    }
    Ok(())
}

fn nonce() -> Result<[u8; NONCE]> {
    let mut n = [0u8; NONCE];
    random_bytes(&mut n).map_err(AuthError::Random)?;
    Ok(n)
}

fn send(s: &mut TcpStream, f: &Frame, seq: u64) -> Result<()> {
    let mut out = Vec::new();
    wire::encode(f, seq, &mut out);
    s.write_all(&out)?;
    Ok(())
}

fn recv(s: &mut TcpStream, dec: &mut Decoder) -> Result<Frame> {
    // Read exactly one frame (header, then its payload): bytes after the
    // handshake belong to the caller's decoder.
    let mut h = [0u8; wire::HEADER_SIZE];
    read_exact(s, &mut h)?;
    dec.push(&h);
    if let Some(f) = dec.next_frame()? {
        return Ok(f);
    }
    let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]) as usize;
    let mut p = vec![0u8; len];
    read_exact(s, &mut p)?;
    dec.push(&p);
    dec.next_frame()?
        .ok_or(AuthError::Refused("incomplete handshake frame"))
}

fn read_exact(s: &mut TcpStream, buf: &mut [u8]) -> Result<()> {
    s.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            AuthError::Refused("connection closed during the handshake")
        } else {
            AuthError::Io(e)
        }
    })
}

fn auth_frame(f: Frame, want: u16) -> Result<(u64, u64, Vec<u8>)> {
    match f {
        Frame::Auth {
            ty,
            arg0,
            arg1,
            payload,
        } if ty == want => Ok((arg0, arg1, payload)),
        _ => Err(AuthError::Refused("unexpected frame during the handshake")),
    }
}

fn ids(connector: NodeId, acceptor: NodeId, lane: u8) -> [u8; 5] {
    let c = connector.to_le_bytes();
    let a = acceptor.to_le_bytes();
    [c[0], c[1], a[0], a[1], lane]
}

/// First sequence number of data frames after the handshake (both directions).
pub const FIRST_DATA_SEQ: u64 = 2;

/// Connector side. Returns when the acceptor has authenticated us and we it.
pub fn connect(
    s: &mut TcpStream,
    secret: &Secret,
    me: NodeId,
    peer: NodeId,
    lane: u8,
    timeout: Duration,
) -> Result<()> {
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let limits = Limits { pages: 0, nodes: 0 };
    let mut dec = Decoder::new(limits, 0);
    let nc = nonce()?;
    send(
        s,
        &Frame::Auth {
            ty: ty::HELLO,
            arg0: u64::from(me),
            arg1: u64::from(lane),
            payload: nc.to_vec(),
        },
        0,
    )?;
    let (aid, _, p) = auth_frame(recv(s, &mut dec)?, ty::CHALLENGE)?;
    if p.len() != NONCE + MAC {
        return Err(AuthError::Refused("bad challenge length"));
    }
    if aid != u64::from(peer) {
        return Err(AuthError::Refused("peer is not the expected node"));
    }
    let (ns, maca) = p.split_at(NONCE);
    let id = ids(me, peer, lane);
    if !secret.verify(&[b"dvmm-a", &nc, ns, &id], maca) {
        return Err(AuthError::Refused(
            "acceptor does not know the cluster secret",
        ));
    }
    let macc = secret.mac(&[b"dvmm-c", ns, &nc, &id]);
    send(
        s,
        &Frame::Auth {
            ty: ty::RESPONSE,
            arg0: 0,
            arg1: 0,
            payload: macc.to_vec(),
        },
        1,
    )?;
    auth_frame(recv(s, &mut dec)?, ty::AUTH_OK)?;
    s.set_read_timeout(None)?;
    s.set_write_timeout(None)?;
    Ok(())
}

/// Acceptor side. Returns the authenticated peer's (node id, lane).
/// `check` validates the claimed identity before any secret-dependent reply.
pub fn accept(
    s: &mut TcpStream,
    secret: &Secret,
    me: NodeId,
    timeout: Duration,
    check: &dyn Fn(NodeId, u8) -> bool,
) -> Result<(NodeId, u8)> {
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let limits = Limits { pages: 0, nodes: 0 };
    let mut dec = Decoder::new(limits, 0);
    let (cid, lane, nc) = auth_frame(recv(s, &mut dec)?, ty::HELLO)?;
    if nc.len() != NONCE {
        return Err(AuthError::Refused("bad hello length"));
    }
    let cid = NodeId::try_from(cid).map_err(|_| AuthError::Refused("bad node id"))?;
    let lane = u8::try_from(lane).map_err(|_| AuthError::Refused("bad lane"))?;
    if !check(cid, lane) {
        return Err(AuthError::Refused("unexpected node id or lane"));
    }
    let ns = nonce()?;
    let id = ids(cid, me, lane);
    let maca = secret.mac(&[b"dvmm-a", &nc, &ns, &id]);
    let mut p = ns.to_vec();
    p.extend_from_slice(&maca);
    send(
        s,
        &Frame::Auth {
            ty: ty::CHALLENGE,
            arg0: u64::from(me),
            arg1: 0,
            payload: p,
        },
        0,
    )?;
    let (_, _, macc) = auth_frame(recv(s, &mut dec)?, ty::RESPONSE)?;
    if !secret.verify(&[b"dvmm-c", &ns, &nc, &id], &macc) {
        return Err(AuthError::Refused(
            "connector does not know the cluster secret",
        ));
    }
    send(
        s,
        &Frame::Auth {
            ty: ty::AUTH_OK,
            arg0: 0,
            arg1: 0,
            payload: Vec::new(),
        },
        1,
    )?;
    s.set_read_timeout(None)?;
    s.set_write_timeout(None)?;
    Ok((cid, lane))
}
