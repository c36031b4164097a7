//! A non-blocking TCP stream that is plain or TLS, for the AMQP consumer's own mio loop.
//!
//! rustls is sans-I/O: a [`ClientConnection`] turns plaintext into records and back, and this
//! type moves the records over the non-blocking socket. It behaves like the plain socket it
//! wraps, so the consumer's read/flush code is the same for both: `read` returns plaintext or
//! `WouldBlock`, `Ok(0)` at end of stream; `write` takes plaintext (buffered by rustls while
//! the handshake runs) or `WouldBlock` when rustls's buffer is full; [`Stream::wants_write`]
//! says records are still waiting for the socket, so the loop keeps its writable interest.
//! A handshake or record failure is an `InvalidData` error carrying rustls's reason.

use mio::event::Source;
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection};
use std::io::{self, Read, Write};
use std::sync::Arc;

pub struct Stream {
    tcp: TcpStream,
    tls: Option<Box<ClientConnection>>,
}

impl Stream {
    pub fn plain(tcp: TcpStream) -> Stream {
        Stream { tcp, tls: None }
    }

    /// TLS to `host` (its name is checked against the certificate when the configuration's
    /// verifier does; an address literal is matched as an IP address).
    pub fn tls(tcp: TcpStream, config: Arc<ClientConfig>, host: &str) -> Result<Stream, String> {
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| format!("{host:?} is not a valid TLS server name: {e}"))?;
        let conn = ClientConnection::new(config, name)
            .map_err(|e| format!("cannot start TLS to {host}: {e}"))?;
        Ok(Stream {
            tcp,
            tls: Some(Box::new(conn)),
        })
    }

    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        self.tcp.set_nodelay(on)
    }

    /// Records are waiting to be written to the socket.
    pub fn wants_write(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.wants_write())
    }

    /// Write pending records until the socket would block.
    fn push(&mut self) -> io::Result<()> {
        let Some(tls) = self.tls.as_mut() else {
            return Ok(());
        };
        while tls.wants_write() {
            match tls.write_tls(&mut self.tcp) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Still connecting, or the socket is full: the writable edge brings us back.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::NotConnected
                    ) =>
                {
                    return Ok(())
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.tls.is_none() {
            return self.tcp.read(buf);
        }
        loop {
            let tls = self.tls.as_mut().expect("checked above");
            match tls.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The peer closed TCP without close_notify: for the consumer, a closed
                // connection like any other.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            match tls.read_tls(&mut self.tcp) {
                Ok(0) => return Ok(0),
                Ok(_) => {
                    if let Err(e) = tls.process_new_packets() {
                        // Send our alert if we can; the error is what matters.
                        let _ = self.push();
                        return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                    }
                    // Handshake replies, key updates.
                    self.push()?;
                }
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                    return Err(io::ErrorKind::WouldBlock.into())
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(tls) = self.tls.as_mut() else {
            return self.tcp.write(buf);
        };
        let n = tls.writer().write(buf)?;
        self.push()?;
        if n == 0 && !buf.is_empty() {
            // rustls's buffer is full until the socket drains.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.push()
    }
}

impl Source for Stream {
    fn register(
        &mut self,
        registry: &Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        self.tcp.register(registry, token, interests)
    }
    fn reregister(
        &mut self,
        registry: &Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        self.tcp.reregister(registry, token, interests)
    }
    fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        self.tcp.deregister(registry)
    }
}
