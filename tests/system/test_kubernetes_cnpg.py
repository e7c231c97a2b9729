"""deploy/kubernetes/cloudnative-pg: the example CloudNativePG Cluster, valid and consistent.

kubernetes-validate ships only the core Kubernetes schemas, so the Cluster (a custom
resource) is validated offline against tests/schemas/cnpg-cluster.schema.json: the subset
of CloudNativePG's Cluster API the manifest uses, unknown fields refused. Beyond the schema,
what a cluster would only reveal at run time: a synchronous standby that can exist, and
mfa-service's URL and NetworkPolicy reaching the Cluster's `-rw` Service.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any
from urllib.parse import urlsplit

import jsonschema  # type: ignore[import-untyped]  # no type stubs
import pytest
import yaml

from mfa_service.settings import database_url_problem
from tests.support.config import REPO

MANIFEST = REPO / "deploy/kubernetes/cloudnative-pg/cluster.yaml"
SCHEMA = json.loads((REPO / "tests/schemas/cnpg-cluster.schema.json").read_text("utf-8"))
(CLUSTER,) = [d for d in yaml.safe_load_all(MANIFEST.read_text("utf-8")) if d is not None]
SPEC: dict[str, Any] = CLUSTER["spec"]
(NETWORK_POLICY,) = [d for d in yaml.safe_load_all(
    (REPO / "deploy/kubernetes/networkpolicy.yaml").read_text("utf-8")) if d is not None]


def _errors(doc: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(SCHEMA)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(doc)]


def test_the_schema_is_a_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_the_cluster_is_valid_for_its_schema() -> None:
    assert _errors(CLUSTER) == []


@pytest.mark.parametrize(("path", "value"), [
    (("spec", "instancez"), 2),                                  # a typo
    (("spec", "postgresql", "synchronous", "method"), "all"),    # not any / first
    (("spec", "postgresql", "synchronous", "number"), 0),        # must be > 0
    (("spec", "postgresql", "synchronous", "dataDurability"), "strict"),
    (("spec", "instances"), "2"),
])
def test_the_schema_refuses_what_the_operator_refuses(path: tuple[str, ...], value: Any) -> None:
    doc = copy.deepcopy(CLUSTER)
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert _errors(doc), f"{'.'.join(path)} = {value!r} was accepted"


def test_one_synchronous_standby_that_can_exist() -> None:
    synchronous = SPEC["postgresql"]["synchronous"]
    assert SPEC["instances"] == 2
    assert 1 <= synchronous["number"] <= SPEC["instances"] - 1
    assert synchronous["dataDurability"] == "required"  # nothing acknowledged is lost
    # The 1.25 stanza, not the older fields as well.
    assert "minSyncReplicas" not in SPEC and "maxSyncReplicas" not in SPEC
    assert SPEC["postgresql"]["parameters"]["synchronous_commit"] in ("on", "remote_apply")
    # The standby on another node than the primary.
    assert SPEC["affinity"]["enablePodAntiAffinity"] is True
    assert SPEC["affinity"]["podAntiAffinityType"] == "required"
    assert SPEC["affinity"]["topologyKey"] == "kubernetes.io/hostname"


def test_the_service_url_names_the_clusters_rw_service() -> None:
    (url,) = re.findall(r"^#\s+MFA_DATABASE_URL:\s*(\S+)$", MANIFEST.read_text("utf-8"),
                        re.MULTILINE)
    assert database_url_problem(url) is None
    parts = urlsplit(url)
    name, namespace = CLUSTER["metadata"]["name"], CLUSTER["metadata"]["namespace"]
    assert parts.scheme == "postgresql+asyncpg"
    assert parts.hostname == f"{name}-rw.{namespace}.svc.cluster.local"
    assert parts.port == 5432
    assert parts.password is None  # MFA_DATABASE_PASSWORD, from the operator's Secret
    initdb = SPEC["bootstrap"]["initdb"]
    assert parts.username == initdb["owner"]
    assert parts.path == f"/{initdb['database']}"


def test_the_network_policy_lets_mfa_service_reach_the_cluster() -> None:
    (rule,) = [r for r in NETWORK_POLICY["spec"]["egress"]
               if any(p["port"] == 5432 for p in r["ports"])]
    (peer,) = rule["to"]
    namespace = peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
    assert CLUSTER["metadata"]["namespace"] == namespace
    # The operator puts inheritedMetadata's labels on the instance pods.
    pod_labels = SPEC["inheritedMetadata"]["labels"]
    assert all(pod_labels.get(k) == v for k, v in peer["podSelector"]["matchLabels"].items())
