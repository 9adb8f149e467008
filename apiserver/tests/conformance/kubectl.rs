//! The real `kubectl` against the server through the kubeconfig it writes.

use std::path::Path;

use kube::CustomResourceExt;

use crate::support::*;

const KUBECTL: &str = "/usr/bin/kubectl";

async fn kubectl(kubeconfig: &Path, cache: &Path, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(KUBECTL)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--cache-dir")
        .arg(cache)
        .args(args)
        .output()
        .await
        .expect("kubectl runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn kubectl_apply_get_delete_api_resources() {
    if !Path::new(KUBECTL).exists() {
        eprintln!("SKIPPED kubectl_apply_get_delete_api_resources: {KUBECTL} not found");
        return;
    }
    let ts = TestServer::start().await;
    let kubeconfig = ts
        .server()
        .kubeconfig_path()
        .expect("kubeconfig written")
        .to_path_buf();
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let manifests = work.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    std::fs::write(
        manifests.join("00-crd.yaml"),
        serde_yaml::to_string(&Widget::crd()).unwrap(),
    )
    .unwrap();
    std::fs::write(
        manifests.join("10-widgets.yaml"),
        "apiVersion: test.tessera.io/v1\nkind: Widget\nmetadata:\n  name: w1\n  labels: {app: demo}\nspec:\n  sizeBytes: 10\n  mode: Fast\n---\napiVersion: test.tessera.io/v1\nkind: Widget\nmetadata:\n  name: w2\nspec:\n  sizeBytes: 20\n  mode: Slow\n",
    )
    .unwrap();
    let run = |args: Vec<String>| {
        let (k, c) = (kubeconfig.clone(), cache.clone());
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            kubectl(&k, &c, &args).await
        }
    };
    let crd_file = manifests.join("00-crd.yaml").display().to_string();
    let dir = manifests.display().to_string();

    // The CRD first (kubectl maps every object of a directory before applying, like against
    // any cluster), then the whole directory with default flags (client-side validation on).
    let (ok, out, err) = run(vec!["apply".into(), "-f".into(), crd_file]).await;
    assert!(ok, "{out}{err}");
    assert!(
        out.contains(
            "customresourcedefinition.apiextensions.k8s.io/widgets.test.tessera.io created"
        ),
        "{out}"
    );
    let (ok, out, err) = run(vec!["apply".into(), "-f".into(), dir.clone()]).await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("widget.test.tessera.io/w1 created"), "{out}");
    assert!(out.contains("widget.test.tessera.io/w2 created"), "{out}");
    assert!(!err.to_lowercase().contains("warning"), "{err}");

    // Re-applying is a no-op.
    let (ok, out, _) = run(vec!["apply".into(), "-f".into(), dir.clone()]).await;
    assert!(
        ok && out.contains("widget.test.tessera.io/w1 unchanged"),
        "{out}"
    );

    // get <shortname>: the printer columns.
    let (ok, out, err) = run(vec!["get".into(), "wg".into()]).await;
    assert!(ok, "{err}");
    let mut lines = out.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "SIZE", "MODE", "PHASE", "AGE"]);
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(&row[..3], ["w1", "10", "Fast"]);
    assert!(row[3].ends_with('s'), "age column: {row:?}");

    // Label selectors through kubectl.
    let (ok, out, _) = run(vec![
        "get".into(),
        "widgets".into(),
        "-l".into(),
        "app=demo".into(),
        "-o".into(),
        "name".into(),
    ])
    .await;
    assert!(ok);
    assert_eq!(out.trim(), "widget.test.tessera.io/w1");

    let (ok, out, err) = run(vec![
        "get".into(),
        "wg".into(),
        "w1".into(),
        "-o".into(),
        "yaml".into(),
    ])
    .await;
    assert!(ok, "{err}");
    assert!(
        out.contains("kind: Widget") && out.contains("sizeBytes: 10"),
        "{out}"
    );

    let (ok, out, err) = run(vec!["api-resources".into()]).await;
    assert!(ok, "{err}");
    let line = out
        .lines()
        .find(|l| l.starts_with("widgets "))
        .expect("widgets listed");
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        cols,
        ["widgets", "wg", "test.tessera.io/v1", "true", "Widget"]
    );
    assert!(out.lines().any(|l| l.starts_with("leases ")));

    // Typed kubectl commands send protobuf bodies; `create namespace` is accepted.
    let (ok, out, err) = run(vec!["create".into(), "namespace".into(), "team-b".into()]).await;
    assert!(ok, "{out}{err}");
    let (ok, out, _) = run(vec![
        "get".into(),
        "ns".into(),
        "team-b".into(),
        "--show-labels".into(),
    ])
    .await;
    assert!(
        ok && out.contains("kubernetes.io/metadata.name=team-b"),
        "{out}"
    );

    let (ok, out, err) = run(vec!["delete".into(), "wg".into(), "w1".into()]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("widget.test.tessera.io \"w1\" deleted"),
        "{out}"
    );
    let (ok, out, _) = run(vec!["get".into(), "wg".into(), "-o".into(), "name".into()]).await;
    assert!(ok);
    assert_eq!(out.trim(), "widget.test.tessera.io/w2");
}
