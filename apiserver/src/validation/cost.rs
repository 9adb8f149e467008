//! Static cost estimation of `x-kubernetes-validations` rules, following what the
//! apiextensions apiserver does at CRD registration: cel-go's checker cost estimator
//! (`checker/cost.go`), Kubernetes' library cost estimator
//! (`k8s.io/apiserver/pkg/cel/library/cost.go`) and the schema size estimates of
//! `SchemaDeclType` (`maxLength`/`maxItems`/`maxProperties`, or worst cases derived from the
//! 3 MiB request limit). The per-rule result is multiplied by the rule's cardinality
//! (product of the `maxItems`/`maxProperties` of enclosing lists/maps) and compared with
//! `StaticEstimatedCostLimit`.
//!
//! The estimator also performs the type checks the cel-go checker would reject at
//! registration and that are cheap to mirror: undefined fields on schema objects and
//! undeclared identifiers.

use std::collections::HashMap;
use std::sync::LazyLock;

use kube::core::cel::cel::common::ast::{Expr, IdedExpr, LiteralValue};
use serde_json::json;

use super::schema::{AdditionalProperties, Schema};

/// `celconfig.MaxRequestSizeBytes`.
pub(crate) const MAX_REQUEST_SIZE_BYTES: u64 = 3 * 1024 * 1024;
/// `StaticEstimatedCostLimit` (per expression).
pub(crate) const PER_RULE_LIMIT: u64 = 10_000_000;
/// `StaticEstimatedCRDCostLimit` (sum over the CRD's schema).
pub(crate) const CRD_LIMIT: u64 = 100_000_000;

const MIN_STRING_SIZE: u64 = 2;
const MIN_BOOL_SIZE: u64 = 4;
const MIN_NUMBER_SIZE: u64 = 1;
const MIN_DURATION_SIZE_JSON: u64 = 3;
const JSON_DATE_SIZE: u64 = 12;
const MIN_DATETIME_SIZE_JSON: u64 = 21;
const MAX_DURATION_SIZE_JSON: u64 = 32;
const MAX_DATETIME_SIZE_JSON: u64 = 32;
const STRING_TRAVERSAL_FACTOR: f64 = 0.1;
const REGEX_LENGTH_FACTOR: f64 = 0.25;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cost {
    pub min: u64,
    pub max: u64,
}

impl Cost {
    const fn new(min: u64, max: u64) -> Cost {
        Cost { min, max }
    }
    fn add(self, o: Cost) -> Cost {
        Cost::new(
            self.min.saturating_add(o.min),
            self.max.saturating_add(o.max),
        )
    }
    fn union(self, o: Cost) -> Cost {
        Cost::new(self.min.min(o.min), self.max.max(o.max))
    }
    fn multiply(self, o: Cost) -> Cost {
        Cost::new(
            self.min.saturating_mul(o.min),
            self.max.saturating_mul(o.max),
        )
    }
    /// `MultiplyByCostFactor`: ceil each bound.
    fn factor(self, f: f64) -> Cost {
        let m = |v: u64| {
            let r = (v as f64 * f).ceil();
            if r >= u64::MAX as f64 {
                u64::MAX
            } else {
                r as u64
            }
        };
        Cost::new(m(self.min), m(self.max))
    }
}

/// A size estimate uses the same arithmetic as a cost estimate.
type Size = Cost;
const UNBOUNDED_SIZE: Size = Cost::new(0, u64::MAX);

