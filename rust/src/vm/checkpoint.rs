//! Snapshots of a running VM, and the restore of one (issue 15); the files
//! are `vm::snapshot`'s.
//!
//! **Taking one.** The boot node coordinates. It pauses its vCPUs (and its VM
//! clock) and asks every other node to do the same (`pause`, a request on the
//! cluster link answered once that node's vCPUs are out of the guest): from
//! then on no vCPU runs anywhere, so no new coherence transaction starts.
//! Then every node saves its share at once (`save`): the state of the vCPUs it
//! runs, one file each, and the RAM range it is home of, one file — each page
//! from this node's memfd if its copy here is valid, read through the guest
//! mapping (which fetches it from its holder through the coherence protocol)
//! if not, and left out if it is zero. The coordinator adds the devices and
//! the manifest (last), renames the directory into place, and resumes every
//! node (`resume`) or stops the VM.
//!
//! **Restoring one.** `Vm::new` with `restore` checks the whole snapshot
//! before it builds anything, then puts the vCPUs' state into the new vCPUs,
//! the devices' into the boot node's, and each node loads the RAM it is home
//! of through its guest mapping (so the coherence protocol knows the pages).
//! The vCPUs of every node start only when every node has loaded: the boot
//! node asks each peer (`ready`, answered once its service runs, that is once
//! `Vm::new` returned there), then starts them all (`resume`).

use std::collections::BTreeMap;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::run::VmControl;
use super::snapshot::{
    self, DeviceState, FileEntry, Manifest, MemoryFile, Snapshot, SnapshotError, PAGE,
};
use crate::cluster::{Cluster, SnapshotAgent};
use crate::dsm::engine::PageCopy;
use crate::dsm::protocol::NodeId;
use crate::vcpu::{VcpuError, VcpuShared, VcpuState};

/// How long a vCPU may take to pause or to hand over its state.
const VCPU_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a peer may take for its share of a snapshot (writing its memory).
pub const PEER_TIMEOUT: Duration = Duration::from_secs(600);

/// When a run takes snapshots (the spec's `snapshot` field).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotPlan {
    /// The snapshot directory (each snapshot replaces the previous one there).
    pub dir: String,
    /// Seconds after the start of the run of the first snapshot.
    pub after_s: f64,
    /// Then again every this many seconds (absent: once).
    #[serde(default)]
    pub every_s: Option<f64>,
    /// Run on after a snapshot (else the VM stops after the first one).
    #[serde(default)]
    pub leave_running: bool,
}

/// Errors of taking or restoring a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("vCPU {0} did not pause within {VCPU_TIMEOUT:?}")]
    PauseTimeout(u32),
    #[error("vCPU {0} did not hand over its state within {VCPU_TIMEOUT:?}")]
    CaptureTimeout(u32),
    #[error("saving vCPU {vcpu}: {source}")]
    Capture { vcpu: u32, source: VcpuError },
    #[error("restoring vCPU {vcpu}: {source}")]
    Restore { vcpu: u32, source: VcpuError },
    #[error("the coherence engine did not say where pages from {0:#x} are")]
    Engine(u64),
    #[error("{node}: {what}")]
    Peer { node: String, what: String },
    #[error("snapshots need dvmm's userspace LAPIC (--lapic user)")]
    KernelLapic,
    #[error("snapshot {dir}: it is of {what}, but the VM spec says {spec}")]
    Mismatch {
        dir: PathBuf,
        what: String,
        spec: String,
    },
    #[error("restoring COM1: {0}")]
    Device(#[from] crate::devices::DeviceError),
    #[error("KVM {what}: {err}")]
    Kvm {
        what: &'static str,
        err: kvm_ioctls::Error,
    },
}

/// One node's share of a snapshot, as it reports it to the coordinator.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodePart {
    pub files: BTreeMap<String, FileEntry>,
    pub memory: Vec<MemoryFile>,
    /// vCPUs saved.
    pub vcpus: Vec<u32>,
}

/// A snapshot request on the cluster link (coordinator -> node).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum Request {
    Pause,
    Save { dir: String },
    Resume,
    Ready,
}

/// Its response.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Response {
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    part: Option<NodePart>,
}

/// What a node needs to pause, save and resume its share (coordinator and
/// peers alike).
pub struct NodeSaver {
    pub node: usize,
    pub control: VmControl,
    pub vcpus: Vec<Arc<VcpuShared>>,
    pub memfd: Arc<File>,
    /// Host address of the guest mapping of RAM offset 0 (the whole memfd,
    /// contiguous, mapped while the VM exists).
    pub guest_base: usize,
    /// The RAM this node saves (bytes, RAM offsets): its home range.
    pub home: Range<u64>,
    pub cluster: Option<Arc<Cluster>>,
}

