//! Distributed shared memory (issue 4).

pub mod auth;
pub mod protocol;
pub mod transport;
pub mod wire;
