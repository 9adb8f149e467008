//! StorageClaim names from CSI volume names.
//!
//! The CO's name (`pvc-<uid>` from the external-provisioner) is already a DNS-1123 label and is
//! used as it is, so `kubectl get sclaim` shows the PVC's id. Any other name (the CSI spec
//! allows up to 128 arbitrary characters) is lowercased, reduced to `[a-z0-9-]`, cut to 40
//! characters and suffixed with a hash of the original, so two different CSI names never share
//! a claim; the original is kept in the claim's `tessera.io/csi-name` annotation, which
//! CreateVolume compares to detect the (unlikely) hash collision.

/// Annotation holding the CSI name exactly.
pub const CSI_NAME_ANNOTATION: &str = "tessera.io/csi-name";
/// Label with the CSI name (or its hash when it is no valid label value), for selection.
pub const CSI_NAME_LABEL: &str = "tessera.io/csi-name";

/// Whether `name` is a DNS-1123 label (what every claim name here is).
fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// 64-bit FNV-1a: stable across releases and platforms (claim names must never change).
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The StorageClaim name for a CSI volume name.
pub fn claim_name(csi_name: &str) -> String {
    if is_dns_label(csi_name) {
        return csi_name.to_owned();
    }
    let mut base: String = csi_name
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(40)
        .collect();
    base = base.trim_matches('-').to_owned();
    if base.is_empty() {
        base.push_str("csi");
    }
    format!("{base}-{:016x}", fnv1a(csi_name))
}

/// The `tessera.io/csi-name` label value.
pub fn csi_name_label(csi_name: &str) -> String {
    if is_dns_label(csi_name) {
        csi_name.to_owned()
    } else {
        format!("h-{:016x}", fnv1a(csi_name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provisioner_names_are_kept() {
        let name = "pvc-5f0c6f7e-3a2b-4a8e-9d3c-1b2a3c4d5e6f";
        assert_eq!(claim_name(name), name);
        assert_eq!(csi_name_label(name), name);
    }

    #[test]
    fn other_names_become_distinct_dns_labels() {
        let long = format!("Sanity-Controller-{}", "X".repeat(110));
        let names = [long.as_str(), "a_b", "a.b", "A-B", "-x-", "é"];
        let claims: Vec<String> = names.iter().map(|n| claim_name(n)).collect();
        for claim in &claims {
            assert!(is_dns_label(claim), "{claim:?}");
        }
        let distinct: std::collections::BTreeSet<_> = claims.iter().collect();
        assert_eq!(distinct.len(), names.len(), "{claims:?}");
        assert_eq!(claim_name("a_b"), claim_name("a_b"), "deterministic");
    }
}
