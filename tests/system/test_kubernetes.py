"""deploy/kubernetes: valid against the Kubernetes API schemas (offline), and consistent.

kubernetes-validate ships the API's JSON schemas, so this needs no cluster and no network.
Beyond the schemas, the references a cluster would only reveal at run time: selectors and
labels, ports and probes, the shutdown timeline, and every MFA_* variable against
mfa_service/settings.py (the ConfigMap with test secrets must even be a valid production
configuration).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from mfa_service.crypto import Keyring
from mfa_service.settings import Environment, Settings
from tests.support.config import REPO

DEPLOY = REPO / "deploy/kubernetes"
# The oldest Kubernetes we support and the newest schemas the package ships.
VERSIONS = ["1.30", kubernetes_validate.utils.latest_version()]
SETTINGS = {f"MFA_{name.upper()}" for name in Settings.model_fields}

# Custom resources (the CloudNativePG Cluster) are not in the Kubernetes API schemas:
# tests/system/test_kubernetes_cnpg.py validates them against their own.
CUSTOM_API_GROUPS = ("postgresql.cnpg.io/",)

Manifest = dict[str, Any]


def _load() -> list[tuple[str, Manifest]]:
    docs: list[tuple[str, Manifest]] = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        source = str(path.relative_to(DEPLOY))
        docs += [(source, doc) for doc in yaml.safe_load_all(path.read_text("utf-8"))
                 if doc is not None and not doc["apiVersion"].startswith(CUSTOM_API_GROUPS)]
    return docs


DOCS = _load()


def one(kind: str, name: str | None = None) -> Manifest:
    found = [d for _, d in DOCS if d["kind"] == kind
             and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


DEPLOYMENT = one("Deployment")
POD = DEPLOYMENT["spec"]["template"]
(CONTAINER,) = POD["spec"]["containers"]
JOB = one("Job")
CONFIG = one("ConfigMap", "mfa-service-config")["data"]
SECRETS = one("Secret", "mfa-service-secrets")["stringData"]


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _container_port(port: int | str) -> int:
    """A probe's or Service's port (number or name) as the container's port number."""
    by_name = {p["name"]: p["containerPort"] for p in CONTAINER["ports"]}
    number = by_name[port] if isinstance(port, str) else port
    assert number in by_name.values(), f"port {port} is not a container port"
    return int(number)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("source", "doc"), DOCS,
                         ids=[f"{f}:{d['kind']}/{d['metadata']['name']}" for f, d in DOCS])
def test_every_manifest_is_valid_for_the_api(source: str, doc: Manifest, version: str) -> None:
    # strict: unknown fields (typos) are errors too.
    problem = None
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as err:  # its text holds the whole schema
        problem = f"{source}: {err.message} at {'.'.join(map(str, err.absolute_path))}"
    assert problem is None, problem


def test_every_part_is_there() -> None:
    kinds = {(d["apiVersion"], d["kind"]) for _, d in DOCS}
    assert kinds == {
        ("apps/v1", "Deployment"), ("v1", "Service"), ("batch/v1", "Job"),
        ("policy/v1", "PodDisruptionBudget"), ("autoscaling/v2", "HorizontalPodAutoscaler"),
        ("networking.k8s.io/v1", "NetworkPolicy"), ("v1", "Secret"), ("v1", "ConfigMap")}


