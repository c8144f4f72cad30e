//! Validation rules shared by the CRD schema and the Rust-side `validate()`.
//!
//! The schema (OpenAPI bounds, patterns and CEL `x-kubernetes-validations`) is
//! the source of truth: it is what the API server enforces before anything
//! reaches the operator. The constants below are used both to build that
//! schema and by the Rust checks that mirror it, so the two cannot drift
//! apart silently (tests compare them against the examples).

use std::fmt;

/// Longest accepted relative path (bytes). Linux allows 4096 for a whole
/// path; the data root itself takes some of that, so 1024 leaves room while
/// still fitting any sane layout.
pub const PATH_MAX_LEN: usize = 1024;
/// Longest accepted path segment (bytes): Linux `NAME_MAX`.
pub const PATH_SEGMENT_MAX_LEN: usize = 255;

/// CEL: a relative path never starts with `/`.
pub const PATH_RELATIVE_RULE: &str = "!self.startsWith('/')";
/// Message of [`PATH_RELATIVE_RULE`].
pub const PATH_RELATIVE_MESSAGE: &str =
    "must be relative to the agent's data root (must not start with '/')";
/// CEL: no `.` or `..` segment, so the path can never escape the data root
/// and has exactly one spelling. `[.]` rather than `\\.` keeps the rule free
/// of escapes, which CEL string literals and YAML would otherwise double.
pub const PATH_DOT_SEGMENT_RULE: &str = "!self.matches('(^|/)[.][.]?(/|$)')";
/// Message of [`PATH_DOT_SEGMENT_RULE`].
pub const PATH_DOT_SEGMENT_MESSAGE: &str = "must not contain '..' or '.' segments";
/// CEL: no empty segment (`a//b`, trailing `/`).
pub const PATH_EMPTY_SEGMENT_RULE: &str = "!self.contains('//') && !self.endsWith('/')";
/// Message of [`PATH_EMPTY_SEGMENT_RULE`].
pub const PATH_EMPTY_SEGMENT_MESSAGE: &str =
    "must not contain empty segments ('//' or a trailing '/')";
/// CEL: every segment fits `NAME_MAX` (255 bytes).
pub const PATH_SEGMENT_LEN_RULE: &str = "!self.matches('[^/]{256}')";
/// Message of [`PATH_SEGMENT_LEN_RULE`].
pub const PATH_SEGMENT_LEN_MESSAGE: &str = "each path segment must be at most 255 characters";

/// OpenAPI pattern of a relative path: no control character (NUL, newline,
/// tab, DEL, ...). A NUL can never reach the filesystem and a newline makes
/// logs and labels lie; refusing them at admission beats failing after a
/// whole download.
pub const PATH_PATTERN: &str = r"^[^\x00-\x1f\x7f]*$";
/// Prefix of the names the agent keeps for itself under its data root
/// (`.peerfill-status`, `.peerfill-partial`, ...): no Distribution may name
/// them, or it could overwrite the agent's state on every node.
pub const RESERVED_NAME_PREFIX: &str = ".peerfill";
/// CEL: no path segment starts with [`RESERVED_NAME_PREFIX`].
pub const PATH_RESERVED_RULE: &str = "!self.matches('(^|/)[.]peerfill')";
/// Message of [`PATH_RESERVED_RULE`].
pub const PATH_RESERVED_MESSAGE: &str =
    "must not use the agent's reserved names (a path segment starting with '.peerfill')";

/// CEL on `spec.source`: exactly one kind of source.
pub const SOURCE_EXACTLY_ONE_RULE: &str = "has(self.http) != has(self.node)";
/// Message of [`SOURCE_EXACTLY_ONE_RULE`].
pub const SOURCE_EXACTLY_ONE_MESSAGE: &str =
    "exactly one of spec.source.http or spec.source.node must be set";

