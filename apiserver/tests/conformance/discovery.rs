//! Discovery through kube: legacy and aggregated, pinned kinds, and /version.

use kube::core::GroupVersionKind;
use kube::discovery::{self, Discovery, Scope, verbs};

use crate::support::*;

#[tokio::test]
async fn discovery_finds_crd_kinds_and_builtins() {
    let (_ts, client) = setup().await;
    for aggregated in [false, true] {
        let d = Discovery::new(client.clone());
        let d = if aggregated {
            d.run_aggregated().await
        } else {
            d.run().await
        }
        .unwrap();
        let (ar, caps) = d
            .resolve_gvk(&GroupVersionKind::gvk("test.tessera.io", "v1", "Widget"))
            .expect("Widget discovered");
        assert_eq!(ar.plural, "widgets");
        assert_eq!(caps.scope, Scope::Namespaced);
        assert!(caps.supports_operation(verbs::WATCH));
        assert!(
            caps.subresources
                .iter()
                .any(|(sr, _)| sr.plural == "widgets/status" || sr.plural == "status")
        );
        let (gadget, caps) = d
            .resolve_gvk(&GroupVersionKind::gvk("test.tessera.io", "v1", "Gadget"))
            .expect("Gadget discovered");
        assert_eq!(gadget.plural, "gadgets");
        assert_eq!(caps.scope, Scope::Cluster);
        for (g, k) in [
            ("", "Namespace"),
            ("", "Node"),
            ("", "Event"),
            ("events.k8s.io", "Event"),
            ("coordination.k8s.io", "Lease"),
        ] {
            assert!(
                d.resolve_gvk(&GroupVersionKind::gvk(g, "v1", k)).is_some(),
                "{g}/{k} (aggregated: {aggregated})"
            );
        }
        assert!(d.has_group("apiextensions.k8s.io"));
    }

    // Short names are advertised.
    let res = client
        .list_api_group_resources("test.tessera.io/v1")
        .await
        .unwrap();
    let w = res.resources.iter().find(|r| r.name == "widgets").unwrap();
    assert_eq!(w.short_names.as_deref(), Some(&["wg".to_string()][..]));
    assert_eq!(w.categories.as_deref(), Some(&["tessera".to_string()][..]));

    let (ar, caps) = discovery::pinned_kind(
        &client,
        &GroupVersionKind::gvk("test.tessera.io", "v1", "Widget"),
    )
    .await
    .unwrap();
    assert_eq!(
        (ar.plural.as_str(), caps.scope),
        ("widgets", Scope::Namespaced)
    );

    let v = client.apiserver_version().await.unwrap();
    assert_eq!((v.major.as_str(), v.git_version.as_str()), ("1", "v1.33.0"));
}
