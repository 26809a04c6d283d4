//! VM snapshots on disk (issue 15): the directory format, writing each part
//! with its SHA-256, and checking a whole snapshot before anything is restored
//! from it (`vm::checkpoint` takes and restores them).
//!
//! A snapshot is a directory:
//! - `manifest.json` ([`Manifest`]): format name and version, the VM's shape
//!   (vCPUs, memory, virtual NUMA topology, CPU model), which node ran each
//!   vCPU, the VM clock, and every other file with its size and SHA-256.
//!   Written last: a directory without it is no snapshot.
//! - `vcpu-<i>.json`: [`VcpuSnapshot`] of vCPU i.
//! - `devices.json` ([`DeviceState`]): the IOAPIC and COM1.
//! - `memory-<k>.bin`: the RAM range node k is home of (RAM offsets, as the
//!   memfd and the spec's NUMA ranges count them): [`MEMORY_MAGIC`], the
//!   range's RAM offset and page count (u64 LE), the non-zero pages in order,
//!   then a bitmap of which pages are stored (1 bit per page, LSB first).
//!   Zero pages are not stored.
//!
//! A snapshot is written into `<dir>.partial` and renamed to `<dir>` once
//! complete, so `<dir>` is always either the previous snapshot or the new one.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::devices::SerialRegs;
use crate::ioapic::IoApic;
use crate::numa::NumaNode;
use crate::vcpu::snapshot::VcpuSnapshot;

/// `manifest.json`'s `format`.
pub const FORMAT: &str = "dvmm-snapshot";
/// The snapshot format this dvmm writes and reads.
pub const VERSION: u32 = 1;
/// First bytes of a memory file.
pub const MEMORY_MAGIC: &[u8; 8] = b"DVMMMEM1";
/// Bytes of a page.
pub const PAGE: usize = 4096;
/// Largest manifest or state file read (they are small JSON files).
const MAX_JSON: u64 = 64 << 20;

/// What is wrong with a snapshot, or what failed while writing one. Every
/// message names the file and the check.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not valid JSON for a {what}: {source}")]
    Json {
        path: PathBuf,
        what: &'static str,
        source: serde_json::Error,
    },
    #[error(
        "{0}: not a dvmm snapshot (no manifest.json: incomplete, or not a snapshot directory)"
    )]
    NoManifest(PathBuf),
    #[error("{path}: format {found:?}, expected {FORMAT:?}")]
    Format { path: PathBuf, found: String },
    #[error("{path}: snapshot format version {found}, this dvmm reads version {VERSION} only")]
    Version { path: PathBuf, found: u32 },
    #[error("{path}: {size} bytes, the manifest says {expected}")]
    Size {
        path: PathBuf,
        size: u64,
        expected: u64,
    },
    #[error("{path}: SHA-256 {found}, the manifest says {expected} (corrupted)")]
    Digest {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("{path}: {what}")]
    Malformed { path: PathBuf, what: String },
    #[error("snapshot {dir}: {what}")]
    Inconsistent { dir: PathBuf, what: String },
    #[error("cannot serialize {what}: {source}")]
    Serialize {
        what: &'static str,
        source: serde_json::Error,
    },
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A file of the snapshot: its size and SHA-256 (hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub bytes: u64,
    pub sha256: String,
}

/// A memory file: the RAM range it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryFile {
    pub file: String,
    pub ram_offset: u64,
    pub pages: u64,
    /// Pages stored (non-zero).
    pub stored: u64,
}

/// `manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub vcpus: u32,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// The guest's NUMA topology (its SRAT/SLIT); a restore keeps it.
    pub numa: Vec<NumaNode>,
    /// CPU model name.
    pub cpu: String,
    /// Whether the vCPUs' CPUID offers the TSC-deadline timer (a distributed
    /// VM's does not): a restore keeps it, on any number of nodes.
    pub tsc_deadline: bool,
    /// The nodes it was taken on, and the node that ran each vCPU.
    pub nodes: usize,
    pub vcpu_node: Vec<usize>,
    /// VM clock (ns) when it was taken.
    pub clock_ns: u64,
    /// kvm-clock (ns) when it was taken (KVM_GET_CLOCK on the boot node).
    pub kvmclock_ns: Option<u64>,
    /// Seconds since the Unix epoch when it was taken.
    pub taken_unix_s: u64,
    pub memory_files: Vec<MemoryFile>,
    /// Every file but the manifest.
    pub files: BTreeMap<String, FileEntry>,
}

