//! Structure-aware fuzzing of everything a peer can make the data plane parse:
//! the frame decoder (bare and sealed) and both sides of the handshake.
//!
//! Cases per property: `PROPTEST_CASES` (default 256 here: a short run in
//! `make test`; `make fuzz` sets it much higher). Each property states what
//! must hold for any input: no panic, bounded buffering, and no frame that
//! differs from what the sender sealed. Range messages (trains of frames,
//! see `wire`'s module doc) are among the valid frames, and a train cut,
//! reordered or interleaved is refused.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::Duration;

use dvmm::dsm::auth::{self, NodeKeys};
use dvmm::dsm::protocol::{Access, Data, Keep, Msg, OnBusy, RangeMsg, MAX_RANGE};
use dvmm::dsm::seal::{Protection, Sealer, KEY_SIZE};
use dvmm::dsm::wire::{self, ty, Decoder, Frame, Limits, RangeFrames, WireError};
use proptest::prelude::*;

const LIMITS: Limits = Limits {
    pages: 1 << 16,
    nodes: 4,
};

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

fn msg() -> impl Strategy<Value = Msg> {
    let page = 0u64..(1 << 16);
    let access = prop_oneof![Just(Access::Read), Just(Access::Write)];
    prop_oneof![
        (page.clone(), access.clone(), any::<u64>()).prop_map(|(page, access, have)| Msg::Req {
            page,
            access,
            have
        }),
        page.clone().prop_map(|page| Msg::Inv { page }),
        page.clone().prop_map(|page| Msg::InvAck { page }),
        page.clone().prop_map(|page| Msg::Done { page }),
        page.clone().prop_map(|page| Msg::Evict { page }),
        (
            page.clone(),
            0u16..4,
            any::<bool>(),
            any::<u64>(),
            any::<bool>()
        )
            .prop_map(|(page, to, drop, version, data)| Msg::Fetch {
                page,
                to,
                keep: if drop { Keep::Drop } else { Keep::Shared },
                version,
                data,
            }),
        (page, access, any::<u64>(), 0u8..3).prop_map(|(page, access, version, d)| {
            Msg::Grant {
                page,
                access,
                version,
                data: [Data::None, Data::Zero, Data::Page][usize::from(d)],
            }
        }),
    ]
}

/// Range messages of 1 to 512 pages (small counts more often) inside the
/// guest.
fn range_msg() -> impl Strategy<Value = RangeMsg> {
    let span = prop_oneof![3 => 1u32..8, 1 => 1u32..=MAX_RANGE]
        .prop_flat_map(|count| (0u64..(1 << 16) - u64::from(count), Just(count)));
    let access = prop_oneof![Just(Access::Read), Just(Access::Write)];
    (span, access, any::<bool>(), 0u16..4, any::<u64>(), 0u8..7).prop_flat_map(
        |((first, count), access, flag, to, seed, kind)| {
            let n = count as usize;
            (
                prop::collection::vec(any::<u64>(), n),
                prop::collection::vec(0u8..3, n),
            )
                .prop_map(move |(v, d)| {
                    let versions: Box<[u64]> = v.into_iter().map(|x| x ^ seed).collect();
                    match kind {
                        0 => RangeMsg::Req {
                            first,
                            count,
                            access,
                            busy: if flag { OnBusy::Decline } else { OnBusy::Wait },
                            have: versions,
                        },
                        1 => RangeMsg::Inv { first, count },
                        2 => RangeMsg::InvAck { first, count },
                        3 => RangeMsg::Fetch {
                            first,
                            count,
                            to,
                            keep: if flag { Keep::Drop } else { Keep::Shared },
                            versions,
                        },
                        4 => RangeMsg::Done { first, count },
                        5 => RangeMsg::Nack { first, count },
                        _ => RangeMsg::Grant {
                            first,
                            count,
                            access,
                            versions,
                            data: d
                                .into_iter()
                                .map(|k| [Data::None, Data::Zero, Data::Page][usize::from(k)])
                                .collect(),
                        },
                    }
                })
        },
    )
}

/// A range message with distinct contents for each of its pages of data.
fn range_frame() -> impl Strategy<Value = Frame> {
    range_msg().prop_map(|msg| {
        let n = msg.data_pages();
        let data = (n > 0).then(|| {
            (0..n * wire::PAGE_SIZE)
                .map(|i| (i / wire::PAGE_SIZE * 31 + i) as u8)
                .collect::<Vec<u8>>()
                .into_boxed_slice()
        });
        Frame::Range { msg, data }
    })
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        1 => range_frame(),
        3 => msg().prop_map(|m| {
            let data = matches!(
                m,
                Msg::Grant {
                    data: Data::Page,
                    ..
                }
            )
            .then(|| vec![0xa5u8; wire::PAGE_SIZE].into_boxed_slice());
            Frame::Proto { msg: m, data }
        }),
        3 => (
            any::<u64>(),
            any::<u64>(),
            prop::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|(kind, tag, payload)| Frame::App { kind, tag, payload }),
        1 => Just(Frame::Ping),
    ]
}

