//! `collector`: the daemon. It wires the pieces: configuration, the launcher (on the
//! `supervisor` crate), the worker event loop and its sources (UDP, ceilometer TCP,
//! MessagePack-RPC), the dispatchers (on the `storage` crate) and the control socket.
//!
//! Samples themselves (decoding, signatures, timestamps) live in `meter`; storage drivers in
//! `storage`; process supervision in `supervisor`. This crate is where they meet.

pub mod amqp;
pub mod cli;
pub mod config;
pub mod control;
pub mod counters;
pub mod dispatch;
pub mod framing;
pub mod http;
pub mod import;
pub mod launcher;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod options;
pub mod relay;
pub mod rpc;
pub mod sockets;
pub mod source;
pub mod tls_stream;
pub mod untrusted;
pub mod worker;

/// Exit status for a configuration that cannot be used.
pub const EXIT_CONFIG: u8 = 2;
/// Exit status of a worker that cannot start (storage unusable, permission denied): the
/// launcher stops instead of respawning it in a loop (gunicorn's boot-error rule).
pub const EXIT_BOOT_ERROR: u8 = 3;
