//! `collector-load`: the benchmark's load generator and raw-limit probes.
//!
//! It produces realistic, signed, ceilometer-shaped samples whose `message_id` carries a
//! sequence number ([`samples`]); sends them over UDP with `sendmmsg` ([`udp`]), as ceilometer
//! `tcp://` frames over many connections ([`tcp`]) or as pipelined MessagePack-RPC calls
//! ([`rpc`]); watches the database for their commits to measure
//! send→committed latency ([`watch`]); and measures what the machine can do without the
//! collector: a `recvmmsg` loop into nothing ([`udp::raw_limit`]) and bare rusqlite inserts
//! ([`raw_sqlite`]), and the servers' bulk paths ([`raw_server`]: PostgreSQL binary COPY,
//! MariaDB multi-row INSERT); it also writes samples as oslo.messaging notification bodies
//! ([`json`]) for the AMQP run. Every mode prints one JSON line. `scripts/bench` drives it; docs/
//! performance.md explains the figures.
//!
//! It is a measuring tool, not part of the daemon: nothing in the daemon depends on it.

pub mod grow;
pub mod json;
pub mod raw_server;
pub mod raw_sqlite;
pub mod rpc;
pub mod samples;
pub mod stats;
pub mod tcp;
pub mod udp;
pub mod watch;
