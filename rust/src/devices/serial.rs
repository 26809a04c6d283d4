//! COM1: a 16550 UART (vm-superio) at port 0x3F8, IRQ 4 through the IOAPIC.
//!
//! Output goes to a [`ConsoleWriter`]: appended to the console log file and, if asked,
//! copied to the process's stdout. Output is buffered per line (flushed at `\n`, when
//! the buffer is large, and when the writer is flushed or dropped), so a guest printing
//! a byte per `out` does not cost a `write(2)` per byte.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::{Arc, Mutex};

use super::{DeviceError, IrqLine};
use crate::bus::{BusAction, BusDevice};

/// Base port of COM1.
pub const COM1_PORT: u16 = 0x3F8;
/// ISA IRQ of COM1.
pub const COM1_IRQ: u32 = 4;

/// Where the guest's console output goes.
pub struct ConsoleWriter {
    log: Option<File>,
    stdout: bool,
    buf: Vec<u8>,
    capture: Option<Arc<Mutex<Vec<u8>>>>,
}

impl ConsoleWriter {
    /// A writer appending to `log_path` (created if needed) and optionally to stdout.
    pub fn new(log_path: Option<&str>, stdout: bool) -> Result<Self, DeviceError> {
        let log = match log_path {
            Some(p) => Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|source| DeviceError::ConsoleLog {
                        path: p.to_string(),
                        source,
                    })?,
            ),
            None => None,
        };
        Ok(ConsoleWriter {
            log,
            stdout,
            buf: Vec::with_capacity(4096),
            capture: None,
        })
    }

    /// Also keep a copy of everything written in `capture` (tests, result summaries).
    pub fn with_capture(mut self, capture: Arc<Mutex<Vec<u8>>>) -> Self {
        self.capture = Some(capture);
        self
    }

    fn drain(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        if let Some(c) = &self.capture {
            crate::bus::lock(c).extend_from_slice(&self.buf);
        }
        if let Some(f) = &mut self.log {
            f.write_all(&self.buf)?;
        }
        if self.stdout {
            let mut out = std::io::stdout().lock();
            out.write_all(&self.buf)?;
            out.flush()?;
        }
        self.buf.clear();
        Ok(())
    }
}

impl Write for ConsoleWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if data.contains(&b'\n') || self.buf.len() >= 4096 {
            self.drain()?;
        }
        Ok(data.len())
    }
    /// vm-superio flushes after every byte; draining only happens at a newline, when
    /// the buffer is full, on [`ConsoleWriter::sync`] and on drop.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ConsoleWriter {
    /// Write out everything buffered.
    pub fn sync(&mut self) -> std::io::Result<()> {
        self.drain()
    }
}

impl Drop for ConsoleWriter {
    fn drop(&mut self) {
        let _ = self.drain();
    }
}

/// The interrupt trigger of the UART: pulses its IOAPIC pin (ISA IRQs are edge
/// triggered).
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

/// The COM1 device on the PIO bus.
pub struct Serial {
    uart: vm_superio::Serial<SerialIrq, vm_superio::serial::NoEvents, ConsoleWriter>,
}

impl Serial {
    /// A UART writing to `out`, raising `irq` on `line` (no interrupt if `None`).
    pub fn new(out: ConsoleWriter, line: Option<Arc<dyn IrqLine>>, irq: u32) -> Self {
        Serial {
            uart: vm_superio::Serial::new(SerialIrq { line, irq }, out),
        }
    }

    /// Flush buffered console output.
    pub fn flush(&mut self) {
        let _ = self.uart.writer_mut().sync();
    }

    /// Put as much of `input` as fits into the receive FIFO (raising the
    /// received-data interrupt if the guest enabled it); returns how many bytes were
    /// taken. The caller keeps the rest and retries once the guest drained the FIFO.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        if input.is_empty() || self.uart.fifo_capacity() == 0 {
            return 0;
        }
        // Errors: FIFO full (checked above) or the trigger (infallible).
        self.uart.enqueue_raw_bytes(input).unwrap_or(0)
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
                let n = crate::bus::lock(serial).enqueue_input(a);
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
            *b = self.uart.read(offset as u8);
        }
        if data.len() > 1 {
            data[1..].fill(0);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Option<BusAction> {
        if let Some(b) = data.first() {
            // A write error (console log full, stdout closed) must not stop the guest.
            let _ = self.uart.write(offset as u8, *b);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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

    #[test]
    fn output_goes_to_log_and_capture() {
        let dir = std::env::temp_dir().join(format!("dvmm-serial-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.log");
        let _ = std::fs::remove_file(&path);
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
        assert_eq!(&*cap.lock().unwrap(), b"hi\n");
        s.flush();
        assert_eq!(&*cap.lock().unwrap(), b"hi\nx");
        assert_eq!(std::fs::read(&path).unwrap(), b"hi\nx");
        assert!(irq.0.load(Ordering::SeqCst) > 0);
        // LSR: transmitter empty.
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
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
