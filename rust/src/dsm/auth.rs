//! Mutual authentication of a data-plane connection and its session keys.
//!
//! Every node of a VM has its own X25519 key pair, made for that VM by the node
//! itself (the private key never leaves it; the daemons exchange the public
//! keys over their authenticated control plane). Two nodes' static
//! Diffie-Hellman value is the link secret only they can compute; a handshake
//! with fresh nonces on both sides turns it into per-connection keys:
//!
//! ```text
//! connector -> acceptor  HELLO     arg0 = connector id, arg1 = lane, payload = Nc (32 B)
//! acceptor  -> connector CHALLENGE arg0 = acceptor id, arg1 = protection, payload = Ns || MACa
//! connector -> acceptor  RESPONSE  payload = MACc
//! acceptor  -> connector AUTH_OK
//! PRK  = HKDF-Extract(salt = VM session id, X25519(own private, peer public))
//! OKM  = HKDF-Expand(PRK, "dvmm-link-v2" || Nc || Ns || ids || lane || protection, 96)
//!      = mac key || connector->acceptor key || acceptor->connector key
//! MACa = HMAC(mac key, "dvmm-a"), MACc = HMAC(mac key, "dvmm-c")
//! ```
//!
//! Only the two nodes can derive the keys, so a relay (a node that dials an
//! attacker who dials on) gets nowhere, and the ids, lane and protection mode
//! are bound into every key, so none can be changed on the way (a downgrade of
//! the protection breaks the handshake). Fresh nonces make every connection's
//! keys new, so a recorded session cannot be replayed. The acceptor proves the
//! key first, but only with the acceptor's label. After the handshake every
//! frame is sealed with the direction's key (see `seal`). MACs are compared in
//! constant time.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use hkdf::Hkdf;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};

use super::protocol::NodeId;
use super::seal::{Opener, Protection, Sealer, KEY_SIZE};
use super::wire::{self, ty, Decoder, Frame, Limits};

const NONCE: usize = 32;
const MAC: usize = 32;
/// Bytes of a VM session id (public, the same on every node of the VM).
pub const SESSION_SIZE: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("this node's private key does not match its public key in the node list")]
    KeyMismatch,
    #[error("node index {me} has no public key ({n} keys given)")]
    NoKey { me: usize, n: usize },
    #[error("peer failed authentication: {0}")]
    Refused(&'static str),
    #[error("protection mode mismatch: the peer uses {peer}, this node {mine}")]
    Mode {
        peer: &'static str,
        mine: &'static str,
    },
    #[error("handshake: {0}")]
    Wire(#[from] wire::WireError),
    #[error("handshake i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("no randomness: {0}")]
    Random(std::io::Error),
}

type Result<T> = std::result::Result<T, AuthError>;

/// One node's key material for one VM.
#[derive(Clone)]
pub struct NodeKeys {
    me: NodeId,
    private: StaticSecret,
    pubs: Vec<PublicKey>,
    session: [u8; SESSION_SIZE],
    protection: Protection,
}

impl std::fmt::Debug for NodeKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NodeKeys(node {}, {} public keys, {})",
            self.me,
            self.pubs.len(),
            self.protection.as_str()
        )
    }
}

impl NodeKeys {
    /// Node `me`'s keys: its private key, every node's public key (index = node)
    /// and the VM's session id. Refuses a private key that is not `pubs[me]`'s.
    pub fn new(
        me: NodeId,
        private: [u8; 32],
        pubs: &[[u8; 32]],
        session: [u8; SESSION_SIZE],
        protection: Protection,
    ) -> Result<NodeKeys> {
        let private = StaticSecret::from(private);
        let own = pubs.get(usize::from(me)).ok_or(AuthError::NoKey {
            me: usize::from(me),
            n: pubs.len(),
        })?;
        if PublicKey::from(&private).as_bytes() != own {
            return Err(AuthError::KeyMismatch);
        }
        Ok(NodeKeys {
            me,
            private,
            pubs: pubs.iter().map(|p| PublicKey::from(*p)).collect(),
            session,
            protection,
        })
    }

