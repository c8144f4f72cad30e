//! Kubernetes' CEL URL library: `isURL(s)`, `url(s)` and the accessors
//! `getScheme()`, `getHost()`, `getHostname()`, `getPort()`,
//! `getEscapedPath()` and `getQuery()`. Parsing follows Go's
//! `url.ParseRequestURI`, which the library uses: an absolute URI with a
//! scheme, or an absolute path.

use std::collections::HashMap;
use std::fmt::{Debug, Formatter};
use std::sync::Arc;

use cel::common::types::{self, CelString, Type};
use cel::common::value::{CowVal, Val};
use cel::objects::{Key, Map, Opaque};
use cel::{DeclarationError, Env, ExecutionError, Value};

const TYPE_NAME: &str = "kubernetes.URL";

/// A parsed URL, a CEL opaque value.
#[derive(Clone, PartialEq, Eq)]
pub(super) struct Url {
    scheme: String,
    host: String,
    path: String,
    raw_query: Option<String>,
}

impl Debug for Url {
    fn fmt(&self, f: &mut Formatter<'_>) -> std::fmt::Result {
        write!(f, "url({}://{}{})", self.scheme, self.host, self.path)
    }
}

impl Opaque for Url {
    fn runtime_type_name(&self) -> &str {
        TYPE_NAME
    }
}

impl Url {
    fn hostname(&self) -> &str {
        if let Some(rest) = self.host.strip_prefix('[') {
            return rest.split(']').next().unwrap_or("");
        }
        self.host
            .rsplit_once(':')
            .map_or(self.host.as_str(), |(h, _)| h)
    }

    fn port(&self) -> &str {
        let after_bracket = match self.host.rfind(']') {
            Some(i) => &self.host[i + 1..],
            None => self.host.as_str(),
        };
        after_bracket.rsplit_once(':').map_or("", |(_, p)| p)
    }
}

