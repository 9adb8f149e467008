use serde_json::{Value, json};

use super::*;

fn err(field: &str, reason: &str, message: &str) -> FieldError {
    FieldError {
        field: field.into(),
        reason: reason.into(),
        message: message.into(),
    }
}

fn obj(spec: Value) -> Value {
    json!({"apiVersion": "tessera.io/v1", "kind": "Volume", "metadata": {"name": "v"}, "spec": spec})
}

fn root(spec_schema: Value) -> Value {
    json!({"type": "object", "properties": {"spec": spec_schema}})
}

fn validate(schema: &Value, object: &mut Value) -> Vec<FieldError> {
    validate_object(schema, object, None)
        .err()
        .unwrap_or_default()
}

// ── pruning ────────────────────────────────────────────────────────────────

#[test]
fn prunes_unknown_fields_but_keeps_type_and_object_meta() {
    let schema = root(json!({"type": "object", "properties": {"size": {"type": "integer"}}}));
    let mut o = obj(json!({"size": 1, "bogus": true}));
    o["status"] = json!({"x": 1});
    o["metadata"]["labels"] = json!({"a": "b"});
    assert!(validate_object(&schema, &mut o, None).is_ok());
    assert_eq!(o["spec"], json!({"size": 1}));
    assert!(o.get("status").is_none());
    assert_eq!(o["metadata"]["labels"], json!({"a": "b"}));
    assert_eq!(o["apiVersion"], "tessera.io/v1");
}

#[test]
fn preserve_unknown_fields_keeps_unknown_but_prunes_specified_children() {
    let schema = root(json!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
        "properties": {"known": {"type": "object", "properties": {"a": {"type": "string"}}}}
    }));
    let mut o = obj(json!({"free": {"deep": 1}, "known": {"a": "x", "b": "pruned"}}));
    assert!(validate_object(&schema, &mut o, None).is_ok());
    assert_eq!(o["spec"], json!({"free": {"deep": 1}, "known": {"a": "x"}}));
}

#[test]
fn prunes_nested_in_lists_and_maps() {
    let schema = root(json!({
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string"}}}},
            "labels": {"type": "object", "additionalProperties": {"type": "object", "properties": {"v": {"type": "string"}}}}
        }
    }));
    let mut o = obj(json!({
        "items": [{"name": "a", "x": 1}, {"y": 2}],
        "labels": {"k": {"v": "1", "w": "2"}}
    }));
    assert!(validate_object(&schema, &mut o, None).is_ok());
    assert_eq!(o["spec"]["items"], json!([{"name": "a"}, {}]));
    assert_eq!(o["spec"]["labels"], json!({"k": {"v": "1"}}));
}

#[test]
fn embedded_resource_keeps_its_type_meta() {
    let schema = root(json!({"type": "object", "properties": {"template": {
        "type": "object", "x-kubernetes-embedded-resource": true,
        "properties": {"spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}
    }}}));
    let mut o = obj(
        json!({"template": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"a": 1}, "junk": 1}}),
    );
    assert!(validate_object(&schema, &mut o, None).is_ok());
    assert_eq!(
        o["spec"]["template"],
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"a": 1}})
    );
    let mut missing = obj(json!({"template": {"spec": {}}}));
    assert_eq!(
        validate(&schema, &mut missing),
        vec![
            err(
                "spec.template.apiVersion",
                "FieldValueRequired",
                "Required value: must not be empty"
            ),
            err(
                "spec.template.kind",
                "FieldValueRequired",
                "Required value: must not be empty"
            ),
            err(
                "<nil>",
                "FieldValueInvalid",
                &format!("Invalid value: \"null\": {CEL_SKIPPED}")
            ),
        ]
    );
}

// ── defaulting ─────────────────────────────────────────────────────────────

#[test]
fn applies_defaults_including_inside_defaults_and_list_items() {
    let schema = root(json!({
        "type": "object",
        "properties": {
            "replicas": {"type": "integer", "default": 1},
            "policy": {"type": "object", "default": {}, "properties": {"mode": {"type": "string", "default": "Retain"}}},
            "ports": {"type": "array", "items": {"type": "object", "properties": {
                "port": {"type": "integer"}, "protocol": {"type": "string", "default": "TCP"}}}}
        }
    }));
    let mut o = obj(json!({"ports": [{"port": 80}]}));
    assert!(validate_object(&schema, &mut o, None).is_ok());
    assert_eq!(
        o["spec"],
        json!({"replicas": 1, "policy": {"mode": "Retain"}, "ports": [{"port": 80, "protocol": "TCP"}]})
    );
}

