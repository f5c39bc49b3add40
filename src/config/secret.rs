//! Secrets and how they are shown: the one place that decides what a password, token or
//! signing secret looks like in logs, errors, metrics, `--help` and command output.
//!
//! [`mask_url`] prints any URL (database, listen, subscription target, later broker URLs)
//! with its password replaced by `***`; [`SecretUrl`] holds such a URL and shows only that
//! form through `Debug` and `Display`, so a struct holding one can derive `Debug` safely.
//! Tokens and signing secrets are [`SecretString`]s (`secrecy`): their `Debug` prints
//! `[REDACTED]` and reading them takes an explicit `expose_secret()`, easy to grep for.
//!
//! It sits under `config` because the configuration is where secrets first arrive (the
//! admin token, the listen URL); it imports nothing, so the admin paths, the webhook client
//! and the relay can use it without importing anything above the configuration.

use std::convert::Infallible;
use std::fmt;
use std::str::FromStr;

pub use secrecy::{ExposeSecret, SecretString};

/// What a password is shown as.
pub const MASK: &str = "***";

/// `raw` with any password replaced by [`MASK`]; everything else (scheme, user, hosts,
/// database, path, other parameters) stays, so the result still says where it points.
///
/// Understands what the relay is given: URLs with `user:password@` (also several hosts, as
/// libpq allows, and a raw `/` in the password, which tokio-postgres accepts), a
/// `password=` query parameter (libpq honours one), libpq `key=value` strings with a
/// `password` key, and `user:password@host` without a scheme. Anything else is returned as
/// it is. It errs on the side of masking: a password is never shown because it looked odd.
pub fn mask_url(raw: &str) -> String {
    match raw.split_once("://") {
        Some((scheme, rest)) => {
            let (userinfo_end, rest) = mask_userinfo(rest);
            format!("{scheme}://{userinfo_end}{}", mask_query_password(&rest))
        }
        None if raw.contains('=') => mask_key_value_password(raw),
        None => {
            let (masked, rest) = mask_userinfo(raw);
            format!("{masked}{rest}")
        }
    }
}

/// Splits what follows the scheme into its (masked) userinfo part, up to and including the
/// `@`, and the rest. Without a password the first part is returned as it was.
fn mask_userinfo(after_scheme: &str) -> (String, String) {
    // tokio-postgres takes everything up to the first '@' as the credentials, even across
    // a '/', so a password with a raw '/' must be found the same way.
    let Some(at) = after_scheme.find('@') else {
        return (String::new(), after_scheme.to_owned());
    };
    let (candidate, rest) = after_scheme.split_at(at);
    let Some((user, password)) = candidate.split_once(':') else {
        return (String::new(), after_scheme.to_owned());
    };
    let ends_authority = |c: char| matches!(c, '/' | '?' | '#');
    if candidate.contains(ends_authority) {
        // The '@' lies beyond the authority (a path or query such as ?email=a@b): userinfo
        // only if what follows the ':' is not a port. Erring towards masking is fine here.
        let before_end = password.split(ends_authority).next().unwrap_or("");
        if !before_end.is_empty() && before_end.bytes().all(|b| b.is_ascii_digit()) {
            return (String::new(), after_scheme.to_owned());
        }
    }
    if password.is_empty() {
        return (String::new(), after_scheme.to_owned());
    }
    (format!("{user}:{MASK}"), rest.to_owned())
}

/// Masks the value of every `password=` query parameter (`?password=…` or `&password=…`).
fn mask_query_password(url: &str) -> String {
    let Some(query_start) = url.find('?') else {
        return url.to_owned();
    };
    let (head, query) = url.split_at(query_start + 1);
    let (query, fragment) = match query.find('#') {
        Some(hash) => query.split_at(hash),
        None => (query, ""),
    };
    let params: Vec<String> = query
        .split('&')
        .map(|param| match param.split_once('=') {
            Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}={MASK}"),
            _ => param.to_owned(),
        })
        .collect();
    format!("{head}{}{fragment}", params.join("&"))
}

/// Masks the value of `password` in a libpq `key=value …` string, quoted (`'…'` with `\'`
/// escapes) or not.
fn mask_key_value_password(conninfo: &str) -> String {
    let mut out = String::with_capacity(conninfo.len());
    let mut rest = conninfo;
    while let Some(found) = find_password_key(rest) {
        let (before, after_key) = rest.split_at(found);
        out.push_str(before);
        // `after_key` starts with "password", then optional spaces, '=', optional spaces.
        let after_word = &after_key["password".len()..];
        let equals = after_word.len() - after_word.trim_start().len();
        let after_eq = &after_word[equals + 1..];
        let spaces = after_eq.len() - after_eq.trim_start().len();
        let value = &after_eq[spaces..];
        out.push_str(&after_key[..after_key.len() - value.len()]);
        out.push_str(MASK);
        rest = &value[quoted_or_bare_len(value)..];
    }
    out.push_str(rest);
    out
}

/// Byte offset of the next `password` keyword (at the start or after whitespace, followed by
/// optional spaces and '=').
fn find_password_key(text: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(offset) = text[from..].find("password") {
        let at = from + offset;
        let starts_word = text[..at]
            .chars()
            .next_back()
            .is_none_or(char::is_whitespace);
        let followed_by_equals = text[at + "password".len()..].trim_start().starts_with('=');
        if starts_word && followed_by_equals {
            return Some(at);
        }
        from = at + "password".len();
    }
    None
}

