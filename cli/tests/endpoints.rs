//! `endpoints.json` has exactly the shape of the contract, and takes over what the nodes'
//! `node.json` files say.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::json;
use tessera::endpoints::{
    ControllerEndpoint, Endpoints, NodeEndpoint, NodeFile, NodeVolume, parse_nbd_unix_uri,
};

fn base(dir: &std::path::Path) -> Endpoints {
    Endpoints {
        kubeconfig: dir.join("kubeconfig"),
        apiserver: "http://127.0.0.1:40000".into(),
        controller: ControllerEndpoint {
            csi_socket: dir.join("controller/csi.sock"),
        },
        nodes: ["node-a", "node-b"]
            .iter()
            .map(|n| NodeEndpoint {
                name: n.to_string(),
                csi_socket: dir.join(n).join("csi.sock"),
                state_dir: dir.join(n),
                extent_server: String::new(),
                control_endpoint: String::new(),
            })
            .collect(),
        volumes: BTreeMap::new(),
    }
}

#[test]
fn endpoints_json_has_the_contract_shape() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut endpoints = base(d);
    // What the node agents write (one with a kernel device, one NBD only).
    let a: NodeFile = serde_json::from_value(json!({
        "nodeId": "node-a", "csiSocket": d.join("node-a/csi.sock"),
        "extentServer": "127.0.0.1:7400", "controlEndpoint": "127.0.0.1:7401",
        "volumes": {"vol-1": {"nbdUri": "nbd+unix:///vol-1?socket=/s/vol-1.sock",
                              "device": "/dev/loop3", "stagingPath": "/st/vol-1"}}
    }))
    .unwrap();
    let b: NodeFile = serde_json::from_value(json!({
        "nodeId": "node-b", "csiSocket": d.join("node-b/csi.sock"),
        "extentServer": "127.0.0.1:7500", "controlEndpoint": "127.0.0.1:7501",
        "volumes": {"vol-2": {"nbdUri": "nbd+unix:///vol-2?socket=/s/vol-2.sock",
                              "stagingPath": "/st/vol-2"}}
    }))
    .unwrap();
    assert!(endpoints.merge_node_files(&[a.clone(), b.clone()]));
    assert!(
        !endpoints.merge_node_files(&[a.clone(), b.clone()]),
        "same files: no change"
    );

    let path = d.join("endpoints.json");
    endpoints.write(&path).unwrap();
    let raw: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let s = |p: PathBuf| p.display().to_string();
    assert_eq!(
        raw,
        json!({
            "kubeconfig": s(d.join("kubeconfig")),
            "apiserver": "http://127.0.0.1:40000",
            "controller": {"csiSocket": s(d.join("controller/csi.sock"))},
            "nodes": [
                {"name": "node-a", "csiSocket": s(d.join("node-a/csi.sock")),
                 "stateDir": s(d.join("node-a")), "extentServer": "127.0.0.1:7400",
                 "controlEndpoint": "127.0.0.1:7401"},
                {"name": "node-b", "csiSocket": s(d.join("node-b/csi.sock")),
                 "stateDir": s(d.join("node-b")), "extentServer": "127.0.0.1:7500",
                 "controlEndpoint": "127.0.0.1:7501"}
            ],
            "volumes": {
                "vol-1": {"node": "node-a", "nbdUri": "nbd+unix:///vol-1?socket=/s/vol-1.sock",
                          "device": "/dev/loop3"},
                "vol-2": {"node": "node-b", "nbdUri": "nbd+unix:///vol-2?socket=/s/vol-2.sock"}
            }
        })
    );
    assert_eq!(Endpoints::load(&path).unwrap(), endpoints);
    let (socket, export) = parse_nbd_unix_uri(&endpoints.volumes["vol-2"].nbd_uri).unwrap();
    assert_eq!(
        (socket, export.as_str()),
        (PathBuf::from("/s/vol-2.sock"), "vol-2")
    );

    // A volume unstaged from node-b disappears; one staged later appears.
    let mut b2 = b;
    b2.volumes.clear();
    b2.volumes.insert(
        "vol-3".into(),
        NodeVolume {
            nbd_uri: "nbd+unix:///vol-3?socket=/s/vol-3.sock".into(),
            device: None,
            staging_path: "/st/vol-3".into(),
        },
    );
    assert!(endpoints.merge_node_files(&[a, b2]));
    assert_eq!(
        endpoints.volumes.keys().collect::<Vec<_>>(),
        ["vol-1", "vol-3"]
    );
    assert_eq!(endpoints.volumes["vol-3"].node, "node-b");
}
