//! userfaultfd on the guest mapping, plus the memfd operations of the engine.
//!
//! The `userfaultfd` crate creates the descriptor, registers the range
//! (MISSING, MINOR and WP), reads and parses the fault messages,
//! write-protects (UFFDIO_WRITEPROTECT) and wakes (UFFDIO_WAKE). Two ioctls are
//! issued directly because the crate offers them without their write-protect
//! mode: UFFDIO_COPY with `UFFDIO_COPY_MODE_WP` and UFFDIO_CONTINUE with
//! `UFFDIO_CONTINUE_MODE_WP` (Linux 6.3); mapping and write-protecting in one
//! ioctl is what keeps a shared copy from being writable, even briefly.
//!
//! How a page arrives: its contents *land in place* — the transport writes
//! them into the memfd with `pwrite` ([`GuestMem::land`]) while
//! the guest mapping still has no entry for the page — and then one
//! UFFDIO_CONTINUE per run of pages maps them for the guest
//! ([`GuestMem::map_landed`]) and wakes the faulting threads. A page is only
//! written while it is a hole that this node awaits (the engine's `Landing`
//! says which), so nothing the guest can see is ever overwritten. A guest
//! access in between is a MINOR fault (registered for that reason) and waits
//! like a MISSING one. Zero pages and pages a node sends itself are installed
//! with UFFDIO_COPY as before ([`GuestMem::install`]); finding the page
//! already there (EEXIST) is an error naming the page, never papered over by
//! replacing it. Invalidation is `fallocate(PUNCH_HOLE)` (frees the memory and
//! zaps every mapping); downgrade is UFFDIO_WRITEPROTECT.
//! Page contents are read through the engine's second mapping of the memfd,
//! only for pages this node holds, so the engine never faults on the guest
//! mapping and never allocates a hole by reading it.

use std::io::ErrorKind;
use std::os::fd::{AsRawFd, RawFd};

use super::wire::PageSource;
use userfaultfd::{Event, EventBuffer, FaultKind, ReadWrite, RegisterMode, Uffd, UffdBuilder};

pub const PAGE: usize = 4096;

/// Fault messages read per `read(2)` of the userfaultfd.
pub const FAULT_BATCH: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error("cannot create userfaultfd: {0}")]
    Create(#[source] userfaultfd::Error),
    #[error("cannot register the guest mapping: {0}")]
    Register(#[source] userfaultfd::Error),
    #[error("{op} at offset {offset:#x}: {err}")]
    Op {
        op: &'static str,
        offset: u64,
        #[source]
        err: std::io::Error,
    },
    #[error("reading fault events: {0}")]
    Read(#[source] std::io::Error),
    /// UFFDIO_COPY found the page already present. The protocol installs only
    /// into holes, so this is a coherence bug (or something populated guest
    /// memory behind the engine's back); overwriting would silently lose
    /// whatever the page holds, so the engine fails the VM instead.
    #[error(
        "page {page} (RAM offset {:#x}) is already present: refusing to install over it",
        page * PAGE as u64
    )]
    AlreadyPresent { page: u64 },
}

type Result<T> = std::result::Result<T, UffdError>;

// UFFDIO_COPY with its write-protect mode (include/uapi/linux/userfaultfd.h):
// not offered by the crate (see the module docs).
const UFFDIO_COPY: libc::c_ulong = 0xC028_AA03;
const UFFDIO_COPY_MODE_WP: u64 = 2;
// UFFDIO_CONTINUE with its write-protect mode (Linux 6.3; the installed
// headers may predate it).
const UFFDIO_CONTINUE: libc::c_ulong = 0xC020_AA07;
const UFFDIO_CONTINUE_MODE_WP: u64 = 2;

#[repr(C)]
struct UffdioContinue {
    start: u64,
    len: u64,
    mode: u64,
    mapped: i64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// A fault on the guest mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Page index (offset in guest RAM / 4096).
    pub page: u64,
    pub write: bool,
    /// Write to a write-protected page.
    pub wp: bool,
    /// The page is in the memfd but not mapped for the guest (landed, not yet
    /// mapped; or unmapped by the kernel).
    pub minor: bool,
}

/// Guest memory as the engine sees it: the userfaultfd on the guest mapping,
/// the engine mapping and the memfd.
pub struct GuestMem {
    uffd: Uffd,
    memfd: RawFd,
    guest: usize,
    engine: usize,
    len: usize,
}

