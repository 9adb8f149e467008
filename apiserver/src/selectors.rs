//! Label selectors (`k8s.io/apimachinery/pkg/labels` grammar: `=`, `==`, `!=`, `in`, `notin`,
//! `key`, `!key`, `>`, `<`) and field selectors (`=`, `==`, `!=` on the fields a kind supports).

use serde_json::Value;

use crate::errors::ApiError;
use crate::meta;
use crate::resources::{Builtin, ResourceInfo};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Exists,
    DoesNotExist,
    Equals,
    NotEquals,
    In,
    NotIn,
    Gt,
    Lt,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Requirement {
    key: String,
    op: Op,
    values: Vec<String>,
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector {
    reqs: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Ident(String),
    Not,
    Eq,
    DoubleEq,
    NotEq,
    Open,
    Close,
    Comma,
    Gt,
    Lt,
    In,
    NotIn,
}

fn lex(s: &str) -> Result<Vec<Tok>, String> {
    let mut toks = Vec::new();
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            ' ' | '\t' | '\n' | '\r' => i += 1,
            '(' => {
                toks.push(Tok::Open);
                i += 1
            }
            ')' => {
                toks.push(Tok::Close);
                i += 1
            }
            ',' => {
                toks.push(Tok::Comma);
                i += 1
            }
            '>' => {
                toks.push(Tok::Gt);
                i += 1
            }
            '<' => {
                toks.push(Tok::Lt);
                i += 1
            }
            '=' => {
                if chars.get(i + 1) == Some(&'=') {
                    toks.push(Tok::DoubleEq);
                    i += 2;
                } else {
                    toks.push(Tok::Eq);
                    i += 1;
                }
            }
            '!' => {
                if chars.get(i + 1) == Some(&'=') {
                    toks.push(Tok::NotEq);
                    i += 2;
                } else {
                    toks.push(Tok::Not);
                    i += 1;
                }
            }
            _ => {
                let start = i;
                while i < chars.len() && !" \t\n\r(),><=!".contains(chars[i]) {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                toks.push(match word.as_str() {
                    "in" => Tok::In,
                    "notin" => Tok::NotIn,
                    _ => Tok::Ident(word),
                });
            }
        }
    }
    Ok(toks)
}

fn parse_err(detail: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(format!("unable to parse requirement: {detail}"))
}

