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
use super::seal::{Opener, SealError, LEN_SIZE, TAG_SIZE};

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

/// Page contents a sender copies straight into its send buffer: the engine's
/// mapping of guest memory ([`crate::dsm::uffd::HeldPages`]), or plain bytes.
/// This is the send side of the transport API in terms of guest memory: a
/// transport is told which pages to send, not handed a copy of them.
pub trait PageSource {
    /// Number of bytes (4 KiB per page; anything else is refused).
    fn bytes(&self) -> usize;
    /// Append page `i` (0-based, 4 KiB) to `out`: the one user-space copy on
    /// the sending side.
    fn append_page(&self, i: usize, out: &mut Vec<u8>);
}

/// All of `src`'s pages copied out into one buffer (one copy per page).
pub fn copy_out(src: &dyn PageSource) -> Vec<u8> {
    let mut v = Vec::with_capacity(src.bytes());
    (0..src.bytes() / PAGE_SIZE).for_each(|i| src.append_page(i, &mut v));
    v
}

impl PageSource for &[u8] {
    fn bytes(&self) -> usize {
        self.len()
    }

    fn append_page(&self, i: usize, out: &mut Vec<u8>) {
        let lo = i * PAGE_SIZE;
        out.extend_from_slice(self.get(lo..lo + PAGE_SIZE).unwrap_or(&[0u8; PAGE_SIZE]));
    }
}

/// The receive side of the transport API in terms of guest memory: the
/// engine says which pages it awaits, and the transport has their contents
/// written straight into guest memory (the memfd) instead of handing over a
/// buffer. A transport with a memory region of its
/// own (RDMA) would post these pages as its receive targets.
pub trait Landing {
    /// Whether all of `pages` (ascending) may land in place now. Accepted
    /// pages are reserved for this message until the engine has handled it.
    fn accept(&self, pages: &[PageIdx]) -> bool;
    /// Write one accepted page's contents (4 KiB).
    fn land(&self, page: PageIdx, data: &[u8]);
}

/// Check that a coherence message can be encoded with `data`: a page grant
/// needs exactly one page of data (a grant must never carry made-up contents).
pub fn check_msg(msg: &Msg, data: Option<&[u8]>) -> Result<(), WireError> {
    check_msg_from(msg, data.as_ref().map(|d| d as &dyn PageSource))
}

/// [`check_msg`] for a page read from a [`PageSource`].
pub fn check_msg_from(msg: &Msg, data: Option<&dyn PageSource>) -> Result<(), WireError> {
    if let Msg::Grant {
        page,
        data: Data::Page,
        ..
    } = *msg
    {
        if data.map(|d| d.bytes()) != Some(PAGE_SIZE) {
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
    encode_msg_from(msg, data.as_ref().map(|d| d as &dyn PageSource), seq, out)
}

/// [`encode_msg`] with the page copied straight from a [`PageSource`].
pub fn encode_msg_from(msg: &Msg, data: Option<&dyn PageSource>, seq: u64, out: &mut Vec<u8>) {
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
            Some(d) if d.bytes() == PAGE_SIZE => d.append_page(0, out),
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
    pages: Pages<'a>,
}

/// Where a train's pages of data come from.
#[derive(Debug, Clone, Copy)]
enum Pages<'a> {
    Bytes(&'a [u8]),
    Source(&'a dyn PageSource),
}

impl Pages<'_> {
    fn bytes(&self) -> usize {
        match self {
            Pages::Bytes(b) => b.len(),
            Pages::Source(s) => s.bytes(),
        }
    }

    fn append_page(&self, i: usize, out: &mut Vec<u8>) {
        match self {
            Pages::Bytes(b) => b.append_page(i, out),
            Pages::Source(s) => s.append_page(i, out),
        }
    }
}

impl std::fmt::Debug for dyn PageSource + '_ {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PageSource({} bytes)", self.bytes())
    }
}

impl<'a> RangeFrames<'a> {
    /// Check `msg` and its `pages` (the `Data::Page` pages of a `Grant`, 4 KiB
    /// each, in slot order): 1 to [`MAX_RANGE`] pages, per-page arrays of
    /// `count` entries, exactly the data the grant announces (a grant must
    /// never carry made-up contents).
    pub fn new(msg: &'a RangeMsg, pages: &'a [u8]) -> Result<Self, WireError> {
        Self::with_pages(msg, Pages::Bytes(pages))
    }

    /// [`RangeFrames::new`] with the pages copied straight from a
    /// [`PageSource`] as each frame is encoded.
    pub fn from_source(msg: &'a RangeMsg, pages: &'a dyn PageSource) -> Result<Self, WireError> {
        Self::with_pages(msg, Pages::Source(pages))
    }

