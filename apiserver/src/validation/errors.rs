//! `field.Error` shapes of `k8s.io/apimachinery/pkg/util/validation/field`: the reason
//! (`metav1.CauseType`) and the message body that `apierrors.NewInvalid` puts into
//! `details.causes[].message` (`ErrorBody()`, i.e. without the leading field path).

use serde_json::Value;

use super::FieldError;

/// `field.ErrorType` values with the `String()` text and the `CauseType` they map to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorType {
    Required,
    Invalid,
    TypeInvalid,
    NotSupported,
    Duplicate,
    Forbidden,
    TooLong,
    TooMany,
    Internal,
}

impl ErrorType {
    fn text(self) -> &'static str {
        match self {
            ErrorType::Required => "Required value",
            ErrorType::Invalid | ErrorType::TypeInvalid => "Invalid value",
            ErrorType::NotSupported => "Unsupported value",
            ErrorType::Duplicate => "Duplicate value",
            ErrorType::Forbidden => "Forbidden",
            ErrorType::TooLong => "Too long",
            ErrorType::TooMany => "Too many",
            ErrorType::Internal => "Internal error",
        }
    }

    pub(crate) fn reason(self) -> &'static str {
        match self {
            ErrorType::Required => "FieldValueRequired",
            ErrorType::Invalid => "FieldValueInvalid",
            ErrorType::TypeInvalid => "FieldValueTypeInvalid",
            ErrorType::NotSupported => "FieldValueNotSupported",
            ErrorType::Duplicate => "FieldValueDuplicate",
            ErrorType::Forbidden => "FieldValueForbidden",
            ErrorType::TooLong => "FieldValueTooLong",
            ErrorType::TooMany => "FieldValueTooMany",
            ErrorType::Internal => "InternalError",
        }
    }

    /// `hasBlockingErr` in the CRD strategy: these errors stop `x-kubernetes-validations`
    /// from running at all.
    pub(crate) fn blocks_cel(reason: &str) -> bool {
        [
            ErrorType::NotSupported,
            ErrorType::Required,
            ErrorType::TooLong,
            ErrorType::TooMany,
            ErrorType::TypeInvalid,
        ]
        .iter()
        .any(|t| t.reason() == reason)
    }
}

