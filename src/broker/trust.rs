//! The certificate authorities broker TLS connections are verified against
//! (`OUTBOX_BROKER_CA_FILE`, else the system's roots).

use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// The certificate authorities TLS broker connections (`rediss://`, `amqps://`) are verified
/// against: the system's roots, or the PEM file `OUTBOX_BROKER_CA_FILE` names.
#[derive(Clone, Debug, Default)]
pub struct TlsTrust {
    /// `None`: the system's roots.
    configured: Option<Arc<ConfiguredCas>>,
}

/// The file's certificates, in both forms the clients take: PEM (the Redis client) and parsed
/// (rustls, for RabbitMQ).
#[derive(Debug)]
struct ConfiguredCas {
    pem: String,
    certificates: Vec<CertificateDer<'static>>,
}

/// `OUTBOX_BROKER_CA_FILE` could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsTrustError {
    #[error("reading the broker CA file {path}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the broker CA file {path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    NoCertificate { path: std::path::PathBuf },
    #[error("the broker CA file {path}: certificate {number} cannot be used as a CA: {reason}")]
    BadCertificate {
        path: std::path::PathBuf,
        /// 1 for the file's first certificate.
        number: usize,
        reason: String,
    },
}

impl TlsTrust {
    /// The system's roots.
    pub fn system() -> TlsTrust {
        TlsTrust::default()
    }

    /// The certificates in the PEM file at `path` instead of the system's roots. A file that
    /// cannot be read, holds no certificate, or holds one that is not a usable trust anchor
    /// is refused now, not at the first publish: the Redis client refuses a whole bundle for
    /// one bad entry, so a file that passed here must pass there.
    pub fn from_ca_file(path: &std::path::Path) -> Result<TlsTrust, TlsTrustError> {
        let pem = std::fs::read_to_string(path).map_err(|source| TlsTrustError::Read {
            path: path.to_owned(),
            source,
        })?;
        // Each certificate must be usable as a trust anchor, as the clients will require.
        let mut anchors = rustls::RootCertStore::empty();
        let mut certificates = Vec::new();
        for (index, certificate) in CertificateDer::pem_slice_iter(pem.as_bytes()).enumerate() {
            let bad = |reason: String| TlsTrustError::BadCertificate {
                path: path.to_owned(),
                number: index + 1,
                reason,
            };
            let certificate = certificate.map_err(|error| bad(error.to_string()))?;
            anchors
                .add(certificate.clone())
                .map_err(|error| bad(error.to_string()))?;
            certificates.push(certificate);
        }
        if certificates.is_empty() {
            return Err(TlsTrustError::NoCertificate {
                path: path.to_owned(),
            });
        }
        Ok(TlsTrust {
            configured: Some(Arc::new(ConfiguredCas { pem, certificates })),
        })
    }

    /// [`TlsTrust::from_ca_file`] when a file is named, else [`TlsTrust::system`].
    pub fn from_config(path: Option<&std::path::Path>) -> Result<TlsTrust, TlsTrustError> {
        path.map_or(Ok(TlsTrust::system()), TlsTrust::from_ca_file)
    }

    /// The configured CAs as PEM, or `None` for the system's roots.
    pub(super) fn ca_pem(&self) -> Option<&str> {
        self.configured.as_ref().map(|cas| cas.pem.as_str())
    }

    /// The configured CAs, parsed (at start), or `None` for the system's roots.
    pub(super) fn ca_certificates(&self) -> Option<Vec<CertificateDer<'static>>> {
        self.configured.as_ref().map(|cas| cas.certificates.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `OUTBOX_BROKER_CA_FILE` naming a missing file, one without a certificate or one with
    /// a certificate that is no usable CA stops the relay at start with the path; no file
    /// means the system's roots.
    #[test]
    fn a_broker_ca_file_without_usable_ca_certificates_is_refused_at_start() {
        let dir = tempfile::tempdir().expect("temp dir");
        let missing = dir.path().join("missing.pem");
        let error = TlsTrust::from_ca_file(&missing).expect_err("missing file");
        assert!(matches!(error, TlsTrustError::Read { .. }), "{error:?}");
        assert!(error.to_string().contains("missing.pem"), "{error}");
        let empty = dir.path().join("key-only.pem");
        std::fs::write(
            &empty,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .expect("write");
        let error = TlsTrust::from_ca_file(&empty).expect_err("no certificate");
        assert!(
            matches!(error, TlsTrustError::NoCertificate { .. }),
            "{error:?}"
        );
        // A valid CA, then a PEM certificate block that is no certificate: refused for the
        // second one (the Redis client would refuse the whole file at each connect).
        let ca = self_signed_ca_pem();
        let one_bad = dir.path().join("one-bad.pem");
        std::fs::write(
            &one_bad,
            format!("{ca}-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
        )
        .expect("write");
        let error = TlsTrust::from_ca_file(&one_bad).expect_err("one bad certificate");
        assert!(
            matches!(error, TlsTrustError::BadCertificate { number: 2, .. }),
            "{error:?}"
        );
        let good = dir.path().join("good.pem");
        std::fs::write(&good, &ca).expect("write");
        let trust = TlsTrust::from_ca_file(&good).expect("a CA file");
        assert_eq!(trust.ca_certificates().map(|certs| certs.len()), Some(1));
        assert!(
            TlsTrust::from_config(None)
                .expect("system")
                .ca_pem()
                .is_none()
        );
    }

    /// A CA certificate of the test's own, PEM.
    fn self_signed_ca_pem() -> String {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().expect("key");
        params.self_signed(&key).expect("certificate").pem()
    }
}