def test_selectors_find_the_servers_and_only_them() -> None:
    labels = POD["metadata"]["labels"]
    job_labels = JOB["spec"]["template"]["metadata"]["labels"]
    assert _matches(DEPLOYMENT["spec"]["selector"]["matchLabels"], labels)
    service_selector = one("Service")["spec"]["selector"]
    assert _matches(service_selector, labels)
    assert not _matches(service_selector, job_labels)  # the Job never gets traffic
    assert _matches(one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"], labels)
    target = one("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", DEPLOYMENT["metadata"]["name"])
    policy = one("NetworkPolicy")["spec"]
    assert _matches(policy["podSelector"]["matchLabels"], labels)
    assert _matches(policy["podSelector"]["matchLabels"], job_labels)  # DNS + PostgreSQL


def test_ports_agree_from_the_listen_address_to_the_service() -> None:
    listen_port = int(CONFIG["MFA_LISTEN_ADDR"].rpartition(":")[2])
    assert CONFIG["MFA_LISTEN_ADDR"].startswith("0.0.0.0:")  # reachable from the pod IP
    assert _container_port(listen_port) == listen_port
    (service_port,) = one("Service")["spec"]["ports"]
    assert _container_port(service_port["targetPort"]) == listen_port
    for probe in ("startupProbe", "livenessProbe"):
        assert _container_port(CONTAINER[probe]["tcpSocket"]["port"]) == listen_port
    # Readiness: the kubelet's gRPC probe on the plaintext health-only listener, which
    # binds the pod IP (the kubelet connects there), on a container port of its own.
    health_addr = CONFIG["MFA_HEALTH_LISTEN_ADDR"]
    assert health_addr.startswith("0.0.0.0:")
    health_port = int(health_addr.rpartition(":")[2])
    assert health_port != listen_port
    assert _container_port(CONTAINER["readinessProbe"]["grpc"]["port"]) == health_port
    # Only the gRPC port is reachable from other pods; the health port is for the kubelet.
    (ingress,) = one("NetworkPolicy")["spec"]["ingress"]
    assert [_container_port(p["port"]) for p in ingress["ports"]] == [listen_port]


def test_the_shutdown_timeline_fits_the_grace_period() -> None:
    command = CONTAINER["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    drain = float(CONFIG["MFA_SHUTDOWN_DRAIN_SECONDS"])
    grace = float(CONFIG["MFA_SHUTDOWN_GRACE_SECONDS"])
    # The preStop sleep matches the drain period: endpoints update while we still serve.
    assert pre_stop == drain > 0
    margin = POD["spec"]["terminationGracePeriodSeconds"] - (pre_stop + drain + grace)
    assert margin >= 5, f"only {margin} s left for closing after preStop, drain and grace"
    # A readiness failure must be noticed within the drain period.
    readiness = CONTAINER["readinessProbe"]
    assert readiness["periodSeconds"] * readiness["failureThreshold"] <= pre_stop + drain + 10


def test_every_variable_is_a_setting_of_the_server() -> None:
    names = set(CONFIG) | set(SECRETS)
    for container in (CONTAINER, *JOB["spec"]["template"]["spec"]["containers"]):
        names |= {e["name"] for e in container.get("env", [])}
    assert all(n.startswith("MFA_") for n in names), names
    assert names - SETTINGS == set()


def test_the_config_is_a_valid_production_config(monkeypatch: pytest.MonkeyPatch) -> None:
    real_secrets = {**SECRETS, "MFA_KEYRING": Keyring.generate_entry("k1")}
    for name, value in {**CONFIG, **real_secrets}.items():
        monkeypatch.setenv(name, value)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.env is Environment.PRODUCTION
    assert not settings.is_sqlite and settings.workers == 1
    # The files it names are where the pod mounts them.
    mounts = {m["name"]: m["mountPath"] for m in CONTAINER["volumeMounts"]}
    volumes = {v["name"]: v for v in POD["spec"]["volumes"]}
    assert settings.tls_cert_file == Path(mounts["tls"], "tls.crt")
    assert settings.tls_key_file == Path(mounts["tls"], "tls.key")
    assert volumes["tls"]["secret"]["secretName"] == one(
        "Secret", "mfa-service-tls")["metadata"]["name"]
    assert settings.callers_file is not None
    assert settings.callers_file.parent == Path(mounts["callers"])
    callers = one("ConfigMap", volumes["callers"]["configMap"]["name"])["data"]
    assert settings.callers_file.name in callers


def test_secrets_are_placeholders_and_referenced_by_name() -> None:
    for source, doc in DOCS:
        if doc["kind"] == "Secret":
            # `kubectl apply -f deploy/kubernetes/` must never overwrite the real ones.
            assert source.startswith("examples/"), source
            assert set(doc["stringData"].values()) == {"REPLACE_ME"}
            assert "data" not in doc
    for container in (CONTAINER, *JOB["spec"]["template"]["spec"]["containers"]):
        refs = container["envFrom"]
        assert {r["configMapRef"]["name"] for r in refs if "configMapRef" in r} == {
            "mfa-service-config"}
        assert {r["secretRef"]["name"] for r in refs if "secretRef" in r} == {
            "mfa-service-secrets"}


def test_pods_run_non_root_read_only_without_privileges() -> None:
    uid = re.search(r"^USER (\d+)", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    assert uid is not None
    for pod in (POD, JOB["spec"]["template"]):
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == int(uid.group(1))
        assert spec["automountServiceAccountToken"] is False
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
            assert container["resources"]["requests"] and container["resources"]["limits"]


def test_the_job_migrates_with_the_servers_image_and_settings() -> None:
    (migrate,) = JOB["spec"]["template"]["spec"]["containers"]
    assert migrate["args"] == ["migrate"]
    assert migrate["image"] == CONTAINER["image"]
    assert migrate["envFrom"] == CONTAINER["envFrom"]
    assert CONTAINER["args"] == ["serve"]
    assert JOB["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_the_network_policy_lets_in_only_the_portal_and_the_backoffice() -> None:
    policy = one("NetworkPolicy")["spec"]
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]  # default deny both ways
    (ingress,) = policy["ingress"]
    assert sorted(peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
                  for peer in ingress["from"]) == ["backoffice", "portal"]
    egress_ports = sorted({p["port"] for rule in policy["egress"] for p in rule["ports"]})
    assert egress_ports == sorted({53, 5432, int(CONFIG["MFA_SMTP_PORT"]), 443})
