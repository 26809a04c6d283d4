//! COM1: a 16550 UART (vm-superio) at port 0x3F8, IRQ 4 through the IOAPIC, with
//! its console output ([`ConsoleWriter`]: log file, stdout, capture) and input
//! ([`ConsoleInput`]: FIFO, stdin).
//!
//! # Output never blocks the thread that does the I/O
//!
//! A guest's write to the transmit register runs on a vCPU thread or, for a vCPU
//! on another node, on the boot node's DSM engine thread, which serves forwarded
//! I/O (`cluster::Cluster::fast_path`). A console that stops reading (a full pipe,
//! a stuck terminal, a FIFO nobody drains) must therefore never block that write:
//! a blocked engine stops serving pages and the peers declare the node dead.
//!
//! So the UART only appends the byte to a transmit queue, and a dedicated writer
//! thread (`dvmm-console-out`) drains the queue into the [`ConsoleWriter`].
//! Backpressure is the hardware's: while [`TX_QUEUE`] bytes are queued or being
//! written, LSR reports the transmitter busy (THRE and TEMT clear), so a driver
//! that polls THRE before each byte (the bundled guest does, so does Linux's 8250
//! console) waits as it would for a slow line; once there is room again the
//! THR-empty interrupt is raised if the guest enabled it, as a real UART does.
//!
//! The bundled guest polls THRE a bounded number of times (100000 LSR reads,
//! `guest/src/kernel.c` `serial_putc`) and then writes anyway. Such bytes are still
//! accepted, up to [`TX_LIMIT`] queued in total; past that a byte is dropped and
//! counted, and the loss is reported on stderr and in the output stream itself
//! once the console moves again: nothing is lost silently. Blocking the writing
//! thread instead is not an option: the write runs under the device's mutex,
//! which the engine thread takes for every forwarded COM1 access (remote vCPUs
//! poll LSR while they print), so a blocked vCPU would block the engine with it.
//! A guest that polls THRE writes at most one byte per poll timeout while the
//! console is stuck, so TX_LIMIT takes hours to reach.
//!
//! Output is written in chunks: at a newline, when 4 KiB are queued, on
//! [`Serial::flush`], or [`LINGER`] after the first unwritten byte (so a prompt
//! without a newline still shows), so a guest printing a byte per `out` costs
//! neither a `write(2)` nor a wake-up of the writer per byte. Dropping the device
//! (when the VM is torn down) drains the queue, waiting at most [`DRAIN_TIMEOUT`],
//! so the console output of a finished VM is complete.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{DeviceError, IrqLine};
use crate::bus::{BusAction, BusDevice};
use crate::sync::lock;

/// Base port of COM1.
pub const COM1_PORT: u16 = 0x3F8;
/// ISA IRQ of COM1.
pub const COM1_IRQ: u32 = 4;

/// Queued output (bytes) at which the transmitter reports itself busy.
pub const TX_QUEUE: usize = 64 << 10;
/// Queued output (bytes) past which bytes written anyway are dropped (counted and
/// reported).
pub const TX_LIMIT: usize = 1 << 20;
/// How long the writer waits for the rest of a line before writing a partial one.
pub const LINGER: Duration = Duration::from_millis(10);
/// How long dropping the device waits for the queued output to be written.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Queued bytes that are written without waiting for the end of the line.
const BATCH: usize = 4096;

// 16550 registers and bits (vm-superio implements them; the device overrides the
// transmitter status, see the module docs).
const DATA_OFFSET: u8 = 0;
const IER_OFFSET: u8 = 1;
const LCR_OFFSET: u8 = 3;
const LSR_OFFSET: u8 = 5;
const IER_THR_EMPTY: u8 = 0x02;
const LCR_DLAB: u8 = 0x80;
const LSR_THR_EMPTY: u8 = 0x20;
const LSR_TX_IDLE: u8 = 0x40;

/// Where the guest's console output goes: appended to the console log file, copied
/// to the process's stdout if asked, and kept in a capture buffer if asked. Owned by
/// the device's writer thread, the only thread that ever blocks on it.
pub struct ConsoleWriter {
    log: Option<File>,
    /// A duplicate of fd 1: written without std's stdout lock and buffer, so a
    /// stuck stdout holds up nothing but the writer thread.
    stdout: Option<File>,
    capture: Option<Arc<Mutex<Vec<u8>>>>,
}

