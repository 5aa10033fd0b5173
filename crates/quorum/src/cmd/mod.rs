//! One module per subcommand; each exposes `Args` (clap) and `run`.

pub mod check;
pub mod create;
pub mod daemon;
pub mod define;
pub mod domxml;
pub mod dumpxml;
pub mod hotplug;
pub mod libvirt_hook;
pub mod monitor;
pub mod probe;
pub mod qemu_args;
pub mod replace;
pub mod scrub;
pub mod serve;
pub mod state;
pub mod status;
pub mod util;
pub mod validate;
