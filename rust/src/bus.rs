//! Port-I/O and MMIO buses: address ranges mapped to devices.
//!
//! A [`Bus`] is built once before the vCPUs start and is immutable afterwards, so the
//! exit path looks a device up with a binary search and no lock on the bus itself
//! (only the device's own mutex is taken). Accesses that hit no device are answered
//! by the caller (see `vcpu::handle_exit`: reads return all-ones, writes are ignored).
//!
//! For a distributed VM, a device that lives on another node is represented here by a
//! proxy [`BusDevice`] that forwards the access over the network (see
//! [`RemoteBusForwarder`]).

use std::sync::{Arc, Mutex};

/// Errors of the bus module.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} is empty or overflows")]
    BadRange { base: u64, len: u64 },
    #[error(
        "bus range {base:#x}+{len:#x} ({name}) overlaps {other_base:#x}+{other_len:#x} ({other})"
    )]
    Overlap {
        base: u64,
        len: u64,
        name: String,
        other_base: u64,
        other_len: u64,
        other: String,
    },
}

/// What a device asks the VMM to do after an access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusAction {
    /// Stop the whole VM with this status (debug-exit port).
    Stop(u8),
}

/// A device on a bus. `offset` is relative to the start of the device's range.
pub trait BusDevice: Send {
    /// Fill `data` with the value read at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Write `data` at `offset`; may ask the VMM to act.
    fn write(&mut self, offset: u64, data: &[u8]) -> Option<BusAction>;
}

/// A shared device handle.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Hook for forwarding a device access to the node that owns the device
/// (distributed VM). Implemented by the DSM/transport layer; wrap it in a
/// [`ProxyDevice`] and insert that on the bus of every node that does not own
/// the device.
pub trait RemoteBusForwarder: Send + Sync {
    /// Forward a read of `data.len()` bytes at absolute address `addr` (port or GPA).
    fn read(&self, is_pio: bool, addr: u64, data: &mut [u8]);
    /// Forward a write; returns the action the owning device asked for.
    fn write(&self, is_pio: bool, addr: u64, data: &[u8]) -> Option<BusAction>;
}

/// A bus device that forwards every access to another node.
pub struct ProxyDevice {
    base: u64,
    is_pio: bool,
    fwd: Arc<dyn RemoteBusForwarder>,
}

impl ProxyDevice {
    /// A proxy for the device at `base` on the PIO (`is_pio`) or MMIO bus.
    pub fn new(base: u64, is_pio: bool, fwd: Arc<dyn RemoteBusForwarder>) -> Self {
        ProxyDevice { base, is_pio, fwd }
    }
}

impl BusDevice for ProxyDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.fwd.read(self.is_pio, self.base + offset, data)
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Option<BusAction> {
        self.fwd.write(self.is_pio, self.base + offset, data)
    }
}

#[derive(Clone)]
struct Entry {
    base: u64,
    len: u64,
    name: String,
    dev: SharedDevice,
}

/// A set of non-overlapping ranges, each mapped to one device.
#[derive(Clone, Default)]
pub struct Bus {
    entries: Vec<Entry>, // sorted by base
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut l = f.debug_list();
        for e in &self.entries {
            l.entry(&format_args!("{:#x}+{:#x} {}", e.base, e.len, e.name));
        }
        l.finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Map `[base, base+len)` to `dev`; fails if the range is empty or overlaps.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        name: &str,
        dev: SharedDevice,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        if let Some(o) = self
            .entries
            .iter()
            .find(|e| base < e.base + e.len && e.base < end)
        {
            return Err(BusError::Overlap {
                base,
                len,
                name: name.to_string(),
                other_base: o.base,
                other_len: o.len,
                other: o.name.clone(),
            });
        }
        let pos = self.entries.partition_point(|e| e.base < base);
        self.entries.insert(
            pos,
            Entry {
                base,
                len,
                name: name.to_string(),
                dev,
            },
        );
        Ok(())
    }

    /// The device covering `addr` and the offset of `addr` in its range.
    pub fn lookup(&self, addr: u64) -> Option<(&SharedDevice, u64)> {
        let idx = self.entries.partition_point(|e| e.base <= addr);
        let e = self.entries.get(idx.checked_sub(1)?)?;
        (addr - e.base < e.len).then_some((&e.dev, addr - e.base))
    }

    /// Read at `addr`; returns false (and leaves `data` alone) if no device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.lookup(addr) {
            Some((dev, off)) => {
                lock(dev).read(off, data);
                true
            }
            None => false,
        }
    }

    /// Write at `addr`; `Err(())`-like `None` outer when no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> Option<Option<BusAction>> {
        let (dev, off) = self.lookup(addr)?;
        let r = lock(dev).write(off, data);
        Some(r)
    }

    /// Number of mapped ranges.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// [`crate::sync::lock`], re-exported where crate::vcpu imports it from.
