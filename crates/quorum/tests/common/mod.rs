//! Helpers shared by integration tests.
pub mod nbd_raw;
