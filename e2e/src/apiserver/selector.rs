//! Label selectors (equality- and set-based) and field selectors.

use serde_json::Value;

use super::error::{ApiError, ApiResult};

#[derive(Debug, Clone, PartialEq)]
enum Req {
    Exists(String),
    NotExists(String),
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Gt(String, i64),
    Lt(String, i64),
}

/// A parsed `labelSelector`; an empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LabelSelector {
    reqs: Vec<Req>,
}

fn split_top_level(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn bad(sel: &str, why: &str) -> ApiError {
    ApiError::bad_request(format!(
        "unable to parse requirement: {why} (selector {sel:?})"
    ))
}

fn check_key(sel: &str, key: &str) -> ApiResult<String> {
    if super::meta::is_qualified_name(key) {
        Ok(key.to_string())
    } else {
        Err(bad(sel, &format!("invalid label key {key:?}")))
    }
}

fn check_value(sel: &str, v: &str) -> ApiResult<String> {
    if super::meta::is_label_value(v) {
        Ok(v.to_string())
    } else {
        Err(bad(sel, &format!("invalid label value: {v:?}")))
    }
}

/// The value of a `Gt`/`Lt` requirement.
fn check_int(sel: &str, v: &str) -> ApiResult<i64> {
    v.parse().map_err(|_| {
        bad(
            sel,
            "for 'Gt', 'Lt' operators, the value must be an integer",
        )
    })
}

impl LabelSelector {
    pub fn parse(sel: &str) -> ApiResult<Self> {
        let mut reqs = Vec::new();
        if sel.trim().is_empty() {
            return Ok(Self { reqs });
        }
        for term in split_top_level(sel) {
            let t = term.trim();
            if t.is_empty() {
                return Err(bad(sel, "found '', expected: identifier"));
            }
            if let Some(open) = t.find('(') {
                let close = t
                    .rfind(')')
                    .ok_or_else(|| bad(sel, "found '', expected: ')'"))?;
                let head: Vec<&str> = t[..open].split_whitespace().collect();
                let values = t[open + 1..close]
                    .split(',')
                    .map(str::trim)
                    .filter(|v| !v.is_empty())
                    .map(|v| check_value(sel, v))
                    .collect::<ApiResult<Vec<_>>>()?;
                match head.as_slice() {
                    [k, "in"] => reqs.push(Req::In(check_key(sel, k)?, values)),
                    [k, "notin"] => reqs.push(Req::NotIn(check_key(sel, k)?, values)),
                    _ => return Err(bad(sel, "expected 'in' or 'notin'")),
                }
            } else if let Some(k) = t.strip_prefix('!') {
                reqs.push(Req::NotExists(check_key(sel, k.trim())?));
            } else if let Some((k, v)) = t.split_once("!=") {
                reqs.push(Req::Ne(
                    check_key(sel, k.trim())?,
                    check_value(sel, v.trim())?,
                ));
            } else if let Some((k, v)) = t.split_once("==") {
                reqs.push(Req::Eq(
                    check_key(sel, k.trim())?,
                    check_value(sel, v.trim())?,
                ));
            } else if let Some((k, v)) = t.split_once('=') {
                reqs.push(Req::Eq(
                    check_key(sel, k.trim())?,
                    check_value(sel, v.trim())?,
                ));
            } else if let Some((k, v)) = t.split_once('>') {
                let n = check_int(sel, v.trim())?;
                reqs.push(Req::Gt(check_key(sel, k.trim())?, n));
            } else if let Some((k, v)) = t.split_once('<') {
                let n = check_int(sel, v.trim())?;
                reqs.push(Req::Lt(check_key(sel, k.trim())?, n));
            } else {
                reqs.push(Req::Exists(check_key(sel, t)?));
            }
        }
        Ok(Self { reqs })
    }

    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.reqs.iter().all(|r| match r {
            Req::Exists(k) => get(k).is_some(),
            Req::NotExists(k) => get(k).is_none(),
            Req::Eq(k, v) => get(k) == Some(v.as_str()),
            Req::Ne(k, v) => get(k) != Some(v.as_str()),
            Req::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Req::NotIn(k, vs) => get(k).is_none_or(|x| vs.iter().all(|v| v != x)),
            Req::Gt(k, n) => get(k)
                .and_then(|x| x.parse::<i64>().ok())
                .is_some_and(|x| x > *n),
            Req::Lt(k, n) => get(k)
                .and_then(|x| x.parse::<i64>().ok())
                .is_some_and(|x| x < *n),
        })
    }
}

