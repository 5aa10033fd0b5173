//! Quorum disks in a stock libvirt domain.
//!
//! libvirt refuses `<disk type='quorum'>`, but keeps any element of a
//! foreign namespace in `<metadata>` verbatim. A domain that stock libvirt
//! runs therefore carries each quorum disk there, and sees in `<devices>`
//! only an ordinary NBD disk on the unix socket `quorum serve` listens on:
//!
//! ```xml
//! <metadata>
//!   <quorum:disks xmlns:quorum='https://quorum.dev/xmlns/libvirt/1'>
//!     <quorum:export target='vda' socket='/run/quorum/demo/vda.sock'>
//!       <quorum:disk type='quorum' device='disk'>...</quorum:disk>
//!     </quorum:export>
//!   </quorum:disks>
//! </metadata>
//! ```
//!
//! One top-level element (`<disks>`) per namespace, as libvirt wants; one
//! `<export>` per quorum disk, naming its target dev and socket. Elements are
//! matched by local name in our namespace or none, whatever their prefix:
//! `virsh metadata --set` puts every element into the namespace.

/// The XML namespace of quorum's element in a domain's `<metadata>`.
pub const NAMESPACE: &str = "https://quorum.dev/xmlns/libvirt/1";
