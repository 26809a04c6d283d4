//! The payloads of the cluster link's application messages (wire formats): the
//! message kinds, forwarded I/O requests, stop reasons and APIC addressing
//! updates. Every decoder checks every byte a peer sent.

use crate::apic;
use crate::vcpu::{StopReason, VmFailure};

/// A malformed payload from a peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("addressing update of {0} bytes (expected {ADDRESSING_BYTES})")]
    AddressingLength(usize),
    #[error("addressing update with reserved flags {0:#x}")]
    AddressingFlags(u8),
    #[error("I/O request of {0} bytes (< 16)")]
    IoShort(usize),
    #[error("malformed I/O request")]
    IoMalformed,
    #[error("stop message too short")]
    StopShort,
    #[error("stop message of unknown kind {0}")]
    StopKind(u8),
    #[error("interrupt message of {0} bytes (expected {IPI_BYTES})")]
    IpiLength(usize),
    #[error("malformed interrupt message: {0}")]
    Ipi(String),
    #[error("vCPU placement message of {0} bytes (expected {VCPU_AT_BYTES})")]
    VcpuAtLength(usize),
    #[error("vCPU state chunk of {0} bytes (< 12)")]
    ChunkShort(usize),
    #[error("vCPU {vcpu} state of {total} bytes (at most {max})")]
    StateTooLarge { vcpu: u32, total: usize, max: usize },
    #[error("vCPU {vcpu} state piece at {offset} out of order")]
    ChunkOrder { vcpu: u32, offset: usize },
}

/// Bit set in an application message kind for the response to a request.
pub const APP_RESPONSE: u64 = 1 << 63;
/// Application message: an interrupt message for one vCPU the receiver runs
/// (or forwards, [`encode_ipi`]).
pub const APP_IPI: u64 = 1;
/// Application message: a forwarded port/MMIO access (a request).
pub const APP_IO: u64 = 2;
/// Application message: the VM stopped ([`encode_stop`]).
pub const APP_STOP: u64 = 3;
/// Application message: the sender failed (utf-8 text).
pub const APP_ERROR: u64 = 4;
/// Application message: "my vCPUs are joined" (see the module docs).
pub const APP_DONE: u64 = 5;

/// Application message: addressing update of one of the sender's vCPUs.
pub const APP_ADDR: u64 = 6;

/// Application message: EOI of a level-triggered vector, for the IOAPIC owner.
pub const APP_EOI: u64 = 7;

/// Application message: a snapshot request of the boot node (JSON,
/// `vm::checkpoint`), answered by the node's [`super::SnapshotAgent`].
pub const APP_SNAP: u64 = 8;

/// Application message: "vCPU v runs on node n now" ([`encode_vcpu_at`]),
/// applied on the engine thread in order with `APP_IPI` (`vm::migrate`).
pub const APP_VCPU_AT: u64 = 9;

/// Application message: a vCPU migration request (JSON, `vm::migrate`),
/// answered by the node's [`super::VcpuAgent`].
pub const APP_MIGRATE: u64 = 10;

/// Application message: a piece of a migrating vCPU's state ([`encode_chunk`]),
/// sent ahead of the `APP_MIGRATE` request that installs it.
pub const APP_VCPU_STATE: u64 = 11;

/// Size of an [`encode_ipi`] payload.
pub const IPI_BYTES: usize = apic::INTERRUPT_MESSAGE_BYTES + 4;

/// Encode an `APP_IPI` payload: `[message (apic wire format)][vcpu u32 LE]`;
/// the message is already resolved for exactly that vCPU.
pub fn encode_ipi(vcpu: u32, m: &apic::InterruptMessage) -> [u8; IPI_BYTES] {
    let mut b = [0u8; IPI_BYTES];
    b[..apic::INTERRUPT_MESSAGE_BYTES].copy_from_slice(&m.to_bytes());
    b[apic::INTERRUPT_MESSAGE_BYTES..].copy_from_slice(&vcpu.to_le_bytes());
    b
}

/// Decode an `APP_IPI` payload.
pub fn decode_ipi(b: &[u8]) -> Result<(u32, apic::InterruptMessage), MessageError> {
    if b.len() != IPI_BYTES {
        return Err(MessageError::IpiLength(b.len()));
    }
    let (m, v) = b.split_at(apic::INTERRUPT_MESSAGE_BYTES);
    let m = apic::InterruptMessage::from_bytes(m).map_err(|e| MessageError::Ipi(e.to_string()))?;
    Ok((u32::from_le_bytes([v[0], v[1], v[2], v[3]]), m))
}

/// Size of an [`encode_vcpu_at`] payload.
pub const VCPU_AT_BYTES: usize = 10;

/// Encode an `APP_VCPU_AT` payload: `[vcpu u32 LE][node u16 LE][move u32 LE]`;
/// `move` counts the vCPU's migrations, so a late message about an older
/// place never overrides a newer one.
pub fn encode_vcpu_at(vcpu: u32, node: u16, seq: u32) -> [u8; VCPU_AT_BYTES] {
    let mut b = [0u8; VCPU_AT_BYTES];
    b[0..4].copy_from_slice(&vcpu.to_le_bytes());
    b[4..6].copy_from_slice(&node.to_le_bytes());
    b[6..10].copy_from_slice(&seq.to_le_bytes());
    b
}

