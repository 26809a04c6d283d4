//! Wire framing, authentication and the TCP mesh, over real loopback sockets.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use dvmm::dsm::auth::{self, AuthError, NodeKeys};
use dvmm::dsm::protocol::{Access, Data, Msg};
use dvmm::dsm::seal::Protection;
use dvmm::dsm::transport::{Lane, MeshConfig, TcpMesh, Transport, TransportError, TransportEvent};
use dvmm::dsm::wire::{self, Decoder, Frame, Limits, WireError};

fn ring(n: usize) -> Vec<NodeKeys> {
    NodeKeys::generate(n, Protection::Encrypt).unwrap()
}

fn free_addrs(n: usize) -> Vec<SocketAddr> {
    let ls: Vec<_> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    ls.iter().map(|l| l.local_addr().unwrap()).collect()
}

fn cfg(me: u16, addrs: &[SocketAddr], keys: &[NodeKeys], deadline_ms: u64) -> MeshConfig {
    MeshConfig {
        me,
        addrs: addrs.to_vec(),
        keys: keys[usize::from(me)].clone(),
        connect_deadline: Duration::from_millis(deadline_ms),
        dead_after: Duration::from_secs(5),
        limits: Limits {
            pages: 1 << 20,
            nodes: addrs.len(),
        },
    }
}

fn mesh(n: usize) -> Vec<TcpMesh> {
    mesh_with(&ring(n))
}

fn mesh_with(keys: &[NodeKeys]) -> Vec<TcpMesh> {
    let n = keys.len();
    let addrs = free_addrs(n);
    let hs: Vec<_> = (0..n as u16)
        .map(|i| {
            let c = cfg(i, &addrs, keys, 5000);
            thread::spawn(move || TcpMesh::connect(&c))
        })
        .collect();
    hs.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
}

fn wait_event(m: &TcpMesh, within: Duration) -> Option<TransportEvent> {
    let end = Instant::now() + within;
    let mut ev = Vec::new();
    while Instant::now() < end {
        m.poll(Some(Duration::from_millis(20)), &[], &mut ev)
            .unwrap();
        if !ev.is_empty() {
            return Some(ev.remove(0));
        }
    }
    None
}

#[test]
fn frames_roundtrip_and_strict_validation() {
    let limits = Limits {
        pages: 100,
        nodes: 3,
    };
    let msgs = [
        Msg::Req {
            page: 5,
            access: Access::Write,
            have: 7,
        },
        Msg::Evict { page: 1 },
        Msg::Inv { page: 2 },
        Msg::InvAck { page: 3 },
        Msg::Done { page: 4 },
        Msg::Fetch {
            page: 9,
            to: 2,
            keep: dvmm::dsm::protocol::Keep::Drop,
            version: 3,
            data: true,
        },
        Msg::Grant {
            page: 9,
            access: Access::Read,
            version: 3,
            data: Data::Zero,
        },
    ];
    let mut buf = Vec::new();
    for (i, m) in msgs.iter().enumerate() {
        wire::encode_msg(m, None, i as u64, &mut buf);
    }
    let page = vec![0xabu8; 4096];
    let g = Msg::Grant {
        page: 1,
        access: Access::Write,
        version: 9,
        data: Data::Page,
    };
    wire::encode_msg(&g, Some(&page), msgs.len() as u64, &mut buf);
    let mut d = Decoder::new(limits, 0);
    // Byte by byte: partial frames are handled.
    for b in &buf {
        d.push(std::slice::from_ref(b));
    }
    for m in &msgs {
        assert_eq!(
            d.next_frame().unwrap(),
            Some(Frame::Proto {
                msg: *m,
                data: None
            })
        );
    }
    match d.next_frame().unwrap() {
        Some(Frame::Proto { msg, data: Some(p) }) => {
            assert_eq!(msg, g);
            assert_eq!(&p[..], &page[..]);
        }
        f => panic!("{f:?}"),
    }
    assert_eq!(d.next_frame().unwrap(), None);

    // Each corrupted field is reported by name.
    let mut one = Vec::new();
    wire::encode_msg(&Msg::Inv { page: 2 }, None, 0, &mut one);
    let bad = |off: usize, val: u8| {
        let mut b = one.clone();
        b[off] = val;
        let mut d = Decoder::new(limits, 0);
        d.push(&b);
        d.next_frame().unwrap_err()
    };
    assert!(matches!(bad(0, 0), WireError::Magic(_)));
    assert!(matches!(bad(4, 9), WireError::Version(9)));
    assert!(matches!(bad(6, 99), WireError::Type(99)));
    assert!(matches!(bad(8, 1), WireError::Length { .. }));
    assert!(matches!(bad(12, 0x80), WireError::Flags { .. }));
    assert!(matches!(
        bad(16, 200),
        WireError::Page {
            page: 200,
            pages: 100
        }
    ));
    assert!(matches!(
        bad(24, 1),
        WireError::Seq {
            got: 1,
            expected: 0
        }
    ));
    // Error messages name the field.
    assert!(bad(0, 0).to_string().contains("magic"));
    assert!(bad(8, 1).to_string().contains("length"));
    // A grant claiming a page but with a short payload length is refused.
    let mut b = Vec::new();
    wire::encode_msg(&g, Some(&page), 0, &mut b);
    b[8] = 0;
    b[9] = 0x08; // 2048
    let mut d = Decoder::new(limits, 0);
    d.push(&b);
    assert!(matches!(d.next_frame(), Err(WireError::Length { .. })));
}

