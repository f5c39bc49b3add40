//! TLS to PostgreSQL: the one place that reads a connection string's `sslmode`,
//! `sslrootcert`, `sslcert` and `sslkey` and builds the connector every connection of the
//! relay uses (the pools, the LISTEN session, the wake-up gate, `migrate`, the CLI, `demo`).
//!
//! The semantics are libpq's, because the URLs come from libpq-speaking providers and tools:
//!
//! | `sslmode` | TLS | certificate checked |
//! |---|---|---|
//! | `disable` | never | — |
//! | `prefer` (default) | if the server offers it, else plain | as `require` |
//! | `require` | always | only if a root file is given (or `~/.postgresql/root.crt` exists): then as `verify-ca` |
//! | `verify-ca` | always | chain to a trusted root |
//! | `verify-full` | always | chain, and the host name (or IP) against the certificate |
//!
//! tokio-postgres only knows `disable`/`prefer`/`require` and no file parameters, so they are
//! taken out of the string here before tokio-postgres parses the rest; `verify-*` become its
//! `require` plus a rustls verifier of the right strictness. Whatever the mode, once TLS was
//! asked for and the server agreed, a failed handshake or verification fails the connection:
//! nothing here ever retries in plain text.
//!
//! Errors name files and modes, never the connection string (which may hold a password).

use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{WebPkiServerVerifier, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres_rustls::MakeRustlsConnect;

/// The connector every connection of the relay is made with: rustls, plus a clear message
/// when the server's certificate is refused. With `sslmode=disable` tokio-postgres never
/// calls it.
#[derive(Clone)]
pub struct DbTls {
    inner: MakeRustlsConnect,
    /// The settings a refusal names, e.g. `sslmode=verify-full, sslrootcert=/etc/ca.pem`.
    describe: Arc<str>,
}

impl<S> MakeTlsConnect<S> for DbTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = <MakeRustlsConnect as MakeTlsConnect<S>>::Stream;
    type TlsConnect = DbTlsConnect<<MakeRustlsConnect as MakeTlsConnect<S>>::TlsConnect>;
    type Error = <MakeRustlsConnect as MakeTlsConnect<S>>::Error;

    fn make_tls_connect(&mut self, host: &str) -> Result<Self::TlsConnect, Self::Error> {
        Ok(DbTlsConnect {
            inner: MakeTlsConnect::<S>::make_tls_connect(&mut self.inner, host)?,
            host: host.to_owned(),
            describe: Arc::clone(&self.describe),
        })
    }
}

/// One handshake of [`DbTls`].
pub struct DbTlsConnect<T> {
    inner: T,
    host: String,
    describe: Arc<str>,
}

impl<S, T> TlsConnect<S> for DbTlsConnect<T>
where
    T: TlsConnect<S, Error = io::Error>,
    T::Future: Send + 'static,
{
    type Stream = T::Stream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<T::Stream>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        let DbTlsConnect {
            inner,
            host,
            describe,
        } = self;
        let handshake = inner.connect(stream);
        Box::pin(async move {
            handshake.await.map_err(|error| {
                // rustls reports a refused certificate as one handshake error among many;
                // say plainly that it is the certificate, for which host, under which settings.
                let reason = error
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                    .and_then(|inner| match inner {
                        rustls::Error::InvalidCertificate(reason) => Some(reason.clone()),
                        _ => None,
                    });
                match reason {
                    Some(reason) => io::Error::new(
                        io::ErrorKind::InvalidData,
                        CertificateRefused {
                            host,
                            reason,
                            describe: describe.to_string(),
                        },
                    ),
                    None => error,
                }
            })
        })
    }
}

/// `sslmode`, as libpq spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode, TlsError> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            // libpq's `allow` tries plain first and TLS only when refused; no managed database
            // needs it and tokio-postgres cannot do it, so it is refused rather than guessed.
            other => {
                return Err(TlsError::Param(format!(
                    "sslmode `{other}` is not supported: use disable, prefer, require, verify-ca or verify-full"
                )));
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// A TLS setting that cannot be used: a bad parameter, or a file that is missing or not PEM.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{0}")]
    Param(String),
    // The reason is shown, not chained: pem's I/O error would print its cause twice.
    #[error("reading {what} {}: {reason}", path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        reason: rustls::pki_types::pem::Error,
    },
    #[error("{what} {} holds no {expected}", path.display())]
    Empty {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error(
        "sslrootcert=system: no trusted root certificates found on this system \
             (install the ca-certificates package, or pass sslrootcert=/path/to/ca.pem)"
    )]
    NoSystemRoots,
    #[error("setting up TLS")]
    Rustls(#[source] rustls::Error),
    #[error("setting up certificate verification")]
    Verifier(#[source] rustls::client::VerifierBuilderError),
}

/// The TLS parameters of a connection string; `None` where the string does not set one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsParams {
    pub sslmode: Option<String>,
    pub sslrootcert: Option<String>,
    pub sslcert: Option<String>,
    pub sslkey: Option<String>,
}

