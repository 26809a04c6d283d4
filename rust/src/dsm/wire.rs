//! The framed, versioned binary protocol between nodes.
//!
//! Every frame is a fixed-size 48-byte little-endian [`Header`] (`#[repr(C)]`,
//! zerocopy) followed by `len` payload bytes. Every field is validated strictly:
//! magic, protocol version, message type, payload length (exact for each type),
//! flags (only the defined bits), the per-connection sequence number (must be the
//! previous one plus one: detects loss, reordering or replay within a stream) and,
//! for page messages, the page index range. A violation is a [`WireError`]
//! naming the field; the transport then drops the connection with that reason.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::protocol::{Access, Data, Keep, Msg, NodeId, PageIdx, MAX_NODES, MAX_PREFETCH};
use super::seal::{Opener, SealError};

/// "DVMS" (dvmm shared memory).
pub const MAGIC: u32 = 0x534d_5644;
/// Version of this wire protocol.
pub const WIRE_VERSION: u16 = 1;
/// Size of a guest page (payload of a page transfer).
pub const PAGE_SIZE: usize = 4096;
/// Largest payload of an application message.
pub const MAX_APP_PAYLOAD: usize = 4096;
/// Size of the header.
pub const HEADER_SIZE: usize = std::mem::size_of::<Header>();
/// Largest frame (header and payload) of any type.
pub const MAX_FRAME: usize = HEADER_SIZE
    + if PAGE_SIZE > MAX_APP_PAYLOAD {
        PAGE_SIZE
    } else {
        MAX_APP_PAYLOAD
    };

/// Errors decoding a frame; each names the offending field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("bad magic {0:#x}")]
    Magic(u32),
    #[error("unsupported protocol version {0}")]
    Version(u16),
    #[error("unknown message type {0}")]
    Type(u16),
    #[error("bad length {len} for message type {ty}")]
    Length { ty: u16, len: u32 },
    #[error("bad flags {flags:#x} for message type {ty}")]
    Flags { ty: u16, flags: u32 },
    #[error("bad sequence number {got} (expected {expected})")]
    Seq { got: u64, expected: u64 },
    #[error("page {page} out of range (guest has {pages} pages)")]
    Page { page: u64, pages: u64 },
    #[error("bad node index {0}")]
    Node(u64),
    #[error("message type {0} not allowed here")]
    Unexpected(u16),
    #[error("page grant for page {page} without its 4 KiB of data")]
    MissingData { page: u64 },
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error("sealed record of {record} bytes holds a frame of {frame}")]
    Record { record: usize, frame: usize },
}

/// Check that a coherence message can be encoded with `data`: a page grant
/// needs exactly one page of data (a grant must never carry made-up contents).
pub fn check_msg(msg: &Msg, data: Option<&[u8]>) -> Result<(), WireError> {
    if let Msg::Grant {
        page,
        data: Data::Page,
        ..
    } = *msg
    {
        if data.map(<[u8]>::len) != Some(PAGE_SIZE) {
            return Err(WireError::MissingData { page });
        }
    }
    Ok(())
}

/// The fixed frame header.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Default)]
#[repr(C)]
pub struct Header {
    pub magic: U32,
    pub version: U16,
    pub ty: U16,
    pub len: U32,
    pub flags: U32,
    pub page: U64,
    pub seq: U64,
    pub arg0: U64,
    pub arg1: U64,
}

const _: () = assert!(std::mem::size_of::<Header>() == 48);

/// Message types.
pub mod ty {
    pub const REQ: u16 = 1;
    pub const EVICT: u16 = 2;
    pub const INV: u16 = 3;
    pub const INV_ACK: u16 = 4;
    pub const FETCH: u16 = 5;
    pub const GRANT: u16 = 6;
    pub const DONE: u16 = 7;
    /// Sequential prefetch: `page` = first page, `arg0` = number of pages.
    pub const PREFETCH: u16 = 8;
    pub const NACK: u16 = 9;
    /// Application (non-memory) message; `arg0` = app kind, `arg1` = app tag.
    pub const APP: u16 = 16;
    /// Keep-alive.
    pub const PING: u16 = 17;
    /// Authentication handshake.
    pub const HELLO: u16 = 32;
    pub const CHALLENGE: u16 = 33;
    pub const RESPONSE: u16 = 34;
    pub const AUTH_OK: u16 = 35;
}

