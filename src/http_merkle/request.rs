//! The pure half of `GET /merkle/<path>`: the bearer token and its constant-time check, the
//! request target (a percent-encoded path and an optional `b1`/`b2` query), and the percent
//! encoding of segments in responses. No I/O here, so all of it is unit-tested.

use sha2::{Digest, Sha256};

use crate::merkle::depth_of;

/// The longest path accepted, after decoding (ids are at most 255 bytes; the head's 8 KiB
/// cap bounds the encoded form).
pub const MAX_PATH_BYTES: usize = 1024;
/// A segment's length is one byte in the slot key.
const MAX_SEGMENT_BYTES: usize = 255;
const PREFIX: &str = "/merkle/";

/// What is asked of a path: the node (hash, leaf, bucket1 entries), one bucket1's bucket2
/// entries, or one bucket2's children.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Query {
    Node,
    Bucket1(u8),
    Bucket2(u8, u8),
}

/// A parsed `/merkle/<path>[?b1=XX[&b2=YY]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// 0 for the root (`/merkle/`), else `merkle::depth_of(path)`.
    pub depth: usize,
    pub path: String,
    pub query: Query,
}

/// Why a target was refused: `NotFound` for anything outside `/merkle/`, `Bad` (400) with a
/// fixed reason that never echoes the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetError {
    NotFound,
    Bad(&'static str),
}

/// Parses a request target. The path is percent-decoded (no `+` → space: it is not a form)
/// and must be UTF-8, at most `MAX_PATH_BYTES`, with segments of at most 255 bytes.
pub fn parse_target(target: &str) -> Result<Target, TargetError> {
    let rest = target.strip_prefix(PREFIX).ok_or(TargetError::NotFound)?;
    let (raw_path, raw_query) = match rest.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (rest, None),
    };
    let path = String::from_utf8(percent_decode(raw_path)?).map_err(|_| TargetError::Bad("the path is not UTF-8"))?;
    if path.len() > MAX_PATH_BYTES {
        return Err(TargetError::Bad("the path is too long"));
    }
    if path.split('.').any(|segment| segment.len() > MAX_SEGMENT_BYTES) {
        return Err(TargetError::Bad("a segment is over 255 bytes"));
    }
    // `/merkle/` is the root; the empty id (which the worker never accepts) has no address.
    let depth = if path.is_empty() { 0 } else { depth_of(&path) };
    let query = parse_query(raw_query.unwrap_or(""))?;
    Ok(Target { depth, path, query })
}

fn parse_query(query: &str) -> Result<Query, TargetError> {
    let (mut b1, mut b2) = (None, None);
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (key, value) = pair.split_once('=').ok_or(TargetError::Bad("expected b1=XX or b2=YY"))?;
        let slot = match key {
            "b1" => &mut b1,
            "b2" => &mut b2,
            _ => return Err(TargetError::Bad("the only parameters are b1 and b2")),
        };
        if slot.is_some() {
            return Err(TargetError::Bad("a parameter is repeated"));
        }
        *slot = Some(hex_byte(value).ok_or(TargetError::Bad("b1 and b2 are two hex digits"))?);
    }
    match (b1, b2) {
        (None, None) => Ok(Query::Node),
        (Some(b1), None) => Ok(Query::Bucket1(b1)),
        (Some(b1), Some(b2)) => Ok(Query::Bucket2(b1, b2)),
        (None, Some(_)) => Err(TargetError::Bad("b2 needs b1")),
    }
}

/// Exactly two hex digits.
fn hex_byte(text: &str) -> Option<u8> {
    if text.len() != 2 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u8::from_str_radix(text, 16).ok()
}

/// `%XX` escapes decoded; a `%` not followed by two hex digits is refused.
pub fn percent_decode(text: &str) -> Result<Vec<u8>, TargetError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let escape = text.get(index + 1..index + 3).and_then(hex_byte).ok_or(TargetError::Bad("a bad % escape"))?;
            out.push(escape);
            index += 3;
        } else {
            out.push(bytes[index]);
            index += 1;
        }
    }
    Ok(out)
}