impl TlsParams {
    fn take(&mut self, key: &str, value: String) -> bool {
        let slot = match key {
            "sslmode" => &mut self.sslmode,
            "sslrootcert" => &mut self.sslrootcert,
            "sslcert" => &mut self.sslcert,
            "sslkey" => &mut self.sslkey,
            _ => return false,
        };
        // As in libpq, a later occurrence wins.
        *slot = Some(value);
        true
    }
}

/// Takes the TLS parameters out of `conninfo` (a `postgres://` URL or a libpq `key=value`
/// string) and returns the rest, for tokio-postgres to parse. A string that does not
/// tokenize is returned unchanged, so tokio-postgres reports what is wrong with it.
pub fn split_tls_params(conninfo: &str) -> (String, TlsParams) {
    let mut params = TlsParams::default();
    let trimmed = conninfo.trim_start();
    if trimmed.starts_with("postgres://") || trimmed.starts_with("postgresql://") {
        let Some((head, query)) = conninfo.split_once('?') else {
            return (conninfo.to_owned(), params);
        };
        let mut kept = Vec::new();
        for pair in query.split('&') {
            let taken = pair.split_once('=').is_some_and(|(key, value)| {
                let value = percent_encoding::percent_decode_str(value)
                    .decode_utf8_lossy()
                    .into_owned();
                params.take(
                    &percent_encoding::percent_decode_str(key).decode_utf8_lossy(),
                    value,
                )
            });
            if !taken {
                kept.push(pair);
            }
        }
        let rest = if kept.is_empty() {
            head.to_owned()
        } else {
            format!("{head}?{}", kept.join("&"))
        };
        return (rest, params);
    }
    match split_key_value(conninfo) {
        Some(pairs) => {
            let mut kept = Vec::new();
            for (key, value, raw) in pairs {
                if !params.take(key, value) {
                    kept.push(raw);
                }
            }
            (kept.join(" "), params)
        }
        None => (conninfo.to_owned(), TlsParams::default()),
    }
}

/// `key = value` pairs of a libpq conninfo string as (key, unescaped value, raw text), with
/// the quoting rules tokio-postgres applies (`'…'`, backslash escapes); `None` if malformed.
fn split_key_value(conninfo: &str) -> Option<Vec<(&str, String, &str)>> {
    let mut pairs = Vec::new();
    let bytes: Vec<(usize, char)> = conninfo.char_indices().collect();
    let at = |i: usize| bytes.get(i).map(|&(_, c)| c);
    let offset = |i: usize| bytes.get(i).map_or(conninfo.len(), |&(o, _)| o);
    let mut i = 0;
    loop {
        while at(i).is_some_and(char::is_whitespace) {
            i += 1;
        }
        if at(i).is_none() {
            return Some(pairs);
        }
        let start = i;
        while at(i).is_some_and(|c| !c.is_whitespace() && c != '=') {
            i += 1;
        }
        let key = &conninfo[offset(start)..offset(i)];
        while at(i).is_some_and(char::is_whitespace) {
            i += 1;
        }
        if key.is_empty() || at(i) != Some('=') {
            return None;
        }
        i += 1;
        while at(i).is_some_and(char::is_whitespace) {
            i += 1;
        }
        let mut value = String::new();
        if at(i) == Some('\'') {
            i += 1;
            loop {
                match at(i)? {
                    '\'' => break,
                    '\\' => {
                        value.push(at(i + 1)?);
                        i += 2;
                    }
                    c => {
                        value.push(c);
                        i += 1;
                    }
                }
            }
            i += 1;
        } else {
            while let Some(c) = at(i).filter(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(at(i + 1));
                    i += 2;
                } else {
                    value.push(c);
                    i += 1;
                }
            }
            if value.is_empty() {
                return None;
            }
        }
        pairs.push((key, value, &conninfo[offset(start)..offset(i)]));
    }
}