#[test]
fn nulls_of_non_nullable_fields_are_defaulted_or_dropped() {
    let schema = root(json!({
        "type": "object",
        "properties": {
            "a": {"type": "string", "default": "x"},
            "b": {"type": "string"},
            "c": {"type": "string", "nullable": true, "default": "y"}
        }
    }));
    let mut o = obj(json!({"a": null, "b": null, "c": null}));
    assert!(validate_object(&schema, &mut o, None).is_ok());
    assert_eq!(o["spec"], json!({"a": "x", "c": null}));
}

// ── schema validation errors ───────────────────────────────────────────────

#[test]
fn type_error_shape() {
    let schema = root(json!({"type": "object", "properties": {"x": {"type": "integer"}}}));
    let mut o = obj(json!({"x": "nope"}));
    let errs = validate(&schema, &mut o);
    assert_eq!(
        errs[0],
        err(
            "spec.x",
            "FieldValueTypeInvalid",
            "Invalid value: \"string\": spec.x in body must be of type integer: \"string\""
        )
    );
    // A type error blocks CEL, with the server's notice appended.
    assert_eq!(errs.len(), 2);
    assert_eq!(errs[1].field, "<nil>");
}

#[test]
fn integral_floats_are_integers_and_ints_are_numbers() {
    let schema = root(
        json!({"type": "object", "properties": {"i": {"type": "integer"}, "n": {"type": "number"}}}),
    );
    let mut o = obj(json!({"i": 2.0, "n": 3}));
    assert!(validate_object(&schema, &mut o, None).is_ok());
    let mut bad = obj(json!({"i": 2.5}));
    assert_eq!(
        validate(&schema, &mut bad)[0].message,
        "Invalid value: \"number\": spec.i in body must be of type integer: \"number\""
    );
}

#[test]
fn enum_error_shape() {
    let schema = root(json!({"type": "object", "properties": {
        "mode": {"type": "string", "enum": ["A", "B"]},
        "n": {"type": "integer", "enum": [1, 2]}
    }}));
    let mut o = obj(json!({"mode": "Foo", "n": 3}));
    let errs = validate(&schema, &mut o);
    assert_eq!(
        &errs[..2],
        &[
            err(
                "spec.mode",
                "FieldValueNotSupported",
                "Unsupported value: \"Foo\": supported values: \"A\", \"B\""
            ),
            err(
                "spec.n",
                "FieldValueNotSupported",
                "Unsupported value: 3: supported values: \"1\", \"2\""
            ),
        ]
    );
}

#[test]
fn required_error_shape() {
    let schema = json!({"type": "object", "required": ["spec"], "properties": {"spec": {
        "type": "object", "required": ["size"], "properties": {"size": {"type": "integer"}}}}});
    let mut o = obj(json!({}));
    assert_eq!(
        validate(&schema, &mut o)[0],
        err("spec.size", "FieldValueRequired", "Required value")
    );
    let mut no_spec = json!({"apiVersion": "a/v1", "kind": "K", "metadata": {}});
    assert_eq!(
        validate(&schema, &mut no_spec)[0],
        err("spec", "FieldValueRequired", "Required value")
    );
}

#[test]
fn numeric_bounds_and_multiple_of() {
    let schema = root(json!({"type": "object", "properties": {
        "min": {"type": "integer", "minimum": 1},
        "xmin": {"type": "integer", "minimum": 1, "exclusiveMinimum": true},
        "max": {"type": "number", "maximum": 1.5},
        "xmax": {"type": "integer", "maximum": 10, "exclusiveMaximum": true},
        "mul": {"type": "integer", "multipleOf": 5},
        "big": {"type": "integer", "minimum": 1000000}
    }}));
    let mut o = obj(json!({"min": 0, "xmin": 1, "max": 2, "xmax": 10, "mul": 7, "big": 5}));
    let errs = validate(&schema, &mut o);
    let expected = vec![
        err(
            "spec.big",
            "FieldValueInvalid",
            "Invalid value: 5: spec.big in body should be greater than or equal to 1e+06",
        ),
        err(
            "spec.max",
            "FieldValueInvalid",
            "Invalid value: 2: spec.max in body should be less than or equal to 1.5",
        ),
        err(
            "spec.min",
            "FieldValueInvalid",
            "Invalid value: 0: spec.min in body should be greater than or equal to 1",
        ),
        err(
            "spec.mul",
            "FieldValueInvalid",
            "Invalid value: 7: spec.mul in body should be a multiple of 5",
        ),
        err(
            "spec.xmax",
            "FieldValueInvalid",
            "Invalid value: 10: spec.xmax in body should be less than 10",
        ),
        err(
            "spec.xmin",
            "FieldValueInvalid",
            "Invalid value: 1: spec.xmin in body should be greater than 1",
        ),
    ];
    assert_eq!(
        errs, expected,
        "Invalid errors do not block CEL, so no notice"
    );
}