impl ConsoleWriter {
    /// A writer appending to `log_path` (created if needed; may be a FIFO) and
    /// optionally to stdout.
    pub fn new(log_path: Option<&str>, stdout: bool) -> Result<Self, DeviceError> {
        use std::os::unix::fs::FileTypeExt;
        let log = match log_path {
            Some(p) => {
                let fifo = std::fs::metadata(p).is_ok_and(|m| m.file_type().is_fifo());
                let mut o = OpenOptions::new();
                if fifo {
                    // Opening a FIFO write-only blocks until a reader comes, which
                    // would hang the VM's set-up; read-write never blocks, and then
                    // only the writer thread waits for a reader (nor does the FIFO
                    // ever give EPIPE when a reader goes away).
                    o.read(true).write(true);
                } else {
                    o.create(true).append(true);
                }
                Some(o.open(p).map_err(|source| DeviceError::ConsoleLog {
                    path: p.to_string(),
                    source,
                })?)
            }
            None => None,
        };
        let stdout = if stdout {
            let fd = std::io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .map_err(DeviceError::ConsoleStdout)?;
            Some(File::from(fd))
        } else {
            None
        };
        Ok(ConsoleWriter {
            log,
            stdout,
            capture: None,
        })
    }

    /// Also keep a copy of everything written in `capture` (tests, result summaries).
    pub fn with_capture(mut self, capture: Arc<Mutex<Vec<u8>>>) -> Self {
        self.capture = Some(capture);
        self
    }

    /// Write `data` to every destination (a failing one does not stop the others);
    /// the first error.
    fn emit(&mut self, data: &[u8]) -> std::io::Result<()> {
        if let Some(c) = &self.capture {
            lock(c).extend_from_slice(data);
        }
        let mut res = Ok(());
        for f in [&mut self.log, &mut self.stdout].into_iter().flatten() {
            if let Err(e) = f.write_all(data) {
                if res.is_ok() {
                    res = Err(e);
                }
            }
        }
        res
    }
}

/// What the writer thread is doing (so a byte wakes it only when it waits for one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriterState {
    /// Waiting for a first byte (untimed).
    Idle,
    /// Has (or is about to have) bytes, waiting up to [`LINGER`] for the line's end.
    Lingering,
    /// Writing a chunk; looks at the queue again when done.
    Writing,
    /// Exited (or never started: output is written inline).
    Gone,
}

struct TxState {
    /// Accepted, not yet taken by the writer.
    buf: Vec<u8>,
    /// Taken by the writer, not yet written.
    in_flight: usize,
    /// Write without lingering (newline, batch full, flush, close).
    urgent: bool,
    /// No more output: the writer drains the queue and exits.
    closing: bool,
    writer: WriterState,
    /// Bytes dropped over [`TX_LIMIT`] and not yet reported.
    unreported: u64,
    /// Bytes dropped in total.
    dropped: u64,
    /// Bytes accepted / written in total (for [`ConsoleOutput::wait_written`]).
    accepted: u64,
    written: u64,
    /// The guest found the transmitter busy: raise THR-empty once there is room.
    busy_seen: bool,
    /// Threads waiting on `progress` (so the writer wakes them only if needed).
    waiters: u32,
}

impl TxState {
    fn queued(&self) -> usize {
        self.buf.len() + self.in_flight
    }

    /// Make the writer write what is queued now; true if it must be woken.
    fn urge(&mut self) -> bool {
        self.urgent = true;
        matches!(self.writer, WriterState::Idle | WriterState::Lingering)
    }
}

/// The transmit queue between the UART and its writer thread.
struct TxQueue {
    st: Mutex<TxState>,
    /// The writer waits here for bytes.
    wake: Condvar,
    /// Flushers wait here for the writer's progress.
    progress: Condvar,
}

fn wait<'a, T>(cv: &Condvar, g: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait(g).unwrap_or_else(|e| e.into_inner())
}

fn wait_for<'a, T>(cv: &Condvar, g: MutexGuard<'a, T>, d: Duration) -> MutexGuard<'a, T> {
    match cv.wait_timeout(g, d) {
        Ok((g, _)) => g,
        Err(e) => e.into_inner().0,
    }
}

impl TxQueue {
    fn new() -> Self {
        TxQueue {
            st: Mutex::new(TxState {
                buf: Vec::with_capacity(BATCH),
                in_flight: 0,
                urgent: false,
                closing: false,
                writer: WriterState::Idle,
                unreported: 0,
                dropped: 0,
                accepted: 0,
                written: 0,
                busy_seen: false,
                waiters: 0,
            }),
            wake: Condvar::new(),
            progress: Condvar::new(),
        }
    }

    /// Queue one byte from the guest. Never blocks (beyond the queue's own lock,
    /// which no one holds while doing I/O).
    fn push(&self, b: u8) {
        let mut st = lock(&self.st);
        if st.queued() >= TX_QUEUE {
            // Written although LSR said busy (or without looking).
            st.busy_seen = true;
            if st.queued() >= TX_LIMIT {
                st.unreported += 1;
                st.dropped += 1;
                return;
            }
        }
        st.buf.push(b);
        st.accepted += 1;
        let wake = if b == b'\n' || st.buf.len() >= BATCH {
            st.urge()
        } else {
            st.writer == WriterState::Idle
        };
        if wake {
            // The writer is now busy with this byte: later bytes need not wake it
            // again unless they end the line.
            st.writer = WriterState::Lingering;
            drop(st);
            self.wake.notify_one();
        }
    }

