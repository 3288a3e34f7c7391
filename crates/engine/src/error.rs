//! What [`Engine::start`](super::Engine::start) can fail with: one variant per thing that
//! failed, naming it (which port and address, which thread, which data directory), with the
//! underlying error as its source.
//!
//! Each message already includes its source's message, so that `dsplane run` can print the
//! error alone on one line (`dsplane: cannot start: …`); walk [`std::error::Error::source`] for
//! the typed cause (a [`WalError`] naming the damaged file, say).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use crate::ring::RingError;
use crate::throttle::ThrottleError;
use crate::wal::WalError;

/// One of the engine's listening ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// `listen.su`: the Service Users' port.
    Su,
    /// `listen.csp`: the CSPs' port.
    Csp,
    /// `listen.admin`: the admin interface.
    Admin,
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Port::Su => "SU port (listen.su)",
            Port::Csp => "CSP port (listen.csp)",
            Port::Admin => "admin port (listen.admin)",
        })
    }
}

/// One of the engine's threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineThread {
    /// The worker of this index (`dsplane-worker-N`).
    Worker(usize),
    /// The acceptor, which runs the HELLO handshakes (`dsplane-acceptor`).
    Acceptor,
    /// The admin interface's I/O thread (`dsplane-admin`).
    Admin,
}

impl fmt::Display for EngineThread {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EngineThread::Worker(i) => write!(f, "worker {i} (dsplane-worker-{i})"),
            EngineThread::Acceptor => f.write_str("acceptor (dsplane-acceptor)"),
            EngineThread::Admin => f.write_str("admin (dsplane-admin)"),
        }
    }
}

/// Why an engine did not start. Nothing of a failed start keeps running but the threads
/// already started before the failure, which stop with the process.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The data directory cannot be created, opened or locked, or another process holds its
    /// lock (one engine per data_dir). The reason names the directory and, when it is another
    /// dsplane, its pid.
    #[error("{reason}")]
    DataDirLock {
        /// `engine.data_dir`.
        data_dir: PathBuf,
        /// What [`crate::datadir::DataDirLock::acquire`] said.
        reason: String,
    },
    /// A port cannot be bound: in use, not an address of this host, or privileged.
    #[error("cannot bind the {port} to {addr}: {source}")]
    Bind {
        /// Which port.
        port: Port,
        /// The address asked for.
        addr: SocketAddr,
        /// What the OS said.
        source: io::Error,
    },
    /// A port's socket cannot be made, set up or listened on once bound.
    #[error("cannot listen on the {port} at {addr}: {source}")]
    Listen {
        /// Which port.
        port: Port,
        /// The address asked for.
        addr: SocketAddr,
        /// What the OS said.
        source: io::Error,
    },
    /// A worker's priority ring cannot be made with the configured levels.
    #[error("cannot create the ring of worker {worker}: {source}")]
    Ring {
        /// The worker's index.
        worker: usize,
        /// What the ring refused.
        source: RingError,
    },
    /// A worker's owner refused its settings (a rate, an allocation or storm settings the
    /// limiters refuse; configuration validation normally catches them first).
    #[error("worker {worker}: {source}")]
    Owner {
        /// The worker.
        worker: usize,
        /// Why.
        #[source]
        source: crate::owner::OwnerError,
    },
    /// The configuration has `[cluster]` but the engine was started on its own, without the
    /// lease and the replicated log a node of a cluster runs with ([`crate::cluster::Node`]).
    #[error("[cluster] is set: this configuration runs as a node of a cluster (`dsplane run` starts it as one), not as an engine on its own")]
    ClusterNeedsNode,
    /// A node of a cluster could not start or go on (PostgreSQL refused it, a thread).
    #[error("{0}")]
    Cluster(String),
    /// `[service_requests]` cannot give the engine-wide intake measure.
    #[error("[service_requests]: {0}")]
    Intake(#[source] ThrottleError),
    /// Recovery refused the data directory (damage that is not a torn tail, a missing file) or
    /// could not read or write it; nothing in it was deleted.
    #[error("{source}")]
    Recovery {
        /// `engine.data_dir`.
        data_dir: PathBuf,
        /// What recovery found, naming the file (and offset).
        source: WalError,
    },
    /// A thread's event loop (its `mio::Poll`, waker or registrations) cannot be made.
    #[error("cannot set up the event loop of the {thread} thread: {source}")]
    Poll {
        /// Which thread.
        thread: EngineThread,
        /// What the OS said.
        source: io::Error,
    },
    /// A thread cannot be started.
    #[error("cannot start the {thread} thread: {source}")]
    Spawn {
        /// Which thread.
        thread: EngineThread,
        /// What the OS said.
        source: io::Error,
    },
}

impl EngineError {
    /// A closure for `map_err`: the event loop of `thread` failed.
    pub(crate) fn poll(thread: EngineThread) -> impl FnOnce(io::Error) -> EngineError {
        move |source| EngineError::Poll { thread, source }
    }

    /// A closure for `map_err`: setting up the listener of `port` on `addr` failed.
    pub(crate) fn listen(port: Port, addr: SocketAddr) -> impl FnOnce(io::Error) -> EngineError {
        move |source| EngineError::Listen { port, addr, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_what_failed_and_keep_the_source() {
        let addr: SocketAddr = "127.0.0.1:7001".parse().unwrap();
        let e = EngineError::Bind {
            port: Port::Csp,
            addr,
            source: io::Error::from(io::ErrorKind::AddrInUse),
        };
        let text = e.to_string();
        assert!(text.starts_with("cannot bind the CSP port (listen.csp) to 127.0.0.1:7001: "));
        assert!(std::error::Error::source(&e).is_some());
        let e = EngineError::Spawn {
            thread: EngineThread::Worker(3),
            source: io::Error::other("no more threads"),
        };
        assert_eq!(
            e.to_string(),
            "cannot start the worker 3 (dsplane-worker-3) thread: no more threads"
        );
        let e = EngineError::Recovery {
            data_dir: PathBuf::from("/var/lib/dsplane"),
            source: WalError::Missing {
                path: PathBuf::from("/var/lib/dsplane/CURRENT"),
                why: "gone".into(),
            },
        };
        assert!(e.to_string().starts_with("/var/lib/dsplane/CURRENT: gone."));
        let source = std::error::Error::source(&e).unwrap();
        assert!(source.downcast_ref::<WalError>().is_some());
    }
}