impl NodeSaver {
    /// Pause every vCPU of this node (and its VM clock); returns once they are
    /// all out of the guest.
    pub fn pause(&self) -> Result<(), CheckpointError> {
        self.control.pause();
        let end = Instant::now() + VCPU_TIMEOUT;
        for v in &self.vcpus {
            while !matches!(
                v.state(),
                VcpuState::Paused | VcpuState::Created | VcpuState::Stopped
            ) {
                if Instant::now() >= end {
                    return Err(CheckpointError::PauseTimeout(v.index));
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        Ok(())
    }

    /// Resume this node's vCPUs (a restored node: start them).
    pub fn resume(&self) {
        self.control.resume();
    }

    /// Save this node's share into `dir` (vCPUs paused).
    pub fn save(&self, dir: &Path) -> Result<NodePart, CheckpointError> {
        let mut part = NodePart::default();
        // The vCPUs this node runs (the others' replicas are parked here).
        let here: Vec<&Arc<VcpuShared>> = self.vcpus.iter().filter(|v| v.is_resident()).collect();
        for v in &here {
            v.request_capture();
        }
        for v in &here {
            let end = Instant::now() + VCPU_TIMEOUT;
            let snap = loop {
                if let Some(r) = v.take_capture() {
                    break r.map_err(|source| CheckpointError::Capture {
                        vcpu: v.index,
                        source,
                    })?;
                }
                if Instant::now() >= end {
                    return Err(CheckpointError::CaptureTimeout(v.index));
                }
                std::thread::sleep(Duration::from_micros(200));
            };
            let name = snapshot::vcpu_file(v.index);
            let e = snapshot::write_json(dir, &name, "vCPU state", &snap)?;
            part.files.insert(name, e);
            part.vcpus.push(v.index);
        }
        let name = snapshot::memory_file(self.node);
        let pages = (self.home.end - self.home.start) / PAGE as u64;
        let (e, mf) = snapshot::write_memory(dir, &name, self.home.start, pages, |first, buf| {
            self.fill(self.home.start + first * PAGE as u64, buf)
        })?;
        part.files.insert(name, e);
        part.memory.push(mf);
        Ok(part)
    }

    /// The current contents of the RAM at offset `off` (`buf.len()` bytes).
    fn fill(&self, off: u64, buf: &mut [u8]) -> Result<(), CheckpointError> {
        let Some(c) = &self.cluster else {
            // One node: the memfd is the RAM (holes read as zeros).
            return self.pread(off, buf);
        };
        let n = (buf.len() / PAGE) as u32;
        let first = off / PAGE as u64;
        let copies = c
            .dsm
            .page_copies(first, n, VCPU_TIMEOUT)
            .ok_or(CheckpointError::Engine(off))?;
        for (i, (page, copy)) in buf.chunks_mut(PAGE).zip(copies).enumerate() {
            let at = off + (i * PAGE) as u64;
            match copy {
                PageCopy::Zero => page.fill(0),
                PageCopy::Here => self.pread(at, page)?,
                PageCopy::Elsewhere => {
                    // SAFETY: `guest_base + at` lies in the guest mapping of the
                    // whole memfd (at < RAM size), which stays mapped while the VM
                    // exists; the read faults into the coherence engine like a
                    // guest access and returns once the current contents are here.
                    // No vCPU runs, so nothing writes the page meanwhile.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            (self.guest_base + at as usize) as *const u8,
                            page.as_mut_ptr(),
                            PAGE,
                        );
                    }
                }
            }
        }
        Ok(())
    }

    fn pread(&self, off: u64, buf: &mut [u8]) -> Result<(), CheckpointError> {
        self.memfd
            .read_exact_at(buf, off)
            .map_err(|source| SnapshotError::Io {
                path: PathBuf::from("guest RAM (memfd)"),
                source,
            })?;
        Ok(())
    }

    /// Answer a coordinator's request (the cluster service thread).
    fn answer(&self, raw: &[u8]) -> Response {
        let req: Request = match serde_json::from_slice(raw) {
            Ok(r) => r,
            Err(e) => {
                return Response {
                    error: Some(format!("malformed snapshot request: {e}")),
                    part: None,
                }
            }
        };
        let r = match req {
            Request::Pause => self.pause().map(|_| None),
            Request::Save { dir } => self.save(Path::new(&dir)).map(Some),
            Request::Resume => {
                self.resume();
                Ok(None)
            }
            Request::Ready => Ok(None),
        };
        match r {
            Ok(part) => Response { error: None, part },
            Err(e) => Response {
                error: Some(e.to_string()),
                part: None,
            },
        }
    }
}

impl SnapshotAgent for NodeSaver {
    fn handle(&self, request: &[u8]) -> Vec<u8> {
        serde_json::to_vec(&self.answer(request)).unwrap_or_default()
    }
}

/// What the coordinator needs besides its own [`NodeSaver`].
pub struct Coordinator<'a> {
    pub saver: &'a NodeSaver,
    pub manifest_base: Manifest,
    pub devices: &'a (dyn Fn() -> DeviceState + Sync),
    pub kvmclock: &'a (dyn Fn() -> Option<u64> + Sync),
}