impl LabelSelector {
    /// Parses the `labelSelector` query parameter (400 on a syntax error, as the real server).
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let toks = lex(s).map_err(parse_err)?;
        let mut reqs = Vec::new();
        let mut i = 0;
        let ident_or_keyword = |t: &Tok| -> Option<String> {
            match t {
                Tok::Ident(s) => Some(s.clone()),
                Tok::In => Some("in".into()),
                Tok::NotIn => Some("notin".into()),
                _ => None,
            }
        };
        while i < toks.len() {
            let req = if toks[i] == Tok::Not {
                i += 1;
                let key = toks
                    .get(i)
                    .and_then(ident_or_keyword)
                    .ok_or_else(|| parse_err("found '!', expected: identifier"))?;
                i += 1;
                Requirement {
                    key,
                    op: Op::DoesNotExist,
                    values: Vec::new(),
                }
            } else {
                let key = toks.get(i).and_then(ident_or_keyword).ok_or_else(|| {
                    parse_err(format!("found '{:?}', expected: !, identifier", toks[i]))
                })?;
                i += 1;
                match toks.get(i) {
                    None | Some(Tok::Comma) => Requirement {
                        key,
                        op: Op::Exists,
                        values: Vec::new(),
                    },
                    Some(t @ (Tok::Eq | Tok::DoubleEq | Tok::NotEq | Tok::Gt | Tok::Lt)) => {
                        let op = match t {
                            Tok::Eq | Tok::DoubleEq => Op::Equals,
                            Tok::NotEq => Op::NotEquals,
                            Tok::Gt => Op::Gt,
                            _ => Op::Lt,
                        };
                        i += 1;
                        let value = match toks.get(i) {
                            None | Some(Tok::Comma) => String::new(),
                            Some(t) => {
                                i += 1;
                                ident_or_keyword(t).ok_or_else(|| {
                                    parse_err(format!("found '{t:?}', expected: identifier"))
                                })?
                            }
                        };
                        if matches!(op, Op::Gt | Op::Lt) && value.parse::<i64>().is_err() {
                            return Err(parse_err(format!(
                                "for 'Gt', 'Lt' operators, the value must be an integer: {value}"
                            )));
                        }
                        Requirement {
                            key,
                            op,
                            values: vec![value],
                        }
                    }
                    Some(t @ (Tok::In | Tok::NotIn)) => {
                        let op = if *t == Tok::In { Op::In } else { Op::NotIn };
                        i += 1;
                        if toks.get(i) != Some(&Tok::Open) {
                            return Err(parse_err("found end of string, expected: '('"));
                        }
                        i += 1;
                        let mut values = Vec::new();
                        let mut expect_value = true;
                        loop {
                            match toks.get(i) {
                                Some(Tok::Close) => {
                                    if expect_value && !values.is_empty() {
                                        values.push(String::new());
                                    }
                                    i += 1;
                                    break;
                                }
                                Some(Tok::Comma) => {
                                    if expect_value {
                                        values.push(String::new());
                                    }
                                    expect_value = true;
                                    i += 1;
                                }
                                Some(t) if expect_value => {
                                    values.push(ident_or_keyword(t).ok_or_else(|| {
                                        parse_err(format!("found '{t:?}', expected: identifier"))
                                    })?);
                                    expect_value = false;
                                    i += 1;
                                }
                                Some(t) => {
                                    return Err(parse_err(format!(
                                        "found '{t:?}', expected: ',' or ')'"
                                    )));
                                }
                                None => {
                                    return Err(parse_err("found end of string, expected: ')'"));
                                }
                            }
                        }
                        if values.is_empty() {
                            return Err(parse_err(format!(
                                "{key}: Invalid value: \"\": for 'in', 'notin' operators, values set can't be empty"
                            )));
                        }
                        Requirement { key, op, values }
                    }
                    Some(t) => {
                        return Err(parse_err(format!(
                            "found '{t:?}', expected: in, notin, =, ==, !=, gt, lt"
                        )));
                    }
                }
            };
            if let Some(m) = meta::qualified_name_errors(&req.key).first() {
                return Err(parse_err(format!(
                    "key: Invalid value: {}: {m}",
                    crate::errors::quote(&req.key)
                )));
            }
            reqs.push(req);
            match toks.get(i) {
                None => break,
                Some(Tok::Comma) => {
                    i += 1;
                    if i >= toks.len() {
                        return Err(parse_err("found end of string, expected: identifier"));
                    }
                }
                Some(t) => return Err(parse_err(format!("found '{t:?}', expected: ','"))),
            }
        }
        Ok(LabelSelector { reqs })
    }

    pub fn is_empty(&self) -> bool {
        self.reqs.is_empty()
    }

    pub fn matches(&self, obj: &Value) -> bool {
        let labels = meta::labels(obj);
        let get = |k: &str| labels.iter().find(|(lk, _)| *lk == k).map(|(_, v)| *v);
        self.reqs.iter().all(|r| {
            let v = get(&r.key);
            match r.op {
                Op::Exists => v.is_some(),
                Op::DoesNotExist => v.is_none(),
                Op::Equals | Op::In => v.is_some_and(|v| r.values.iter().any(|x| x == v)),
                Op::NotEquals | Op::NotIn => v.is_none_or(|v| !r.values.iter().any(|x| x == v)),
                Op::Gt | Op::Lt => {
                    let (Some(v), Some(bound)) = (
                        v.and_then(|v| v.parse::<i64>().ok()),
                        r.values.first().and_then(|b| b.parse::<i64>().ok()),
                    ) else {
                        return false;
                    };
                    if r.op == Op::Gt { v > bound } else { v < bound }
                }
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct FieldReq {
    field: String,
    equals: bool,
    value: String,
}

/// A parsed field selector, restricted to the fields the resource supports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector {
    reqs: Vec<FieldReq>,
}

/// Splits on an unescaped separator.
fn split_unescaped(s: &str, sep: char) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut escaped = false;
    for c in s.chars() {
        if escaped {
            cur.push('\\');
            cur.push(c);
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == sep {
            out.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    if escaped {
        cur.push('\\');
    }
    out.push(cur);
    out
}

fn unescape(s: &str) -> Result<String, ApiError> {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(e @ ('\\' | ',' | '=')) => out.push(e),
                other => {
                    return Err(ApiError::bad_request(format!(
                        "invalid field selector: invalid escape sequence: \\{}",
                        other.map(String::from).unwrap_or_default()
                    )));
                }
            }
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

/// The field labels a resource supports in field selectors.
pub fn supported_fields(res: &ResourceInfo, version: &str) -> Vec<String> {
    let mut f = vec![
        "metadata.name".to_string(),
        "metadata.namespace".to_string(),
    ];
    match res.builtin {
        Some(Builtin::CoreEvent) => {
            for x in [
                "involvedObject.kind",
                "involvedObject.namespace",
                "involvedObject.name",
                "involvedObject.uid",
                "involvedObject.apiVersion",
                "involvedObject.resourceVersion",
                "involvedObject.fieldPath",
                "reason",
                "reportingComponent",
                "source",
                "type",
            ] {
                f.push(x.into());
            }
        }
        Some(Builtin::Namespace) => f.push("status.phase".into()),
        Some(Builtin::Node) => f.push("spec.unschedulable".into()),
        None => {
            if let Some(v) = res.version(version) {
                f.extend(v.selectable_fields.iter().cloned());
            }
        }
        _ => {}
    }
    f
}

impl FieldSelector {
    /// Parses `fieldSelector`; unknown fields are a 400 like the real server.
    pub fn parse(s: &str, res: &ResourceInfo, version: &str) -> Result<Self, ApiError> {
        let mut reqs = Vec::new();
        if s.trim().is_empty() {
            return Ok(FieldSelector { reqs });
        }
        let supported = supported_fields(res, version);
        for part in split_unescaped(s, ',') {
            let (field, equals, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, true, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid field selector: invalid selector: '{part}'; can't understand '{part}'"
                )));
            };
            let field = field.trim().to_string();
            if !supported.contains(&field) {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {field}"
                )));
            }
            reqs.push(FieldReq {
                field,
                equals,
                value: unescape(value)?,
            });
        }
        Ok(FieldSelector { reqs })
    }

    pub fn is_empty(&self) -> bool {
        self.reqs.is_empty()
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.reqs.iter().all(|r| {
            let actual = field_value(obj, &r.field);
            (actual == r.value) == r.equals
        })
    }
}

