//! The one mutex helper of the crate: lock, recovering from poisoning.

use std::sync::{Mutex, MutexGuard};

/// Lock `m`, recovering from a poisoned mutex: a thread that panicked while
/// holding it (a device, a serving thread) must not take the VM down with a
/// second panic; every state these mutexes guard stays consistent between
/// statements.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
