//! Text from other people, made safe for a terminal: control characters (which include ANSI
//! escape sequences and the bell), invisible formatting and bidirectional overrides (which can
//! make text read backwards) and line breaks (which would break the one-line-per-message layout)
//! are shown as visible escapes. JSON output keeps the exact text; only what is printed for a
//! person goes through [`for_terminal`].

use std::borrow::Cow;
use std::fmt::Write as _;

/// Whether `c` must not reach a terminal as is: a control character (C0, DEL, C1), a line or
/// paragraph separator, or an invisible formatting character (Unicode category Cf: bidi
/// embeddings, overrides and isolates, zero-width spaces, the byte order mark...). The zero-width
/// joiners, which emoji sequences and some scripts need, are kept.
pub fn is_unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{00AD}'
                | '\u{0600}'..='\u{0605}'
                | '\u{061C}'
                | '\u{06DD}'
                | '\u{070F}'
                | '\u{08E2}'
                | '\u{180E}'
                | '\u{200B}'
                | '\u{200E}'..='\u{200F}'
                | '\u{2028}'..='\u{202E}'
                | '\u{2060}'..='\u{2064}'
                | '\u{2066}'..='\u{206F}'
                | '\u{FEFF}'
                | '\u{FFF9}'..='\u{FFFB}'
                | '\u{110BD}'
                | '\u{110CD}'
                | '\u{13430}'..='\u{1343F}'
                | '\u{1BCA0}'..='\u{1BCA3}'
                | '\u{1D173}'..='\u{1D17A}'
                | '\u{E0001}'
        )
}

/// `text` with every character that [`is_unsafe_char`] flags replaced by a visible escape:
/// a line break by `⏎`, a tab by a space, anything else by `\u{…}` with its code point.
pub fn for_terminal(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_unsafe_char) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' | '\r' | '\u{2028}' | '\u{2029}' | '\u{85}' => out.push('⏎'),
            '\t' => out.push(' '),
            c if is_unsafe_char(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_bells_and_bidi_overrides_are_shown_not_obeyed() {
        assert_eq!(
            for_terminal("\u{1b}[31mRED\u{1b}[0m \u{7}"),
            "\\u{1b}[31mRED\\u{1b}[0m \\u{7}"
        );
        assert_eq!(for_terminal("abc\u{202E}fed"), "abc\\u{202e}fed");
        assert_eq!(for_terminal("a\u{2066}b\u{2069}"), "a\\u{2066}b\\u{2069}");
        assert_eq!(for_terminal("zero\u{200B}width"), "zero\\u{200b}width");
        // C1 controls (a CSI on some terminals) and DEL.
        assert_eq!(for_terminal("\u{9b}31m\u{7f}"), "\\u{9b}31m\\u{7f}");
    }

    #[test]
    fn line_breaks_keep_one_line() {
        assert_eq!(for_terminal("one\ntwo\r\nthree\u{2028}"), "one⏎two⏎three⏎");
        assert_eq!(for_terminal("a\tb"), "a b");
    }

    #[test]
    fn ordinary_text_is_untouched() {
        for text in [
            "hello",
            "héllo wörld",
            "مرحبا",
            "👩\u{200D}👩\u{200D}👧",
            "日本語",
        ] {
            assert!(matches!(for_terminal(text), Cow::Borrowed(t) if t == text));
        }
    }
}
