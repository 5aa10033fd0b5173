//! The quorum disk configuration, read from libvirt domain XML.
//!
//! ```text
//!  XML text ──parse──▶ DiskConfig ──write──▶ canonical XML
//!                         │
//!                         └──qemu──▶ -blockdev JSON for QEMU's quorum driver
//! ```
//!
//! Errors carry `file:line:col` in libvirt's wording (see `error`).
#![warn(missing_docs)]

pub mod model;

pub use model::*;
