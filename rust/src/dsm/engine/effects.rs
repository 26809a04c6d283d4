//! Executing the protocol's effects on this node: send (pages the transport
//! reads straight from the engine mapping), install (a landed run mapped with
//! one UFFDIO_CONTINUE, or UFFDIO_COPY of zeros or of bytes), write-protect,
//! drop (punch), wake; and eviction of foreign pages over the memory budget.

use super::serve::{Engine, PMsg, Payload};
use super::{EffectError, EngineFault};
use crate::dsm::protocol::{CacheState, Data, Effect, Msg, NodeId, PageIdx, RangeMsg};
use crate::dsm::stats::Stats;
use crate::dsm::uffd::{UffdError, PAGE};
use crate::dsm::wire::{self, PageSource};

/// The name of a range message's kind (for errors).
fn range_kind(m: &RangeMsg) -> &'static str {
    match m {
        RangeMsg::Req { .. } => "Req",
        RangeMsg::Inv { .. } => "Inv",
        RangeMsg::InvAck { .. } => "InvAck",
        RangeMsg::Fetch { .. } => "Fetch",
        RangeMsg::Grant { .. } => "Grant",
        RangeMsg::Done { .. } => "Done",
        RangeMsg::Nack { .. } => "Nack",
    }
}

/// At most this many evictions in flight.
const MAX_EVICTING: usize = 32;
/// How far into the eviction queue (oldest first) a clean page is looked for.
const VICTIM_WINDOW: usize = 32;

static ZERO: [u8; PAGE] = [0u8; PAGE];

impl Engine {
    /// Execute the protocol's effects in order. The first failure stops the VM
    /// and aborts the rest: a failed `Drop` must not be acknowledged, a failed
    /// `Install` must not be reported `Done`, or peers would go on with a page
    /// this node does not hold.
    pub(super) fn exec(&mut self, effects: &[Effect], data: Payload) {
        let mut i = 0;
        while i < effects.len() {
            if self.failed {
                return;
            }
            let run = match data {
                Payload::Landed => Self::landed_run(effects, i),
                _ => 0,
            };
            let r = if run > 0 {
                self.install_landed(&effects[i..i + run])
            } else {
                self.exec_one(&effects[i], data)
            };
            if let Err(err) = r {
                self.failed = true;
                self.sh.fail(EngineFault::Effect(err));
                return;
            }
            i += run.max(1);
        }
    }

    /// Install a run of landed pages (consecutive `Install` effects, see
    /// `landed_run`): one UFFDIO_CONTINUE, then the bookkeeping of each.
    fn install_landed(&mut self, run: &[Effect]) -> std::result::Result<(), EffectError> {
        let Some(&Effect::Install {
            page: first,
            writable,
            ..
        }) = run.first()
        else {
            return Ok(());
        };
        self.map_landed(first, run.len() as u64, writable)?;
        for page in first..first + run.len() as u64 {
            self.installed(page);
        }
        Ok(())
    }

    /// Bookkeeping of a page now mapped for the guest.
    fn installed(&mut self, page: PageIdx) {
        self.sh.stats.resident(1);
        if self.is_foreign(page) {
            self.foreign_resident += 1;
            self.foreign.push_back(page);
        }
    }

    pub(super) fn exec_one(
        &mut self,
        e: &Effect,
        data: Payload,
    ) -> std::result::Result<(), EffectError> {
        let st = &self.sh.stats;
        let mem = &self.sh.mem;
        match *e {
            Effect::Send { to, msg } => {
                let mut page_data: Option<u64> = None;
                if let Msg::Grant { page, data: d, .. } = msg {
                    match d {
                        Data::Page => {
                            page_data = Some(page);
                            if to != self.sh.me {
                                Stats::inc(&st.pages_sent);
                                Stats::add(&st.bytes_sent, PAGE as u64);
                            }
                        }
                        Data::Zero => Stats::inc(&st.zero_pages_sent),
                        Data::None => Stats::inc(&st.transfers_skipped),
                    }
                }
                if let Msg::Inv { .. } = msg {
                    if to != self.sh.me {
                        Stats::inc(&st.invalidations_sent);
                    }
                }
                if to == self.sh.me {
                    // To itself: read the page out (one copy; installing it is
                    // the second).
                    let data = page_data.map(|p| {
                        Stats::inc(&st.page_copies);
                        wire::copy_out(&mem.held(&[p])).into_boxed_slice()
                    });
                    self.local.push_back((PMsg::One(msg), data));
                    Ok(())
                } else {
                    // The transport copies the page straight from the mapping.
                    let pages = page_data.map(|p| [p]);
                    let held = pages.as_ref().map(|p| mem.held(p));
                    self.sh
                        .transport
                        .send_msg_from(to, &msg, held.as_ref().map(|h| h as &dyn PageSource))
                        .map_err(|err| EffectError::Send { to, msg, err })
                }
            }
            Effect::Install {
                page,
                zero,
                writable,
            } => {
                if self.landed.contains(&page) {
                    // Its contents landed for another message: never install
                    // other bytes over them.
                    return Err(EffectError::Memory {
                        page,
                        err: UffdError::AlreadyPresent { page },
                    });
                }
                let src: &[u8; PAGE] = if zero {
                    &ZERO
                } else {
                    match data.page(page) {
                        Some(d) => d,
                        None => return Err(EffectError::MissingData(page)),
                    }
                };
                mem.install(page, src, writable)
                    .map_err(|err| EffectError::Memory { page, err })?;
                if !zero {
                    // UFFDIO_COPY from the received payload.
                    Stats::inc(&st.page_copies);
                }
                self.installed(page);
                Ok(())
            }
            Effect::MakeWritable { page } => mem
                .write_protect(page, false)
                .map_err(|err| EffectError::Memory { page, err }),
            Effect::WriteProtect { page } => {
                mem.write_protect(page, true)
                    .map_err(|err| EffectError::Memory { page, err })?;
                if self.wpf.is_tracked(page) {
                    // Upgraded ahead, now read by another node: handed over.
                    self.wpf.handed_over(page);
                    self.sync_prefetch_stats();
                }
                Ok(())
            }
            Effect::Drop { page } => {
                mem.punch(page)
                    .map_err(|err| EffectError::Memory { page, err })?;
                st.resident(-1);
                if self.is_foreign(page) {
                    self.foreign_resident = self.foreign_resident.saturating_sub(1);
                }
                self.evicting.remove(&page);
                if self.pf.is_tracked(page) || self.wpf.is_tracked(page) {
                    self.pf.lost(page);
                    self.wpf.lost(page);
                    self.sync_prefetch_stats();
                }
                Ok(())
            }
            Effect::Wake { page } => mem
                .wake(page)
                .map_err(|err| EffectError::Memory { page, err }),
            Effect::SendRange { to, ref msg } => self.send_range(to, msg),
        }
    }

