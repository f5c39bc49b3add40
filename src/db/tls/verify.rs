//! Certificates: where the roots come from, and the rustls verifiers for each strictness
//! (`verify-full`, `verify-ca`, and none for `require`/`prefer` without a root file).

use super::*;

/// libpq's default root file, `~/.postgresql/root.crt`, if it exists.
pub fn home_root_cert() -> Option<PathBuf> {
    let home = std::env::var_os("HOME").filter(|home| !home.is_empty())?;
    let path = Path::new(&home).join(".postgresql").join("root.crt");
    path.is_file().then_some(path)
}

pub(super) fn read_certificates(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_error = |reason| TlsError::File {
        what,
        path: path.to_owned(),
        reason,
    };
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(file_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(file_error)?;
    if certificates.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_owned(),
            expected: "PEM certificate (-----BEGIN CERTIFICATE-----)",
        });
    }
    Ok(certificates)
}

pub(super) fn load_roots(roots: &Roots) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    match roots {
        Roots::File(path) => {
            for certificate in read_certificates("sslrootcert", path)? {
                store.add(certificate).map_err(TlsError::Rustls)?;
            }
        }
        Roots::System => {
            // Certificates the store cannot parse are skipped (as OpenSSL does); only an
            // empty result is an error, since nothing could ever verify against it.
            let loaded = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(loaded.certs);
            if store.is_empty() {
                return Err(TlsError::NoSystemRoots);
            }
        }
    }
    Ok(store)
}

/// Why a server's certificate was refused, with the settings that refused it, so the
/// operator sees at once that it is a certificate problem and which file to look at.
#[derive(Debug)]
pub(super) struct CertificateRefused {
    pub(super) host: String,
    pub(super) reason: CertificateError,
    pub(super) describe: String,
}

impl fmt::Display for CertificateRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TLS certificate verification failed for {}: ", self.host)?;
        // rustls prints the common ones as bare variant names; say what they mean.
        match &self.reason {
            CertificateError::UnknownIssuer => {
                f.write_str("not issued by a trusted CA (unknown issuer)")?;
            }
            CertificateError::BadSignature => {
                f.write_str("not signed by a trusted CA (bad signature)")?;
            }
            CertificateError::NotValidForName => {
                f.write_str("the certificate is not valid for this host name")?;
            }
            reason => write!(f, "{reason}")?,
        }
        write!(f, " ({})", self.describe)
    }
}

impl std::error::Error for CertificateRefused {}

/// What a server certificate is checked against, per `sslmode` (see the table in `mod.rs`).
#[derive(Debug)]
pub(super) enum CertificateCheck {
    /// `prefer`/`require` without roots: libpq encrypts but checks no certificate, so neither
    /// do we. The handshake signature is still checked (below), so the server holds the key
    /// of the certificate it shows, whatever that certificate is.
    Nothing,
    /// `verify-ca` (and `prefer`/`require` given roots): the chain to a trusted root.
    Chain(Arc<RootCertStore>),
    /// `verify-full`: chain and host name, as for HTTPS.
    Full(Arc<WebPkiServerVerifier>),
}

/// The one rustls verifier every mode uses: the certificate as `check` says, the handshake
/// signature always.
#[derive(Debug)]
pub(super) struct ServerCertificate {
    pub(super) check: CertificateCheck,
    pub(super) algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ServerCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.check {
            CertificateCheck::Nothing => Ok(ServerCertVerified::assertion()),
            CertificateCheck::Full(full) => {
                full.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            }
            CertificateCheck::Chain(roots) => ParsedCertificate::try_from(end_entity)
                .and_then(|certificate| {
                    verify_server_cert_signed_by_trust_anchor(
                        &certificate,
                        roots,
                        intermediates,
                        now,
                        self.algorithms.all,
                    )
                })
                .map(|()| ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
