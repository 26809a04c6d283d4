//! Direct kernel boot.