    fn with_pages(msg: &'a RangeMsg, pages: Pages<'a>) -> Result<Self, WireError> {
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
        if pages.bytes() != page_idx.len() * PAGE_SIZE {
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
        self.pages.append_page(j, out);
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
    /// The pages of data land in place (accepted by the engine's [`Landing`]
    /// when the arrays were complete): `data` stays empty.
    landing: bool,
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
    fn body_done(&mut self, land: Option<&dyn Landing>) -> Result<(), WireError> {
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
            self.landing = !self.want.is_empty() && land.is_some_and(|l| l.accept(&self.want));
            if !self.landing {
                self.data = Vec::with_capacity(self.want.len() * PAGE_SIZE);
            }
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
        let data = (!self.want.is_empty() && !self.landing).then(|| self.data.into_boxed_slice());
        Ok(Frame::Range { msg, data })
    }
}

/// A decoded frame, and whether its page contents landed in place.
type Decoded = (Frame, bool);

/// Take one validated frame into the range message being assembled (or
/// decode it as a frame of its own). Returns a frame when one is complete.
/// With `land`, the contents of pages the engine awaits are written in place
/// (a single-page grant, or every page of a range grant's train) instead of
/// being copied into the frame.
fn assemble(
    partial: &mut Option<Partial>,
    h: &Header,
    payload: &[u8],
    land: Option<&dyn Landing>,
) -> Result<Option<Decoded>, WireError> {
    let t = h.ty.get();
    let done = |p: Partial| {
        let landed = p.landing;
        p.finish().map(|f| Some((f, landed)))
    };
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
                landing: false,
            };
            if p.body.len() == p.body_len {
                p.body_done(land)?;
            }
            if p.complete() {
                return done(p);
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
                p.body_done(land)?;
            }
            if p.complete() {
                return partial.take().map_or(Ok(None), done);
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
            let page = h.page.get();
            if p.want.get(p.next) != Some(&page) {
                return Err(p.bad("page of data out of order or not announced"));
            }
            if p.landing {
                // The pages were accepted when the train's arrays were complete;
                // every later turn polls with the same engine.
                let Some(l) = land else {
                    return Err(p.bad("page of a landing train received without landing"));
                };
                l.land(page, payload);
            } else {
                p.data.extend_from_slice(payload);
            }
            p.next += 1;
            if p.complete() {
                return partial.take().map_or(Ok(None), done);
            }
            Ok(None)
        }
        _ => {
            if partial.is_some() {
                return Err(WireError::RangeInterrupted(t));
            }
            let page = h.page.get();
            if t == ty::GRANT
                && h.flags.get() & F_PAGE != 0
                && land.is_some_and(|l| l.accept(&[page]))
            {
                if let Some(l) = land {
                    l.land(page, payload);
                }
                let f = match decode(h, Vec::new())? {
                    Frame::Proto { msg, .. } => Frame::Proto { msg, data: None },
                    f => f,
                };
                return Ok(Some((f, true)));
            }
            decode(h, payload.to_vec()).map(|f| Some((f, false)))
        }
    }
}

/// Receive buffer of a decoder fed by [`Decoder::read_from`].
const RX_BUF: usize = 256 * 1024;
/// Largest record on the wire: a sealed frame (length prefix, frame, tag).
const MAX_RECORD: usize = LEN_SIZE + MAX_FRAME + TAG_SIZE;

/// Incremental decoder for one byte stream (sealed records after the
/// handshake, see `seal`).
///
/// Bytes come in either by [`Decoder::push`] (a copy: shared-memory rings,
/// tests) or by [`Decoder::read_from`], which reads the socket straight into
/// the buffer, where records are opened in place; near the end of the buffer
/// it reads exactly up to the end of the record in progress, so the buffer
/// empties on a record boundary and is reused from its start without moving
/// bytes. A page's contents are then copied once: out of the buffer, into
/// guest memory ([`Landing`]) or into the frame's payload.
#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    next_seq: u64,
    limits: Limits,
    opener: Opener,
    /// The range message being assembled (at most one per connection).
    partial: Option<Partial>,
    /// The bytes in `buf` were copied in by `push`.
    pushed: bool,
    /// Copies of page contents made here, in pages: into `buf` by `push`, out
    /// of it into a frame's payload (landing in place is the engine's copy).
    page_copies: u64,
    /// Bytes moved inside `buf` to reclaim its consumed front.
    moved_bytes: u64,
}