#[test]
fn mesh_exchanges_messages() {
    let ms = mesh(3);
    ms[2]
        .send(
            0,
            Lane::Control,
            &Frame::App {
                kind: 1,
                tag: 42,
                payload: b"hello".to_vec(),
            },
        )
        .unwrap();
    ms[0].send_msg(1, &Msg::Inv { page: 7 }, None).unwrap();
    match wait_event(&ms[0], Duration::from_secs(2)) {
        Some(TransportEvent::Frame {
            from: 2,
            lane: Lane::Control,
            frame:
                Frame::App {
                    kind: 1,
                    tag: 42,
                    payload,
                },
        }) => {
            assert_eq!(payload, b"hello")
        }
        e => panic!("{e:?}"),
    }
    match wait_event(&ms[1], Duration::from_secs(2)) {
        Some(TransportEvent::Frame {
            from: 0,
            frame:
                Frame::Proto {
                    msg: Msg::Inv { page: 7 },
                    ..
                },
            ..
        }) => {}
        e => panic!("{e:?}"),
    }
}

#[test]
fn mismatched_or_missing_keys_refused() {
    let pubs = [[9u8; 32], [8u8; 32]];
    assert!(matches!(
        NodeKeys::new(0, [1u8; 32], &pubs, [0u8; 16], Protection::Encrypt),
        Err(AuthError::KeyMismatch)
    ));
    assert!(matches!(
        NodeKeys::new(2, [1u8; 32], &pubs, [0u8; 16], Protection::Encrypt),
        Err(AuthError::NoKey { me: 2, n: 2 })
    ));
}