#[test]
fn string_length_and_pattern() {
    let schema = root(json!({"type": "object", "properties": {
        "long": {"type": "string", "maxLength": 3},
        "short": {"type": "string", "minLength": 3},
        "pat": {"type": "string", "pattern": "^[a-z]+$"}
    }}));
    let mut o = obj(json!({"long": "abcd", "short": "ab", "pat": "A1"}));
    let errs = validate(&schema, &mut o);
    assert_eq!(
        &errs[..3],
        &[
            err(
                "spec.long",
                "FieldValueTooLong",
                "Too long: may not be longer than 3"
            ),
            err(
                "spec.pat",
                "FieldValueInvalid",
                "Invalid value: \"A1\": spec.pat in body should match '^[a-z]+$'"
            ),
            err(
                "spec.short",
                "FieldValueInvalid",
                "Invalid value: \"ab\": spec.short in body should be at least 3 chars long"
            ),
        ]
    );
}

#[test]
fn list_bounds_and_item_paths() {
    let schema = root(json!({"type": "object", "properties": {
        "few": {"type": "array", "minItems": 2, "items": {"type": "string"}},
        "many": {"type": "array", "maxItems": 1, "items": {"type": "object", "required": ["name"],
            "properties": {"name": {"type": "string"}}}}
    }}));
    let mut o = obj(json!({"few": ["a"], "many": [{"name": "a"}, {}]}));
    let errs = validate(&schema, &mut o);
    assert_eq!(
        &errs[..3],
        &[
            err(
                "spec.few",
                "FieldValueInvalid",
                "Invalid value: 1: spec.few in body should have at least 2 items"
            ),
            err("spec.many[1].name", "FieldValueRequired", "Required value"),
            err(
                "spec.many",
                "FieldValueTooMany",
                "Too many: 2: must have at most 1 items"
            ),
        ]
    );
}

#[test]
fn map_values_and_property_counts() {
    let schema = root(json!({"type": "object", "properties": {
        "labels": {"type": "object", "maxProperties": 5, "additionalProperties": {"type": "string", "maxLength": 2}},
        "few": {"type": "object", "minProperties": 1, "additionalProperties": {"type": "string"}}
    }}));
    let mut o = obj(json!({"labels": {"foo": "toolong"}, "few": {}}));
    let errs = validate(&schema, &mut o);
    assert_eq!(
        &errs[..2],
        &[
            err(
                "spec.few",
                "FieldValueInvalid",
                "Invalid value: 0: spec.few in body should have at least 1 properties"
            ),
            err(
                "spec.labels.foo",
                "FieldValueTooLong",
                "Too long: may not be longer than 2"
            ),
        ]
    );
}

#[test]
fn nullable_fields() {
    let schema = root(json!({"type": "object", "properties": {
        "a": {"type": "string", "nullable": true},
        "items": {"type": "array", "items": {"type": "string"}}
    }}));
    let mut ok = obj(json!({"a": null}));
    assert!(validate_object(&schema, &mut ok, None).is_ok());
    assert_eq!(ok["spec"]["a"], Value::Null);
    // A null list item of a non-nullable item schema is a type error (items are not pruned).
    let mut bad = obj(json!({"items": ["x", null]}));
    assert_eq!(
        validate(&schema, &mut bad)[0],
        err(
            "spec.items[1]",
            "FieldValueTypeInvalid",
            "Invalid value: \"null\": spec.items[1] in body must be of type string: \"null\""
        )
    );
}

