//! A shared-memory transport for nodes of one VM that run on the same host.
//!
//! Each node keeps its own copy of guest memory (as over TCP); only the
//! messages move through shared memory. Every pair of nodes shares one segment
//! (a file in `/dev/shm`, mode 0600, unlinked as soon as both ends have mapped
//! it) holding four single-producer/single-consumer byte rings: a control and
//! a bulk lane in each direction, so a fault request never waits behind page
//! transfers. A ring carries the same sealed records as a TCP connection
//! (`seal`: every frame encrypted and authenticated with per-lane keys from the
//! same handshake), so a page never lies in the segment in clear by default.
//!
//! A unix socket per pair (abstract namespace, named after the VM's session)
//! runs the handshake and then serves as the *doorbell*: a reader about to
//! sleep sets its ring's `sleeping` flag and waits in epoll on the socket; a
//! writer that finds the flag set clears it and writes one byte. A reader that
//! polls (the engine spinning) costs the writer no system call. The socket's
//! EOF is also how a peer's death shows; silence beyond `dead_after` (a frozen
//! peer) is caught with keep-alives as on TCP.
//!
//! The node with the higher index creates the segment and dials the lower one.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use super::auth::{self, NodeKeys, Session, FIRST_DATA_SEQ};
use super::protocol::{Msg, NodeId, RangeMsg};
use super::seal::Sealer;
use super::transport::{
    epoll_add, new_eventfd, register_extra, Lane, Transport, TransportError, TransportEvent,
    EXTRA_TOKEN, KICK_TOKEN,
};
use super::wire::{self, Decoder, Frame, Landing, Limits, PageSource, RangeFrames, WireError};
use crate::sync::lock;
use vmm_sys_util::epoll::{Epoll, EpollEvent};
use vmm_sys_util::eventfd::EventFd;

type Result<T> = std::result::Result<T, TransportError>;

/// Bytes of one ring's data area (a power of two).
pub const RING_BYTES: usize = 1 << 20;
/// Bytes of a ring's header (producer and consumer lines).
const HEADER: usize = 128;
const RINGS_PER_PAIR: usize = 4;
const SEGMENT: usize = RINGS_PER_PAIR * (HEADER + RING_BYTES);

/// Configuration of a shared-memory mesh.
#[derive(Debug, Clone)]
pub struct ShmConfig {
    /// This node's keys (also give the node count and the session).
    pub keys: NodeKeys,
    /// Directory of the segments (tmpfs).
    pub dir: PathBuf,
    /// Give up forming the mesh after this long.
    pub connect_deadline: Duration,
    /// A peer silent for this long is declared down.
    pub dead_after: Duration,
    /// Validation limits for received frames.
    pub limits: Limits,
}

/// A mapped segment.
struct Segment {
    base: *mut u8,
}

// SAFETY: the mapping is plain shared memory; every access to it goes through
// the atomics of a ring header or through a ring's data area, which one
// producer (holding the Tx lock) writes and one consumer (holding the Rx lock)
// reads, ordered by those atomics.
unsafe impl Send for Segment {}
// SAFETY: as above.
unsafe impl Sync for Segment {}

impl Drop for Segment {
    fn drop(&mut self) {
        // SAFETY: base/SEGMENT is the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.base.cast(), SEGMENT) };
    }
}

fn map(file: &File) -> Result<Segment> {
    // SAFETY: a fresh shared mapping of a file we hold, of its full size.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            SEGMENT,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(Segment { base: p.cast() })
}

/// One SPSC ring inside a segment.
struct Ring {
    /// Producer position (bytes ever written).
    tail: *const AtomicU64,
    /// Consumer position (bytes ever read).
    head: *const AtomicU64,
    /// The consumer is (about to be) asleep: ring its doorbell.
    sleeping: *const AtomicU32,
    data: *mut u8,
}

// SAFETY: the pointers address the shared segment, which outlives the ring
// (both live in the same `Pair`); see `Segment`.
unsafe impl Send for Ring {}
// SAFETY: as above.
unsafe impl Sync for Ring {}

impl Ring {
    /// Ring `k` of segment `seg`.
    fn new(seg: &Segment, k: usize) -> Ring {
        // SAFETY: k < RINGS_PER_PAIR, so the offsets stay inside the mapping;
        // the header fields are 8-byte aligned (the mapping is page-aligned).
        unsafe {
            let base = seg.base.add(k * (HEADER + RING_BYTES));
            Ring {
                tail: base.cast(),
                head: base.add(64).cast(),
                sleeping: base.add(72).cast(),
                data: base.add(HEADER),
            }
        }
    }

