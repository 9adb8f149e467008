//! The tessera CRDs and examples against the embedded API server: the CRDs are structural with
//! CEL rules inside the cost budget (what a real API server ≥ 1.28 checks), the examples apply
//! cleanly, each broken copy in `examples/invalid/` is refused with a clear 422, and `kubectl`
//! drives it all through the kubeconfig the server writes.

use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde::Deserialize;
use serde_json::Value;
use tessera_apiserver::{ApiServer, RunningServer};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

async fn server_with_crds(dir: &Path) -> RunningServer {
    let server = ApiServer::builder()
        .data_dir(dir.join("data"))
        .kubeconfig_path(dir.join("kubeconfig"))
        .start()
        .await
        .expect("server starts");
    let crds: Api<CustomResourceDefinition> = Api::all(server.client());
    for crd in tessera_api::crds::all() {
        crds.create(&PostParams::default(), &crd)
            .await
            .unwrap_or_else(|e| panic!("CRD {:?} refused: {e}", crd.metadata.name));
    }
    server
}

/// The dynamic API for an object of the tessera group.
fn api_for(server: &RunningServer, doc: &Value) -> Api<DynamicObject> {
    let kind = doc["kind"].as_str().unwrap();
    let crd = tessera_api::crds::by_kind(kind).unwrap();
    let gvk = GroupVersionKind::gvk("tessera.io", "v1alpha1", kind);
    let ar = ApiResource::from_gvk_with_plural(&gvk, &crd.spec.names.plural);
    match doc["metadata"]["namespace"].as_str() {
        Some(ns) => Api::namespaced_with(server.client(), ns, &ar),
        None => Api::all_with(server.client(), &ar),
    }
}

#[test]
fn tessera_crds_are_structural_with_cel_in_budget() {
    for crd in tessera_api::crds::all() {
        for version in &crd.spec.versions {
            let schema = serde_json::to_value(
                version
                    .schema
                    .as_ref()
                    .and_then(|s| s.open_api_v3_schema.as_ref())
                    .expect("every version has a schema"),
            )
            .unwrap();
            if let Err(errors) = tessera_apiserver::validation::check_structural(&schema) {
                panic!("{}: {errors:#?}", crd.metadata.name.unwrap_or_default());
            }
        }
    }
}

#[tokio::test]
async fn examples_apply_and_broken_copies_are_rejected_with_their_message() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with_crds(dir.path()).await;

    let mut applied = 0;
    for file in yaml_files(&repo().join("examples")) {
        for doc in documents(&file) {
            let obj: DynamicObject = serde_json::from_value(doc.clone()).unwrap();
            api_for(&server, &doc)
                .create(&PostParams::default(), &obj)
                .await
                .unwrap_or_else(|e| panic!("{} refused: {e}", file.display()));
            applied += 1;
        }
    }
    assert_eq!(applied, 1 + 6 + 2 + 2);

    // Each broken copy, and the message(s) the user must see.
    let expected: &[(&str, &[&str])] = &[
        (
            "00-pool.yaml",
            &["extentSizeBytes must be a power of two from 65536 (64 KiB) to 1073741824 (1 GiB)"],
        ),
        (
            "01-area.yaml",
            &[
                "path must be absolute",
                "must be a positive multiple of 4096 bytes",
            ],
        ),
        ("02-priority-class.yaml", &["Unsupported value: \"Medium\""]),
        (
            "03-claim.yaml",
            &[
                "copies must be 1, 2 or 3",
                "must be a positive multiple of 4096 bytes",
            ],
        ),
    ];
    for (file, messages) in expected {
        let path = repo().join("examples/invalid").join(file);
        for doc in documents(&path) {
            let obj: DynamicObject = serde_json::from_value(doc.clone()).unwrap();
            match api_for(&server, &doc)
                .create(&PostParams::default(), &obj)
                .await
            {
                Ok(_) => panic!("{file} was accepted"),
                Err(kube::Error::Api(status)) => {
                    assert_eq!(status.code, 422, "{file}: {status:?}");
                    for m in *messages {
                        assert!(
                            status.message.contains(m),
                            "{file}: {:?} does not say {m:?}",
                            status.message
                        );
                    }
                }
                Err(e) => panic!("{file}: unexpected error {e}"),
            }
        }
    }
    server.shutdown().await;
}

fn kubectl() -> Option<&'static str> {
    let found = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success());
    found.then_some("kubectl")
}

#[tokio::test]
async fn kubectl_applies_examples_shows_printer_columns_and_deletes() {
    let Some(kubectl) = kubectl() else {
        println!("skipping: kubectl is not installed");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let server = ApiServer::builder()
        .data_dir(dir.path().join("data"))
        .kubeconfig_path(dir.path().join("kubeconfig"))
        .start()
        .await
        .unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    let run = |args: &[&str]| {
        let kubeconfig = kubeconfig.clone();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        async move {
            tokio::task::spawn_blocking(move || {
                let out = Command::new(kubectl)
                    .arg("--kubeconfig")
                    .arg(&kubeconfig)
                    .args(&args)
                    .current_dir(repo())
                    .output()
                    .unwrap();
                (
                    out.status.success(),
                    String::from_utf8_lossy(&out.stdout).into_owned(),
                    String::from_utf8_lossy(&out.stderr).into_owned(),
                )
            })
            .await
            .unwrap()
        }
    };

    let (ok, out, err) = run(&["apply", "-f", "crds/"]).await;
    assert!(ok, "apply crds: {out}{err}");
    let (ok, out, err) = run(&["apply", "-f", "examples/"]).await;
    assert!(ok, "apply examples: {out}{err}");
    assert!(
        out.contains("storagepool.tessera.io/default created"),
        "{out}"
    );

    // Printer columns come from the CRD, through the server's Table.
    let (ok, out, err) = run(&["get", "sarea"]).await;
    assert!(ok, "{err}");
    let header = out.lines().next().unwrap_or_default();
    for column in ["NAME", "NODE", "POOL", "MEDIA", "CAPACITY", "PHASE", "AGE"] {
        assert!(header.contains(column), "missing {column}: {header}");
    }
    assert!(
        out.contains("node-b-area-1") && out.contains("hdd"),
        "{out}"
    );
    let (ok, out, err) = run(&["get", "sclaim", "-n", "default"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("database") && out.contains("2147483648") && out.contains("high"));

    // The category lists every tessera kind.
    let (ok, out, err) = run(&["get", "tessera", "-A"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("storagepool.tessera.io/default"), "{out}");
    assert!(out.contains("storagepriorityclass.tessera.io/low"), "{out}");

    // A broken copy is refused with its message.
    let (ok, _, err) = run(&["apply", "-f", "examples/invalid/00-pool.yaml"]).await;
    assert!(!ok);
    assert!(
        err.contains("extentSizeBytes must be a power of two"),
        "{err}"
    );

    let (ok, out, err) = run(&["delete", "-f", "examples/"]).await;
    assert!(ok, "delete: {out}{err}");
    let (ok, out, _) = run(&["get", "sarea", "-o", "name"]).await;
    assert!(ok && out.trim().is_empty(), "areas left: {out}");
    server.shutdown().await;
}