/// The devices' state (they live on the boot node).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceState {
    pub ioapic: IoApic,
    pub com1: SerialRegs,
}

/// A writer that counts and hashes what goes through it.
pub struct HashedFile {
    path: PathBuf,
    out: BufWriter<File>,
    hash: Sha256,
    bytes: u64,
}

impl HashedFile {
    /// Create (truncate) `path`.
    pub fn create(path: &Path) -> Result<Self, SnapshotError> {
        let f = File::create(path).map_err(io_err(path))?;
        Ok(HashedFile {
            path: path.to_path_buf(),
            out: BufWriter::with_capacity(1 << 20, f),
            hash: Sha256::new(),
            bytes: 0,
        })
    }

    pub fn write(&mut self, b: &[u8]) -> Result<(), SnapshotError> {
        self.hash.update(b);
        self.bytes += b.len() as u64;
        self.out.write_all(b).map_err(io_err(&self.path))
    }

    /// Flush to disk (fsync) and return the entry for the manifest.
    pub fn finish(self) -> Result<FileEntry, SnapshotError> {
        let f = self.out.into_inner().map_err(|e| SnapshotError::Io {
            path: self.path.clone(),
            source: e.into_error(),
        })?;
        f.sync_all().map_err(io_err(&self.path))?;
        Ok(FileEntry {
            bytes: self.bytes,
            sha256: hex::encode(self.hash.finalize()),
        })
    }
}

/// Write `value` as JSON to `dir/name`; its entry.
pub fn write_json<T: Serialize>(
    dir: &Path,
    name: &str,
    what: &'static str,
    value: &T,
) -> Result<FileEntry, SnapshotError> {
    let bytes =
        serde_json::to_vec(value).map_err(|source| SnapshotError::Serialize { what, source })?;
    let mut f = HashedFile::create(&dir.join(name))?;
    f.write(&bytes)?;
    f.finish()
}

/// True if every byte of `page` is zero.
pub fn is_zero(page: &[u8]) -> bool {
    let (pre, words, post) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets
        // the aligned middle of the byte slice.
        unsafe { page.align_to::<u64>() }
    };
    pre.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && post.iter().all(|&b| b == 0)
}

/// Write the memory file `dir/name` for `pages` pages at RAM offset
/// `ram_offset`; `fill(first, buf)` fills `buf` (a multiple of [`PAGE`]) with
/// the pages from page index `first` on (relative to the range). Zero pages
/// are left out. Returns the manifest's entries.
/// Progress of a long memory transfer on stderr: a line at most every second
/// (`dvmm: {what}: X of Y MiB, Z MiB/s`), nothing for one that ends sooner.
pub struct Progress {
    what: String,
    total: u64,
    done: u64,
    t0: std::time::Instant,
    last: std::time::Instant,
}

impl Progress {
    /// A transfer of `total` bytes, named `what` in the lines.
    pub fn new(what: impl Into<String>, total: u64) -> Self {
        let now = std::time::Instant::now();
        Progress {
            what: what.into(),
            total,
            done: 0,
            t0: now,
            last: now,
        }
    }

    /// `n` more bytes done.
    pub fn add(&mut self, n: u64) {
        self.done += n;
        if self.last.elapsed() >= std::time::Duration::from_secs(1) {
            self.last = std::time::Instant::now();
            eprintln!("dvmm: {}: {}", self.what, self.figures());
        }
    }

    /// "X of Y MiB in T s, R MiB/s".
    pub fn figures(&self) -> String {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        let s = self.t0.elapsed().as_secs_f64();
        format!(
            "{:.0} of {:.0} MiB in {:.1} s, {:.0} MiB/s",
            mib(self.done),
            mib(self.total),
            s,
            mib(self.done) / s.max(1e-9)
        )
    }

    /// Whether it ran long enough to have reported (the caller then says it ended).
    pub fn reported(&self) -> bool {
        self.last > self.t0
    }
}