    /// Whether the transmitter is busy (LSR THRE clear); remembers that the guest
    /// saw it busy.
    fn busy(&self) -> bool {
        let mut st = lock(&self.st);
        let busy = st.queued() >= TX_QUEUE;
        st.busy_seen |= busy;
        busy
    }

    fn urge(&self) {
        if lock(&self.st).urge() {
            self.wake.notify_one();
        }
    }

    /// Wait until the writer has written `target` bytes in total, has exited, or
    /// `deadline` passed; true if the bytes were written.
    fn wait_written(&self, target: u64, deadline: Instant) -> bool {
        let mut st = lock(&self.st);
        st.waiters += 1;
        while st.written < target && st.writer != WriterState::Gone {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            st = wait_for(&self.progress, st, deadline - now);
        }
        st.waiters -= 1;
        st.written >= target
    }

    /// Take what is queued for writing (writer thread or inline).
    fn take(&self, st: &mut TxState, chunk: &mut Vec<u8>) -> u64 {
        std::mem::swap(&mut st.buf, chunk);
        st.in_flight = chunk.len();
        st.urgent = false;
        std::mem::take(&mut st.unreported)
    }

    /// Write a taken chunk (and the report of dropped bytes after it); then account
    /// for it. Returns whether THR-empty must be raised.
    fn write_out(
        &self,
        out: &mut ConsoleWriter,
        chunk: &mut Vec<u8>,
        dropped: u64,
        failed: &mut bool,
    ) -> bool {
        let mut res = out.emit(chunk);
        if dropped > 0 {
            // After the chunk: every byte queued before the drops is in it.
            let note = format!(
                "\r\n[dvmm: {dropped} bytes of console output dropped: the console was not being read]\r\n"
            );
            eprintln!(
                "dvmm: console: {dropped} bytes of output dropped (the console was not being read)"
            );
            res = res.and(out.emit(note.as_bytes()));
        }
        if let Err(e) = res {
            // A write error (console log full, stdout closed) must not stop the guest.
            if !*failed {
                *failed = true;
                eprintln!("dvmm: console output: {e} (further errors not reported)");
            }
        }
        let n = chunk.len() as u64;
        chunk.clear();
        if chunk.capacity() > 4 * BATCH {
            // Do not keep an overflow-sized buffer for ever.
            *chunk = Vec::with_capacity(BATCH);
        }
        let mut st = lock(&self.st);
        st.in_flight = 0;
        st.written += n;
        let raise = st.busy_seen && st.queued() < TX_QUEUE;
        if raise {
            st.busy_seen = false;
        }
        if st.waiters > 0 {
            self.progress.notify_all();
        }
        raise
    }
}

/// Marks the writer gone when its thread ends, even by a panic, so a drain waiting
/// for it does not wait out its whole timeout.
struct GoneOnExit<'a>(&'a TxQueue);

impl Drop for GoneOnExit<'_> {
    fn drop(&mut self) {
        lock(&self.0.st).writer = WriterState::Gone;
        self.0.progress.notify_all();
    }
}

/// The writer thread: drains the queue into `out` until the device closes it.
fn run_writer(tx: Arc<TxQueue>, mut out: ConsoleWriter, uart: Weak<Mutex<Uart>>) {
    let _gone = GoneOnExit(&tx);
    let mut chunk = Vec::with_capacity(BATCH);
    let mut failed = false;
    loop {
        let mut st = lock(&tx.st);
        let mut lingered = false;
        loop {
            if st.buf.is_empty() && st.unreported == 0 {
                if st.closing {
                    return;
                }
                st.writer = WriterState::Idle;
                st = wait(&tx.wake, st);
                continue;
            }
            if st.urgent || st.closing || lingered {
                break;
            }
            st.writer = WriterState::Lingering;
            st = wait_for(&tx.wake, st, LINGER);
            lingered = true;
        }
        st.writer = WriterState::Writing;
        let dropped = tx.take(&mut st, &mut chunk);
        drop(st);
        if tx.write_out(&mut out, &mut chunk, dropped, &mut failed) {
            if let Some(u) = uart.upgrade() {
                raise_thr_empty(&mut lock(&u));
            }
        }
    }
}

/// THR became empty again: raise its interrupt if the guest enabled it (rewriting
/// IER makes vm-superio assert every enabled pending condition, as a level-driven
/// 16550 would).
fn raise_thr_empty(u: &mut Uart) {
    // Reading LCR and IER has no side effects; with DLAB set offset 1 is the divisor.
    if u.read(LCR_OFFSET) & LCR_DLAB != 0 {
        return;
    }
    let ier = u.read(IER_OFFSET);
    if ier & IER_THR_EMPTY != 0 {
        // The only error is the interrupt trigger's, which is infallible.
        let _ = u.write(IER_OFFSET, ier);
    }
}