/// Decode an `APP_VCPU_AT` payload: (vcpu, node, move).
pub fn decode_vcpu_at(b: &[u8]) -> Result<(u32, u16, u32), MessageError> {
    if b.len() != VCPU_AT_BYTES {
        return Err(MessageError::VcpuAtLength(b.len()));
    }
    let w = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    Ok((w(0), u16::from_le_bytes([b[4], b[5]]), w(6)))
}

/// Encode an `APP_VCPU_STATE` payload: `[vcpu u32][total u32][offset u32][bytes]`.
pub fn encode_chunk(vcpu: u32, total: u32, offset: u32, bytes: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(12 + bytes.len());
    b.extend_from_slice(&vcpu.to_le_bytes());
    b.extend_from_slice(&total.to_le_bytes());
    b.extend_from_slice(&offset.to_le_bytes());
    b.extend_from_slice(bytes);
    b
}

/// Decode an `APP_VCPU_STATE` payload: (vcpu, total, offset, bytes).
pub fn decode_chunk(b: &[u8]) -> Result<(u32, u32, u32, &[u8]), MessageError> {
    if b.len() < 12 {
        return Err(MessageError::ChunkShort(b.len()));
    }
    let w = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    Ok((w(0), w(4), w(8), &b[12..]))
}

/// Size of an [`encode_addressing`] payload.
pub const ADDRESSING_BYTES: usize = 13;

/// Encode an `APP_ADDR` payload:
/// `[vcpu u32 LE][id u32 LE][ldr u32 LE][flags u8: 1 flat model, 2 x2APIC, 4 enabled,
/// 8 software-enabled]`.
pub fn encode_addressing(vcpu: u32, a: &apic::ApicAddressing) -> [u8; ADDRESSING_BYTES] {
    let mut b = [0u8; ADDRESSING_BYTES];
    b[0..4].copy_from_slice(&vcpu.to_le_bytes());
    b[4..8].copy_from_slice(&a.id.to_le_bytes());
    b[8..12].copy_from_slice(&a.ldr.to_le_bytes());
    b[12] = u8::from(a.flat_model)
        | (u8::from(a.x2apic) << 1)
        | (u8::from(a.enabled) << 2)
        | (u8::from(a.software_enabled) << 3);
    b
}

/// Decode [`encode_addressing`].
pub fn decode_addressing(b: &[u8]) -> Result<(u32, apic::ApicAddressing), MessageError> {
    if b.len() != ADDRESSING_BYTES {
        return Err(MessageError::AddressingLength(b.len()));
    }
    let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let flags = b[12];
    if flags & !0xF != 0 {
        return Err(MessageError::AddressingFlags(flags));
    }
    Ok((
        word(0),
        apic::ApicAddressing {
            id: word(4),
            ldr: word(8),
            flat_model: flags & 1 != 0,
            x2apic: flags & 2 != 0,
            enabled: flags & 4 != 0,
            software_enabled: flags & 8 != 0,
        },
    ))
}

/// A forwarded device access (wire format of `APP_IO` requests):
/// `[is_pio u8][is_write u8][len u8][0; 5][addr u64 LE][data; len]`. The response is
/// `[action u8 (0 none, 1 stop)][status u8][read data; len]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoRequest {
    pub is_pio: bool,
    pub is_write: bool,
    pub addr: u64,
    /// Write data, or a zeroed buffer of the read length.
    pub data: Vec<u8>,
}

impl IoRequest {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(16 + self.data.len());
        v.push(self.is_pio as u8);
        v.push(self.is_write as u8);
        v.push(self.data.len() as u8);
        v.extend_from_slice(&[0; 5]);
        v.extend_from_slice(&self.addr.to_le_bytes());
        v.extend_from_slice(&self.data);
        v
    }

    pub fn from_bytes(b: &[u8]) -> Result<Self, MessageError> {
        if b.len() < 16 {
            return Err(MessageError::IoShort(b.len()));
        }
        let len = usize::from(b[2]);
        if b[0] > 1 || b[1] > 1 || !(1..=8).contains(&len) || b.len() != 16 + len {
            return Err(MessageError::IoMalformed);
        }
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[8..16]);
        Ok(IoRequest {
            is_pio: b[0] == 1,
            is_write: b[1] == 1,
            addr: u64::from_le_bytes(a),
            data: b[16..].to_vec(),
        })
    }
}

/// Encode a stop reason for `APP_STOP`: `[kind u8][status u8][utf-8 message]`.
pub fn encode_stop(r: &StopReason) -> Vec<u8> {
    let owned;
    let (kind, status, msg): (u8, u8, &str) = match r {
        StopReason::DebugExit(s) => (0, *s, ""),
        StopReason::Shutdown(m) => (1, 0, m),
        StopReason::Crash { error, .. } => (2, 0, error),
        StopReason::Error(e) => {
            owned = e.to_string();
            (3, 0, &owned)
        }
        StopReason::Timeout => (4, 0, ""),
        StopReason::Stopped => (5, 0, ""),
        StopReason::Snapshotted(dir) => (6, 0, dir),
    };
    let mut v = vec![kind, status];
    let m = msg.as_bytes();
    v.extend_from_slice(&m[..m.len().min(crate::dsm::wire::MAX_APP_PAYLOAD - 2)]);
    v
}