// Flag bits.
const F_WRITE: u32 = 1; // Req/Grant: write access
const F_KEEP_DROP: u32 = 2; // Fetch: drop after sending
const F_DATA: u32 = 4; // Fetch: send data
const F_ZERO: u32 = 8; // Grant: zero page
const F_PAGE: u32 = 16; // Grant: 4 KiB payload follows

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A coherence message; `data` is the page for a `Grant` with `Data::Page`.
    Proto { msg: Msg, data: Option<Box<[u8]>> },
    /// A non-memory message for the VM (interrupts, I/O forwarding, stop...).
    App {
        kind: u64,
        tag: u64,
        payload: Vec<u8>,
    },
    /// Keep-alive.
    Ping,
    /// Handshake frames (see `auth`).
    Auth {
        ty: u16,
        arg0: u64,
        arg1: u64,
        payload: Vec<u8>,
    },
}

fn header(ty: u16, len: usize, flags: u32, page: u64, seq: u64, arg0: u64, arg1: u64) -> Header {
    Header {
        magic: MAGIC.into(),
        version: WIRE_VERSION.into(),
        ty: ty.into(),
        len: (len as u32).into(),
        flags: flags.into(),
        page: page.into(),
        seq: seq.into(),
        arg0: arg0.into(),
        arg1: arg1.into(),
    }
}

/// Encode a frame with sequence number `seq`, appending to `out`.
/// `page_data` must be `Some` (4096 bytes) exactly for a `Grant` with `Data::Page`.
pub fn encode(frame: &Frame, seq: u64, out: &mut Vec<u8>) {
    match frame {
        Frame::Proto { msg, data } => encode_msg(msg, data.as_deref(), seq, out),
        Frame::App { kind, tag, payload } => {
            let h = header(ty::APP, payload.len(), 0, 0, seq, *kind, *tag);
            out.extend_from_slice(h.as_bytes());
            out.extend_from_slice(payload);
        }
        Frame::Ping => out.extend_from_slice(header(ty::PING, 0, 0, 0, seq, 0, 0).as_bytes()),
        Frame::Auth {
            ty,
            arg0,
            arg1,
            payload,
        } => {
            let h = header(*ty, payload.len(), 0, 0, seq, *arg0, *arg1);
            out.extend_from_slice(h.as_bytes());
            out.extend_from_slice(payload);
        }
    }
}

/// Encode a protocol message (with its page for a data grant).
pub fn encode_msg(msg: &Msg, data: Option<&[u8]>, seq: u64, out: &mut Vec<u8>) {
    let w = |a: Access| if a == Access::Write { F_WRITE } else { 0 };
    let h = match *msg {
        Msg::Req { page, access, have } => header(ty::REQ, 0, w(access), page, seq, have, 0),
        Msg::Evict { page } => header(ty::EVICT, 0, 0, page, seq, 0, 0),
        Msg::Inv { page } => header(ty::INV, 0, 0, page, seq, 0, 0),
        Msg::InvAck { page } => header(ty::INV_ACK, 0, 0, page, seq, 0, 0),
        Msg::Done { page } => header(ty::DONE, 0, 0, page, seq, 0, 0),
        Msg::Prefetch { page, count } => header(ty::PREFETCH, 0, 0, page, seq, u64::from(count), 0),
        Msg::Nack { page } => header(ty::NACK, 0, 0, page, seq, 0, 0),
        Msg::Fetch {
            page,
            to,
            keep,
            version,
            data,
        } => {
            let mut f = if keep == Keep::Drop { F_KEEP_DROP } else { 0 };
            if data {
                f |= F_DATA;
            }
            header(ty::FETCH, 0, f, page, seq, version, u64::from(to))
        }
        Msg::Grant {
            page,
            access,
            version,
            data: d,
        } => {
            let (f, len) = match d {
                Data::None => (0, 0),
                Data::Zero => (F_ZERO, 0),
                Data::Page => (F_PAGE, PAGE_SIZE),
            };
            header(ty::GRANT, len, w(access) | f, page, seq, version, 0)
        }
    };
    out.extend_from_slice(h.as_bytes());
    if let Msg::Grant {
        data: Data::Page, ..
    } = msg
    {
        match data {
            Some(d) if d.len() == PAGE_SIZE => out.extend_from_slice(d),
            // Senders call `check_msg` first (TcpMesh::send_msg does); a frame of
            // the right length keeps the stream in sync if one does not.
            _ => out.resize(out.len() + PAGE_SIZE, 0),
        }
    }
}

