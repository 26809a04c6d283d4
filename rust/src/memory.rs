//! Guest RAM: one memfd, mapped `MAP_SHARED` twice.
//!
//! * The **guest mapping** (one contiguous mapping of the whole memfd) backs the KVM
//!   memslots and every VMM access (boot loader, devices, ACPI) through a
//!   [`vm_memory::GuestMemoryMmap`] whose regions are windows into it. The coherence
//!   engine registers userfaultfd on this mapping, so VMM accesses through it are
//!   coherent exactly like guest accesses.
//! * The **engine mapping** is a second mapping of the same memfd. The coherence
//!   engine reads the contents of pages it holds through it (to send them) without
//!   faulting on the guest mapping's userfaultfd registration; pages arrive with
//!   `UFFDIO_COPY` into the guest mapping (crate::dsm::uffd says why not
//!   `UFFDIO_CONTINUE`).
//!
//! Guest-physical layout (docs/interfaces.md): RAM below 3 GiB starts at GPA 0; what
//! does not fit below 3 GiB continues at 4 GiB. The memfd holds the RAM densely:
//! region `i` lives at file offset `sum(size of regions before i)`, which is also the
//! "RAM offset" used by the VM spec's NUMA ranges.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::Arc;

use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Smallest guest the VMM accepts (the bundled guest and the tables need some room).
pub const MIN_MEMORY: u64 = 16 << 20;
/// Largest guest (a sanity bound, not a hardware one): 1 TiB.
pub const MAX_MEMORY: u64 = 1 << 40;
/// Page granularity of guest RAM sizes.
pub const PAGE_SIZE: u64 = 4096;
/// Top of RAM below the 32-bit MMIO hole.
pub const LOW_RAM_END: u64 = 0xC000_0000;
/// Start of RAM above the 32-bit MMIO hole.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;