/// Decode an `APP_STOP` payload sent by node `from` (described as `who`).
pub fn decode_stop(who: &str, b: &[u8]) -> Result<StopReason, MessageError> {
    if b.len() < 2 {
        return Err(MessageError::StopShort);
    }
    let msg = String::from_utf8_lossy(&b[2..]).into_owned();
    Ok(match b[0] {
        0 => StopReason::DebugExit(b[1]),
        1 => StopReason::Shutdown(format!("{who}: {msg}")),
        2 => StopReason::Crash {
            error: format!("{who}: {msg}"),
            dump: None,
        },
        3 => StopReason::Error(VmFailure::Remote(format!("{who}: {msg}"))),
        4 => StopReason::Timeout,
        5 => StopReason::Stopped,
        6 => StopReason::Snapshotted(msg),
        k => return Err(MessageError::StopKind(k)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipi_vcpu_at_and_chunk_payloads_round_trip_and_are_checked() {
        let m = apic::InterruptMessage {
            vector: 0x42,
            delivery_mode: apic::DeliveryMode::Fixed,
            trigger_mode: apic::TriggerMode::Edge,
            level: true,
            destination: apic::Destination {
                id: 3,
                mode: apic::DestinationMode::Physical,
                shorthand: apic::Shorthand::None,
                x2apic_format: true,
            },
            source_id: Some(1),
        };
        let b = encode_ipi(3, &m);
        let (v, back) = decode_ipi(&b).unwrap();
        assert_eq!((v, back.vector, back.destination.id), (3, 0x42, 3));
        assert_eq!(decode_ipi(&b[..12]), Err(MessageError::IpiLength(12)));
        let p = encode_vcpu_at(7, 2, 41);
        assert_eq!(decode_vcpu_at(&p), Ok((7, 2, 41)));
        assert_eq!(decode_vcpu_at(&p[1..]), Err(MessageError::VcpuAtLength(9)));
        let c = encode_chunk(1, 100, 40, b"abc");
        assert_eq!(decode_chunk(&c), Ok((1, 100, 40, &b"abc"[..])));
        assert_eq!(decode_chunk(&c[..11]), Err(MessageError::ChunkShort(11)));
    }

    #[test]
    fn io_request_round_trip_and_rejects_garbage() {
        let r = IoRequest {
            is_pio: true,
            is_write: true,
            addr: 0x3f8,
            data: vec![b'x'],
        };
        assert_eq!(IoRequest::from_bytes(&r.to_bytes()).unwrap(), r);
        assert!(IoRequest::from_bytes(&[1, 2, 3]).is_err());
        let mut b = r.to_bytes();
        b[2] = 9;
        assert!(IoRequest::from_bytes(&b).is_err());
    }

    #[test]
    fn stop_round_trip() {
        for r in [
            StopReason::DebugExit(7),
            StopReason::Timeout,
            StopReason::Stopped,
        ] {
            assert_eq!(decode_stop("node 1", &encode_stop(&r)).unwrap(), r);
        }
        let e = decode_stop(
            "node 1",
            &encode_stop(&StopReason::Error(VmFailure::Remote("boom".into()))),
        )
        .unwrap();
        assert_eq!(
            e,
            StopReason::Error(VmFailure::Remote("node 1: boom".into()))
        );
        assert!(decode_stop("n", &[9, 0]).is_err());
        assert!(decode_stop("n", &[]).is_err());
    }

    #[test]
    fn addressing_update_round_trip_and_rejects_garbage() {
        let a = apic::ApicAddressing {
            id: 0x1_0013,
            ldr: 0x0001_0008,
            flat_model: false,
            x2apic: true,
            enabled: true,
            software_enabled: true,
        };
        let b = encode_addressing(7, &a);
        assert_eq!(decode_addressing(&b).unwrap(), (7, a));
        for flat in [false, true] {
            for x2 in [false, true] {
                for en in [false, true] {
                    for sw in [false, true] {
                        let a = apic::ApicAddressing {
                            id: 3,
                            ldr: 0x0800_0000,
                            flat_model: flat,
                            x2apic: x2,
                            enabled: en,
                            software_enabled: sw,
                        };
                        let d = decode_addressing(&encode_addressing(3, &a)).unwrap().1;
                        assert_eq!(d, a);
                    }
                }
            }
        }
        assert!(decode_addressing(&b[..12]).is_err());
        assert!(decode_addressing(&[]).is_err());
        let mut bad = b;
        bad[12] |= 0x80;
        assert_eq!(
            decode_addressing(&bad).unwrap_err(),
            MessageError::AddressingFlags(0x8E)
        );
    }
}