/// Longest accepted origin URL.
pub const URL_MAX_LEN: usize = 2048;
/// Origin URL: `http` or `https` scheme (lower case), a non-empty authority,
/// no ASCII space or control character anywhere. Spelled with explicit
/// `\x..` ranges rather than `\s`, whose meaning differs between Go's regexp
/// (the API server: ASCII only) and other engines (Unicode).
pub const URL_PATTERN: &str = r"^https?://[^/?#\x00-\x20\x7f]+([/?#][^\x00-\x20\x7f]*)?$";
/// CEL: no user info (`user:password@` or `user@`) in the URL's authority:
/// the URL is copied into every node's cluster-scoped NodeFill, so a secret
/// in it would leak to every agent. Headers from a Secret (`headersFrom`)
/// are the way to authenticate.
pub const URL_NO_CREDENTIALS_RULE: &str = "!self.matches('^[a-zA-Z]+://[^/?#]*@')";
/// Message of [`URL_NO_CREDENTIALS_RULE`].
pub const URL_NO_CREDENTIALS_MESSAGE: &str =
    "must not contain credentials (user:password@); use headersFrom";

/// Expected content digest: `sha256:` or `blake3:` followed by 64 lower-case
/// hex digits.
pub const DIGEST_PATTERN: &str = "^(sha256|blake3):[0-9a-f]{64}$";

/// Longest Kubernetes object name (DNS-1123 subdomain).
pub const DNS_SUBDOMAIN_MAX_LEN: usize = 253;
/// DNS-1123 subdomain (node and Secret names).
pub const DNS_SUBDOMAIN_PATTERN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// Smallest piece size: below this the per-piece overhead (hash, request,
/// bookkeeping) dominates.
pub const PIECE_SIZE_MIN: u64 = 64 * 1024;
/// Largest piece size: a piece is buffered and verified as a whole before it
/// is served, so it bounds per-transfer memory.
pub const PIECE_SIZE_MAX: u64 = 64 * 1024 * 1024;
/// Pieces the automatic piece size aims at (see [`auto_piece_size`]).
pub const AUTO_PIECES: u64 = 4096;
/// Smallest automatic piece size (256 KiB).
pub const AUTO_PIECE_SIZE_MIN: u64 = 256 * 1024;
/// Largest automatic piece size (4 MiB).
pub const AUTO_PIECE_SIZE_MAX: u64 = 4 * 1024 * 1024;
/// Pieces the automatic piece size aimed at before operators published the
/// size they chose (see [`legacy_auto_piece_size`]).
pub const LEGACY_AUTO_PIECES: u64 = 1024;

/// The piece size used when a Distribution does not set one: the power of
/// two giving about [`AUTO_PIECES`] pieces, from 256 KiB to 4 MiB.
///
/// Why: the swarm forwards each fresh piece as a whole, so the last node
/// finishes a few piece-times after the origin's last byte, and a node's
/// byte budgets (12 MiB of piece buffers each way) hold as many requests
/// as it keeps in flight only when pieces are at most 1 MiB. Simulated at
/// 1,000 nodes with 4 GiB: 4 MiB pieces (3 per budget) 1.41 T*, 2 MiB
/// 1.30, 1 MiB with 12 requests in flight 1.20 (BENCHMARKS.md, "Swarm at
/// scale"). Below 256 KiB the per-piece work (a stream, a hash, a
/// signature check, an announcement to every peer) costs more than it
/// saves; above 4 MiB the piece buffers outgrow an agent's memory budget,
/// and the cap keeps the hash list of a terabyte at 256 Ki pieces.
///
/// The operator computes this once the size is pinned and publishes the
/// result in every NodeFill (`pieceSize`), so agents never apply their own
/// copy of the rule to a pinned size: a rolling upgrade that changes the
/// rule cannot split a content into two layouts.
pub fn auto_piece_size(size: u64) -> u64 {
    piece_size_for(size, AUTO_PIECES)
}

/// The automatic piece size of operators that left `pieceSize` at 0 in
/// NodeFills with a pinned size (about [`LEGACY_AUTO_PIECES`] pieces):
/// what such a NodeFill means, for agents and operators that read it.
pub fn legacy_auto_piece_size(size: u64) -> u64 {
    piece_size_for(size, LEGACY_AUTO_PIECES)
}