/// Errors of the memory module.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("memory size {0} bytes is too small: the minimum is {MIN_MEMORY} bytes (16 MiB)")]
    TooSmall(u64),
    #[error("memory size {0} bytes is too large: the maximum is {MAX_MEMORY} bytes (1 TiB)")]
    TooLarge(u64),
    #[error("memory size {0} bytes is not a multiple of 4 KiB")]
    Unaligned(u64),
    #[error("memfd_create failed: {0}")]
    Memfd(#[source] std::io::Error),
    #[error("cannot size the guest RAM memfd to {size} bytes: {source}")]
    Truncate { size: u64, source: std::io::Error },
    #[error("cannot map guest RAM: {0}")]
    Mmap(#[source] std::io::Error),
    #[error("cannot map guest RAM: {0}")]
    Region(#[source] vm_memory::mmap::MmapRegionError),
    #[error("cannot map guest RAM: region at {0:#x} overflows")]
    RegionOverflow(u64),
    #[error("cannot map guest RAM: {0}")]
    Regions(#[source] vm_memory::GuestRegionCollectionError),
    #[error("cannot map the engine view of guest RAM: {0}")]
    EngineMmap(#[source] std::io::Error),
}

/// Validate a guest RAM size (bytes).
pub fn validate_size(size: u64) -> Result<(), MemoryError> {
    if size < MIN_MEMORY {
        return Err(MemoryError::TooSmall(size));
    }
    if size > MAX_MEMORY {
        return Err(MemoryError::TooLarge(size));
    }
    if !size.is_multiple_of(PAGE_SIZE) {
        return Err(MemoryError::Unaligned(size));
    }
    Ok(())
}

/// RAM ranges `(gpa, size)` for a guest with `size` bytes of RAM: below 3 GiB, then
/// above 4 GiB. Must agree with `boot::ram_ranges` (checked by a unit test).
pub fn ram_layout(size: u64) -> Vec<(u64, u64)> {
    let low = size.min(LOW_RAM_END);
    let mut v = vec![(0, low)];
    if size > low {
        v.push((HIGH_RAM_START, size - low));
    }
    v
}

/// One contiguous range of guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRegion {
    /// Guest-physical start address.
    pub gpa: u64,
    /// Length in bytes.
    pub size: u64,
    /// Offset of this region in the memfd (= RAM offset in the spec's NUMA ranges).
    pub file_offset: u64,
    /// Host address of the region in the guest mapping (memslots, VMM accesses).
    pub guest_host_addr: u64,
    /// Host address of the region in the engine mapping.
    pub engine_host_addr: u64,
}

/// A shared mapping of the whole memfd (munmapped on drop).
struct EngineMap {
    addr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; the pointer is never dereferenced by
// this type, users synchronise through the coherence protocol.
unsafe impl Send for EngineMap {}
// SAFETY: as above.
unsafe impl Sync for EngineMap {}

impl Drop for EngineMap {
    fn drop(&mut self) {
        // SAFETY: addr/len describe a mapping created by mmap in `GuestRam::new` and
        // owned exclusively by this value.
        unsafe {
            libc::munmap(self.addr.cast(), self.len);
        }
    }
}

/// Guest RAM of one VM (or one node's view of a distributed VM's RAM).
pub struct GuestRam {
    memfd: Arc<File>,
    size: u64,
    regions: Vec<RamRegion>,
    mem: GuestMemoryMmap,
    _guest: EngineMap,
    _engine: EngineMap,
}

impl std::fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRam")
            .field("size", &self.size)
            .field("regions", &self.regions)
            .finish()
    }
}

impl GuestRam {
    /// Create `size` bytes of guest RAM (validated) in a fresh memfd.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        validate_size(size)?;
        let name = c"dvmm-guest-ram";
        // SAFETY: name is a valid NUL-terminated string; the result is checked.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size)
            .map_err(|source| MemoryError::Truncate { size, source })?;
        let memfd = Arc::new(file);

        let len = usize::try_from(size).map_err(|_| MemoryError::TooLarge(size))?;
        let map = |what: fn(std::io::Error) -> MemoryError| {
            // SAFETY: a fresh shared mapping of our own memfd, length checked above;
            // the result is checked against MAP_FAILED.
            let addr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_NORESERVE,
                    memfd.as_raw_fd(),
                    0,
                )
            };
            if addr == libc::MAP_FAILED {
                return Err(what(std::io::Error::last_os_error()));
            }
            Ok(EngineMap {
                addr: addr.cast(),
                len,
            })
        };
        let engine = map(MemoryError::EngineMmap)?;
        // The guest view is ONE contiguous mapping of the whole memfd (the
        // coherence engine registers it with userfaultfd as a single range);
        // each RAM region is a window into it.
        let guest = map(MemoryError::Mmap)?;

        let mut regions = Vec::new();
        let mut guest_regions = Vec::new();
        let mut off = 0u64;
        for (gpa, rsize) in ram_layout(size) {
            let rlen = usize::try_from(rsize).map_err(|_| MemoryError::TooLarge(size))?;
            // SAFETY: `guest.addr + off .. + rlen` lies inside the guest mapping
            // (the regions tile the memfd), which `GuestRam` keeps mapped at least
            // as long as the region (field order: `mem` drops before `_guest`).
            let mapping: MmapRegion = unsafe {
                MmapRegion::build_raw(
                    guest.addr.add(off as usize),
                    rlen,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_NORESERVE,
                )
            }
            .map_err(MemoryError::Region)?;
            let host = mapping.as_ptr() as u64;
            let region = GuestRegionMmap::new(mapping, GuestAddress(gpa))
                .ok_or(MemoryError::RegionOverflow(gpa))?;
            guest_regions.push(region);
            regions.push(RamRegion {
                gpa,
                size: rsize,
                file_offset: off,
                guest_host_addr: host,
                engine_host_addr: engine.addr as u64 + off,
            });
            off += rsize;
        }
        let mem = GuestMemoryMmap::from_regions(guest_regions).map_err(MemoryError::Regions)?;
        Ok(GuestRam {
            memfd,
            size,
            regions,
            mem,
            _guest: guest,
            _engine: engine,
        })
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The RAM regions (GPA, size, memfd offset, both host addresses).
    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// RAM ranges as `(gpa, size)`.
    pub fn ram_ranges(&self) -> Vec<(u64, u64)> {
        self.regions.iter().map(|r| (r.gpa, r.size)).collect()
    }

    /// Host address of RAM offset 0 in the guest mapping (contiguous over all RAM).
    pub fn guest_base(&self) -> usize {
        self._guest.addr as usize
    }

    /// Host address of RAM offset 0 in the engine mapping (contiguous over all RAM).
    pub fn engine_base(&self) -> usize {
        self._engine.addr as usize
    }

    /// The memfd backing guest RAM.
    pub fn memfd(&self) -> RawFd {
        self.memfd.as_raw_fd()
    }

    /// Shared handle on the memfd (e.g. to map it in another component).
    pub fn memfd_file(&self) -> Arc<File> {
        self.memfd.clone()
    }

    /// The vm-memory view over the guest mapping (use it for every VMM access).
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Translate a RAM offset (memfd offset, as in the spec's NUMA ranges) to a GPA.
    pub fn offset_to_gpa(&self, offset: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| offset >= r.file_offset && offset - r.file_offset < r.size)
            .map(|r| r.gpa + (offset - r.file_offset))
    }

    /// Translate a GPA to its RAM offset (memfd offset), if it is RAM.
    pub fn gpa_to_offset(&self, gpa: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| gpa >= r.gpa && gpa - r.gpa < r.size)
            .map(|r| r.file_offset + (gpa - r.gpa))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn size_validation() {
        assert!(matches!(
            validate_size(1 << 20),
            Err(MemoryError::TooSmall(_))
        ));
        assert!(matches!(
            validate_size((16 << 20) + 1),
            Err(MemoryError::Unaligned(_))
        ));
        assert!(matches!(
            validate_size(1 << 41),
            Err(MemoryError::TooLarge(_))
        ));
        assert!(validate_size(16 << 20).is_ok());
        let msg = validate_size(100).unwrap_err().to_string();
        assert!(msg.contains("minimum"), "{msg}");
    }

    #[test]
    fn layout_splits_at_3g() {
        assert_eq!(ram_layout(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(
            ram_layout(4 << 30),
            vec![(0, 3 << 30), (HIGH_RAM_START, 1 << 30)]
        );
    }

    #[test]
    fn layout_agrees_with_boot() {
        for size in [16u64 << 20, 256 << 20, 3 << 30, 5 << 30] {
            assert_eq!(
                crate::boot::ram_ranges(size),
                ram_layout(size),
                "size {size:#x}"
            );
        }
    }

    #[test]
    fn two_views_share_pages() {
        let ram = GuestRam::new(16 << 20).unwrap();
        let r = ram.regions()[0];
        ram.guest_memory()
            .write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        // SAFETY: the engine mapping is live for the lifetime of `ram` and 0x1000+4 is
        // inside it.
        let v = unsafe { std::ptr::read_volatile((r.engine_host_addr + 0x1000) as *const u32) };
        assert_eq!(v, 0xdead_beef);
        assert_eq!(ram.guest_memory().iter().count(), 1);
        assert_eq!(ram.offset_to_gpa(0x1234), Some(0x1234));
        assert!(ram.memfd() >= 0);
    }

    #[test]
    fn high_region_offsets() {
        // Needs no backing pages: MAP_NORESERVE and sparse memfd.
        let ram = GuestRam::new((3 << 30) + (16 << 20)).unwrap();
        assert_eq!(ram.regions().len(), 2);
        assert_eq!(ram.regions()[1].gpa, HIGH_RAM_START);
        assert_eq!(ram.regions()[1].file_offset, 3 << 30);
        assert_eq!(ram.offset_to_gpa(3 << 30), Some(HIGH_RAM_START));
        assert_eq!(ram.gpa_to_offset(HIGH_RAM_START + 5), Some((3 << 30) + 5));
        assert_eq!(ram.gpa_to_offset(0xFEE0_0000), None);
    }
}