/// Seal every frame as a transport does: a range message frame by frame.
fn encode_all(frames: &[Frame], sealer: &Sealer) -> Vec<u8> {
    let mut out = Vec::new();
    let mut seq = 0u64;
    for f in frames {
        if let Frame::Range { msg, data } = f {
            let t = RangeFrames::new(msg, data.as_deref().unwrap_or(&[])).unwrap();
            for i in 0..t.len() {
                sealer
                    .seal_into(seq, &mut out, &|s, o| t.encode(i, s, o))
                    .unwrap();
                seq += 1;
            }
            continue;
        }
        sealer
            .seal_into(seq, &mut out, &|s, o| wire::encode(f, s, o))
            .unwrap();
        seq += 1;
    }
    out
}

/// Decode everything; returns the frames and whether decoding stopped on an error.
fn decode_all(dec: &mut Decoder, bytes: &[u8], chunk: usize) -> (Vec<Frame>, bool) {
    let mut out = Vec::new();
    for c in bytes.chunks(chunk.max(1)) {
        dec.push(c);
        loop {
            match dec.next_frame() {
                Ok(Some(f)) => out.push(f),
                Ok(None) => break,
                Err(_) => return (out, true),
            }
        }
    }
    (out, false)
}

/// The mutations a man in the middle can make to a byte stream.
#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, bit: u8 },
    Truncate { at: usize },
    Insert { at: usize, bytes: Vec<u8> },
    Drop { at: usize, len: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let at = any::<prop::sample::Index>();
    prop_oneof![
        (at.clone(), 0u8..8).prop_map(|(i, bit)| Mutation::Flip {
            at: i.index(usize::MAX),
            bit
        }),
        at.clone().prop_map(|i| Mutation::Truncate {
            at: i.index(usize::MAX)
        }),
        (at.clone(), prop::collection::vec(any::<u8>(), 1..80)).prop_map(|(i, bytes)| {
            Mutation::Insert {
                at: i.index(usize::MAX),
                bytes,
            }
        }),
        (at, 1usize..100).prop_map(|(i, len)| Mutation::Drop {
            at: i.index(usize::MAX),
            len
        }),
    ]
}

