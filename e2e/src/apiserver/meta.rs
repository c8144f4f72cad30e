//! Object metadata helpers: name/label syntax checks as the real server
//! applies them, uids, timestamps and the human-readable ages kubectl shows.

use chrono::{DateTime, SecondsFormat, Utc};
use rand::Rng;
use serde_json::Value;

use super::error::FieldCause;

const DNS1123_LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const DNS1123_SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";

/// The string at JSON pointer `ptr`; empty when there is none.
pub fn str_at<'a>(v: &'a Value, ptr: &str) -> &'a str {
    v.pointer(ptr).and_then(Value::as_str).unwrap_or("")
}

/// The strings of the array at JSON pointer `ptr` (others skipped); empty
/// when there is none.
pub fn strings_at(v: &Value, ptr: &str) -> Vec<String> {
    v.pointer(ptr)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

pub fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

pub fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

/// Name checks: namespaces (and a few others) need a DNS-1123 label, the
/// rest a DNS-1123 subdomain.
pub fn validate_name(name: &str, label_only: bool) -> Option<FieldCause> {
    if label_only {
        if !is_dns1123_label(name) {
            return Some(FieldCause::invalid(
                "metadata.name",
                name,
                DNS1123_LABEL_MSG,
            ));
        }
    } else if !is_dns1123_subdomain(name) {
        return Some(FieldCause::invalid(
            "metadata.name",
            name,
            DNS1123_SUBDOMAIN_MSG,
        ));
    }
    None
}

fn is_qualified_name_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && s.as_bytes()
            .first()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && s.as_bytes()
            .last()
            .is_some_and(|b| b.is_ascii_alphanumeric())
}

/// `[prefix/]name` as used by label and annotation keys.
pub fn is_qualified_name(key: &str) -> bool {
    match key.split_once('/') {
        Some((prefix, name)) => is_dns1123_subdomain(prefix) && is_qualified_name_part(name),
        None => is_qualified_name_part(key),
    }
}

pub fn is_label_value(v: &str) -> bool {
    v.is_empty() || is_qualified_name_part(v)
}

/// Label and annotation syntax, reported under the real server's field paths.
pub fn validate_labels_annotations(meta: &Value) -> Vec<FieldCause> {
    let mut causes = Vec::new();
    if let Some(labels) = meta.get("labels").and_then(Value::as_object) {
        for (k, v) in labels {
            if !is_qualified_name(k) {
                causes.push(FieldCause::invalid(
                    "metadata.labels",
                    k,
                    "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
                ));
            }
            match v.as_str() {
                Some(s) if is_label_value(s) => {}
                Some(s) => causes.push(FieldCause::invalid(
                    "metadata.labels",
                    s,
                    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
                )),
                None => causes.push(FieldCause::invalid(
                    "metadata.labels",
                    &v.to_string(),
                    "label values must be strings",
                )),
            }
        }
    }
    if let Some(ann) = meta.get("annotations").and_then(Value::as_object) {
        let mut total = 0usize;
        for (k, v) in ann {
            if !is_qualified_name(k) {
                causes.push(FieldCause::invalid(
                    "metadata.annotations",
                    k,
                    "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
                ));
            }
            total += k.len() + v.as_str().map_or(0, str::len);
        }
        if total > 256 * 1024 {
            causes.push(FieldCause {
                field: "metadata.annotations".into(),
                reason: "FieldValueTooLong",
                message: format!("Too long: may not be more than 262144 bytes (got {total})"),
            });
        }
    }
    causes
}

/// Finalizer and ownerReference checks, as the real server's
/// ValidateObjectMeta performs them.
pub fn validate_finalizers_owners(meta: &Value) -> Vec<FieldCause> {
    let mut causes = Vec::new();
    if let Some(fins) = meta.get("finalizers").and_then(Value::as_array) {
        for (i, f) in fins.iter().enumerate() {
            let field = format!("metadata.finalizers[{i}]");
            match f.as_str() {
                Some(s) if is_qualified_name(s) => {}
                Some(s) => causes.push(FieldCause::invalid(
                    &field,
                    s,
                    "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
                )),
                None => causes.push(FieldCause::invalid(&field, &f.to_string(), "must be a string")),
            }
        }
    }
    if let Some(refs) = meta.get("ownerReferences").and_then(Value::as_array) {
        let mut controllers = 0;
        for r in refs {
            for (key, what) in [
                ("apiVersion", "version must not be empty"),
                ("kind", "kind must not be empty"),
                ("name", "name must not be empty"),
                ("uid", "uid must not be empty"),
            ] {
                if r.get(key).and_then(Value::as_str).is_none_or(str::is_empty) {
                    causes.push(FieldCause::invalid(
                        &format!("metadata.ownerReferences.{key}"),
                        "",
                        what,
                    ));
                }
            }
            if r.get("controller").and_then(Value::as_bool) == Some(true) {
                controllers += 1;
            }
        }
        if controllers > 1 {
            causes.push(FieldCause::invalid(
                "metadata.ownerReferences",
                "",
                "Only one reference can have Controller set to true",
            ));
        }
    }
    causes
}