    fn tail(&self) -> &AtomicU64 {
        // SAFETY: see `Ring`: a valid, aligned atomic in the live mapping.
        unsafe { &*self.tail }
    }
    fn head(&self) -> &AtomicU64 {
        // SAFETY: as above.
        unsafe { &*self.head }
    }
    fn sleeping(&self) -> &AtomicU32 {
        // SAFETY: as above.
        unsafe { &*self.sleeping }
    }

    /// Producer: copy as much of `bytes` as fits; returns how much.
    fn push(&self, bytes: &[u8]) -> usize {
        let tail = self.tail().load(Ordering::Relaxed);
        let head = self.head().load(Ordering::Acquire);
        let free = RING_BYTES - (tail - head) as usize;
        let n = bytes.len().min(free);
        if n == 0 {
            return 0;
        }
        let at = (tail as usize) & (RING_BYTES - 1);
        let first = n.min(RING_BYTES - at);
        // SAFETY: [at, at+first) and [0, n-first) lie inside the data area and
        // are free (the consumer has read them: head <= tail - (RING_BYTES - free)).
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.data.add(at), first);
            std::ptr::copy_nonoverlapping(bytes.as_ptr().add(first), self.data, n - first);
        }
        self.tail().store(tail + n as u64, Ordering::Release);
        n
    }

    /// Consumer: hand what is there to `sink`; returns the byte count.
    fn drain(&self, sink: &mut dyn FnMut(&[u8])) -> usize {
        let head = self.head().load(Ordering::Relaxed);
        let tail = self.tail().load(Ordering::Acquire);
        let n = (tail - head) as usize;
        if n == 0 {
            return 0;
        }
        let at = (head as usize) & (RING_BYTES - 1);
        let first = n.min(RING_BYTES - at);
        // SAFETY: the producer published [head, tail) (Release/Acquire on tail)
        // and does not touch it until head moves past it.
        unsafe {
            sink(std::slice::from_raw_parts(self.data.add(at), first));
            if n > first {
                sink(std::slice::from_raw_parts(self.data, n - first));
            }
        }
        self.head().store(tail, Ordering::Release);
        n
    }

    fn is_empty(&self) -> bool {
        self.tail().load(Ordering::Acquire) == self.head().load(Ordering::Relaxed)
    }
}

struct Tx {
    sealer: Sealer,
    seq: u64,
    /// Sealed bytes that did not fit in the ring yet.
    pending: Vec<u8>,
    last: Instant,
}

struct Rx {
    dec: Decoder,
}

/// The link to one peer.
struct Pair {
    peer: NodeId,
    _seg: Segment,
    sock: UnixStream,
    /// Rings we write, per lane.
    out: [Ring; 2],
    /// Rings we read, per lane.
    inn: [Ring; 2],
    tx: [Mutex<Tx>; 2],
    rx: [Mutex<Rx>; 2],
    last_rx: Mutex<Instant>,
    down: AtomicBool,
}