#[test]
fn int_or_string() {
    let schema = root(json!({"type": "object", "properties": {"q": {
        "x-kubernetes-int-or-string": true,
        "anyOf": [{"type": "integer"}, {"type": "string"}],
        "pattern": "^[0-9]+%?$"
    }}}));
    for ok in [json!(5), json!("50%")] {
        let mut o = obj(json!({"q": ok}));
        assert!(validate_object(&schema, &mut o, None).is_ok(), "{ok}");
    }
    let mut bad = obj(json!({"q": true}));
    let errs = validate(&schema, &mut bad);
    assert_eq!(
        errs[0],
        err(
            "spec.q",
            "FieldValueTypeInvalid",
            "Invalid value: \"boolean\": spec.q in body must be of type integer,string: \"boolean\""
        )
    );
    let mut bad_pattern = obj(json!({"q": "x"}));
    assert_eq!(validate(&schema, &mut bad_pattern)[0].field, "spec.q");
}

#[test]
fn formats() {
    let schema = root(json!({"type": "object", "properties": {
        "t": {"type": "string", "format": "date-time"},
        "n": {"type": "integer", "format": "int32"},
        "u": {"type": "string", "format": "uuid"}
    }}));
    let mut ok = obj(
        json!({"t": "2024-01-02T03:04:05Z", "n": 9_999_999_999i64, "u": "6ba7b810-9dad-11d1-80b4-00c04fd430c8"}),
    );
    assert!(
        validate_object(&schema, &mut ok, None).is_ok(),
        "int32 is not an enforced format"
    );
    let mut bad = obj(json!({"t": "yesterday"}));
    assert_eq!(
        validate(&schema, &mut bad)[0],
        err(
            "spec.t",
            "FieldValueTypeInvalid",
            "Invalid value: \"yesterday\": spec.t in body must be of type date-time: \"yesterday\""
        )
    );
}

#[test]
fn any_of_failure_is_reported_at_nil_path() {
    let schema = root(json!({"type": "object", "properties": {"v": {
        "type": "string", "anyOf": [{"pattern": "^a"}, {"pattern": "^b"}]
    }}}));
    let mut o = obj(json!({"v": "c"}));
    let errs = validate(&schema, &mut o);
    assert_eq!(
        errs[0],
        err(
            "<nil>",
            "FieldValueInvalid",
            "Invalid value: \"\": \"spec.v\" must validate at least one schema (anyOf)"
        )
    );
    assert_eq!(errs[1].field, "spec.v");
}

#[test]
fn collects_all_errors() {
    let schema = root(json!({"type": "object", "required": ["a"], "properties": {
        "a": {"type": "string"}, "b": {"type": "integer"}, "c": {"type": "boolean"}}}));
    let mut o = obj(json!({"b": "x", "c": 1}));
    let errs = validate(&schema, &mut o);
    let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(fields, ["spec.b", "spec.c", "spec.a", "<nil>"]);
}

// ── list types ─────────────────────────────────────────────────────────────

#[test]
fn list_type_map_duplicate_keys() {
    let schema = root(json!({"type": "object", "properties": {"ports": {
        "type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
        "items": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}, "port": {"type": "integer"}}}
    }}}));
    let mut o =
        obj(json!({"ports": [{"name": "a", "port": 1}, {"name": "b"}, {"name": "a", "port": 2}]}));
    assert_eq!(
        validate(&schema, &mut o),
        vec![err(
            "spec.ports[2]",
            "FieldValueDuplicate",
            "Duplicate value: map[string]interface {}{\"name\":\"a\"}"
        )]
    );
}

#[test]
fn list_type_set_duplicates() {
    let schema = root(json!({"type": "object", "properties": {"tags": {
        "type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}
    }}}));
    let mut o = obj(json!({"tags": ["a", "b", "a", "a"]}));
    assert_eq!(
        validate(&schema, &mut o),
        vec![err(
            "spec.tags[2]",
            "FieldValueDuplicate",
            "Duplicate value: \"a\""
        )]
    );
}

// ── CEL ────────────────────────────────────────────────────────────────────

fn cel_schema() -> Value {
    root(json!({
        "type": "object",
        "x-kubernetes-validations": [
            {"rule": "self.minSize <= self.maxSize", "message": "minSize must not exceed maxSize"},
            {"rule": "self.size == oldSelf.size", "message": "size is immutable", "reason": "FieldValueForbidden", "fieldPath": ".size"}
        ],
        "properties": {
            "minSize": {"type": "integer"},
            "maxSize": {"type": "integer"},
            "size": {"type": "integer"},
            "name": {"type": "string", "x-kubernetes-validations": [{"rule": "self.startsWith('t')"}]}
        }
    }))
}

