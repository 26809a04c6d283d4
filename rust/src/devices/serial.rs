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
    fn bad_log_path_is_a_clear_error() {
        let e = ConsoleWriter::new(Some("/nonexistent-dir/x/console.log"), false)
            .err()
            .unwrap();
        assert!(e.to_string().contains("/nonexistent-dir/x/console.log"));
    }
}