/// Validation context of one connection's receive side.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Number of guest pages (page fields must be below).
    pub pages: u64,
    /// Number of nodes (node fields must be below).
    pub nodes: usize,
}

/// Parse and validate a header; returns the payload length to read next.
pub fn check_header(h: &Header, expected_seq: u64, limits: &Limits) -> Result<usize, WireError> {
    if h.magic.get() != MAGIC {
        return Err(WireError::Magic(h.magic.get()));
    }
    if h.version.get() != WIRE_VERSION {
        return Err(WireError::Version(h.version.get()));
    }
    let t = h.ty.get();
    let len = h.len.get();
    let flags = h.flags.get();
    let (allowed_flags, len_ok) = match t {
        ty::REQ => (F_WRITE, len == 0),
        ty::EVICT | ty::INV | ty::INV_ACK | ty::DONE | ty::PING | ty::PREFETCH | ty::NACK => {
            (0, len == 0)
        }
        ty::FETCH => (F_KEEP_DROP | F_DATA, len == 0),
        ty::GRANT => {
            let l = if flags & F_PAGE != 0 {
                PAGE_SIZE as u32
            } else {
                0
            };
            (F_WRITE | F_ZERO | F_PAGE, len == l)
        }
        ty::APP => (0, len as usize <= MAX_APP_PAYLOAD),
        ty::HELLO | ty::CHALLENGE | ty::RESPONSE | ty::AUTH_OK => (0, len <= 128),
        _ => return Err(WireError::Type(t)),
    };
    if !len_ok {
        return Err(WireError::Length { ty: t, len });
    }
    if flags & !allowed_flags != 0 || (t == ty::GRANT && flags & F_ZERO != 0 && flags & F_PAGE != 0)
    {
        return Err(WireError::Flags { ty: t, flags });
    }
    if h.seq.get() != expected_seq {
        return Err(WireError::Seq {
            got: h.seq.get(),
            expected: expected_seq,
        });
    }
    if t == ty::PREFETCH {
        let count = h.arg0.get();
        if count == 0
            || count > u64::from(MAX_PREFETCH)
            || h.page.get().saturating_add(count) > limits.pages
        {
            return Err(WireError::Length {
                ty: t,
                len: count.min(u64::from(u32::MAX)) as u32,
            });
        }
    }
    if (ty::REQ..=ty::NACK).contains(&t) && h.page.get() >= limits.pages {
        return Err(WireError::Page {
            page: h.page.get(),
            pages: limits.pages,
        });
    }
    if t == ty::FETCH && h.arg1.get() >= limits.nodes.min(MAX_NODES) as u64 {
        return Err(WireError::Node(h.arg1.get()));
    }
    Ok(len as usize)
}