#[test]
fn cel_rule_accepts_and_rejects() {
    let schema = cel_schema();
    let mut ok = obj(json!({"minSize": 1, "maxSize": 2, "size": 1, "name": "tessera"}));
    assert!(validate_object(&schema, &mut ok, None).is_ok());
    let mut bad = obj(json!({"minSize": 3, "maxSize": 2, "size": 1, "name": "x"}));
    assert_eq!(
        validate(&schema, &mut bad),
        vec![
            err(
                "spec",
                "FieldValueInvalid",
                "Invalid value: \"object\": minSize must not exceed maxSize"
            ),
            err(
                "spec.name",
                "FieldValueInvalid",
                "Invalid value: \"string\": failed rule: self.startsWith('t')"
            ),
        ]
    );
}

#[test]
fn transition_rule_only_on_update() {
    let schema = cel_schema();
    let mut created = obj(json!({"minSize": 1, "maxSize": 2, "size": 1, "name": "t"}));
    assert!(validate_object(&schema, &mut created, None).is_ok());
    let old = created.clone();
    let mut updated = obj(json!({"minSize": 1, "maxSize": 2, "size": 5, "name": "t"}));
    assert_eq!(
        validate_object(&schema, &mut updated, Some(&old)).unwrap_err(),
        vec![err(
            "spec.size",
            "FieldValueForbidden",
            "Forbidden: size is immutable"
        )]
    );
    let mut same = obj(json!({"minSize": 1, "maxSize": 2, "size": 1, "name": "t"}));
    assert!(validate_object(&schema, &mut same, Some(&old)).is_ok());
}

#[test]
fn cel_skipped_when_blocking_errors_exist() {
    let schema = cel_schema();
    let mut o = obj(json!({"minSize": "x", "maxSize": 2, "size": 1, "name": "x"}));
    let errs = validate(&schema, &mut o);
    assert_eq!(errs.len(), 2);
    assert_eq!(errs[0].reason, "FieldValueTypeInvalid");
    assert_eq!(
        errs[1],
        err(
            "<nil>",
            "FieldValueInvalid",
            &format!("Invalid value: \"null\": {CEL_SKIPPED}")
        )
    );
}

#[test]
fn ratcheting_ignores_unchanged_invalid_values() {
    let schema = root(json!({"type": "object", "properties": {
        "a": {"type": "string", "maxLength": 2},
        "b": {"type": "string", "x-kubernetes-validations": [{"rule": "self.size() < 3"}]},
        "c": {"type": "integer"}
    }}));
    let old = obj(json!({"a": "long", "b": "long", "c": 1}));
    let mut updated = obj(json!({"a": "long", "b": "long", "c": 2}));
    assert!(validate_object(&schema, &mut updated, Some(&old)).is_ok());
    let mut changed = obj(json!({"a": "longer", "b": "long", "c": 2}));
    assert_eq!(
        validate_object(&schema, &mut changed, Some(&old)).unwrap_err()[0].field,
        "spec.a"
    );
}

#[test]
fn cel_map_entries_and_list_map_correlation() {
    let schema = root(json!({"type": "object", "properties": {
        "labels": {"type": "object", "additionalProperties": {"type": "string",
            "x-kubernetes-validations": [{"rule": "self != 'bad'", "message": "no bad"}]}},
        "disks": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
            "items": {"type": "object", "required": ["name"], "properties": {
                "name": {"type": "string"},
                "size": {"type": "integer", "x-kubernetes-validations": [{"rule": "self >= oldSelf", "message": "cannot shrink"}]}
            }}}
    }}));
    let old =
        obj(json!({"labels": {}, "disks": [{"name": "a", "size": 10}, {"name": "b", "size": 5}]}));
    // Reordered items correlate by key: "b" shrinks.
    let mut o = obj(
        json!({"labels": {"foo": "bad"}, "disks": [{"name": "b", "size": 4}, {"name": "a", "size": 10}]}),
    );
    assert_eq!(
        validate_object(&schema, &mut o, Some(&old)).unwrap_err(),
        vec![
            err(
                "spec.disks[0].size",
                "FieldValueInvalid",
                "Invalid value: \"integer\": cannot shrink"
            ),
            err(
                "spec.labels[foo]",
                "FieldValueInvalid",
                "Invalid value: \"string\": no bad"
            ),
        ]
    );
}

