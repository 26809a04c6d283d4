//! Emulated devices: the COM1 16550 UART and the debug-exit port.

pub mod debug_exit;
pub mod serial;

pub use debug_exit::{DebugExit, DEBUG_EXIT_PORT};
pub use serial::{
    ConsoleInput, ConsoleInputThread, ConsoleOutput, ConsoleWriter, Serial, SerialRegs, COM1_IRQ,
    COM1_PORT,
};

/// An interrupt line into the VM's interrupt controllers (the IOAPIC pins).
/// Implemented by the VM's interrupt router.
pub trait IrqLine: Send + Sync {
    /// Drive ISA/IOAPIC pin `irq` to `level`.
    fn set_irq(&self, irq: u32, level: bool);
}

/// Errors of the devices module.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot open console log {path}: {source}")]
    ConsoleLog {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot duplicate stdout for the console: {0}")]
    ConsoleStdout(std::io::Error),
    #[error("cannot open console input {path}: {source}")]
    ConsoleInput {
        path: String,
        source: std::io::Error,
    },
    #[error("COM1 state from the snapshot: a receive FIFO of {0} bytes does not fit the UART's")]
    SerialState(usize),
}
