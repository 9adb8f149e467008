#!/usr/bin/env python3
"""Renders charts/tessera with Helm's own engine and checks what comes out.

The engine is the `helm-python-sdk` wheel (module `helm_python`): ctypes bindings to libhelm_c,
Helm v4's Go SDK compiled into the wheel, so no helm binary, no Go toolchain and no network or
cluster is involved (`Chart.render` is the offline `helm template`; `lookup` returns nothing).
scripts/test.sh installs it into a virtualenv and runs this file; to run it by hand:

    python3 -m venv /tmp/chart-venv
    /tmp/chart-venv/bin/pip install helm-python-sdk kubernetes-validate pyyaml
    /tmp/chart-venv/bin/python scripts/check-chart.py

Checks: `helm lint --strict`, then renders with the default values and with
charts/tessera/ci/custom-values.yaml; every document must parse (PyYAML) and validate (built-in
kinds against the Kubernetes 1.33 schemas that kubernetes-validate ships, in strict mode; tessera
kinds against the CRDs' schemas), and the expected objects (kinds and names) must be there with
the properties the CSI driver relies on; an invalid areas list must fail to render; the init
container's area-file selection is run with /bin/sh.
Closes with "chart: N passed, N failed" and exits non-zero on any failure.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

try:
    import helm_python as helm
    import jsonschema
    import kubernetes_validate
    import yaml
except ImportError as missing:  # scripts/test.sh installs them; say so when run by hand.
    sys.exit(f"check-chart: {missing}; install with "
             "`pip install helm-python-sdk kubernetes-validate pyyaml`")

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "tessera"
CUSTOM_VALUES = CHART / "ci" / "custom-values.yaml"
RELEASE = "tessera"
NAMESPACE = "tessera-system"
KUBE_VERSION = "v1.33.0"
DRIVER = "csi.tessera.io"

TESSERA_KINDS = [
    "storageareas",
    "storagepools",
    "storagepriorityclasses",
    "storageclaims",
    "virtualvolumes",
    "mirrorpairs",
    "volumeremaps",
]
CLUSTER_SCOPED = {
    "ClusterRole",
    "ClusterRoleBinding",
    "CSIDriver",
    "StorageClass",
    "StoragePool",
    "StoragePriorityClass",
    "StorageArea",
    "CustomResourceDefinition",
}


# --- rendering -----------------------------------------------------------------------------


class Rendered:
    """Every object of one render, by (kind, name)."""

    def __init__(self, values: dict | None):
        self.values = values
        with helm.Chart.load(CHART) as chart:
            self.files = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        self.text = "\n".join(self.files.values())
        self.objects: dict[tuple[str, str], dict] = {}
        self.notes = self.files.pop(f"{CHART.name}/templates/NOTES.txt", "")
        for path, manifest in self.files.items():
            for doc in yaml.safe_load_all(manifest):
                if doc is None:
                    continue
                assert isinstance(doc, dict), f"{path}: a document is not a mapping: {doc!r}"
                for field in ("apiVersion", "kind", "metadata"):
                    assert field in doc, f"{path}: a document has no {field}"
                key = (doc["kind"], doc["metadata"].get("name"))
                assert key[1], f"{path}: a {key[0]} has no metadata.name"
                assert key not in self.objects, f"{path}: {key} rendered twice"
                self.objects[key] = doc

    def get(self, kind: str, name: str) -> dict:
        assert (kind, name) in self.objects, (
            f"no {kind} {name!r}; rendered: {sorted(self.objects)}"
        )
        return self.objects[(kind, name)]

    def kinds(self, kind: str) -> dict[str, dict]:
        return {n: o for (k, n), o in self.objects.items() if k == kind}


def custom_values() -> dict:
    return yaml.safe_load(CUSTOM_VALUES.read_text())


def run_kind_values() -> dict:
    """The values e2e/run-kind.sh installs with (its heredoc, with the script's variables)."""
    script = (ROOT / "e2e" / "run-kind.sh").read_text()
    match = re.search(r'cat >"\$WORK/values.yaml" <<VALUES\n(.*?)\nVALUES\n', script, re.S)
    assert match, "run-kind.sh: no values heredoc"
    host_dir = re.search(r"^HOST_DIR=(\S+)$", script, re.M)
    assert host_dir, "run-kind.sh: no HOST_DIR"
    text = (match.group(1).replace("${IMAGE%:*}", "tessera").replace("${IMAGE##*:}", "e2e")
            .replace("$HOST_DIR", host_dir.group(1)))
    assert "$" not in text.replace("$(", ""), f"unexpanded variable in:\n{text}"
    return yaml.safe_load(text)


def container(pod_spec: dict, name: str, init: bool = False) -> dict:
    key = "initContainers" if init else "containers"
    found = [c for c in pod_spec.get(key, []) if c["name"] == name]
    assert len(found) == 1, (
        f"{key} {name!r} not found in {[c['name'] for c in pod_spec.get(key, [])]}"
    )
    return found[0]


def volume(pod_spec: dict, name: str) -> dict:
    found = [v for v in pod_spec["volumes"] if v["name"] == name]
    assert len(found) == 1, f"volume {name!r} not found"
    return found[0]


def mount(c: dict, name: str) -> dict:
    found = [m for m in c.get("volumeMounts", []) if m["name"] == name]
    assert len(found) == 1, f"{c['name']}: no mount of volume {name!r}"
    return found[0]


def env_field(c: dict, name: str) -> str:
    for e in c.get("env", []):
        if e["name"] == name:
            return e["valueFrom"]["fieldRef"]["fieldPath"]
    raise AssertionError(f"{c['name']}: no env {name}")


def allowed(rules: list[dict], group: str, resource: str, verb: str) -> bool:
    for r in rules:
        if group in r.get("apiGroups", []) and resource in r.get("resources", []):
            if verb in r.get("verbs", []):
                return True
    return False


def crds_in_chart() -> list[dict]:
    with helm.Chart.load(CHART) as chart:
        return chart.crds


# --- checks --------------------------------------------------------------------------------

CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


@check
def lint_strict_default_and_custom_values():
    for values in (None, custom_values(), run_kind_values()):
        report = helm.lint(CHART, values, strict=True, kube_version=KUBE_VERSION)
        assert not report["errors"], report["errors"]
        serious = [m for m in report["messages"] if m["severity"] >= 2]
        assert not serious, serious


@check
def every_document_parses_and_namespaced_objects_use_the_release_namespace():
    for values in (None, custom_values()):
        r = Rendered(values)
        assert len(r.objects) > 20, f"only {len(r.objects)} objects rendered"
        for (kind, name), obj in r.objects.items():
            ns = obj["metadata"].get("namespace")
            if kind in CLUSTER_SCOPED:
                assert ns is None, f"cluster-scoped {kind} {name} has namespace {ns}"
            else:
                assert ns == NAMESPACE, f"{kind} {name} in namespace {ns!r}"


@check
def expected_objects_with_default_values():
    r = Rendered(None)
    expected = {
        ("Deployment", "tessera-operator"),
        ("Deployment", "tessera-csi-controller"),
        ("DaemonSet", "tessera-csi-node"),
        ("CSIDriver", DRIVER),
        ("StorageClass", "tessera-high"),
        ("StorageClass", "tessera-low"),
        ("Secret", "tessera-token"),
        ("ConfigMap", "tessera-csi-node-areas"),
        ("Service", "tessera-operator-metrics"),
        ("StoragePool", "default"),
        ("StoragePriorityClass", "high"),
        ("StoragePriorityClass", "low"),
    }
    for component in ("operator", "csi-controller", "csi-node"):
        for kind in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"):
            expected.add((kind, f"tessera-{component}"))
    missing = expected - set(r.objects)
    assert not missing, f"missing: {sorted(missing)}"
    unexpected = set(r.objects) - expected
    assert not unexpected, f"unexpected objects: {sorted(unexpected)}"
    assert not r.kinds("ServiceMonitor"), "ServiceMonitor must be off by default"


@check
def crds_are_shipped_and_equal_the_generated_ones():
    shipped = crds_in_chart()
    generated = sorted(p.name for p in (ROOT / "crds").glob("*.tessera.io.yaml"))
    assert sorted(Path(c["filename"]).name for c in shipped) == generated, (
        [c["filename"] for c in shipped],
        generated,
    )
    plurals = set()
    for c in shipped:
        doc = yaml.safe_load(c["data"])
        assert doc["kind"] == "CustomResourceDefinition", c["filename"]
        assert doc["spec"]["group"] == "tessera.io", c["filename"]
        plurals.add(doc["spec"]["names"]["plural"])
        root_copy = (ROOT / "crds" / Path(c["filename"]).name).read_text()
        assert c["data"] == root_copy, f"{c['filename']} differs from crds/ (rerun crdgen)"
    assert plurals == set(TESSERA_KINDS), plurals


@check
def objects_validate_against_kubernetes_1_33_and_the_crd_schemas():
    """Built-in kinds against the Kubernetes 1.33 OpenAPI schemas in strict mode (unknown fields
    are errors; kubernetes-validate ships them), tessera kinds against the CRDs' own schemas."""
    crd_schemas = {}
    for c in crds_in_chart():
        doc = yaml.safe_load(c["data"])
        for version in doc["spec"]["versions"]:
            api_version = f"{doc['spec']['group']}/{version['name']}"
            crd_schemas[(api_version, doc["spec"]["names"]["kind"])] = (
                version["schema"]["openAPIV3Schema"]
            )
    validated = set()
    for values in (None, custom_values(), run_kind_values()):
        for (kind, name), obj in Rendered(values).objects.items():
            key = (obj["apiVersion"], kind)
            try:
                if key in crd_schemas:
                    jsonschema.validate(obj, crd_schemas[key])
                elif kind == "ServiceMonitor":
                    continue  # the Prometheus Operator's CRD; not ours to ship or check
                else:
                    kubernetes_validate.validate(obj, KUBE_VERSION.lstrip("v"), strict=True)
            except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as e:
                where = "/".join(str(p) for p in e.path)
                raise AssertionError(f"{kind} {name}: {where}: {e.message}") from None
            validated.add(kind)
    for kind in ("Deployment", "DaemonSet", "CSIDriver", "StorageClass", "ClusterRole",
                 "StoragePool", "StoragePriorityClass"):
        assert kind in validated, f"no {kind} was validated"


@check
def csidriver_object():
    spec = Rendered(None).get("CSIDriver", DRIVER)["spec"]
    assert spec["attachRequired"] is True, spec
    assert spec["podInfoOnMount"] is True, spec
    assert spec["fsGroupPolicy"] == "File", spec
    assert spec["volumeLifecycleModes"] == ["Persistent"], spec


@check
def storage_classes():
    r = Rendered(None)
    for name, priority in (("tessera-high", "high"), ("tessera-low", "low")):
        sc = r.get("StorageClass", name)
        assert sc["provisioner"] == DRIVER, sc
        assert sc["allowVolumeExpansion"] is True, sc
        assert sc["volumeBindingMode"] == "WaitForFirstConsumer", sc
        assert sc["reclaimPolicy"] == "Delete", sc
        assert sc["parameters"] == {
            "tessera.io/pool": "default",
            "tessera.io/priorityClass": priority,
            "csi.storage.k8s.io/fstype": "ext4",
        }, sc["parameters"]
        assert "storageclass.kubernetes.io/is-default-class" not in (
            sc["metadata"].get("annotations") or {}
        )


@check
def default_pool_and_priority_classes_match_the_examples():
    r = Rendered(None)
    examples = {
        d["metadata"]["name"]: d
        for d in yaml.safe_load_all((ROOT / "examples" / "02-priority-classes.yaml").read_text())
        if d
    }
    for name in ("high", "low"):
        rendered = r.get("StoragePriorityClass", name)
        assert rendered["apiVersion"] == examples[name]["apiVersion"]
        assert rendered["spec"] == examples[name]["spec"], (rendered["spec"], examples[name])
        assert rendered["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert r.get("StoragePriorityClass", "high")["spec"]["value"] == 1000
    assert r.get("StoragePriorityClass", "low")["spec"]["dataPriority"] == "Low"
    pool = r.get("StoragePool", "default")
    assert pool["spec"]["extentSizeBytes"] == 4194304, pool["spec"]
    assert isinstance(pool["spec"]["extentSizeBytes"], int)


@check
def token_secret_is_random_and_mounted():
    r1, r2 = Rendered(None), Rendered(None)
    t1 = base64.b64decode(r1.get("Secret", "tessera-token")["data"]["token"]).decode()
    t2 = base64.b64decode(r2.get("Secret", "tessera-token")["data"]["token"]).decode()
    assert re.fullmatch(r"[A-Za-z0-9]{48}", t1), t1
    assert t1 != t2, "offline renders cannot look the Secret up, so each draws a new token"
    for kind, name, cname in (
        ("DaemonSet", "tessera-csi-node", "tessera-csi"),
        ("Deployment", "tessera-operator", "operator"),
    ):
        pod = r1.get(kind, name)["spec"]["template"]["spec"]
        assert volume(pod, "token")["secret"]["secretName"] == "tessera-token"
        m = mount(container(pod, cname), "token")
        assert (m["mountPath"], m["subPath"], m["readOnly"]) == (
            "/etc/tessera/token", "token", True
        ), m


@check
def operator_deployment():
    d = Rendered(None).get("Deployment", "tessera-operator")
    pod = d["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "tessera-operator"
    c = container(pod, "operator")
    assert c["command"] == ["tessera-operator"], c["command"]
    args = c["args"]
    assert args[0] == "run", args
    for a in ("--identity=$(POD_NAME)", "--lease-namespace=$(POD_NAMESPACE)",
              "--token-file=/etc/tessera/token", "--node-namespace=$(POD_NAMESPACE)",
              "--metrics-addr=0.0.0.0:9090"):
        assert a in args, (a, args)
    assert env_field(c, "POD_NAME") == "metadata.name"
    assert env_field(c, "POD_NAMESPACE") == "metadata.namespace"
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert {"name": "metrics", "containerPort": 9090, "protocol": "TCP"} in c["ports"]
    assert c["image"] == "ghcr.io/tessera-storage/tessera:0.1.0", c["image"]


@check
def csi_controller_deployment():
    pod = Rendered(None).get("Deployment", "tessera-csi-controller")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "tessera-csi-controller"
    names = [c["name"] for c in pod["containers"]]
    assert names == ["tessera-csi", "csi-provisioner", "csi-attacher", "csi-resizer",
                     "liveness-probe"], names
    driver = container(pod, "tessera-csi")
    assert "--mode=controller" in driver["args"]
    assert "--endpoint=unix:///csi/csi.sock" in driver["args"]
    assert driver["livenessProbe"]["httpGet"]["path"] == "/healthz"
    prov = container(pod, "csi-provisioner")["args"]
    for a in ("--extra-create-metadata", "--feature-gates=Topology=true", "--leader-election",
              "--leader-election-namespace=$(POD_NAMESPACE)", "--csi-address=/csi/csi.sock"):
        assert a in prov, (a, prov)
    for sidecar in ("csi-attacher", "csi-resizer"):
        args = container(pod, sidecar)["args"]
        assert "--leader-election" in args and "--csi-address=/csi/csi.sock" in args, args
    images = {c["name"]: c["image"] for c in pod["containers"]}
    for cname, pattern in (
        ("csi-provisioner", r"registry\.k8s\.io/sig-storage/csi-provisioner:v5\.\d+\.\d+"),
        ("csi-attacher", r"registry\.k8s\.io/sig-storage/csi-attacher:v4\.\d+\.\d+"),
        ("csi-resizer", r"registry\.k8s\.io/sig-storage/csi-resizer:v1\.\d+\.\d+"),
        ("liveness-probe", r"registry\.k8s\.io/sig-storage/livenessprobe:v2\.\d+\.\d+"),
    ):
        assert re.fullmatch(pattern, images[cname]), images[cname]
    for c in pod["containers"]:
        assert mount(c, "socket-dir")["mountPath"] == "/csi"
    assert volume(pod, "socket-dir") == {"name": "socket-dir", "emptyDir": {}}


def check_node_daemonset(
    r: Rendered, kubelet_dir: str, state_dir: str, host_network: bool, state_arg: str = ""
):
    pod = r.get("DaemonSet", "tessera-csi-node")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "tessera-csi-node"
    assert bool(pod.get("hostNetwork")) == host_network, pod.get("hostNetwork")
    plugin_dir = f"{kubelet_dir}/plugins/{DRIVER}"
    c = container(pod, "tessera-csi")
    assert c["securityContext"]["privileged"] is True
    args = c["args"]
    for a in ("--mode=node", "--endpoint=unix:///csi/csi.sock", "--node-id=$(NODE_NAME)",
              "--namespace=$(POD_NAMESPACE)", f"--state-dir={state_arg or state_dir}",
              "--areas-file=/run/tessera/areas.yaml", "--extent-listen=0.0.0.0:7400",
              "--control-listen=0.0.0.0:7401", "--advertise-host=$(POD_IP)",
              "--token-file=/etc/tessera/token"):
        assert a in args, (a, args)
    assert env_field(c, "NODE_NAME") == "spec.nodeName"
    assert env_field(c, "POD_IP") == "status.podIP"
    assert env_field(c, "POD_NAMESPACE") == "metadata.namespace"
    kubelet = mount(c, "kubelet-dir")
    assert kubelet["mountPath"] == kubelet_dir, kubelet
    assert kubelet["mountPropagation"] == "Bidirectional", kubelet
    assert volume(pod, "kubelet-dir")["hostPath"] == {"path": kubelet_dir, "type": "Directory"}
    assert mount(c, "dev")["mountPath"] == "/dev"
    assert volume(pod, "dev")["hostPath"]["path"] == "/dev"
    assert mount(c, "state-dir")["mountPath"] == state_dir
    assert volume(pod, "state-dir")["hostPath"] == {"path": state_dir, "type": "DirectoryOrCreate"}
    assert volume(pod, "plugin-dir")["hostPath"]["path"] == plugin_dir
    assert volume(pod, "registration-dir")["hostPath"]["path"] == f"{kubelet_dir}/plugins_registry"
    registrar = container(pod, "node-driver-registrar")
    assert f"--kubelet-registration-path={plugin_dir}/csi.sock" in registrar["args"], registrar
    assert mount(registrar, "registration-dir")["mountPath"] == "/registration"
    assert container(pod, "liveness-probe")["args"][0] == "--csi-address=/csi/csi.sock"
    assert re.fullmatch(r"registry\.k8s\.io/sig-storage/csi-node-driver-registrar:v2\.\d+\.\d+",
                        registrar["image"]), registrar["image"]
    init = container(pod, "areas", init=True)
    assert mount(init, "areas-file")["mountPath"] == "/run/tessera"
    assert volume(pod, "areas-config")["configMap"]["name"] == "tessera-csi-node-areas"
    return pod


@check
def node_daemonset_with_default_values():
    r = Rendered(None)
    check_node_daemonset(r, "/var/lib/kubelet", "/var/lib/tessera", host_network=True)
    areas = yaml.safe_load(r.get("ConfigMap", "tessera-csi-node-areas")["data"]["default.yaml"])
    assert areas == [{
        "name": "__NODE_NAME__-area-0",
        "path": "/var/lib/tessera/areas/area-0.img",
        "sizeBytes": 8589934592,
        "mediaType": "ssd",
        "poolName": "default",
    }], areas


@check
def custom_values_substitute_kubelet_dir_areas_and_toggles():
    r = Rendered(custom_values())
    kubelet_dir = "/var/lib/k0s/kubelet"
    pod = check_node_daemonset(r, kubelet_dir, "/srv/tessera", host_network=False,
                               state_arg="/srv/tessera/$(NODE_NAME)")
    assert "/var/lib/kubelet" not in r.text, "the default kubelet dir leaked into the render"
    assert "--frontend=nbd" in container(pod, "tessera-csi")["args"]
    # Extra volumes reach the pod and the tessera-csi container; the controller socket dir is
    # the host path.
    assert volume(pod, "harness-work")["hostPath"]["path"] == "/tmp/harness-work"
    work = mount(container(pod, "tessera-csi"), "harness-work")
    assert work["mountPropagation"] == "Bidirectional", work
    controller = r.get("Deployment", "tessera-csi-controller")["spec"]["template"]["spec"]
    assert volume(controller, "socket-dir")["hostPath"] == {
        "path": "/var/lib/tessera-controller", "type": "DirectoryOrCreate"}
    # Areas: the default list gets the node-name prefix, byNode lists are taken as written.
    data = r.get("ConfigMap", "tessera-csi-node-areas")["data"]
    assert sorted(data) == ["default.yaml", "node-storage.example.com.yaml",
                            "node-worker-1.yaml"], sorted(data)
    default = yaml.safe_load(data["default.yaml"])
    assert [a["name"] for a in default] == ["__NODE_NAME__-fast", "__NODE_NAME__-slow"]
    assert default[0]["domain"] == "zone-a" and "domain" not in default[1]
    assert default[1]["poolName"] == "default", "poolName defaults to controller.defaultPool"
    assert default[1]["sizeBytes"] == 68719476736
    worker = yaml.safe_load(data["node-worker-1.yaml"])
    assert worker == [{"name": "worker-1-nvme", "path": "/dev/nvme1n1",
                       "sizeBytes": 1000204886016, "mediaType": "ssd", "poolName": "default",
                       "domain": "zone-b"}], worker
    big = yaml.safe_load(data["node-storage.example.com.yaml"])
    assert big == [{"name": "big-box-disk-0", "path": "/dev/sdb", "poolName": "archive"}], big
    # Existing token Secret: none rendered, the named one mounted.
    assert not r.kinds("Secret")
    assert volume(pod, "token")["secret"]["secretName"] == "my-tessera-token"
    # Toggles.
    assert not r.kinds("StoragePool") and not r.kinds("StoragePriorityClass")
    sm = r.get("ServiceMonitor", "tessera-operator")
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    svc = r.get("Service", "tessera-operator-metrics")
    selector = sm["spec"]["selector"]["matchLabels"]
    assert all(svc["metadata"]["labels"].get(k) == v for k, v in selector.items()), selector
    # StorageClasses from values.
    assert sorted(r.kinds("StorageClass")) == ["tessera-mirrored"]
    sc = r.get("StorageClass", "tessera-mirrored")
    assert sc["metadata"]["annotations"]["storageclass.kubernetes.io/is-default-class"] == "true"
    assert sc["parameters"] == {"tessera.io/pool": "default", "tessera.io/priorityClass": "high",
                                "tessera.io/copies": "2", "csi.storage.k8s.io/fstype": "xfs",
                                "tessera.io/layout": "Concatenated"}, sc["parameters"]
    images = {c["image"] for c in pod["containers"] if c["name"] == "tessera-csi"}
    assert images == {"registry.example/tessera:dev"}, images


@check
def rbac_bindings_tie_each_service_account_to_its_roles():
    r = Rendered(None)
    for component in ("operator", "csi-controller", "csi-node"):
        name = f"tessera-{component}"
        for kind, role_kind in (("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")):
            b = r.get(kind, name)
            assert b["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind,
                                    "name": name}, b["roleRef"]
            assert b["subjects"] == [{"kind": "ServiceAccount", "name": name,
                                      "namespace": NAMESPACE}], b["subjects"]
    for kind in ("ClusterRole", "Role"):
        for name, role in r.kinds(kind).items():
            for rule in role["rules"]:
                for field in ("apiGroups", "resources", "verbs"):
                    assert "*" not in rule[field], f"{kind} {name} has a wildcard: {rule}"
                assert "secrets" not in rule["resources"], f"{kind} {name} reads Secrets"


@check
def rbac_operator_rules():
    r = Rendered(None)
    cluster = r.get("ClusterRole", "tessera-operator")["rules"]
    for kind in TESSERA_KINDS:
        for verb in ("get", "list", "watch", "create", "update", "patch", "delete"):
            assert allowed(cluster, "tessera.io", kind, verb), (kind, verb)
        assert allowed(cluster, "tessera.io", f"{kind}/status", "patch"), kind
    assert allowed(cluster, "events.k8s.io", "events", "create")
    ns = r.get("Role", "tessera-operator")["rules"]
    for verb in ("get", "create", "update"):
        assert allowed(ns, "coordination.k8s.io", "leases", verb), verb
    assert not allowed(cluster, "coordination.k8s.io", "leases", "get"), "leases are namespaced"


@check
def rbac_controller_rules():
    r = Rendered(None)
    cluster = r.get("ClusterRole", "tessera-csi-controller")["rules"]
    for resource, verbs in {
        "storageclaims": ("get", "create", "patch", "delete"),
        "virtualvolumes": ("get", "list", "watch", "patch"),
        "storagepools": ("get", "list", "watch"),
        "storageareas": ("get", "list", "watch"),
    }.items():
        for verb in verbs:
            assert allowed(cluster, "tessera.io", resource, verb), (resource, verb)
    for resource in ("storagepools", "storageareas", "virtualvolumes"):
        for verb in ("create", "delete"):
            assert not allowed(cluster, "tessera.io", resource, verb), (resource, verb)
    for group, resource, verbs in (
        ("", "persistentvolumes", ("create", "delete", "patch")),
        ("", "persistentvolumeclaims", ("get", "update")),
        ("", "persistentvolumeclaims/status", ("patch",)),
        ("storage.k8s.io", "storageclasses", ("get",)),
        ("storage.k8s.io", "csinodes", ("get",)),
        ("storage.k8s.io", "volumeattachments", ("patch",)),
        ("storage.k8s.io", "volumeattachments/status", ("patch",)),
        ("", "nodes", ("get",)),
        ("", "events", ("create",)),
    ):
        for verb in verbs:
            assert allowed(cluster, group, resource, verb), (resource, verb)
    ns = r.get("Role", "tessera-csi-controller")["rules"]
    for verb in ("get", "list", "watch", "create", "update"):
        assert allowed(ns, "coordination.k8s.io", "leases", verb), verb


@check
def rbac_node_rules_are_least_privilege():
    r = Rendered(None)
    cluster = r.get("ClusterRole", "tessera-csi-node")["rules"]
    assert allowed(cluster, "tessera.io", "storageareas", "create")
    assert allowed(cluster, "tessera.io", "storageareas/status", "patch")
    for verb in ("get", "list", "watch", "patch"):
        assert allowed(cluster, "tessera.io", "virtualvolumes", verb), verb
    assert allowed(cluster, "tessera.io", "virtualvolumes/status", "patch")
    assert allowed(cluster, "", "nodes", "get")
    for resource in TESSERA_KINDS:
        assert not allowed(cluster, "tessera.io", resource, "delete"), resource
    assert not allowed(cluster, "tessera.io", "virtualvolumes", "create")
    assert not allowed(cluster, "tessera.io", "storageclaims", "get")
    assert not allowed(cluster, "", "nodes", "list")
    ns = r.get("Role", "tessera-csi-node")["rules"]
    for verb in ("get", "create", "update"):
        assert allowed(ns, "coordination.k8s.io", "leases", verb), verb
    assert not allowed(ns, "coordination.k8s.io", "leases", "delete")


@check
def invalid_areas_fail_to_render():
    values = {"node": {"areas": {"default": [{"name": "area-0", "sizeBytes": 1}]}}}
    try:
        Rendered(values)
    except helm.HelmError as e:
        assert "path is required" in str(e), str(e)
    else:
        raise AssertionError("an area without a path rendered")


@check
def empty_areas_render_an_empty_list_and_a_warning():
    r = Rendered({"node": {"areas": {"default": []}}})
    data = r.get("ConfigMap", "tessera-csi-node-areas")["data"]
    assert yaml.safe_load(data["default.yaml"]) == [], data
    assert "every claim will be Rejected" in r.notes, r.notes
    assert "Rejected" not in Rendered(None).notes


@check
def another_release_name_prefixes_namespaced_and_rbac_objects():
    with helm.Chart.load(CHART) as chart:
        files = chart.render(None, name="storage", namespace="infra", is_install=True)
    objects = {
        (d["kind"], d["metadata"]["name"]): d
        for path, text in files.items() if not path.endswith("NOTES.txt")
        for d in yaml.safe_load_all(text) if d
    }
    assert ("CSIDriver", DRIVER) in objects and ("StorageClass", "tessera-high") in objects
    ds = objects[("DaemonSet", "storage-tessera-csi-node")]["spec"]["template"]["spec"]
    assert ds["serviceAccountName"] == "storage-tessera-csi-node"
    binding = objects[("ClusterRoleBinding", "storage-tessera-csi-node")]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "storage-tessera-csi-node",
                                    "namespace": "infra"}], binding["subjects"]
    assert volume(ds, "token")["secret"]["secretName"] == "storage-tessera-token"
    assert ("Secret", "storage-tessera-token") in objects


@check
def run_kind_values_render_and_match_the_kind_mounts():
    values = run_kind_values()
    r = Rendered(values)
    kind = yaml.safe_load((ROOT / "e2e" / "kind-config.yaml").read_text())
    mounts = [{m["containerPath"]: m["hostPath"] for m in n.get("extraMounts", [])}
              for n in kind["nodes"]]
    assert [n["role"] for n in kind["nodes"]] == ["control-plane", "worker", "worker"]
    pod = r.get("DaemonSet", "tessera-csi-node")["spec"]["template"]["spec"]
    state = volume(pod, "state-dir")["hostPath"]["path"]
    work = volume(pod, "e2e-work")["hostPath"]["path"]
    plugin = volume(pod, "plugin-dir")["hostPath"]["path"]
    assert "--state-dir=" + state + "/$(NODE_NAME)" in container(pod, "tessera-csi")["args"]
    for node in mounts:
        # Same path on the host and in the node: node.json and NBD socket paths, staging and
        # target paths mean the same thing to the harness and to the node plugin.
        assert node.get(state) == state and node.get(work) == work, node
        assert plugin in node, f"the plugin dir {plugin} is not mounted out of a node: {node}"
    assert len({node[plugin] for node in mounts}) == len(mounts), "plugin dirs must differ"
    controller = r.get("Deployment", "tessera-csi-controller")["spec"]["template"]["spec"]
    socket_dir = volume(controller, "socket-dir")["hostPath"]["path"]
    assert mounts[0].get(socket_dir) == socket_dir, mounts[0]
    assert controller["nodeSelector"] == {"node-role.kubernetes.io/control-plane": ""}
    areas = r.get("ConfigMap", "tessera-csi-node-areas")["data"]["default.yaml"]
    for area in yaml.safe_load(areas):
        assert area["path"].startswith(f"{state}/__NODE_NAME__/"), area
    assert container(pod, "tessera-csi")["image"] == "tessera:e2e"
    assert container(pod, "tessera-csi")["imagePullPolicy"] == "Never"


@check
def init_container_picks_the_nodes_areas_file():
    """Runs the init container's script with /bin/sh against the rendered ConfigMap."""
    r = Rendered(custom_values())
    pod = r.get("DaemonSet", "tessera-csi-node")["spec"]["template"]["spec"]
    script = container(pod, "areas", init=True)["command"]
    assert script[:2] == ["/bin/sh", "-ec"], script
    data = r.get("ConfigMap", "tessera-csi-node-areas")["data"]
    with tempfile.TemporaryDirectory() as tmp:
        config, out = Path(tmp, "config"), Path(tmp, "run")
        config.mkdir()
        out.mkdir()
        for key, text in data.items():
            (config / key).write_text(text)
        body = script[2].replace("/etc/tessera/areas", str(config))
        body = body.replace("/run/tessera", str(out))

        def areas_of(node: str) -> list:
            subprocess.run(["/bin/sh", "-ec", body], env={**os.environ, "NODE_NAME": node},
                           check=True, capture_output=True)
            return yaml.safe_load((out / "areas.yaml").read_text())

        assert [a["name"] for a in areas_of("worker-1")] == ["worker-1-nvme"]
        assert [a["name"] for a in areas_of("storage.example.com")] == ["big-box-disk-0"]
        other = areas_of("worker-2")
        assert [a["name"] for a in other] == ["worker-2-fast", "worker-2-slow"], other
        assert other[0]["path"] == "/srv/tessera/areas/worker-2-fast.img", other[0]


def main() -> int:
    print(f"check-chart: helm SDK {helm.helm_sdk_version()} (helm-python-sdk {helm.__version__}),"
          f" chart {CHART.relative_to(ROOT)}")
    passed = failed = 0
    for fn in CHECKS:
        try:
            fn()
        except Exception:  # noqa: BLE001 - every failure is reported, then counted
            failed += 1
            print(f"FAIL {fn.__name__}")
            traceback.print_exc()
        else:
            passed += 1
            print(f"ok   {fn.__name__}")
    print(f"chart: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
