//! Transports between nodes: the [`Transport`] trait and a TCP mesh.
//!
//! Every pair of nodes is joined by two authenticated TCP connections
//! (`TCP_NODELAY`): the *control* lane carries small messages (fault requests,
//! invalidations, grants without data, application messages) and the *bulk*
//! lane carries page data, so a fault request never waits behind page
//! transfers. The receive side reads a bounded amount per connection per poll
//! round, so a busy bulk lane cannot starve the control lane either.
//!
//! The node with the higher index connects to the lower one (with retry and
//! backoff until a deadline); the acceptor authenticates every connection
//! (see `auth`) and drops a bad one with a logged reason while it keeps
//! waiting for the real peers.
//!
//! Sockets are non-blocking. Any thread may send: a frame is written directly
//! when the connection's queue is empty, else queued and flushed by the polling
//! thread (woken through an eventfd). One thread (the engine) polls; it can
//! include its own file descriptors (the userfaultfd) in the same `poll`.
//! Coherence messages sent by the polling thread itself are only queued and go
//! out with one write per connection when it polls next (end of its loop turn):
//! the several messages one turn produces cost one syscall, not one each.
//! The poll set is one epoll instance registered once (connections, the kick
//! eventfd, the caller's extra fds); keep-alives and the silence check run on
//! a timer, not on every turn, so a turn touches only the connections that
//! have something to do.
//! A peer is declared down on EOF, on a socket error, on a malformed frame, or
//! after `dead_after` without any traffic (keep-alives are sent every
//! `dead_after / 8` on idle connections).

use std::io::{ErrorKind, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::auth::{self, AuthError, NodeKeys, Session, FIRST_DATA_SEQ};
use super::protocol::{Msg, NodeId, RangeMsg};
use super::seal::{SealError, Sealer};
use super::wire::{self, Decoder, Frame, Landing, Limits, PageSource, RangeFrames, WireError};
use crate::sync::lock;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("node {node} at {addr} not reachable within the deadline: {last}")]
    Connect {
        node: NodeId,
        addr: SocketAddr,
        #[source]
        last: std::io::Error,
    },
    #[error("node {node}: shared-memory doorbell not reachable within the deadline: {last}")]
    Doorbell {
        node: NodeId,
        #[source]
        last: std::io::Error,
    },
    #[error("node {0} did not connect within the deadline")]
    AcceptTimeout(NodeId),
    #[error("cannot listen on {addr}: {err}")]
    Listen {
        addr: SocketAddr,
        #[source]
        err: std::io::Error,
    },
    #[error("node {0} is down")]
    PeerDown(NodeId),
    #[error("bad node index {0}")]
    BadNode(NodeId),
    #[error("authentication with node {node}: {err}")]
    Auth {
        node: NodeId,
        #[source]
        err: AuthError,
    },
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("invalid configuration: {0}")]
    Config(&'static str),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    Seal(#[from] SealError),
}

type Result<T> = std::result::Result<T, TransportError>;

/// The two lanes between each pair of nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    Control = 0,
    Bulk = 1,
}

impl Lane {
    fn from_u8(v: u8) -> Option<Lane> {
        match v {
            0 => Some(Lane::Control),
            1 => Some(Lane::Bulk),
            _ => None,
        }
    }
}

/// Something that happened on the transport.
#[derive(Debug)]
pub enum TransportEvent {
    /// A frame from a peer.
    Frame {
        from: NodeId,
        lane: Lane,
        frame: Frame,
    },
    /// A frame whose pages of data landed in place (see [`Landing`]): a
    /// grant's "pages arrived at" completion; its `data` is `None`.
    Landed { from: NodeId, frame: Frame },
    /// The peer is gone (EOF, reset, malformed traffic, silence); the reason
    /// names what happened. Reported once per node.
    PeerDown { node: NodeId, reason: String },
}

impl TransportEvent {
    /// The event for a frame decoded from `from` on `lane`: `Landed` if its
    /// pages landed in place (see `Decoder::next_landed`), else `Frame`.
    pub fn received(from: NodeId, lane: Lane, frame: Frame, landed: bool) -> TransportEvent {
        if landed {
            TransportEvent::Landed { from, frame }
        } else {
            TransportEvent::Frame { from, lane, frame }
        }
    }
}