/// Figures of one snapshot (reported in the run's result).
#[derive(Debug, Clone, Default, Serialize)]
pub struct SnapshotReport {
    pub dir: String,
    /// How long the guest stood still (pause to resume or stop).
    pub pause_ms: f64,
    /// Of that, writing the files.
    pub write_ms: f64,
    pub bytes: u64,
    pub files: usize,
    pub pages_stored: u64,
}

impl Coordinator<'_> {
    fn peers(&self) -> Vec<NodeId> {
        match &self.saver.cluster {
            Some(c) => c.peer_ids(),
            None => Vec::new(),
        }
    }

    fn ask(&self, node: NodeId, req: &Request) -> Result<Option<NodePart>, CheckpointError> {
        let Some(c) = &self.saver.cluster else {
            return Ok(None);
        };
        let peer = |what: String| CheckpointError::Peer {
            node: c.describe(node),
            what,
        };
        let raw = serde_json::to_vec(req).map_err(|e| peer(e.to_string()))?;
        let resp = c
            .snapshot_request(node, &raw, PEER_TIMEOUT)
            .map_err(|e| peer(e.to_string()))?;
        let resp: Response = serde_json::from_slice(&resp)
            .map_err(|e| peer(format!("malformed snapshot response: {e}")))?;
        match resp.error {
            Some(e) => Err(peer(e)),
            None => Ok(resp.part),
        }
    }

    /// Ask every peer at once; their answers in peer order.
    fn ask_all(&self, req: &Request) -> Result<Vec<Option<NodePart>>, CheckpointError> {
        let peers = self.peers();
        std::thread::scope(|s| {
            let hs: Vec<_> = peers
                .iter()
                .map(|&n| s.spawn(move || self.ask(n, req)))
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(panicked())))
                .collect()
        })
    }

    /// Pause the VM everywhere, save it into `plan.dir`, then resume it
    /// everywhere if `resume` (else leave it paused: the caller stops it).
    pub fn take(&self, dir: &Path, resume: bool) -> Result<SnapshotReport, CheckpointError> {
        let t0 = Instant::now();
        let paused = self
            .saver
            .pause()
            .and_then(|_| self.ask_all(&Request::Pause));
        let r = paused.and_then(|_| self.save_all(dir));
        if resume || r.is_err() {
            // A failed snapshot leaves the VM running as it was.
            let _ = self.ask_all(&Request::Resume);
            self.saver.resume();
        }
        let mut rep = r?;
        rep.pause_ms = t0.elapsed().as_secs_f64() * 1e3;
        Ok(rep)
    }

    fn save_all(&self, dir: &Path) -> Result<SnapshotReport, CheckpointError> {
        let t0 = Instant::now();
        let partial = sibling(dir, "partial");
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SnapshotError::Io { path, source }
        };
        if partial.exists() {
            std::fs::remove_dir_all(&partial).map_err(io(&partial))?;
        }
        std::fs::create_dir_all(&partial).map_err(io(&partial))?;
        let dir_s = partial.to_string_lossy().into_owned();
        let (mine, theirs) = std::thread::scope(|s| {
            let h = s.spawn(|| self.ask_all(&Request::Save { dir: dir_s.clone() }));
            let mine = self.saver.save(&partial);
            let theirs = h.join().unwrap_or_else(|_| Err(panicked()));
            (mine, theirs)
        });
        let mut m = self.manifest_base.clone();
        if let Some(c) = &self.saver.cluster {
            // Where the vCPUs run now (they may have migrated).
            m.vcpu_node = c.vcpu_nodes();
        }
        let mut parts = vec![mine?];
        parts.extend(theirs?.into_iter().flatten());
        for p in parts {
            m.files.extend(p.files);
            m.memory_files.extend(p.memory);
        }
        m.memory_files.sort_by_key(|f| f.ram_offset);
        let dev = (self.devices)();
        m.files.insert(
            snapshot::DEVICES_FILE.into(),
            snapshot::write_json(&partial, snapshot::DEVICES_FILE, "device state", &dev)?,
        );
        m.kvmclock_ns = (self.kvmclock)();
        m.clock_ns = self.saver.control.clock_ns();
        m.taken_unix_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        // The manifest is written last: without it the directory is no snapshot.
        snapshot::write_json(&partial, "manifest.json", "snapshot manifest", &m)?;
        let old = sibling(dir, "old");
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(io(&old))?;
        }
        if dir.exists() {
            std::fs::rename(dir, &old).map_err(io(dir))?;
        }
        std::fs::rename(&partial, dir).map_err(io(dir))?;
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(io(&old))?;
        }
        Ok(SnapshotReport {
            dir: dir.to_string_lossy().into_owned(),
            pause_ms: 0.0,
            write_ms: t0.elapsed().as_secs_f64() * 1e3,
            bytes: m.files.values().map(|f| f.bytes).sum(),
            files: m.files.len() + 1,
            pages_stored: m.memory_files.iter().map(|f| f.stored).sum(),
        })
    }

    /// Restore: wait until every peer has loaded its share, then start the
    /// vCPUs of every node.
    pub fn start_restored(&self) -> Result<(), CheckpointError> {
        self.ask_all(&Request::Ready)?;
        self.ask_all(&Request::Resume)?;
        self.saver.resume();
        Ok(())
    }
}

