//! Text the way PostgreSQL can store it.
//!
//! A `text` value cannot hold NUL (U+0000): PostgreSQL refuses the whole statement with
//! `invalid byte sequence for encoding "UTF8": 0x00`. Subscribers send whatever they like in
//! bodies, headers and error pages, and one such answer inside a batch write used to make
//! every retry of that batch fail. Everything the relay writes that came from outside goes
//! through [`storable`] first.

use std::borrow::Cow;

/// What a NUL becomes: the Unicode replacement character, as for invalid UTF-8.
pub const NUL_REPLACEMENT: char = '\u{FFFD}';

/// `text` with every NUL replaced by [`NUL_REPLACEMENT`]; borrowed when there is none.
pub fn storable(text: &str) -> Cow<'_, str> {
    if text.contains('\0') {
        Cow::Owned(text.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_is_replaced_and_clean_text_is_borrowed() {
        assert_eq!(storable("upstream\0failed"), "upstream\u{FFFD}failed");
        assert_eq!(storable("\0\0"), "\u{FFFD}\u{FFFD}");
        assert!(matches!(storable("plain €"), Cow::Borrowed("plain €")));
    }
}