/// A message transport between the nodes of one VM. Implementations: the TCP
/// mesh here; a shared-memory ring (co-located nodes) or RDMA could be added.
pub trait Transport: Send + Sync {
    /// This node's index.
    fn me(&self) -> NodeId;
    /// Number of nodes.
    fn nodes(&self) -> usize;
    /// Send a frame (any thread). Never blocks on the network.
    fn send(&self, to: NodeId, lane: Lane, frame: &Frame) -> Result<()>;
    /// Send a coherence message; a page grant goes on the bulk lane with `data`.
    fn send_msg(&self, to: NodeId, msg: &Msg, data: Option<&[u8]>) -> Result<()>;
    /// Send a range message; `pages` are the contents of a range grant's
    /// `Data::Page` pages in slot order (4 KiB each; empty otherwise). The
    /// frames of the message go out back to back on one lane (see `wire`'s
    /// "Range messages"). A transport that cannot carry them says so.
    fn send_range(&self, to: NodeId, msg: &RangeMsg, pages: &[u8]) -> Result<()> {
        let _ = (to, msg, pages);
        Err(TransportError::Config(
            "this transport carries no range messages",
        ))
    }
    /// Send a coherence message whose page (a grant's `Data::Page`) the
    /// transport copies straight from `data` (guest memory) into its buffer.
    /// The default copies it out first (transports of tests).
    fn send_msg_from(&self, to: NodeId, msg: &Msg, data: Option<&dyn PageSource>) -> Result<()> {
        let bytes = data.map(wire::copy_out);
        self.send_msg(to, msg, bytes.as_deref())
    }
    /// Send a range message whose pages of data the transport copies straight
    /// from `pages` (guest memory). The default copies them out first.
    fn send_range_from(&self, to: NodeId, msg: &RangeMsg, pages: &dyn PageSource) -> Result<()> {
        self.send_range(to, msg, &wire::copy_out(pages))
    }
    /// Wait up to `timeout` (None: forever) for traffic or for one of the
    /// `extra` fds to become readable; appends events. Returns a bitmask of the
    /// readable `extra` fds. Only one thread may poll.
    fn poll(
        &self,
        timeout: Option<Duration>,
        extra: &[RawFd],
        events: &mut Vec<TransportEvent>,
    ) -> Result<u64>;
    /// [`Transport::poll`], writing the contents of pages `land` awaits
    /// straight into guest memory (reported as [`TransportEvent::Landed`]).
    /// The default does not land anything.
    fn poll_landing(
        &self,
        timeout: Option<Duration>,
        extra: &[RawFd],
        events: &mut Vec<TransportEvent>,
        land: &dyn Landing,
    ) -> Result<u64> {
        let _ = land;
        self.poll(timeout, extra, events)
    }
    /// Close every connection.
    fn shutdown(&self);
    /// Signal thread `tid` with signal `sig` whenever traffic arrives (`Some((tid,
    /// sig))`), or stop doing so (`None`): lets a vCPU thread serve the transport
    /// when it is interrupted instead of waking another thread. A transport that
    /// cannot signal keeps the default (nothing), and its poller serves as usual.
    fn set_signal_owner(&self, _owner: Option<(i32, i32)>) -> Result<()> {
        Ok(())
    }
    /// Write what the polling thread queued (a thread that served one turn and
    /// will not poll again soon calls this; the poller's next poll does it too).
    fn flush(&self) {}
    /// User-space copies of page contents the transport made so far, in
    /// pages, both directions (see `StatsSnapshot::page_copies`).
    fn page_copies(&self) -> u64 {
        0
    }
}

/// Configuration of a TCP mesh.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    pub me: NodeId,
    pub addrs: Vec<SocketAddr>,
    /// This node's keys for this VM (`keys.me()` is this node).
    pub keys: NodeKeys,
    /// Give up forming the mesh after this long.
    pub connect_deadline: Duration,
    /// A peer silent for this long is declared down.
    pub dead_after: Duration,
    /// Validation limits for received frames.
    pub limits: Limits,
}

struct Tx {
    sealer: Sealer,
    buf: Vec<u8>,
    off: usize,
    seq: u64,
    last: Instant,
}

struct Rx {
    dec: Decoder,
    last: Instant,
}

struct Conn {
    peer: NodeId,
    lane: Lane,
    stream: TcpStream,
    tx: Mutex<Tx>,
    rx: Mutex<Rx>,
    down: AtomicBool,
    reason: Mutex<Option<String>>,
    /// Bytes are queued in `tx` (written by the poller's next flush).
    queued: AtomicBool,
    /// Registered for EPOLLOUT (the socket refused part of the queue).
    want_out: AtomicBool,
}

