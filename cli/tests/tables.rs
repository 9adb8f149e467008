//! The status tables against objects created in an embedded API server (no child processes,
//! no operator: the statuses are written here the way the operator and nodes would).

use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tessera::tables::{self, Snapshot};
use tessera_api::v1alpha1::{
    StorageArea, StorageClaim, StoragePool, StoragePriorityClass, VirtualVolume,
};
use tessera_apiserver::ApiServer;

const GIB: i64 = 1 << 30;

async fn create<K>(api: &Api<K>, obj: serde_json::Value) -> K
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let typed: K = serde_json::from_value(obj).expect("object parses");
    api.create(&PostParams::default(), &typed)
        .await
        .expect("object is created")
}

async fn set_status<K>(api: &Api<K>, name: &str, status: serde_json::Value)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await
    .expect("status is patched");
}

#[tokio::test]
async fn tables_show_what_the_api_server_holds() {
    let server = ApiServer::builder()
        .start()
        .await
        .expect("API server starts");
    let client = server.client();
    // The same CRD installation `tessera local` does, and its pool and classes.
    tessera::local::apply_crds(&client)
        .await
        .expect("CRDs apply");
    tessera::local::apply_crds(&client)
        .await
        .expect("applying CRDs again is a no-op");
    tessera::local::ensure_examples(&client)
        .await
        .expect("examples are created");
    tessera::local::ensure_examples(&client)
        .await
        .expect("examples exist already: fine");
    let classes: Api<StoragePriorityClass> = Api::all(client.clone());
    let mut names: Vec<String> = classes
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|c| kube::ResourceExt::name_any(&c))
        .collect();
    names.sort();
    assert_eq!(names, ["high", "low"]);

    let pools: Api<StoragePool> = Api::all(client.clone());
    set_status(
        &pools,
        "default",
        json!({
            "totalBytes": 4 * GIB, "allocatedBytes": 5 * GIB / 2, "unallocatedBytes": 3 * GIB / 2,
            "inUseBytes": 8 << 20, "highPriorityBytes": 4 << 20, "unusedBytes": 0,
            "lowPriorityBytes": 4 << 20, "areas": 4, "onlineAreas": 3, "volumes": 2,
            "conditions": [{"type": "Ready", "status": "True", "reason": "AreasOnline",
                            "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]
        }),
    )
    .await;

    let areas: Api<StorageArea> = Api::all(client.clone());
    create(
        &areas,
        json!({"apiVersion": "tessera.io/v1alpha1", "kind": "StorageArea",
               "metadata": {"name": "node-a-area-0"},
               "spec": {"nodeName": "node-a", "path": "/d/node-a/areas/area-0.img",
                        "sizeBytes": GIB, "mediaType": "ssd", "poolName": "default"}}),
    )
    .await;
    set_status(
        &areas,
        "node-a-area-0",
        json!({"phase": "Online", "capacityBytes": GIB, "allocatedBytes": GIB,
               "extentServer": "127.0.0.1:7400"}),
    )
    .await;

    let claims: Api<StorageClaim> = Api::namespaced(client.clone(), "default");
    for (name, class, size) in [("demo-high", "high", 3 * GIB / 2), ("big", "low", 64 * GIB)] {
        create(
            &claims,
            json!({"apiVersion": "tessera.io/v1alpha1", "kind": "StorageClaim",
                   "metadata": {"name": name, "namespace": "default"},
                   "spec": {"poolName": "default", "sizeBytes": size,
                            "priorityClassName": class}}),
        )
        .await;
    }
    set_status(
        &claims,
        "demo-high",
        json!({"phase": "Bound", "volumeName": "vol-1"}),
    )
    .await;
    set_status(
        &claims,
        "big",
        json!({"phase": "Rejected", "reason": "InsufficientCapacity"}),
    )
    .await;

    let volumes: Api<VirtualVolume> = Api::all(client.clone());
    create(
        &volumes,
        json!({"apiVersion": "tessera.io/v1alpha1", "kind": "VirtualVolume",
               "metadata": {"name": "vol-1"},
               "spec": {"sizeBytes": 3 * GIB / 2, "poolName": "default",
                        "priorityClassName": "high", "accessNode": "node-a",
                        "claimRef": {"namespace": "default", "name": "demo-high"}}}),
    )
    .await;
    set_status(
        &volumes,
        "vol-1",
        json!({"phase": "Attached",
               "mapping": {"generation": 3, "extentSizeBytes": 4 << 20, "extents": [
                   {"offset": 0, "length": GIB,
                    "replicas": [{"area": "node-a-area-0", "areaOffset": 0}]},
                   {"offset": GIB, "length": GIB / 2,
                    "replicas": [{"area": "node-a-area-1", "areaOffset": 256 << 20}]}]},
               "usage": {"allocatedBytes": 3 * GIB / 2, "inUseBytes": 3 << 20,
                         "highPriorityBytes": 3 << 20}}),
    )
    .await;

    let snap = Snapshot::fetch(&client).await.expect("snapshot");

    let pools_table = tables::pools(&snap.pools);
    let lines: Vec<&str> = pools_table.lines().collect();
    assert_eq!(lines.len(), 2, "{pools_table}");
    let cells: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        cells,
        [
            "default", "4GiB", "2.5GiB", "8MiB", "4MiB", "1.5GiB", "3/4", "online", "2", "True"
        ],
        "{pools_table}"
    );
    // Columns line up: every header starts where its values start.
    let header = lines[0];
    assert_eq!(
        header.find("ALLOCATED"),
        lines[1].find("2.5GiB"),
        "{pools_table}"
    );

    let claims_table = tables::claims(&snap.claims);
    assert!(
        claims_table
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == ["default/demo-high", "1.5GiB", "high", "Bound", "vol-1"]),
        "{claims_table}"
    );
    assert!(
        claims_table.lines().any(|l| l.starts_with("default/big")
            && l.contains("Rejected (InsufficientCapacity)")
            && l.trim_end().ends_with('-')),
        "{claims_table}"
    );

    let volumes_table = tables::volumes(&snap.volumes);
    let vlines: Vec<&str> = volumes_table.lines().collect();
    assert_eq!(vlines.len(), 3, "one row of two lines: {volumes_table}");
    assert_eq!(
        vlines[1].split_whitespace().collect::<Vec<_>>(),
        [
            "vol-1",
            "1.5GiB",
            "high",
            "Attached",
            "node-a",
            "3",
            "0-1GiB→node-a-area-0@0",
            "3MiB/3MiB"
        ],
        "{volumes_table}"
    );
    // The second run sits on its own line, under the MAPPING column.
    assert_eq!(vlines[2].trim(), "1GiB-1.5GiB→node-a-area-1@256MiB");
    assert_eq!(
        vlines[2].find("1GiB-"),
        vlines[0].find("MAPPING"),
        "{volumes_table}"
    );

    let areas_table = tables::areas(&snap.areas);
    assert!(
        areas_table
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == [
                    "node-a-area-0",
                    "node-a",
                    "default",
                    "ssd",
                    "1GiB",
                    "1GiB",
                    "Online",
                    "127.0.0.1:7400"
                ]),
        "{areas_table}"
    );

    let all = snap.render();
    for section in ["POOLS", "AREAS", "CLAIMS", "VOLUMES"] {
        assert!(all.lines().any(|l| l == section), "{all}");
    }
    server.shutdown().await;
}