/// Apply `m`; returns the stream and the first byte offset it changed.
fn apply(bytes: &[u8], m: &Mutation) -> (Vec<u8>, usize) {
    let mut b = bytes.to_vec();
    let n = b.len().max(1);
    match m {
        Mutation::Flip { at, bit } => {
            let at = at % n;
            if let Some(x) = b.get_mut(at) {
                *x ^= 1 << bit;
            }
            (b, at)
        }
        Mutation::Truncate { at } => {
            let at = at % n;
            b.truncate(at);
            (b, at)
        }
        Mutation::Insert { at, bytes } => {
            let at = at % (b.len() + 1);
            b.splice(at..at, bytes.iter().copied());
            (b, at)
        }
        Mutation::Drop { at, len } => {
            let at = at % n;
            let end = (at + len).min(b.len());
            b.drain(at..end);
            (b, at)
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    /// Arbitrary bytes: the bare decoder never panics and never buffers past
    /// what it was given.
    #[test]
    fn bare_decoder_survives_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..9000),
                                       chunk in 1usize..5000) {
        let mut d = Decoder::new(LIMITS, 0);
        let _ = decode_all(&mut d, &bytes, chunk);
    }

    /// Arbitrary bytes to a sealed decoder: never a frame (nothing without the
    /// key authenticates), never a panic.
    #[test]
    fn sealed_decoder_accepts_nothing_forged(bytes in prop::collection::vec(any::<u8>(), 0..9000),
                                             chunk in 1usize..5000,
                                             integrity in any::<bool>()) {
        let mode = if integrity { Protection::Integrity } else { Protection::Encrypt };
        let key = [3u8; KEY_SIZE];
        let mut d = Decoder::sealed(LIMITS, 0, dvmm::dsm::seal::Opener::new(mode, &key));
        let (frames, _) = decode_all(&mut d, &bytes, chunk);
        prop_assert!(frames.is_empty(), "forged frame accepted: {:?}", frames);
    }

    /// Valid frames round-trip through every mode, in any chunking.
    #[test]
    fn frames_roundtrip_every_mode(frames in prop::collection::vec(frame(), 1..12),
                                   chunk in 1usize..9000, mode in 0u8..3) {
        let mode = [Protection::Encrypt, Protection::Integrity, Protection::None][usize::from(mode)];
        let key = [5u8; KEY_SIZE];
        let bytes = encode_all(&frames, &Sealer::new(mode, &key));
        let mut d = Decoder::sealed(LIMITS, 0, dvmm::dsm::seal::Opener::new(mode, &key));
        let (got, err) = decode_all(&mut d, &bytes, chunk);
        prop_assert!(!err);
        prop_assert_eq!(got, frames);
    }

    /// A sealed stream altered anywhere by a man in the middle yields exactly the
    /// frames before the alteration, then stops (error or waiting): never an
    /// altered, injected, replayed or reordered frame.
    #[test]
    fn altered_sealed_stream_yields_only_a_prefix(frames in prop::collection::vec(frame(), 1..10),
                                                  m in mutation(), chunk in 1usize..9000,
                                                  integrity in any::<bool>()) {
        let mode = if integrity { Protection::Integrity } else { Protection::Encrypt };
        let key = [9u8; KEY_SIZE];
        let bytes = encode_all(&frames, &Sealer::new(mode, &key));
        let (bad, _) = apply(&bytes, &m);
        let mut d = Decoder::sealed(LIMITS, 0, dvmm::dsm::seal::Opener::new(mode, &key));
        let (got, _) = decode_all(&mut d, &bad, chunk);
        prop_assert!(got.len() <= frames.len());
        prop_assert_eq!(&got[..], &frames[..got.len()]);
    }

    /// A range message's train with one of its frames dropped, repeated,
    /// swapped with the next or with a foreign frame put inside is refused
    /// (an error or an incomplete message), never delivered altered.
    #[test]
    fn broken_range_train_is_refused(f in range_frame(), at in any::<prop::sample::Index>(),
                                     how in 0u8..4) {
        let Frame::Range { msg, data } = &f else { unreachable!() };
        let t = RangeFrames::new(msg, data.as_deref().unwrap_or(&[])).unwrap();
        let mut parts: Vec<Vec<u8>> = (0..t.len())
            .map(|i| {
                let mut b = Vec::new();
                t.encode(i, 0, &mut b);
                b
            })
            .collect();
        let i = at.index(parts.len());
        match how {
            0 => { parts.remove(i); }
            1 => { let p = parts[i].clone(); parts.insert(i, p); }
            2 if i + 1 < parts.len() => parts.swap(i, i + 1),
            2 => { parts.remove(i); }
            _ => {
                let mut b = Vec::new();
                wire::encode(&Frame::Ping, 0, &mut b);
                parts.insert(i.max(1), b);
            }
        }
        // Re-number (the sequence check is not what is under test here).
        let mut bytes = Vec::new();
        for (seq, p) in parts.iter_mut().enumerate() {
            p[24..32].copy_from_slice(&(seq as u64).to_le_bytes());
            bytes.extend_from_slice(p);
        }
        let mut d = Decoder::new(LIMITS, 0);
        let (got, _) = decode_all(&mut d, &bytes, 4096);
        let single_frame = t.len() == 1;
        if !single_frame {
            prop_assert!(!got.iter().any(|g| matches!(g, Frame::Range { .. }) && *g != f),
                         "altered range delivered");
            // A frame dropped or put inside never yields the message.
            if how == 0 || how == 3 {
                prop_assert!(!got.contains(&f));
            }
        }
    }

    /// The bare decoder on a mutated valid stream: no panic; frames before the
    /// mutation point come out unchanged.
    #[test]
    fn altered_bare_stream_no_panic(frames in prop::collection::vec(frame(), 1..10),
                                    m in mutation(), chunk in 1usize..9000) {
        let bytes = encode_all(&frames, &Sealer::plain());
        let (bad, _) = apply(&bytes, &m);
        let mut d = Decoder::new(LIMITS, 0);
        let _ = decode_all(&mut d, &bad, chunk);
    }
}

/// Handshake frames a stranger may send (structure-aware: real types, random
/// fields and payloads), or raw bytes.
fn handshake_input() -> impl Strategy<Value = Vec<u8>> {
    let hs = (
        prop_oneof![
            Just(ty::HELLO),
            Just(ty::CHALLENGE),
            Just(ty::RESPONSE),
            Just(ty::AUTH_OK),
            any::<u16>()
        ],
        any::<u64>(),
        prop_oneof![Just(0u64), Just(1), any::<u64>()],
        prop::collection::vec(any::<u8>(), 0..130),
        0u64..3,
    )
        .prop_map(|(t, arg0, arg1, payload, seq)| {
            let mut out = Vec::new();
            let f = Frame::Auth {
                ty: t,
                arg0,
                arg1,
                payload,
            };
            wire::encode(&f, seq, &mut out);
            out
        });
    prop_oneof![
        prop::collection::vec(hs, 1..4).prop_map(|v| v.concat()),
        prop::collection::vec(any::<u8>(), 0..400),
    ]
}

