//! Every CEL rule (`x-kubernetes-validations`) of the tessera CRDs, evaluated with kube's `cel`
//! feature: a valid object is accepted and an invalid one is rejected with the rule's message.

use kube::core::cel::Validator;
use serde_json::{Value, json};
use tessera_api::crds;

fn schema(kind: &str) -> Value {
    crds::openapi_schema(kind).unwrap_or_else(|| panic!("no CRD for {kind}"))
}

fn object(kind: &str, spec: Value) -> Value {
    json!({"apiVersion": "tessera.io/v1alpha1", "kind": kind, "metadata": {"name": "x"}, "spec": spec})
}

/// Messages of the rules `spec` violates (given the old spec for transition rules).
fn violations(kind: &str, spec: Value, old: Option<Value>) -> Vec<String> {
    let old = old.map(|o| object(kind, o));
    match Validator::new().validate(&schema(kind), &object(kind, spec), old.as_ref()) {
        Ok(()) => vec![],
        Err(errors) => errors.iter().map(|e| e.message.clone()).collect(),
    }
}

#[track_caller]
fn accepts(kind: &str, spec: Value, old: Option<Value>) {
    let v = violations(kind, spec.clone(), old);
    assert!(v.is_empty(), "{kind} {spec} should be valid, got {v:?}");
}

#[track_caller]
fn rejects(kind: &str, spec: Value, old: Option<Value>, message: &str) {
    let v = violations(kind, spec.clone(), old);
    assert!(
        v.iter().any(|m| m == message),
        "{kind} {spec} should be rejected with {message:?}, got {v:?}"
    );
}

/// `base` with the dotted `path` set to `value`.
fn with(mut base: Value, path: &str, value: Value) -> Value {
    let mut cur = &mut base;
    let parts: Vec<&str> = path.split('.').collect();
    for p in &parts[..parts.len() - 1] {
        cur = &mut cur[*p];
    }
    cur[parts[parts.len() - 1]] = value;
    base
}

const SIZE_MSG: &str = "must be a positive multiple of 4096 bytes";

fn area() -> Value {
    json!({"nodeName": "node-a", "path": "/var/lib/tessera/a0.img", "sizeBytes": 1073741824,
           "mediaType": "ssd", "poolName": "pool"})
}

#[test]
fn area_size_is_a_positive_multiple_of_4096() {
    accepts("StorageArea", area(), None);
    for bad in [1000, 0, -4096] {
        rejects(
            "StorageArea",
            with(area(), "sizeBytes", json!(bad)),
            None,
            SIZE_MSG,
        );
    }
}

#[test]
fn area_path_is_absolute() {
    rejects(
        "StorageArea",
        with(area(), "path", json!("data/a0.img")),
        None,
        "path must be absolute",
    );
}

#[test]
fn area_node_path_and_pool_are_immutable() {
    accepts(
        "StorageArea",
        with(area(), "mediaType", json!("nvme")),
        Some(area()),
    );
    for (field, value, msg) in [
        ("nodeName", "node-b", "nodeName is immutable"),
        ("path", "/other.img", "path is immutable"),
        ("poolName", "other", "poolName is immutable"),
    ] {
        rejects(
            "StorageArea",
            with(area(), field, json!(value)),
            Some(area()),
            msg,
        );
    }
}

fn pool() -> Value {
    json!({"extentSizeBytes": 4194304})
}

#[test]
fn pool_extent_size_is_a_power_of_two_from_64k_to_1g() {
    let msg = "extentSizeBytes must be a power of two from 65536 (64 KiB) to 1073741824 (1 GiB)";
    for ok in [65536_i64, 1 << 20, 4 << 20, 1 << 30] {
        accepts("StoragePool", json!({"extentSizeBytes": ok}), None);
    }
    for bad in [32768_i64, 3 << 20, (4 << 20) + 4096, 2 << 30, 0, -65536] {
        rejects("StoragePool", json!({"extentSizeBytes": bad}), None, msg);
    }
}

#[test]
fn pool_extent_size_is_immutable() {
    accepts("StoragePool", pool(), Some(pool()));
    rejects(
        "StoragePool",
        json!({"extentSizeBytes": 1048576}),
        Some(pool()),
        "extentSizeBytes is immutable",
    );
}

#[test]
fn pool_reclaim_tiers_do_not_repeat() {
    accepts(
        "StoragePool",
        with(
            pool(),
            "reclaim",
            json!({"tiers": ["Unused", "LowPriority"]}),
        ),
        None,
    );
    rejects(
        "StoragePool",
        with(pool(), "reclaim", json!({"tiers": ["Unused", "Unused"]})),
        None,
        "tiers must not repeat",
    );
}