/// Where trusted roots come from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Roots {
    /// A PEM file of CA certificates.
    File(PathBuf),
    /// The operating system's store (`sslrootcert=system`, libpq 16's spelling).
    System,
}

impl fmt::Display for Roots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Roots::File(path) => write!(f, "sslrootcert={}", path.display()),
            Roots::System => f.write_str("sslrootcert=system"),
        }
    }
}

/// How the server's certificate is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verify {
    /// Encrypted, but anyone can be on the other end (`prefer`/`require` without roots).
    Nothing,
    /// The chain must end at one of `roots`; any host name.
    Chain(Roots),
    /// Chain and host name.
    Full(Roots),
}

/// What a connection string asks for, settled: the mode tokio-postgres gets and how the
/// certificate is verified. Built once per connection string by [`TlsSettings::from_params`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    mode: SslMode,
    verify: Verify,
    client_cert: Option<(PathBuf, PathBuf)>,
}

impl TlsSettings {
    /// Settles the parameters as libpq does. `home_root` is libpq's default root file
    /// (`~/.postgresql/root.crt`), used when `sslrootcert` is not given and it exists.
    pub fn from_params(params: &TlsParams, home_root: Option<PathBuf>) -> Result<Self, TlsError> {
        let rootcert = params.sslrootcert.as_deref().filter(|s| !s.is_empty());
        let explicit_roots = rootcert.map(|value| match value {
            "system" => Roots::System,
            path => Roots::File(PathBuf::from(path)),
        });
        let mode = match params.sslmode.as_deref() {
            Some(mode) => SslMode::parse(mode)?,
            // libpq 16: sslrootcert=system without a mode means verify-full.
            None if explicit_roots == Some(Roots::System) => SslMode::VerifyFull,
            None => SslMode::Prefer,
        };
        if explicit_roots == Some(Roots::System) && mode != SslMode::VerifyFull {
            // libpq refuses this too: the system store trusts every public CA, so anything
            // short of checking the host name accepts any site's certificate.
            return Err(TlsError::Param(format!(
                "sslmode={} may not be used with sslrootcert=system: use sslmode=verify-full",
                mode.as_str()
            )));
        }
        let roots = explicit_roots.or_else(|| home_root.map(Roots::File));
        let verify = match (mode, roots) {
            (SslMode::Disable, _) => Verify::Nothing,
            (SslMode::VerifyFull, roots) => Verify::Full(roots.unwrap_or(Roots::System)),
            (SslMode::VerifyCa, roots) => Verify::Chain(roots.unwrap_or(Roots::System)),
            // libpq: with a root file, prefer and require check the chain like verify-ca.
            (SslMode::Prefer | SslMode::Require, Some(roots)) => Verify::Chain(roots),
            (SslMode::Prefer | SslMode::Require, None) => Verify::Nothing,
        };
        let client_cert = match (&params.sslcert, &params.sslkey) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some((PathBuf::from(cert), PathBuf::from(key))),
            (Some(_), None) => {
                return Err(TlsError::Param(
                    "sslcert is given without sslkey: pass both (the client certificate and its private key)".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(TlsError::Param(
                    "sslkey is given without sslcert: pass both (the client certificate and its private key)".into(),
                ));
            }
        };
        Ok(TlsSettings {
            mode,
            verify,
            client_cert,
        })
    }

    /// The mode tokio-postgres negotiates with: `verify-*` are `require` plus our verifier.
    pub fn tokio_postgres_mode(&self) -> tokio_postgres::config::SslMode {
        match self.mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        }
    }

