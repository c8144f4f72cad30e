//! String formats the real server checks (go-openapi's `strfmt.Default`
//! registry, restricted to those a CRD may use). Unknown formats pass, as they
//! do on the server; `int32`/`int64`/`float`/`double` constrain nothing there.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::LazyLock;

use base64::Engine as _;
use regex::Regex;

fn re(pattern: &str) -> Regex {
    // Only ever called with the constant patterns below.
    Regex::new(pattern).unwrap_or_else(|e| panic!("constant format regex {pattern:?}: {e}"))
}

static HOSTNAME: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"^[a-zA-Z0-9\p{L}]([a-zA-Z0-9\p{L}_-]{0,62})?(\.[a-zA-Z0-9\p{L}_]([a-zA-Z0-9\p{L}_-]{0,62})?)*\.?$",
    )
});
static UUID: LazyLock<Regex> =
    LazyLock::new(|| re(r"(?i)^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$"));
static UUID3: LazyLock<Regex> = LazyLock::new(|| {
    re(r"(?i)^[0-9a-f]{8}-?[0-9a-f]{4}-?3[0-9a-f]{3}-?[0-9a-f]{4}-?[0-9a-f]{12}$")
});
static UUID4: LazyLock<Regex> = LazyLock::new(|| {
    re(r"(?i)^[0-9a-f]{8}-?[0-9a-f]{4}-?4[0-9a-f]{3}-?[89ab][0-9a-f]{3}-?[0-9a-f]{12}$")
});
static UUID5: LazyLock<Regex> = LazyLock::new(|| {
    re(r"(?i)^[0-9a-f]{8}-?[0-9a-f]{4}-?5[0-9a-f]{3}-?[89ab][0-9a-f]{3}-?[0-9a-f]{12}$")
});
static MAC: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"^([0-9A-Fa-f]{2}[:-]){5}([0-9A-Fa-f]{2})$|^([0-9A-Fa-f]{2}[:-]){7}([0-9A-Fa-f]{2})$|^([0-9A-Fa-f]{4}\.){2}[0-9A-Fa-f]{4}$",
    )
});
static DURATION: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"^([-+]?([0-9]*(\.[0-9]*)?)\s*(ns|us|µs|ms|s|m|h|d|w|sec|secs|second|seconds|min|mins|minute|minutes|hr|hrs|hour|hours|day|days|wk|wks|week|weeks)\s*)+$",
    )
});
static HEXCOLOR: LazyLock<Regex> = LazyLock::new(|| re(r"^#?([0-9a-fA-F]{3}|[0-9a-fA-F]{6})$"));
static EMAIL: LazyLock<Regex> = LazyLock::new(|| re(r"^[^@\s<>]+@[^@\s<>]+$"));
static URI_SCHEME: LazyLock<Regex> = LazyLock::new(|| re(r"^[a-zA-Z][a-zA-Z0-9+.-]*:"));

/// Whether `s` is a valid instance of `format`.
pub(super) fn is_valid(format: &str, s: &str) -> bool {
    match format {
        "date-time" | "datetime" => is_date_time(s),
        "date" => chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").is_ok(),
        "byte" => base64::engine::general_purpose::STANDARD.decode(s).is_ok(),
        "uri" => is_uri(s),
        "email" => EMAIL.is_match(s),
        "hostname" => s.len() <= 255 && HOSTNAME.is_match(s),
        "ipv4" => s.parse::<Ipv4Addr>().is_ok(),
        "ipv6" => s.parse::<Ipv6Addr>().is_ok(),
        "cidr" => is_cidr(s),
        "mac" => MAC.is_match(s),
        "uuid" => UUID.is_match(s),
        "uuid3" => UUID3.is_match(s),
        "uuid4" => UUID4.is_match(s),
        "uuid5" => UUID5.is_match(s),
        "duration" => DURATION.is_match(s) && s.chars().any(|c| c.is_ascii_digit()),
        "hexcolor" => HEXCOLOR.is_match(s),
        _ => true,
    }
}

fn is_date_time(s: &str) -> bool {
    if chrono::DateTime::parse_from_rfc3339(s).is_ok() {
        return true;
    }
    // strfmt also takes a few RFC 3339 variants without a zone or with a
    // space instead of the `T`.
    ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
        .iter()
        .any(|layout| chrono::NaiveDateTime::parse_from_str(s, layout).is_ok())
}

/// Go's `url.Parse` is very permissive: it refuses control characters, spaces
/// in the host, and a missing scheme before a colon in the first segment.
fn is_uri(s: &str) -> bool {
    if s.chars().any(|c| c.is_control()) {
        return false;
    }
    if URI_SCHEME.is_match(s) {
        let rest = s.split_once(':').map(|(_, r)| r).unwrap_or("");
        if let Some(authority) = rest.strip_prefix("//") {
            let host = authority.split(['/', '?', '#']).next().unwrap_or("");
            return !host.contains(' ');
        }
        return true;
    }
    // A relative reference must not have a colon before the first slash.
    let first = s.split('/').next().unwrap_or("");
    !first.contains(':')
}

fn is_cidr(s: &str) -> bool {
    let Some((ip, bits)) = s.split_once('/') else {
        return false;
    };
    let Ok(bits) = bits.parse::<u8>() else {
        return false;
    };
    match ip.parse::<IpAddr>() {
        Ok(IpAddr::V4(_)) => bits <= 32,
        Ok(IpAddr::V6(_)) => bits <= 128,
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::is_valid;

    #[test]
    fn formats_accept_and_reject_like_strfmt() {
        let cases: &[(&str, &str, bool)] = &[
            ("date-time", "2024-01-02T03:04:05Z", true),
            ("date-time", "2024-01-02T03:04:05.123+02:00", true),
            ("date-time", "yesterday", false),
            ("date", "2024-02-29", true),
            ("date", "2023-02-29", false),
            ("byte", "aGVsbG8=", true),
            ("byte", "not base64!", false),
            ("uri", "https://example.com/a?b=c", true),
            ("uri", "/relative/path", true),
            ("uri", "bad\u{1}uri", false),
            ("uuid", "123e4567-e89b-12d3-a456-426614174000", true),
            ("uuid", "123e4567", false),
            ("ipv4", "127.0.0.1", true),
            ("ipv4", "300.0.0.1", false),
            ("ipv6", "::1", true),
            ("cidr", "127.0.0.0/8", true),
            ("cidr", "127.0.0.0/33", false),
            ("hostname", "node-1.example", true),
            ("hostname", "-bad", false),
            ("duration", "1h30m", true),
            ("duration", "soon", false),
            ("int32", "anything", true),
            ("no-such-format", "anything", true),
        ];
        for (format, value, want) in cases {
            assert_eq!(is_valid(format, value), *want, "{format} {value:?}");
        }
    }
}
