//! TLS client configuration shared by the server drivers: rustls on the `ring` provider (no
//! OpenSSL, no C build beyond ring's own), built once at open from the connection URL's
//! parameters, so a bad file is a start-up error and `--check-config` sees it without
//! connecting.
//!
//! Three levels of checking, named after libpq's `sslmode`s because that is what operators
//! write:
//! - [`Verify::Encrypt`] (`require`, `prefer`): encrypt, accept any certificate. What libpq
//!   does for `require` without a root certificate; it stops passive eavesdropping only.
//! - [`Verify::Chain`] (`verify-ca`): the certificate must chain to a trusted root, whatever
//!   name it carries.
//! - [`Verify::Full`] (`verify-full`): chain and host name (or IP address) must match.
//!
//! Roots are the file given (`sslrootcert`, `ssl_ca`) or, when none is, the system's trust
//! store (`/etc/ssl/certs` through rustls-native-certs).

use crate::StorageError;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{ring as provider, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How much of the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// Encrypt only; any certificate is accepted.
    Encrypt,
    /// The chain must lead to a trusted root; the name is not checked.
    Chain,
    /// Chain and name.
    Full,
}

/// Files named by the URL. Each is `(parameter name, path)` so errors name what the operator
/// wrote.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    pub root: Option<(&'static str, PathBuf)>,
    pub cert: Option<(&'static str, PathBuf)>,
    pub key: Option<(&'static str, PathBuf)>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(provider::default_provider())
}

fn bad(name: &'static str, path: &Path, reason: impl Into<String>) -> StorageError {
    StorageError::InvalidOption {
        name,
        value: path.display().to_string(),
        reason: reason.into(),
    }
}

/// Read every certificate of a PEM file (a DER file of one certificate is accepted too).
fn read_certs(
    name: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, StorageError> {
    let data = std::fs::read(path).map_err(|e| bad(name, path, format!("cannot read: {e}")))?;
    let mut out = Vec::new();
    for c in CertificateDer::pem_slice_iter(&data) {
        out.push(c.map_err(|e| bad(name, path, format!("not a PEM certificate file: {e}")))?);
    }
    if out.is_empty() {
        if data.first() == Some(&0x30) {
            out.push(CertificateDer::from(data));
        } else {
            return Err(bad(
                name,
                path,
                "no certificate found (expected PEM or DER)",
            ));
        }
    }
    Ok(out)
}

fn read_key(name: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, StorageError> {
    let data = std::fs::read(path).map_err(|e| bad(name, path, format!("cannot read: {e}")))?;
    PrivateKeyDer::from_pem_slice(&data)
        .or_else(|_| PrivateKeyDer::try_from(data.clone()).map_err(|e| e.to_string()))
        .map_err(|e| {
            bad(
                name,
                path,
                format!("no private key found (PKCS#1, PKCS#8 or SEC1): {e}"),
            )
        })
}

/// The roots to trust: the named file, or the system store.
fn roots(files: &TlsFiles) -> Result<RootCertStore, StorageError> {
    let mut store = RootCertStore::empty();
    match &files.root {
        Some((name, path)) => {
            for c in read_certs(name, path)? {
                store
                    .add(c)
                    .map_err(|e| bad(name, path, format!("unusable CA certificate: {e}")))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for c in found.certs {
                // One odd certificate in the system store does not make the rest unusable.
                let _ = store.add(c);
            }
            if store.is_empty() {
                return Err(StorageError::InvalidOption {
                    name: "sslrootcert",
                    value: String::new(),
                    reason: "certificate verification asked for, no root certificate file given \
                             and the system trust store is empty"
                        .into(),
                });
            }
        }
    }
    Ok(store)
}

/// A rustls client configuration for `verify` with `files`. Reads and parses every file now.
pub fn client_config(verify: Verify, files: &TlsFiles) -> Result<ClientConfig, StorageError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| StorageError::Database(format!("TLS set-up: {e}")))?;
    let verifier: Arc<dyn ServerCertVerifier> = match verify {
        Verify::Encrypt => Arc::new(Lenient {
            chain: None,
            provider: provider(),
        }),
        Verify::Chain | Verify::Full => {
            let webpki =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots(files)?), provider())
                    .build()
                    .map_err(|e| StorageError::Database(format!("TLS set-up: {e}")))?;
            if verify == Verify::Full {
                webpki
            } else {
                Arc::new(Lenient {
                    chain: Some(webpki),
                    provider: provider(),
                })
            }
        }
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match (&files.cert, &files.key) {
        (Some((cn, cp)), Some((kn, kp))) => {
            let chain = read_certs(cn, cp)?;
            let key = read_key(kn, kp)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| bad(kn, kp, format!("key does not fit the certificate: {e}")))?
        }
        (Some((cn, cp)), None) => {
            return Err(bad(
                cn,
                cp,
                "a client certificate needs its key parameter too",
            ))
        }
        (None, Some((kn, kp))) => {
            return Err(bad(
                kn,
                kp,
                "a client key needs its certificate parameter too",
            ))
        }
        (None, None) => builder.with_no_client_auth(),
    };
    Ok(config)
}