// SAFETY: the raw addresses are only used with ioctls and copies on memory the
// caller guarantees stays mapped while this object lives (see `new`).
unsafe impl Send for GuestMem {}
// SAFETY: as above; all operations are system calls or reads of held pages.
unsafe impl Sync for GuestMem {}

/// A crate error as the `io::Error` of its errno (the crate's `Display` drops
/// the errno).
fn os_error(e: userfaultfd::Error) -> std::io::Error {
    match e {
        userfaultfd::Error::SystemError(n) | userfaultfd::Error::CopyFailed(n) => {
            std::io::Error::from_raw_os_error(n as i32)
        }
        other => std::io::Error::other(other),
    }
}

/// Run a crate ioctl, retrying when a signal interrupted it.
fn retry(f: impl Fn() -> userfaultfd::Result<()>) -> std::io::Result<()> {
    loop {
        match f().map_err(os_error) {
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            r => return r,
        }
    }
}

impl GuestMem {
    /// Register `guest..guest+len` (a MAP_SHARED mapping of `memfd` from offset
    /// 0) for MISSING, MINOR and WP faults.
    ///
    /// # Safety
    /// `guest` and `engine` must be page-aligned MAP_SHARED mappings of the whole
    /// `memfd` (`len` bytes from offset 0) that outlive this object, and `memfd`
    /// must stay open.
    pub unsafe fn new(memfd: RawFd, guest: *mut u8, engine: *mut u8, len: usize) -> Result<Self> {
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .create()
            .map_err(UffdError::Create)?;
        let mode = RegisterMode::MISSING | RegisterMode::MINOR | RegisterMode::WRITE_PROTECT;
        uffd.register_with_mode(guest.cast(), len, mode)
            .map_err(UffdError::Register)?;
        Ok(GuestMem {
            uffd,
            memfd,
            guest: guest as usize,
            engine: engine as usize,
            len,
        })
    }

    /// Unregister the guest mapping (wakes every blocked fault; later accesses
    /// no longer fault into the engine).
    pub fn release(&self) {
        let _ = self
            .uffd
            .unregister(self.guest as *mut libc::c_void, self.len);
    }

    /// The userfaultfd (for poll).
    pub fn fd(&self) -> RawFd {
        self.uffd.as_raw_fd()
    }

    /// A buffer for [`GuestMem::read_faults`] ([`FAULT_BATCH`] messages).
    pub fn fault_buffer() -> EventBuffer {
        EventBuffer::new(FAULT_BATCH)
    }

    /// Read pending faults (non-blocking) through `buf` (from
    /// [`GuestMem::fault_buffer`]).
    pub fn read_faults(&self, buf: &mut EventBuffer, out: &mut Vec<Fault>) -> Result<()> {
        loop {
            let events = match self.uffd.read_events(buf) {
                Ok(events) => events,
                // Nothing to read (the descriptor is non-blocking: EAGAIN is an
                // empty batch; EOF does not happen on a live userfaultfd).
                Err(userfaultfd::Error::ReadEof) => return Ok(()),
                Err(e) => {
                    let e = os_error(e);
                    if e.kind() == ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(UffdError::Read(e));
                }
            };
            let mut n = 0;
            for ev in events {
                n += 1;
                // Only page faults are enabled; anything else is skipped.
                let Ok(Event::Pagefault { kind, rw, addr, .. }) = ev else {
                    continue;
                };
                let a = addr as usize;
                if a < self.guest || a >= self.guest + self.len {
                    continue;
                }
                out.push(Fault {
                    page: ((a - self.guest) / PAGE) as u64,
                    write: rw == ReadWrite::Write,
                    wp: kind == FaultKind::WriteProtected,
                    minor: kind == FaultKind::Minor,
                });
            }
            if n < FAULT_BATCH {
                return Ok(());
            }
        }
    }

    fn gaddr(&self, page: u64) -> u64 {
        (self.guest + page as usize * PAGE) as u64
    }

    fn gptr(&self, page: u64) -> *mut libc::c_void {
        self.gaddr(page) as *mut libc::c_void
    }

    fn err(op: &'static str, page: u64, err: std::io::Error) -> UffdError {
        UffdError::Op {
            op,
            offset: page * PAGE as u64,
            err,
        }
    }

