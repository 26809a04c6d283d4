//! The framed, versioned binary protocol between nodes.
//!
//! Every frame is a fixed-size 48-byte little-endian [`Header`] (`#[repr(C)]`,
//! zerocopy) followed by `len` payload bytes. Every field is validated strictly:
//! magic, protocol version, message type, payload length (exact for each type),
//! flags (only the defined bits), the per-connection sequence number (must be the
//! previous one plus one: detects loss, reordering or replay within a stream) and,
//! for page messages, the page index range. A violation is a [`WireError`]
//! naming the field; the transport then drops the connection with that reason.
//!
//! # Range messages
//!
//! A [`RangeMsg`] (up to [`MAX_RANGE`] pages, 2 MiB) is larger than a frame
//! ([`MAX_FRAME`]: one header and one 4 KiB page), and every frame stays
//! sealed on its own, so a range message travels as a *train* of frames, sent
//! back to back on one lane with nothing in between ([`RangeFrames`];
//! transports push a whole train under one lock of the lane):
//!
//! 1. the head (`ty::R_REQ` ... `ty::R_NACK`: `page` = first page, `arg0` =
//!    count, `arg1` = `to` of a `Fetch`, flags as for the single-page types)
//!    with the first 4 KiB of the per-page arrays: `have[count]` (Req),
//!    `versions[count]` (Fetch), `kinds[count]` (one byte: 0 none, 1 zero,
//!    2 page) then `versions[count]` (Grant); u64 little-endian;
//! 2. `ty::R_MORE` frames with the rest of the arrays, 4 KiB each (only a
//!    `Grant` of more than 455 pages needs one);
//! 3. for a `Grant`, one `ty::R_PAGE` frame per page of data (`page` = that
//!    page), in page order.
//!
//! Why one lane and not "control message on the control lane, pages on the
//! bulk lane": the receiver then assembles a train from consecutive frames of
//! one connection ([`Decoder`]), with at most one train in progress per
//! connection (bounded: 2 MiB) and no matching of frames across connections,
//! whose unmatched halves a peer could make us buffer without bound. A grant
//! with data goes on the bulk lane as a whole (its head is of no use before
//! its pages anyway); every other range message is a head (plus at most one
//! `R_MORE`) on the control lane. A frame of any other type inside a train, a
//! page out of order, a continuation that does not fit, a count of 0 or above
//! [`MAX_RANGE`] or pages past the guest's end are [`WireError`]s.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::protocol::{
    Access, Data, Keep, Msg, NodeId, OnBusy, PageIdx, RangeMsg, MAX_NODES, MAX_PREFETCH, MAX_RANGE,
};
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
    #[error("bad range message (first page {first}, {count} pages): {why}")]
    Range {
        first: u64,
        count: u64,
        why: &'static str,
    },
    #[error("message type {0} inside a range message")]
    RangeInterrupted(u16),
}