pub fn write_memory<E: From<SnapshotError>>(
    dir: &Path,
    name: &str,
    ram_offset: u64,
    pages: u64,
    mut fill: impl FnMut(u64, &mut [u8]) -> Result<(), E>,
) -> Result<(FileEntry, MemoryFile), E> {
    const BATCH: u64 = 256;
    let mut f = HashedFile::create(&dir.join(name))?;
    f.write(MEMORY_MAGIC)?;
    f.write(&ram_offset.to_le_bytes())?;
    f.write(&pages.to_le_bytes())?;
    let mut bitmap = vec![0u8; pages.div_ceil(8) as usize];
    let mut buf = vec![0u8; BATCH as usize * PAGE];
    let mut stored = 0;
    let mut first = 0;
    let mut progress = Progress::new(format!("writing {name}"), pages * PAGE as u64);
    while first < pages {
        let n = BATCH.min(pages - first);
        let chunk = &mut buf[..n as usize * PAGE];
        fill(first, chunk)?;
        progress.add(n * PAGE as u64);
        for (i, page) in chunk.chunks(PAGE).enumerate() {
            if !is_zero(page) {
                let p = first as usize + i;
                bitmap[p / 8] |= 1 << (p % 8);
                f.write(page)?;
                stored += 1;
            }
        }
        first += n;
    }
    f.write(&bitmap)?;
    let entry = f.finish()?;
    if progress.reported() {
        eprintln!("dvmm: wrote {name}: {}", progress.figures());
    }
    Ok((
        entry,
        MemoryFile {
            file: name.to_string(),
            ram_offset,
            pages,
            stored,
        },
    ))
}

/// A snapshot directory whose manifest and files passed every check.
#[derive(Debug)]
pub struct Snapshot {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Snapshot {
    /// Open `dir` and check everything: the manifest's format and version,
    /// its consistency (every vCPU has a state file, the memory files tile the
    /// RAM), and the size and SHA-256 of every file. Nothing is restored from
    /// a snapshot that fails any check.
    pub fn open(dir: &Path) -> Result<Snapshot, SnapshotError> {
        let mpath = dir.join("manifest.json");
        if !mpath.is_file() {
            return Err(SnapshotError::NoManifest(dir.to_path_buf()));
        }
        let raw = read_limited(&mpath)?;
        // Format and version first, so a newer format is refused by name rather
        // than by whatever field it changed.
        let head: serde_json::Value =
            serde_json::from_slice(&raw).map_err(|source| SnapshotError::Json {
                path: mpath.clone(),
                what: "snapshot manifest",
                source,
            })?;
        let format = head.get("format").and_then(|v| v.as_str()).unwrap_or("");
        if format != FORMAT {
            return Err(SnapshotError::Format {
                path: mpath,
                found: format.to_string(),
            });
        }
        let version = head.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
        if version != u64::from(VERSION) {
            return Err(SnapshotError::Version {
                path: mpath,
                found: u32::try_from(version).unwrap_or(u32::MAX),
            });
        }
        let manifest: Manifest =
            serde_json::from_slice(&raw).map_err(|source| SnapshotError::Json {
                path: mpath.clone(),
                what: "snapshot manifest",
                source,
            })?;
        let snap = Snapshot {
            dir: dir.to_path_buf(),
            manifest,
        };
        snap.check_consistency()?;
        for (name, entry) in &snap.manifest.files {
            check_file(&dir.join(name), entry)?;
        }
        Ok(snap)
    }

    fn inconsistent(&self, what: String) -> SnapshotError {
        SnapshotError::Inconsistent {
            dir: self.dir.clone(),
            what,
        }
    }

    fn check_consistency(&self) -> Result<(), SnapshotError> {
        let m = &self.manifest;
        for name in m.files.keys() {
            // Only plain names inside the directory.
            if name.is_empty() || name.contains('/') || name.starts_with('.') {
                return Err(self.inconsistent(format!("file name {name:?} in the manifest")));
            }
        }
        if m.vcpu_node.len() != m.vcpus as usize {
            return Err(self.inconsistent(format!(
                "vcpu_node has {} entries for {} vCPUs",
                m.vcpu_node.len(),
                m.vcpus
            )));
        }
        for i in 0..m.vcpus {
            let name = vcpu_file(i);
            if !m.files.contains_key(&name) {
                return Err(self.inconsistent(format!("no {name} for vCPU {i}")));
            }
        }
        if !m.files.contains_key(DEVICES_FILE) {
            return Err(self.inconsistent(format!("no {DEVICES_FILE}")));
        }
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for mf in &m.memory_files {
            if !m.files.contains_key(&mf.file) {
                return Err(self.inconsistent(format!("memory file {} is not listed", mf.file)));
            }
            ranges.push((mf.ram_offset, mf.pages * PAGE as u64));
        }
        ranges.sort_unstable();
        let mut at = 0;
        for (off, len) in ranges {
            if off != at {
                return Err(self.inconsistent(format!(
                    "the memory files do not tile the RAM: a gap or overlap at {at:#x}"
                )));
            }
            at = off + len;
        }
        if at != m.memory {
            return Err(self.inconsistent(format!(
                "the memory files cover {at:#x} bytes of {:#x}",
                m.memory
            )));
        }
        Ok(())
    }