fn piece_size_for(size: u64, pieces: u64) -> u64 {
    size.div_ceil(pieces)
        .next_power_of_two()
        .clamp(AUTO_PIECE_SIZE_MIN, AUTO_PIECE_SIZE_MAX)
}
/// CEL: the piece size is a power of two (pieces then align with pages and
/// with every smaller power-of-two block size).
pub const PIECE_SIZE_POWER_OF_TWO_RULE: &str = "self in [65536, 131072, 262144, 524288, 1048576, 2097152, 4194304, 8388608, 16777216, 33554432, 67108864]";
/// Message of [`PIECE_SIZE_POWER_OF_TWO_RULE`].
pub const PIECE_SIZE_POWER_OF_TWO_MESSAGE: &str =
    "must be a power of two between 65536 (64 KiB) and 67108864 (64 MiB)";

/// Bounds of `strategy.maxOriginConnections`.
pub const MAX_ORIGIN_CONNECTIONS_MIN: u32 = 1;
/// Upper bound of `strategy.maxOriginConnections`.
pub const MAX_ORIGIN_CONNECTIONS_MAX: u32 = 64;
/// Default of `strategy.maxOriginConnections`.
pub const MAX_ORIGIN_CONNECTIONS_DEFAULT: u32 = 16;

/// Lowest per-node bandwidth cap (1 MiB/s): anything lower is a mistake, not
/// a throttle.
pub const BANDWIDTH_MIN: u64 = 1024 * 1024;
/// Highest per-node bandwidth cap (100 GiB/s, above any NIC of today).
pub const BANDWIDTH_MAX: u64 = 100 * 1024 * 1024 * 1024;

/// Bounds of `strategy.priority` (higher is served first).
pub const PRIORITY_MIN: i32 = -1000;
/// Upper bound of `strategy.priority`.
pub const PRIORITY_MAX: i32 = 1000;

/// Most files of a directory from an HTTP origin (`spec.source.http.files`).
/// A node-source directory has no such limit in the schema; its file table
/// is bounded by the agent instead.
pub const MAX_FILES: usize = 1000;
/// CEL rule on `spec.source.http`: a whole-content digest only for one file.
pub const FILES_NO_WHOLE_DIGEST_RULE: &str =
    "!has(self.files) || size(self.files) == 0 || !has(self.digest)";
/// Message of [`FILES_NO_WHOLE_DIGEST_RULE`].
pub const FILES_NO_WHOLE_DIGEST_MESSAGE: &str =
    "digest is for a single file: with files, give each file its own digest";
/// CEL rule on `spec.source.http`: a file without its own URL is at `url` +
/// its path, so `url` must end with `/`.
pub const FILES_BASE_URL_RULE: &str =
    "!has(self.files) || self.url.endsWith('/') || self.files.all(f, has(f.url))";
/// Message of [`FILES_BASE_URL_RULE`].
pub const FILES_BASE_URL_MESSAGE: &str =
    "url must end with '/' when a file takes its URL from url + path";

/// CEL rule on `spec.source.http`: a piece manifest describes one file.
pub const MANIFEST_ONE_FILE_RULE: &str =
    "!has(self.manifestUrl) || !has(self.files) || size(self.files) == 0";
/// Message of [`MANIFEST_ONE_FILE_RULE`].
pub const MANIFEST_ONE_FILE_MESSAGE: &str = "a piece manifest is for a single file, not files";