#[test]
fn root_rule_is_reported_at_nil() {
    let schema = json!({"type": "object",
        "x-kubernetes-validations": [{"rule": "has(self.spec)", "message": "spec is required"}],
        "properties": {"spec": {"type": "object"}}});
    let mut o = json!({"apiVersion": "a/v1", "kind": "K", "metadata": {"name": "n"}});
    assert_eq!(
        validate(&schema, &mut o),
        vec![err(
            "<nil>",
            "FieldValueInvalid",
            "Invalid value: \"object\": spec is required"
        )]
    );
}

// ── robustness ─────────────────────────────────────────────────────────────

#[test]
fn never_panics_on_odd_inputs() {
    let schemas = [
        json!(null),
        json!("string"),
        json!({"type": 5, "properties": []}),
        json!({"type": "object", "properties": {"a": {"type": "array", "items": [1]}}}),
        json!({"type": "object", "properties": {"a": {"x-kubernetes-validations": [{"rule": "self."}, {"norule": 1}, 5]}}}),
        json!({"type": "object", "properties": {"a": {"type": "string", "pattern": "(unclosed"}}}),
        json!({"type": "object", "properties": {"a": {"type": "integer", "multipleOf": 0}}}),
    ];
    let mut deep = json!(1);
    for _ in 0..300 {
        deep = json!([deep]);
    }
    let objects = [
        json!(null),
        json!([1, 2]),
        obj(json!({"a": {"b": deep}})),
        obj(json!({"a": "x"})),
        obj(json!({"a": 3})),
    ];
    for s in &schemas {
        let _ = check_structural(s);
        for o in &objects {
            let mut o = o.clone();
            let _ = validate_object(s, &mut o, Some(&json!({"spec": 1})));
        }
    }
}

// ── check_structural ───────────────────────────────────────────────────────

#[test]
fn accepts_a_typical_structural_schema() {
    let schema = json!({
        "type": "object",
        "properties": {
            "spec": {
                "type": "object",
                "required": ["size"],
                "x-kubernetes-validations": [{"rule": "self.size >= 0", "message": "size must be >= 0"}],
                "properties": {
                    "size": {"type": "integer", "format": "int64"},
                    "mode": {"type": "string", "enum": ["A", "B"], "default": "A"},
                    "q": {"x-kubernetes-int-or-string": true, "anyOf": [{"type": "integer"}, {"type": "string"}]},
                    "tags": {"type": "array", "maxItems": 16, "x-kubernetes-list-type": "set",
                        "items": {"type": "string", "maxLength": 63}},
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                    "ports": {"type": "array", "maxItems": 8, "x-kubernetes-list-type": "map",
                        "x-kubernetes-list-map-keys": ["name"],
                        "items": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string", "maxLength": 15}},
                            "x-kubernetes-validations": [{"rule": "self.name == oldSelf.name"}]}},
                    "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
                }
            },
            "status": {"type": "object", "nullable": true, "properties": {"phase": {"type": "string"}}}
        }
    });
    assert_eq!(check_structural(&schema), Ok(()));
}

#[test]
fn rejects_non_structural_schemas() {
    let schema = json!({
        "type": "object",
        "properties": {
            "spec": {
                "type": "object",
                "properties": {
                    "untyped": {"description": "no type"},
                    "both": {"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": {"type": "string"}},
                    "mixed": {"type": "string", "anyOf": [{"type": "string", "description": "d"}]},
                    "list": {"type": "array"},
                    "u": {"type": "array", "uniqueItems": true, "items": {"type": "string"}}
                }
            },
            "metadata": {"type": "object", "properties": {"labels": {"type": "object"}}}
        }
    });
    let errs = check_structural(&schema).unwrap_err();
    let has = |field: &str, message: &str| {
        assert!(
            errs.iter()
                .any(|e| e.field == field && e.message == message),
            "missing {field}: {message} in {errs:#?}"
        );
    };
    has(
        "openAPIV3Schema.properties[spec].properties[untyped].type",
        "Required value: must not be empty for specified object fields",
    );
    has(
        "openAPIV3Schema.properties[spec].properties[mixed].anyOf[0].type",
        "Forbidden: must be empty to be structural",
    );
    has(
        "openAPIV3Schema.properties[spec].properties[mixed].anyOf[0].description",
        "Forbidden: must be empty to be structural",
    );
    has(
        "openAPIV3Schema.properties[spec].properties[list].items",
        "Required value: must be specified",
    );
    has(
        "openAPIV3Schema.properties[metadata]",
        "Forbidden: must not specify anything other than name and generateName, but metadata is implicitly specified",
    );
    // Schema-level errors (reported alongside structural ones).
    has(
        "openAPIV3Schema.properties[spec].properties[both].additionalProperties",
        "Forbidden: additionalProperties and properties are mutual exclusive",
    );
    has(
        "openAPIV3Schema.properties[spec].properties[u].uniqueItems",
        "Forbidden: uniqueItems cannot be set to true since the runtime complexity becomes quadratic",
    );
}