/// Every byte but the unreserved ones (RFC 3986: letters, digits, `-._~`) as `%XX`: a segment
/// or path so encoded has no space, `?`, `&`, `/` or line break, whatever the id holds.
pub fn percent_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &byte in bytes {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The token of the head's one `Authorization: Bearer <token>` header (name and scheme
/// case-insensitive); `None` when it is missing, another scheme, or repeated.
pub fn bearer_token(head: &str) -> Option<&str> {
    let mut found = None;
    for line in head.split("\r\n").skip(1) {
        let Some((name, value)) = line.split_once(':') else { continue };
        if !name.trim().eq_ignore_ascii_case("authorization") {
            continue;
        }
        if found.is_some() {
            return None;
        }
        let value = value.trim();
        let (scheme, token) = value.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        found = Some(token.trim());
    }
    found.filter(|token| !token.is_empty())
}

/// The digest the server keeps instead of the token.
pub fn token_digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// Whether `given` hashes to `expected`, in time independent of where they differ: both are
/// SHA-256 digests (so the given token's length only shows in the time to hash it, which the
/// client knows anyway), compared by OR-ing every byte's XOR with no early exit.
pub fn token_matches(given: &[u8], expected: &[u8; 32]) -> bool {
    let given = token_digest(given);
    let mut difference = 0u8;
    for (a, b) in given.iter().zip(expected.iter()) {
        difference |= a ^ b;
    }
    // Keeps the compiler from turning the fold back into an early-exit comparison.
    std::hint::black_box(difference) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(depth: usize, path: &str, query: Query) -> Result<Target, TargetError> {
        Ok(Target { depth, path: path.into(), query })
    }

    #[test]
    fn paths_and_queries_parse() {
        assert_eq!(parse_target("/merkle/"), target(0, "", Query::Node));
        assert_eq!(parse_target("/merkle/?b1=0a"), target(0, "", Query::Bucket1(0x0a)));
        assert_eq!(parse_target("/merkle/uk.nhs"), target(2, "uk.nhs", Query::Node));
        assert_eq!(parse_target("/merkle/a.?b1=FF&b2=00"), target(2, "a.", Query::Bucket2(0xff, 0)));
        assert_eq!(parse_target("/merkle/a%20b.%C3%BC%2E"), target(3, "a b.ü.", Query::Node));
        assert_eq!(parse_target("/merkle/x?"), target(1, "x", Query::Node));
        assert_eq!(parse_target("/merkle/a+b"), target(1, "a+b", Query::Node));
    }

    #[test]
    fn malformed_targets_are_refused_without_echoing_them() {
        assert_eq!(parse_target("/metrics"), Err(TargetError::NotFound));
        assert_eq!(parse_target("/merkle"), Err(TargetError::NotFound));
        for bad in [
            "/merkle/a%2",
            "/merkle/a%zz",
            "/merkle/%FF",
            "/merkle/a?b2=00",
            "/merkle/a?b1=0",
            "/merkle/a?b1=000",
            "/merkle/a?b1=+1",
            "/merkle/a?b1=00&b1=01",
            "/merkle/a?c=1",
            "/merkle/a?b1",
        ] {
            assert!(matches!(parse_target(bad), Err(TargetError::Bad(_))), "{bad}");
        }
        let long_segment = format!("/merkle/{}", "s".repeat(256));
        assert!(matches!(parse_target(&long_segment), Err(TargetError::Bad(_))));
        assert!(parse_target(&format!("/merkle/{}", "s".repeat(255))).is_ok());
        let long_path = format!("/merkle/{}", vec!["s".repeat(200); 6].join("."));
        assert!(matches!(parse_target(&long_path), Err(TargetError::Bad(_))));
    }

    #[test]
    fn percent_encoding_round_trips_any_bytes() {
        let segment = "a b/?&%\n.ü~".as_bytes();
        let encoded = percent_encode(segment);
        assert!(encoded.bytes().all(|b| b.is_ascii_graphic() && !b"/?&".contains(&b)), "{encoded}");
        assert_eq!(percent_decode(&encoded).unwrap(), segment);
    }

    #[test]
    fn the_bearer_token_is_found_once_in_any_case() {
        let head = |lines: &str| format!("GET /merkle/ HTTP/1.0\r\n{lines}\r\n");
        assert_eq!(bearer_token(&head("Authorization: Bearer abc\r\n")), Some("abc"));
        assert_eq!(bearer_token(&head("host: x\r\nauthorization:  bearer  abc \r\n")), Some("abc"));
        assert_eq!(bearer_token(&head("Authorization: Basic YWJj\r\n")), None);
        assert_eq!(bearer_token(&head("Authorization: Bearer\r\n")), None);
        assert_eq!(bearer_token(&head("Authorization: Bearer a\r\nAuthorization: Bearer a\r\n")), None);
        assert_eq!(bearer_token(&head("")), None);
        assert_eq!(bearer_token("GET /merkle/?Authorization: Bearer abc HTTP/1.0\r\n\r\n"), None);
    }

    #[test]
    fn the_token_compare_accepts_only_the_token() {
        let expected = token_digest(b"0123456789abcdef");
        assert!(token_matches(b"0123456789abcdef", &expected));
        assert!(!token_matches(b"0123456789abcdeF", &expected));
        assert!(!token_matches(b"0123456789abcde", &expected));
        assert!(!token_matches(b"0123456789abcdef0", &expected));
        assert!(!token_matches(b"", &expected));
    }
}