/// A random RFC 4122 version-4 uid.
pub fn new_uid() -> String {
    let mut b: [u8; 16] = rand::rng().random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        b[0],
        b[1],
        b[2],
        b[3],
        b[4],
        b[5],
        b[6],
        b[7],
        b[8],
        b[9],
        b[10],
        b[11],
        b[12],
        b[13],
        b[14],
        b[15]
    )
}

/// Five characters from the alphabet the real server uses for `generateName`.
pub fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..5)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

/// RFC 3339 with second precision, as `metav1.Time` serialises.
pub fn now_rfc3339() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Age as kubectl renders it (`k8s.io/apimachinery/pkg/util/duration.HumanDuration`).
pub fn human_duration(seconds: i64) -> String {
    if seconds < -1 {
        return "<invalid>".into();
    }
    if seconds < 0 {
        return "0s".into();
    }
    let s = seconds;
    if s < 120 {
        return format!("{s}s");
    }
    let minutes = s / 60;
    if minutes < 10 {
        let rem = s % 60;
        return if rem == 0 {
            format!("{minutes}m")
        } else {
            format!("{minutes}m{rem}s")
        };
    }
    if minutes < 180 {
        return format!("{minutes}m");
    }
    let hours = s / 3600;
    if hours < 8 {
        let m = minutes % 60;
        return if m == 0 {
            format!("{hours}h")
        } else {
            format!("{hours}h{m}m")
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    if hours < 192 {
        let h = hours % 24;
        let d = hours / 24;
        return if h == 0 {
            format!("{d}d")
        } else {
            format!("{d}d{h}h")
        };
    }
    if hours < 24 * 365 * 2 {
        return format!("{}d", hours / 24);
    }
    if hours < 24 * 365 * 8 {
        let d = (hours / 24) % 365;
        let y = hours / 24 / 365;
        return if d == 0 {
            format!("{y}y")
        } else {
            format!("{y}y{d}d")
        };
    }
    format!("{}y", hours / 24 / 365)
}

/// Age of an RFC 3339 timestamp, or `<unknown>` like kubectl.
pub fn age_of(ts: &str) -> String {
    match DateTime::parse_from_rfc3339(ts) {
        Ok(t) => human_duration((Utc::now() - t.with_timezone(&Utc)).num_seconds()),
        Err(_) => "<invalid>".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(is_dns1123_subdomain("a.b-c.d1"));
        assert!(!is_dns1123_subdomain("A"));
        assert!(!is_dns1123_subdomain("a..b"));
        assert!(!is_dns1123_label("a.b"));
        assert!(is_qualified_name("peerfill.dev/holds"));
        assert!(!is_qualified_name("-x"));
        assert!(is_label_value(""));
        assert!(!is_label_value("a b"));
    }

    #[test]
    fn finalizers_and_owner_references() {
        use serde_json::json;
        let ok = json!({"finalizers": ["peerfill.dev/cleanup"], "ownerReferences": [
            {"apiVersion": "v1", "kind": "Node", "name": "n", "uid": "u", "controller": true}]});
        assert!(validate_finalizers_owners(&ok).is_empty());
        let bad = json!({"finalizers": ["not valid"], "ownerReferences": [
            {"apiVersion": "v1", "kind": "Node", "name": "n", "controller": true},
            {"apiVersion": "v1", "kind": "Node", "name": "m", "uid": "x", "controller": true}]});
        let fields: Vec<String> = validate_finalizers_owners(&bad)
            .into_iter()
            .map(|c| c.field)
            .collect();
        assert_eq!(
            fields,
            [
                "metadata.finalizers[0]",
                "metadata.ownerReferences.uid",
                "metadata.ownerReferences"
            ]
        );
    }

    #[test]
    fn durations() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(125), "2m5s");
        assert_eq!(human_duration(600), "10m");
        assert_eq!(human_duration(3 * 3600 + 60), "3h1m");
        assert_eq!(human_duration(50 * 3600), "2d2h");
    }

    #[test]
    fn uid_shape() {
        let u = new_uid();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert_eq!(random_suffix().len(), 5);
    }
}