    /// Reads the root and client certificate files and builds the connector.
    pub fn connector(&self) -> Result<DbTls, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let algorithms = provider.signature_verification_algorithms;
        let describe = match &self.verify {
            Verify::Nothing => format!("sslmode={}", self.mode.as_str()),
            Verify::Chain(roots) | Verify::Full(roots) => {
                format!("sslmode={}, {roots}", self.mode.as_str())
            }
        };
        let verifier: Arc<dyn ServerCertVerifier> = match &self.verify {
            Verify::Nothing => Arc::new(AnyCertificate { algorithms }),
            Verify::Chain(roots) | Verify::Full(roots) => {
                let store = Arc::new(load_roots(roots)?);
                Arc::new(Verified {
                    full: WebPkiServerVerifier::builder_with_provider(
                        Arc::clone(&store),
                        Arc::clone(&provider),
                    )
                    .build()
                    .map_err(TlsError::Verifier)?,
                    roots: store,
                    algorithms,
                    check_host_name: matches!(self.verify, Verify::Full(_)),
                })
            }
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Rustls)?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match &self.client_cert {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = read_certificates("sslcert", cert)?;
                let key = PrivateKeyDer::from_pem_file(key).map_err(|reason| TlsError::File {
                    what: "sslkey",
                    path: key.clone(),
                    reason,
                })?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(TlsError::Rustls)?
            }
        };
        // PostgreSQL 17 requires this ALPN for direct TLS (`sslnegotiation=direct`); older
        // servers ignore it, and libpq 17 sends it on every connection.
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(DbTls {
            inner: MakeRustlsConnect::new(config),
            describe: describe.into(),
        })
    }
}

/// libpq's default root file, `~/.postgresql/root.crt`, if it exists.
pub fn home_root_cert() -> Option<PathBuf> {
    let home = std::env::var_os("HOME").filter(|home| !home.is_empty())?;
    let path = Path::new(&home).join(".postgresql").join("root.crt");
    path.is_file().then_some(path)
}