/// The checked type of a sub-expression, as far as cost estimation needs it.
#[derive(Debug, Clone)]
enum Ty<'a> {
    /// A value described by a schema node (`resource_root` adds apiVersion/kind/metadata).
    Node(&'a Schema, bool),
    Str,
    Bytes,
    Int,
    Uint,
    Double,
    Bool,
    Null,
    Duration,
    Timestamp,
    List(Box<Ty<'a>>),
    Map(Box<Ty<'a>>),
    Type,
    Dyn,
}

/// How a schema node is typed in CEL (`SchemaDeclType`).
enum NodeKind<'a> {
    Struct,
    Map(&'a Schema),
    List(&'a Schema),
    Str,
    Bytes,
    Duration,
    Timestamp,
    Int,
    Double,
    Bool,
    Dyn,
}

fn node_kind(s: &Schema) -> NodeKind<'_> {
    if s.int_or_string {
        return NodeKind::Dyn;
    }
    match s.ty.as_str() {
        "object" => match &s.additional_properties {
            Some(AdditionalProperties::Schema(ap)) => NodeKind::Map(ap),
            _ => NodeKind::Struct,
        },
        "array" => match &s.items {
            Some(i) => NodeKind::List(i),
            None => NodeKind::Dyn,
        },
        "string" => match s.format.as_str() {
            "byte" => NodeKind::Bytes,
            "duration" => NodeKind::Duration,
            "date" | "date-time" => NodeKind::Timestamp,
            _ => NodeKind::Str,
        },
        "integer" => NodeKind::Int,
        "number" => NodeKind::Double,
        "boolean" => NodeKind::Bool,
        _ => NodeKind::Dyn,
    }
}

fn non_negative(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// `estimateMaxStringLengthPerRequest`.
fn max_string_length_per_request(s: &Schema) -> u64 {
    if s.int_or_string {
        return MAX_REQUEST_SIZE_BYTES - 2;
    }
    match s.format.as_str() {
        "duration" => MAX_DURATION_SIZE_JSON,
        "date" => JSON_DATE_SIZE,
        "date-time" => MAX_DATETIME_SIZE_JSON,
        _ => MAX_REQUEST_SIZE_BYTES - 2,
    }
}

/// `DeclType.MinSerializedSize`.
fn min_serialized_size(s: &Schema, depth: usize) -> u64 {
    if s.int_or_string {
        return 1;
    }
    if depth > super::schema::MAX_DEPTH {
        return 2;
    }
    match node_kind(s) {
        NodeKind::Struct => {
            let mut size = 2u64;
            for (name, p) in &s.properties {
                if s.required.contains(name) && p.default.is_none() {
                    size = size
                        .saturating_add(name.len() as u64)
                        .saturating_add(min_serialized_size(p, depth + 1))
                        .saturating_add(4);
                }
            }
            size
        }
        NodeKind::Map(_) | NodeKind::List(_) => 2,
        NodeKind::Str | NodeKind::Bytes => MIN_STRING_SIZE,
        NodeKind::Duration => MIN_DURATION_SIZE_JSON,
        NodeKind::Timestamp => {
            if s.format == "date" {
                JSON_DATE_SIZE
            } else {
                MIN_DATETIME_SIZE_JSON
            }
        }
        NodeKind::Int | NodeKind::Double => MIN_NUMBER_SIZE,
        NodeKind::Bool => MIN_BOOL_SIZE,
        NodeKind::Dyn => 1,
    }
}

/// `DeclType.MaxElements` of a schema node.
fn max_elements(s: &Schema) -> u64 {
    if s.int_or_string {
        return MAX_REQUEST_SIZE_BYTES - 2;
    }
    match node_kind(s) {
        NodeKind::Str => match s.max_length {
            // maxLength counts code points; the estimate is in bytes (up to 4 per rune).
            Some(m) => non_negative(m).saturating_mul(4),
            None => match &s.enum_values {
                Some(values) if !values.is_empty() => values
                    .iter()
                    .filter_map(|v| v.as_str())
                    .map(|v| v.len() as u64)
                    .max()
                    .unwrap_or(0),
                _ => max_string_length_per_request(s),
            },
        },
        NodeKind::Bytes => s
            .max_length
            .map_or_else(|| max_string_length_per_request(s), non_negative),
        NodeKind::Duration | NodeKind::Timestamp => max_string_length_per_request(s),
        NodeKind::List(item) => s.max_items.map_or_else(
            || (MAX_REQUEST_SIZE_BYTES - 2) / (min_serialized_size(item, 0) + 1),
            non_negative,
        ),
        NodeKind::Map(value) => s.max_properties.map_or_else(
            || (MAX_REQUEST_SIZE_BYTES - 2) / (min_serialized_size(value, 0) + 6),
            non_negative,
        ),
        _ => 0,
    }
}

/// Schema of `apiVersion`/`kind`/`metadata.{name,generateName}` that CEL always sees at a
/// resource root (`WithTypeAndObjectMeta`).
static STRING_NODE: LazyLock<Schema> =
    LazyLock::new(|| Schema::parse(&json!({"type": "string"}), false));
static META_NODE: LazyLock<Schema> = LazyLock::new(|| {
    Schema::parse(
        &json!({"type": "object", "properties": {
            "name": {"type": "string"}, "generateName": {"type": "string"}}}),
        false,
    )
});

/// Reverse `apiservercel.Escape` for a CEL field name.
fn unescape(name: &str) -> String {
    const RESERVED: &[&str] = &[
        "true",
        "false",
        "null",
        "in",
        "as",
        "break",
        "const",
        "continue",
        "else",
        "for",
        "function",
        "if",
        "import",
        "let",
        "loop",
        "package",
        "namespace",
        "return",
        "var",
        "void",
        "while",
    ];
    if let Some(inner) = name.strip_prefix("__").and_then(|n| n.strip_suffix("__"))
        && RESERVED.contains(&inner)
    {
        return inner.to_string();
    }
    let mut out = String::new();
    let mut rest = name;
    while !rest.is_empty() {
        let mut matched = false;
        for (esc, plain) in [
            ("__underscores__", "__"),
            ("__dot__", "."),
            ("__dash__", "-"),
            ("__slash__", "/"),
        ] {
            if let Some(r) = rest.strip_prefix(esc) {
                out.push_str(plain);
                rest = r;
                matched = true;
                break;
            }
        }
        if !matched {
            let mut chars = rest.chars();
            if let Some(c) = chars.next() {
                out.push(c);
            }
            rest = chars.as_str();
        }
    }
    out
}

#[derive(Debug, Clone)]
struct Est<'a> {
    cost: Cost,
    ty: Ty<'a>,
    /// `ComputedSize` / `ResultSize`.
    size: Option<Size>,
    /// Whether the expression has a field path rooted at `self`/`oldSelf` (only those get
    /// schema-based size estimates).
    path: bool,
}

impl<'a> Est<'a> {
    fn of(cost: Cost, ty: Ty<'a>) -> Est<'a> {
        Est {
            cost,
            ty,
            size: None,
            path: false,
        }
    }
}

struct Coster<'a> {
    root: &'a Schema,
    root_is_resource: bool,
    scopes: Vec<HashMap<String, Est<'a>>>,
}

/// Estimate one rule compiled into `expr`, evaluated with `self` of schema `node`
/// (`resource_root` for the CRD root and embedded resources). `Err` carries a type-check
/// failure (undefined field, undeclared reference).
/// Returns the cost and whether the result type can be a bool.
pub(crate) fn estimate(
    expr: &IdedExpr,
    node: &Schema,
    resource_root: bool,
) -> Result<(Cost, bool), String> {
    let mut c = Coster {
        root: node,
        root_is_resource: resource_root,
        scopes: Vec::new(),
    };
    c.cost(expr, 0).map(|e| {
        let boolish = match &e.ty {
            Ty::Bool | Ty::Dyn => true,
            Ty::Node(s, _) => matches!(node_kind(s), NodeKind::Bool | NodeKind::Dyn),
            _ => false,
        };
        (e.cost, boolish)
    })
}

/// `getCostErrorMessage`.
pub(crate) fn cost_error_message(name: &str, cost: u64, limit: u64) -> String {
    let factor = cost as f64 / limit as f64;
    let factor = if factor > 100.0 {
        "more than 100x".to_string()
    } else if factor < 1.5 {
        format!("{factor:.6}x")
    } else {
        format!("{factor:.1}x")
    };
    format!(
        "{name} exceeds budget by factor of {factor} (try simplifying the rule, or adding maxItems, maxProperties, and maxLength where arrays, maps, and strings are declared)"
    )
}

fn is_scalar(t: &Ty<'_>) -> bool {
    match t {
        Ty::Int | Ty::Uint | Ty::Double | Ty::Bool | Ty::Duration | Ty::Timestamp => true,
        Ty::Node(s, _) => matches!(
            node_kind(s),
            NodeKind::Int
                | NodeKind::Double
                | NodeKind::Bool
                | NodeKind::Duration
                | NodeKind::Timestamp
        ),
        _ => false,
    }
}

fn is_string(t: &Ty<'_>) -> bool {
    match t {
        Ty::Str => true,
        Ty::Node(s, _) => matches!(node_kind(s), NodeKind::Str),
        _ => false,
    }
}

fn is_bytes(t: &Ty<'_>) -> bool {
    match t {
        Ty::Bytes => true,
        Ty::Node(s, _) => matches!(node_kind(s), NodeKind::Bytes),
        _ => false,
    }
}

fn is_list(t: &Ty<'_>) -> bool {
    match t {
        Ty::List(_) => true,
        Ty::Node(s, _) => matches!(node_kind(s), NodeKind::List(_)),
        _ => false,
    }
}

/// Element type of a list (or key type of a map) when iterating it.
fn iter_elem<'a>(t: &Ty<'a>) -> (Ty<'a>, bool) {
    match t {
        Ty::List(e) => ((**e).clone(), false),
        Ty::Map(_) => (Ty::Str, true),
        Ty::Node(s, _) => match node_kind(s) {
            NodeKind::List(i) => (Ty::Node(i, i.embedded_resource), false),
            NodeKind::Map(_) => (Ty::Str, true),
            _ => (Ty::Dyn, false),
        },
        _ => (Ty::Dyn, false),
    }
}

fn lit_int(e: &IdedExpr) -> Option<i64> {
    match &e.expr {
        Expr::Literal(LiteralValue::Int(i)) => Some(*i.inner()),
        _ => None,
    }
}

impl<'a> Coster<'a> {
    fn size(&self, e: &Est<'a>) -> Size {
        if let Some(s) = e.size {
            return s;
        }
        if e.path
            && let Ty::Node(s, _) = &e.ty
        {
            return Size::new(0, max_elements(s));
        }
        if is_scalar(&e.ty) {
            return Size::new(1, 1);
        }
        UNBOUNDED_SIZE
    }

    fn lookup(&self, name: &str) -> Option<Est<'a>> {
        self.scopes.iter().rev().find_map(|s| s.get(name).cloned())
    }

    fn cost(&mut self, e: &IdedExpr, depth: usize) -> Result<Est<'a>, String> {
        if depth > 256 {
            return Err("expression nesting too deep".into());
        }
        match &e.expr {
            Expr::Literal(l) => {
                let (ty, size) = match l {
                    LiteralValue::String(s) => (Ty::Str, s.inner().chars().count() as u64),
                    LiteralValue::Bytes(b) => (Ty::Bytes, b.inner().len() as u64),
                    LiteralValue::Boolean(_) => (Ty::Bool, 1),
                    LiteralValue::Double(_) => (Ty::Double, 1),
                    LiteralValue::Int(_) => (Ty::Int, 1),
                    LiteralValue::UInt(_) => (Ty::Uint, 1),
                    LiteralValue::Null => (Ty::Null, 1),
                };
                Ok(Est {
                    cost: Cost::new(0, 0),
                    ty,
                    size: Some(Size::new(size, size)),
                    path: false,
                })
            }
            Expr::Ident(name) => self.ident(name),
            Expr::Select(sel) => {
                let operand = self.cost(&sel.operand, depth + 1)?;
                if sel.test {
                    // presence test: presenceTestCost (1) + operand.
                    self.field_type(&operand.ty, &sel.field)?;
                    return Ok(Est::of(operand.cost.add(Cost::new(1, 1)), Ty::Bool));
                }
                let select_cost = match &operand.ty {
                    Ty::Map(_) => 1,
                    Ty::Node(s, _) => match node_kind(s) {
                        NodeKind::Struct | NodeKind::Map(_) => 1,
                        _ => 0,
                    },
                    _ => 0,
                };
                let ty = self.field_type(&operand.ty, &sel.field)?;
                Ok(Est {
                    cost: operand.cost.add(Cost::new(select_cost, select_cost)),
                    ty,
                    size: None,
                    path: operand.path,
                })
            }
            Expr::List(list) => {
                let mut sum = Cost::new(10, 10);
                let mut elem: Option<Ty<'a>> = None;
                for el in &list.elements {
                    let x = self.cost(el, depth + 1)?;
                    sum = sum.add(x.cost);
                    elem = Some(match elem {
                        None => x.ty,
                        Some(prev)
                            if std::mem::discriminant(&prev) == std::mem::discriminant(&x.ty) =>
                        {
                            prev
                        }
                        Some(_) => Ty::Dyn,
                    });
                }
                let n = list.elements.len() as u64;
                Ok(Est {
                    cost: sum,
                    ty: Ty::List(Box::new(elem.unwrap_or(Ty::Dyn))),
                    size: Some(Size::new(n, n)),
                    path: false,
                })
            }
            Expr::Map(map) => {
                let mut sum = Cost::new(30, 30);
                for entry in &map.entries {
                    if let kube::core::cel::cel::common::ast::EntryExpr::MapEntry(me) = &entry.expr
                    {
                        sum = sum.add(self.cost(&me.key, depth + 1)?.cost);
                        sum = sum.add(self.cost(&me.value, depth + 1)?.cost);
                    }
                }
                let n = map.entries.len() as u64;
                Ok(Est {
                    cost: sum,
                    ty: Ty::Map(Box::new(Ty::Dyn)),
                    size: Some(Size::new(n, n)),
                    path: false,
                })
            }
            Expr::Struct(st) => {
                let mut sum = Cost::new(40, 40);
                for entry in &st.entries {
                    if let kube::core::cel::cel::common::ast::EntryExpr::StructField(f) =
                        &entry.expr
                    {
                        sum = sum.add(self.cost(&f.value, depth + 1)?.cost);
                    }
                }
                Ok(Est::of(sum, Ty::Dyn))
            }
            Expr::Comprehension(comp) => {
                let range = self.cost(&comp.iter_range, depth + 1)?;
                let init = self.cost(&comp.accu_init, depth + 1)?;
                let (elem, is_key) = iter_elem(&range.ty);
                let iter_var = Est {
                    cost: Cost::new(1, 1),
                    ty: elem,
                    // Map keys are `StringType` with MaxElements 0.
                    size: (is_key && range.path).then_some(Size::new(0, 0)),
                    path: range.path,
                };
                let mut scope = HashMap::new();
                scope.insert(comp.iter_var.clone(), iter_var);
                if let Some(v2) = &comp.iter_var2 {
                    scope.insert(v2.clone(), Est::of(Cost::new(1, 1), Ty::Dyn));
                }
                scope.insert(
                    comp.accu_var.clone(),
                    Est {
                        cost: Cost::new(1, 1),
                        ty: init.ty.clone(),
                        size: None,
                        path: false,
                    },
                );
                self.scopes.push(scope);
                let looped = self
                    .cost(&comp.loop_cond, depth + 1)
                    .and_then(|l| Ok((l, self.cost(&comp.loop_step, depth + 1)?)));
                let result = self.cost(&comp.result, depth + 1);
                self.scopes.pop();
                let (loop_cond, step) = looped?;
                let result = result?;
                let range_cnt = self.size(&range);
                let cost = range
                    .cost
                    .add(init.cost)
                    .add(result.cost)
                    .add(range_cnt.multiply(step.cost.add(loop_cond.cost)));
                let size = is_list(&result.ty).then_some(range_cnt);
                Ok(Est {
                    cost,
                    ty: result.ty,
                    size,
                    path: false,
                })
            }
            Expr::Call(call) => {
                self.call(&call.func_name, call.target.as_deref(), &call.args, depth)
            }
            Expr::Unspecified => Ok(Est::of(Cost::new(0, 0), Ty::Dyn)),
        }
    }

    fn ident(&self, name: &str) -> Result<Est<'a>, String> {
        if let Some(v) = self.lookup(name) {
            return Ok(v);
        }
        let one = Cost::new(1, 1);
        match name {
            "self" | "oldSelf" => Ok(Est {
                cost: one,
                ty: Ty::Node(self.root, self.root_is_resource),
                size: None,
                path: true,
            }),
            "int" | "uint" | "double" | "bool" | "string" | "bytes" | "list" | "map"
            | "null_type" | "type" | "dyn" => Ok(Est::of(one, Ty::Type)),
            _ => Err(format!(
                "undeclared reference to '{name}' (in container '')"
            )),
        }
    }

    /// Type of `operand.field`, or the checker's `undefined field` error.
    fn field_type(&self, operand: &Ty<'a>, field: &str) -> Result<Ty<'a>, String> {
        match operand {
            Ty::Map(v) => Ok((**v).clone()),
            Ty::Node(s, resource_root) => match node_kind(s) {
                NodeKind::Map(v) => Ok(Ty::Node(v, v.embedded_resource)),
                NodeKind::Struct => {
                    let name = unescape(field);
                    if *resource_root {
                        match name.as_str() {
                            "apiVersion" | "kind" => return Ok(Ty::Node(&STRING_NODE, false)),
                            "metadata" => return Ok(Ty::Node(&META_NODE, false)),
                            _ => {}
                        }
                    }
                    match s.properties.get(&name) {
                        Some(p) => Ok(Ty::Node(p, p.embedded_resource)),
                        None => Err(format!("undefined field '{field}'")),
                    }
                }
                NodeKind::Dyn => Ok(Ty::Dyn),
                _ => Err(format!("type '{}' does not support field selection", s.ty)),
            },
            _ => Ok(Ty::Dyn),
        }
    }

    fn call(
        &mut self,
        func: &str,
        target: Option<&IdedExpr>,
        args: &[IdedExpr],
        depth: usize,
    ) -> Result<Est<'a>, String> {
        let mut arg_ests = Vec::with_capacity(args.len());
        for a in args {
            arg_ests.push(self.cost(a, depth + 1)?);
        }
        let target_est = match target {
            Some(t) => Some(self.cost(t, depth + 1)?),
            None => None,
        };
        let arg_sum = arg_ests
            .iter()
            .fold(Cost::new(0, 0), |acc, a| acc.add(a.cost));
        let target_cost = target_est.as_ref().map_or(Cost::new(0, 0), |t| t.cost);
        let one = Cost::new(1, 1);
        let arg_size =
            |c: &Coster<'a>, i: usize| arg_ests.get(i).map_or(UNBOUNDED_SIZE, |a| c.size(a));
        let arg_ty = |i: usize| arg_ests.get(i).map_or(Ty::Dyn, |a| a.ty.clone());

        // (function cost excluding argument costs, result type, result size)
        let (fn_cost, ty, size): (Cost, Ty<'a>, Option<Size>) = match (func, &target_est) {
            // Kubernetes library (k8s.io/apiserver/pkg/cel/library/cost.go).
            ("isSorted" | "sum" | "max" | "min" | "indexOf" | "lastIndexOf", Some(t))
                if is_list(&t.ty) =>
            {
                let (elem, _) = iter_elem(&t.ty);
                let mut el_cost = one;
                if is_string(&elem) || is_bytes(&elem) {
                    el_cost = el_cost.add(self.size(t).factor(STRING_TRAVERSAL_FACTOR));
                }
                let ty = match func {
                    "isSorted" => Ty::Bool,
                    "indexOf" | "lastIndexOf" => Ty::Int,
                    _ => elem,
                };
                (self.size(t).multiply(el_cost), ty, None)
            }
            ("url", None) if args.len() == 1 => (
                arg_size(self, 0).factor(STRING_TRAVERSAL_FACTOR),
                Ty::Dyn,
                None,
            ),
            ("lowerAscii" | "upperAscii" | "substring" | "trim", Some(t)) => {
                let sz = self.size(t);
                (sz.factor(STRING_TRAVERSAL_FACTOR), Ty::Str, Some(sz))
            }
            ("replace", Some(t)) if args.len() >= 2 => {
                let sz = self.size(t);
                let size = replace_size(sz, arg_size(self, 0), arg_size(self, 1));
                (
                    sz.factor(2.0 * STRING_TRAVERSAL_FACTOR),
                    Ty::Str,
                    Some(size),
                )
            }
            ("split", Some(t)) => {
                let sz = self.size(t);
                let max = args
                    .get(1)
                    .and_then(lit_int)
                    .map_or(sz.max, |i| u64::try_from(i).unwrap_or(0));
                (
                    sz.factor(2.0 * STRING_TRAVERSAL_FACTOR),
                    Ty::List(Box::new(Ty::Str)),
                    Some(Size::new(0, max)),
                )
            }
            ("join", Some(t)) => {
                let list = self.size(t);
                let sz = if args.is_empty() {
                    Size::new(0, 0)
                } else {
                    arg_size(self, 0).multiply(Size::new(
                        list.min.saturating_sub(1),
                        list.max.saturating_sub(1),
                    ))
                };
                (sz.factor(STRING_TRAVERSAL_FACTOR), Ty::Str, Some(sz))
            }
            ("find" | "findAll", Some(t)) if !args.is_empty() => {
                let sz = self.size(t);
                let str_cost = sz.add(Size::new(1, 1)).factor(STRING_TRAVERSAL_FACTOR);
                let regex_cost = arg_size(self, 0).factor(REGEX_LENGTH_FACTOR);
                let ty = if func == "find" {
                    Ty::Str
                } else {
                    Ty::List(Box::new(Ty::Str))
                };
                (
                    str_cost.multiply(regex_cost),
                    ty,
                    Some(Size::new(0, sz.max)),
                )
            }
            (
                "cidr" | "isIP" | "isCIDR" | "ip" | "quantity" | "isQuantity" | "semver"
                | "isSemver",
                _,
            ) if !args.is_empty() => {
                let ty = if func.starts_with("is") {
                    Ty::Bool
                } else {
                    Ty::Dyn
                };
                (arg_size(self, 0).factor(STRING_TRAVERSAL_FACTOR), ty, None)
            }
            // cel-go built-ins (checker/cost.go functionCost).
            ("format", Some(t)) if is_string(&t.ty) => {
                (self.size(t).factor(STRING_TRAVERSAL_FACTOR), Ty::Str, None)
            }
            ("string", None) if args.len() == 1 && is_bytes(&arg_ty(0)) => (
                arg_size(self, 0).factor(STRING_TRAVERSAL_FACTOR),
                Ty::Str,
                None,
            ),
            ("bytes", None) if args.len() == 1 && is_string(&arg_ty(0)) => (
                arg_size(self, 0).factor(STRING_TRAVERSAL_FACTOR),
                Ty::Bytes,
                None,
            ),
            ("startsWith" | "endsWith", Some(t)) if args.len() == 1 && is_string(&t.ty) => (
                arg_size(self, 0).factor(STRING_TRAVERSAL_FACTOR),
                Ty::Bool,
                None,
            ),
            ("@in", None) if args.len() == 2 && is_list(&arg_ty(1)) => {
                (arg_size(self, 1), Ty::Bool, None)
            }
            ("matches", Some(t)) if args.len() == 1 => {
                let str_cost = self.size(t).factor(STRING_TRAVERSAL_FACTOR);
                let regex_cost = arg_size(self, 0).factor(REGEX_LENGTH_FACTOR);
                (str_cost.multiply(regex_cost), Ty::Bool, None)
            }
            ("contains", Some(t)) if args.len() == 1 && is_string(&t.ty) => {
                let str_cost = self.size(t).factor(STRING_TRAVERSAL_FACTOR);
                let sub_cost = arg_size(self, 0).factor(STRING_TRAVERSAL_FACTOR);
                (str_cost.multiply(sub_cost), Ty::Bool, None)
            }
            ("_&&_" | "_||_", None) if arg_ests.len() == 2 => {
                let (l, r) = (arg_ests[0].cost, arg_ests[1].cost);
                // Short-circuit: min is the lhs, max both; no cost of its own.
                let c = Cost::new(l.min, l.add(r).max);
                return Ok(Est::of(c, Ty::Bool));
            }
            ("_?_:_", None) if arg_ests.len() == 3 => {
                let c = arg_ests[0]
                    .cost
                    .add(arg_ests[1].cost.union(arg_ests[2].cost));
                let size = self.size(&arg_ests[1]).union(self.size(&arg_ests[2]));
                return Ok(Est {
                    cost: c,
                    ty: arg_ests[1].ty.clone(),
                    size: Some(size),
                    path: false,
                });
            }
            ("_+_", None) if arg_ests.len() == 2 => {
                let (l, r) = (self.size(&arg_ests[0]), self.size(&arg_ests[1]));
                let sum = Size::new(l.min.saturating_add(r.min), l.max.saturating_add(r.max));
                let (lt, rt) = (&arg_ests[0].ty, &arg_ests[1].ty);
                if is_list(lt) || is_list(rt) {
                    let ty = if matches!(lt, Ty::List(_)) {
                        lt.clone()
                    } else {
                        rt.clone()
                    };
                    (one, ty, Some(sum))
                } else if is_string(lt) || is_string(rt) {
                    (sum.factor(STRING_TRAVERSAL_FACTOR), Ty::Str, Some(sum))
                } else if is_bytes(lt) || is_bytes(rt) {
                    (sum.factor(STRING_TRAVERSAL_FACTOR), Ty::Bytes, Some(sum))
                } else {
                    (one, numeric_result(lt, rt), None)
                }
            }
            ("_==_" | "_!=_", None) if arg_ests.len() == 2 => {
                (equality_cost(self, &arg_ests), Ty::Bool, None)
            }
            ("_<_" | "_<=_" | "_>_" | "_>=_", None)
                if arg_ests.len() == 2
                    && (is_string(&arg_ests[0].ty) || is_bytes(&arg_ests[0].ty)) =>
            {
                (equality_cost(self, &arg_ests), Ty::Bool, None)
            }
            // O(1) functions.
            _ => (
                one,
                call_result_type(func, target_est.as_ref(), &arg_ests),
                None,
            ),
        };
        Ok(Est {
            cost: target_cost.add(fn_cost).add(arg_sum),
            ty,
            size,
            path: false,
        })
    }
}

