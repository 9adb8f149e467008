//! `tessera-operator crdgen` writes one file per kind and removes files of kinds that no longer
//! exist.

use std::process::Command;

#[test]
fn crdgen_writes_every_kind_and_prunes_stale_files() {
    let dir = tempfile::tempdir().unwrap();
    let stale = dir.path().join("oldkinds.tessera.io.yaml");
    let unrelated = dir.path().join("keep-me.yaml");
    std::fs::write(&stale, "stale").unwrap();
    std::fs::write(&unrelated, "mine").unwrap();

    let status = Command::new(env!("CARGO_BIN_EXE_tessera-operator"))
        .arg("crdgen")
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success());

    for (file, yaml) in tessera_api::crds::rendered().unwrap() {
        let written = std::fs::read_to_string(dir.path().join(&file)).unwrap();
        assert_eq!(written, yaml, "{file}");
    }
    assert!(
        !stale.exists(),
        "a CRD file of a removed kind must be deleted"
    );
    assert!(
        unrelated.exists(),
        "files that are not tessera CRDs are left alone"
    );
}

#[test]
fn crdgen_stdout_is_one_multi_document_stream() {
    let out = Command::new(env!("CARGO_BIN_EXE_tessera-operator"))
        .args(["crdgen", "--stdout"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.matches("kind: CustomResourceDefinition").count(), 7);
}