/// The string value of a dotted field path (`""` when absent), as field selectors see it.
fn field_value(obj: &Value, path: &str) -> String {
    if path == "source" {
        // core/v1 Event: `source` selects `source.component`.
        return field_value(obj, "source.component");
    }
    let mut cur = obj;
    for seg in path.split('.') {
        match cur.get(seg) {
            Some(v) => cur = v,
            None => return String::new(),
        }
    }
    match cur {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::Registry;
    use serde_json::json;

    fn obj(labels: Value) -> Value {
        json!({"metadata": {"name": "a", "namespace": "ns", "labels": labels}})
    }

    #[test]
    fn label_operators() {
        let o = obj(json!({"app": "web", "tier": "front", "n": "5"}));
        let m = |s: &str| LabelSelector::parse(s).unwrap().matches(&o);
        assert!(m(""));
        assert!(m("app=web"));
        assert!(m("app==web"));
        assert!(!m("app!=web"));
        assert!(m("missing!=x"));
        assert!(m("app in (web, db)"));
        assert!(!m("app notin (web,db)"));
        assert!(m("missing notin (a)"));
        assert!(m("tier"));
        assert!(!m("!tier"));
        assert!(m("!missing"));
        assert!(m("app=web,tier=front"));
        assert!(!m("app=web,tier=back"));
        assert!(m("n>4"));
        assert!(!m("n<4"));
        assert!(m("app in (web),!missing,tier"));
    }

    #[test]
    fn label_errors() {
        for bad in [
            "app in web",
            "app=web,",
            "=x",
            "app in ()",
            "a/b/c=x",
            "app in (a",
        ] {
            assert!(LabelSelector::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn fields() {
        let reg = Registry::builtins();
        let ns = reg.lookup("", "v1", "namespaces").unwrap();
        let o = obj(json!({}));
        let sel = FieldSelector::parse("metadata.name=a", &ns, "v1").unwrap();
        assert!(sel.matches(&o));
        let sel = FieldSelector::parse("metadata.name!=a", &ns, "v1").unwrap();
        assert!(!sel.matches(&o));
        let sel =
            FieldSelector::parse("metadata.namespace==ns,metadata.name=a", &ns, "v1").unwrap();
        assert!(sel.matches(&o));
        let err = FieldSelector::parse("spec.x=1", &ns, "v1").unwrap_err();
        assert_eq!(err.code, 400);
    }
}
