//! The DSM engine driven through an in-process transport (no sockets): a test
//! plays the other node, sees exactly what the engine sends and feeds it the
//! replies. Covers what a real mesh cannot provoke on demand: side effects that
//! fail. A failed effect must stop the VM naming the page, and the effects after
//! it must not run — a failed `Drop` is never acknowledged (`InvAck`), a failed
//! `Install` is never reported `Done` — or the peers would go on believing this
//! node holds (or dropped) a page it does not.
//!
//! Needs userfaultfd (no KVM): plain host threads touch the "guest" mapping.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dvmm::dsm::auth::NodeKeys;
use dvmm::dsm::engine::ServiceMode;
use dvmm::dsm::protocol::{Access, Data, Msg, NodeId, RangeMsg};
use dvmm::dsm::seal::Protection;
use dvmm::dsm::transport::{Lane, Transport, TransportError, TransportEvent};
use dvmm::dsm::wire::{self, Frame};
use dvmm::dsm::{DsmConfig, DsmEngine, DsmHandle};

const PAGE: usize = 4096;
/// Pages homed on each of the two nodes.
const PER_NODE: usize = 4;

/// The other node, played by the test.
struct Fake {
    inbox: Mutex<VecDeque<TransportEvent>>,
    sent: Mutex<Vec<(NodeId, Msg)>>,
    closed: AtomicBool,
}

impl Fake {
    fn new() -> Arc<Fake> {
        Arc::new(Fake {
            inbox: Mutex::new(VecDeque::new()),
            sent: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
        })
    }

    fn deliver(&self, msg: Msg, data: Option<Vec<u8>>) {
        let lane = if msg.is_bulk() {
            Lane::Bulk
        } else {
            Lane::Control
        };
        self.inbox.lock().unwrap().push_back(TransportEvent::Frame {
            from: 0,
            lane,
            frame: Frame::Proto {
                msg,
                data: data.map(Vec::into_boxed_slice),
            },
        });
    }

    fn sent(&self) -> Vec<(NodeId, Msg)> {
        self.sent.lock().unwrap().clone()
    }