    /// The saved state of vCPU `i`.
    pub fn vcpu(&self, i: u32) -> Result<VcpuSnapshot, SnapshotError> {
        read_json(&self.dir.join(vcpu_file(i)), "vCPU state")
    }

    /// The devices' saved state.
    pub fn devices(&self) -> Result<DeviceState, SnapshotError> {
        read_json(&self.dir.join(DEVICES_FILE), "device state")
    }

    /// Call `put(ram_offset, page)` for every stored (non-zero) page whose RAM
    /// offset is in `want` (pages not given are zero).
    pub fn for_each_page(
        &self,
        want: &std::ops::Range<u64>,
        mut put: impl FnMut(u64, &[u8]) -> Result<(), SnapshotError>,
    ) -> Result<(), SnapshotError> {
        for mf in &self.manifest.memory_files {
            let end = mf.ram_offset + mf.pages * PAGE as u64;
            if end <= want.start || mf.ram_offset >= want.end {
                continue;
            }
            let path = self.dir.join(&mf.file);
            read_memory(&path, mf, |off, page| {
                if want.contains(&off) {
                    put(off, page)
                } else {
                    Ok(())
                }
            })?;
        }
        Ok(())
    }
}

/// The name of vCPU `i`'s state file.
pub fn vcpu_file(i: u32) -> String {
    format!("vcpu-{i}.json")
}

/// The name of node `k`'s memory file.
pub fn memory_file(k: usize) -> String {
    format!("memory-{k}.bin")
}

/// The devices' state file.
pub const DEVICES_FILE: &str = "devices.json";

fn read_limited(path: &Path) -> Result<Vec<u8>, SnapshotError> {
    let f = File::open(path).map_err(io_err(path))?;
    let mut raw = Vec::new();
    f.take(MAX_JSON)
        .read_to_end(&mut raw)
        .map_err(io_err(path))?;
    Ok(raw)
}

fn read_json<T: for<'de> Deserialize<'de>>(
    path: &Path,
    what: &'static str,
) -> Result<T, SnapshotError> {
    let raw = read_limited(path)?;
    serde_json::from_slice(&raw).map_err(|source| SnapshotError::Json {
        path: path.to_path_buf(),
        what,
        source,
    })
}

/// Size and SHA-256 of `path` against its manifest entry.
fn check_file(path: &Path, entry: &FileEntry) -> Result<(), SnapshotError> {
    let f = File::open(path).map_err(io_err(path))?;
    let size = f.metadata().map_err(io_err(path))?.len();
    if size != entry.bytes {
        return Err(SnapshotError::Size {
            path: path.to_path_buf(),
            size,
            expected: entry.bytes,
        });
    }
    let mut r = BufReader::with_capacity(1 << 20, f);
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
    }
    let found = hex::encode(hash.finalize());
    if found != entry.sha256 {
        return Err(SnapshotError::Digest {
            path: path.to_path_buf(),
            found,
            expected: entry.sha256.clone(),
        });
    }
    Ok(())
}