pub use crate::sync::lock;

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Reg {
        last: Vec<(u64, Vec<u8>)>,
    }
    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = offset as u8 + i as u8;
            }
        }
        fn write(&mut self, offset: u64, data: &[u8]) -> Option<BusAction> {
            self.last.push((offset, data.to_vec()));
            (offset == 3).then_some(BusAction::Stop(data[0]))
        }
    }

    fn dev() -> Arc<Mutex<Reg>> {
        Arc::new(Mutex::new(Reg::default()))
    }

    #[test]
    fn insert_lookup_and_overlap() {
        let mut bus = Bus::new();
        let a = dev();
        bus.insert(0x3f8, 8, "com1", a.clone()).unwrap();
        bus.insert(0xf4, 1, "exit", dev()).unwrap();
        bus.insert(0x400, 0x10, "x", dev()).unwrap();
        assert_eq!(bus.len(), 3);
        assert!(bus.lookup(0x3f7).is_none());
        assert_eq!(bus.lookup(0x3f8).unwrap().1, 0);
        assert_eq!(bus.lookup(0x3ff).unwrap().1, 7);
        assert!(bus.lookup(0x400).is_some());
        assert!(bus.lookup(0x410).is_none());
        assert!(bus.lookup(0).is_none());
        assert!(bus.lookup(u64::MAX).is_none());
        let e = bus.insert(0x3fc, 8, "bad", dev()).unwrap_err();
        assert!(matches!(
            e,
            BusError::Overlap {
                other_base: 0x3f8,
                ..
            }
        ));
        assert!(e.to_string().contains("com1"));
        assert!(bus.insert(0x3f0, 9, "bad", dev()).is_err());
        assert!(bus.insert(0x3f0, 8, "ok", dev()).is_ok());
        assert!(matches!(
            bus.insert(5, 0, "empty", dev()),
            Err(BusError::BadRange { .. })
        ));
        assert!(matches!(
            bus.insert(u64::MAX, 2, "ovf", dev()),
            Err(BusError::BadRange { .. })
        ));
    }

    #[test]
    fn read_write_dispatch() {
        let mut bus = Bus::new();
        let a = dev();
        bus.insert(0x100, 8, "a", a.clone()).unwrap();
        let mut buf = [0u8; 2];
        assert!(bus.read(0x102, &mut buf));
        assert_eq!(buf, [2, 3]);
        assert!(!bus.read(0x200, &mut buf));
        assert_eq!(bus.write(0x101, &[9]), Some(None));
        assert_eq!(bus.write(0x103, &[7]), Some(Some(BusAction::Stop(7))));
        assert_eq!(bus.write(0x99, &[7]), None);
        assert_eq!(a.lock().unwrap().last[0], (1, vec![9]));
    }

    struct Fwd;
    impl RemoteBusForwarder for Fwd {
        fn read(&self, is_pio: bool, addr: u64, data: &mut [u8]) {
            data[0] = if is_pio { addr as u8 } else { 0 };
        }
        fn write(&self, _: bool, addr: u64, _: &[u8]) -> Option<BusAction> {
            Some(BusAction::Stop(addr as u8))
        }
    }

    #[test]
    fn proxy_forwards_absolute_addresses() {
        let mut bus = Bus::new();
        bus.insert(
            0x3f8,
            8,
            "com1-proxy",
            Arc::new(Mutex::new(ProxyDevice::new(0x3f8, true, Arc::new(Fwd)))),
        )
        .unwrap();
        let mut b = [0u8; 1];
        bus.read(0x3f9, &mut b);
        assert_eq!(b[0], 0xf9);
        assert_eq!(bus.write(0x3fa, &[0]), Some(Some(BusAction::Stop(0xfa))));
    }
}
