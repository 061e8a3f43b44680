"""Write (or --check) helm/gmtrouter/values.schema.json.

The ``config`` value is the service's own configuration file, so its schema is generated from
the pydantic model in server/config.py (same keys, ranges and enums; unknown keys rejected as
the server rejects them). The rest of the schema describes the chart's own values.

Run from the repository root with the project's virtual environment:
    .venv/bin/python helm/gen-values-schema.py          # rewrite the file
    .venv/bin/python helm/gen-values-schema.py --check  # exit 1 when the file is stale
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from server.config import Settings  # noqa: E402

OUT = REPO / "helm" / "gmtrouter" / "values.schema.json"

STR = {"type": "string"}
BOOL = {"type": "boolean"}
OBJ = {"type": "object"}
STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
ARR = {"type": "array"}
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
QUANTITY = {
    "type": ["string", "integer"],
    "pattern": "^[0-9]+(\\.[0-9]+)?([EPTGMk]i?|[mun]|e[0-9]+)?$",
}
# The PDB template reads "2" as 2 (no leading zeros: no octal surprises) and keeps "50%".
INT_OR_PERCENT = {
    "anyOf": [
        {"type": "integer", "minimum": 0},
        {"type": "string", "pattern": "^(0|[1-9][0-9]*)$"},
        {"type": "string", "pattern": "^(0|[1-9][0-9]?|100)%$"},
    ],
    "description": 'An integer (or an integer string, e.g. "2") or a percentage ("50%").',
}
# Prometheus duration (the pattern of the prometheus-operator CRDs' Duration), e.g. 1m30s.
DURATION = {
    "type": "string",
    "minLength": 1,
    "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?"
    "(([0-9]+)ms)?)$",
}


def obj(props: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": props}
    if required:
        out["required"] = required
    out.update(extra)
    return out


def probe(readiness: bool = False) -> dict[str, Any]:
    """The probe fields deployment.yaml passes through (toYaml) after the handler."""
    pos = {"type": "integer", "minimum": 1}
    props: dict[str, Any] = {
        "periodSeconds": pos,
        "failureThreshold": pos,
        "timeoutSeconds": pos,
        "initialDelaySeconds": {"type": "integer", "minimum": 0},
    }
    if readiness:  # Kubernetes requires successThreshold 1 for liveness and startup probes
        props["successThreshold"] = pos
    return obj(props)


def chart_schema() -> dict[str, Any]:
    return obj(
        {
            "global": OBJ,
            "replicaCount": {"type": "integer", "minimum": 0, "description": "Pods (no HPA)."},
            "image": obj(
                {
                    "repository": {"type": "string", "minLength": 1},
                    "tag": STR,
                    "digest": {"type": "string", "pattern": "^(sha256:[a-f0-9]{64})?$"},
                    "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
                },
                ["repository"],
            ),
            "imagePullSecrets": {
                "type": "array",
                "items": obj({"name": {"type": "string", "minLength": 1}}, ["name"]),
            },
            "nameOverride": STR,
            "fullnameOverride": STR,
            "serviceAccount": obj(
                {
                    "create": BOOL,
                    "name": STR,
                    "annotations": STR_MAP,
                    "automountServiceAccountToken": BOOL,
                }
            ),
            "podAnnotations": STR_MAP,
            "podLabels": STR_MAP,
            "podSecurityContext": OBJ,
            "securityContext": OBJ,
            "ports": obj({"grpc": PORT, "metrics": PORT}, ["grpc", "metrics"]),
            "service": obj(
                {
                    "type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                    "annotations": STR_MAP,
                    "grpcPort": PORT,
                    "metricsPort": PORT,
                    "headless": obj({"enabled": BOOL}),
                }
            ),
            "config": {"$ref": "#/$defs/Settings"},
            "tls": obj({"enabled": BOOL, "existingSecret": STR, "requireClientAuth": BOOL}),
            "auth": obj(
                {
                    "existingSecret": STR,
                    "existingSecretKey": {"type": "string", "pattern": "^[-._a-zA-Z0-9]+$"},
                }
            ),
            "neo4jAuth": obj(
                {
                    "existingSecret": STR,
                    "existingSecretKey": {"type": "string", "minLength": 1},
                    "password": STR,
                }
            ),
            "modelCheckpoint": obj(
                {
                    "enabled": BOOL,
                    "existingClaim": {
                        "type": "string",
                        "description": "PersistentVolumeClaim holding fileName; required "
                        "with enabled (the chart does not create it).",
                    },
                    "mountPath": {"type": "string", "pattern": "^/"},
                    "fileName": {"type": "string", "pattern": "^[^/]+$"},
                }
            ),
            "scratch": obj({"tmpSizeLimit": QUANTITY, "dataSizeLimit": QUANTITY}),
            "resources": obj({"requests": OBJ, "limits": OBJ, "claims": ARR}),
            "probes": obj(
                {"startup": probe(), "liveness": probe(), "readiness": probe(readiness=True)}
            ),
            "terminationGracePeriodSeconds": {"type": "integer", "minimum": 0},
            "autoscaling": obj(
                {
                    "enabled": BOOL,
                    "minReplicas": {"type": "integer", "minimum": 1},
                    "maxReplicas": {"type": "integer", "minimum": 1},
                    "targetCPUUtilizationPercentage": {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": 100,
                    },
                    "targetMemoryUtilizationPercentage": {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": 100,
                    },
                }
            ),
            "podDisruptionBudget": obj(
                {
                    "enabled": BOOL,
                    "maxUnavailable": {"anyOf": [INT_OR_PERCENT, {"type": "null"}]},
                    "minAvailable": {"anyOf": [INT_OR_PERCENT, {"type": "null"}]},
                }
            ),
            "metrics": obj(
                {
                    "serviceMonitor": obj(
                        {
                            "enabled": BOOL,
                            "interval": DURATION,
                            "scrapeTimeout": DURATION,
                            "path": {"type": "string", "pattern": "^/"},
                            "labels": STR_MAP,
                        }
                    )
                }
            ),
            "nodeSelector": STR_MAP,
            "tolerations": ARR,
            "affinity": OBJ,
            "topologySpreadConstraints": ARR,
            "priorityClassName": STR,
            "extraEnv": {
                "type": "array",
                "items": {"type": "object", "required": ["name"]},
            },
            # The official Neo4j chart's values pass through unchecked, except the switch.
            "neo4j": {
                "type": "object",
                "properties": {"enabled": BOOL, "fullnameOverride": STR},
                "required": ["enabled"],
            },
        },
        ["replicaCount", "image", "ports", "service", "config"],
    )


def strip_titles(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: strip_titles(v) for k, v in node.items() if k != "title"}
    if isinstance(node, list):
        return [strip_titles(v) for v in node]
    return node


def build() -> dict[str, Any]:
    settings = strip_titles(Settings.model_json_schema())
    defs = settings.pop("$defs")
    settings["description"] = (
        "The service's configuration file (server/config.py), rendered into the ConfigMap."
    )
    defs["Settings"] = settings
    # The ConfigMap is not secret: the chart's validate helper refuses a password here, with
    # a message pointing at neo4jAuth (a schema error could not name the right values).
    defs["Neo4jSettings"]["properties"]["password"]["description"] = (
        "Never set in the chart: the ConfigMap is not secret (the render fails). Use "
        "neo4jAuth.existingSecret or neo4jAuth.password (env NEO4J_PASSWORD)."
    )
    schema: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": "Generated by helm/gen-values-schema.py from the chart's values and "
        "server/config.py; do not edit by hand.",
        "title": "gmtrouter Helm chart values",
    }
    schema.update(chart_schema())
    schema["$defs"] = defs
    return schema


def main() -> int:
    text = json.dumps(build(), indent=2, ensure_ascii=False) + "\n"
    if "--check" in sys.argv[1:]:
        if not OUT.exists() or OUT.read_text(encoding="utf-8") != text:
            print(
                f"{OUT.relative_to(REPO)} is stale: run .venv/bin/python helm/gen-values-schema.py",
                file=sys.stderr,
            )
            return 1
        print(f"{OUT.relative_to(REPO)} is up to date with server/config.py")
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
