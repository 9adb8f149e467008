//! The YAML in `examples/` deserializes into the typed kinds and passes every CEL rule. (The
//! server-side check, schema and CEL, including the broken copies in `examples/invalid/`, is in
//! `apiserver/tests/tessera_examples.rs`.)

use kube::core::cel::Validator;
use serde::Deserialize;
use serde_json::Value;
use std::path::{Path, PathBuf};
use tessera_api::v1alpha1::*;

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn typed(doc: &Value) -> Result<(), serde_json::Error> {
    let kind = doc["kind"].as_str().unwrap_or_default();
    let d = doc.clone();
    match kind {
        "StoragePool" => serde_json::from_value::<StoragePool>(d).map(drop),
        "StorageArea" => serde_json::from_value::<StorageArea>(d).map(drop),
        "StoragePriorityClass" => serde_json::from_value::<StoragePriorityClass>(d).map(drop),
        "StorageClaim" => serde_json::from_value::<StorageClaim>(d).map(drop),
        "VirtualVolume" => serde_json::from_value::<VirtualVolume>(d).map(drop),
        "MirrorPair" => serde_json::from_value::<MirrorPair>(d).map(drop),
        "VolumeRemap" => serde_json::from_value::<VolumeRemap>(d).map(drop),
        other => panic!("unexpected kind {other:?}"),
    }
}

fn cel(doc: &Value) -> Result<(), String> {
    let kind = doc["kind"].as_str().unwrap();
    let schema = tessera_api::crds::openapi_schema(kind).unwrap();
    Validator::new()
        .validate(&schema, doc, None)
        .map_err(|e| format!("{e:?}"))
}

#[test]
fn examples_are_valid_objects() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut kinds = std::collections::BTreeMap::<String, usize>::new();
    for file in yaml_files(&dir) {
        for doc in documents(&file) {
            typed(&doc).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            cel(&doc).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            *kinds
                .entry(doc["kind"].as_str().unwrap().into())
                .or_default() += 1;
        }
    }
    // The example set: one pool, six areas on three nodes, classes high and low, claims.
    assert_eq!(kinds.get("StoragePool"), Some(&1));
    assert_eq!(kinds.get("StorageArea"), Some(&6));
    assert_eq!(kinds.get("StoragePriorityClass"), Some(&2));
    assert!(kinds.get("StorageClaim").is_some_and(|n| *n >= 2));
}

#[test]
fn example_areas_span_three_nodes() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/01-areas.yaml");
    let nodes: std::collections::BTreeSet<String> = documents(&path)
        .iter()
        .map(|d| {
            serde_json::from_value::<StorageArea>(d.clone())
                .unwrap()
                .spec
                .node_name
        })
        .collect();
    assert_eq!(nodes.len(), 3);
}

#[test]
fn invalid_examples_are_rejected_by_types_or_rules() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/invalid");
    let files = yaml_files(&dir);
    assert_eq!(files.len(), 4, "one broken copy per example file");
    for file in files {
        for doc in documents(&file) {
            let typed_err = typed(&doc).err().map(|e| e.to_string());
            let cel_err = cel(&doc).err();
            assert!(
                typed_err.is_some() || cel_err.is_some(),
                "{} should be invalid",
                file.display()
            );
        }
    }
}