/// Bytes of per-page arrays a range message's head (or an `R_MORE` frame)
/// carries at most.
pub const RANGE_CHUNK: usize = PAGE_SIZE;

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
    /// Heads of range messages (see the module doc): `page` = first page,
    /// `arg0` = count; payload: the first [`super::RANGE_CHUNK`] bytes of the
    /// per-page arrays.
    pub const R_REQ: u16 = 40;
    pub const R_INV: u16 = 41;
    pub const R_INV_ACK: u16 = 42;
    pub const R_FETCH: u16 = 43;
    pub const R_GRANT: u16 = 44;
    pub const R_DONE: u16 = 45;
    pub const R_NACK: u16 = 46;
    /// The rest of a range message's arrays; `page` = its first page.
    pub const R_MORE: u16 = 47;
    /// One page of a range grant; `page` = that page.
    pub const R_PAGE: u16 = 48;
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
const F_DECLINE: u32 = 32; // range Req: decline busy pages (OnBusy::Decline)

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
    /// A range message (assembled from its train of frames); `data` holds
    /// its pages of data in slot order ([`RangeMsg::slot_of`]), 4 KiB each,
    /// for a `Grant` with `Data::Page` pages.
    Range {
        msg: RangeMsg,
        data: Option<Box<[u8]>>,
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
/// A [`Frame::Range`] is a train of [`frame_count`] frames, written here with
/// the sequence numbers `seq..`: only usable unsealed (tests); transports seal
/// each frame of a train on its own with [`RangeFrames`]. A range frame that
/// cannot be encoded (see [`RangeFrames::new`]) writes nothing.
pub fn encode(frame: &Frame, seq: u64, out: &mut Vec<u8>) {
    match frame {
        Frame::Proto { msg, data } => encode_msg(msg, data.as_deref(), seq, out),
        Frame::Range { msg, data } => {
            if let Ok(t) = RangeFrames::new(msg, data.as_deref().unwrap_or(&[])) {
                for i in 0..t.len() {
                    t.encode(i, seq + i as u64, out);
                }
            }
        }
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

/// How many frames [`encode`] writes for `frame` (0: a range frame that
/// cannot be encoded).
pub fn frame_count(frame: &Frame) -> usize {
    match frame {
        Frame::Range { msg, data } => {
            RangeFrames::new(msg, data.as_deref().unwrap_or(&[])).map_or(0, |t| t.len())
        }
        _ => 1,
    }
}

/// Bytes of the per-page arrays of a range message of type `t`.
fn range_body_len(t: u16, count: usize) -> usize {
    match t {
        ty::R_REQ | ty::R_FETCH => 8 * count,
        ty::R_GRANT => 9 * count,
        _ => 0,
    }
}

const KIND_NONE: u8 = 0;
const KIND_ZERO: u8 = 1;
const KIND_PAGE: u8 = 2;

/// The train of frames of one range message (see the module doc).
#[derive(Debug)]
pub struct RangeFrames<'a> {
    msg: &'a RangeMsg,
    ty: u16,
    flags: u32,
    arg1: u64,
    body: Vec<u8>,
    chunks: usize,
    /// The pages of data, in slot order.
    page_idx: Vec<PageIdx>,
    pages: &'a [u8],
}

impl<'a> RangeFrames<'a> {
    /// Check `msg` and its `pages` (the `Data::Page` pages of a `Grant`, 4 KiB
    /// each, in slot order): 1 to [`MAX_RANGE`] pages, per-page arrays of
    /// `count` entries, exactly the data the grant announces (a grant must
    /// never carry made-up contents).
    pub fn new(msg: &'a RangeMsg, pages: &'a [u8]) -> Result<Self, WireError> {
        let (first, count) = msg.span();
        let bad = |why| WireError::Range {
            first,
            count: u64::from(count),
            why,
        };
        if count == 0 || count > MAX_RANGE {
            return Err(bad("1 to 512 pages"));
        }
        let n = count as usize;
        let w = |a: Access| if a == Access::Write { F_WRITE } else { 0 };
        let mut body = Vec::new();
        let mut page_idx = Vec::new();
        let (t, flags, arg1) = match msg {
            RangeMsg::Req {
                access, busy, have, ..
            } => {
                if have.len() != n {
                    return Err(bad("versions do not match the count"));
                }
                have.iter()
                    .for_each(|v| body.extend_from_slice(&v.to_le_bytes()));
                let d = if *busy == OnBusy::Decline {
                    F_DECLINE
                } else {
                    0
                };
                (ty::R_REQ, w(*access) | d, 0)
            }
            RangeMsg::Inv { .. } => (ty::R_INV, 0, 0),
            RangeMsg::InvAck { .. } => (ty::R_INV_ACK, 0, 0),
            RangeMsg::Done { .. } => (ty::R_DONE, 0, 0),
            RangeMsg::Nack { .. } => (ty::R_NACK, 0, 0),
            RangeMsg::Fetch {
                to, keep, versions, ..
            } => {
                if versions.len() != n {
                    return Err(bad("versions do not match the count"));
                }
                versions
                    .iter()
                    .for_each(|v| body.extend_from_slice(&v.to_le_bytes()));
                let k = if *keep == Keep::Drop { F_KEEP_DROP } else { 0 };
                (ty::R_FETCH, k, u64::from(*to))
            }
            RangeMsg::Grant {
                access,
                versions,
                data,
                ..
            } => {
                if versions.len() != n || data.len() != n {
                    return Err(bad("per-page entries do not match the count"));
                }
                for (i, d) in data.iter().enumerate() {
                    body.push(match d {
                        Data::None => KIND_NONE,
                        Data::Zero => KIND_ZERO,
                        Data::Page => {
                            page_idx.push(first + i as u64);
                            KIND_PAGE
                        }
                    });
                }
                versions
                    .iter()
                    .for_each(|v| body.extend_from_slice(&v.to_le_bytes()));
                (ty::R_GRANT, w(*access), 0)
            }
        };
        if pages.len() != page_idx.len() * PAGE_SIZE {
            return Err(bad("the data does not match the grant's pages"));
        }
        Ok(RangeFrames {
            msg,
            ty: t,
            flags,
            arg1,
            chunks: body.len().div_ceil(RANGE_CHUNK).max(1),
            body,
            page_idx,
            pages,
        })
    }

    /// Number of frames of the train.
    #[allow(clippy::len_without_is_empty)] // never empty: there is a head
    pub fn len(&self) -> usize {
        self.chunks + self.page_idx.len()
    }

    /// Whether the train goes on the bulk lane (it carries page data).
    pub fn is_bulk(&self) -> bool {
        !self.page_idx.is_empty()
    }

    /// Append frame `i` of the train (0: the head) with sequence number `seq`.
    pub fn encode(&self, i: usize, seq: u64, out: &mut Vec<u8>) {
        let (first, count) = self.msg.span();
        if i < self.chunks {
            let lo = i * RANGE_CHUNK;
            let hi = (lo + RANGE_CHUNK).min(self.body.len());
            let chunk = self.body.get(lo..hi).unwrap_or(&[]);
            let h = if i == 0 {
                header(
                    self.ty,
                    chunk.len(),
                    self.flags,
                    first,
                    seq,
                    u64::from(count),
                    self.arg1,
                )
            } else {
                header(ty::R_MORE, chunk.len(), 0, first, seq, 0, 0)
            };
            out.extend_from_slice(h.as_bytes());
            out.extend_from_slice(chunk);
            return;
        }
        let j = i - self.chunks;
        let Some(&page) = self.page_idx.get(j) else {
            return;
        };
        out.extend_from_slice(header(ty::R_PAGE, PAGE_SIZE, 0, page, seq, 0, 0).as_bytes());
        out.extend_from_slice(&self.pages[j * PAGE_SIZE..(j + 1) * PAGE_SIZE]);
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
        ty::R_REQ..=ty::R_NACK => {
            let count = usize::try_from(h.arg0.get()).unwrap_or(usize::MAX);
            let f = match t {
                ty::R_REQ => F_WRITE | F_DECLINE,
                ty::R_FETCH => F_KEEP_DROP,
                ty::R_GRANT => F_WRITE,
                _ => 0,
            };
            let body = range_body_len(t, count.min(MAX_RANGE as usize));
            (f, len as usize == body.min(RANGE_CHUNK))
        }
        ty::R_MORE => (0, len > 0 && len as usize <= RANGE_CHUNK),
        ty::R_PAGE => (0, len as usize == PAGE_SIZE),
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
    if (ty::R_REQ..=ty::R_NACK).contains(&t) {
        let count = h.arg0.get();
        let bad = |why| WireError::Range {
            first: h.page.get(),
            count,
            why,
        };
        if count == 0 || count > u64::from(MAX_RANGE) {
            return Err(bad("1 to 512 pages"));
        }
        if h.page.get().saturating_add(count) > limits.pages {
            return Err(bad("past the end of guest memory"));
        }
    }
    if (t == ty::R_FETCH) && h.arg1.get() >= limits.nodes.min(MAX_NODES) as u64 {
        return Err(WireError::Node(h.arg1.get()));
    }
    let paged = (ty::REQ..=ty::NACK).contains(&t) || (ty::R_REQ..=ty::R_PAGE).contains(&t);
    if paged && h.page.get() >= limits.pages {
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
        // Range frames are assembled by `Decoder` (several frames each).
        t @ ty::R_REQ..=ty::R_PAGE => return Err(WireError::Unexpected(t)),
        t => return Err(WireError::Type(t)),
    };
    Ok(Frame::Proto { msg, data: None })
}

/// A range message being assembled from its train of frames.
#[derive(Debug)]
struct Partial {
    /// The head's header.
    head: Header,
    body: Vec<u8>,
    body_len: usize,
    /// The pages of data still to come are `want[next..]` (known once the
    /// body is complete).
    want: Vec<PageIdx>,
    next: usize,
    data: Vec<u8>,
}

impl Partial {
    fn bad(&self, why: &'static str) -> WireError {
        WireError::Range {
            first: self.head.page.get(),
            count: self.head.arg0.get(),
            why,
        }
    }

    /// The arrays are complete: find the pages of data that must follow.
    fn body_done(&mut self) -> Result<(), WireError> {
        if self.head.ty.get() == ty::R_GRANT {
            let n = self.head.arg0.get() as usize;
            let first = self.head.page.get();
            for (i, &k) in self.body[..n].iter().enumerate() {
                match k {
                    KIND_NONE | KIND_ZERO => {}
                    KIND_PAGE => self.want.push(first + i as u64),
                    _ => return Err(self.bad("unknown data kind")),
                }
            }
            self.data = Vec::with_capacity(self.want.len() * PAGE_SIZE);
        }
        Ok(())
    }

    fn complete(&self) -> bool {
        self.body.len() == self.body_len && self.next == self.want.len()
    }

    /// The assembled message.
    fn finish(self) -> Result<Frame, WireError> {
        let h = &self.head;
        let first = h.page.get();
        // Validated by check_header (1..=MAX_RANGE).
        let count = h.arg0.get() as u32;
        let n = count as usize;
        let flags = h.flags.get();
        let access = if flags & F_WRITE != 0 {
            Access::Write
        } else {
            Access::Read
        };
        let u64s = |b: &[u8]| -> Box<[u64]> {
            b.chunks_exact(8)
                .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect()
        };
        let msg = match h.ty.get() {
            ty::R_REQ => RangeMsg::Req {
                first,
                count,
                access,
                busy: if flags & F_DECLINE != 0 {
                    OnBusy::Decline
                } else {
                    OnBusy::Wait
                },
                have: u64s(&self.body),
            },
            ty::R_INV => RangeMsg::Inv { first, count },
            ty::R_INV_ACK => RangeMsg::InvAck { first, count },
            ty::R_DONE => RangeMsg::Done { first, count },
            ty::R_NACK => RangeMsg::Nack { first, count },
            ty::R_FETCH => RangeMsg::Fetch {
                first,
                count,
                to: NodeId::try_from(h.arg1.get()).map_err(|_| WireError::Node(h.arg1.get()))?,
                keep: if flags & F_KEEP_DROP != 0 {
                    Keep::Drop
                } else {
                    Keep::Shared
                },
                versions: u64s(&self.body),
            },
            ty::R_GRANT => RangeMsg::Grant {
                first,
                count,
                access,
                versions: u64s(&self.body[n..]),
                data: self.body[..n]
                    .iter()
                    .map(|&k| match k {
                        KIND_ZERO => Data::Zero,
                        KIND_PAGE => Data::Page,
                        _ => Data::None,
                    })
                    .collect(),
            },
            t => return Err(WireError::Unexpected(t)),
        };
        let data = (!self.want.is_empty()).then(|| self.data.into_boxed_slice());
        Ok(Frame::Range { msg, data })
    }
}

/// Take one validated frame into the range message being assembled (or
/// decode it as a frame of its own). Returns a frame when one is complete.
fn assemble(
    partial: &mut Option<Partial>,
    h: &Header,
    payload: &[u8],
) -> Result<Option<Frame>, WireError> {
    let t = h.ty.get();
    match t {
        ty::R_REQ..=ty::R_NACK => {
            if partial.is_some() {
                return Err(WireError::RangeInterrupted(t));
            }
            let count = h.arg0.get() as usize;
            let mut p = Partial {
                head: *h,
                body: payload.to_vec(),
                body_len: range_body_len(t, count),
                want: Vec::new(),
                next: 0,
                data: Vec::new(),
            };
            if p.body.len() == p.body_len {
                p.body_done()?;
            }
            if p.complete() {
                return p.finish().map(Some);
            }
            *partial = Some(p);
            Ok(None)
        }
        ty::R_MORE => {
            let Some(p) = partial.as_mut() else {
                return Err(WireError::Unexpected(t));
            };
            let left = p.body_len - p.body.len();
            if h.page.get() != p.head.page.get() {
                return Err(p.bad("continuation of another range"));
            }
            if payload.len() != left.min(RANGE_CHUNK) {
                return Err(p.bad("continuation of the wrong length"));
            }
            p.body.extend_from_slice(payload);
            if p.body.len() == p.body_len {
                p.body_done()?;
            }
            if p.complete() {
                return partial.take().map_or(Ok(None), |p| p.finish().map(Some));
            }
            Ok(None)
        }
        ty::R_PAGE => {
            let Some(p) = partial.as_mut() else {
                return Err(WireError::Unexpected(t));
            };
            if p.body.len() != p.body_len {
                return Err(p.bad("page before the end of the per-page arrays"));
            }
            if p.want.get(p.next) != Some(&h.page.get()) {
                return Err(p.bad("page of data out of order or not announced"));
            }
            p.data.extend_from_slice(payload);
            p.next += 1;
            if p.complete() {
                return partial.take().map_or(Ok(None), |p| p.finish().map(Some));
            }
            Ok(None)
        }
        _ => {
            if partial.is_some() {
                return Err(WireError::RangeInterrupted(t));
            }
            decode(h, payload.to_vec()).map(Some)
        }
    }
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
    /// The range message being assembled (at most one per connection).
    partial: Option<Partial>,
    /// Frames with a page of contents decoded (each copied twice here: into
    /// `buf`, then out of it into its own payload).
    page_frames: u64,
    /// Bytes moved inside `buf` to reclaim its consumed front.
    moved_bytes: u64,
}

impl Decoder {
    pub fn new(limits: Limits, first_seq: u64) -> Self {
        Decoder {
            buf: Vec::with_capacity(64 * 1024),
            pos: 0,
            next_seq: first_seq,
            limits,
            opener: Opener::plain(),
            partial: None,
            page_frames: 0,
            moved_bytes: 0,
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

    /// User-space copies of page contents this decoder made, in pages: two
    /// per page received (into its buffer, out into the frame's payload),
    /// plus what it moved inside its buffer.
    pub fn page_copies(&self) -> u64 {
        2 * self.page_frames + self.moved_bytes / PAGE_SIZE as u64
    }

    /// Append received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > 256 * 1024 {
            self.moved_bytes += (self.buf.len() - self.pos) as u64;
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Next complete frame, if any (a range message once all of its train is
    /// in).
    pub fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        loop {
            let got = if self.opener.is_sealed() {
                self.next_sealed()?
            } else {
                self.next_bare()?
            };
            match got {
                None => return Ok(None),
                Some(Some(f)) => return Ok(Some(f)),
                // A frame of a range message still incomplete: go on.
                Some(None) => {}
            }
        }
    }

    /// Take the next frame, if it is all there.
    fn next_bare(&mut self) -> Result<Option<Option<Frame>>, WireError> {
        let avail = &self.buf[self.pos..];
        let Ok((h, _)) = Header::read_from_prefix(avail) else {
            return Ok(None);
        };
        let len = check_header(&h, self.next_seq, &self.limits)?;
        if avail.len() < HEADER_SIZE + len {
            return Ok(None);
        }
        if len == PAGE_SIZE && matches!(h.ty.get(), ty::GRANT | ty::R_PAGE) {
            self.page_frames += 1;
        }
        let f = assemble(
            &mut self.partial,
            &h,
            &avail[HEADER_SIZE..HEADER_SIZE + len],
        )?;
        self.pos += HEADER_SIZE + len;
        self.next_seq += 1;
        Ok(Some(f))
    }

    /// Open the next record in place, then validate its frame as usual.
    fn next_sealed(&mut self) -> Result<Option<Option<Frame>>, WireError> {
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
        if len == PAGE_SIZE && matches!(h.ty.get(), ty::GRANT | ty::R_PAGE) {
            self.page_frames += 1;
        }
        let f = assemble(&mut self.partial, &h, &body[HEADER_SIZE..])?;
        self.pos += r.consumed;
        self.next_seq += 1;
        Ok(Some(f))
    }
}
