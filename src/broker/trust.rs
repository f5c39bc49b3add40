//! The certificate authorities broker TLS connections are verified against
//! (`OUTBOX_BROKER_CA_FILE`, else the system's roots).

use std::sync::Arc;

/// The certificate authorities TLS broker connections (`rediss://`, `amqps://`) are verified
/// against: the system's roots, or the PEM file `OUTBOX_BROKER_CA_FILE` names.
#[derive(Clone, Debug, Default)]
pub struct TlsTrust {
    /// The file's certificates, PEM; `None`: the system's roots.
    ca_pem: Option<Arc<str>>,
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
}

impl TlsTrust {
    /// The system's roots.
    pub fn system() -> TlsTrust {
        TlsTrust::default()
    }

    /// The certificates in the PEM file at `path` instead of the system's roots; a file that
    /// cannot be read or holds no certificate is refused now, not at the first publish.
    pub fn from_ca_file(path: &std::path::Path) -> Result<TlsTrust, TlsTrustError> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let pem = std::fs::read_to_string(path).map_err(|source| TlsTrustError::Read {
            path: path.to_owned(),
            source,
        })?;
        if !CertificateDer::pem_slice_iter(pem.as_bytes()).any(|cert| cert.is_ok()) {
            return Err(TlsTrustError::NoCertificate {
                path: path.to_owned(),
            });
        }
        Ok(TlsTrust {
            ca_pem: Some(pem.into()),
        })
    }

    /// [`TlsTrust::from_ca_file`] when a file is named, else [`TlsTrust::system`].
    pub fn from_config(path: Option<&std::path::Path>) -> Result<TlsTrust, TlsTrustError> {
        path.map_or(Ok(TlsTrust::system()), TlsTrust::from_ca_file)
    }

    pub(super) fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    /// The configured certificates (checked at load to hold at least one), or `None` for the
    /// system's roots.
    pub(super) fn ca_certificates(
        &self,
    ) -> Option<Vec<rustls::pki_types::CertificateDer<'static>>> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let pem = self.ca_pem.as_deref()?;
        Some(
            CertificateDer::pem_slice_iter(pem.as_bytes())
                .filter_map(Result::ok)
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `OUTBOX_BROKER_CA_FILE` naming a missing file, or one without a certificate, stops the
    /// relay at start with the path; no file means the system's roots.
    #[test]
    fn a_broker_ca_file_without_a_certificate_is_refused_at_start() {
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
        assert!(
            TlsTrust::from_config(None)
                .expect("system")
                .ca_pem()
                .is_none()
        );
    }
}