/// A node holding another VM's keys (or a stranger's) is refused.
#[test]
fn wrong_keys_refused() {
    let addrs = free_addrs(2);
    let c0 = cfg(0, &addrs, &ring(2), 1500);
    let c1 = cfg(1, &addrs, &ring(2), 1500);
    let h0 = thread::spawn(move || TcpMesh::connect(&c0));
    let r1 = TcpMesh::connect(&c1);
    match r1 {
        Err(TransportError::Auth {
            node: 0,
            err: AuthError::Refused(why),
        }) => {
            assert!(why.contains("key"), "{why}")
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("wrong key accepted"),
    }
    assert!(matches!(
        h0.join().unwrap(),
        Err(TransportError::AcceptTimeout(1))
    ));
}

/// A peer that does not authenticate at all (sends a protocol frame, or
/// garbage) is refused while the real peer still gets in.
#[test]
fn unauthenticated_and_garbage_peers_refused_mesh_still_forms() {
    let addrs = free_addrs(2);
    let keys = ring(2);
    let c0 = cfg(0, &addrs, &keys, 5000);
    let h0 = thread::spawn(move || TcpMesh::connect(&c0));
    let a0 = addrs[0];
    let connect = || loop {
        if let Ok(s) = TcpStream::connect(a0) {
            return s;
        }
        thread::sleep(Duration::from_millis(5));
    };
    // Garbage.
    let mut g = connect();
    g.write_all(&[0x55u8; 200]).unwrap();
    let mut sink = [0u8; 64];
    g.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    assert_eq!(
        g.read(&mut sink).unwrap_or(0),
        0,
        "garbage peer got an answer"
    );
    // A well-formed frame but no handshake (no key).
    let mut u = connect();
    let mut b = Vec::new();
    wire::encode_msg(
        &Msg::Req {
            page: 0,
            access: Access::Read,
            have: 0,
        },
        None,
        0,
        &mut b,
    );
    u.write_all(&b).unwrap();
    u.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    assert_eq!(
        u.read(&mut sink).unwrap_or(0),
        0,
        "unauthenticated peer got an answer"
    );
    // The real node 1.
    let m1 = TcpMesh::connect(&cfg(1, &addrs, &keys, 5000)).unwrap();
    let m0 = h0.join().unwrap().unwrap();
    m1.send(
        0,
        Lane::Control,
        &Frame::App {
            kind: 2,
            tag: 0,
            payload: vec![],
        },
    )
    .unwrap();
    assert!(matches!(
        wait_event(&m0, Duration::from_secs(2)),
        Some(TransportEvent::Frame { from: 1, .. })
    ));
}

/// Replaying the bytes a legitimate connector sent in an earlier session is
/// refused: the acceptor's fresh nonce is not the one the captured MAC covers.
#[test]
fn replayed_handshake_refused() {
    let keys = ring(2);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let captured = Arc::new(Mutex::new(Vec::new()));
    // A recording proxy between a real connector and the listener.
    let pl = TcpListener::bind("127.0.0.1:0").unwrap();
    let paddr = pl.local_addr().unwrap();
    let cap = captured.clone();
    let proxy = thread::spawn(move || {
        let (mut c, _) = pl.accept().unwrap();
        let mut s = TcpStream::connect(addr).unwrap();
        let mut c2 = c.try_clone().unwrap();
        let mut s2 = s.try_clone().unwrap();
        let back = thread::spawn(move || {
            let _ = std::io::copy(&mut s2, &mut c2);
        });
        let mut buf = [0u8; 4096];
        loop {
            match c.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    cap.lock().unwrap().extend_from_slice(&buf[..n]);
                    if s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = s.shutdown(std::net::Shutdown::Both);
        let _ = back.join();
    });
    let sec = keys[0].clone();
    let acc = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let r = auth::accept(&mut s, &sec, Duration::from_secs(2), &|n, _| n == 1);
        (
            r.map(|(n, lane, _)| (n, lane)).map_err(|e| e.to_string()),
            l,
        )
    });
    let mut c = TcpStream::connect(paddr).unwrap();
    auth::connect(&mut c, &keys[1], 0, 0, Duration::from_secs(2)).unwrap();
    let (r, l) = acc.join().unwrap();
    assert_eq!(r.unwrap(), (1, 0));
    drop(c);
    proxy.join().unwrap();
    let bytes = captured.lock().unwrap().clone();
    assert!(bytes.len() >= 2 * wire::HEADER_SIZE);
    // Replay verbatim in a new session.
    let sec = keys[0].clone();
    let acc = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        auth::accept(&mut s, &sec, Duration::from_secs(2), &|n, _| n == 1)
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    let mut r = TcpStream::connect(addr).unwrap();
    r.write_all(&bytes).unwrap();
    let res = acc.join().unwrap();
    let err = res.expect_err("replayed handshake accepted");
    assert!(err.contains("key"), "{err}");
}