/// Equality (and string ordering): traversal of the smaller operand.
fn equality_cost<'a>(c: &Coster<'a>, args: &[Est<'a>]) -> Cost {
    let (l, r) = (c.size(&args[0]), c.size(&args[1]));
    let smallest_max = l.max.min(r.max);
    let min = u64::from(smallest_max > 0);
    Cost::new(min, smallest_max).factor(STRING_TRAVERSAL_FACTOR)
}

fn numeric_result<'a>(l: &Ty<'a>, r: &Ty<'a>) -> Ty<'a> {
    let simple = |t: &Ty<'a>| match t {
        Ty::Node(s, _) => match node_kind(s) {
            NodeKind::Int => Ty::Int,
            NodeKind::Double => Ty::Double,
            NodeKind::Duration => Ty::Duration,
            NodeKind::Timestamp => Ty::Timestamp,
            _ => Ty::Dyn,
        },
        other => other.clone(),
    };
    match (simple(l), simple(r)) {
        (Ty::Timestamp, _) | (_, Ty::Timestamp) => Ty::Timestamp,
        (a, _) => a,
    }
}

fn call_result_type<'a>(func: &str, target: Option<&Est<'a>>, args: &[Est<'a>]) -> Ty<'a> {
    match func {
        "size" | "int" | "charAt" | "indexOf" | "lastIndexOf" | "getFullYear" | "getMonth"
        | "getDayOfMonth" | "getHours" | "getMinutes" | "getSeconds" | "getMilliseconds"
        | "getDayOfYear" | "getDayOfWeek" | "getDate" | "compareTo" | "sign" | "asInteger" => {
            Ty::Int
        }
        "uint" => Ty::Uint,
        "double" | "asApproximateFloat" => Ty::Double,
        "string" | "lowerAscii" | "upperAscii" | "trim" | "substring" | "reverse" | "quote" => {
            Ty::Str
        }
        "bytes" => Ty::Bytes,
        "duration" => Ty::Duration,
        "timestamp" => Ty::Timestamp,
        "type" => Ty::Type,
        "dyn" => args.first().map_or(Ty::Dyn, |a| a.ty.clone()),
        "value" | "orValue" => target.map_or(Ty::Dyn, |t| t.ty.clone()),
        "_[_]" | "_[?_]" => match args.first().map(|a| &a.ty) {
            Some(Ty::List(e)) => (**e).clone(),
            Some(Ty::Map(v)) => (**v).clone(),
            Some(Ty::Node(s, _)) => match node_kind(s) {
                NodeKind::List(i) => Ty::Node(i, i.embedded_resource),
                NodeKind::Map(v) => Ty::Node(v, v.embedded_resource),
                _ => Ty::Dyn,
            },
            _ => Ty::Dyn,
        },
        "_-_" | "_*_" | "_/_" | "_%_" | "-_" => match (args.first(), args.get(1)) {
            (Some(a), Some(b)) => numeric_result(&a.ty, &b.ty),
            (Some(a), None) => numeric_result(&a.ty, &a.ty),
            _ => Ty::Dyn,
        },
        "_==_"
        | "_!=_"
        | "_<_"
        | "_<=_"
        | "_>_"
        | "_>=_"
        | "!_"
        | "@in"
        | "@not_strictly_false"
        | "matches"
        | "startsWith"
        | "endsWith"
        | "contains"
        | "hasValue"
        | "isSorted"
        | "exists"
        | "all"
        | "isGreaterThan"
        | "isLessThan"
        | "isInteger" => Ty::Bool,
        _ => Ty::Dyn,
    }
}

/// Result size of `replace` (library/cost.go).
fn replace_size(sz: Size, to_replace: Size, replace_with: Size) -> Size {
    let mut count = Size::new(0, 0);
    let mut retained = Size::new(0, 0);
    if to_replace.min == 0 {
        count.max = if sz.max < u64::MAX {
            sz.max + 1
        } else {
            sz.max
        };
        retained.max = sz.max;
    } else if replace_with.max <= to_replace.min {
        retained.max = sz.max;
    } else {
        count.max = (sz.max as f64 / to_replace.min as f64).ceil() as u64;
    }
    if to_replace.max == 0 {
        count.min = if sz.min < u64::MAX {
            sz.min + 1
        } else {
            sz.min
        };
        retained.min = sz.min;
    } else if to_replace.max <= replace_with.min {
        retained.min = sz.min;
    } else {
        count.min = (sz.min as f64 / to_replace.max as f64).ceil() as u64;
    }
    count.multiply(replace_with).add(retained)
}

/// `maxCardinality`: how often data of this minimal size can repeat in one request.
pub(crate) fn unbounded_cardinality(node: &Schema) -> u64 {
    MAX_REQUEST_SIZE_BYTES / (min_serialized_size(node, 0) + 1)
}