/// Length of a libpq value: up to the closing quote of a quoted one, else up to whitespace.
fn quoted_or_bare_len(value: &str) -> usize {
    if let Some(quoted) = value.strip_prefix('\'') {
        let mut escaped = false;
        for (i, c) in quoted.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '\'' => return i + 2,
                _ => {}
            }
        }
        // No closing quote: libpq refuses it, and all of it may be password.
        value.len()
    } else {
        value.find(char::is_whitespace).unwrap_or(value.len())
    }
}

/// A URL that may carry a password: `DATABASE_URL`, `OUTBOX_LISTEN_DATABASE_URL`, a
/// subscription's target. `Debug` and `Display` show [`mask_url`]'s form; only
/// [`SecretUrl::expose_secret`] gives the real URL, for connecting.
#[derive(Clone)]
pub struct SecretUrl {
    url: SecretString,
    masked: String,
}

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> SecretUrl {
        let url: String = url.into();
        let masked = mask_url(&url);
        SecretUrl {
            url: SecretString::from(url),
            masked,
        }
    }

    /// The URL with its password, for the connection itself and nothing else.
    pub fn expose_secret(&self) -> &str {
        self.url.expose_secret()
    }

    /// The URL with its password replaced by `***`, for showing.
    pub fn masked(&self) -> &str {
        &self.masked
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.masked, f)
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked)
    }
}

/// For clap: any text is accepted here; whether it is a usable URL is found out when
/// connecting, with an error that never repeats the text.
impl FromStr for SecretUrl {
    type Err = Infallible;

    fn from_str(raw: &str) -> Result<SecretUrl, Infallible> {
        Ok(SecretUrl::new(raw))
    }
}

impl From<String> for SecretUrl {
    fn from(url: String) -> SecretUrl {
        SecretUrl::new(url)
    }
}

/// For request bodies (the admin API): the URL arrives as a JSON string.
impl<'de> serde::Deserialize<'de> for SecretUrl {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<SecretUrl, D::Error> {
        String::deserialize(deserializer).map(SecretUrl::new)
    }
}

impl From<&str> for SecretUrl {
    fn from(url: &str) -> SecretUrl {
        SecretUrl::new(url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_in_a_url_is_replaced() {
        assert_eq!(
            mask_url("postgres://relay:s3cret@db.internal:5432/app?sslmode=require"),
            "postgres://relay:***@db.internal:5432/app?sslmode=require"
        );
        assert_eq!(
            mask_url("https://user:pass@hooks.example.com/in?x=1#frag"),
            "https://user:***@hooks.example.com/in?x=1#frag"
        );
        assert_eq!(
            mask_url("amqp://guest:guest@broker:5672/%2f?exchange=e"),
            "amqp://guest:***@broker:5672/%2f?exchange=e"
        );
    }

    #[test]
    fn a_url_without_a_password_is_unchanged() {
        for url in [
            "postgres://relay@db.internal/app",
            "https://hooks.example.com/in",
            "postgres://db.internal:5432/app",
            "postgres:///app?host=/run/postgresql",
            "https://host:8443/hook?email=a@b.example",
            "https://host/users/@me",
            "postgres://user:@host/db",
        ] {
            assert_eq!(mask_url(url), url);
        }
    }

    #[test]
    fn an_encoded_or_odd_password_is_replaced_whole() {
        assert_eq!(
            mask_url("postgres://relay:p%40ss%2Fw0rd@db/app"),
            "postgres://relay:***@db/app"
        );
        // Raw '/' and ':' (a base64 password pasted unencoded): tokio-postgres accepts it.
        assert_eq!(
            mask_url("postgres://relay:ab/c+d:e==@db/app"),
            "postgres://relay:***@db/app"
        );
        assert_eq!(
            mask_url("postgres://relay:pw@h1:5432,h2:5433/app"),
            "postgres://relay:***@h1:5432,h2:5433/app"
        );
        assert_eq!(
            mask_url("postgres://u:pw@h/app?password=other&sslmode=disable"),
            "postgres://u:***@h/app?password=***&sslmode=disable"
        );
    }

    #[test]
    fn libpq_key_value_passwords_are_replaced() {
        assert_eq!(
            mask_url("host=db user=relay password=s3cret dbname=app"),
            "host=db user=relay password=*** dbname=app"
        );
        assert_eq!(
            mask_url("host=db password = 'a b\\' c' dbname=app"),
            "host=db password = *** dbname=app"
        );
        assert_eq!(mask_url("host=db user=relay"), "host=db user=relay");
    }

    #[test]
    fn text_that_is_not_a_url_is_unchanged_unless_it_holds_credentials() {
        assert_eq!(mask_url("not a url"), "not a url");
        assert_eq!(mask_url(""), "");
        assert_eq!(mask_url("user:pw@host/db"), "user:***@host/db");
    }

    #[test]
    fn secret_urls_show_only_the_masked_form() {
        let url: SecretUrl = "postgres://relay:hunter2@db/app"
            .parse()
            .expect("infallible");
        assert_eq!(url.to_string(), "postgres://relay:***@db/app");
        assert_eq!(format!("{url:?}"), "\"postgres://relay:***@db/app\"");
        assert_eq!(url.expose_secret(), "postgres://relay:hunter2@db/app");
        let token = SecretString::from("tok-123");
        assert!(!format!("{token:?}").contains("tok-123"));
    }
}