/// Build a frame from a validated header and its payload.
pub fn decode(h: &Header, payload: Vec<u8>) -> Result<Frame, WireError> {
    let page: PageIdx = h.page.get();
    let flags = h.flags.get();
    let access = if flags & F_WRITE != 0 {
        Access::Write
    } else {
        Access::Read
    };
    let msg = match h.ty.get() {
        ty::REQ => Msg::Req {
            page,
            access,
            have: h.arg0.get(),
        },
        ty::EVICT => Msg::Evict { page },
        ty::INV => Msg::Inv { page },
        ty::INV_ACK => Msg::InvAck { page },
        ty::DONE => Msg::Done { page },
        ty::PREFETCH => Msg::Prefetch {
            page,
            // Validated by check_header (1..=MAX_PREFETCH).
            count: h.arg0.get() as u32,
        },
        ty::NACK => Msg::Nack { page },
        ty::FETCH => Msg::Fetch {
            page,
            to: NodeId::try_from(h.arg1.get()).map_err(|_| WireError::Node(h.arg1.get()))?,
            keep: if flags & F_KEEP_DROP != 0 {
                Keep::Drop
            } else {
                Keep::Shared
            },
            version: h.arg0.get(),
            data: flags & F_DATA != 0,
        },
        ty::GRANT => {
            let data = if flags & F_PAGE != 0 {
                Data::Page
            } else if flags & F_ZERO != 0 {
                Data::Zero
            } else {
                Data::None
            };
            let msg = Msg::Grant {
                page,
                access,
                version: h.arg0.get(),
                data,
            };
            let d = if data == Data::Page {
                Some(payload.into_boxed_slice())
            } else {
                None
            };
            return Ok(Frame::Proto { msg, data: d });
        }
        ty::APP => {
            return Ok(Frame::App {
                kind: h.arg0.get(),
                tag: h.arg1.get(),
                payload,
            })
        }
        ty::PING => return Ok(Frame::Ping),
        t @ (ty::HELLO | ty::CHALLENGE | ty::RESPONSE | ty::AUTH_OK) => {
            return Ok(Frame::Auth {
                ty: t,
                arg0: h.arg0.get(),
                arg1: h.arg1.get(),
                payload,
            })
        }
        t => return Err(WireError::Type(t)),
    };
    Ok(Frame::Proto { msg, data: None })
}

/// Incremental decoder for one byte stream (sealed records after the
/// handshake, see `seal`).
#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    pos: usize,
    next_seq: u64,
    limits: Limits,
    opener: Opener,
}

impl Decoder {
    pub fn new(limits: Limits, first_seq: u64) -> Self {
        Decoder {
            buf: Vec::with_capacity(64 * 1024),
            pos: 0,
            next_seq: first_seq,
            limits,
            opener: Opener::plain(),
        }
    }

    /// A decoder of sealed records.
    pub fn sealed(limits: Limits, first_seq: u64, opener: Opener) -> Self {
        Decoder {
            opener,
            ..Decoder::new(limits, first_seq)
        }
    }

    /// Set the limits (after the handshake, when the guest size is known).
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// Append received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > 256 * 1024 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Next complete frame, if any.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        if self.opener.is_sealed() {
            return self.next_sealed();
        }
        let avail = &self.buf[self.pos..];
        let Ok((h, _)) = Header::read_from_prefix(avail) else {
            return Ok(None);
        };
        let len = check_header(&h, self.next_seq, &self.limits)?;
        if avail.len() < HEADER_SIZE + len {
            return Ok(None);
        }
        let payload = avail[HEADER_SIZE..HEADER_SIZE + len].to_vec();
        self.pos += HEADER_SIZE + len;
        self.next_seq += 1;
        decode(&h, payload).map(Some)
    }

    /// Open the next record in place, then validate its frame as usual.
    fn next_sealed(&mut self) -> Result<Option<Frame>, WireError> {
        let avail = &mut self.buf[self.pos..];
        let Some(r) = self.opener.open(self.next_seq, avail, MAX_FRAME)? else {
            return Ok(None);
        };
        let body = &avail[r.body_start..r.body_end];
        let Ok((h, _)) = Header::read_from_prefix(body) else {
            return Err(WireError::Record {
                record: body.len(),
                frame: HEADER_SIZE,
            });
        };
        let len = check_header(&h, self.next_seq, &self.limits)?;
        if body.len() != HEADER_SIZE + len {
            return Err(WireError::Record {
                record: body.len(),
                frame: HEADER_SIZE + len,
            });
        }
        let payload = body[HEADER_SIZE..].to_vec();
        self.pos += r.consumed;
        self.next_seq += 1;
        decode(&h, payload).map(Some)
    }
}