    /// Wait until the engine has sent a message `pred` accepts.
    fn wait_sent(&self, what: &str, pred: impl Fn(&Msg) -> bool) {
        let end = Instant::now() + Duration::from_secs(10);
        while !self.sent().iter().any(|(_, m)| pred(m)) {
            assert!(Instant::now() < end, "the engine never sent {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Transport for Fake {
    fn me(&self) -> NodeId {
        1
    }
    fn nodes(&self) -> usize {
        2
    }
    fn send(&self, _to: NodeId, _lane: Lane, _frame: &Frame) -> Result<(), TransportError> {
        Ok(())
    }
    fn send_msg(&self, to: NodeId, msg: &Msg, data: Option<&[u8]>) -> Result<(), TransportError> {
        wire::check_msg(msg, data)?;
        self.sent.lock().unwrap().push((to, *msg));
        Ok(())
    }
    fn send_range(&self, _to: NodeId, msg: &RangeMsg, pages: &[u8]) -> Result<(), TransportError> {
        // These tests play single-page traffic only; a range message is
        // checked (as a real transport would) and otherwise ignored.
        wire::RangeFrames::new(msg, pages)?;
        Ok(())
    }
    fn poll(
        &self,
        timeout: Option<Duration>,
        extra: &[RawFd],
        events: &mut Vec<TransportEvent>,
    ) -> Result<u64, TransportError> {
        events.extend(self.inbox.lock().unwrap().drain(..));
        let ms = if events.is_empty() && !self.closed.load(Ordering::Relaxed) {
            timeout.map_or(1, |t| t.as_millis().min(1) as i32)
        } else {
            0
        };
        let mut fds: Vec<libc::pollfd> = extra
            .iter()
            .map(|&fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: fds is a valid array of pollfd of the given length.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        let mut ready = 0;
        if r > 0 {
            for (k, p) in fds.iter().enumerate() {
                if p.revents != 0 {
                    ready |= 1 << k;
                }
            }
        }
        Ok(ready)
    }
    fn shutdown(&self) {
        self.closed.store(true, Ordering::Relaxed);
    }
}

struct Vm {
    memfd: RawFd,
    guest: usize,
    engine: usize,
}

/// A memfd of 2 x PER_NODE pages mapped twice (the guest's view, the engine's).
fn map_ram() -> Vm {
    let len = 2 * PER_NODE * PAGE;
    // SAFETY: plain syscalls creating and mapping a fresh memfd; results checked.
    unsafe {
        let fd = libc::memfd_create(c"dsm-effects".as_ptr(), libc::MFD_CLOEXEC);
        assert!(fd >= 0);
        assert_eq!(libc::ftruncate(fd, len as libc::off_t), 0);
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let g = libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, 0);
        let e = libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, 0);
        assert!(g != libc::MAP_FAILED && e != libc::MAP_FAILED);
        Vm {
            memfd: fd,
            guest: g as usize,
            engine: e as usize,
        }
    }
}

/// Node 1's engine over the fake; `memfd` is what the engine gets as the RAM fd.
fn start(vm: &Vm, memfd: RawFd, fake: &Arc<Fake>) -> DsmHandle {
    let addrs: Vec<SocketAddr> = vec![
        "127.0.0.1:1".parse().unwrap(),
        "127.0.0.1:2".parse().unwrap(),
    ];
    let b = (PER_NODE * PAGE) as u64;
    let mut cfg = DsmConfig::new(
        1,
        addrs,
        NodeKeys::generate(2, Protection::Encrypt)
            .expect("keys")
            .swap_remove(1),
        vec![0..b, b..2 * b],
        memfd,
        vm.guest,
        vm.engine,
    );
    cfg.service = ServiceMode::Legacy;
    let t: Arc<dyn Transport> = fake.clone();
    // SAFETY: both mappings cover the whole memfd and are never unmapped (leaked
    // for the life of the test process); the memfd stays open.
    unsafe { DsmEngine::start_with(cfg, t) }.expect("engine starts")
}

/// A host thread reading the first word of page 0 (homed on node 0) through
/// the guest mapping: it blocks in the userfaultfd until the engine resolves it.
fn reader(vm: &Vm) -> std::thread::JoinHandle<u64> {
    let addr = vm.guest;
    std::thread::spawn(move || {
        // SAFETY: the guest mapping is valid for the test's life; page 0 is inside.
        unsafe { std::ptr::read_volatile(addr as *const u64) }
    })
}

fn wait_error(dsm: &DsmHandle) -> String {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(e) = dsm.error() {
            return e;
        }
        assert!(Instant::now() < end, "the engine reported no error");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn grant(page: u64) -> Msg {
    Msg::Grant {
        page,
        access: Access::Read,
        version: 1,
        data: Data::Page,
    }
}

#[test]
fn failed_install_is_not_reported_done() {
    let vm = map_ram();
    let fake = Fake::new();
    let dsm = start(&vm, vm.memfd, &fake);
    let r = reader(&vm);
    fake.wait_sent("a read request for page 0", |m| {
        matches!(m, Msg::Req { page: 0, .. })
    });
    // Page 0 appears in the memfd behind the engine's back, so the grant's
    // UFFDIO_COPY finds it there (EEXIST): the install fails.
    // SAFETY: the engine mapping is valid and page 0 is inside it.
    unsafe { std::ptr::write_volatile(vm.engine as *mut u64, 0xbad) };
    fake.deliver(grant(0), Some(vec![7u8; PAGE]));
    let e = wait_error(&dsm);
    assert!(e.contains("page 0"), "{e}");
    std::thread::sleep(Duration::from_millis(50));
    let done: Vec<_> = fake
        .sent()
        .into_iter()
        .filter(|(_, m)| matches!(m, Msg::Done { .. }))
        .collect();
    assert!(
        done.is_empty(),
        "Done sent after a failed install: {done:?}"
    );
    // Closing the userfaultfd wakes the reader.
    dsm.release_memory();
    r.join().unwrap();
}

#[test]
fn failed_drop_is_not_acknowledged() {
    let vm = map_ram();
    // The engine gets a read-only descriptor of the memfd: mapping and copying
    // pages work (they use the mappings), punching a page out fails (EBADF).
    let ro = std::fs::File::open(format!("/proc/self/fd/{}", vm.memfd)).unwrap();
    let fake = Fake::new();
    let dsm = start(&vm, ro.as_raw_fd(), &fake);
    let r = reader(&vm);
    fake.wait_sent("a read request for page 0", |m| {
        matches!(m, Msg::Req { page: 0, .. })
    });
    let mut page = vec![0u8; PAGE];
    page[..8].copy_from_slice(&42u64.to_le_bytes());
    fake.deliver(grant(0), Some(page));
    assert_eq!(r.join().unwrap(), 42, "the reader sees the granted page");
    fake.wait_sent("Done for page 0", |m| matches!(m, Msg::Done { page: 0 }));
    assert!(dsm.error().is_none());
    fake.deliver(Msg::Inv { page: 0 }, None);
    let e = wait_error(&dsm);
    assert!(e.contains("page 0"), "{e}");
    std::thread::sleep(Duration::from_millis(50));
    let acks: Vec<_> = fake
        .sent()
        .into_iter()
        .filter(|(_, m)| matches!(m, Msg::InvAck { .. }))
        .collect();
    assert!(acks.is_empty(), "InvAck sent after a failed drop: {acks:?}");
    dsm.shutdown();
    drop(ro);
}