    /// Install `data` (4 KiB) into a hole; write-protected unless `writable`.
    /// Wakes the faulting threads. A page that is already present is an error
    /// ([`UffdError::AlreadyPresent`]), never overwritten: the protocol only
    /// installs into holes, and replacing the page would lose its contents.
    pub fn install(&self, page: u64, data: &[u8; PAGE], writable: bool) -> Result<()> {
        let mut c = UffdioCopy {
            dst: self.gaddr(page),
            src: data.as_ptr() as u64,
            len: PAGE as u64,
            mode: if writable { 0 } else { UFFDIO_COPY_MODE_WP },
            copy: 0,
        };
        loop {
            // SAFETY: `c` is a valid `struct uffdio_copy` for UFFDIO_COPY; `src`
            // is a live 4 KiB buffer and `dst` a page of the registered range.
            let r = unsafe { libc::ioctl(self.fd(), UFFDIO_COPY, &mut c as *mut UffdioCopy) };
            if r == 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EEXIST) => return Err(UffdError::AlreadyPresent { page }),
                _ => return Err(Self::err("UFFDIO_COPY", page, e)),
            }
        }
    }

    /// Write one page of received contents into the memfd (`pwrite`: the page
    /// cache page is allocated and filled in one step, without zeroing it
    /// first and without a page fault on a mapping), for a page that is a hole
    /// this node awaits (the engine's `Landing` checks that): the guest
    /// mapping has no entry for it, so nothing can see it before
    /// [`GuestMem::map_landed`].
    pub fn land(&self, page: u64, data: &[u8]) -> Result<()> {
        if data.len() != PAGE || (page as usize + 1) * PAGE > self.len {
            return Err(Self::err(
                "pwrite",
                page,
                std::io::Error::from(ErrorKind::InvalidInput),
            ));
        }
        let mut done = 0;
        while done < PAGE {
            // SAFETY: writes from a live buffer of PAGE - done bytes into our
            // memfd at an offset inside it (checked above); no memory of ours
            // is written.
            let r = unsafe {
                libc::pwrite(
                    self.memfd,
                    data[done..].as_ptr().cast(),
                    PAGE - done,
                    (page as usize * PAGE + done) as libc::off_t,
                )
            };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                return Err(Self::err("pwrite", page, e));
            }
            if r == 0 {
                return Err(Self::err("pwrite", page, ErrorKind::WriteZero.into()));
            }
            done += r as usize;
        }
        Ok(())
    }

    /// Map `count` landed pages from `first` for the guest (one
    /// UFFDIO_CONTINUE), write-protected unless `writable`, and wake the
    /// faulting threads. A page already mapped is an error
    /// ([`UffdError::AlreadyPresent`]).
    pub fn map_landed(&self, first: u64, count: u64, writable: bool) -> Result<()> {
        let mut c = UffdioContinue {
            start: self.gaddr(first),
            len: count * PAGE as u64,
            mode: if writable { 0 } else { UFFDIO_CONTINUE_MODE_WP },
            mapped: 0,
        };
        loop {
            // SAFETY: `c` is a valid `struct uffdio_continue`; the range lies in
            // the registered guest mapping.
            let r =
                unsafe { libc::ioctl(self.fd(), UFFDIO_CONTINUE, &mut c as *mut UffdioContinue) };
            if r == 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) if c.mapped > 0 => {
                    // Partly done: go on after what was mapped.
                    let done = c.mapped as u64;
                    c.start += done;
                    c.len -= done;
                    c.mapped = 0;
                }
                Some(libc::EEXIST) => {
                    return Err(UffdError::AlreadyPresent {
                        page: first + (c.start - self.gaddr(first)) / PAGE as u64,
                    })
                }
                _ => return Err(Self::err("UFFDIO_CONTINUE", first, e)),
            }
        }
    }

    /// Write-protect (or un-protect and wake) a present page.
    pub fn write_protect(&self, page: u64, protect: bool) -> Result<()> {
        let at = self.gptr(page);
        let r = if protect {
            retry(|| self.uffd.write_protect(at, PAGE))
        } else {
            retry(|| self.uffd.remove_write_protection(at, PAGE, true))
        };
        r.map_err(|e| Self::err("UFFDIO_WRITEPROTECT", page, e))
    }

    /// Wake threads waiting on a page.
    pub fn wake(&self, page: u64) -> Result<()> {
        retry(|| self.uffd.wake(self.gptr(page), PAGE))
            .map_err(|e| Self::err("UFFDIO_WAKE", page, e))
    }

    /// Drop a page: punch it out of the memfd (frees it, unmaps it everywhere).
    pub fn punch(&self, page: u64) -> Result<()> {
        let off = (page as usize * PAGE) as libc::off_t;
        // SAFETY: fallocate on our memfd; no memory is passed.
        let r = unsafe {
            libc::fallocate(
                self.memfd,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                PAGE as libc::off_t,
            )
        };
        if r != 0 {
            return Err(Self::err(
                "fallocate(PUNCH_HOLE)",
                page,
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// Copy a page this node holds (present) out through the engine mapping.
    ///
    /// The copy is made of volatile 8-byte loads: the page is guest memory, and
    /// although the protocol write-protects a page before it sends it, the
    /// compiler must not be allowed to assume the source cannot change under
    /// it (a plain copy of memory another thread writes is a data race, which
    /// the optimizer may exploit). Volatile aligned 8-byte loads are single
    /// `mov`s on x86-64: every word is a value some writer stored, and the
    /// loop costs a few hundred cycles per page.
    pub fn read_page(&self, page: u64, out: &mut [u8; PAGE]) {
        debug_assert!(page as usize * PAGE < self.len);
        let src = (self.engine + page as usize * PAGE) as *const u64;
        for (i, dst) in out.chunks_exact_mut(8).enumerate() {
            // SAFETY: the engine mapping covers the whole memfd and is page
            // aligned, so `src.add(i)` (i < 512) is an aligned u64 inside this
            // page; the page is present (the protocol only sends pages this node
            // holds), so reading it neither faults into userfaultfd nor
            // allocates. Volatile: see above.
            let w = unsafe { std::ptr::read_volatile(src.add(i)) };
            dst.copy_from_slice(&w.to_ne_bytes());
        }
    }

    /// Pages this node holds, as a [`PageSource`] a transport copies straight
    /// into its send buffer.
    pub fn held<'a>(&'a self, pages: &'a [u64]) -> HeldPages<'a> {
        HeldPages { mem: self, pages }
    }

    /// Number of pages of the memfd resident in memory (mincore on the engine
    /// mapping).
    pub fn resident_pages(&self) -> usize {
        let pages = self.len / PAGE;
        let mut v = vec![0u8; pages];
        // SAFETY: the engine mapping is `len` bytes; `v` has one byte per page.
        let r =
            unsafe { libc::mincore(self.engine as *mut libc::c_void, self.len, v.as_mut_ptr()) };
        if r != 0 {
            return 0;
        }
        v.iter().filter(|b| **b & 1 != 0).count()
    }

    /// Whether every page of `pages` (ascending) is a hole in the memfd (one
    /// mincore over their span): contents may only land where nothing is.
    pub fn are_holes(&self, pages: &[u64]) -> bool {
        let (Some(&first), Some(&last)) = (pages.first(), pages.last()) else {
            return true;
        };
        if last < first || (last as usize + 1) * PAGE > self.len {
            return false;
        }
        let n = (last - first + 1) as usize;
        // One message spans at most a range (512 pages): no allocation per
        // landed message on the receive path.
        let mut stack = [0u8; 512];
        let mut heap = Vec::new();
        let v: &mut [u8] = if n <= stack.len() {
            &mut stack[..n]
        } else {
            heap.resize(n, 0);
            &mut heap
        };
        // SAFETY: the span lies inside the engine mapping (checked above), which
        // is page aligned; `v` has one byte per page of the span.
        let r = unsafe {
            libc::mincore(
                (self.engine + first as usize * PAGE) as *mut libc::c_void,
                n * PAGE,
                v.as_mut_ptr(),
            )
        };
        r == 0 && pages.iter().all(|&p| v[(p - first) as usize] & 1 == 0)
    }

    /// Guest RAM size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Pages this node holds, read from the engine mapping when the transport
/// encodes them (see [`GuestMem::held`]).
pub struct HeldPages<'a> {
    mem: &'a GuestMem,
    pages: &'a [u64],
}

impl PageSource for HeldPages<'_> {
    fn bytes(&self) -> usize {
        self.pages.len() * PAGE
    }

    fn append_page(&self, i: usize, out: &mut Vec<u8>) {
        let at = out.len();
        out.resize(at + PAGE, 0);
        if let (Some(&page), Ok(dst)) = (
            self.pages.get(i),
            <&mut [u8; PAGE]>::try_from(&mut out[at..]),
        ) {
            self.mem.read_page(page, dst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;

    /// A memfd of `pages` pages mapped twice (guest view, engine view), as the
    /// VM sets guest RAM up; unmapped and closed on drop.
    struct Ram {
        fd: RawFd,
        guest: *mut u8,
        engine: *mut u8,
        len: usize,
    }

    // SAFETY: the mappings stay valid until `drop`, which runs after every
    // thread using them in these tests has been joined.
    unsafe impl Send for Ram {}
    // SAFETY: as above; concurrent access goes through atomics or volatile reads.
    unsafe impl Sync for Ram {}

    impl Ram {
        fn new(pages: usize) -> Ram {
            let len = pages * PAGE;
            // SAFETY: plain syscalls creating and mapping a fresh memfd; every
            // result is checked before use.
            unsafe {
                let fd = libc::memfd_create(c"uffd-test".as_ptr(), libc::MFD_CLOEXEC);
                assert!(fd >= 0);
                assert_eq!(libc::ftruncate(fd, len as libc::off_t), 0);
                let prot = libc::PROT_READ | libc::PROT_WRITE;
                let g = libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, 0);
                let e = libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, 0);
                assert!(g != libc::MAP_FAILED && e != libc::MAP_FAILED);
                Ram {
                    fd,
                    guest: g.cast(),
                    engine: e.cast(),
                    len,
                }
            }
        }

        fn mem(&self) -> GuestMem {
            // SAFETY: both mappings cover the whole memfd and outlive the
            // returned GuestMem (tests drop it before `self`).
            unsafe { GuestMem::new(self.fd, self.guest, self.engine, self.len) }
                .expect("userfaultfd")
        }

        /// Word `i` of page `page` through the guest mapping.
        fn guest_word(&self, page: usize, i: usize) -> &AtomicU64 {
            assert!(page * PAGE + i * 8 + 8 <= self.len);
            // SAFETY: in bounds (checked), 8-byte aligned (page-aligned base),
            // and the mapping lives as long as `self`.
            unsafe { &*(self.guest.add(page * PAGE + i * 8) as *const AtomicU64) }
        }
    }

    impl Drop for Ram {
        fn drop(&mut self) {
            // SAFETY: unmapping our own mappings and closing our own memfd;
            // nothing uses them any more.
            unsafe {
                libc::munmap(self.guest.cast(), self.len);
                libc::munmap(self.engine.cast(), self.len);
                libc::close(self.fd);
            }
        }
    }

    #[test]
    fn install_over_a_present_page_is_an_error_and_keeps_the_first_copy() {
        let ram = Ram::new(4);
        let mem = ram.mem();
        let first = [0xA5u8; PAGE];
        let second = [0x5Au8; PAGE];
        mem.install(2, &first, true).unwrap();
        for writable in [true, false] {
            match mem.install(2, &second, writable) {
                Err(UffdError::AlreadyPresent { page: 2 }) => {}
                r => panic!("second install: {r:?}"),
            }
        }
        let e = mem.install(2, &second, true).unwrap_err().to_string();
        assert!(e.contains("page 2") && e.contains("0x2000"), "{e}");
        // The first copy is intact, through both views.
        let mut out = [0u8; PAGE];
        mem.read_page(2, &mut out);
        assert!(out == first);
        assert_eq!(
            ram.guest_word(2, 17).load(Ordering::Relaxed),
            u64::MAX / 0xff * 0xA5
        );
        // A hole is still installable, and after a punch the page is again.
        mem.install(3, &second, false).unwrap();
        mem.punch(2).unwrap();
        mem.install(2, &second, true).unwrap();
        mem.read_page(2, &mut out);
        assert!(out == second);
        mem.release();
    }

    #[test]
    fn read_page_copies_the_page_exactly() {
        let ram = Ram::new(2);
        let mem = ram.mem();
        let mut data = [0u8; PAGE];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i * 7 + i / 256) as u8;
        }
        mem.install(1, &data, false).unwrap();
        // Into a destination that is not 8-byte aligned.
        let mut buf = vec![0u8; PAGE + 1];
        let out: &mut [u8; PAGE] = (&mut buf[1..]).try_into().unwrap();
        mem.read_page(1, out);
        assert!(*out == data);
        mem.release();
    }

    #[test]
    fn read_page_sees_whole_words_while_the_guest_writes() {
        let ram = Arc::new(Ram::new(1));
        let mem = ram.mem();
        mem.install(0, &[0u8; PAGE], true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (ram, stop) = (ram.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut k = 1u64;
                while !stop.load(Ordering::Relaxed) {
                    for i in 0..PAGE / 8 {
                        ram.guest_word(0, i).store(k << 32 | k, Ordering::Relaxed);
                    }
                    k = (k + 1) & 0xffff_ffff;
                }
            })
        };
        let mut out = [0u8; PAGE];
        let mut changed = 0;
        let mut last = 0u64;
        let end = std::time::Instant::now() + std::time::Duration::from_millis(200);
        while std::time::Instant::now() < end {
            mem.read_page(0, &mut out);
            for w in out.chunks_exact(8) {
                let v = u64::from_ne_bytes(w.try_into().unwrap());
                assert_eq!(v >> 32, v & 0xffff_ffff, "torn word {v:#x}");
            }
            let v0 = u64::from_ne_bytes(out[..8].try_into().unwrap());
            changed += usize::from(v0 != last);
            last = v0;
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        assert!(changed > 1, "the writer never ran");
        mem.release();
    }

    /// Wait (bounded) for the next fault on the userfaultfd.
    fn next_fault(mem: &GuestMem) -> Fault {
        let mut buf = GuestMem::fault_buffer();
        let mut out = Vec::new();
        for _ in 0..2000 {
            mem.read_faults(&mut buf, &mut out).unwrap();
            if let Some(f) = out.first() {
                return *f;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        panic!("no fault within 2 s");
    }

    #[test]
    fn landed_pages_wait_as_minor_faults_until_one_continue_maps_them() {
        let ram = Arc::new(Ram::new(4));
        let mem = ram.mem();
        let pattern = |k: u64| -> [u8; PAGE] {
            let mut d = [0u8; PAGE];
            for (i, w) in d.chunks_exact_mut(8).enumerate() {
                w.copy_from_slice(&(k << 32 | i as u64).to_ne_bytes());
            }
            d
        };
        mem.land(1, &pattern(1)).unwrap();
        mem.land(2, &pattern(2)).unwrap();
        // Landed but not mapped: a guest read is a MINOR fault and waits.
        let reader = {
            let ram = ram.clone();
            std::thread::spawn(move || ram.guest_word(1, 5).load(Ordering::Relaxed))
        };
        let f = next_fault(&mem);
        assert_eq!((f.page, f.minor, f.write, f.wp), (1, true, false, false));
        // One UFFDIO_CONTINUE maps both, write-protected, and wakes the reader.
        mem.map_landed(1, 2, false).unwrap();
        assert_eq!(reader.join().unwrap(), 1 << 32 | 5);
        assert_eq!(
            ram.guest_word(2, 511).load(Ordering::Relaxed),
            2 << 32 | 511
        );
        // Exactly the landed contents, through the engine view too.
        let mut out = [0u8; PAGE];
        mem.read_page(2, &mut out);
        assert!(out == pattern(2));
        // Mapped write-protected: a write is a WP fault until un-protected.
        let writer = {
            let ram = ram.clone();
            std::thread::spawn(move || ram.guest_word(2, 0).store(7, Ordering::Relaxed))
        };
        let f = next_fault(&mem);
        assert_eq!((f.page, f.wp, f.minor), (2, true, false));
        mem.write_protect(2, false).unwrap();
        writer.join().unwrap();
        assert_eq!(ram.guest_word(2, 0).load(Ordering::Relaxed), 7);
        // Mapping a page twice is refused, naming it; a hole still faults MISSING.
        match mem.map_landed(1, 1, true) {
            Err(UffdError::AlreadyPresent { page: 1 }) => {}
            r => panic!("second map: {r:?}"),
        }
        mem.install(3, &pattern(3), true).unwrap();
        // Sending reads held pages straight from the engine mapping.
        let mut buf = Vec::new();
        let src = mem.held(&[3, 1]);
        assert_eq!(src.bytes(), 2 * PAGE);
        src.append_page(0, &mut buf);
        src.append_page(1, &mut buf);
        assert!(buf[..PAGE] == pattern(3) && buf[PAGE..] == pattern(1));
        mem.release();
    }
}
