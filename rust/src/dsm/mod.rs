//! Distributed shared memory (issue 4): one coherent guest-physical address
//! space over several nodes.
//!
//! # Parts
//!
//! - [`protocol`]: the coherence protocol as a pure state machine (IVY
//!   fixed-distributed-manager with versions; states, messages and the version
//!   rule are documented there). Property-tested in `tests/dsm_protocol.rs`.
//! - [`wire`]: framed, versioned binary protocol; fixed 48-byte `#[repr(C)]`
//!   zerocopy headers, every field validated; a range message (up to 2 MiB)
//!   travels as a train of such frames on one lane, assembled by the decoder.
//! - [`auth`]: per-node X25519 keys; mutual authentication and per-connection
//!   session keys for every data-plane connection.
//! - [`seal`]: AES-256-GCM protection of every frame after the handshake
//!   (encrypt, integrity only, or none).
//! - [`transport`]: the [`transport::Transport`] trait and a TCP mesh with a
//!   control lane and a bulk lane per pair of nodes.
//! - [`shm`]: a shared-memory transport for nodes on one host (rings in a
//!   shared segment, a unix-socket doorbell, the same sealed records).
//! - [`uffd`]: userfaultfd on the guest mapping; pages landed in place mapped
//!   with UFFDIO_CONTINUE, install (UFFDIO_COPY), downgrade
//!   (UFFDIO_WRITEPROTECT), drop (fallocate PUNCH_HOLE).
//! - [`engine`]: the per-node engine thread tying them together; it takes a
//!   transport ([`DsmEngine::start_with`]) or builds one ([`DsmEngine::start`]);
//!   with [`DsmConfig::ranges`] (on by default, `DVMM_DSM_RANGES=0` turns it
//!   off) it prefetches with range transactions.
//! - [`stats`](mod@stats): counters.
//!
//! # API for the VM
//!
//! ```ignore
//! let mut cfg = DsmConfig::new(node_index, node_addrs, node_keys, ram_ranges_per_node,
//!                              memfd, guest_mapping_addr, engine_mapping_addr);
//! cfg.app = Some(link.clone());   // application frames, peer failures, errors
//! // Before anything touches guest memory (the memfd must be all holes):
//! let dsm = unsafe { DsmEngine::start(cfg)? };   // forms the authenticated mesh
//! // Guest memory is now coherent: KVM and every VMM access through the guest
//! // mapping fault into the engine like guest accesses. Nothing else to do.
//! dsm.send_app(node, kind, tag, &payload)?;   // an application frame (control lane)
//! let s = dsm.stats();   // StatsSnapshot (serde)
//! dsm.shutdown();        // after the vCPUs have stopped
//! ```
//!
//! `ram[i]` is the byte range of guest RAM offsets (not GPAs: the MMIO hole is
//! skipped) that node i is home of, i.e. `numa[i].mem_start..+mem_size`. Each
//! node starts as the owner of its own range; untouched pages are zero and cost
//! neither memory nor transfers. With `foreign_budget = Some(B)` a node keeps
//! at most about B pages of other nodes' ranges resident (evicting the oldest
//! back to their home), so its resident guest memory stays below its share + B:
//! this is the memory aggregation bound.
//!
//! Application frames travel on the control lane of the same mesh; their kinds,
//! payloads (≤ 4 KiB) and the request/response layer belong to the cluster link
//! ([`crate::cluster`]): the DSM layer only carries them to its [`AppSink`].

pub mod auth;
pub mod engine;
pub mod prefetch;
pub mod protocol;
pub mod seal;
pub mod shm;
pub mod stats;
pub mod transport;
pub mod uffd;
pub mod wire;

pub use engine::{AppSink, DsmConfig, DsmEngine, DsmError, DsmHandle, EngineFault};
pub use stats::StatsSnapshot;