/// An authenticated peer that then sends garbage is dropped with a reason and
/// reported as down by node index.
#[test]
fn garbage_after_handshake_drops_peer_with_reason() {
    let addrs = free_addrs(2);
    let keys = ring(2);
    let c0 = cfg(0, &addrs, &keys, 5000);
    let h0 = thread::spawn(move || TcpMesh::connect(&c0));
    let mut socks = Vec::new();
    for lane in 0..2u8 {
        let mut s = loop {
            if let Ok(s) = TcpStream::connect(addrs[0]) {
                break s;
            }
            thread::sleep(Duration::from_millis(5));
        };
        auth::connect(&mut s, &keys[1], 0, lane, Duration::from_secs(2)).unwrap();
        socks.push(s);
    }
    let m0 = h0.join().unwrap().unwrap();
    socks[0]
        .write_all(b"this is not a dvmm frame at all, sorry!!!!!!!!!!!!!")
        .unwrap();
    match wait_event(&m0, Duration::from_secs(2)) {
        Some(TransportEvent::PeerDown { node: 1, reason }) => {
            assert!(reason.contains("malformed frame"), "{reason}")
        }
        e => panic!("{e:?}"),
    }
    // The connection is closed.
    socks[0]
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut b = [0u8; 16];
    assert_eq!(socks[0].read(&mut b).unwrap_or(0), 0);
    assert!(m0.send(1, Lane::Control, &Frame::Ping).is_err());
}

#[test]
fn peer_death_reported_by_node() {
    let mut ms = mesh(3);
    let m2 = ms.pop().unwrap();
    drop(m2); // sockets close: EOF at the others
    for m in &ms {
        match wait_event(m, Duration::from_secs(2)) {
            Some(TransportEvent::PeerDown { node: 2, reason }) => assert!(
                reason.contains("EOF") || reason.contains("reset"),
                "{reason}"
            ),
            e => panic!("{e:?}"),
        }
    }
}

/// 32 MiB of page grants queued on the bulk lane do not delay a small control
/// message sent after them.
#[test]
fn bulk_transfer_does_not_delay_control() {
    let mut ms = mesh(2);
    let m1 = Arc::new(ms.pop().unwrap());
    let m0 = ms.pop().unwrap();
    let page = vec![7u8; 4096];
    const PAGES: u64 = 8192;
    for p in 0..PAGES {
        let g = Msg::Grant {
            page: p,
            access: Access::Read,
            version: 1,
            data: Data::Page,
        };
        m1.send_msg(0, &g, Some(&page)).unwrap();
    }
    let sent_at = Instant::now();
    m1.send_msg(0, &Msg::Inv { page: 1 }, None).unwrap();
    // Node 1 keeps flushing its bulk queue.
    let flusher = {
        let m1 = m1.clone();
        thread::spawn(move || {
            let mut ev = Vec::new();
            let end = Instant::now() + Duration::from_secs(20);
            while Instant::now() < end {
                m1.poll(Some(Duration::from_millis(5)), &[], &mut ev)
                    .unwrap();
                if !ev.is_empty() {
                    break; // node 0 says it is done
                }
            }
        })
    };
    let mut bulk_before = None;
    let mut bulk = 0u64;
    let mut ctrl_latency = Duration::ZERO;
    let mut ev = Vec::new();
    let end = Instant::now() + Duration::from_secs(20);
    while bulk < PAGES && Instant::now() < end {
        m0.poll(Some(Duration::from_millis(5)), &[], &mut ev)
            .unwrap();
        for e in ev.drain(..) {
            match e {
                TransportEvent::Frame {
                    lane: Lane::Bulk,
                    frame: Frame::Proto { data: Some(d), .. },
                    ..
                } => {
                    assert_eq!(d[4095], 7);
                    bulk += 1
                }
                TransportEvent::Frame {
                    lane: Lane::Control,
                    frame:
                        Frame::Proto {
                            msg: Msg::Inv { .. },
                            ..
                        },
                    ..
                } => {
                    ctrl_latency = sent_at.elapsed();
                    bulk_before = Some(bulk);
                }
                e => panic!("{e:?}"),
            }
        }
    }
    m0.send(1, Lane::Control, &Frame::Ping).unwrap();
    m0.send(
        1,
        Lane::Control,
        &Frame::App {
            kind: 0,
            tag: 0,
            payload: vec![],
        },
    )
    .unwrap();
    flusher.join().unwrap();
    assert_eq!(bulk, PAGES);
    let before = bulk_before.expect("control message lost");
    eprintln!("control message arrived after {before} of {PAGES} bulk pages, {ctrl_latency:?}");
    assert!(
        before < PAGES / 4,
        "control message waited behind {before} pages"
    );
}