/// The UART's output: appends to the transmit queue.
struct TxSink(Arc<TxQueue>);

impl Write for TxSink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        for b in data {
            self.0.push(*b);
        }
        Ok(data.len())
    }
    /// vm-superio flushes after every byte: writing is the writer thread's business.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The interrupt trigger of the UART: pulses its IOAPIC pin (ISA IRQs are edge
/// triggered).
#[derive(Clone)]
pub struct SerialIrq {
    line: Option<Arc<dyn IrqLine>>,
    irq: u32,
}

impl vm_superio::Trigger for SerialIrq {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        if let Some(l) = &self.line {
            l.set_irq(self.irq, true);
            l.set_irq(self.irq, false);
        }
        Ok(())
    }
}

type Uart = vm_superio::Serial<SerialIrq, vm_superio::serial::NoEvents, TxSink>;

/// A handle on a UART's output queue, usable without the device's lock.
#[derive(Clone)]
pub struct ConsoleOutput(Arc<TxQueue>);

impl ConsoleOutput {
    /// Wait until everything the guest wrote so far has been written out (true),
    /// or `timeout` passed (false). Do not call it while holding the device's lock:
    /// the DSM engine thread may need that lock meanwhile.
    pub fn wait_written(&self, timeout: Duration) -> bool {
        let target = {
            let mut st = lock(&self.0.st);
            if st.urge() {
                self.0.wake.notify_one();
            }
            st.accepted
        };
        self.0.wait_written(target, Instant::now() + timeout)
    }

    /// Bytes dropped because the queue was full (the console was not being read).
    pub fn dropped(&self) -> u64 {
        lock(&self.0.st).dropped
    }
}

/// The UART's registers and receive FIFO as a snapshot keeps them (vm-superio's
/// `SerialState`, serializable).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialRegs {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// The same registers, field for field, both ways.
macro_rules! serial_state_fields {
    ($from:ty => $to:ty) => {
        impl From<$from> for $to {
            fn from(s: $from) -> Self {
                Self {
                    baud_divisor_low: s.baud_divisor_low,
                    baud_divisor_high: s.baud_divisor_high,
                    interrupt_enable: s.interrupt_enable,
                    interrupt_identification: s.interrupt_identification,
                    line_control: s.line_control,
                    line_status: s.line_status,
                    modem_control: s.modem_control,
                    modem_status: s.modem_status,
                    scratch: s.scratch,
                    in_buffer: s.in_buffer,
                }
            }
        }
    };
}
serial_state_fields!(vm_superio::serial::SerialState => SerialRegs);
serial_state_fields!(SerialRegs => vm_superio::serial::SerialState);

/// The COM1 device on the PIO bus.
pub struct Serial {
    /// Shared with the writer thread (weakly), which raises THR-empty through it.
    uart: Arc<Mutex<Uart>>,
    tx: Arc<TxQueue>,
    writer: Option<JoinHandle<()>>,
    /// The output when the writer thread could not be started: written inline, on
    /// the I/O thread (the old behaviour), rather than lost.
    inline: Option<(ConsoleWriter, Vec<u8>, bool)>,
}

impl Serial {
    /// A UART writing to `out` through its writer thread, raising `irq` on `line`
    /// (no interrupt if `None`).
    pub fn new(out: ConsoleWriter, line: Option<Arc<dyn IrqLine>>, irq: u32) -> Self {
        let tx = Arc::new(TxQueue::new());
        let uart = Arc::new(Mutex::new(vm_superio::Serial::new(
            SerialIrq { line, irq },
            TxSink(tx.clone()),
        )));
        // The writer gets `out` through a slot so a failed spawn can take it back.
        let slot = Arc::new(Mutex::new(Some(out)));
        let spawned = {
            let (tx, slot, uart) = (tx.clone(), slot.clone(), Arc::downgrade(&uart));
            std::thread::Builder::new()
                .name("dvmm-console-out".into())
                .spawn(move || {
                    let out = lock(&slot).take();
                    if let Some(out) = out {
                        run_writer(tx, out, uart);
                    }
                })
        };
        let (writer, inline) = match spawned {
            Ok(h) => (Some(h), None),
            Err(e) => {
                eprintln!(
                    "dvmm: cannot start the console writer thread ({e}): console output is written inline"
                );
                lock(&tx.st).writer = WriterState::Gone;
                let out = lock(&slot).take();
                (None, out.map(|o| (o, Vec::new(), false)))
            }
        };
        Serial {
            uart,
            tx,
            writer,
            inline,
        }
    }

    /// Have the writer write out what is queued now. Does not wait (the caller
    /// holds the device's lock, which the DSM engine thread may need): use
    /// [`Serial::output`] and [`ConsoleOutput::wait_written`] outside the lock to
    /// wait; dropping the device drains the queue.
    pub fn flush(&mut self) {
        if self.inline.is_some() {
            self.write_inline(true);
        } else {
            self.tx.urge();
        }
    }