impl Conn {
    fn new(
        peer: NodeId,
        lane: Lane,
        stream: TcpStream,
        limits: Limits,
        session: Session,
    ) -> Result<Conn> {
        stream.set_nodelay(true)?;
        stream.set_nonblocking(true)?;
        thin_linear_timeouts(&stream);
        let now = Instant::now();
        Ok(Conn {
            peer,
            lane,
            stream,
            tx: Mutex::new(Tx {
                sealer: session.tx,
                buf: Vec::with_capacity(64 * 1024),
                off: 0,
                seq: FIRST_DATA_SEQ,
                last: now,
            }),
            rx: Mutex::new(Rx {
                dec: Decoder::sealed(limits, FIRST_DATA_SEQ, session.rx),
                last: now,
            }),
            down: AtomicBool::new(false),
            reason: Mutex::new(None),
            queued: AtomicBool::new(false),
            want_out: AtomicBool::new(false),
        })
    }

    /// Write as much of the queue as the socket takes. Returns whether bytes
    /// remain queued.
    fn flush(&self, tx: &mut Tx) -> std::io::Result<bool> {
        while tx.off < tx.buf.len() {
            match (&self.stream).write(&tx.buf[tx.off..]) {
                Ok(0) => return Err(std::io::Error::from(ErrorKind::WriteZero)),
                Ok(n) => tx.off += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(true),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        tx.buf.clear();
        tx.off = 0;
        Ok(false)
    }
}

/// `TCP_THIN_LINEAR_TIMEOUTS` (linux/tcp.h; not in the libc crate for Linux).
const TCP_THIN_LINEAR_TIMEOUTS: libc::c_int = 16;

/// Retransmit with linear, not exponential, back-off while the stream is thin
/// (few packets in flight, as ours mostly are): after a network outage shorter
/// than `dead_after` the next retransmission comes within ~RTO instead of
/// after a doubled timeout that can exceed `dead_after` by itself (a 2 s outage
/// otherwise stopped the VM at a 3 s limit). Best effort: an older kernel
/// without it keeps the default back-off.
fn thin_linear_timeouts(s: &TcpStream) {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt on a socket we own with a pointer to a live c_int and its size.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            TCP_THIN_LINEAR_TIMEOUTS,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

impl Tx {
    /// Queue frame number `tx.seq`, written by `enc`, sealed.
    fn push(&mut self, enc: &dyn Fn(u64, &mut Vec<u8>)) -> std::result::Result<(), SealError> {
        let seq = self.seq;
        self.seq += 1;
        self.sealer.seal_into(seq, &mut self.buf, enc)
    }
}

/// What `send_encoded` queues: one frame, or a range message's train (each
/// frame sealed on its own, all under one lock of the lane so nothing comes
/// between them).
enum Frames<'a> {
    One(&'a dyn Fn(u64, &mut Vec<u8>)),
    Train(&'a RangeFrames<'a>),
}

impl Frames<'_> {
    fn push(&self, tx: &mut Tx) -> std::result::Result<(), SealError> {
        match self {
            Frames::One(enc) => tx.push(*enc),
            Frames::Train(t) => {
                for i in 0..t.len() {
                    tx.push(&|seq, out| t.encode(i, seq, out))?;
                }
                Ok(())
            }
        }
    }
}

/// A full mesh of TCP connections between the nodes.
pub struct TcpMesh {
    me: NodeId,
    n: usize,
    /// `conns[peer][lane]`; None for self.
    conns: Vec<Option<[Arc<Conn>; 2]>>,
    /// Every connection; the index is its epoll token.
    flat: Vec<Arc<Conn>>,
    kick: EventFd,
    epoll: Epoll,
    /// The extra fds registered in `epoll` (tokens `EXTRA_TOKEN + k`).
    extra: Mutex<Vec<RawFd>>,
    /// Some connection has queued bytes.
    any_queued: AtomicBool,
    /// Identity of the thread that polls (see [`thread_tag`]); 0: none yet.
    poller: AtomicUsize,
    /// Next keep-alive / silence check.
    next_house: Mutex<Instant>,
    dead_after: Duration,
    down_reported: AtomicU64,
    closed: Arc<AtomicBool>,
    /// Pages of contents encoded into send buffers (one copy each).
    tx_page_copies: AtomicU64,
}

/// `fcntl` commands and `struct f_owner_ex` (linux/fcntl.h; not in the libc crate).
const F_SETSIG: libc::c_int = 10;
const F_SETOWN_EX: libc::c_int = 15;
const F_OWNER_TID: libc::c_int = 0;
#[repr(C)]
struct FOwnerEx {
    kind: libc::c_int,
    pid: libc::pid_t,
}

/// epoll token of the kick eventfd; extra fd k has `EXTRA_TOKEN + k`.
pub(super) const KICK_TOKEN: u64 = 1 << 32;
pub(super) const EXTRA_TOKEN: u64 = KICK_TOKEN + 1;

thread_local! {
    static TAG: u8 = const { 0 };
}

/// A number that identifies the calling thread (the address of a thread-local).
fn thread_tag() -> usize {
    TAG.with(|t| t as *const u8 as usize)
}

/// Watch `fd` for input in `ep`, reported with `token`.
pub(super) fn epoll_add(ep: &Epoll, fd: RawFd, token: u64) -> Result<()> {
    ep.ctl(
        ControlOperation::Add,
        fd,
        EpollEvent::new(EventSet::IN, token),
    )?;
    Ok(())
}

/// A fresh non-blocking, close-on-exec eventfd (a poller's kick).
pub(super) fn new_eventfd() -> Result<EventFd> {
    Ok(EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)?)
}

/// Wait up to `timeout` for events of `ep` (`epoll_pwait2`: the engine's poll
/// deadlines are sub-millisecond, which `Epoll::wait`'s whole milliseconds
/// cannot express). Returns how many entries of `evs` were filled; EINTR is 0.
pub(super) fn epoll_wait_ns(
    ep: &Epoll,
    evs: &mut [EpollEvent],
    timeout: Duration,
) -> std::io::Result<usize> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `EpollEvent` is `repr(transparent)` over `libc::epoll_event`, so
    // `evs` is a valid, writable array of `evs.len()` epoll_events; `ts` is a
    // valid timespec; a null sigmask means no signal mask change.
    let r = unsafe {
        libc::epoll_pwait2(
            ep.as_raw_fd(),
            evs.as_mut_ptr().cast::<libc::epoll_event>(),
            evs.len().min(i32::MAX as usize) as libc::c_int,
            &ts,
            std::ptr::null(),
        )
    };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(e);
    }
    Ok(r as usize)
}