fn claim() -> Value {
    json!({"poolName": "pool", "sizeBytes": 1073741824, "priorityClassName": "high", "copies": 1})
}

#[test]
fn claim_size_and_copies() {
    accepts("StorageClaim", claim(), None);
    accepts("StorageClaim", with(claim(), "copies", json!(3)), None);
    rejects(
        "StorageClaim",
        with(claim(), "sizeBytes", json!(1073741825)),
        None,
        SIZE_MSG,
    );
    for bad in [0, 4] {
        rejects(
            "StorageClaim",
            with(claim(), "copies", json!(bad)),
            None,
            "copies must be 1, 2 or 3",
        );
    }
}

#[test]
fn claim_transitions() {
    accepts(
        "StorageClaim",
        with(claim(), "sizeBytes", json!(2147483648_i64)),
        Some(claim()),
    );
    rejects(
        "StorageClaim",
        with(claim(), "sizeBytes", json!(536870912)),
        Some(claim()),
        "sizeBytes may grow but not shrink",
    );
    rejects(
        "StorageClaim",
        with(claim(), "poolName", json!("p2")),
        Some(claim()),
        "poolName is immutable",
    );
    rejects(
        "StorageClaim",
        with(claim(), "copies", json!(2)),
        Some(claim()),
        "copies is immutable",
    );
}

fn volume() -> Value {
    json!({"sizeBytes": 8388608, "poolName": "pool", "priorityClassName": "low", "copies": 2})
}

#[test]
fn volume_rules() {
    accepts("VirtualVolume", volume(), None);
    accepts(
        "VirtualVolume",
        with(volume(), "accessNode", json!("node-a")),
        Some(volume()),
    );
    rejects(
        "VirtualVolume",
        with(volume(), "sizeBytes", json!(100)),
        None,
        SIZE_MSG,
    );
    rejects(
        "VirtualVolume",
        with(volume(), "copies", json!(5)),
        None,
        "copies must be 1, 2 or 3",
    );
    rejects(
        "VirtualVolume",
        with(volume(), "poolName", json!("p2")),
        Some(volume()),
        "poolName is immutable",
    );
    rejects(
        "VirtualVolume",
        with(volume(), "sizeBytes", json!(4194304)),
        Some(volume()),
        "sizeBytes may grow but not shrink",
    );
}

#[test]
fn mirror_pair_names_exactly_one_secondary() {
    let msg = "exactly one of secondary or secondarySelection must be set";
    accepts(
        "MirrorPair",
        json!({"primary": "vol-0", "secondary": "vol-1"}),
        None,
    );
    accepts(
        "MirrorPair",
        json!({"primary": "vol-0", "secondarySelection": "SameOrLarger"}),
        None,
    );
    rejects("MirrorPair", json!({"primary": "vol-0"}), None, msg);
    rejects(
        "MirrorPair",
        json!({"primary": "vol-0", "secondary": "vol-1", "secondarySelection": "SameSize"}),
        None,
        msg,
    );
}

#[test]
fn mirror_pair_members_are_immutable() {
    let old = json!({"primary": "vol-0", "secondary": "vol-1"});
    accepts(
        "MirrorPair",
        json!({"primary": "vol-0", "secondary": "vol-1", "desiredState": "Split"}),
        Some(old.clone()),
    );
    rejects(
        "MirrorPair",
        json!({"primary": "vol-9", "secondary": "vol-1"}),
        Some(old.clone()),
        "primary is immutable",
    );
    rejects(
        "MirrorPair",
        json!({"primary": "vol-0", "secondary": "vol-2"}),
        Some(old),
        "secondary and secondarySelection are immutable",
    );
}

fn release() -> Value {
    json!({"volumeName": "vol-0", "operation": {"type": "ReleaseRanges",
           "releaseRanges": {"ranges": [{"offset": 0, "length": 4194304}], "tier": "Unused"}}})
}

#[test]
fn remap_operation_is_a_discriminated_union() {
    accepts("VolumeRemap", release(), None);
    accepts(
        "VolumeRemap",
        json!({"volumeName": "vol-0", "copy": {"mode": "Online"},
               "operation": {"type": "EvacuateArea", "evacuateArea": {"area": "a0"}}}),
        None,
    );
    let wrong_member = json!({"volumeName": "vol-0",
        "operation": {"type": "Move", "evacuateArea": {"area": "a0"}}});
    rejects(
        "VolumeRemap",
        wrong_member.clone(),
        None,
        "move must be set exactly when type is Move",
    );
    rejects(
        "VolumeRemap",
        wrong_member,
        None,
        "evacuateArea must be set exactly when type is EvacuateArea",
    );
    rejects(
        "VolumeRemap",
        json!({"volumeName": "vol-0", "operation": {"type": "EvacuateArea"}}),
        None,
        "evacuateArea must be set exactly when type is EvacuateArea",
    );
    rejects(
        "VolumeRemap",
        with(release(), "operation.type", json!("Move")),
        None,
        "releaseRanges must be set exactly when type is ReleaseRanges",
    );
}

