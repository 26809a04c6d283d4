//! The shared-memory transport: sealed records through the rings (wrapping
//! them many times), the doorbell, peer loss, and the key check.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use dvmm::dsm::auth::NodeKeys;
use dvmm::dsm::protocol::{Access, Data, Msg};
use dvmm::dsm::seal::Protection;
use dvmm::dsm::shm::{ShmConfig, ShmMesh};
use dvmm::dsm::transport::{Lane, Transport, TransportError, TransportEvent};
use dvmm::dsm::wire::{Frame, Limits};

fn dir(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dvmm-shm-test-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn cfg(keys: &NodeKeys, dir: &Path, deadline_ms: u64) -> ShmConfig {
    ShmConfig {
        keys: keys.clone(),
        dir: dir.to_path_buf(),
        connect_deadline: Duration::from_millis(deadline_ms),
        dead_after: Duration::from_secs(2),
        limits: Limits {
            pages: 1 << 20,
            nodes: 3,
        },
    }
}

fn mesh(keys: &[NodeKeys], dir: &Path) -> Vec<Arc<ShmMesh>> {
    let hs: Vec<_> = keys
        .iter()
        .map(|k| {
            let c = cfg(k, dir, 5000);
            thread::spawn(move || ShmMesh::connect(&c))
        })
        .collect();
    hs.into_iter()
        .map(|h| Arc::new(h.join().unwrap().unwrap()))
        .collect()
}

#[test]
fn pages_and_messages_cross_in_order_and_segments_are_gone() {
    let d = dir("cross");
    let keys = NodeKeys::generate(3, Protection::Encrypt).unwrap();
    let ms = mesh(&keys, &d);
    // Both ends mapped every segment and it was unlinked: nothing left to find.
    assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0);
    // Enough pages to wrap the 1 MiB bulk ring several times.
    const PAGES: u64 = 1500;
    let sender = {
        let m2 = ms[2].clone();
        thread::spawn(move || {
            for p in 0..PAGES {
                let page = vec![(p % 251) as u8; 4096];
                let g = Msg::Grant {
                    page: p,
                    access: Access::Read,
                    version: 1,
                    data: Data::Page,
                };
                m2.send_msg(0, &g, Some(&page)).unwrap();
                // The sender's poller moves what did not fit as room appears.
                let mut ev = Vec::new();
                m2.poll(Some(Duration::ZERO), &[], &mut ev).unwrap();
            }
            let app = Frame::App {
                kind: 3,
                tag: 9,
                payload: b"hi".to_vec(),
            };
            m2.send(0, Lane::Control, &app).unwrap();
            ms_drain(&m2, Duration::from_secs(10));
        })
    };
    ms[1].send_msg(0, &Msg::Inv { page: 7 }, None).unwrap();
    let mut pages = 0u64;
    let (mut app, mut inv) = (false, false);
    let end = Instant::now() + Duration::from_secs(20);
    let mut ev = Vec::new();
    while (pages < PAGES || !app || !inv) && Instant::now() < end {
        ms[0]
            .poll(Some(Duration::from_millis(20)), &[], &mut ev)
            .unwrap();
        for e in ev.drain(..) {
            match e {
                TransportEvent::Frame {
                    from: 2,
                    lane: Lane::Bulk,
                    frame:
                        Frame::Proto {
                            msg: Msg::Grant { page, .. },
                            data: Some(d),
                        },
                } => {
                    assert_eq!(page, pages, "pages in order");
                    assert!(d.iter().all(|&b| b == (page % 251) as u8));
                    pages += 1;
                }
                TransportEvent::Frame {
                    from: 2,
                    lane: Lane::Control,
                    frame: Frame::App { payload, .. },
                } => {
                    assert_eq!(payload, b"hi");
                    app = true;
                }
                TransportEvent::Frame {
                    from: 1,
                    frame:
                        Frame::Proto {
                            msg: Msg::Inv { page: 7 },
                            ..
                        },
                    ..
                } => inv = true,
                e => panic!("{e:?}"),
            }
        }
    }
    assert_eq!((pages, app, inv), (PAGES, true, true));
    ms[0].send(2, Lane::Control, &Frame::Ping).unwrap();
    ms[0]
        .send(
            2,
            Lane::Control,
            &Frame::App {
                kind: 0,
                tag: 0,
                payload: vec![],
            },
        )
        .unwrap();
    sender.join().unwrap();
}

/// Poll until something arrives or `within` passes.
fn ms_drain(m: &ShmMesh, within: Duration) -> Vec<TransportEvent> {
    let end = Instant::now() + within;
    let mut ev = Vec::new();
    while ev.is_empty() && Instant::now() < end {
        m.poll(Some(Duration::from_millis(5)), &[], &mut ev)
            .unwrap();
    }
    ev
}

#[test]
fn a_peer_that_goes_away_is_reported_by_node() {
    let d = dir("down");
    let keys = NodeKeys::generate(2, Protection::Integrity).unwrap();
    let mut ms = mesh(&keys, &d);
    let m1 = ms.pop().unwrap();
    m1.shutdown();
    drop(m1);
    match ms_drain(&ms[0], Duration::from_secs(3)).first() {
        Some(TransportEvent::PeerDown { node: 1, reason }) => {
            assert!(
                reason.contains("EOF") || reason.contains("doorbell"),
                "{reason}"
            )
        }
        e => panic!("{e:?}"),
    }
    assert!(matches!(
        ms[0].send(1, Lane::Control, &Frame::Ping),
        Err(TransportError::PeerDown(1))
    ));
}

#[test]
fn a_node_with_other_keys_is_refused() {
    let d = dir("keys");
    let (p0, p1, px) = ([1u8; 32], [2u8; 32], [3u8; 32]);
    let pk = dvmm::dsm::auth::public_key;
    let session = [5u8; 16];
    let node0 = NodeKeys::new(0, p0, &[pk(&p0), pk(&p1)], session, Protection::Encrypt).unwrap();
    // Same VM session and node index, but a key pair node 0 never heard of.
    let stranger = NodeKeys::new(1, px, &[pk(&p0), pk(&px)], session, Protection::Encrypt).unwrap();
    let c0 = cfg(&node0, &d, 1500);
    let h0 = thread::spawn(move || ShmMesh::connect(&c0));
    match ShmMesh::connect(&cfg(&stranger, &d, 1500)) {
        Err(TransportError::Auth { node: 0, err }) => {
            assert!(err.to_string().contains("key"), "{err}")
        }
        r => panic!("{:?}", r.err()),
    }
    assert!(matches!(
        h0.join().unwrap(),
        Err(TransportError::AcceptTimeout(1))
    ));
}
