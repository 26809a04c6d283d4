//! Distributed shared memory (issue 4).