/// What is wrong with a field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// Neither or both sources are set.
    #[error("{SOURCE_EXACTLY_ONE_MESSAGE}")]
    SourceCount,
    /// A required string is empty.
    #[error("must not be empty")]
    Empty,
    /// A string is longer than allowed.
    #[error("must be at most {max} characters (is {len})")]
    TooLong {
        /// Limit.
        max: usize,
        /// Actual length.
        len: usize,
    },
    /// A path starts with `/`.
    #[error("{PATH_RELATIVE_MESSAGE}")]
    AbsolutePath,
    /// A path has a `.` or `..` segment.
    #[error("{PATH_DOT_SEGMENT_MESSAGE}")]
    DotSegment,
    /// A path has an empty segment.
    #[error("{PATH_EMPTY_SEGMENT_MESSAGE}")]
    EmptySegment,
    /// A path segment is longer than `NAME_MAX`.
    #[error("{PATH_SEGMENT_LEN_MESSAGE}")]
    SegmentTooLong,
    /// The URL is not `http(s)://host...`.
    #[error("must be an http:// or https:// URL with a host and no spaces or control characters")]
    InvalidUrl,
    /// The digest is not `sha256:<64 hex>` or `blake3:<64 hex>`.
    #[error("must be 'sha256:' or 'blake3:' followed by 64 lower-case hex digits")]
    DigestFormat,
    /// Not a DNS-1123 subdomain.
    #[error("must be a lower-case DNS-1123 subdomain")]
    DnsSubdomain,
    /// A number outside its bounds.
    #[error("must be between {min} and {max} (is {value})")]
    OutOfRange {
        /// Lower bound, inclusive.
        min: i128,
        /// Upper bound, inclusive.
        max: i128,
        /// Actual value.
        value: i128,
    },
    /// A path contains a control character (NUL, newline, ...).
    #[error("must not contain control characters")]
    ControlCharacter,
    /// A path segment is one of the agent's reserved names.
    #[error("{PATH_RESERVED_MESSAGE}")]
    ReservedName,
    /// The URL carries user info.
    #[error("{URL_NO_CREDENTIALS_MESSAGE}")]
    UrlCredentials,
    /// The piece size is not a power of two.
    #[error("{PIECE_SIZE_POWER_OF_TWO_MESSAGE}")]
    PieceSizeNotPowerOfTwo,
    /// A list is longer than allowed.
    #[error("must have at most {max} items (has {len})")]
    TooMany {
        /// Limit.
        max: usize,
        /// Actual length.
        len: usize,
    },
    /// A piece manifest next to a file list.
    #[error("{MANIFEST_ONE_FILE_MESSAGE}")]
    ManifestWithFiles,
    /// A whole-content digest next to a file list.
    #[error("{FILES_NO_WHOLE_DIGEST_MESSAGE}")]
    WholeDigestWithFiles,
    /// A base URL that does not end with `/`.
    #[error("{FILES_BASE_URL_MESSAGE}")]
    BaseUrlWithoutSlash,
    /// Two files of a directory at the same path.
    #[error("duplicate path {0:?}")]
    DuplicatePath(String),
    /// A file path beneath another file's path (`a` and `a/b`).
    #[error("{0:?} is a file, so nothing can be beneath it")]
    PathBeneathFile(String),
}

/// One invalid field of a custom resource.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct ValidationError {
    /// Field path as the API server names it, e.g. `spec.target.path`.
    pub field: String,
    /// What is wrong with it.
    pub problem: Problem,
}

impl ValidationError {
    /// A new error for `field`.
    pub fn new(field: impl Into<String>, problem: Problem) -> Self {
        Self {
            field: field.into(),
            problem,
        }
    }
}

/// Every invalid field of an object (never empty).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<ValidationError>);

impl ValidationErrors {
    /// Whether some error names exactly `field`.
    pub fn names_field(&self, field: &str) -> bool {
        self.0.iter().any(|e| e.field == field)
    }
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Collects errors while walking an object.
#[derive(Debug, Default)]
pub(crate) struct Collector(Vec<ValidationError>);

impl Collector {
    pub(crate) fn push(&mut self, field: &str, problem: Problem) {
        self.0.push(ValidationError::new(field, problem));
    }

    pub(crate) fn check(&mut self, field: &str, result: Result<(), Problem>) {
        if let Err(problem) = result {
            self.push(field, problem);
        }
    }

    pub(crate) fn finish(self) -> Result<(), ValidationErrors> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ValidationErrors(self.0))
        }
    }
}