    /// A handle on the output queue (to wait for it without the device's lock).
    pub fn output(&self) -> ConsoleOutput {
        ConsoleOutput(self.tx.clone())
    }

    /// Inline output (no writer thread): write what is urgent, or everything.
    fn write_inline(&mut self, all: bool) {
        let Some((out, chunk, failed)) = &mut self.inline else {
            return;
        };
        let dropped = {
            let mut st = lock(&self.tx.st);
            if !(all || st.urgent) {
                return;
            }
            self.tx.take(&mut st, chunk)
        };
        // No writer thread, so nobody to raise THR-empty for: the queue never
        // stays full here.
        let _ = self.tx.write_out(out, chunk, dropped, failed);
    }

    /// A UART's registers at reset (a node without COM1 saves these).
    pub fn default_regs() -> SerialRegs {
        vm_superio::serial::SerialState::default().into()
    }

    /// The UART's registers and receive FIFO (snapshots).
    pub fn regs(&self) -> SerialRegs {
        lock(&self.uart).state().into()
    }

    /// Put the UART's registers and receive FIFO back (restore of a snapshot).
    pub fn set_regs(&mut self, r: &SerialRegs) -> Result<(), DeviceError> {
        let st = vm_superio::serial::SerialState::from(r.clone());
        let mut u = lock(&self.uart);
        let irq = u.interrupt_evt().clone();
        *u = Uart::from_state(
            &st,
            irq,
            vm_superio::serial::NoEvents,
            TxSink(self.tx.clone()),
        )
        .map_err(|_| DeviceError::SerialState(r.in_buffer.len()))?;
        Ok(())
    }

    /// Put as much of `input` as fits into the receive FIFO (raising the
    /// received-data interrupt if the guest enabled it); returns how many bytes were
    /// taken. The caller keeps the rest and retries once the guest drained the FIFO.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        let mut u = lock(&self.uart);
        if input.is_empty() || u.fifo_capacity() == 0 {
            return 0;
        }
        // Errors: FIFO full (checked above) or the trigger (infallible).
        u.enqueue_raw_bytes(input).unwrap_or(0)
    }
}

impl Drop for Serial {
    /// Drain the output (bounded): the console output of a finished VM is complete
    /// unless the console has stopped reading, which is reported.
    fn drop(&mut self) {
        if self.inline.is_some() {
            self.write_inline(true);
            return;
        }
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        let (gone, left) = {
            let mut st = lock(&self.tx.st);
            // The writer writes everything queued, then exits.
            st.closing = true;
            st.urge();
            self.tx.wake.notify_one();
            st.waiters += 1;
            while st.writer != WriterState::Gone {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                st = wait_for(&self.tx.progress, st, deadline - now);
            }
            st.waiters -= 1;
            (st.writer == WriterState::Gone, st.queued())
        };
        if left > 0 {
            eprintln!(
                "dvmm: console: {left} bytes of output not written after {} s (the console is not being read); giving up on them",
                DRAIN_TIMEOUT.as_secs()
            );
        }
        if let Some(h) = self.writer.take() {
            if gone {
                let _ = h.join();
            }
            // Otherwise the thread is stuck in write(2): leave it (detached) rather
            // than hang the VM's teardown; it exits if the console ever moves.
        }
    }
}

/// Where console input comes from: a FIFO (opened read-write and non-blocking, so
/// writers coming and going never give EOF) and/or the process's stdin.
pub struct ConsoleInput {
    fifo: Option<File>,
    stdin: bool,
    stop: Arc<vmm_sys_util::eventfd::EventFd>,
}

