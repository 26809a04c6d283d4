//! The PyO3 module `dvmmd._native`: a thin wrapper over [`crate::vm::run_vm`].
//!
//! - `run_vm(spec_json: str) -> str`: boots one VM and blocks (without the GIL) until
//!   it stops; returns the result JSON (docs/interfaces.md). A spec that is invalid
//!   (malformed JSON, bad sizes, too many vCPUs, missing or unreadable kernel image)
//!   raises `ValueError`; a failure of the host/VMM (no /dev/kvm, KVM ioctl errors)
//!   raises `RuntimeError`. A guest that crashes is *not* an exception: it is a result
//!   with `reason == "crash"`.
//! - `version() -> str`: the crate version.

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

/// Boot a VM from its JSON spec and run it to completion; returns the result JSON.
#[pyfunction]
fn run_vm(py: Python<'_>, spec_json: String) -> PyResult<String> {
    py.detach(move || crate::vm::run_vm(&spec_json))
        .map_err(|e| {
            if e.is_user_error() {
                PyValueError::new_err(e.to_string())
            } else {
                PyRuntimeError::new_err(e.to_string())
            }
        })
}

/// The version of the native extension.
#[pyfunction]
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// The `dvmmd._native` module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(run_vm, m)?)?;
    m.add_function(wrap_pyfunction!(version, m)?)?;
    // What this build can do, so the daemon can decide placement: "cluster" =
    // a VM spread over several nodes (the `cluster` field of the spec).
    m.add("FEATURES", vec!["cluster"])?;
    m.add("MULTI_NODE", true)?;
    Ok(())
}