fn check_len(s: &str, max: usize) -> Result<(), Problem> {
    // OpenAPI `maxLength` counts characters, not bytes.
    let len = s.chars().count();
    if len > max {
        return Err(Problem::TooLong { max, len });
    }
    Ok(())
}

/// Checks a path relative to an agent's data root: the same rules as the
/// schema of `spec.target.path` and `spec.source.node.path`. Returns the
/// first problem found, in the order the schema lists them.
pub fn check_relative_path(path: &str) -> Result<(), Problem> {
    if path.is_empty() {
        return Err(Problem::Empty);
    }
    check_len(path, PATH_MAX_LEN)?;
    if path.chars().any(|c| c < ' ' || c == '\x7f') {
        return Err(Problem::ControlCharacter);
    }
    if path.starts_with('/') {
        return Err(Problem::AbsolutePath);
    }
    if path.split('/').any(|s| s == "." || s == "..") {
        return Err(Problem::DotSegment);
    }
    if path.contains("//") || path.ends_with('/') {
        return Err(Problem::EmptySegment);
    }
    if path
        .split('/')
        .any(|s| s.chars().count() > PATH_SEGMENT_MAX_LEN)
    {
        return Err(Problem::SegmentTooLong);
    }
    if path.split('/').any(|s| s.starts_with(RESERVED_NAME_PREFIX)) {
        return Err(Problem::ReservedName);
    }
    Ok(())
}

/// Checks an origin URL against [`URL_PATTERN`] and [`URL_MAX_LEN`].
pub fn check_url(url: &str) -> Result<(), Problem> {
    check_len(url, URL_MAX_LEN)?;
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or(Problem::InvalidUrl)?;
    if rest.chars().any(|c| c <= ' ' || c == '\x7f') {
        return Err(Problem::InvalidUrl);
    }
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    if authority_end == 0 {
        return Err(Problem::InvalidUrl);
    }
    if rest[..authority_end].contains('@') {
        return Err(Problem::UrlCredentials);
    }
    Ok(())
}

/// Checks a digest against [`DIGEST_PATTERN`].
pub fn check_digest(digest: &str) -> Result<(), Problem> {
    let hex = digest
        .strip_prefix("sha256:")
        .or_else(|| digest.strip_prefix("blake3:"))
        .ok_or(Problem::DigestFormat)?;
    if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(Problem::DigestFormat)
    }
}

/// Checks a DNS-1123 subdomain (node and Secret names).
pub fn check_dns_subdomain(name: &str) -> Result<(), Problem> {
    if name.is_empty() {
        return Err(Problem::Empty);
    }
    check_len(name, DNS_SUBDOMAIN_MAX_LEN)?;
    let label_ok = |l: &str| {
        let b = l.as_bytes();
        match (b.first(), b.last()) {
            (Some(first), Some(last)) => {
                (first.is_ascii_lowercase() || first.is_ascii_digit())
                    && (last.is_ascii_lowercase() || last.is_ascii_digit())
                    && b.iter()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
            }
            _ => false,
        }
    };
    if name.split('.').all(label_ok) {
        Ok(())
    } else {
        Err(Problem::DnsSubdomain)
    }
}

/// Checks the paths of a directory's files (each already a valid relative
/// path): no two equal, none beneath another (`a` and `a/b` cannot both be
/// files). Returns the index of the first offending path and the problem.
pub fn check_file_paths(paths: &[&str]) -> Option<(usize, Problem)> {
    let mut seen: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (i, p) in paths.iter().enumerate() {
        if seen.insert(p, i).is_some() {
            return Some((i, Problem::DuplicatePath((*p).to_owned())));
        }
    }
    for (i, p) in paths.iter().enumerate() {
        // Every proper prefix ending at a `/` is a directory of `p`.
        for (cut, _) in p.match_indices('/') {
            let dir = &p[..cut];
            if seen.contains_key(dir) {
                return Some((i, Problem::PathBeneathFile(dir.to_owned())));
            }
        }
    }
    None
}

