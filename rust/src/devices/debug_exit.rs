//! Debug-exit port (as QEMU's `isa-debug-exit`): a write of 1-4 bytes stops the VM
//! with the first byte as status. Unlike QEMU (which exits with `(value << 1) | 1`),
//! the status is the raw byte the guest wrote.

use crate::bus::{BusAction, BusDevice};

/// The port the bundled guest (and `-device isa-debug-exit,iobase=0xf4`) uses.
pub const DEBUG_EXIT_PORT: u16 = 0xF4;

/// The debug-exit device.
#[derive(Debug, Default)]
pub struct DebugExit;

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xFF);
    }
    fn write(&mut self, _offset: u64, data: &[u8]) -> Option<BusAction> {
        data.first().map(|b| BusAction::Stop(*b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_stops_with_raw_byte() {
        let mut d = DebugExit;
        assert_eq!(d.write(0, &[0x31]), Some(BusAction::Stop(0x31)));
        assert_eq!(d.write(0, &[0, 1, 2, 3]), Some(BusAction::Stop(0)));
        assert_eq!(d.write(0, &[]), None);
        let mut b = [0u8; 2];
        d.read(0, &mut b);
        assert_eq!(b, [0xff, 0xff]);
    }
}
