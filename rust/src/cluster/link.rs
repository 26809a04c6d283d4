//! The cluster link's application request/response layer. The VMMs' messages
//! to each other (IPIs, forwarded I/O, stop, ...) ride the DSM mesh as opaque
//! application frames (`Frame::App { kind, tag, payload }` on the control
//! lane); this layer sends them, numbers requests (`tag`), matches each
//! response (`kind | APP_RESPONSE`) to its waiter, runs a fast-path handler on
//! the DSM engine thread and queues everything else, with peer failures and
//! engine errors, for the cluster's service thread ([`AppLink::recv`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};

use super::messages::APP_RESPONSE;
use crate::dsm::protocol::NodeId;
use crate::dsm::{AppSink, DsmError, DsmHandle, EngineFault};
use crate::sync::lock;

/// Errors of the application layer.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(transparent)]
    Dsm(#[from] DsmError),
    #[error("no response from node {0} within the timeout")]
    Timeout(NodeId),
    #[error("the link closed before node {0} responded")]
    Closed(NodeId),
}

/// Something for the VM from the other nodes.
#[derive(Debug, Clone)]
pub enum AppEvent {
    /// An application message (`tag != 0` for a request that expects
    /// [`AppLink::respond`]).
    Message {
        from: NodeId,
        kind: u64,
        tag: u64,
        payload: Vec<u8>,
    },
    /// A node died or was disconnected; the VM must stop.
    PeerDown { node: NodeId, reason: String },
    /// A fatal DSM error (protocol violation, failed memory operation).
    Error(Arc<EngineFault>),
}

/// A fast-path handler for application messages, run on the DSM engine thread
/// (see [`AppLink::set_handler`]): `handler(from, kind, tag, payload)`.
pub type AppHandler = Box<dyn Fn(NodeId, u64, u64, &[u8]) -> bool + Send + Sync>;

/// How long [`AppLink::request`] spins for the response before it blocks.
const REQUEST_SPIN: Duration = Duration::from_micros(200);

/// The application layer of one node (the DSM engine's [`AppSink`]).
pub struct AppLink {
    me: NodeId,
    handler: Mutex<Option<AppHandler>>,
    events_tx: Sender<AppEvent>,
    events: Receiver<AppEvent>,
    /// Requests waiting for their response, by tag.
    waiters: Mutex<HashMap<u64, Sender<Vec<u8>>>>,
    next_tag: AtomicU64,
}

impl AppLink {
    /// The layer of node `me` (give it to the engine as `DsmConfig::app`).
    pub fn new(me: NodeId) -> Arc<AppLink> {
        let (events_tx, events) = crossbeam_channel::unbounded();
        Arc::new(AppLink {
            me,
            handler: Mutex::new(None),
            events_tx,
            events,
            waiters: Mutex::new(HashMap::new()),
            next_tag: AtomicU64::new(1),
        })
    }

    /// Handle application messages on the engine thread itself, saving the
    /// wake-up of the thread blocked in [`AppLink::recv`] (~25 us here):
    /// `handler(from, kind, tag, payload)` returns true when it consumed the
    /// message, false to pass it on to `recv`. It must be quick and must not
    /// touch guest memory or wait for the engine (it runs on the engine thread).
    /// Replaces any previous handler; [`AppLink::clear_handler`] removes it (do
    /// so before tearing down what it refers to).
    pub fn set_handler(&self, handler: AppHandler) {
        *lock(&self.handler) = Some(handler);
    }

    /// Remove the fast-path handler: every message goes to `recv` again.
    pub fn clear_handler(&self) {
        *lock(&self.handler) = None;
    }

    /// Send an application message (fire and forget) to a node (self included).
    pub fn send(
        &self,
        dsm: &DsmHandle,
        to: NodeId,
        kind: u64,
        payload: &[u8],
    ) -> Result<(), LinkError> {
        self.send_tagged(dsm, to, kind & !APP_RESPONSE, 0, payload)
    }

    /// Answer a request received as [`AppEvent::Message`] with a non-zero tag.
    pub fn respond(
        &self,
        dsm: &DsmHandle,
        to: NodeId,
        kind: u64,
        tag: u64,
        payload: &[u8],
    ) -> Result<(), LinkError> {
        self.send_tagged(dsm, to, kind | APP_RESPONSE, tag, payload)
    }

    /// Send a request and wait (spinning briefly, then blocking) for the
    /// response, e.g. a forwarded port or MMIO access.
    pub fn request(
        &self,
        dsm: &DsmHandle,
        to: NodeId,
        kind: u64,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, LinkError> {
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = crossbeam_channel::bounded(1);
        lock(&self.waiters).insert(tag, tx);
        let r = self
            .send_tagged(dsm, to, kind & !APP_RESPONSE, tag, payload)
            .and_then(|_| {
                let spin_end = Instant::now() + REQUEST_SPIN;
                loop {
                    match rx.try_recv() {
                        Ok(p) => return Ok(p),
                        Err(TryRecvError::Disconnected) => return Err(LinkError::Closed(to)),
                        Err(TryRecvError::Empty) if Instant::now() < spin_end => {
                            std::hint::spin_loop()
                        }
                        Err(TryRecvError::Empty) => break,
                    }
                }
                rx.recv_timeout(timeout).map_err(|e| match e {
                    RecvTimeoutError::Timeout => LinkError::Timeout(to),
                    RecvTimeoutError::Disconnected => LinkError::Closed(to),
                })
            });
        lock(&self.waiters).remove(&tag);
        r
    }

    /// Next event for the VM (messages from other nodes, peer failures, errors).
    pub fn recv(&self, timeout: Duration) -> Option<AppEvent> {
        self.events.recv_timeout(timeout).ok()
    }

    fn send_tagged(
        &self,
        dsm: &DsmHandle,
        to: NodeId,
        kind: u64,
        tag: u64,
        payload: &[u8],
    ) -> Result<(), LinkError> {
        if to != self.me {
            return Ok(dsm.send_app(to, kind, tag, payload)?);
        }
        if payload.len() > crate::dsm::wire::MAX_APP_PAYLOAD {
            return Err(DsmError::AppPayloadTooLarge(payload.len()).into());
        }
        // As if it came from the network: the fast path first.
        self.frame(to, kind, tag, payload.to_vec());
        Ok(())
    }

    fn deliver_response(&self, tag: u64, payload: Vec<u8>) {
        if let Some(w) = lock(&self.waiters).remove(&tag) {
            let _ = w.try_send(payload);
        }
    }

    fn post(&self, ev: AppEvent) {
        // The receiver lives as long as `self`: sending cannot fail.
        let _ = self.events_tx.send(ev);
    }
}

impl AppSink for AppLink {
    fn frame(&self, from: NodeId, kind: u64, tag: u64, payload: Vec<u8>) {
        if kind & APP_RESPONSE != 0 {
            self.deliver_response(tag, payload);
            return;
        }
        let handled = lock(&self.handler)
            .as_ref()
            .is_some_and(|h| h(from, kind, tag, &payload));
        if !handled {
            self.post(AppEvent::Message {
                from,
                kind,
                tag,
                payload,
            });
        }
    }

    fn peer_down(&self, node: NodeId, reason: &str) {
        self.post(AppEvent::PeerDown {
            node,
            reason: reason.to_string(),
        });
    }

    fn failed(&self, fault: Arc<EngineFault>) {
        self.post(AppEvent::Error(fault));
    }
}