fn pair(l: &TcpListener) -> (TcpStream, TcpStream) {
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, _) = l.accept().unwrap();
    (c, s)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases().min(2000), ..ProptestConfig::default() })]

    /// Whatever a stranger sends, neither side of the handshake authenticates
    /// it, panics, or waits past its timeout.
    #[test]
    fn handshake_refuses_strangers(input in handshake_input(), acceptor in any::<bool>()) {
        thread_local! {
            static L: TcpListener = TcpListener::bind("127.0.0.1:0").unwrap();
            static KEYS: Vec<NodeKeys> = NodeKeys::generate(2, Protection::Encrypt).unwrap();
        }
        let (mut stranger, mut s) = L.with(pair);
        stranger.write_all(&input).unwrap();
        stranger.shutdown(Shutdown::Write).unwrap();
        let t = Duration::from_millis(300);
        let r = KEYS.with(|k| {
            if acceptor {
                auth::accept(&mut s, &k[0], t, &|n, _| n == 1).map(|_| ())
            } else {
                auth::connect(&mut s, &k[1], 0, 0, t).map(|_| ())
            }
        });
        prop_assert!(r.is_err());
        let mut sink = Vec::new();
        drop(s);
        let _ = stranger.read_to_end(&mut sink);
    }
}

/// Oversized and malformed range heads are refused with a clear error.
#[test]
fn bad_range_heads_are_refused() {
    let head = |t: u16, page: u64, count: u64, len: usize, arg1: u64| wire::Header {
        magic: wire::MAGIC.into(),
        version: wire::WIRE_VERSION.into(),
        ty: t.into(),
        len: (len as u32).into(),
        page: page.into(),
        arg0: count.into(),
        arg1: arg1.into(),
        ..Default::default()
    };
    let check = |h: wire::Header| wire::check_header(&h, 0, &LIMITS);
    // Too many pages (a 513-page request would be 4104 bytes of versions).
    assert!(matches!(
        check(head(ty::R_REQ, 0, 513, 4096, 0)),
        Err(WireError::Range { .. })
    ));
    assert!(matches!(
        check(head(ty::R_INV, 0, 0, 0, 0)),
        Err(WireError::Range { .. })
    ));
    // Past the end of guest memory.
    assert!(matches!(
        check(head(ty::R_INV, (1 << 16) - 2, 3, 0, 0)),
        Err(WireError::Range { .. })
    ));
    // Arrays of the wrong length.
    assert!(matches!(
        check(head(ty::R_FETCH, 0, 4, 31, 0)),
        Err(WireError::Length { .. })
    ));
    // A fetch for a node that does not exist.
    assert!(matches!(
        check(head(ty::R_FETCH, 0, 4, 32, 9)),
        Err(WireError::Node(9))
    ));
    assert_eq!(check(head(ty::R_GRANT, 0, 512, 4096, 0)), Ok(4096));
    // A page frame or continuation without a range message.
    let mut d = Decoder::new(LIMITS, 0);
    let mut b = Vec::new();
    use zerocopy::IntoBytes;
    b.extend_from_slice(head(ty::R_PAGE, 3, 0, 4096, 0).as_bytes());
    b.extend_from_slice(&[0u8; 4096]);
    d.push(&b);
    assert!(d.next_frame().is_err());
    // An unknown data kind in a grant.
    let mut d = Decoder::new(LIMITS, 0);
    let mut b = Vec::new();
    b.extend_from_slice(head(ty::R_GRANT, 0, 1, 9, 0).as_bytes());
    b.extend_from_slice(&[7, 1, 0, 0, 0, 0, 0, 0, 0]);
    d.push(&b);
    assert!(matches!(d.next_frame(), Err(WireError::Range { .. })));
    // A grant announcing more data than it brings, then another message.
    let g = RangeMsg::Grant {
        first: 0,
        count: 2,
        access: Access::Read,
        versions: vec![1, 1].into(),
        data: vec![Data::Page, Data::Page].into(),
    };
    assert!(RangeFrames::new(&g, &[0u8; 4096]).is_err());
    let t = RangeFrames::new(&g, &[0u8; 8192]).unwrap();
    let mut b = Vec::new();
    t.encode(0, 0, &mut b);
    t.encode(1, 1, &mut b);
    wire::encode(&Frame::Ping, 2, &mut b);
    let mut d = Decoder::new(LIMITS, 0);
    d.push(&b);
    assert!(matches!(
        d.next_frame(),
        Err(WireError::RangeInterrupted(t)) if t == ty::PING
    ));
}