/// The running input thread; [`ConsoleInputThread::stop`] ends it.
pub struct ConsoleInputThread {
    stop: Arc<vmm_sys_util::eventfd::EventFd>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl ConsoleInputThread {
    /// Stop the thread and wait for it.
    pub fn stop(mut self) {
        let _ = self.stop.write(1);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// How long to wait before retrying when the guest has not drained a full FIFO.
const INPUT_RETRY_MS: i32 = 5;

impl ConsoleInput {
    /// Open the console input: `fifo` (a FIFO path; must exist) and/or stdin.
    /// `None` when there is no input at all.
    pub fn open(fifo: Option<&str>, stdin: bool) -> Result<Option<Self>, DeviceError> {
        use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
        let fifo = match fifo {
            Some(p) => {
                let err = |source| DeviceError::ConsoleInput {
                    path: p.to_string(),
                    source,
                };
                let meta = std::fs::metadata(p).map_err(err)?;
                if !meta.file_type().is_fifo() {
                    return Err(err(std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "not a FIFO",
                    )));
                }
                Some(
                    OpenOptions::new()
                        .read(true)
                        .write(true)
                        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                        .open(p)
                        .map_err(err)?,
                )
            }
            None => None,
        };
        if fifo.is_none() && !stdin {
            return Ok(None);
        }
        let stop = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).map_err(|source| {
            DeviceError::ConsoleInput {
                path: "eventfd".to_string(),
                source,
            }
        })?;
        Ok(Some(ConsoleInput {
            fifo,
            stdin,
            stop: Arc::new(stop),
        }))
    }

    /// Start the thread feeding input into `serial`'s receive FIFO.
    pub fn spawn(self, serial: Arc<Mutex<Serial>>) -> std::io::Result<ConsoleInputThread> {
        let stop = self.stop.clone();
        let handle = std::thread::Builder::new()
            .name("dvmm-console-in".into())
            .spawn(move || self.run(&serial))?;
        Ok(ConsoleInputThread {
            stop,
            handle: Some(handle),
        })
    }

    fn run(self, serial: &Mutex<Serial>) {
        use std::io::Read;
        use std::os::fd::AsRawFd;
        let stop_fd = self.stop.as_raw_fd();
        let fifo_fd = self.fifo.as_ref().map(|f| f.as_raw_fd());
        let mut stdin_open = self.stdin;
        let mut pending: std::collections::VecDeque<u8> = std::collections::VecDeque::new();
        let mut buf = [0u8; 4096];
        loop {
            // Hand over what is pending as the FIFO has room.
            if !pending.is_empty() {
                let (a, _) = pending.as_slices();
                let n = lock(serial).enqueue_input(a);
                pending.drain(..n);
            }
            // While input is pending read no more (back pressure): only wait for the
            // stop event, then retry.
            let mut fds = vec![libc::pollfd {
                fd: stop_fd,
                events: libc::POLLIN,
                revents: 0,
            }];
            if pending.is_empty() {
                if let Some(fd) = fifo_fd {
                    fds.push(libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    });
                }
                if stdin_open {
                    fds.push(libc::pollfd {
                        fd: libc::STDIN_FILENO,
                        events: libc::POLLIN,
                        revents: 0,
                    });
                }
            }
            let timeout = if pending.is_empty() {
                -1
            } else {
                INPUT_RETRY_MS
            };
            // SAFETY: `fds` is a valid array of pollfd of the given length, alive for
            // the call; the descriptors are owned by `self` (or stdin).
            let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if r < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return;
            }
            if fds[0].revents != 0 {
                return;
            }
            for p in &fds[1..] {
                if p.revents == 0 {
                    continue;
                }
                let got = if Some(p.fd) == fifo_fd {
                    match &self.fifo {
                        Some(f) => {
                            let mut r: &File = f;
                            r.read(&mut buf)
                        }
                        None => Ok(0),
                    }
                } else {
                    // Unbuffered (std's Stdin buffers, which would hide data from poll).
                    // SAFETY: reads at most buf.len() bytes into our live buffer.
                    let n = unsafe {
                        libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len())
                    };
                    if n < 0 {
                        Err(std::io::Error::last_os_error())
                    } else {
                        Ok(n as usize)
                    }
                };
                match got {
                    Ok(0) if p.fd == libc::STDIN_FILENO => stdin_open = false,
                    Ok(n) => pending.extend(&buf[..n]),
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                        ) => {}
                    Err(_) if p.fd == libc::STDIN_FILENO => stdin_open = false,
                    Err(_) => return,
                }
            }
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(b) = data.first_mut() {
            let mut v = lock(&self.uart).read(offset as u8);
            if offset == u64::from(LSR_OFFSET) && self.tx.busy() {
                // Backpressure: the transmitter is still sending what is queued.
                v &= !(LSR_THR_EMPTY | LSR_TX_IDLE);
            }
            *b = v;
        }
        if data.len() > 1 {
            data[1..].fill(0);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Option<BusAction> {
        if let Some(b) = data.first() {
            // Output only queues (see the module docs); the only error is the
            // interrupt trigger's, which is infallible.
            let _ = lock(&self.uart).write(offset as u8, *b);
            if offset == u64::from(DATA_OFFSET) && self.inline.is_some() {
                self.write_inline(false);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    use std::sync::atomic::{AtomicU32, Ordering};

    struct Count(AtomicU32);
    impl IrqLine for Count {
        fn set_irq(&self, irq: u32, level: bool) {
            assert_eq!(irq, COM1_IRQ);
            if level {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    fn tmpdir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("dvmm-serial-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn lsr(s: &mut Serial) -> u8 {
        let mut b = [0u8];
        s.read(u64::from(LSR_OFFSET), &mut b);
        b[0]
    }

    fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
        let end = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// A FIFO with its read end open (non-blocking, so the writer's open does not
    /// wait) and nobody reading it yet: a console that is stuck.
    fn stuck_fifo(dir: &std::path::Path) -> (std::path::PathBuf, File) {
        let path = dir.join("console.fifo");
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo on a NUL-terminated path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let r = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .unwrap();
        (path, r)
    }

    /// Read `n` bytes from the (non-blocking) read end of a FIFO.
    fn drain(mut r: &File, n: usize) -> Vec<u8> {
        let mut got = Vec::with_capacity(n);
        let mut buf = vec![0u8; 1 << 16];
        let end = Instant::now() + Duration::from_secs(20);
        while got.len() < n {
            assert!(
                Instant::now() < end,
                "only {} of {n} bytes came out",
                got.len()
            );
            match r.read(&mut buf) {
                Ok(k) => got.extend_from_slice(&buf[..k]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(e) => panic!("{e}"),
            }
        }
        got
    }

    #[test]
    fn output_goes_to_log_and_capture() {
        let dir = tmpdir("log");
        let path = dir.join("console.log");
        let cap = Arc::new(Mutex::new(Vec::new()));
        let w = ConsoleWriter::new(path.to_str(), false)
            .unwrap()
            .with_capture(cap.clone());
        let irq = Arc::new(Count(AtomicU32::new(0)));
        let mut s = Serial::new(w, Some(irq.clone()), COM1_IRQ);
        // Enable THR-empty interrupt (IER bit 1).
        s.write(1, &[0x02]);
        for b in b"hi\nx" {
            s.write(0, &[*b]);
        }
        let out = s.output();
        assert!(out.wait_written(Duration::from_secs(5)));
        assert_eq!(&*cap.lock().unwrap(), b"hi\nx");
        assert_eq!(std::fs::read(&path).unwrap(), b"hi\nx");
        assert!(irq.0.load(Ordering::SeqCst) > 0);
        // LSR: transmitter empty.
        assert_ne!(lsr(&mut s) & LSR_THR_EMPTY, 0);
        assert_eq!(out.dropped(), 0);
    }

    #[test]
    fn a_partial_line_appears_without_a_flush() {
        let cap = Arc::new(Mutex::new(Vec::new()));
        let w = ConsoleWriter::new(None, false)
            .unwrap()
            .with_capture(cap.clone());
        let mut s = Serial::new(w, None, COM1_IRQ);
        for b in b"login: " {
            s.write(0, &[*b]);
        }
        wait_until("the prompt", || {
            cap.lock().unwrap().as_slice() == b"login: "
        });
    }

    #[test]
    fn dropping_the_device_writes_everything_queued() {
        let dir = tmpdir("drop");
        let path = dir.join("console.log");
        let w = ConsoleWriter::new(path.to_str(), false).unwrap();
        let mut s = Serial::new(w, None, COM1_IRQ);
        let mut want = Vec::new();
        for i in 0..2000 {
            want.extend_from_slice(format!("line {i}\r\n").as_bytes());
        }
        want.extend_from_slice(b"last line without a newline");
        for b in &want {
            s.write(0, &[*b]);
        }
        drop(s);
        assert!(std::fs::read(&path).unwrap() == want);
    }

    /// The console stops reading: the guest's writes (on the I/O thread: a vCPU, or
    /// the DSM engine serving a remote vCPU) never block, LSR reports the
    /// transmitter busy, and once the reader drains, every byte comes out in order
    /// and THR-empty is raised.
    #[test]
    fn a_stuck_console_never_blocks_the_io_thread_and_loses_nothing() {
        let dir = tmpdir("stuck");
        let (path, reader) = stuck_fifo(&dir);
        let w = ConsoleWriter::new(path.to_str(), false).unwrap();
        let irq = Arc::new(Count(AtomicU32::new(0)));
        let mut s = Serial::new(w, Some(irq.clone()), COM1_IRQ);
        s.write(1, &[IER_THR_EMPTY]);
        // More than the pipe (64 KiB) and the transmit queue together hold.
        let mut want = Vec::new();
        let mut i = 0;
        while want.len() < 3 * TX_QUEUE {
            want.extend_from_slice(format!("line {i:06}\n").as_bytes());
            i += 1;
        }
        let t0 = Instant::now();
        let mut slowest = Duration::ZERO;
        let mut busy_seen = false;
        for b in &want {
            let t = Instant::now();
            s.write(0, &[*b]);
            busy_seen |= lsr(&mut s) & (LSR_THR_EMPTY | LSR_TX_IDLE) == 0;
            slowest = slowest.max(t.elapsed());
        }
        assert!(
            slowest < Duration::from_millis(100) && t0.elapsed() < Duration::from_secs(5),
            "a write blocked: slowest {slowest:?}, all {:?}",
            t0.elapsed()
        );
        assert!(busy_seen, "LSR never reported the transmitter busy");
        assert_eq!(lsr(&mut s) & LSR_THR_EMPTY, 0, "still busy");
        // The guest's interrupt handler acknowledges the THR-empty interrupts the
        // writes raised (reading IIR); the next one must come when there is room.
        let mut iir = [0u8];
        s.read(2, &mut iir);
        let before = irq.0.load(Ordering::SeqCst);
        let out = s.output();
        let got = drain(&reader, want.len());
        assert!(got == want, "output differs from what the guest wrote");
        assert!(out.wait_written(Duration::from_secs(5)));
        assert_ne!(lsr(&mut s) & (LSR_THR_EMPTY | LSR_TX_IDLE), 0);
        assert!(
            irq.0.load(Ordering::SeqCst) > before,
            "no THR-empty interrupt"
        );
        assert_eq!(out.dropped(), 0);
        drop(s);
    }

    /// Past TX_LIMIT bytes queued, bytes are dropped, but counted and reported in
    /// the stream where they went missing.
    #[test]
    fn bytes_past_the_limit_are_dropped_and_reported_not_lost_silently() {
        let dir = tmpdir("limit");
        let (path, reader) = stuck_fifo(&dir);
        let w = ConsoleWriter::new(path.to_str(), false).unwrap();
        let mut s = Serial::new(w, None, COM1_IRQ);
        let total = 2 * TX_LIMIT;
        let want: Vec<u8> = (0..total).map(|i| b'a' + (i % 26) as u8).collect();
        for b in &want {
            s.write(0, &[*b]);
        }
        let out = s.output();
        let dropped = out.dropped() as usize;
        assert!(dropped > 0 && dropped <= total - TX_LIMIT, "{dropped}");
        let note = format!(
            "\r\n[dvmm: {dropped} bytes of console output dropped: the console was not being read]\r\n"
        );
        let kept = total - dropped;
        let got = drain(&reader, kept + note.len());
        assert!(
            got[..kept] == want[..kept],
            "kept bytes are the first ones, in order"
        );
        assert_eq!(&got[kept..], note.as_bytes());
        // The console moves again: so does the output.
        s.write(0, b"\n");
        assert_eq!(drain(&reader, 1), b"\n");
        assert_eq!(out.dropped() as usize, dropped);
        drop(s);
    }

    /// A console that never moves again: the teardown gives up after DRAIN_TIMEOUT
    /// instead of hanging.
    #[test]
    fn dropping_a_stuck_device_is_bounded() {
        let dir = tmpdir("stuckdrop");
        let (path, _reader) = stuck_fifo(&dir);
        let w = ConsoleWriter::new(path.to_str(), false).unwrap();
        let mut s = Serial::new(w, None, COM1_IRQ);
        for _ in 0..(TX_QUEUE * 2) {
            s.write(0, b"x");
        }
        let t = Instant::now();
        drop(s);
        let took = t.elapsed();
        assert!(
            took >= DRAIN_TIMEOUT && took < DRAIN_TIMEOUT + Duration::from_secs(2),
            "{took:?}"
        );
    }

    /// A console log that is a FIFO nobody has opened yet: setting the device up
    /// does not wait for a reader, and a reader that comes later gets the output.
    #[test]
    fn a_fifo_console_without_a_reader_does_not_hang_the_set_up() {
        let dir = tmpdir("fifo-noreader");
        let path = dir.join("console.fifo");
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo on a NUL-terminated path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let opened = {
            let path = path.clone();
            std::thread::spawn(move || ConsoleWriter::new(path.to_str(), false).map(|_| ()))
        };
        wait_until("the console to open", || opened.is_finished());
        opened.join().unwrap().unwrap();
        let w = ConsoleWriter::new(path.to_str(), false).unwrap();
        let mut s = Serial::new(w, None, COM1_IRQ);
        for b in b"booted\n" {
            s.write(0, &[*b]);
        }
        assert!(s.output().wait_written(Duration::from_secs(5)));
        let r = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .unwrap();
        assert_eq!(drain(&r, 7), b"booted\n");
    }

    #[test]
    fn input_fills_the_fifo_and_raises_the_rx_interrupt() {
        let w = ConsoleWriter::new(None, false).unwrap();
        let irq = Arc::new(Count(AtomicU32::new(0)));
        let mut s = Serial::new(w, Some(irq.clone()), COM1_IRQ);
        s.write(1, &[0x01]); // IER: received data available
        let data = [b'x'; 100];
        let n = s.enqueue_input(&data);
        assert_eq!(n, 64);
        assert!(irq.0.load(Ordering::SeqCst) > 0);
        assert_eq!(s.enqueue_input(&data[n..]), 0);
        let mut b = [0u8];
        s.read(5, &mut b);
        assert_eq!(b[0] & 1, 1);
        s.read(0, &mut b);
        assert_eq!(b[0], b'x');
        assert_eq!(s.enqueue_input(&data[n..]), 1);
    }

    #[test]
    fn bad_log_path_is_a_clear_error() {
        let e = ConsoleWriter::new(Some("/nonexistent-dir/x/console.log"), false)
            .err()
            .unwrap();
        assert!(e.to_string().contains("/nonexistent-dir/x/console.log"));
    }
}
