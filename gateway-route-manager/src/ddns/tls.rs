//! TLS of the API providers: the optional own trust anchors (`ca_file`) and the reasons a
//! handshake failed, told in words an operator can act on.
//!
//! Owns: [`CaCertificates`] (PEM → the CA certificates rustls will trust) and
//! [`handshake_problem`]. Must not: read files (the router reads `ca_file` at config load, so a
//! bad file is a config error with its position) or decide the URL rules (`http`).

use std::fmt;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateDer;
use rustls::{CertificateError, RootCertStore};

/// Why a `ca_file` cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CaFileError {
    #[error("not a PEM file ({0}); expected one or more -----BEGIN CERTIFICATE----- blocks")]
    NotPem(String),
    #[error("no -----BEGIN CERTIFICATE----- block in it; expected the CA certificate(s) in PEM")]
    NoCertificate,
    #[error(
        "certificate #{index} cannot be a trust anchor ({reason}); expected CA certificates in PEM"
    )]
    BadCertificate { index: usize, reason: String },
}

/// The CA certificates of a `ca_file`. When set, they are the only trust anchors of that
/// provider's HTTPS client: the Mozilla roots are not used (see docs/configuration.md,
/// `ca_file`).
#[derive(Clone, PartialEq, Eq)]
pub struct CaCertificates {
    certificates: Vec<CertificateDer<'static>>,
}

impl CaCertificates {
    /// Every `CERTIFICATE` block of `pem` (other blocks, e.g. a key, are skipped); each must be
    /// usable as a trust anchor.
    pub fn from_pem(pem: &[u8]) -> Result<Self, CaFileError> {
        let mut certificates = Vec::new();
        for (i, c) in CertificateDer::pem_slice_iter(pem).enumerate() {
            let der = c.map_err(|e| CaFileError::NotPem(e.to_string()))?;
            RootCertStore::empty()
                .add(der.clone())
                .map_err(|e| CaFileError::BadCertificate {
                    index: i + 1,
                    reason: e.to_string(),
                })?;
            certificates.push(der);
        }
        if certificates.is_empty() {
            return Err(CaFileError::NoCertificate);
        }
        Ok(CaCertificates { certificates })
    }

    pub fn len(&self) -> usize {
        self.certificates.len()
    }

    pub fn is_empty(&self) -> bool {
        self.certificates.is_empty()
    }

    /// The certificates' DER bytes (for a fingerprint that changes when the file does).
    pub fn der(&self) -> impl Iterator<Item = &[u8]> {
        self.certificates.iter().map(|c| c.as_ref())
    }

    pub(crate) fn root_store(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        // Each one was accepted by `add` in `from_pem`.
        roots.add_parsable_certificates(self.certificates.iter().cloned());
        roots
    }
}

impl fmt::Debug for CaCertificates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CaCertificates({} certificate(s))",
            self.certificates.len()
        )
    }
}

/// What a failed TLS handshake means for the operator, when the error chain holds a rustls
/// error; `None` for any other failure. `key` is the config path of the provider
/// (`ddns.provider.cloudflare`), `host` the host of `api_url`.
pub(crate) fn handshake_problem(
    e: &(dyn std::error::Error + 'static),
    key: &str,
    host: &str,
    own_ca: bool,
) -> Option<String> {
    let trusted = if own_ca {
        format!("the CA certificates of {key}.ca_file")
    } else {
        format!("the Mozilla root CAs (set {key}.ca_file when a TLS-inspecting proxy re-signs the connection)")
    };
    let tls = find_rustls_error(e)?;
    Some(match tls {
                rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
                ) => format!(
                    "TLS: the server's certificate is not valid for the hostname {host} ({tls}); check the host of {key}.api_url"
                ),
                rustls::Error::InvalidCertificate(
                    CertificateError::UnknownIssuer | CertificateError::BadSignature,
                ) => format!(
                    "TLS: the server's certificate is not signed by a trusted CA ({tls}); trusted are {trusted}"
                ),
                rustls::Error::InvalidCertificate(c) => format!(
                    "TLS: the server's certificate was refused ({c:?}); trusted are {trusted}"
                ),
                other => format!("TLS handshake failed: {other}"),
            })
}

/// The rustls error in `e`'s chain. hyper-rustls wraps it in an `io::Error` inside another
/// `io::Error`, and `io::Error::source()` skips the error it wraps, so each `io::Error` is
/// opened with `get_ref` as well as followed through `source`.
fn find_rustls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(tls) = e.downcast_ref::<rustls::Error>() {
        return Some(tls);
    }
    if let Some(inner) = e
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
    {
        let inner: &(dyn std::error::Error + 'static) = inner;
        if let Some(tls) = find_rustls_error(inner) {
            return Some(tls);
        }
    }
    e.source().and_then(find_rustls_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_needs_at_least_one_usable_certificate() {
        assert_eq!(
            CaCertificates::from_pem(b"not pem at all"),
            Err(CaFileError::NoCertificate)
        );
        let broken = b"-----BEGIN CERTIFICATE-----\nAAAA\n";
        assert!(matches!(
            CaCertificates::from_pem(broken),
            Err(CaFileError::NotPem(_))
        ));
        // Well-formed PEM, but the DER inside is not a certificate.
        let garbage = b"-----BEGIN CERTIFICATE-----\nAAECAwQFBgcICQ==\n-----END CERTIFICATE-----\n";
        assert!(matches!(
            CaCertificates::from_pem(garbage),
            Err(CaFileError::BadCertificate { index: 1, .. })
        ));
    }
}
