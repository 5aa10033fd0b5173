//! Where an NBD export is ([`NbdAddress`]) and how to reach it
//! ([`NbdConfig`]), built by hand or from an XML layer, which refuses what
//! NBD replicas can't serve.

use std::path::PathBuf;
use std::time::Duration;

use quorum_config::model::{Backing, ImageFormat, NbdHost, Source, StorageSource};

use super::DEFAULT_TIMEOUT;
use crate::{OpenError, Result};

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddress {
    /// TCP host name (or address) and port.
    Tcp {
        /// Host name or address.
        host: String,
        /// TCP port.
        port: u16,
    },
    /// A unix socket.
    Unix(PathBuf),
}

/// How to reach one NBD export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdConfig {
    /// The server.
    pub address: NbdAddress,
    /// Export name ("" for the server's default export).
    pub export: String,
    /// Refuse writes locally.
    pub read_only: bool,
    /// Bound on connecting, on each send, and on waiting for a reply.
    pub timeout: Duration,
}

impl NbdConfig {
    /// Read-write, with [`DEFAULT_TIMEOUT`].
    pub fn new(address: NbdAddress, export: impl Into<String>) -> Self {
        NbdConfig {
            address,
            export: export.into(),
            read_only: false,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The config for an XML layer. Refuses what we can't serve: TLS,
    /// qcow2 over NBD, and backing stores below an NBD layer.
    pub fn from_source(src: &StorageSource) -> Result<Self, OpenError> {
        let name = src.display_name();
        let refuse = |message: &str| OpenError::Nbd {
            name: name.clone(),
            message: message.to_owned(),
        };
        let Source::Nbd { export, host, tls } = &src.source else {
            return Err(refuse("not an NBD source"));
        };
        if *tls == Some(true) {
            return Err(refuse("TLS for NBD replicas is not supported yet"));
        }
        if src.format == ImageFormat::Qcow2 {
            return Err(refuse(
                "qcow2 over NBD is not supported; export the qcow2 with qemu-nbd -f qcow2 and declare it raw",
            ));
        }
        if let Backing::Store(_) = src.backing {
            return Err(refuse("a raw NBD replica cannot have a backing store"));
        }
        let address = match host {
            NbdHost::Tcp { name, port } => NbdAddress::Tcp {
                host: name.clone(),
                port: *port,
            },
            NbdHost::Unix { socket } => NbdAddress::Unix(socket.clone()),
        };
        Ok(NbdConfig::new(address, export.clone().unwrap_or_default()))
    }

    /// The export as a URI (`nbd://host:port/export` or
    /// `nbd+unix:///export?socket=path`), as errors name it.
    pub fn name(&self) -> String {
        match &self.address {
            NbdAddress::Tcp { host, port } => format!("nbd://{host}:{port}/{}", self.export),
            NbdAddress::Unix(socket) => {
                format!("nbd+unix:///{}?socket={}", self.export, socket.display())
            }
        }
    }
}
