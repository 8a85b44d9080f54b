"""deploy/kubernetes/: every manifest validates against the Kubernetes schemas
(kubernetes-validate, offline, strict: unknown fields are errors) for the
oldest version the native sidecars need (1.29) and the newest it knows; the
kustomization lists every manifest; and the manifests agree with each other
and with the code: Services and budgets select real pods, probes name real
ports, LEPTON_* variables are real control and sidecar flags, sidecar
configs load (with the pod IP the sidecar gets from the downward API, applied
as the CLI applies it), mounted files are where the configs look for them.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from deploy_support import (
    KUBE_DIR,
    REPO,
    control_env_names,
    env_names,
    parse_cli,
    port_of,
    python_snippets,
    yaml_documents,
)

MIN_VERSION = "1.29"  # native sidecars: init containers with restartPolicy: Always
VERSIONS = (MIN_VERSION, kubernetes_validate.latest_version())
POD_IP = "10.1.2.3"
EXAMPLE_FILES = "secrets/*.example.yaml"  # templates, never applied by the kustomization


def manifest_files() -> list[Path]:
    return sorted(p for p in KUBE_DIR.rglob("*.yaml") if p.name != "kustomization.yaml")


def applied_files() -> list[Path]:
    return [p for p in manifest_files() if not p.match(EXAMPLE_FILES)]


def objects(files: list[Path] | None = None) -> list[dict[str, Any]]:
    return [doc for path in files or applied_files() for doc in yaml_documents(path)]


def of_kind(kind: str, files: list[Path] | None = None) -> list[dict[str, Any]]:
    return [o for o in objects(files) if o["kind"] == kind]


def workloads() -> list[dict[str, Any]]:
    return [o for o in objects() if o["kind"] in ("Deployment", "StatefulSet")]


def pod_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def sidecar_containers() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, container) for every lepton-mesh sidecar in the example."""
    for w in workloads():
        for c in pod_containers(w["spec"]["template"]["spec"]):
            if c["name"] == "lepton-sidecar":
                yield w, c