    /// Execute a `SendRange`: for a grant to another node, hand the transport
    /// the list of its pages of data (it copies them from the engine mapping
    /// as it encodes them); to this node itself, read them into one payload.
    pub(super) fn send_range(
        &mut self,
        to: NodeId,
        msg: &RangeMsg,
    ) -> std::result::Result<(), EffectError> {
        let st = &self.sh.stats;
        let remote = to != self.sh.me;
        let mut payload = None;
        self.rpages.clear();
        match msg {
            RangeMsg::Grant { first, data, .. } => {
                let n = msg.data_pages();
                for (page, d) in (*first..).zip(data.iter()) {
                    match d {
                        Data::Page => self.rpages.push(page),
                        Data::Zero => Stats::inc(&st.zero_pages_sent),
                        Data::None => Stats::inc(&st.transfers_skipped),
                    }
                }
                if remote {
                    Stats::add(&st.pages_sent, n as u64);
                    Stats::add(&st.bytes_sent, (n * PAGE) as u64);
                } else {
                    // To itself: read the pages out (one copy; installing them
                    // is the second). Another node's transport copies them
                    // straight from the mapping.
                    let pages = wire::copy_out(&self.sh.mem.held(&self.rpages));
                    payload = (!pages.is_empty()).then(|| pages.into_boxed_slice());
                    Stats::add(&st.page_copies, n as u64);
                }
            }
            RangeMsg::Inv { count, .. } if remote => {
                Stats::add(&st.invalidations_sent, u64::from(*count));
            }
            _ => {}
        }
        if !remote {
            self.local.push_back((PMsg::Range(msg.clone()), payload));
            return Ok(());
        }
        self.sh
            .transport
            .send_range_from(to, msg, &self.sh.mem.held(&self.rpages))
            .map_err(|err| EffectError::SendRange {
                to,
                what: range_kind(msg),
                first: msg.pages().start,
                end: msg.pages().end,
                err,
            })
    }

    pub(super) fn evict_over_budget(&mut self, effects: &mut Vec<Effect>) {
        let Some(budget) = self.budget else {
            return;
        };
        let mut tries = self.foreign.len();
        // Pages being evicted still count as resident until they are dropped, so
        // the foreign footprint stays at `budget` plus what arrives while the
        // evictions are in flight (a few pages).
        while self.foreign_resident > budget && self.evicting.len() < MAX_EVICTING && tries > 0 {
            tries -= 1;
            let Some(page) = self.pick_victim() else {
                break;
            };
            if self.evicting.contains(&page) {
                continue;
            }
            effects.clear();
            match self.node.evict(page, effects) {
                Ok(true) => {
                    Stats::inc(&self.sh.stats.evictions);
                    self.evicting.insert(page);
                    let fx = std::mem::take(effects);
                    self.exec(&fx, Payload::None);
                    *effects = fx;
                }
                Ok(false) => {
                    // Busy (request in flight): retry later; not held: forget it.
                    if self.node.is_pending(page) {
                        self.foreign.push_back(page);
                    }
                }
                Err(source) => self.sh.fail(EngineFault::Evict { page, source }),
            }
        }
    }

    /// The foreign page to evict next: the least recently faulted clean one
    /// among the oldest [`VICTIM_WINDOW`] (a clean page goes back with one small
    /// message, a modified one with its 4 KiB), else the oldest.
    pub(super) fn pick_victim(&mut self) -> Option<PageIdx> {
        let clean = self
            .foreign
            .iter()
            .take(VICTIM_WINDOW)
            .position(|&p| matches!(self.node.state(p), Some((CacheState::Shared, _, _))));
        match clean {
            Some(i) => self.foreign.remove(i),
            None => self.foreign.pop_front(),
        }
    }
}
