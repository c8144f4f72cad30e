//! Decoding of the Kubernetes protobuf envelope for the few built-in kinds
//! kubectl's typed `create` generators send as protobuf (`kubectl create
//! namespace|secret|configmap|serviceaccount`). Field numbers follow
//! `k8s.io/api/core/v1/generated.proto`; fields not listed are skipped.

use base64::Engine;
use serde_json::{Map, Value, json};

use super::error::{ApiError, ApiResult};

const MAGIC: &[u8] = b"k8s\0";

#[derive(Clone, Copy)]
enum Ty {
    Str,
    Int,
    Bool,
    Msg(&'static [Field]),
    RepeatedStr,
    RepeatedMsg(&'static [Field]),
    MapStrStr,
    MapStrBytes,
}

type Field = (u64, &'static str, Ty);

const OWNER_REF: &[Field] = &[
    (1, "kind", Ty::Str),
    (3, "name", Ty::Str),
    (4, "uid", Ty::Str),
    (5, "apiVersion", Ty::Str),
    (6, "controller", Ty::Bool),
    (7, "blockOwnerDeletion", Ty::Bool),
];

const OBJECT_META: &[Field] = &[
    (1, "name", Ty::Str),
    (2, "generateName", Ty::Str),
    (3, "namespace", Ty::Str),
    (5, "uid", Ty::Str),
    (6, "resourceVersion", Ty::Str),
    (7, "generation", Ty::Int),
    (11, "labels", Ty::MapStrStr),
    (12, "annotations", Ty::MapStrStr),
    (13, "ownerReferences", Ty::RepeatedMsg(OWNER_REF)),
    (14, "finalizers", Ty::RepeatedStr),
];

const NAMESPACE_SPEC: &[Field] = &[(1, "finalizers", Ty::RepeatedStr)];

const NAMESPACE: &[Field] = &[
    (1, "metadata", Ty::Msg(OBJECT_META)),
    (2, "spec", Ty::Msg(NAMESPACE_SPEC)),
];

const CONFIG_MAP: &[Field] = &[
    (1, "metadata", Ty::Msg(OBJECT_META)),
    (2, "data", Ty::MapStrStr),
    (3, "binaryData", Ty::MapStrBytes),
    (4, "immutable", Ty::Bool),
];

const SECRET: &[Field] = &[
    (1, "metadata", Ty::Msg(OBJECT_META)),
    (2, "data", Ty::MapStrBytes),
    (3, "type", Ty::Str),
    (4, "stringData", Ty::MapStrStr),
    (5, "immutable", Ty::Bool),
];

const SERVICE_ACCOUNT: &[Field] = &[(1, "metadata", Ty::Msg(OBJECT_META))];

fn bad(what: &str) -> ApiError {
    ApiError::bad_request(format!(
        "the body of the request could not be decoded as protobuf: {what}"
    ))
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> ApiResult<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self
                .buf
                .get(self.pos)
                .ok_or_else(|| bad("truncated varint"))?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(bad("varint too long"))
    }

    fn bytes(&mut self) -> ApiResult<&'a [u8]> {
        let len = usize::try_from(self.varint()?).map_err(|_| bad("length"))?;
        let end = self
            .pos
            .checked_add(len)
            .filter(|e| *e <= self.buf.len())
            .ok_or_else(|| bad("truncated field"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn skip(&mut self, wire: u64) -> ApiResult<()> {
        match wire {
            0 => self.varint().map(|_| ()),
            1 => self.advance(8),
            2 => self.bytes().map(|_| ()),
            5 => self.advance(4),
            _ => Err(bad("unsupported wire type")),
        }
    }

    fn advance(&mut self, n: usize) -> ApiResult<()> {
        if self.pos + n > self.buf.len() {
            return Err(bad("truncated fixed field"));
        }
        self.pos += n;
        Ok(())
    }

    fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }
}

fn utf8(b: &[u8]) -> ApiResult<String> {
    String::from_utf8(b.to_vec()).map_err(|_| bad("invalid UTF-8"))
}

fn map_entry(b: &[u8], bytes_value: bool) -> ApiResult<(String, Value)> {
    let mut r = Reader { buf: b, pos: 0 };
    let (mut k, mut v) = (String::new(), Value::String(String::new()));
    while !r.done() {
        let tag = r.varint()?;
        match (tag >> 3, tag & 7) {
            (1, 2) => k = utf8(r.bytes()?)?,
            (2, 2) => {
                let raw = r.bytes()?;
                v = if bytes_value {
                    json!(base64::engine::general_purpose::STANDARD.encode(raw))
                } else {
                    json!(utf8(raw)?)
                };
            }
            (_, w) => r.skip(w)?,
        }
    }
    Ok((k, v))
}

fn decode(buf: &[u8], fields: &[Field]) -> ApiResult<Value> {
    let mut out = Map::new();
    let mut r = Reader { buf, pos: 0 };
    while !r.done() {
        let tag = r.varint()?;
        let (num, wire) = (tag >> 3, tag & 7);
        let Some((_, name, ty)) = fields.iter().find(|(n, _, _)| *n == num) else {
            r.skip(wire)?;
            continue;
        };
        let name = (*name).to_string();
        match (*ty, wire) {
            (Ty::Str, 2) => {
                // Go's JSON omits empty strings (omitempty); protobuf sends them.
                let v = utf8(r.bytes()?)?;
                if !v.is_empty() {
                    out.insert(name, json!(v));
                }
            }
            (Ty::Int, 0) => {
                let v = r.varint()? as i64;
                if v != 0 {
                    out.insert(name, json!(v));
                }
            }
            (Ty::Bool, 0) => {
                out.insert(name, json!(r.varint()? != 0));
            }
            (Ty::Msg(sub), 2) => {
                out.insert(name, decode(r.bytes()?, sub)?);
            }
            (Ty::RepeatedStr, 2) => {
                let s = utf8(r.bytes()?)?;
                if let Value::Array(a) = out.entry(name).or_insert_with(|| json!([])) {
                    a.push(json!(s));
                }
            }
            (Ty::RepeatedMsg(sub), 2) => {
                let v = decode(r.bytes()?, sub)?;
                if let Value::Array(a) = out.entry(name).or_insert_with(|| json!([])) {
                    a.push(v);
                }
            }
            (Ty::MapStrStr | Ty::MapStrBytes, 2) => {
                let (k, v) = map_entry(r.bytes()?, matches!(ty, Ty::MapStrBytes))?;
                if let Value::Object(m) = out.entry(name).or_insert_with(|| json!({})) {
                    m.insert(k, v);
                }
            }
            (_, w) => r.skip(w)?,
        }
    }
    Ok(Value::Object(out))
}

/// Decodes a `k8s\0`-prefixed protobuf body into the JSON form of the object.
pub fn decode_object(body: &[u8]) -> ApiResult<Value> {
    let rest = body
        .strip_prefix(MAGIC)
        .ok_or_else(|| bad("missing k8s envelope"))?;
    let mut r = Reader { buf: rest, pos: 0 };
    let (mut api_version, mut kind, mut raw) = (String::new(), String::new(), &[][..]);
    while !r.done() {
        let tag = r.varint()?;
        match (tag >> 3, tag & 7) {
            (1, 2) => {
                let tm = decode(
                    r.bytes()?,
                    &[(1, "apiVersion", Ty::Str), (2, "kind", Ty::Str)],
                )?;
                api_version = tm
                    .get("apiVersion")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                kind = tm
                    .get("kind")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
            }
            (2, 2) => raw = r.bytes()?,
            (_, w) => r.skip(w)?,
        }
    }
    let fields = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Namespace") => NAMESPACE,
        ("v1", "ConfigMap") => CONFIG_MAP,
        ("v1", "Secret") => SECRET,
        ("v1", "ServiceAccount") => SERVICE_ACCOUNT,
        _ => {
            let mut e = ApiError::bad_request(format!(
                "protobuf is not supported for {api_version}/{kind} by this server; send JSON"
            ));
            e.code = 415;
            e.reason = "UnsupportedMediaType";
            return Err(e);
        }
    };
    let mut obj = decode(raw, fields)?;
    obj["apiVersion"] = json!(api_version);
    obj["kind"] = json!(kind);
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(num: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![((num << 3) | 2) as u8, payload.len() as u8];
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn secret_envelope() -> ApiResult<()> {
        let meta = [
            field(1, b"s1"),
            field(11, &[field(1, b"a"), field(2, b"b")].concat()),
        ]
        .concat();
        let secret = [
            field(1, &meta),
            field(2, &[field(1, b"k"), field(2, b"abc")].concat()),
            field(3, b"Opaque"),
        ]
        .concat();
        let type_meta = [field(1, b"v1"), field(2, b"Secret")].concat();
        let body = [MAGIC.to_vec(), field(1, &type_meta), field(2, &secret)].concat();
        let v = decode_object(&body)?;
        assert_eq!(
            v,
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s1", "labels": {"a": "b"}}, "data": {"k": "YWJj"}, "type": "Opaque"})
        );
        Ok(())
    }
}