#[test]
fn rejects_bad_extensions_and_defaults() {
    let schema = json!({"type": "object", "properties": {"spec": {"type": "object", "properties": {
        "m": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
            "items": {"type": "object", "properties": {"name": {"type": "string"}}}},
        "d": {"type": "integer", "default": "x"},
        "p": {"type": "object", "properties": {"a": {"type": "string"}}, "default": {"a": "x", "b": 1}}
    }}}});
    let errs = check_structural(&schema).unwrap_err();
    let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
    assert!(
        fields.contains(
            &"openAPIV3Schema.properties[spec].properties[m].items.properties[name].default"
        ),
        "{errs:#?}"
    );
    assert!(
        errs.contains(&err(
            "openAPIV3Schema.properties[spec].properties[d].default",
            "FieldValueTypeInvalid",
            "Invalid value: \"string\":  in body must be of type integer: \"string\""
        )),
        "{errs:#?}"
    );
    assert!(
        errs.contains(&err(
            "openAPIV3Schema.properties[spec].properties[p].default",
            "FieldValueInvalid",
            "Invalid value: map[string]interface {}{\"a\":\"x\", \"b\":1}: must not have unknown fields"
        )),
        "{errs:#?}"
    );
}

#[test]
fn rejects_cel_rules_that_do_not_compile_or_misuse_old_self() {
    let schema = json!({"type": "object", "properties": {"spec": {"type": "object",
    "x-kubernetes-validations": [
        {"rule": "self.size >"},
        {"rule": "self.nosuch == 1"},
        {"rule": "self.size", "message": "m"},
        {"rule": "request.user == 'x'"},
        {"rule": "self.size > 0", "optionalOldSelf": true}
    ],
    "properties": {
        "size": {"type": "integer"},
        "items": {"type": "array", "items": {"type": "string", "maxLength": 5,
            "x-kubernetes-validations": [{"rule": "self == oldSelf"}]}}
    }}}});
    let errs = check_structural(&schema).unwrap_err();
    let at =
        |i: usize| format!("openAPIV3Schema.properties[spec].x-kubernetes-validations[{i}].rule");
    let find = |field: &str| {
        errs.iter()
            .find(|e| e.field == field)
            .map(|e| e.message.clone())
            .unwrap_or_default()
    };
    assert!(find(&at(0)).contains("compilation failed"), "{errs:#?}");
    assert!(
        find(&at(1)).ends_with("undefined field 'nosuch'"),
        "{errs:#?}"
    );
    assert!(
        find(&at(2)).ends_with("cel expression must evaluate to a bool"),
        "{errs:#?}"
    );
    assert!(
        find(&at(3)).contains("undeclared reference to 'request'"),
        "{errs:#?}"
    );
    assert_eq!(
        find("openAPIV3Schema.properties[spec].x-kubernetes-validations[4].optionalOldSelf"),
        "Invalid value: true: may not be set if oldSelf is not used in rule"
    );
    assert_eq!(
        find(
            "openAPIV3Schema.properties[spec].properties[items].items.x-kubernetes-validations[0].rule"
        ),
        "Invalid value: \"self == oldSelf\": oldSelf cannot be used on the uncorrelatable portion of the schema within openAPIV3Schema.properties[spec].properties[items]"
    );
}