/// Read a memory file (already checked against its digest): every stored page
/// with its RAM offset.
fn read_memory(
    path: &Path,
    mf: &MemoryFile,
    mut put: impl FnMut(u64, &[u8]) -> Result<(), SnapshotError>,
) -> Result<(), SnapshotError> {
    let malformed = |what: String| SnapshotError::Malformed {
        path: path.to_path_buf(),
        what,
    };
    let mut f = File::open(path).map_err(io_err(path))?;
    let size = f.metadata().map_err(io_err(path))?.len();
    let bitmap_len = mf.pages.div_ceil(8);
    let mut head = [0u8; 24];
    f.read_exact(&mut head).map_err(io_err(path))?;
    if &head[..8] != MEMORY_MAGIC {
        return Err(malformed("not a dvmm memory file (bad magic)".into()));
    }
    let off = u64::from_le_bytes(head[8..16].try_into().unwrap_or_default());
    let pages = u64::from_le_bytes(head[16..24].try_into().unwrap_or_default());
    if off != mf.ram_offset || pages != mf.pages {
        return Err(malformed(format!(
            "holds {pages} pages at {off:#x}, the manifest says {} at {:#x}",
            mf.pages, mf.ram_offset
        )));
    }
    let expected = 24 + mf.stored * PAGE as u64 + bitmap_len;
    if size != expected {
        return Err(malformed(format!(
            "{size} bytes, {expected} expected for {} stored pages",
            mf.stored
        )));
    }
    let mut bitmap = vec![0u8; bitmap_len as usize];
    f.seek(SeekFrom::Start(size - bitmap_len))
        .and_then(|_| f.read_exact(&mut bitmap))
        .map_err(io_err(path))?;
    let set: u64 = bitmap.iter().map(|b| u64::from(b.count_ones())).sum();
    if set != mf.stored {
        return Err(malformed(format!(
            "its bitmap marks {set} pages, {} are stored",
            mf.stored
        )));
    }
    f.seek(SeekFrom::Start(24)).map_err(io_err(path))?;
    let mut r = BufReader::with_capacity(1 << 20, f);
    let mut page = vec![0u8; PAGE];
    for p in 0..mf.pages {
        if bitmap[(p / 8) as usize] & (1 << (p % 8)) != 0 {
            r.read_exact(&mut page).map_err(io_err(path))?;
            put(mf.ram_offset + p * PAGE as u64, &page)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("dvmm-snap-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn memory_file_round_trip_elides_zero_pages() {
        let d = tmp("mem");
        let pages = 300u64;
        let content = |p: u64| -> u8 {
            if p.is_multiple_of(7) {
                (p % 251) as u8 + 1
            } else {
                0
            }
        };
        let (entry, mf) =
            write_memory::<SnapshotError>(&d, "memory-0.bin", 1 << 20, pages, |first, buf| {
                for (i, page) in buf.chunks_mut(PAGE).enumerate() {
                    page.fill(content(first + i as u64));
                }
                Ok(())
            })
            .unwrap();
        assert_eq!(mf.stored, pages.div_ceil(7));
        assert_eq!(
            entry.bytes,
            24 + mf.stored * PAGE as u64 + pages.div_ceil(8)
        );
        check_file(&d.join("memory-0.bin"), &entry).unwrap();
        let mut seen = Vec::new();
        read_memory(&d.join("memory-0.bin"), &mf, |off, page| {
            let p = (off - (1 << 20)) / PAGE as u64;
            assert!(page.iter().all(|&b| b == content(p)));
            seen.push(p);
            Ok(())
        })
        .unwrap();
        let want: Vec<u64> = (0..pages).filter(|p| p.is_multiple_of(7)).collect();
        assert_eq!(seen, want);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn corrupted_file_is_refused_by_digest_and_size() {
        let d = tmp("corrupt");
        let entry = write_json(&d, "x.json", "test", &vec![1u32, 2, 3]).unwrap();
        check_file(&d.join("x.json"), &entry).unwrap();
        std::fs::write(d.join("x.json"), b"[1,2,4]").unwrap();
        let e = check_file(&d.join("x.json"), &entry).unwrap_err();
        assert!(matches!(e, SnapshotError::Digest { .. }), "{e}");
        assert!(e.to_string().contains("x.json"));
        std::fs::write(d.join("x.json"), b"[1,2]").unwrap();
        let e = check_file(&d.join("x.json"), &entry).unwrap_err();
        assert!(matches!(e, SnapshotError::Size { .. }), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn manifest_of_another_format_or_version_is_refused() {
        let d = tmp("manifest");
        assert!(matches!(
            Snapshot::open(&d).unwrap_err(),
            SnapshotError::NoManifest(_)
        ));
        std::fs::write(
            d.join("manifest.json"),
            br#"{"format":"other","version":1}"#,
        )
        .unwrap();
        assert!(matches!(
            Snapshot::open(&d).unwrap_err(),
            SnapshotError::Format { .. }
        ));
        std::fs::write(
            d.join("manifest.json"),
            br#"{"format":"dvmm-snapshot","version":2,"future":true}"#,
        )
        .unwrap();
        let e = Snapshot::open(&d).unwrap_err();
        assert!(matches!(e, SnapshotError::Version { found: 2, .. }), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn zero_check() {
        let mut p = vec![0u8; PAGE];
        assert!(is_zero(&p));
        p[PAGE - 1] = 1;
        assert!(!is_zero(&p));
        assert!(is_zero(&p[1..PAGE - 1]));
    }
}
