//! The libpq TLS parameters (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`) taken out of a
//! connection string, in URL or key=value form, before tokio-postgres parses the rest.

use super::*;

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
    pub(super) fn parse(value: &str) -> Result<SslMode, TlsError> {
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
pub(super) fn split_key_value(conninfo: &str) -> Option<Vec<(&str, String, &str)>> {
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