impl Decoder {
    pub fn new(limits: Limits, first_seq: u64) -> Self {
        Decoder {
            buf: Vec::new(),
            pos: 0,
            end: 0,
            next_seq: first_seq,
            limits,
            opener: Opener::plain(),
            partial: None,
            pushed: false,
            page_copies: 0,
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

    /// User-space copies of page contents this decoder made, in pages (see
    /// the type's doc), plus what it moved inside its buffer.
    pub fn page_copies(&self) -> u64 {
        self.page_copies + self.moved_bytes / PAGE_SIZE as u64
    }

    /// Append received bytes (a copy).
    pub fn push(&mut self, bytes: &[u8]) {
        self.pushed = true;
        if self.pos == self.end {
            self.pos = 0;
            self.end = 0;
        } else if self.pos > RX_BUF {
            self.compact();
        }
        let at = self.end;
        if self.buf.len() < at + bytes.len() {
            self.buf.resize(at + bytes.len(), 0);
        }
        self.buf[at..at + bytes.len()].copy_from_slice(bytes);
        self.end += bytes.len();
    }

    /// Move the unconsumed bytes to the front of the buffer (counted).
    fn compact(&mut self) {
        self.moved_bytes += (self.end - self.pos) as u64;
        self.buf.copy_within(self.pos..self.end, 0);
        self.end -= self.pos;
        self.pos = 0;
    }

    /// Bytes still missing from the record (or bare frame) at `pos`; 0 when
    /// it is complete (or malformed: decoding says why).
    fn missing(&self) -> usize {
        let avail = &self.buf[self.pos..self.end];
        let total = if self.opener.is_sealed() {
            match avail.get(..LEN_SIZE) {
                None => LEN_SIZE,
                Some(p) => {
                    LEN_SIZE + u32::from_le_bytes([p[0], p[1], p[2], p[3]]) as usize + TAG_SIZE
                }
            }
        } else {
            match Header::read_from_prefix(avail) {
                Err(_) => HEADER_SIZE,
                Ok((h, _)) => HEADER_SIZE + h.len.get() as usize,
            }
        };
        total.min(MAX_RECORD).saturating_sub(avail.len())
    }

    /// Read once from `src` straight into the buffer (see the type's doc);
    /// returns what `read` returned (0: end of stream).
    pub fn read_from(&mut self, src: &mut dyn std::io::Read) -> std::io::Result<usize> {
        if self.pos == self.end {
            self.pos = 0;
            self.end = 0;
        }
        if self.buf.len() < RX_BUF {
            self.buf.resize(RX_BUF, 0);
        }
        let mut spare = self.buf.len() - self.end;
        let mut want = spare.saturating_sub(MAX_RECORD);
        if spare <= 2 * MAX_RECORD {
            // Near the end: complete the record in progress and stop there.
            let need = self.missing();
            if need > spare {
                self.compact();
                spare = self.buf.len() - self.end;
            }
            want = if need == 0 { spare } else { need.min(spare) };
        }
        let n = src.read(&mut self.buf[self.end..self.end + want])?;
        self.end += n;
        Ok(n)
    }

    /// Next complete frame, if any (a range message once all of its train is
    /// in).
    pub fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        Ok(self.next_landed(None)?.map(|(f, _)| f))
    }

    /// Like [`Decoder::next_frame`], with the contents of pages `land` (if
    /// given) awaits written in place; the flag says whether the frame's pages
    /// landed (its `data` is then `None`).
    pub fn next_landed(
        &mut self,
        land: Option<&dyn Landing>,
    ) -> Result<Option<(Frame, bool)>, WireError> {
        loop {
            let got = if self.opener.is_sealed() {
                self.next_sealed(land)?
            } else {
                self.next_bare(land)?
            };
            match got {
                None => return Ok(None),
                Some(Some(f)) => return Ok(Some(f)),
                // A frame of a range message still incomplete: go on.
                Some(None) => {}
            }
        }
    }

    /// Count the copies of a frame's page contents (see `page_copies`).
    fn count(&mut self, h: &Header, len: usize, got: &Option<Decoded>) {
        if len == PAGE_SIZE && matches!(h.ty.get(), ty::GRANT | ty::R_PAGE) {
            let landed = match got {
                Some((_, landed)) => *landed,
                None => self.partial.as_ref().is_some_and(|p| p.landing),
            };
            self.page_copies += u64::from(self.pushed) + u64::from(!landed);
        }
    }

    /// Take the next frame, if it is all there.
    fn next_bare(
        &mut self,
        land: Option<&dyn Landing>,
    ) -> Result<Option<Option<Decoded>>, WireError> {
        let avail = &self.buf[self.pos..self.end];
        let Ok((h, _)) = Header::read_from_prefix(avail) else {
            return Ok(None);
        };
        let len = check_header(&h, self.next_seq, &self.limits)?;
        if avail.len() < HEADER_SIZE + len {
            return Ok(None);
        }
        let f = assemble(
            &mut self.partial,
            &h,
            &avail[HEADER_SIZE..HEADER_SIZE + len],
            land,
        )?;
        self.count(&h, len, &f);
        self.pos += HEADER_SIZE + len;
        self.next_seq += 1;
        Ok(Some(f))
    }

    /// Open the next record in place, then validate its frame as usual.
    fn next_sealed(
        &mut self,
        land: Option<&dyn Landing>,
    ) -> Result<Option<Option<Decoded>>, WireError> {
        let avail = &mut self.buf[self.pos..self.end];
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
        let f = assemble(&mut self.partial, &h, &body[HEADER_SIZE..], land)?;
        self.count(&h, len, &f);
        self.pos += r.consumed;
        self.next_seq += 1;
        Ok(Some(f))
    }
}