/// A page grant must carry its page: without data (or with the wrong length) it
/// is refused before anything is queued — never sent as 4 KiB of made-up zeros —
/// and the connection stays usable.
#[test]
fn page_grant_without_its_data_is_refused() {
    let ms = mesh(2);
    let g = Msg::Grant {
        page: 3,
        access: Access::Read,
        version: 1,
        data: Data::Page,
    };
    for data in [None, Some(&[1u8; 100][..])] {
        match ms[0].send_msg(1, &g, data) {
            Err(TransportError::Wire(WireError::MissingData { page: 3 })) => {}
            r => panic!("{r:?}"),
        }
    }
    assert!(matches!(wire::check_msg(&g, Some(&[0u8; 4096])), Ok(())));
    ms[0].send_msg(1, &Msg::Inv { page: 3 }, None).unwrap();
    // Nothing malformed went out: the next frame on the link is the Inv.
    let mut ev = Vec::new();
    let end = Instant::now() + Duration::from_secs(2);
    while ev.is_empty() && Instant::now() < end {
        ms[0]
            .poll(Some(Duration::from_millis(5)), &[], &mut ev)
            .unwrap();
        ev.clear();
        ms[1]
            .poll(Some(Duration::from_millis(5)), &[], &mut ev)
            .unwrap();
    }
    match ev.first() {
        Some(TransportEvent::Frame {
            from: 0,
            frame:
                Frame::Proto {
                    msg: Msg::Inv { page: 3 },
                    ..
                },
            ..
        }) => {}
        e => panic!("{e:?}"),
    }
}