/// Register the poller's extra fds in `ep` (tokens `EXTRA_TOKEN + k`), once;
/// again only if they change. `reg` holds what is registered now.
pub(super) fn register_extra(ep: &Epoll, reg: &Mutex<Vec<RawFd>>, extra: &[RawFd]) -> Result<()> {
    let mut reg = lock(reg);
    if reg.as_slice() == extra {
        return Ok(());
    }
    for &fd in reg.iter() {
        let _ = ep.ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }
    reg.clear();
    for (k, &fd) in extra.iter().enumerate() {
        epoll_add(ep, fd, EXTRA_TOKEN + k as u64)?;
        reg.push(fd);
    }
    Ok(())
}

/// Accept and refuse every connection after the mesh is formed (until `closed`):
/// a foreign or garbage-sending peer gets a logged refusal, never a session.
fn refuse_loop(listener: TcpListener, keys: &NodeKeys, closed: &AtomicBool) {
    while !closed.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((mut s, from)) => {
                let _ = s.set_nonblocking(false);
                let why =
                    match auth::accept(&mut s, keys, Duration::from_millis(500), &|_, _| false) {
                        Ok(_) => "the mesh is already formed".to_string(),
                        Err(e) => e.to_string(),
                    };
                log(&format!("refusing connection from {from}: {why}"));
                let _ = s.shutdown(Shutdown::Both);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(20)),
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn log(msg: &str) {
    eprintln!("dvmm-dsm: {msg}");
}

fn backoff_connect(addr: SocketAddr, node: NodeId, deadline: Instant) -> Result<TcpStream> {
    let mut wait = Duration::from_millis(5);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let err = match TcpStream::connect_timeout(&addr, left.max(Duration::from_millis(1))) {
            Ok(s) => return Ok(s),
            Err(e) => e,
        };
        if Instant::now() + wait >= deadline {
            return Err(TransportError::Connect {
                node,
                addr,
                last: err,
            });
        }
        thread::sleep(wait);
        wait = (wait * 2).min(Duration::from_millis(200));
    }
}

