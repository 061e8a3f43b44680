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
INT_OR_PERCENT = {
    "anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": "^[0-9]+%$"}]
}


def obj(props: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": props}
    if required:
        out["required"] = required
    out.update(extra)
    return out


def probe() -> dict[str, Any]:
    pos = {"type": "integer", "minimum": 1}
    return obj({"periodSeconds": pos, "failureThreshold": pos, "timeoutSeconds": pos})


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
                    "existingClaim": STR,
                    "size": QUANTITY,
                    "storageClass": STR,
                    "accessModes": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "enum": [
                                "ReadWriteOnce",
                                "ReadOnlyMany",
                                "ReadWriteMany",
                                "ReadWriteOncePod",
                            ]
                        },
                    },
                    "mountPath": {"type": "string", "pattern": "^/"},
                    "fileName": {"type": "string", "pattern": "^[^/]+$"},
                }
            ),
            "scratch": obj({"tmpSizeLimit": QUANTITY, "dataSizeLimit": QUANTITY}),
            "resources": obj({"requests": OBJ, "limits": OBJ, "claims": ARR}),
            "probes": obj({"startup": probe(), "liveness": probe(), "readiness": probe()}),
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
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
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