/// A man in the middle on every connection node 1 opens to node 0: records what
/// node 1 sends and, with `flip_at`, flips one bit at that offset of each
/// connection's stream (past the handshake: an injected or altered frame).
fn proxy_to(target: SocketAddr, flip_at: Option<usize>) -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let pl = TcpListener::bind("127.0.0.1:0").unwrap();
    let paddr = pl.local_addr().unwrap();
    let captured = Arc::new(Mutex::new(Vec::new()));
    let cap = captured.clone();
    thread::spawn(move || {
        for _ in 0..2 {
            let Ok((mut c, _)) = pl.accept() else { return };
            let mut s = loop {
                match TcpStream::connect(target) {
                    Ok(s) => break s,
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            };
            let (mut c2, mut s2) = (c.try_clone().unwrap(), s.try_clone().unwrap());
            thread::spawn(move || {
                let _ = std::io::copy(&mut s2, &mut c2);
            });
            let cap = cap.clone();
            thread::spawn(move || {
                let mut buf = [0u8; 65536];
                let mut off = 0usize;
                loop {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if let Some(f) = flip_at {
                                if (off..off + n).contains(&f) {
                                    buf[f - off] ^= 0x01;
                                }
                            }
                            off += n;
                            cap.lock().unwrap().extend_from_slice(&buf[..n]);
                            if s.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = s.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    (paddr, captured)
}

/// A two-node mesh where node 1 reaches node 0 through `proxy_to`.
fn mesh_via_proxy(
    mode: Protection,
    flip_at: Option<usize>,
) -> (TcpMesh, TcpMesh, Arc<Mutex<Vec<u8>>>) {
    let keys: Vec<NodeKeys> = NodeKeys::generate(2, mode).unwrap();
    let addrs = free_addrs(2);
    let (paddr, cap) = proxy_to(addrs[0], flip_at);
    let c0 = cfg(0, &addrs, &keys, 5000);
    let h0 = thread::spawn(move || TcpMesh::connect(&c0));
    let m1 = TcpMesh::connect(&cfg(1, &[paddr, addrs[1]], &keys, 5000)).unwrap();
    (h0.join().unwrap().unwrap(), m1, cap)
}

const MARK: &[u8; 16] = b"DVMM-GUEST-PAGE!";

fn send_marked_page(m1: &TcpMesh) {
    let page: Vec<u8> = MARK.iter().copied().cycle().take(4096).collect();
    let g = Msg::Grant {
        page: 5,
        access: Access::Read,
        version: 1,
        data: Data::Page,
    };
    m1.send_msg(0, &g, Some(&page)).unwrap();
    m1.send(
        0,
        Lane::Control,
        &Frame::App {
            kind: 1,
            tag: 0,
            payload: MARK.to_vec(),
        },
    )
    .unwrap();
}

fn recv_marked_page(m0: &TcpMesh) {
    let mut got = 0;
    let end = Instant::now() + Duration::from_secs(3);
    let mut ev = Vec::new();
    while got < 2 && Instant::now() < end {
        m0.poll(Some(Duration::from_millis(20)), &[], &mut ev)
            .unwrap();
        for e in ev.drain(..) {
            match e {
                TransportEvent::Frame {
                    frame: Frame::Proto { data: Some(d), .. },
                    ..
                } => {
                    assert!(d.chunks(16).all(|c| c == MARK));
                    got += 1;
                }
                TransportEvent::Frame {
                    frame: Frame::App { payload, .. },
                    ..
                } => {
                    assert_eq!(payload, MARK);
                    got += 1;
                }
                e => panic!("{e:?}"),
            }
        }
    }
    assert_eq!(got, 2, "page and message not both received");
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// With the default protection nothing of a page or an application message is
/// readable on the wire; with `integrity` it is (and still arrives intact).
#[test]
fn encrypted_frames_hide_pages_integrity_does_not() {
    for (mode, visible) in [(Protection::Encrypt, false), (Protection::Integrity, true)] {
        let (m0, m1, cap) = mesh_via_proxy(mode, None);
        send_marked_page(&m1);
        recv_marked_page(&m0);
        let bytes = cap.lock().unwrap().clone();
        assert!(bytes.len() > 4096, "{mode:?}: nothing captured");
        assert_eq!(contains(&bytes, MARK), visible, "{mode:?}");
    }
}

/// One bit changed on the path after the handshake (an injected or altered
/// frame) drops the connection with the cause, in both protected modes.
#[test]
fn altered_frame_after_handshake_drops_peer() {
    // The connector sends HELLO + RESPONSE (2 x (48 + 32) bytes) before data.
    let past_handshake = 2 * (wire::HEADER_SIZE + 32) + 20;
    for mode in [Protection::Encrypt, Protection::Integrity] {
        let (m0, m1, _) = mesh_via_proxy(mode, Some(past_handshake));
        send_marked_page(&m1);
        let end = Instant::now() + Duration::from_secs(3);
        let mut down = None;
        while down.is_none() && Instant::now() < end {
            match wait_event(&m0, Duration::from_millis(100)) {
                Some(TransportEvent::PeerDown { node: 1, reason }) => down = Some(reason),
                Some(TransportEvent::Frame { .. }) | None => {}
                e => panic!("{e:?}"),
            }
        }
        let reason = down.expect("altered frame accepted");
        assert!(
            reason.contains("failed authentication"),
            "{mode:?}: {reason}"
        );
    }
}

/// Both ends must run the same protection mode; the error names both.
#[test]
fn protection_mode_mismatch_refused() {
    let keys = ring(2);
    let addrs = free_addrs(2);
    let c0 = cfg(0, &addrs, &keys, 1500);
    let mut c1 = cfg(1, &addrs, &keys, 1500);
    c1.keys = c1.keys.with_protection(Protection::None);
    let h0 = thread::spawn(move || TcpMesh::connect(&c0));
    match TcpMesh::connect(&c1) {
        Err(TransportError::Auth {
            node: 0,
            err: AuthError::Mode { peer, mine },
        }) => assert_eq!((peer, mine), ("encrypt", "none")),
        r => panic!("{:?}", r.err()),
    }
    assert!(h0.join().unwrap().is_err());
}

/// `none` still authenticates the handshake and moves frames unprotected.
#[test]
fn no_protection_mode_still_works() {
    let ms = mesh_with(&NodeKeys::generate(2, Protection::None).unwrap());
    send_marked_page(&ms[1]);
    recv_marked_page(&ms[0]);
}
