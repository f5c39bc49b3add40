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

mod params;
mod verify;

pub use params::*;
pub use verify::*;

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
        let check = match &self.verify {
            Verify::Nothing => CertificateCheck::Nothing,
            Verify::Chain(roots) => CertificateCheck::Chain(Arc::new(load_roots(roots)?)),
            Verify::Full(roots) => CertificateCheck::Full(
                WebPkiServerVerifier::builder_with_provider(
                    Arc::new(load_roots(roots)?),
                    Arc::clone(&provider),
                )
                .build()
                .map_err(TlsError::Verifier)?,
            ),
        };
        let verifier: Arc<dyn ServerCertVerifier> =
            Arc::new(ServerCertificate { check, algorithms });
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