def ref(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata'].get('namespace', '-')}/{obj['metadata']['name']}"


# --- schemas --------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(KUBE_DIR)))
def test_every_manifest_validates_against_the_schemas(path, version):
    docs = yaml_documents(path)
    assert docs, f"{path}: no documents"
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(map(str, e.path))
            pytest.fail(f"{path.name}: {ref(doc)} at {where}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            pytest.fail(f"{path.name}: {e.message}")


def test_an_invalid_manifest_is_refused():
    """The strict check above would catch a misspelt field."""
    deployment = copy.deepcopy(of_kind("Deployment")[0])
    pod = deployment["spec"]["template"]["spec"]
    pod["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, MIN_VERSION, strict=True)


# --- the kustomization ------------------------------------------------------------------


def test_the_kustomization_lists_every_manifest_and_no_template():
    kustomization = yaml_documents(KUBE_DIR / "kustomization.yaml")[0]
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed)), "a file listed twice"
    expected = {str(p.relative_to(KUBE_DIR)) for p in applied_files()}
    assert set(listed) == expected
    # Templates with placeholder keys must never be applied over real Secrets.
    templates = {str(p.relative_to(KUBE_DIR)) for p in manifest_files()} - expected
    assert templates and not templates & set(listed)
    for doc in objects([KUBE_DIR / t for t in templates]):
        assert doc["kind"] in ("Secret", "ConfigMap")
    images = {i["name"] for i in kustomization.get("images", [])}
    used = {c["image"].partition(":")[0] for w in workloads() for c in w_containers(w)}
    assert images <= used


def w_containers(w: dict[str, Any]) -> list[dict[str, Any]]:
    return pod_containers(w["spec"]["template"]["spec"])


def test_every_object_is_in_a_namespace_the_manifests_create():
    namespaces = {o["metadata"]["name"] for o in of_kind("Namespace")}
    for o in objects(manifest_files()):
        if o["kind"] != "Namespace":
            assert o["metadata"].get("namespace") in namespaces, ref(o)


def test_names_are_unique():
    seen = [ref(o) for o in objects()]
    assert len(seen) == len(set(seen))


# --- pods: security, resources, probes ----------------------------------------------------


@pytest.mark.parametrize("workload", workloads(), ids=ref)
def test_pods_meet_the_restricted_pod_security_standard(workload):
    pod = workload["spec"]["template"]["spec"]
    sc = pod["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] > 0
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert pod.get("serviceAccountName"), "runs as its own ServiceAccount"
    for c in pod_containers(pod):
        csc = c["securityContext"]
        assert csc["allowPrivilegeEscalation"] is False, c["name"]
        assert csc["capabilities"] == {"drop": ["ALL"]}, c["name"]
        assert csc["readOnlyRootFilesystem"] is True, c["name"]
        assert {"cpu", "memory"} <= set(c["resources"]["requests"]), c["name"]
        assert "memory" in c["resources"]["limits"], c["name"]


@pytest.mark.parametrize("workload", workloads(), ids=ref)
def test_probes_and_hooks_name_real_ports_and_run(workload):
    for c in w_containers(workload):
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        probes = [c[k] for k in ("startupProbe", "livenessProbe", "readinessProbe") if k in c]
        assert "readinessProbe" in c, c["name"]
        hook = c.get("lifecycle", {}).get("postStart")
        for probe in [*probes, *([hook] if hook else [])]:
            for kind in ("httpGet", "tcpSocket"):
                if kind in probe:
                    port = probe[kind]["port"]
                    assert port in ports or port in ports.values(), f"{c['name']}: {port}"
            for code in python_snippets(probe.get("exec", {}).get("command", [])):
                compile(code, f"{c['name']} probe", "exec")


def test_native_sidecars_gate_their_app_and_the_classic_variant_is_there():
    native, classic = [], []
    for w, c in sidecar_containers():
        pod = w["spec"]["template"]["spec"]
        if c in pod.get("initContainers", []):
            assert c.get("restartPolicy") == "Always", ref(w)
            assert "startupProbe" in c, f"{ref(w)}: nothing holds the app back"
            native.append(w)
        else:
            assert pod["containers"][0] is c, f"{ref(w)}: the sidecar must start first"
            assert "postStart" in c["lifecycle"], f"{ref(w)}: nothing holds the app back"
            classic.append(w)
        grace = pod["terminationGracePeriodSeconds"]
        assert grace > 20, "longer than the sidecars' drain (timeouts.drain: 20s)"
    assert native and classic


@pytest.mark.parametrize("workload", workloads(), ids=ref)
def test_every_volume_is_mounted_and_every_mount_has_a_volume(workload):
    pod = workload["spec"]["template"]["spec"]
    volumes = {v["name"] for v in pod.get("volumes", [])}
    claims = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
    mounted = {m["name"] for c in pod_containers(pod) for m in c.get("volumeMounts", [])}
    assert mounted <= volumes | claims, f"{ref(workload)}: mounts without a volume"
    assert volumes <= mounted, f"{ref(workload)}: volumes nothing mounts: {volumes - mounted}"


# --- selectors -------------------------------------------------------------------------------


def pods_in(namespace: str) -> list[tuple[dict[str, str], list[dict[str, Any]]]]:
    return [
        (w["spec"]["template"]["metadata"]["labels"], w_containers(w))
        for w in workloads()
        if w["metadata"]["namespace"] == namespace
    ]


@pytest.mark.parametrize("service", of_kind("Service"), ids=ref)
def test_services_select_pods_and_their_ports(service):
    pods = [
        containers
        for labels, containers in pods_in(service["metadata"]["namespace"])
        if selects(service["spec"]["selector"], labels)
    ]
    assert pods, f"{ref(service)} selects no pod"
    names = {p["name"] for containers in pods for c in containers for p in c.get("ports", [])}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in names, f"{ref(service)}: no container port {port}"


@pytest.mark.parametrize("kind", ["PodDisruptionBudget", "NetworkPolicy"])
def test_budgets_and_policies_select_pods(kind):
    found = of_kind(kind)
    assert found
    for o in found:
        selector = (o["spec"].get("selector") or o["spec"]["podSelector"])["matchLabels"]
        pods = pods_in(o["metadata"]["namespace"])
        assert any(selects(selector, labels) for labels, _ in pods), ref(o)


def test_workload_selectors_match_their_templates():
    for w in workloads():
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert selects(w["spec"]["selector"]["matchLabels"], labels), ref(w)


# --- etcd and the control daemon ------------------------------------------------------------


def the(kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def test_the_reference_etcd_is_three_members_behind_a_headless_service():
    sts = the("StatefulSet", "lepton-etcd")
    assert sts["spec"]["replicas"] == 3
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    svc = the("Service", sts["spec"]["serviceName"])
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"]
    (etcd,) = w_containers(sts)
    cluster = next(a for a in etcd["args"] if a.startswith("--initial-cluster="))
    members = [m.partition("=")[0] for m in cluster.partition("=")[2].split(",")]
    assert members == [f"lepton-etcd-{i}" for i in range(3)]


def control_container() -> dict[str, Any]:
    (c,) = w_containers(the("Deployment", "lepton-control"))
    return c


def control_env(c: dict[str, Any]) -> dict[str, str]:
    # Values from the downward API are only known in the pod: a stand-in.
    return {e["name"]: e.get("value", "from-the-pod") for e in c["env"]}


def test_the_control_deployment():
    d = the("Deployment", "lepton-control")
    assert d["spec"]["replicas"] == 2
    assert d["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    c = control_container()
    assert {"livenessProbe", "readinessProbe"} <= set(c)
    pdb = the("PodDisruptionBudget", "lepton-control")
    assert pdb["spec"]["minAvailable"] == 1


def test_control_env_are_real_flags_and_parse():
    from lepton_mesh.control.daemon import options_from_args

    c = control_container()
    env = control_env(c)
    known = set(control_env_names().values())
    assert set(env) <= known, f"not control flags: {set(env) - known}"
    options = options_from_args(parse_cli(c["args"], env))
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert options.listen == ("0.0.0.0", ports["sidecars"])
    assert options.admin == ("0.0.0.0", ports["control-admin"])
    # Every etcd member, by its stable name.
    sts = the("StatefulSet", "lepton-etcd")
    ns = sts["metadata"]["namespace"]
    assert options.etcd == tuple(
        f"http://lepton-etcd-{i}.{sts['spec']['serviceName']}.{ns}.svc:2379" for i in range(3)
    )


def mounted_file(c: dict[str, Any], pod: dict[str, Any], path: str) -> dict[str, Any]:
    """The volume that holds PATH in container C (the longest mount prefix)."""
    mounts = [m for m in c["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mounts, f"{c['name']}: nothing is mounted where {path} is"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return {
        "volume": volume,
        "mount": mount,
        "key": path[len(mount["mountPath"].rstrip("/")) + 1 :],
    }


def keys_of(name: str, kind: str) -> set[str]:
    """The keys of a ConfigMap or Secret, from the manifests or the templates."""
    for o in objects(manifest_files()):
        if o["kind"] == kind and o["metadata"]["name"] == name:
            return set(o.get("data") or o.get("stringData") or {})
    raise AssertionError(f"no {kind} {name} in deploy/kubernetes/ (nor a template of it)")


def volume_keys(volume: dict[str, Any]) -> set[str]:
    if "secret" in volume:
        source, kind, name = volume["secret"], "Secret", volume["secret"]["secretName"]
    elif "configMap" in volume:
        source, kind, name = volume["configMap"], "ConfigMap", volume["configMap"]["name"]
    else:
        raise AssertionError(f"volume {volume['name']}: not a Secret or ConfigMap")
    keys = keys_of(name, kind)
    items = source.get("items")
    if items:
        assert {i["key"] for i in items} <= keys
        return {i["path"] for i in items}
    return keys


def test_control_finds_its_ca_and_token_key_where_the_secrets_are_mounted():
    from lepton_mesh.identity.store import CaFiles

    d = the("Deployment", "lepton-control")
    pod = d["spec"]["template"]["spec"]
    c = control_container()
    env = control_env(c)
    token = mounted_file(c, pod, env["LEPTON_TOKEN_KEY"])
    assert token["key"] in volume_keys(token["volume"])
    ca = mounted_file(c, pod, env["LEPTON_CA_DIR"] + "/ca-cert.pem")
    files = CaFiles(Path("/ca"))
    wanted = {Path(p).name for p in (files.ca_cert, files.ca_key, files.bundle)}
    assert wanted <= volume_keys(ca["volume"])


# --- the example application's sidecars -------------------------------------------------------


def sidecar_ids() -> list[str]:
    return [ref(w) for w, _ in sidecar_containers()]


def sidecar_argv(c: dict[str, Any]) -> list[str]:
    """The arguments lepton-mesh runs with: the image's entrypoint is lepton-mesh
    (test_deploy_dockerfile.py), which a container may also name as its command."""
    assert c.get("command", ["lepton-mesh"]) == ["lepton-mesh"], (
        f"{c['name']}: runs lepton-mesh itself, no shell: {c.get('command')}"
    )
    return c["args"]


def sidecar_env(c: dict[str, Any]) -> dict[str, str]:
    """The container's variables, with the pod IP (the downward API's) as POD_IP."""
    out = {}
    for e in c.get("env", []):
        if "value" in e:
            out[e["name"]] = e["value"]
        else:
            assert e["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}, e
            out[e["name"]] = POD_IP
    return out


def configmap_file(c: dict[str, Any], pod: dict[str, Any], path: str) -> str:
    """The text of the ConfigMap key container C sees at PATH."""
    source = mounted_file(c, pod, path)
    assert "configMap" in source["volume"], f"{path}: not from a ConfigMap"
    cm = source["volume"]["configMap"]["name"]
    (text,) = [
        o["data"][source["key"]] for o in of_kind("ConfigMap") if o["metadata"]["name"] == cm
    ]
    return text


@pytest.mark.parametrize(("workload", "c"), list(sidecar_containers()), ids=sidecar_ids())
def test_sidecars_register_the_pod_ip_from_the_downward_api(workload, c):
    """No file rewriting: the variable the sidecar reads, from the pod's status."""
    (entry,) = [e for e in c["env"] if e["name"] == "LEPTON_INSTANCE_ADDRESS"]
    assert entry == {
        "name": "LEPTON_INSTANCE_ADDRESS",
        "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}},
    }
    known = set(env_names("sidecar").values())
    assert set(sidecar_env(c)) <= known, f"not sidecar flags: {set(sidecar_env(c)) - known}"
    args = parse_cli(sidecar_argv(c), sidecar_env(c))
    assert args.command == "sidecar"
    assert args.instance_address == POD_IP


@pytest.mark.parametrize(("workload", "c"), list(sidecar_containers()), ids=sidecar_ids())
def test_sidecar_configs_load_and_agree_with_their_pod(workload, c, tmp_path):
    from lepton_mesh.cli import _sidecar_config
    from lepton_mesh.policy.sidecar_loader import load_sidecar_config

    pod = workload["spec"]["template"]["spec"]
    args = parse_cli(sidecar_argv(c), sidecar_env(c))
    assert args.command == "sidecar"
    assert args.config, "no --config nor LEPTON_SIDECAR_CONFIG"
    # The sidecar reads the ConfigMap's file where it is mounted, read-only.
    assert mounted_file(c, pod, args.config)["mount"].get("readOnly") is True
    text = configmap_file(c, pod, args.config)
    local = tmp_path / "sidecar.yaml"
    local.write_text(text)
    # No address in the file (no placeholder left to render): alone, it would
    # register the inbound listener's wildcard host, read as loopback.
    assert load_sidecar_config(str(local)).instance.address is None
    # What `lepton-mesh sidecar` runs with: the file, and the address applied
    # over it the way the CLI does.
    args.config = str(local)
    cfg = _sidecar_config(args)
    assert cfg.instance.address == POD_IP
    # The CLI takes the address as given; the loader checks one written in the
    # file: the same config with the pod IP there loads, and is the same but
    # for the file's name.
    data = yaml.safe_load(text)
    data["instance"]["address"] = POD_IP
    written = tmp_path / "with-address.yaml"
    written.write_text(yaml.safe_dump(data))
    assert dataclasses.replace(load_sidecar_config(str(written)), source=cfg.source) == cfg

    assert workload["spec"]["template"]["metadata"]["labels"]["lepton.io/service"] == cfg.service
    assert (
        dict(cfg.instance.labels)["version"]
        == workload["spec"]["template"]["metadata"]["labels"]["version"]
    )
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert cfg.listeners.inbound.port == ports["mesh-inbound"]
    assert cfg.listeners.admin.port == ports["lepton-admin"]
    assert cfg.listeners.admin.host == "0.0.0.0", "probes come from the kubelet, not loopback"
    assert cfg.tls is not None and cfg.tls.source == "control"

    # The control daemon, through its Service, on its sidecar port.
    (control,) = cfg.control.addresses
    svc = the("Service", "lepton-control")
    assert control.host == f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc"
    (port,) = [p["port"] for p in svc["spec"]["ports"] if p["targetPort"] == "sidecars"]
    assert control.port == port

    # The bundle and the join token are files of the volumes mounted there.
    bundle = mounted_file(c, pod, cfg.control.ca_bundle)
    assert bundle["volume"]["configMap"]["name"] == "lepton-trust-bundle"
    token = mounted_file(c, pod, cfg.control.token_file)
    assert token["volume"]["secret"]["secretName"] == f"lepton-join-{cfg.service}"
    for f in (bundle, token):
        assert f["key"] in volume_keys(f["volume"])
    state = mounted_file(c, pod, cfg.control.state_dir + "/last-known-good.json")
    assert "emptyDir" in state["volume"]

    # The app: on the loopback port the sidecar forwards to.
    (app,) = [a for a in pod["containers"] if a is not c]
    port_arg = app["args"][app["args"].index("--port") + 1]
    assert cfg.app.host == "127.0.0.1" and cfg.app.port == int(port_arg)
    if "--outbound" in app["args"]:
        outbound = app["args"][app["args"].index("--outbound") + 1]
        assert port_of(outbound) == cfg.listeners.outbound.port


def test_chat_is_the_front_door():
    svc = the("Service", "chat")
    assert svc["spec"]["ports"][0]["targetPort"] == "mesh-inbound"
    cm = the("ConfigMap", "lepton-sidecar-chat")
    assert "mode: PERMISSIVE" in cm["data"]["sidecar.yaml"]


def test_the_observability_scrape_config_finds_these_ports():
    """deploy/observability/prometheus.yml keeps containers by port name."""
    import re

    prometheus = REPO / "deploy" / "observability" / "prometheus.yml"
    if not prometheus.exists():
        pytest.skip("no deploy/observability/prometheus.yml in this tree")
    jobs = yaml_documents(prometheus)[0]["scrape_configs"]
    names = {p["name"] for w in workloads() for c in w_containers(w) for p in c.get("ports", [])}
    for job in jobs:
        for rule in job.get("relabel_configs", []):
            if rule.get("source_labels") == ["__meta_kubernetes_pod_container_port_name"]:
                assert any(re.fullmatch(rule["regex"], n) for n in names), job["job_name"]