/// Checks `value` against inclusive bounds.
pub fn check_range<T: Into<i128> + Copy>(value: T, min: T, max: T) -> Result<(), Problem> {
    let (value, min, max) = (value.into(), min.into(), max.into());
    if value < min || value > max {
        return Err(Problem::OutOfRange { min, max, value });
    }
    Ok(())
}

/// Checks a piece size: within bounds, then a power of two.
pub fn check_piece_size(size: u64) -> Result<(), Problem> {
    check_range(size, PIECE_SIZE_MIN, PIECE_SIZE_MAX)?;
    if !size.is_power_of_two() {
        return Err(Problem::PieceSizeNotPowerOfTwo);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_paths_are_unique_and_never_beneath_a_file() {
        assert_eq!(check_file_paths(&["a", "b/c", "b/d", "bc"]), None);
        assert_eq!(
            check_file_paths(&["a", "b", "a"]),
            Some((2, Problem::DuplicatePath("a".into())))
        );
        assert_eq!(
            check_file_paths(&["x/y/z", "x/y"]),
            Some((0, Problem::PathBeneathFile("x/y".into())))
        );
    }

    #[test]
    fn relative_paths() {
        for ok in [
            "a",
            "models/llama-3/weights.bin",
            "a/.hidden/b",
            "x..y",
            "..a",
            "a..",
            "a/peerfill/.peer",
            "x.peerfill",
        ] {
            assert_eq!(check_relative_path(ok), Ok(()), "{ok}");
        }
        let cases = [
            ("", Problem::Empty),
            ("/etc/passwd", Problem::AbsolutePath),
            ("..", Problem::DotSegment),
            ("a/../../etc", Problem::DotSegment),
            ("a/..", Problem::DotSegment),
            ("./a", Problem::DotSegment),
            ("a//b", Problem::EmptySegment),
            ("a/", Problem::EmptySegment),
            ("a\0b", Problem::ControlCharacter),
            ("a\nb", Problem::ControlCharacter),
            ("a/b\x7f", Problem::ControlCharacter),
            (".peerfill-status/assignments.json", Problem::ReservedName),
            ("models/.peerfill-partial", Problem::ReservedName),
            ("a/.peerfillx/b", Problem::ReservedName),
        ];
        for (path, problem) in cases {
            assert_eq!(check_relative_path(path), Err(problem), "{path}");
        }
        let long_segment = "a".repeat(256);
        assert_eq!(
            check_relative_path(&long_segment),
            Err(Problem::SegmentTooLong)
        );
        assert_eq!(check_relative_path(&"a".repeat(255)), Ok(()));
        let long_path = vec!["abc"; 300].join("/");
        assert!(matches!(
            check_relative_path(&long_path),
            Err(Problem::TooLong { max: 1024, .. })
        ));
    }

    #[test]
    fn urls() {
        for ok in [
            "http://origin.example/x",
            "https://origin.example:8443/a/b?c=d#e",
            "https://127.0.0.1",
            "http://[::1]:8080/blob",
        ] {
            assert_eq!(check_url(ok), Ok(()), "{ok}");
        }
        for bad in [
            "ftp://origin.example/x",
            "file:///etc/passwd",
            "HTTP://origin.example/",
            "https://",
            "https:///path",
            "https://a b",
            "https://host/a\tb",
            "https://host/\u{7f}",
            "origin.example/x",
        ] {
            assert_eq!(check_url(bad), Err(Problem::InvalidUrl), "{bad}");
        }
        for creds in [
            "https://user:pass@origin.example/x",
            "http://user@origin.example",
            "https://:secret@[::1]:8080/blob",
        ] {
            assert_eq!(check_url(creds), Err(Problem::UrlCredentials), "{creds}");
        }
        // An '@' after the authority is an ordinary path or query character.
        assert_eq!(check_url("https://origin.example/a@b?c=d@e"), Ok(()));
        let long = format!("https://h/{}", "a".repeat(URL_MAX_LEN));
        assert!(matches!(check_url(&long), Err(Problem::TooLong { .. })));
    }

    #[test]
    fn digests() {
        let hex = "0123456789abcdef".repeat(4);
        assert_eq!(check_digest(&format!("sha256:{hex}")), Ok(()));
        assert_eq!(check_digest(&format!("blake3:{hex}")), Ok(()));
        for bad in [
            format!("md5:{hex}"),
            format!("sha256:{}", hex.to_uppercase()),
            format!("sha256:{}", &hex[1..]),
            format!("sha256:{hex}0"),
            hex.clone(),
            "sha256:".to_owned(),
        ] {
            assert_eq!(check_digest(&bad), Err(Problem::DigestFormat), "{bad}");
        }
    }

    #[test]
    fn dns_subdomains() {
        for ok in ["node-1", "a", "gpu-7.pool.example", "0abc"] {
            assert_eq!(check_dns_subdomain(ok), Ok(()), "{ok}");
        }
        for bad in ["Node", "-a", "a-", "a..b", "a_b", ".a"] {
            assert_eq!(
                check_dns_subdomain(bad),
                Err(Problem::DnsSubdomain),
                "{bad}"
            );
        }
        assert_eq!(check_dns_subdomain(""), Err(Problem::Empty));
        assert!(matches!(
            check_dns_subdomain(&"a".repeat(254)),
            Err(Problem::TooLong { .. })
        ));
    }

    #[test]
    fn piece_sizes() {
        let mut size = PIECE_SIZE_MIN;
        while size <= PIECE_SIZE_MAX {
            assert_eq!(check_piece_size(size), Ok(()));
            assert!(PIECE_SIZE_POWER_OF_TWO_RULE.contains(&size.to_string()));
            size *= 2;
        }
        assert!(matches!(
            check_piece_size(0),
            Err(Problem::OutOfRange { value: 0, .. })
        ));
        assert!(matches!(
            check_piece_size(1 << 40),
            Err(Problem::OutOfRange { .. })
        ));
        assert_eq!(
            check_piece_size(3 * 1024 * 1024),
            Err(Problem::PieceSizeNotPowerOfTwo)
        );
    }

    #[test]
    fn errors_display_field_first() {
        let errors = ValidationErrors(vec![
            ValidationError::new("spec.target.path", Problem::AbsolutePath),
            ValidationError::new("spec.source", Problem::SourceCount),
        ]);
        let text = errors.to_string();
        assert!(
            text.starts_with("spec.target.path: must be relative"),
            "{text}"
        );
        assert!(text.contains("; spec.source: exactly one of"), "{text}");
        assert!(errors.names_field("spec.source"));
        assert!(!errors.names_field("spec"));
    }

    #[test]
    fn automatic_piece_sizes() {
        assert_eq!(auto_piece_size(0), AUTO_PIECE_SIZE_MIN);
        assert_eq!(auto_piece_size(64 << 20), 256 << 10);
        assert_eq!(auto_piece_size(1 << 30), 256 << 10);
        assert_eq!(auto_piece_size((1 << 30) + 1), 512 << 10);
        assert_eq!(auto_piece_size(4 << 30), 1 << 20);
        assert_eq!(auto_piece_size(8 << 30), 2 << 20);
        assert_eq!(auto_piece_size(16 << 30), 4 << 20);
        assert_eq!(auto_piece_size(1 << 40), 4 << 20);
        // What NodeFills with `pieceSize: 0` and a size meant before.
        assert_eq!(legacy_auto_piece_size(32 << 20), 256 << 10);
        assert_eq!(legacy_auto_piece_size(256 << 20), 256 << 10);
        assert_eq!(legacy_auto_piece_size((256 << 20) + 1), 512 << 10);
        assert_eq!(legacy_auto_piece_size(1 << 30), 1 << 20);
        assert_eq!(legacy_auto_piece_size(4 << 30), 4 << 20);
        assert_eq!(legacy_auto_piece_size(1 << 40), 4 << 20);
        for size in [0, 1, 12345, 64 << 20, 3 << 30, 1 << 40] {
            assert_eq!(check_piece_size(auto_piece_size(size)), Ok(()));
            assert_eq!(check_piece_size(legacy_auto_piece_size(size)), Ok(()));
        }
    }
}
