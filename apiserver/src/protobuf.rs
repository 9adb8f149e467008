//! Just enough of the Kubernetes protobuf encoding to accept the one protobuf body `kubectl`
//! sends to the kinds served here: `kubectl create namespace` (typed clients send
//! `application/vnd.kubernetes.protobuf` bodies). The envelope is `k8s\0` + `runtime.Unknown`;
//! the payload is decoded into the same JSON the server stores. Responses are always JSON.

use serde_json::{Map, Value, json};

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("missing the k8s protobuf envelope")]
    NoEnvelope,
    #[error("truncated protobuf message")]
    Truncated,
    #[error("unsupported protobuf wire type {0}")]
    WireType(u64),
    #[error("invalid UTF-8 in a protobuf string")]
    Utf8,
    #[error("protobuf bodies are only supported for {0}")]
    Unsupported(String),
}

enum FieldValue<'a> {
    Varint,
    Bytes(&'a [u8]),
    Fixed,
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, ProtoError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = self.buf.split_first().ok_or(ProtoError::Truncated)?;
            self.buf = rest;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(ProtoError::Truncated)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.buf.len() < n {
            return Err(ProtoError::Truncated);
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }

    fn next(&mut self) -> Result<Option<(u64, FieldValue<'a>)>, ProtoError> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let v = match key & 7 {
            0 => {
                self.varint()?;
                FieldValue::Varint
            }
            1 => {
                self.take(8)?;
                FieldValue::Fixed
            }
            2 => {
                let n = usize::try_from(self.varint()?).map_err(|_| ProtoError::Truncated)?;
                FieldValue::Bytes(self.take(n)?)
            }
            5 => {
                self.take(4)?;
                FieldValue::Fixed
            }
            w => return Err(ProtoError::WireType(w)),
        };
        Ok(Some((key >> 3, v)))
    }
}

fn fields(buf: &[u8]) -> Result<Vec<(u64, FieldValue<'_>)>, ProtoError> {
    let mut r = Reader { buf };
    let mut out = Vec::new();
    while let Some(f) = r.next()? {
        out.push(f);
    }
    Ok(out)
}

fn string(b: &[u8]) -> Result<String, ProtoError> {
    String::from_utf8(b.to_vec()).map_err(|_| ProtoError::Utf8)
}

fn map_entry(b: &[u8]) -> Result<(String, String), ProtoError> {
    let (mut k, mut v) = (String::new(), String::new());
    for (n, f) in fields(b)? {
        if let FieldValue::Bytes(b) = f {
            match n {
                1 => k = string(b)?,
                2 => v = string(b)?,
                _ => {}
            }
        }
    }
    Ok((k, v))
}

/// `ObjectMeta` (the fields a client sets on create).
fn object_meta(b: &[u8]) -> Result<Value, ProtoError> {
    let mut m = Map::new();
    let mut labels = Map::new();
    let mut annotations = Map::new();
    let mut finalizers = Vec::new();
    for (n, f) in fields(b)? {
        match (n, f) {
            (1, FieldValue::Bytes(b)) => {
                m.insert("name".into(), json!(string(b)?));
            }
            (2, FieldValue::Bytes(b)) => {
                m.insert("generateName".into(), json!(string(b)?));
            }
            (3, FieldValue::Bytes(b)) => {
                m.insert("namespace".into(), json!(string(b)?));
            }
            (5, FieldValue::Bytes(b)) => {
                m.insert("uid".into(), json!(string(b)?));
            }
            (6, FieldValue::Bytes(b)) => {
                m.insert("resourceVersion".into(), json!(string(b)?));
            }
            (11, FieldValue::Bytes(b)) => {
                let (k, v) = map_entry(b)?;
                labels.insert(k, json!(v));
            }
            (12, FieldValue::Bytes(b)) => {
                let (k, v) = map_entry(b)?;
                annotations.insert(k, json!(v));
            }
            (14, FieldValue::Bytes(b)) => finalizers.push(json!(string(b)?)),
            _ => {}
        }
    }
    if !labels.is_empty() {
        m.insert("labels".into(), Value::Object(labels));
    }
    if !annotations.is_empty() {
        m.insert("annotations".into(), Value::Object(annotations));
    }
    if !finalizers.is_empty() {
        m.insert("finalizers".into(), Value::Array(finalizers));
    }
    Ok(Value::Object(m))
}

/// Decodes a protobuf-encoded `v1/Namespace` body into JSON.
pub fn decode_namespace(body: &[u8]) -> Result<Value, ProtoError> {
    let rest = body.strip_prefix(b"k8s\0").ok_or(ProtoError::NoEnvelope)?;
    let mut raw = None;
    let mut kind = String::new();
    for (n, f) in fields(rest)? {
        match (n, f) {
            (1, FieldValue::Bytes(tm)) => {
                for (n, f) in fields(tm)? {
                    if let (2, FieldValue::Bytes(k)) = (n, f) {
                        kind = string(k)?;
                    }
                }
            }
            (2, FieldValue::Bytes(r)) => raw = Some(r),
            _ => {}
        }
    }
    if !kind.is_empty() && kind != "Namespace" {
        return Err(ProtoError::Unsupported("v1/Namespace".into()));
    }
    let mut ns = Map::new();
    ns.insert("apiVersion".into(), json!("v1"));
    ns.insert("kind".into(), json!("Namespace"));
    for (n, f) in fields(raw.unwrap_or_default())? {
        match (n, f) {
            (1, FieldValue::Bytes(b)) => {
                ns.insert("metadata".into(), object_meta(b)?);
            }
            (2, FieldValue::Bytes(b)) => {
                let fins: Result<Vec<Value>, ProtoError> = fields(b)?
                    .into_iter()
                    .filter_map(|(n, f)| match (n, f) {
                        (1, FieldValue::Bytes(s)) => Some(string(s).map(Value::String)),
                        _ => None,
                    })
                    .collect();
                ns.insert("spec".into(), json!({"finalizers": fins?}));
            }
            _ => {}
        }
    }
    Ok(Value::Object(ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ld(field: u8, b: &[u8]) -> Vec<u8> {
        let mut v = vec![(field << 3) | 2, b.len() as u8];
        v.extend_from_slice(b);
        v
    }

    #[test]
    fn namespace_from_kubectl_create() {
        let mut label = ld(1, b"team");
        label.extend(ld(2, b"a"));
        let mut meta = ld(1, b"foo");
        meta.extend(ld(11, &label));
        let ns = ld(1, &meta);
        let mut tm = ld(1, b"v1");
        tm.extend(ld(2, b"Namespace"));
        let mut body = b"k8s\0".to_vec();
        body.extend(ld(1, &tm));
        body.extend(ld(2, &ns));
        body.extend(ld(4, b"application/vnd.kubernetes.protobuf"));
        let v = decode_namespace(&body).unwrap();
        assert_eq!(
            v,
            json!({"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": "foo", "labels": {"team": "a"}}})
        );
        assert!(decode_namespace(b"nope").is_err());
        assert!(decode_namespace(b"k8s\0\x12\x05ab").is_err());
    }
}
