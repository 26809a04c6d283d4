//! Pages that land in place: which received pages the transport may write
//! straight into guest memory ([`Lander`], the engine's side of
//! [`Landing`]), and what the engine does with them afterwards — map them
//! with one UFFDIO_CONTINUE per run, or drop what a message did not install.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::ops::Range;

use super::serve::{Engine, PMsg};
use super::{EffectError, EngineFault};
use crate::dsm::protocol::{self, Effect, PageIdx};
use crate::dsm::stats::Stats;
use crate::dsm::uffd::{GuestMem, UffdError};
use crate::dsm::wire::{self, Landing};

/// The engine's answer to "may this page land in place?", for one poll.
pub(super) struct Lander<'a> {
    /// Landing in place is on (`DVMM_DSM_LAND`).
    pub(super) enabled: bool,
    pub(super) node: &'a protocol::Node,
    pub(super) mem: &'a GuestMem,
    pub(super) deferred: &'a HashMap<PageIdx, u32>,
    pub(super) stats: &'a Stats,
    /// The engine's landed set, lent for the poll.
    pub(super) landed: RefCell<HashSet<PageIdx>>,
    /// The first page that could not be written (the VM stops with it).
    pub(super) failed: RefCell<Option<(PageIdx, UffdError)>>,
}

impl Landing for Lander<'_> {
    /// Only a page this node has requested and does not hold (a hole in the
    /// memfd), with nothing of its own pending in the engine: then nothing maps it for the
    /// guest until its grant is handled, and no other message can install it
    /// meanwhile (the grant handling refuses bytes for a landed page).
    fn accept(&self, pages: &[PageIdx]) -> bool {
        if !self.enabled {
            return false;
        }
        let mut landed = self.landed.borrow_mut();
        let ok = pages.iter().all(|&p| {
            self.node.is_pending(p)
                && matches!(self.node.state(p), Some((_, false, _)))
                && !landed.contains(&p)
                && !self.deferred.contains_key(&p)
        });
        // And the memfd agrees that they are holes: a page there behind the
        // protocol's back takes the UFFDIO_COPY path, which refuses it by name.
        let ok = ok && self.mem.are_holes(pages);
        if ok {
            landed.extend(pages.iter().copied());
        }
        ok
    }

    fn land(&self, page: PageIdx, data: &[u8]) {
        match self.mem.land(page, data) {
            // The one copy on the receiving side.
            Ok(()) => Stats::inc(&self.stats.page_copies),
            Err(e) => {
                self.failed.borrow_mut().get_or_insert((page, e));
            }
        }
    }
}

impl Engine {
    /// Map landed pages `first..first+count` for the guest (one
    /// UFFDIO_CONTINUE) and forget them as landed.
    pub(super) fn map_landed(
        &mut self,
        first: PageIdx,
        count: u64,
        writable: bool,
    ) -> Result<(), EffectError> {
        for p in first..first + count {
            if !self.landed.remove(&p) {
                return Err(EffectError::MissingData(p));
            }
        }
        self.sh
            .mem
            .map_landed(first, count, writable)
            .map_err(|err| EffectError::Memory { page: first, err })
    }

    /// The run of landed installs starting at `effects[i]`: how many
    /// consecutive `Install` effects (same writability, consecutive pages,
    /// not zero pages) follow, so they are mapped with one ioctl.
    pub(super) fn landed_run(effects: &[Effect], i: usize) -> usize {
        let Some(&Effect::Install {
            page: first,
            zero: false,
            writable,
        }) = effects.get(i)
        else {
            return 0;
        };
        effects[i..]
            .iter()
            .enumerate()
            .take_while(|&(k, e)| {
                matches!(*e, Effect::Install { page, zero: false, writable: w }
                    if page == first + k as u64 && w == writable)
            })
            .count()
    }

    /// After a landed message was handled: drop (punch) its pages that are
    /// still landed but were not installed (a grant the protocol refused), so
    /// an `Invalid` page is a hole again.
    pub(super) fn drop_unmapped(&mut self, pages: Range<PageIdx>) {
        for page in pages {
            if self.landed.remove(&page) {
                if let Err(err) = self.sh.mem.punch(page) {
                    self.failed = true;
                    self.sh
                        .fail(EngineFault::Effect(EffectError::Memory { page, err }));
                }
            }
        }
    }

    /// A landed message that must wait (hold window): take its pages back out
    /// of guest memory into a payload (slot order) so nothing stays landed
    /// while it waits.
    pub(super) fn unland(&mut self, msg: &PMsg) -> Option<Box<[u8]>> {
        let pages: Vec<PageIdx> = msg.pages().filter(|p| self.landed.contains(p)).collect();
        if pages.is_empty() {
            return None;
        }
        let data = wire::copy_out(&self.sh.mem.held(&pages));
        self.drop_unmapped(msg.pages());
        Some(data.into_boxed_slice())
    }
}