#[test]
fn flags_rules_over_the_cost_budget() {
    // Nested comprehension over unbounded lists of unbounded strings: far over 10M.
    let expensive = json!({"type": "object", "properties": {"spec": {"type": "object",
        "x-kubernetes-validations": [{"rule": "self.names.all(a, self.names.all(b, a == b || !a.contains(b)))"}],
        "properties": {"names": {"type": "array", "items": {"type": "string"}}}}}});
    let errs = check_structural(&expensive).unwrap_err();
    assert!(
        errs.iter().any(|e| e.field == "openAPIV3Schema.properties[spec].x-kubernetes-validations[0].rule"
            && e.reason == "FieldValueForbidden"
            && e.message
                == "Forbidden: estimated rule cost exceeds budget by factor of more than 100x (try simplifying the rule, or adding maxItems, maxProperties, and maxLength where arrays, maps, and strings are declared)"),
        "{errs:#?}"
    );
    // The same rule with bounds fits.
    let bounded = json!({"type": "object", "properties": {"spec": {"type": "object",
        "x-kubernetes-validations": [{"rule": "self.names.all(a, self.names.all(b, a == b || !a.contains(b)))"}],
        "properties": {"names": {"type": "array", "maxItems": 20, "items": {"type": "string", "maxLength": 64}}}}}});
    assert_eq!(check_structural(&bounded), Ok(()));
}

#[test]
fn rule_cardinality_multiplies_cost() {
    // A cheap-looking rule on items of an unbounded list of unbounded strings.
    let schema = json!({"type": "object", "properties": {"spec": {"type": "object", "properties": {
        "names": {"type": "array", "items": {"type": "string",
            "x-kubernetes-validations": [{"rule": "self.matches('^[a-z]+$')"}]}}}}}});
    let errs = check_structural(&schema).unwrap_err();
    assert_eq!(
        errs[0].field,
        "openAPIV3Schema.properties[spec].properties[names].items.x-kubernetes-validations[0].rule"
    );
    let ok = json!({"type": "object", "properties": {"spec": {"type": "object", "properties": {
        "names": {"type": "array", "maxItems": 100, "items": {"type": "string", "maxLength": 63,
            "x-kubernetes-validations": [{"rule": "self.matches('^[a-z]+$')"}]}}}}}});
    assert_eq!(check_structural(&ok), Ok(()));
}

#[test]
fn format_regexes_compile() {
    for f in [
        "uuid",
        "uuid3",
        "uuid4",
        "uuid5",
        "hostname",
        "email",
        "hexcolor",
        "rgbcolor",
        "ssn",
        "isbn",
        "creditcard",
        "bsonobjectid",
        "date",
        "datetime",
        "duration",
    ] {
        // Each has at least one accepted sample, so a broken regex would fail here.
        let sample = match f {
            "uuid" | "uuid4" => "6ba7b810-9dad-41d1-80b4-00c04fd430c8",
            "uuid3" => "6ba7b810-9dad-31d1-80b4-00c04fd430c8",
            "uuid5" => "6ba7b810-9dad-51d1-80b4-00c04fd430c8",
            "hostname" => "node-1.example.com",
            "email" => "a@b.c",
            "hexcolor" => "#fff",
            "rgbcolor" => "rgb(1,2,3)",
            "ssn" => "123-45-6789",
            "isbn" => "0321751043",
            "creditcard" => "4111 1111 1111 1111",
            "bsonobjectid" => "507f1f77bcf86cd799439011",
            "date" => "2024-02-29",
            "datetime" => "2024-02-29T10:00:00.5+01:00",
            _ => "1h30m",
        };
        assert!(formats::validates(f.to_string(), sample), "{f}: {sample}");
    }
    assert!(!formats::validates("duration".into(), "soon"));
    assert!(formats::validates("duration".into(), "3 days"));
}

#[test]
fn go_formatting() {
    assert_eq!(errors::go_float(1.0), "1");
    assert_eq!(errors::go_float(1.5), "1.5");
    assert_eq!(errors::go_float(1e6), "1e+06");
    assert_eq!(errors::go_float(123456.0), "123456");
    assert_eq!(errors::go_float(0.0001), "0.0001");
    assert_eq!(errors::go_float(0.00001), "1e-05");
    assert_eq!(errors::go_quote("a\"b\n\u{1}"), "\"a\\\"b\\n\\x01\"");
    assert_eq!(
        errors::go_value(&json!([1, "a", null])),
        "[]interface {}{1, \"a\", interface {}(nil)}"
    );
}