#[test]
fn remap_ranges_and_chunks_are_aligned() {
    let bad_offset = with(
        release(),
        "operation.releaseRanges.ranges",
        json!([{"offset": 100, "length": 4096}]),
    );
    rejects(
        "VolumeRemap",
        bad_offset,
        None,
        "offset must be a multiple of 4096 bytes",
    );
    let bad_length = with(
        release(),
        "operation.releaseRanges.ranges",
        json!([{"offset": 0, "length": 0}]),
    );
    rejects("VolumeRemap", bad_length, None, SIZE_MSG);
    rejects(
        "VolumeRemap",
        with(
            release(),
            "copy",
            json!({"mode": "Online", "chunkBytes": 1000}),
        ),
        None,
        SIZE_MSG,
    );
}

#[test]
fn remap_spec_is_immutable() {
    accepts("VolumeRemap", release(), Some(release()));
    rejects(
        "VolumeRemap",
        with(release(), "volumeName", json!("vol-1")),
        Some(release()),
        "a VolumeRemap spec is immutable; create a new VolumeRemap",
    );
}

#[test]
fn pool_reclaim_takes_unused_before_low_priority_data() {
    accepts(
        "StoragePool",
        with(pool(), "reclaim", json!({"tiers": ["Unused"]})),
        None,
    );
    rejects(
        "StoragePool",
        with(
            pool(),
            "reclaim",
            json!({"tiers": ["LowPriority", "Unused"]}),
        ),
        None,
        "Unused must come before LowPriority: data is released only when no unused space is left",
    );
}

#[test]
fn area_size_may_grow_but_not_shrink() {
    accepts(
        "StorageArea",
        with(area(), "sizeBytes", json!(2147483648_i64)),
        Some(area()),
    );
    rejects(
        "StorageArea",
        with(area(), "sizeBytes", json!(536870912)),
        Some(area()),
        "sizeBytes may grow but not shrink",
    );
}

#[test]
fn priority_class_data_priority_is_immutable() {
    let high = json!({"value": 1000, "dataPriority": "High"});
    accepts(
        "StoragePriorityClass",
        json!({"value": 900, "dataPriority": "High"}),
        Some(high.clone()),
    );
    rejects(
        "StoragePriorityClass",
        json!({"value": 1000, "dataPriority": "Low"}),
        Some(high),
        "dataPriority is immutable: data already written keeps the priority it was written with",
    );
}

#[test]
fn volume_copies_are_immutable() {
    rejects(
        "VirtualVolume",
        with(volume(), "copies", json!(1)),
        Some(volume()),
        "copies is immutable",
    );
}

#[test]
fn mirror_pair_cannot_swap_secondary_for_selection() {
    let msg = "secondary and secondarySelection are immutable";
    let named = json!({"primary": "vol-0", "secondary": "vol-1"});
    let selected = json!({"primary": "vol-0", "secondarySelection": "SameSize"});
    accepts("MirrorPair", selected.clone(), Some(selected.clone()));
    rejects("MirrorPair", selected.clone(), Some(named.clone()), msg);
    rejects("MirrorPair", named, Some(selected.clone()), msg);
    rejects(
        "MirrorPair",
        json!({"primary": "vol-0", "secondarySelection": "ResizeToMatch"}),
        Some(selected),
        msg,
    );
}

#[test]
fn remap_moves_copy_and_releases_do_not() {
    let msg = "Move and EvacuateArea must copy data (copy.mode: Online); ReleaseRanges copies nothing (copy.mode: None)";
    let evacuate = json!({"volumeName": "vol-0",
        "operation": {"type": "EvacuateArea", "evacuateArea": {"area": "a0"}}});
    accepts(
        "VolumeRemap",
        with(evacuate.clone(), "copy", json!({"mode": "Online"})),
        None,
    );
    rejects("VolumeRemap", evacuate, None, msg);
    rejects(
        "VolumeRemap",
        with(release(), "copy", json!({"mode": "Online"})),
        None,
        msg,
    );
}