/// `url.ParseRequestURI`, to the extent the accessors need.
pub(super) fn parse_request_uri(s: &str) -> Result<Url, String> {
    if s.is_empty() {
        return Err("empty url".into());
    }
    if s.chars().any(|c| c.is_ascii_control()) {
        return Err("net/url: invalid control character in URL".into());
    }
    let (rest, raw_query) = match s.split_once('?') {
        Some((r, q)) => (r, Some(q.to_string())),
        None => (s, None),
    };
    if rest.starts_with('/') {
        return Ok(Url {
            scheme: String::new(),
            host: String::new(),
            path: rest.to_string(),
            raw_query,
        });
    }
    let (scheme, after) = rest
        .split_once(':')
        .ok_or_else(|| format!("parse {s:?}: invalid URI for request"))?;
    let scheme_ok = scheme
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !scheme_ok {
        return Err(format!(
            "parse {s:?}: first path segment in URL cannot contain colon"
        ));
    }
    let (host, path) = match after.strip_prefix("//") {
        Some(authority_and_path) => {
            let end = authority_and_path
                .find('/')
                .unwrap_or(authority_and_path.len());
            let authority = &authority_and_path[..end];
            // Drop userinfo, as Go keeps it apart from the host.
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            if host.contains(' ') {
                return Err(format!("parse {s:?}: invalid character \" \" in host name"));
            }
            (host.to_string(), authority_and_path[end..].to_string())
        }
        None if after.is_empty() => return Err(format!("parse {s:?}: invalid URI for request")),
        // An opaque URI (`mailto:x`): no host, no path.
        None => (String::new(), String::new()),
    };
    Ok(Url {
        scheme: scheme.to_string(),
        host,
        path,
        raw_query,
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn string_arg<'a>(
    args: &'a [CowVal<'_, '_>],
    i: usize,
    function: &str,
) -> Result<&'a str, ExecutionError> {
    args.get(i)
        .and_then(|a| a.downcast_ref::<CelString>())
        .map(CelString::inner)
        .ok_or_else(|| ExecutionError::function_error(function, "expected a string argument"))
}

fn url_receiver(args: &[CowVal<'_, '_>], function: &str) -> Result<Url, ExecutionError> {
    let receiver = args
        .first()
        .ok_or_else(|| ExecutionError::invalid_argument_count(1, args.len()))?;
    match Value::try_from(receiver.as_ref())? {
        Value::Opaque(o) => o
            .downcast_ref::<Url>()
            .cloned()
            .ok_or_else(|| ExecutionError::function_error(function, "receiver is not a URL")),
        _ => Err(ExecutionError::function_error(
            function,
            "receiver is not a URL",
        )),
    }
}

fn owned<'b, 'v>(v: Value) -> Result<CowVal<'b, 'v>, ExecutionError> {
    let boxed: Box<dyn Val> = v.try_into()?;
    Ok(CowVal::Owned(boxed))
}

fn string_value<'b, 'v>(s: &str) -> Result<CowVal<'b, 'v>, ExecutionError> {
    owned(Value::String(Arc::new(s.to_string())))
}

fn url_type() -> Type {
    Type::new_opaque_type(TYPE_NAME)
}

pub(super) fn register(env: &mut Env) -> Result<(), DeclarationError> {
    env.add_type(url_type())?;
    env.add_overload("isURL", "isURL_string", vec![types::STRING_TYPE], |args| {
        let ok = string_arg(&args, 0, "isURL").map(|s| parse_request_uri(s).is_ok())?;
        owned(Value::Bool(ok))
    })?;
    env.add_overload("url", "string_to_url", vec![types::STRING_TYPE], |args| {
        let s = string_arg(&args, 0, "url")?;
        let url = parse_request_uri(s).map_err(|e| {
            ExecutionError::function_error(
                "url",
                format!("URL parse error during conversion from string: {e}"),
            )
        })?;
        owned(Value::Opaque(Arc::new(url)))
    })?;
    env.add_member_overload("getScheme", "url_get_scheme", url_type(), vec![], |args| {
        string_value(&url_receiver(&args, "getScheme")?.scheme)
    })?;
    env.add_member_overload("getHost", "url_get_host", url_type(), vec![], |args| {
        string_value(&url_receiver(&args, "getHost")?.host)
    })?;
    env.add_member_overload(
        "getHostname",
        "url_get_hostname",
        url_type(),
        vec![],
        |args| string_value(url_receiver(&args, "getHostname")?.hostname()),
    )?;
    env.add_member_overload("getPort", "url_get_port", url_type(), vec![], |args| {
        string_value(url_receiver(&args, "getPort")?.port())
    })?;
    env.add_member_overload(
        "getEscapedPath",
        "url_get_escaped_path",
        url_type(),
        vec![],
        |args| string_value(&url_receiver(&args, "getEscapedPath")?.path),
    )?;
    env.add_member_overload("getQuery", "url_get_query", url_type(), vec![], |args| {
        let url = url_receiver(&args, "getQuery")?;
        let mut query: HashMap<String, Vec<Value>> = HashMap::new();
        for pair in url
            .raw_query
            .as_deref()
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty())
        {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            query
                .entry(percent_decode(k))
                .or_default()
                .push(Value::String(Arc::new(percent_decode(v))));
        }
        let map: HashMap<Key, Value> = query
            .into_iter()
            .map(|(k, v)| (Key::String(Arc::new(k)), Value::List(Arc::new(v))))
            .collect();
        owned(Value::Map(Map { map: Arc::new(map) }))
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_request_uri;

    #[test]
    fn parses_like_parse_request_uri() {
        let u = parse_request_uri("https://user@origin.example:8443/a/b%20c?x=1&y=2&x=3")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(u.scheme, "https");
        assert_eq!(u.host, "origin.example:8443");
        assert_eq!(u.hostname(), "origin.example");
        assert_eq!(u.port(), "8443");
        assert_eq!(u.path, "/a/b%20c");
        let v6 = parse_request_uri("http://[::1]:80/").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((v6.hostname(), v6.port()), ("::1", "80"));
        let path_only = parse_request_uri("/just/a/path").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (path_only.scheme.as_str(), path_only.path.as_str()),
            ("", "/just/a/path")
        );
        for bad in [
            "",
            "relative/path",
            "1http://x",
            "http://bad host/",
            "http:",
            "a\u{7}b",
        ] {
            assert!(parse_request_uri(bad).is_err(), "{bad:?}");
        }
    }
}
