//! The GPT-2 byte <-> unicode mapping used by byte-level BPE vocabularies.
//!
//! Byte-level vocabularies store tokens as strings in which every raw byte is
//! replaced by one printable code point (`'Ġ'` for `b' '`, `'Ċ'` for `b'\n'`...).
//! The fast path works on raw bytes, so vocab strings are mapped back with
//! [`char_to_byte`].

/// Code point that byte `b` is written as in a byte-level vocabulary.
pub(crate) const fn byte_to_char(b: u8) -> char {
    let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable {
        return b as char;
    }
    // Non-printable bytes are numbered in increasing byte order from U+0100.
    let mut n = 0u32;
    let mut x = 0u8;
    while x < b {
        if !matches!(x, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF) {
            n += 1;
        }
        x += 1;
    }
    match char::from_u32(256 + n) {
        Some(c) => c,
        None => unreachable!(),
    }
}

const BYTE_CHARS: [char; 256] = {
    let mut t = ['\0'; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = byte_to_char(i as u8);
        i += 1;
    }
    t
};

/// The byte that code point `c` stands for, if `c` belongs to the mapping.
pub(crate) fn char_to_byte(c: char) -> Option<u8> {
    let cp = c as u32;
    // All 256 mapped code points are below U+0144.
    if cp >= 0x144 {
        return None;
    }
    if let Ok(b) = u8::try_from(cp) {
        if BYTE_CHARS[b as usize] == c {
            return Some(b);
        }
    }
    BYTE_CHARS.iter().position(|&x| x == c).map(|p| p as u8)
}

/// Maps a byte-level vocabulary string back to raw bytes; `None` if the string
/// contains a code point outside the mapping (such a token is unreachable from
/// byte-level input).
pub(crate) fn decode_token(token: &str) -> Option<Vec<u8>> {
    token.chars().map(char_to_byte).collect()
}

/// The byte-level string of a single byte, as used as a vocabulary key.
pub(crate) fn byte_token(b: u8) -> String {
    BYTE_CHARS[b as usize].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_is_the_gpt2_bijection() {
        assert_eq!(byte_to_char(b' '), 'Ġ');
        assert_eq!(byte_to_char(b'\n'), 'Ċ');
        assert_eq!(byte_to_char(b'a'), 'a');
        assert_eq!(byte_to_char(0), '\u{100}');
        assert_eq!(byte_to_char(0xAD), '\u{143}');
        let mut seen = std::collections::HashSet::new();
        for b in 0..=255u8 {
            let c = byte_to_char(b);
            assert!(seen.insert(c));
            assert_eq!(char_to_byte(c), Some(b));
        }
        assert_eq!(char_to_byte('中'), None);
        assert_eq!(decode_token("Ġhello"), Some(b" hello".to_vec()));
    }
}