    /// Fresh random keys for `n` nodes of one VM (tests, single-process tools).
    pub fn generate(n: usize, protection: Protection) -> Result<Vec<NodeKeys>> {
        let mut privs = Vec::with_capacity(n);
        for _ in 0..n {
            let mut k = [0u8; 32];
            random_bytes(&mut k).map_err(AuthError::Random)?;
            privs.push(k);
        }
        let pubs: Vec<[u8; 32]> = privs.iter().map(public_key).collect();
        let mut session = [0u8; SESSION_SIZE];
        random_bytes(&mut session).map_err(AuthError::Random)?;
        privs
            .into_iter()
            .enumerate()
            .map(|(i, k)| {
                let me = NodeId::try_from(i).map_err(|_| AuthError::Refused("too many nodes"))?;
                NodeKeys::new(me, k, &pubs, session, protection)
            })
            .collect()
    }

    /// The same keys with another protection mode (tests of the mode check).
    pub fn with_protection(mut self, protection: Protection) -> NodeKeys {
        self.protection = protection;
        self
    }

    /// The VM's session id (public), in hex: names the VM's shared segments.
    pub fn session_hex(&self) -> String {
        self.session.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Number of nodes.
    pub fn nodes(&self) -> usize {
        self.pubs.len()
    }

    /// This node's index.
    pub fn me(&self) -> NodeId {
        self.me
    }

    /// The data plane's protection mode.
    pub fn protection(&self) -> Protection {
        self.protection
    }

    /// Mac key and the two direction keys of one connection.
    fn derive(&self, peer: NodeId, nc: &[u8], ns: &[u8], id: &[u8]) -> Result<[u8; 96]> {
        let pk = self
            .pubs
            .get(usize::from(peer))
            .ok_or(AuthError::Refused("unknown node id"))?;
        let shared = self.private.diffie_hellman(pk);
        if !shared.was_contributory() {
            return Err(AuthError::Refused("peer public key is of low order"));
        }
        let hk = Hkdf::<Sha256>::new(Some(&self.session), shared.as_bytes());
        let mut okm = [0u8; 96];
        hk.expand_multi_info(
            &[b"dvmm-link-v2", nc, ns, id, &[self.protection.code()]],
            &mut okm,
        )
        .map_err(|_| AuthError::Refused("key derivation"))?;
        Ok(okm)
    }
}

/// A stream a handshake can run on (TCP for the mesh, a unix socket for the
/// shared-memory transport's doorbell).
pub trait HandshakeIo: Read + Write {
    /// Read and write timeouts (None: block).
    fn set_timeouts(&self, t: Option<Duration>) -> std::io::Result<()>;
}

impl HandshakeIo for TcpStream {
    fn set_timeouts(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
}

impl HandshakeIo for UnixStream {
    fn set_timeouts(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
}

/// The X25519 public key of a private key.
pub fn public_key(private: &[u8; 32]) -> [u8; 32] {
    PublicKey::from(&StaticSecret::from(*private)).to_bytes()
}

/// The sealed halves of an authenticated connection.
#[derive(Debug)]
pub struct Session {
    pub tx: Sealer,
    pub rx: Opener,
}

fn session(okm: &[u8; 96], connector: bool, mode: Protection) -> Session {
    let mut c2a = [0u8; KEY_SIZE];
    let mut a2c = [0u8; KEY_SIZE];
    c2a.copy_from_slice(&okm[32..64]);
    a2c.copy_from_slice(&okm[64..96]);
    let (tx, rx) = if connector { (c2a, a2c) } else { (a2c, c2a) };
    Session {
        tx: Sealer::new(mode, &tx),
        rx: Opener::new(mode, &rx),
    }
}

fn mac(key: &[u8], label: &[u8]) -> [u8; MAC] {
    let mut m = match <Hmac<Sha256> as KeyInit>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes any key length"),
    };
    m.update(label);
    let mut out = [0u8; MAC];
    out.copy_from_slice(&m.finalize().into_bytes());
    out
}

fn verify(key: &[u8], label: &[u8], tag: &[u8]) -> bool {
    let Ok(mut m) = <Hmac<Sha256> as KeyInit>::new_from_slice(key) else {
        return false;
    };
    m.update(label);
    m.verify_slice(tag).is_ok()
}

/// Fill a buffer with random bytes from the kernel.
pub fn random_bytes(buf: &mut [u8]) -> std::io::Result<()> {
    Ok(getrandom::fill(buf)?)
}

fn nonce() -> Result<[u8; NONCE]> {
    let mut n = [0u8; NONCE];
    random_bytes(&mut n).map_err(AuthError::Random)?;
    Ok(n)
}

fn send<S: HandshakeIo>(s: &mut S, f: &Frame, seq: u64) -> Result<()> {
    let mut out = Vec::new();
    wire::encode(f, seq, &mut out);
    s.write_all(&out)?;
    Ok(())
}

fn recv<S: HandshakeIo>(s: &mut S, dec: &mut Decoder) -> Result<Frame> {
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

fn read_exact<S: HandshakeIo>(s: &mut S, buf: &mut [u8]) -> Result<()> {
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

/// Connector side. Returns the connection's sealed halves once the acceptor
/// has authenticated us and we it.
pub fn connect<S: HandshakeIo>(
    s: &mut S,
    keys: &NodeKeys,
    peer: NodeId,
    lane: u8,
    timeout: Duration,
) -> Result<Session> {
    s.set_timeouts(Some(timeout))?;
    let me = keys.me;
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
    let (aid, mode, p) = auth_frame(recv(s, &mut dec)?, ty::CHALLENGE)?;
    if p.len() != NONCE + MAC {
        return Err(AuthError::Refused("bad challenge length"));
    }
    if aid != u64::from(peer) {
        return Err(AuthError::Refused("peer is not the expected node"));
    }
    let theirs = Protection::from_code(mode).ok_or(AuthError::Refused("bad protection mode"))?;
    if theirs != keys.protection {
        return Err(AuthError::Mode {
            peer: theirs.as_str(),
            mine: keys.protection.as_str(),
        });
    }
    let (ns, maca) = p.split_at(NONCE);
    let okm = keys.derive(peer, &nc, ns, &ids(me, peer, lane))?;
    if !verify(&okm[..32], b"dvmm-a", maca) {
        return Err(AuthError::Refused(
            "acceptor does not hold the key for this link",
        ));
    }
    send(
        s,
        &Frame::Auth {
            ty: ty::RESPONSE,
            arg0: 0,
            arg1: 0,
            payload: mac(&okm[..32], b"dvmm-c").to_vec(),
        },
        1,
    )?;
    auth_frame(recv(s, &mut dec)?, ty::AUTH_OK)?;
    s.set_timeouts(None)?;
    Ok(session(&okm, true, keys.protection))
}

/// Acceptor side. Returns the authenticated peer's node id and lane, and the
/// connection's sealed halves. `check` validates the claimed identity before
/// any key-dependent reply.
pub fn accept<S: HandshakeIo>(
    s: &mut S,
    keys: &NodeKeys,
    timeout: Duration,
    check: &dyn Fn(NodeId, u8) -> bool,
) -> Result<(NodeId, u8, Session)> {
    s.set_timeouts(Some(timeout))?;
    let me = keys.me;
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
    let okm = keys.derive(cid, &nc, &ns, &ids(cid, me, lane))?;
    let mut p = ns.to_vec();
    p.extend_from_slice(&mac(&okm[..32], b"dvmm-a"));
    send(
        s,
        &Frame::Auth {
            ty: ty::CHALLENGE,
            arg0: u64::from(me),
            arg1: u64::from(keys.protection.code()),
            payload: p,
        },
        0,
    )?;
    let (_, _, macc) = auth_frame(recv(s, &mut dec)?, ty::RESPONSE)?;
    if !verify(&okm[..32], b"dvmm-c", &macc) {
        return Err(AuthError::Refused(
            "connector does not hold the key for this link",
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
    s.set_timeouts(None)?;
    Ok((cid, lane, session(&okm, false, keys.protection)))
}