/// A parsed `fieldSelector` (`=`, `==`, `!=` on a supported field).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FieldSelector {
    reqs: Vec<(String, bool, String)>,
}

impl FieldSelector {
    /// `supported` lists the fields this resource accepts besides
    /// `metadata.name` and `metadata.namespace`.
    pub fn parse(sel: &str, supported: &[&str]) -> ApiResult<Self> {
        let mut reqs = Vec::new();
        if sel.trim().is_empty() {
            return Ok(Self { reqs });
        }
        for term in sel.split(',') {
            let t = term.trim();
            let (k, eq, v) = if let Some((k, v)) = t.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = t.split_once("==") {
                (k, true, v)
            } else if let Some((k, v)) = t.split_once('=') {
                (k, true, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid selector: '{sel}'; can't understand '{t}'"
                )));
            };
            let k = k.trim();
            if k != "metadata.name" && k != "metadata.namespace" && !supported.contains(&k) {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {k}"
                )));
            }
            reqs.push((k.to_string(), eq, v.trim().to_string()));
        }
        Ok(Self { reqs })
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.reqs.iter().all(|(k, eq, v)| {
            let mut cur = Some(obj);
            for part in k.split('.') {
                cur = cur.and_then(|c| c.get(part));
            }
            let actual = match cur {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Bool(b)) => b.to_string(),
                Some(Value::Number(n)) => n.to_string(),
                _ => String::new(),
            };
            (actual == *v) == *eq
        })
    }

    /// The name an equality requirement on `metadata.name` pins, if any:
    /// such a watch sees one object's events only.
    pub fn pinned_name(&self) -> Option<&str> {
        self.reqs
            .iter()
            .find(|(k, eq, _)| k == "metadata.name" && *eq)
            .map(|(_, _, v)| v.as_str())
    }

    pub fn push_name(&mut self, name: &str) {
        self.reqs
            .push(("metadata.name".into(), true, name.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(labels: Value) -> Value {
        json!({"metadata": {"name": "n1", "namespace": "ns", "labels": labels}, "spec": {"nodeName": "a"}})
    }

    #[test]
    fn equality_and_sets() {
        let o = obj(json!({"app": "web", "tier": "fe", "n": "5"}));
        let m = |s: &str| LabelSelector::parse(s).map(|x| x.matches(&o));
        assert_eq!(m("app=web").ok(), Some(true));
        assert_eq!(m("app==web,tier!=be").ok(), Some(true));
        assert_eq!(m("app in (web, api),tier notin (be)").ok(), Some(true));
        assert_eq!(m("app notin (web)").ok(), Some(false));
        assert_eq!(m("tier,!missing").ok(), Some(true));
        assert_eq!(m("!app").ok(), Some(false));
        assert_eq!(m("n>4,n<6").ok(), Some(true));
        assert_eq!(m("missing notin (x)").ok(), Some(true));
        assert!(LabelSelector::parse("app in (web").is_err());
        assert!(LabelSelector::parse("-bad=x").is_err());
    }

    #[test]
    fn fields() {
        let o = obj(json!({}));
        let f = FieldSelector::parse("metadata.name=n1,metadata.namespace!=other", &[]);
        assert!(f.as_ref().is_ok_and(|f| f.matches(&o)));
        let f = FieldSelector::parse("spec.nodeName=a", &["spec.nodeName"]);
        assert!(f.is_ok_and(|f| f.matches(&o)));
        assert!(FieldSelector::parse("spec.foo=a", &[]).is_err());
    }
}
