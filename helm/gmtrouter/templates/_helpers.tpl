{{/* Chart name. */}}
{{- define "gmtrouter.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name (63 characters at most). */}}
{{- define "gmtrouter.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "gmtrouter.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "gmtrouter.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gmtrouter.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels without app.kubernetes.io/component. */}}
{{- define "gmtrouter.commonLabels" -}}
helm.sh/chart: {{ include "gmtrouter.chart" . }}
{{ include "gmtrouter.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "gmtrouter.labels" -}}
{{ include "gmtrouter.commonLabels" . }}
app.kubernetes.io/component: router
{{- end }}

{{/* Labels of the metrics Service (the ServiceMonitor selects it by its component). */}}
{{- define "gmtrouter.metricsLabels" -}}
{{ include "gmtrouter.commonLabels" . }}
app.kubernetes.io/component: metrics
{{- end }}

{{/* The Prometheus port: config.server.metrics_port when set (0 = no metrics endpoint),
     else ports.metrics. */}}
{{- define "gmtrouter.metricsPort" -}}
{{- $server := dig "server" dict (.Values.config | default dict) }}
{{- if hasKey $server "metrics_port" }}
{{- int $server.metrics_port }}
{{- else }}
{{- int .Values.ports.metrics }}
{{- end }}
{{- end }}

{{/* "true" when the gRPC port speaks TLS (tls.enabled, or config.server.tls set directly). */}}
{{- define "gmtrouter.tlsOn" -}}
{{- if or .Values.tls.enabled (dig "server" "tls" "cert_file" "" (.Values.config | default dict)) }}true{{ else }}false{{ end }}
{{- end }}

{{/* The pods the Deployment runs at least: autoscaling.minReplicas or replicaCount. */}}
{{- define "gmtrouter.minPods" -}}
{{- if .Values.autoscaling.enabled }}{{ int .Values.autoscaling.minReplicas }}{{ else }}{{ int .Values.replicaCount }}{{ end }}
{{- end }}

{{- define "gmtrouter.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "gmtrouter.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "gmtrouter.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/* The store URI the service will use (config.store.uri, or the bundled Neo4j). */}}
{{- define "gmtrouter.storeUri" -}}
{{- $uri := "" }}
{{- with .Values.config.store }}{{ $uri = .uri | default "" }}{{ end }}
{{- $embedded := not (regexMatch "^(neo4j|bolt)(\\+s|\\+ssc)?://" $uri) }}
{{- if and .Values.neo4j.enabled $embedded }}
{{- $uri = printf "neo4j://%s:7687" (required "neo4j.fullnameOverride names the bundled Neo4j Service and must be set" .Values.neo4j.fullnameOverride) }}
{{- end }}
{{- $uri }}
{{- end }}

{{/* "true" when the service runs on the embedded SQLite store. */}}
{{- define "gmtrouter.embeddedStore" -}}
{{- if regexMatch "^(neo4j|bolt)(\\+s|\\+ssc)?://" (include "gmtrouter.storeUri" .) }}false{{ else }}true{{ end }}
{{- end }}

{{/* Secret name and key of the Neo4j password, or "" when there is none. */}}
{{- define "gmtrouter.neo4jSecretName" -}}
{{- if .Values.neo4jAuth.existingSecret }}
{{- .Values.neo4jAuth.existingSecret }}
{{- else if .Values.neo4jAuth.password }}
{{- printf "%s-neo4j" (include "gmtrouter.fullname" .) }}
{{- else if .Values.neo4j.enabled }}
{{- .Values.neo4j.neo4j.passwordFromSecret | default "" }}
{{- end }}
{{- end }}

{{- define "gmtrouter.neo4jSecretKey" -}}
{{- if .Values.neo4jAuth.existingSecret }}
{{- .Values.neo4jAuth.existingSecretKey | default "NEO4J_PASSWORD" }}
{{- else }}NEO4J_PASSWORD{{ end }}
{{- end }}

{{/* The configuration file: .Values.config with the chart-owned keys set. */}}
{{- define "gmtrouter.config" -}}
{{- $cfg := deepCopy (.Values.config | default dict) }}
{{- $server := get $cfg "server" | default dict }}
{{- $_ := set $server "host" "0.0.0.0" }}
{{- $_ = set $server "port" (int .Values.ports.grpc) }}
{{- $_ = set $server "metrics_port" (int (include "gmtrouter.metricsPort" .)) }}
{{- if .Values.tls.enabled }}
{{- $tls := dict "cert_file" "/etc/gmtrouter/tls/tls.crt" "key_file" "/etc/gmtrouter/tls/tls.key" }}
{{- if .Values.tls.requireClientAuth }}
{{- $_ = set $tls "client_ca_file" "/etc/gmtrouter/tls/ca.crt" }}
{{- $_ = set $tls "require_client_auth" true }}
{{- end }}
{{- $_ = set $server "tls" $tls }}
{{- end }}
{{- if .Values.auth.existingSecret }}
{{- $_ = set $server "auth" (dict "tokens_file" (printf "/etc/gmtrouter/auth/%s" .Values.auth.existingSecretKey)) }}
{{- end }}
{{- $_ = set $cfg "server" $server }}
{{- $store := get $cfg "store" | default dict }}
{{- $_ = set $store "uri" (include "gmtrouter.storeUri" .) }}
{{- $_ = set $cfg "store" $store }}
{{- if .Values.modelCheckpoint.enabled }}
{{- $decision := get $cfg "decision" | default dict }}
{{- $algo := get $decision "algorithm" | default dict }}
{{- $gmt := get $algo "gmtrouter" | default dict }}
{{- $_ = set $gmt "model_path" (printf "%s/%s" (trimSuffix "/" .Values.modelCheckpoint.mountPath) .Values.modelCheckpoint.fileName) }}
{{- $_ = set $algo "gmtrouter" $gmt }}
{{- $_ = set $decision "algorithm" $algo }}
{{- $_ = set $cfg "decision" $decision }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/* Refuse settings that cannot work. */}}
{{- define "gmtrouter.validate" -}}
{{- if eq (include "gmtrouter.embeddedStore" .) "true" }}
{{- if or (gt (int .Values.replicaCount) 1) .Values.autoscaling.enabled }}
{{- fail "config.store.uri is the embedded SQLite store, which lives in one pod: keep replicaCount at 1 and autoscaling off, or set config.store.uri to neo4j://HOST:7687 (or neo4j.enabled=true) so that replicas share one store" }}
{{- end }}
{{- end }}
{{- $gmt := dig "decision" "algorithm" "gmtrouter" dict (.Values.config | default dict) }}
{{- $hidden := int ($gmt.hidden_dim | default 64) }}
{{- $heads := int ($gmt.num_heads | default 4) }}
{{- if and (gt $heads 0) (ne (mod $hidden $heads) 0) }}
{{- fail (printf "config.decision.algorithm.gmtrouter.hidden_dim (%d) must be divisible by num_heads (%d)" $hidden $heads) }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) }}
{{- fail "tls.enabled needs tls.existingSecret: a Secret with tls.crt and tls.key (and ca.crt for requireClientAuth)" }}
{{- end }}
{{- if and .Values.tls.requireClientAuth (not .Values.tls.enabled) }}
{{- fail "tls.requireClientAuth needs tls.enabled" }}
{{- end }}
{{- if and .Values.modelCheckpoint.enabled (not .Values.modelCheckpoint.fileName) }}
{{- fail "modelCheckpoint.fileName must name the checkpoint file" }}
{{- end }}
{{- if and .Values.modelCheckpoint.enabled (not .Values.modelCheckpoint.existingClaim) }}
{{- fail (printf "modelCheckpoint.enabled needs modelCheckpoint.existingClaim: a PersistentVolumeClaim that already holds the checkpoint (modelCheckpoint.fileName, written by `gmtrouter train --out`), e.g. filled by a Job or by kubectl cp through a helper pod. The chart does not create the claim: a new one would be empty and the pods could not start. Upgrading from chart 0.1.x, whose claim was kept: set modelCheckpoint.existingClaim=%s-model" (include "gmtrouter.fullname" .)) }}
{{- end }}
{{- $cfg := .Values.config | default dict }}
{{- /* Secrets never go into the ConfigMap. */}}
{{- if dig "store" "neo4j" "password" "" $cfg }}
{{- fail "config.store.neo4j.password would be written in clear into the ConfigMap: remove it and set neo4jAuth.existingSecret (a Secret holding the password; recommended) or neo4jAuth.password (the chart creates the Secret)" }}
{{- end }}
{{- /* Cross-field rules of server/config.py, checked at install time. */}}
{{- $tlsCfg := dig "server" "tls" dict $cfg }}
{{- if and .Values.tls.enabled $tlsCfg }}
{{- fail "config.server.tls is set by the chart when tls.enabled is true: set tls.existingSecret (and tls.requireClientAuth) instead of config.server.tls" }}
{{- end }}
{{- if ne (empty $tlsCfg.cert_file) (empty $tlsCfg.key_file) }}
{{- fail "config.server.tls: cert_file and key_file must be set together (or use tls.enabled with tls.existingSecret)" }}
{{- end }}
{{- if and $tlsCfg.client_ca_file (empty $tlsCfg.cert_file) }}
{{- fail "config.server.tls: client_ca_file needs cert_file and key_file (TLS) as well" }}
{{- end }}
{{- if and $tlsCfg.require_client_auth (empty $tlsCfg.client_ca_file) }}
{{- fail "config.server.tls: require_client_auth needs client_ca_file" }}
{{- end }}
{{- $age := float64 (dig "server" "max_connection_age_s" 0.0 $cfg) }}
{{- if and (gt $age 0.0) (lt $age 1.0) }}
{{- fail (printf "config.server.max_connection_age_s: must be 0 (never) or at least 1 second, got %v" $age) }}
{{- end }}
{{- $learning := dig "learning" dict $cfg }}
{{- $lease := float64 (dig "lease_ttl_s" 180.0 $learning) }}
{{- $check := float64 (dig "check_interval_s" 30.0 $learning) }}
{{- $budget := float64 (dig "time_budget_s" 60.0 $learning) }}
{{- if and (eq (dig "role" "auto" $learning) "auto") (le $lease (addf $check $budget)) }}
{{- fail (printf "config.learning: lease_ttl_s (got %v) must exceed check_interval_s + time_budget_s (got %v + %v), or the trainer's lease can expire during a round" $lease $check $budget) }}
{{- end }}
{{- /* SIGTERM to exit takes at most drain_delay_s + grace_period_s + 10 s (store close,
     STORE_CLOSE_TIMEOUT_S in server/app.py) + a few seconds: 15 s beyond the two. */}}
{{- $drain := float64 (dig "server" "drain_delay_s" 0.0 $cfg) }}
{{- $grace := float64 (dig "server" "grace_period_s" 10.0 $cfg) }}
{{- $need := addf $drain $grace 15.0 }}
{{- if lt (float64 .Values.terminationGracePeriodSeconds) $need }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must be at least config.server.drain_delay_s (%v) + config.server.grace_period_s (%v) + 15 (store close 10 s + exit) = %v, or Kubernetes kills the pod before it has drained: raise terminationGracePeriodSeconds or lower those" .Values.terminationGracePeriodSeconds $drain $grace (ceil $need)) }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled (eq (include "gmtrouter.metricsPort" .) "0") }}
{{- fail "metrics.serviceMonitor.enabled needs the metrics endpoint, but config.server.metrics_port is 0 (off): unset it (the chart then uses ports.metrics) or disable the ServiceMonitor" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail (printf "autoscaling.minReplicas (%d) must not exceed autoscaling.maxReplicas (%d)" (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- end }}
{{- end }}