impl TcpMesh {
    /// Form the mesh: listen on our address, connect to every lower-index node,
    /// accept every higher-index node, authenticating each connection.
    pub fn connect(cfg: &MeshConfig) -> Result<TcpMesh> {
        let n = cfg.addrs.len();
        let me = cfg.keys.me();
        if me != cfg.me {
            return Err(TransportError::Config("keys of another node"));
        }
        if n == 0 || usize::from(me) >= n || n > super::protocol::MAX_NODES {
            return Err(TransportError::Config("node index out of range"));
        }
        let deadline = Instant::now() + cfg.connect_deadline;
        let listen_addr = cfg.addrs[usize::from(me)];
        let listener = TcpListener::bind(listen_addr).map_err(|err| TransportError::Listen {
            addr: listen_addr,
            err,
        })?;
        listener.set_nonblocking(true)?;
        let expect_from: Vec<NodeId> = ((me + 1)..n as NodeId).collect();
        let keys = cfg.keys.clone();
        let hs_timeout = Duration::from_secs(2).min(cfg.connect_deadline);
        // Accept in a thread while we connect to the lower nodes.
        let acceptor = thread::Builder::new()
            .name("dsm-accept".into())
            .spawn(move || {
                let mut got: Vec<(NodeId, Lane, TcpStream, Session)> = Vec::new();
                let want = expect_from.len() * 2;
                while got.len() < want {
                    if Instant::now() >= deadline {
                        let missing = expect_from
                            .iter()
                            .find(|n| got.iter().filter(|g| g.0 == **n).count() < 2)
                            .copied()
                            .unwrap_or(0);
                        return Err(TransportError::AcceptTimeout(missing));
                    }
                    let (mut s, from) = match listener.accept() {
                        Ok(x) => x,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(2));
                            continue;
                        }
                        Err(e) => return Err(TransportError::Io(e)),
                    };
                    if let Err(e) = s.set_nonblocking(false) {
                        log(&format!("dropping connection from {from}: {e}"));
                        continue;
                    }
                    let taken: Vec<(NodeId, u8)> = got.iter().map(|g| (g.0, g.1 as u8)).collect();
                    let check = |node: NodeId, lane: u8| {
                        node > me
                            && usize::from(node) < n
                            && Lane::from_u8(lane).is_some()
                            && !taken.contains(&(node, lane))
                    };
                    match auth::accept(&mut s, &keys, hs_timeout, &check) {
                        Ok((node, lane, session)) => {
                            let lane = Lane::from_u8(lane).unwrap_or(Lane::Control);
                            got.push((node, lane, s, session));
                        }
                        Err(e) => {
                            log(&format!("refusing connection from {from}: {e}"));
                            let _ = s.shutdown(Shutdown::Both);
                        }
                    }
                }
                Ok((got, listener))
            })?;
        let mut conns: Vec<Option<[Arc<Conn>; 2]>> = (0..n).map(|_| None).collect();
        let mut result = Ok(());
        'outer: for peer in 0..me {
            let mut pair = Vec::new();
            for lane in [Lane::Control, Lane::Bulk] {
                let addr = cfg.addrs[usize::from(peer)];
                let mut s = match backoff_connect(addr, peer, deadline) {
                    Ok(s) => s,
                    Err(e) => {
                        result = Err(e);
                        break 'outer;
                    }
                };
                let left = deadline.saturating_duration_since(Instant::now());
                let session = match auth::connect(
                    &mut s,
                    &cfg.keys,
                    peer,
                    lane as u8,
                    left.clamp(Duration::from_millis(100), hs_timeout),
                ) {
                    Ok(session) => session,
                    Err(err) => {
                        result = Err(TransportError::Auth { node: peer, err });
                        break 'outer;
                    }
                };
                pair.push(Arc::new(Conn::new(peer, lane, s, cfg.limits, session)?));
            }
            if let [c, b] = &pair[..] {
                conns[usize::from(peer)] = Some([c.clone(), b.clone()]);
            }
        }
        let accepted = acceptor
            .join()
            .map_err(|_| TransportError::Config("acceptor thread panicked"))?;
        result?;
        let (mut accepted, listener) = accepted?;
        // Once the mesh is formed nobody else may join: keep the port open only to
        // refuse late or foreign connections with a logged reason.
        let closed = Arc::new(AtomicBool::new(false));
        {
            let closed = closed.clone();
            let keys = cfg.keys.clone();
            thread::Builder::new()
                .name("dsm-refuse".into())
                .spawn(move || refuse_loop(listener, &keys, &closed))?;
        }
        accepted.sort_by_key(|g| (g.0, g.1 as u8));
        let mut it = accepted.into_iter();
        while let (Some(c), Some(b)) = (it.next(), it.next()) {
            let peer = c.0;
            conns[usize::from(peer)] = Some([
                Arc::new(Conn::new(peer, Lane::Control, c.2, cfg.limits, c.3)?),
                Arc::new(Conn::new(peer, Lane::Bulk, b.2, cfg.limits, b.3)?),
            ]);
        }
        let kick = new_eventfd()?;
        let epoll = Epoll::new()?;
        let flat: Vec<Arc<Conn>> = conns
            .iter()
            .flatten()
            .flat_map(|p| p.iter().cloned())
            .collect();
        for (i, c) in flat.iter().enumerate() {
            epoll_add(&epoll, c.stream.as_raw_fd(), i as u64)?;
        }
        epoll_add(&epoll, kick.as_raw_fd(), KICK_TOKEN)?;
        Ok(TcpMesh {
            me,
            n,
            conns,
            flat,
            kick,
            epoll,
            extra: Mutex::new(Vec::new()),
            any_queued: AtomicBool::new(false),
            poller: AtomicUsize::new(0),
            next_house: Mutex::new(Instant::now()),
            dead_after: cfg.dead_after,
            down_reported: AtomicU64::new(0),
            closed,
            tx_page_copies: AtomicU64::new(0),
        })
    }

    /// Register for EPOLLOUT while bytes stay queued (called with `tx` held,
    /// so the registration matches the queue).
    fn set_want_out(&self, c: &Conn, want: bool) {
        if c.want_out.swap(want, Ordering::Relaxed) == want || c.down.load(Ordering::Relaxed) {
            return;
        }
        let Some(i) = self.flat.iter().position(|x| std::ptr::eq(&**x, c)) else {
            return;
        };
        let ev = if want {
            EventSet::IN | EventSet::OUT
        } else {
            EventSet::IN
        };
        // A failure here (fd already closed by shutdown) only loses a wake-up of a
        // connection that is going away.
        let _ = self.epoll.ctl(
            ControlOperation::Modify,
            c.stream.as_raw_fd(),
            EpollEvent::new(ev, i as u64),
        );
    }

    /// Write what `c` has queued; false when the connection failed. The failure is
    /// reported into `events` when given, else by the poller's next housekeeping
    /// (it reports every connection that went down, once).
    fn flush_conn(&self, c: &Conn, events: Option<&mut Vec<TransportEvent>>) -> bool {
        let mut tx = lock(&c.tx);
        match c.flush(&mut tx) {
            Ok(left) => {
                c.queued.store(left, Ordering::Relaxed);
                if left {
                    self.any_queued.store(true, Ordering::Relaxed);
                }
                self.set_want_out(c, left);
                true
            }
            Err(e) => {
                drop(tx);
                let r = format!("send failed: {e}");
                self.mark_down(c, &r);
                if let Some(events) = events {
                    self.report_down(c.peer, r, events);
                }
                false
            }
        }
    }

    /// Write every connection's queue (one write each), if anything is queued.
    fn flush_queued(&self, mut events: Option<&mut Vec<TransportEvent>>) {
        if !self.any_queued.swap(false, Ordering::Relaxed) {
            return;
        }
        for c in &self.flat {
            if c.queued.load(Ordering::Relaxed) && !c.down.load(Ordering::Relaxed) {
                self.flush_conn(c, events.as_deref_mut());
            }
        }
    }

    /// Keep-alives, the silence check and reports of connections that went down
    /// on another thread; run every `ping_every / 4`, not every turn.
    fn housekeeping(&self, now: Instant, events: &mut Vec<TransportEvent>) {
        let ping_every = self.dead_after / 8;
        for c in &self.flat {
            if c.down.load(Ordering::Relaxed) {
                if !self.closed.load(Ordering::Relaxed) {
                    let r = lock(&c.reason).clone().unwrap_or_default();
                    self.report_down(c.peer, r, events);
                }
                continue;
            }
            {
                let mut tx = lock(&c.tx);
                if tx.off == tx.buf.len() && now.duration_since(tx.last) >= ping_every {
                    if tx
                        .push(&|seq, out| wire::encode(&Frame::Ping, seq, out))
                        .is_err()
                    {
                        continue;
                    }
                    tx.last = now;
                    c.queued.store(true, Ordering::Relaxed);
                    self.any_queued.store(true, Ordering::Relaxed);
                }
            }
            let silent = now.duration_since(lock(&c.rx).last);
            if silent > self.dead_after {
                let r = format!("no traffic for {} ms", silent.as_millis());
                self.mark_down(c, &r);
                self.report_down(c.peer, r, events);
            }
        }
    }

    fn register_extra(&self, extra: &[RawFd]) -> Result<()> {
        register_extra(&self.epoll, &self.extra, extra)
    }

    fn conn(&self, to: NodeId, lane: Lane) -> Result<&Arc<Conn>> {
        match self.conns.get(usize::from(to)) {
            Some(Some(pair)) => Ok(&pair[lane as usize]),
            _ => Err(TransportError::BadNode(to)),
        }
    }

    fn kick(&self) {
        // Fails only if the counter would overflow: then a wake-up is pending anyway.
        let _ = self.kick.write(1);
    }

    /// Queue a frame; write it now unless `defer` (the poller flushes it on its
    /// next poll) or bytes are queued already (they go first).
    fn send_encoded(&self, to: NodeId, lane: Lane, defer: bool, frames: Frames) -> Result<()> {
        let c = self.conn(to, lane)?;
        if c.down.load(Ordering::Relaxed) {
            return Err(TransportError::PeerDown(to));
        }
        let mut tx = lock(&c.tx);
        let was_empty = tx.off == tx.buf.len();
        frames.push(&mut tx)?;
        tx.last = Instant::now();
        if !was_empty {
            return Ok(());
        }
        if defer {
            c.queued.store(true, Ordering::Relaxed);
            self.any_queued.store(true, Ordering::Relaxed);
            return Ok(());
        }
        match c.flush(&mut tx) {
            Ok(false) => Ok(()),
            Ok(true) => {
                c.queued.store(true, Ordering::Relaxed);
                self.any_queued.store(true, Ordering::Relaxed);
                self.set_want_out(c, true);
                drop(tx);
                self.kick();
                Ok(())
            }
            Err(e) => {
                drop(tx);
                self.mark_down(c, &format!("send failed: {e}"));
                Err(TransportError::PeerDown(to))
            }
        }
    }

    fn is_poller(&self) -> bool {
        self.poller.load(Ordering::Relaxed) == thread_tag()
    }

    fn mark_down(&self, c: &Conn, reason: &str) {
        if !c.down.swap(true, Ordering::Relaxed) {
            *lock(&c.reason) = Some(reason.to_string());
            log(&format!(
                "dropping {:?} connection to node {}: {reason}",
                c.lane, c.peer
            ));
            self.close_conn(c);
        }
        // The other lane goes down with it.
        if let Some(Some(pair)) = self.conns.get(usize::from(c.peer)) {
            for o in pair {
                if !o.down.swap(true, Ordering::Relaxed) {
                    *lock(&o.reason) = Some(reason.to_string());
                    self.close_conn(o);
                }
            }
        }
    }

    /// Leave the poll set (a shut-down socket is readable forever) and shut down.
    fn close_conn(&self, c: &Conn) {
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            c.stream.as_raw_fd(),
            EpollEvent::default(),
        );
        let _ = c.stream.shutdown(Shutdown::Both);
    }

    fn report_down(&self, node: NodeId, reason: String, events: &mut Vec<TransportEvent>) {
        let bit = 1u64 << node;
        if self.down_reported.fetch_or(bit, Ordering::Relaxed) & bit == 0 {
            events.push(TransportEvent::PeerDown { node, reason });
        }
    }

    /// Read what is available on one connection (bounded); returns an error
    /// reason if the connection must be dropped.
    fn read_conn(
        &self,
        c: &Conn,
        events: &mut Vec<TransportEvent>,
        land: Option<&dyn Landing>,
    ) -> std::result::Result<(), ConnDown> {
        let mut rx = lock(&c.rx);
        let mut budget: usize = 256 * 1024;
        while budget > 0 {
            // Straight into the decoder's buffer (see `Decoder::read_from`).
            match rx.dec.read_from(&mut &c.stream) {
                Ok(0) => return Err(ConnDown::Eof),
                Ok(k) => {
                    rx.last = Instant::now();
                    budget = budget.saturating_sub(k);
                    loop {
                        match rx.dec.next_landed(land) {
                            Ok(Some((Frame::Ping, _))) => {}
                            Ok(Some((Frame::Auth { ty, .. }, _))) => {
                                return Err(ConnDown::Unexpected(WireError::Unexpected(ty)))
                            }
                            Ok(Some((frame, landed))) => {
                                events.push(TransportEvent::received(c.peer, c.lane, frame, landed))
                            }
                            Ok(None) => break,
                            Err(e) => return Err(ConnDown::Malformed(e)),
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(ConnDown::Recv(e)),
            }
        }
        Ok(())
    }
}

/// Why a connection must be dropped (the reason its peer is reported down).
#[derive(Debug, thiserror::Error)]
enum ConnDown {
    #[error("connection closed by peer (EOF)")]
    Eof,
    #[error("{0}")]
    Unexpected(#[source] WireError),
    #[error("malformed frame: {0}")]
    Malformed(#[source] WireError),
    #[error("receive failed: {0}")]
    Recv(#[source] std::io::Error),
}

impl TcpMesh {
    /// `poll`, landing pages with `land` if given.
    fn poll_inner(
        &self,
        timeout: Option<Duration>,
        extra: &[RawFd],
        events: &mut Vec<TransportEvent>,
        land: Option<&dyn Landing>,
    ) -> Result<u64> {
        self.poller.store(thread_tag(), Ordering::Relaxed);
        self.register_extra(extra)?;
        let now = Instant::now();
        let house_every = (self.dead_after / 32).max(Duration::from_millis(1));
        let next_house = {
            let mut nh = lock(&self.next_house);
            if now >= *nh {
                *nh = now + house_every;
                drop(nh);
                self.housekeeping(now, events);
                now + house_every
            } else {
                *nh
            }
        };
        // One write per connection for everything queued since the last turn.
        self.flush_queued(Some(events));
        if !events.is_empty() {
            return Ok(0);
        }
        let until_house = next_house.saturating_duration_since(now);
        let t = match timeout {
            None => until_house,
            Some(t) => t.min(until_house),
        };
        const MAX_EVENTS: usize = 64;
        let mut evs = [EpollEvent::default(); MAX_EVENTS];
        let r = epoll_wait_ns(&self.epoll, &mut evs, t)?;
        let mut ready = 0u64;
        for ev in &evs[..r] {
            let (token, re) = (ev.data(), ev.events());
            if token == KICK_TOKEN {
                let _ = self.kick.read();
                // A sender left bytes queued: flush them now.
                self.flush_queued(Some(events));
                continue;
            }
            if token >= EXTRA_TOKEN {
                let k = token - EXTRA_TOKEN;
                if k < 64 {
                    ready |= 1 << k;
                }
                continue;
            }
            let Some(c) = self.flat.get(token as usize) else {
                continue;
            };
            if c.down.load(Ordering::Relaxed) {
                continue;
            }
            if re & libc::EPOLLOUT as u32 != 0 && !self.flush_conn(c, Some(events)) {
                continue;
            }
            if re & (libc::EPOLLIN | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0 {
                if let Err(down) = self.read_conn(c, events, land) {
                    let reason = down.to_string();
                    self.mark_down(c, &reason);
                    self.report_down(c.peer, reason, events);
                }
            }
        }
        Ok(ready)
    }
}

impl Transport for TcpMesh {
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
        let enc = |seq, out: &mut Vec<u8>| wire::encode(frame, seq, out);
        self.send_encoded(to, lane, false, Frames::One(&enc))
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
        let defer = self.is_poller();
        let enc = |seq, out: &mut Vec<u8>| wire::encode_msg_from(msg, data, seq, out);
        self.send_encoded(to, lane, defer, Frames::One(&enc))?;
        if data.is_some() {
            self.tx_page_copies.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn page_copies(&self) -> u64 {
        let rx: u64 = self
            .flat
            .iter()
            .map(|c| lock(&c.rx).dec.page_copies())
            .sum();
        rx + self.tx_page_copies.load(Ordering::Relaxed)
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
        let defer = self.is_poller();
        self.send_encoded(to, lane, defer, Frames::Train(&train))?;
        let pages = (pages.bytes() / wire::PAGE_SIZE) as u64;
        self.tx_page_copies.fetch_add(pages, Ordering::Relaxed);
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

    fn flush(&self) {
        self.flush_queued(None);
    }

    fn set_signal_owner(&self, owner: Option<(i32, i32)>) -> Result<()> {
        for c in &self.flat {
            let fd = c.stream.as_raw_fd();
            // SAFETY: fcntl on our own socket with plain integer arguments / a valid
            // f_owner_ex struct.
            unsafe {
                let fl = libc::fcntl(fd, libc::F_GETFL);
                if fl < 0 {
                    return Err(std::io::Error::last_os_error().into());
                }
                if let Some((tid, sig)) = owner {
                    let own = FOwnerEx {
                        kind: F_OWNER_TID,
                        pid: tid,
                    };
                    if libc::fcntl(fd, F_SETOWN_EX, &own) < 0
                        || libc::fcntl(fd, F_SETSIG, sig) < 0
                        || libc::fcntl(fd, libc::F_SETFL, fl | libc::O_ASYNC) < 0
                    {
                        return Err(std::io::Error::last_os_error().into());
                    }
                } else if libc::fcntl(fd, libc::F_SETFL, fl & !libc::O_ASYNC) < 0 {
                    return Err(std::io::Error::last_os_error().into());
                }
            }
        }
        Ok(())
    }

    fn shutdown(&self) {
        if self.closed.swap(true, Ordering::Relaxed) {
            return;
        }
        for pair in self.conns.iter().flatten() {
            for c in pair {
                // Push out what is queued (best effort), then close.
                {
                    let mut tx = lock(&c.tx);
                    let until = Instant::now() + Duration::from_millis(200);
                    while matches!(c.flush(&mut tx), Ok(true)) && Instant::now() < until {
                        thread::sleep(Duration::from_millis(1));
                    }
                }
                c.down.store(true, Ordering::Relaxed);
                let _ = c.stream.shutdown(Shutdown::Both);
            }
        }
    }
}

impl Drop for TcpMesh {
    fn drop(&mut self) {
        // Ends the refusing listener thread (and so frees the port).
        self.closed.store(true, Ordering::Relaxed);
    }
}