/// Turn a TLS failure's text into what an operator can act on.
pub fn explain(text: &str) -> Option<&'static str> {
    let t = text.to_ascii_lowercase();
    if t.contains("notvalidforname") || t.contains("not valid for name") {
        Some("the server's certificate does not name the host connected to (name mismatch)")
    } else if t.contains("unknownissuer") || t.contains("unknown issuer") {
        Some("the server's certificate is not signed by a trusted CA (unknown CA)")
    } else if t.contains("expired") {
        Some("the server's certificate has expired")
    } else if t.contains("notvalidyet") || t.contains("not valid yet") {
        Some("the server's certificate is not valid yet")
    } else if t.contains("does not support tls") || t.contains("server does not support ssl") {
        Some("the server does not offer TLS, which the URL requires")
    } else if t.contains("invalidcontenttype") || t.contains("corrupt message") {
        Some("the server does not speak TLS on this port (a plain listener?)")
    } else {
        None
    }
}

/// `verify-ca` (with the webpki verifier: a name mismatch is forgiven) and `require`/`prefer`
/// (without one: any certificate). Either way the handshake's signatures are checked, so the
/// session key is bound to the certificate presented.
#[derive(Debug)]
struct Lenient {
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algs)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreadable_and_unparseable_files_name_the_parameter() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let files = TlsFiles {
            root: Some(("sslrootcert", missing.clone())),
            ..TlsFiles::default()
        };
        let e = client_config(Verify::Full, &files).unwrap_err().to_string();
        assert!(
            e.contains("sslrootcert") && e.contains("cannot read"),
            "{e}"
        );

        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "hello, not a certificate\n").unwrap();
        let files = TlsFiles {
            root: Some(("ssl_ca", junk.clone())),
            ..TlsFiles::default()
        };
        let e = client_config(Verify::Chain, &files)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("ssl_ca") && e.contains("no certificate found"),
            "{e}"
        );

        let files = TlsFiles {
            cert: Some(("sslcert", junk)),
            ..TlsFiles::default()
        };
        let e = client_config(Verify::Encrypt, &files)
            .unwrap_err()
            .to_string();
        assert!(e.contains("sslcert") && e.contains("needs its key"), "{e}");
    }

    #[test]
    fn encrypt_only_needs_no_roots() {
        client_config(Verify::Encrypt, &TlsFiles::default()).unwrap();
    }

    #[test]
    fn failures_are_explained() {
        assert!(explain("invalid peer certificate: NotValidForName")
            .unwrap()
            .contains("mismatch"));
        assert!(explain("invalid peer certificate: UnknownIssuer")
            .unwrap()
            .contains("unknown CA"));
        assert!(explain("invalid peer certificate: Expired")
            .unwrap()
            .contains("expired"));
        assert!(
            explain("error performing TLS handshake: server does not support TLS")
                .unwrap()
                .contains("does not offer TLS")
        );
        assert!(
            explain("received corrupt message of type InvalidContentType")
                .unwrap()
                .contains("does not speak TLS")
        );
        assert_eq!(explain("connection refused"), None);
    }
}