/// The bad value carried by a `field.Error`.
#[derive(Debug, Clone)]
pub(crate) enum BadValue<'a> {
    /// Printed like Go's `%v`/`%q`/`%#v` would print the decoded JSON value.
    Json(&'a Value),
    Str(&'a str),
    Int(i64),
    /// `field.omitValue` / types whose body never shows the value.
    Omit,
}

/// `(*field.Error).ErrorBody()`.
pub(crate) fn body(ty: ErrorType, value: BadValue<'_>, detail: &str) -> String {
    let mut s = match (ty, value) {
        (
            ErrorType::Required | ErrorType::Forbidden | ErrorType::TooLong | ErrorType::Internal,
            _,
        )
        | (_, BadValue::Omit) => ty.text().to_string(),
        (_, BadValue::Str(v)) => format!("{}: {}", ty.text(), go_quote(v)),
        (_, BadValue::Int(v)) => format!("{}: {v}", ty.text()),
        (_, BadValue::Json(v)) => format!("{}: {}", ty.text(), go_value(v)),
    };
    if !detail.is_empty() {
        s.push_str(": ");
        s.push_str(detail);
    }
    s
}

pub(crate) fn make(field: &str, ty: ErrorType, value: BadValue<'_>, detail: &str) -> FieldError {
    FieldError {
        field: field.to_string(),
        reason: ty.reason().to_string(),
        message: body(ty, value, detail),
    }
}

pub(crate) fn required(field: &str, detail: &str) -> FieldError {
    make(field, ErrorType::Required, BadValue::Omit, detail)
}

pub(crate) fn invalid(field: &str, value: BadValue<'_>, detail: &str) -> FieldError {
    make(field, ErrorType::Invalid, value, detail)
}

pub(crate) fn forbidden(field: &str, detail: &str) -> FieldError {
    make(field, ErrorType::Forbidden, BadValue::Omit, detail)
}

pub(crate) fn duplicate(field: &str, value: BadValue<'_>) -> FieldError {
    make(field, ErrorType::Duplicate, value, "")
}

/// `field.NotSupported`: `supported values: "a", "b"` (each value `strconv.Quote`d).
pub(crate) fn not_supported(field: &str, value: BadValue<'_>, valid: &[String]) -> FieldError {
    let detail = if valid.is_empty() {
        String::new()
    } else {
        let quoted: Vec<String> = valid.iter().map(|v| go_quote(v)).collect();
        format!("supported values: {}", quoted.join(", "))
    };
    make(field, ErrorType::NotSupported, value, &detail)
}

/// `field.TooMany`.
pub(crate) fn too_many(field: &str, actual: i64, max: i64) -> FieldError {
    let detail = if max >= 0 {
        format!("must have at most {max} items")
    } else {
        "has too many items".to_string()
    };
    let value = if actual >= 0 {
        BadValue::Int(actual)
    } else {
        BadValue::Omit
    };
    make(field, ErrorType::TooMany, value, &detail)
}

/// `field.TooLongMaxLength` (the value is never shown for "Too long").
pub(crate) fn too_long(field: &str, max: i64) -> FieldError {
    let detail = if max >= 0 {
        format!("may not be longer than {max}")
    } else {
        "value is too long".to_string()
    };
    make(field, ErrorType::TooLong, BadValue::Omit, &detail)
}

/// Go's `strconv.Quote`.
pub(crate) fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{b}' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c if c.is_control() => {
                if (c as u32) <= 0xffff {
                    out.push_str(&format!("\\u{:04x}", c as u32));
                } else {
                    out.push_str(&format!("\\U{:08x}", c as u32));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Go's `%v` of a float64 (`strconv.FormatFloat(f, 'g', -1, 64)` with `%v`'s exponent
/// threshold of 21).
pub(crate) fn go_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        };
    }
    if f == 0.0 {
        return if f.is_sign_negative() {
            "-0".into()
        } else {
            "0".into()
        };
    }
    // Shortest round-trip digits via `{:e}`, e.g. "1.5e6".
    let sci = format!("{f:e}");
    let (mantissa, exp) = match sci.split_once('e') {
        Some((m, e)) => (m.to_string(), e.parse::<i32>().unwrap_or(0)),
        None => return sci,
    };
    if !(-4..6).contains(&exp) {
        let (sign, digits) = match mantissa.strip_prefix('-') {
            Some(rest) => ("-", rest.to_string()),
            None => ("", mantissa.clone()),
        };
        let exp_sign = if exp < 0 { '-' } else { '+' };
        return format!("{sign}{digits}e{exp_sign}{:02}", exp.abs());
    }
    // Plain decimal notation with the shortest digits.
    let s = format!("{f}");
    if s.contains('e') { sci } else { s }
}

/// Go's `%v` for scalars and `%#v` for composite values of a decoded JSON document
/// (`map[string]interface {}{...}`, `[]interface {}{...}`), as `field.Error` prints them.
pub(crate) fn go_value(v: &Value) -> String {
    match v {
        Value::Null => go_quote("null"),
        Value::String(s) => go_quote(s),
        _ => go_sharp_v(v),
    }
}

fn go_number(n: &serde_json::Number) -> String {
    if let Some(i) = n.as_i64() {
        i.to_string()
    } else if let Some(u) = n.as_u64() {
        u.to_string()
    } else {
        go_float(n.as_f64().unwrap_or(0.0))
    }
}

fn go_sharp_v(v: &Value) -> String {
    match v {
        Value::Null => "interface {}(nil)".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => go_number(n),
        Value::String(s) => go_quote(s),
        Value::Array(items) => {
            let inner: Vec<String> = items.iter().map(go_sharp_v).collect();
            format!("[]interface {{}}{{{}}}", inner.join(", "))
        }
        Value::Object(map) => {
            // Go prints map keys sorted.
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            let inner: Vec<String> = entries
                .iter()
                .map(|(k, v)| format!("{}:{}", go_quote(k), go_sharp_v(v)))
                .collect();
            format!("map[string]interface {{}}{{{}}}", inner.join(", "))
        }
    }
}