fn read_certificates(
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

fn load_roots(roots: &Roots) -> Result<RootCertStore, TlsError> {
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
struct CertificateRefused {
    host: String,
    reason: CertificateError,
    describe: String,
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

/// `verify-ca` and `verify-full` (and `prefer`/`require` given roots).
#[derive(Debug)]
struct Verified {
    /// Chain and name, as for HTTPS.
    full: Arc<WebPkiServerVerifier>,
    /// The same roots, for the chain-only check.
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
    check_host_name: bool,
}

impl ServerCertVerifier for Verified {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.check_host_name {
            self.full
                .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        } else {
            ParsedCertificate::try_from(end_entity)
                .and_then(|certificate| {
                    verify_server_cert_signed_by_trust_anchor(
                        &certificate,
                        &self.roots,
                        intermediates,
                        now,
                        self.algorithms.all,
                    )
                })
                .map(|()| ServerCertVerified::assertion())
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

/// `prefer`/`require` without roots: libpq encrypts but checks no certificate, so neither
/// do we. The handshake signature is still checked, so the server holds the key of the
/// certificate it shows (whatever that certificate is).
#[derive(Debug)]
struct AnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn params(conninfo: &str) -> (String, TlsParams) {
        split_tls_params(conninfo)
    }

    #[test]
    fn url_tls_params_are_taken_out_and_the_rest_kept() {
        let (rest, tls) = params(
            "postgres://relay:pw@db:5432/app?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca.pem&sslcert=/c.pem&sslkey=/k.pem",
        );
        assert_eq!(rest, "postgres://relay:pw@db:5432/app?application_name=x");
        assert_eq!(
            tls,
            TlsParams {
                sslmode: Some("verify-full".into()),
                sslrootcert: Some("/etc/ca.pem".into()),
                sslcert: Some("/c.pem".into()),
                sslkey: Some("/k.pem".into()),
            }
        );
        let (rest, tls) = params("postgresql://db/app?sslmode=require");
        assert_eq!(rest, "postgresql://db/app");
        assert_eq!(tls.sslmode.as_deref(), Some("require"));
        let (rest, tls) = params("postgres://db/app");
        assert_eq!(rest, "postgres://db/app");
        assert_eq!(tls, TlsParams::default());
    }

    #[test]
    fn key_value_tls_params_are_taken_out_with_quoting() {
        let (rest, tls) = params(
            "host=db  sslmode = verify-ca password='a b\\'c' sslrootcert='/my certs/ca.pem' dbname=app",
        );
        assert_eq!(rest, "host=db password='a b\\'c' dbname=app");
        assert_eq!(tls.sslmode.as_deref(), Some("verify-ca"));
        assert_eq!(tls.sslrootcert.as_deref(), Some("/my certs/ca.pem"));
        let rest_config: tokio_postgres::Config = rest.parse().expect("rest parses");
        assert_eq!(rest_config.get_password(), Some(&b"a b'c"[..]));
    }

    #[test]
    fn a_malformed_key_value_string_is_left_for_tokio_postgres_to_report() {
        let (rest, tls) = params("host=db sslmode");
        assert_eq!(rest, "host=db sslmode");
        assert_eq!(tls, TlsParams::default());
    }

    fn settle(tls: &TlsParams, home_root: Option<&str>) -> Result<TlsSettings, TlsError> {
        TlsSettings::from_params(tls, home_root.map(PathBuf::from))
    }

    fn with(mode: Option<&str>, rootcert: Option<&str>) -> TlsParams {
        TlsParams {
            sslmode: mode.map(str::to_owned),
            sslrootcert: rootcert.map(str::to_owned),
            ..TlsParams::default()
        }
    }

    #[test]
    fn modes_settle_as_libpq_does() {
        let file = |path: &str| Roots::File(PathBuf::from(path));
        let cases = [
            (None, None, None, SslMode::Prefer, Verify::Nothing),
            (
                Some("disable"),
                Some("/ca"),
                None,
                SslMode::Disable,
                Verify::Nothing,
            ),
            (
                Some("require"),
                None,
                None,
                SslMode::Require,
                Verify::Nothing,
            ),
            // A root file makes require check the chain, as in libpq.
            (
                Some("require"),
                Some("/ca"),
                None,
                SslMode::Require,
                Verify::Chain(file("/ca")),
            ),
            (
                Some("require"),
                None,
                Some("/home/root.crt"),
                SslMode::Require,
                Verify::Chain(file("/home/root.crt")),
            ),
            (
                Some("prefer"),
                Some("/ca"),
                None,
                SslMode::Prefer,
                Verify::Chain(file("/ca")),
            ),
            (
                Some("verify-ca"),
                Some("/ca"),
                Some("/home/root.crt"),
                SslMode::VerifyCa,
                Verify::Chain(file("/ca")),
            ),
            (
                Some("verify-ca"),
                None,
                None,
                SslMode::VerifyCa,
                Verify::Chain(Roots::System),
            ),
            (
                Some("verify-full"),
                None,
                Some("/home/root.crt"),
                SslMode::VerifyFull,
                Verify::Full(file("/home/root.crt")),
            ),
            (
                Some("verify-full"),
                None,
                None,
                SslMode::VerifyFull,
                Verify::Full(Roots::System),
            ),
            (
                None,
                Some("system"),
                None,
                SslMode::VerifyFull,
                Verify::Full(Roots::System),
            ),
        ];
        for (mode, rootcert, home, want_mode, want_verify) in cases {
            let settings = settle(&with(mode, rootcert), home)
                .unwrap_or_else(|error| panic!("{mode:?} {rootcert:?}: {error}"));
            assert_eq!(
                (settings.mode, settings.verify),
                (want_mode, want_verify),
                "sslmode={mode:?} sslrootcert={rootcert:?} home root={home:?}"
            );
        }
    }

    #[test]
    fn verify_modes_never_negotiate_plain_text() {
        for mode in ["require", "verify-ca", "verify-full"] {
            let settings = settle(&with(Some(mode), None), None).expect("valid");
            assert_eq!(
                settings.tokio_postgres_mode(),
                tokio_postgres::config::SslMode::Require,
                "{mode}"
            );
        }
    }

    #[test]
    fn bad_combinations_are_refused_with_the_fix() {
        let error = settle(&with(Some("verify-everything"), None), None)
            .expect_err("unknown mode")
            .to_string();
        assert!(
            error.contains("verify-everything") && error.contains("verify-full"),
            "{error}"
        );
        let error = settle(&with(Some("require"), Some("system")), None)
            .expect_err("weak mode with system roots")
            .to_string();
        assert!(error.contains("use sslmode=verify-full"), "{error}");
        let only_cert = TlsParams {
            sslcert: Some("/c.pem".into()),
            ..TlsParams::default()
        };
        let error = settle(&only_cert, None)
            .expect_err("cert without key")
            .to_string();
        assert!(error.contains("sslkey"), "{error}");
    }

    #[test]
    fn a_missing_root_file_is_named() {
        let settings = settle(
            &with(Some("verify-full"), Some("/nonexistent/ca.pem")),
            None,
        )
        .expect("settles; the file is read when connecting");
        let error = settings
            .connector()
            .err()
            .expect("missing file")
            .to_string();
        assert!(error.contains("sslrootcert /nonexistent/ca.pem"), "{error}");
    }
}