impl Pair {
    /// Write what fits of `tx.pending`; ring the doorbell if the reader sleeps.
    fn flush(&self, lane: usize, tx: &mut Tx) -> std::io::Result<()> {
        if tx.pending.is_empty() {
            return Ok(());
        }
        let n = self.out[lane].push(&tx.pending);
        tx.pending.drain(..n);
        if n > 0 {
            fence(Ordering::SeqCst);
            if self.out[lane].sleeping().swap(0, Ordering::SeqCst) != 0 {
                match (&self.sock).write(&[1u8]) {
                    Ok(_) => {}
                    // A full socket buffer already holds a wake-up.
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }
}

/// The shared-memory mesh.
pub struct ShmMesh {
    me: NodeId,
    n: usize,
    /// `pairs[peer]`; None for self.
    pairs: Vec<Option<Pair>>,
    epoll: Epoll,
    kick: EventFd,
    extra: Mutex<Vec<RawFd>>,
    dead_after: Duration,
    next_house: Mutex<Instant>,
    down_reported: AtomicU64,
    /// Copies of page contents on the send side, in pages: two per page (the
    /// encoding into the lane's pending buffer, then into the ring).
    tx_page_copies: AtomicU64,
}

fn sock_name(session: &str, node: NodeId) -> String {
    format!("dvmm-shm-{session}-{node}")
}

fn seg_path(dir: &std::path::Path, session: &str, lo: NodeId, hi: NodeId) -> PathBuf {
    dir.join(format!("dvmm-{session}-{lo}-{hi}"))
}

/// Rings of a pair as seen by one side: the lower node writes rings 0 and 1.
fn rings(seg: &Segment, lower: bool) -> ([Ring; 2], [Ring; 2]) {
    let (o, i) = if lower { (0, 2) } else { (2, 0) };
    (
        [Ring::new(seg, o), Ring::new(seg, o + 1)],
        [Ring::new(seg, i), Ring::new(seg, i + 1)],
    )
}

impl ShmMesh {
    /// Form the mesh with every other node of the VM (same host).
    pub fn connect(cfg: &ShmConfig) -> Result<ShmMesh> {
        let keys = &cfg.keys;
        let me = keys.me();
        let n = keys.nodes();
        let session = keys.session_hex();
        let deadline = Instant::now() + cfg.connect_deadline;
        let hs = Duration::from_secs(2).min(cfg.connect_deadline);
        let name = UnixAddr::from_abstract_name(sock_name(&session, me).as_bytes())?;
        let listener = UnixListener::bind_addr(&name)?;
        listener.set_nonblocking(true)?;
        let mut pairs: Vec<Option<Pair>> = (0..n).map(|_| None).collect();
        // Dial every lower node (creating our pair's segment), then accept the higher ones.
        for peer in 0..me {
            let path = seg_path(&cfg.dir, &session, peer, me);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            file.set_len(SEGMENT as u64)?;
            let seg = map(&file)?;
            let addr = UnixAddr::from_abstract_name(sock_name(&session, peer).as_bytes())?;
            let mut sock = loop {
                match UnixStream::connect_addr(&addr) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() >= deadline => {
                        let _ = std::fs::remove_file(&path);
                        return Err(TransportError::Doorbell {
                            node: peer,
                            last: e,
                        });
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            };
            let mut sessions = Vec::new();
            for lane in [Lane::Control, Lane::Bulk] {
                let s = auth::connect(&mut sock, keys, peer, lane as u8, hs).map_err(|err| {
                    // Not joined: leave nothing behind in the segment directory.
                    let _ = std::fs::remove_file(&path);
                    TransportError::Auth { node: peer, err }
                })?;
                sessions.push(s);
            }
            pairs[usize::from(peer)] = Some(Self::pair(peer, seg, sock, sessions, false, cfg)?);
        }
        let mut missing = n - usize::from(me) - 1;
        while missing > 0 {
            if Instant::now() >= deadline {
                let who = (usize::from(me) + 1..n).find(|&i| pairs[i].is_none());
                return Err(TransportError::AcceptTimeout(who.unwrap_or(0) as NodeId));
            }
            let mut sock = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    thread::sleep(Duration::from_millis(2));
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            sock.set_nonblocking(false)?;
            // Any higher node not yet joined, control lane first, then bulk.
            let mut sessions = Vec::new();
            let mut who: Option<NodeId> = None;
            for lane in [Lane::Control, Lane::Bulk] {
                let taken = |node: NodeId| pairs.get(usize::from(node)).is_none_or(Option::is_some);
                let check = |node: NodeId, l: u8| {
                    node > me && !taken(node) && l == lane as u8 && who.is_none_or(|w| w == node)
                };
                match auth::accept(&mut sock, keys, hs, &check) {
                    Ok((node, _, s)) => {
                        who = Some(node);
                        sessions.push(s);
                    }
                    Err(e) => {
                        eprintln!("dvmm-dsm: refusing shared-memory peer: {e}");
                        break;
                    }
                }
            }
            let Some(peer) = who.filter(|_| sessions.len() == 2) else {
                continue;
            };
            let path = seg_path(&cfg.dir, &session, me, peer);
            let file = OpenOptions::new().read(true).write(true).open(&path)?;
            let seg = map(&file)?;
            // Both ends have it mapped: nothing else may find it.
            std::fs::remove_file(&path)?;
            pairs[usize::from(peer)] = Some(Self::pair(peer, seg, sock, sessions, true, cfg)?);
            missing -= 1;
        }
        let kick = new_eventfd()?;
        let epoll = Epoll::new()?;
        for p in pairs.iter().flatten() {
            epoll_add(&epoll, p.sock.as_raw_fd(), u64::from(p.peer))?;
        }
        epoll_add(&epoll, kick.as_raw_fd(), KICK_TOKEN)?;
        Ok(ShmMesh {
            me,
            n,
            pairs,
            epoll,
            kick,
            extra: Mutex::new(Vec::new()),
            dead_after: cfg.dead_after,
            next_house: Mutex::new(Instant::now()),
            down_reported: AtomicU64::new(0),
            tx_page_copies: AtomicU64::new(0),
        })
    }

    fn pair(
        peer: NodeId,
        seg: Segment,
        sock: UnixStream,
        sessions: Vec<Session>,
        lower: bool,
        cfg: &ShmConfig,
    ) -> Result<Pair> {
        sock.set_nonblocking(true)?;
        let (out, inn) = rings(&seg, lower);
        let mut it = sessions.into_iter();
        let (Some(c), Some(b)) = (it.next(), it.next()) else {
            return Err(TransportError::Config("two lanes per pair"));
        };
        let now = Instant::now();
        let tx = |s: Sealer| {
            Mutex::new(Tx {
                sealer: s,
                seq: FIRST_DATA_SEQ,
                pending: Vec::new(),
                last: now,
            })
        };
        let rx = |o| {
            Mutex::new(Rx {
                dec: Decoder::sealed(cfg.limits, FIRST_DATA_SEQ, o),
            })
        };
        Ok(Pair {
            peer,
            _seg: seg,
            sock,
            out,
            inn,
            tx: [tx(c.tx), tx(b.tx)],
            rx: [rx(c.rx), rx(b.rx)],
            last_rx: Mutex::new(now),
            down: AtomicBool::new(false),
        })
    }

    fn pair_of(&self, to: NodeId) -> Result<&Pair> {
        match self.pairs.get(usize::from(to)) {
            Some(Some(p)) => Ok(p),
            _ => Err(TransportError::BadNode(to)),
        }
    }

    fn kick(&self) {
        // Fails only if the counter would overflow: then a wake-up is pending anyway.
        let _ = self.kick.write(1);
    }

    /// Queue `frames` encoded frames (`enc(i, seq, out)` writes frame i) on
    /// one lane, back to back (one lock: a range message's train stays
    /// contiguous), and write what fits into the ring.
    fn send_encoded(
        &self,
        to: NodeId,
        lane: Lane,
        frames: usize,
        enc: &dyn Fn(usize, u64, &mut Vec<u8>),
    ) -> Result<()> {
        let p = self.pair_of(to)?;
        if p.down.load(Ordering::Relaxed) {
            return Err(TransportError::PeerDown(to));
        }
        let l = lane as usize;
        let mut tx = lock(&p.tx[l]);
        for i in 0..frames {
            let seq = tx.seq;
            tx.seq += 1;
            let Tx {
                sealer, pending, ..
            } = &mut *tx;
            sealer.seal_into(seq, pending, &|seq, out| enc(i, seq, out))?;
        }
        tx.last = Instant::now();
        if let Err(e) = p.flush(l, &mut tx) {
            p.down.store(true, Ordering::Relaxed);
            return Err(e.into());
        }
        if !tx.pending.is_empty() {
            // The ring is full: the poller retries as the reader makes room.
            drop(tx);
            self.kick();
        }
        Ok(())
    }

    fn report_down(&self, node: NodeId, reason: String, events: &mut Vec<TransportEvent>) {
        let bit = 1u64 << node;
        if self.down_reported.fetch_or(bit, Ordering::Relaxed) & bit == 0 {
            events.push(TransportEvent::PeerDown { node, reason });
        }
    }

    fn down(&self, p: &Pair, reason: String, events: &mut Vec<TransportEvent>) {
        if !p.down.swap(true, Ordering::Relaxed) {
            // SAFETY: removing an fd from our epoll set; a null event is allowed.
            unsafe {
                libc::epoll_ctl(
                    self.epoll.as_raw_fd(),
                    libc::EPOLL_CTL_DEL,
                    p.sock.as_raw_fd(),
                    std::ptr::null_mut(),
                )
            };
        }
        self.report_down(p.peer, reason, events);
    }

    /// Read every ring; returns whether anything arrived.
    fn read_rings(&self, events: &mut Vec<TransportEvent>, land: Option<&dyn Landing>) -> bool {
        let mut got = false;
        for p in self.pairs.iter().flatten() {
            if p.down.load(Ordering::Relaxed) {
                continue;
            }
            for (l, lane) in [Lane::Control, Lane::Bulk].into_iter().enumerate() {
                let mut rx = lock(&p.rx[l]);
                let n = p.inn[l].drain(&mut |b| rx.dec.push(b));
                if n == 0 {
                    continue;
                }
                got = true;
                *lock(&p.last_rx) = Instant::now();
                loop {
                    match rx.dec.next_landed(land) {
                        Ok(Some((Frame::Ping, _))) => {}
                        Ok(Some((Frame::Auth { ty, .. }, _))) => {
                            let r = WireError::Unexpected(ty).to_string();
                            drop(rx);
                            self.down(p, r, events);
                            break;
                        }
                        Ok(Some((frame, landed))) => {
                            events.push(TransportEvent::received(p.peer, lane, frame, landed))
                        }
                        Ok(None) => break,
                        Err(e) => {
                            drop(rx);
                            self.down(p, format!("malformed frame: {e}"), events);
                            break;
                        }
                    }
                }
            }
        }
        got
    }

    /// Pending bytes into the rings; keep-alives and the silence check.
    fn housekeeping(&self, events: &mut Vec<TransportEvent>) -> bool {
        let mut pending = false;
        let now = Instant::now();
        let house = {
            let mut next = lock(&self.next_house);
            let due = now >= *next;
            if due {
                *next = now + self.dead_after / 32;
            }
            due
        };
        for p in self.pairs.iter().flatten() {
            if p.down.load(Ordering::Relaxed) {
                continue;
            }
            for l in 0..2 {
                let mut tx = lock(&p.tx[l]);
                if house && l == 0 && now.duration_since(tx.last) >= self.dead_after / 8 {
                    let seq = tx.seq;
                    tx.seq += 1;
                    let Tx {
                        sealer, pending, ..
                    } = &mut *tx;
                    if sealer
                        .seal_into(seq, pending, &|s, o| wire::encode(&Frame::Ping, s, o))
                        .is_ok()
                    {
                        tx.last = now;
                    }
                }
                if let Err(e) = p.flush(l, &mut tx) {
                    drop(tx);
                    self.down(p, format!("doorbell failed: {e}"), events);
                    break;
                }
                pending |= !tx.pending.is_empty();
            }
            if house {
                let silent = now.duration_since(*lock(&p.last_rx));
                if silent > self.dead_after {
                    let r = format!("no traffic for {} ms", silent.as_millis());
                    self.down(p, r, events);
                }
            }
        }
        pending
    }

    fn set_sleeping(&self, on: bool) {
        for p in self.pairs.iter().flatten() {
            for r in &p.inn {
                r.sleeping().store(u32::from(on), Ordering::SeqCst);
            }
        }
    }

    fn any_ready(&self) -> bool {
        self.pairs
            .iter()
            .flatten()
            .any(|p| !p.down.load(Ordering::Relaxed) && p.inn.iter().any(|r| !r.is_empty()))
    }
}

impl ShmMesh {
    /// `poll`, landing pages with `land` if given.
    fn poll_inner(
        &self,
        timeout: Option<Duration>,
        extra: &[RawFd],
        events: &mut Vec<TransportEvent>,
        land: Option<&dyn Landing>,
    ) -> Result<u64> {
        register_extra(&self.epoll, &self.extra, extra)?;
        let pending = self.housekeeping(events);
        if self.read_rings(events, land) || !events.is_empty() {
            return Ok(0);
        }
        // Sleep only with the flags up and the rings still empty (a writer that
        // published before seeing the flag is caught by the re-check). A poll
        // that must not wait (the engine spinning) raises no flag, so writers
        // need no doorbell while it spins.
        let nap = !matches!(timeout, Some(t) if t.is_zero());
        if nap {
            self.set_sleeping(true);
            fence(Ordering::SeqCst);
        }
        let mut ready = 0u64;
        if !nap || !self.any_ready() {
            let mut ms: i32 = match timeout {
                None => -1,
                Some(t) => i32::try_from(t.as_micros().div_ceil(1000)).unwrap_or(i32::MAX),
            };
            // Bytes waiting for room, and keep-alives, need regular turns.
            let house = i32::try_from((self.dead_after / 32).as_millis()).unwrap_or(i32::MAX);
            let cap = if pending { 1 } else { house.max(1) };
            if ms < 0 || ms > cap {
                ms = cap;
            }
            if !nap {
                ms = 0;
            }
            let mut evs = [EpollEvent::default(); 16];
            let k = match self.epoll.wait(ms, &mut evs) {
                Ok(k) => k,
                Err(e) if e.kind() == ErrorKind::Interrupted => 0,
                Err(e) => {
                    self.set_sleeping(false);
                    return Err(e.into());
                }
            };
            for ev in &evs[..k] {
                let t = ev.data();
                if t == KICK_TOKEN {
                    let _ = self.kick.read();
                } else if t >= EXTRA_TOKEN {
                    let bit = t - EXTRA_TOKEN;
                    if bit < 64 {
                        ready |= 1 << bit;
                    }
                } else if let Ok(Some(p)) =
                    NodeId::try_from(t).map(|n| self.pairs[usize::from(n)].as_ref())
                {
                    let mut buf = [0u8; 64];
                    match (&p.sock).read(&mut buf) {
                        Ok(0) => self.down(p, "connection closed by peer (EOF)".into(), events),
                        Ok(_) => {}
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                        Err(e) => self.down(p, format!("doorbell failed: {e}"), events),
                    }
                }
            }
        }
        if nap {
            self.set_sleeping(false);
        }
        self.read_rings(events, land);
        Ok(ready)
    }
}

impl Transport for ShmMesh {
    fn me(&self) -> NodeId {
        self.me
    }

    fn nodes(&self) -> usize {
        self.n
    }

    fn send(&self, to: NodeId, lane: Lane, frame: &Frame) -> Result<()> {
        if let Frame::Range { msg, data } = frame {
            return self.send_range(to, msg, data.as_deref().unwrap_or(&[]));
        }
        self.send_encoded(to, lane, 1, &|_, seq, out| wire::encode(frame, seq, out))
    }

    fn send_range(&self, to: NodeId, msg: &RangeMsg, pages: &[u8]) -> Result<()> {
        self.send_range_from(to, msg, &pages)
    }

    fn send_range_from(&self, to: NodeId, msg: &RangeMsg, pages: &dyn PageSource) -> Result<()> {
        let train = RangeFrames::from_source(msg, pages)?;
        let lane = if train.is_bulk() {
            Lane::Bulk
        } else {
            Lane::Control
        };
        self.send_encoded(to, lane, train.len(), &|i, seq, out| {
            train.encode(i, seq, out)
        })?;
        // Into the pending buffer (encoding), then into the ring.
        let pages = (pages.bytes() / wire::PAGE_SIZE) as u64;
        self.tx_page_copies.fetch_add(2 * pages, Ordering::Relaxed);
        Ok(())
    }

    fn page_copies(&self) -> u64 {
        let rx: u64 = self
            .pairs
            .iter()
            .flatten()
            .flat_map(|p| p.rx.iter())
            .map(|r| lock(r).dec.page_copies())
            .sum();
        rx + self.tx_page_copies.load(Ordering::Relaxed)
    }

    fn send_msg(&self, to: NodeId, msg: &Msg, data: Option<&[u8]>) -> Result<()> {
        self.send_msg_from(to, msg, data.as_ref().map(|d| d as &dyn PageSource))
    }

    fn send_msg_from(&self, to: NodeId, msg: &Msg, data: Option<&dyn PageSource>) -> Result<()> {
        let lane = if msg.is_bulk() {
            Lane::Bulk
        } else {
            Lane::Control
        };
        wire::check_msg_from(msg, data)?;
        self.send_encoded(to, lane, 1, &|_, seq, out| {
            wire::encode_msg_from(msg, data, seq, out)
        })?;
        if data.is_some() {
            self.tx_page_copies.fetch_add(2, Ordering::Relaxed);
        }
        Ok(())
    }

    fn poll(
        &self,
        timeout: Option<Duration>,
        extra: &[RawFd],
        events: &mut Vec<TransportEvent>,
    ) -> Result<u64> {
        self.poll_inner(timeout, extra, events, None)
    }

    fn poll_landing(
        &self,
        timeout: Option<Duration>,
        extra: &[RawFd],
        events: &mut Vec<TransportEvent>,
        land: &dyn Landing,
    ) -> Result<u64> {
        self.poll_inner(timeout, extra, events, Some(land))
    }

    fn shutdown(&self) {
        for p in self.pairs.iter().flatten() {
            p.down.store(true, Ordering::Relaxed);
            let _ = p.sock.shutdown(std::net::Shutdown::Both);
        }
    }

    fn flush(&self) {
        let mut ev = Vec::new();
        self.housekeeping(&mut ev);
    }
}