/// A snapshot thread of the coordinator panicked.
fn panicked() -> CheckpointError {
    CheckpointError::Peer {
        node: "a snapshot thread".into(),
        what: "panicked".into(),
    }
}

/// `<dir>.<tag>` next to `dir`.
fn sibling(dir: &Path, tag: &str) -> PathBuf {
    let mut s = dir.as_os_str().to_os_string();
    s.push(".");
    s.push(tag);
    PathBuf::from(s)
}

/// Check that `snap` is a snapshot of the VM `spec` describes (the caller
/// builds the spec from the manifest; this catches a mismatch).
pub fn check_spec(snap: &Snapshot, spec: &super::VmSpec) -> Result<(), CheckpointError> {
    let m = &snap.manifest;
    let mismatch = |what: String, spec: String| CheckpointError::Mismatch {
        dir: snap.dir.clone(),
        what,
        spec,
    };
    if m.vcpus != spec.vcpus {
        return Err(mismatch(
            format!("{} vCPUs", m.vcpus),
            format!("{}", spec.vcpus),
        ));
    }
    if m.memory != spec.memory {
        return Err(mismatch(
            format!("{} bytes of RAM", m.memory),
            format!("{}", spec.memory),
        ));
    }
    if m.numa != spec.numa_nodes() {
        return Err(mismatch(
            format!("the NUMA topology {:?}", m.numa),
            format!("{:?}", spec.numa_nodes()),
        ));
    }
    let model = spec
        .cpu_model()
        .map(|c| c.name().to_string())
        .unwrap_or_default();
    if m.cpu != model {
        return Err(mismatch(format!("CPU model {}", m.cpu), model));
    }
    Ok(())
}

/// Load the stored pages of RAM range `range` (RAM offsets) into the VM: into
/// the memfd directly on a one-node VM, through the guest mapping on a node of
/// a distributed VM (each page is this node's: it becomes present here as the
/// coherence protocol expects).
pub fn load_memory(
    snap: &Snapshot,
    range: &Range<u64>,
    memfd: &File,
    guest_base: usize,
    distributed: bool,
) -> Result<u64, CheckpointError> {
    let mut loaded = 0;
    let what = format!(
        "loading RAM {:#x}-{:#x} from {}",
        range.start,
        range.end,
        snap.dir.display()
    );
    let mut progress = snapshot::Progress::new(what, range.end - range.start);
    let mut last = range.start;
    snap.for_each_page(range, |off, page| {
        progress.add(off.saturating_sub(last));
        last = off;
        if distributed {
            // SAFETY: `off` is a page of this node's range of the RAM (checked by
            // for_each_page against `range`, which lies inside the RAM), and the
            // guest mapping covers the whole memfd while the VM exists; no vCPU
            // runs yet. The write faults into this node's coherence engine,
            // which installs the page here, its home.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    page.as_ptr(),
                    (guest_base + off as usize) as *mut u8,
                    PAGE,
                );
            }
        } else {
            memfd
                .write_all_at(page, off)
                .map_err(|source| SnapshotError::Io {
                    path: PathBuf::from("guest RAM (memfd)"),
                    source,
                })?;
        }
        loaded += 1;
        Ok(())
    })?;
    progress.add(range.end.saturating_sub(last));
    eprintln!(
        "dvmm: loaded {loaded} pages ({:.1} MiB) of RAM {:#x}-{:#x}: {}",
        (loaded * PAGE as u64) as f64 / (1u64 << 20) as f64,
        range.start,
        range.end,
        progress.figures()
    );
    Ok(loaded)
}
