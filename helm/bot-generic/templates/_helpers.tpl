{{/* vim: set filetype=mustache: */}}

{{/* Chart name, at most 63 characters. */}}
{{- define "bot-generic.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name. Kept to 42 characters so that "-worker-" plus a role key (at most 13) still fits
in 63.
*/}}
{{- define "bot-generic.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 42 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 42 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 42 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "bot-generic.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of the release (no component). */}}
{{- define "bot-generic.selectorLabels" -}}
app.kubernetes.io/name: {{ include "bot-generic.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of every resource. */}}
{{- define "bot-generic.labels" -}}
helm.sh/chart: {{ include "bot-generic.chart" . }}
{{ include "bot-generic.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: bot-generic
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels of one component. Call with (dict "ctx" $ "component" "edge") or, for a worker,
(dict "ctx" $ "component" "worker" "role" "llm").
*/}}
{{- define "bot-generic.componentSelectorLabels" -}}
{{ include "bot-generic.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- if .role }}
bot-generic/worker-role: {{ .role }}
{{- end }}
{{- end }}

{{- define "bot-generic.componentLabels" -}}
{{ include "bot-generic.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- if .role }}
bot-generic/worker-role: {{ .role }}
{{- end }}
{{- end }}

{{- define "bot-generic.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}
{{- end }}

{{/* Name of the Secret the pods load: the existing one, or the one the chart creates. */}}
{{- define "bot-generic.secretName" -}}
{{- .Values.secrets.existingSecret | default (include "bot-generic.fullname" .) }}
{{- end }}

{{/* The BG_* variables config.c marks BG_CFG_SECRET; they never go into the ConfigMap. */}}
{{- define "bot-generic.secretVarNames" -}}
BG_TLS_KEY BG_REDIS_URL BG_DATABASE_URL BG_JWT_SECRET BG_JWT_KEYS BG_LLM_API_KEY BG_TELEGRAM_BOT_TOKEN BG_TELEGRAM_WEBHOOK_SECRET BG_PADDLE_API_KEY BG_PADDLE_WEBHOOK_SECRETS BG_SMTP_URL
{{- end }}

{{/*
A value as an environment string: "" for unset (nil or empty), integers without exponent (values
files turn numbers into float64, which would print 1048576 as 1.048576e+06).
*/}}
{{- define "bot-generic.envString" -}}
{{- if kindIs "invalid" . }}
{{- else if kindIs "float64" . }}
{{- if eq (floor .) . }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- else }}
{{- toString . }}
{{- end }}
{{- end }}

{{/* data: of the ConfigMap (sorted keys, unset values left out). */}}
{{- define "bot-generic.configData" -}}
{{- range $k, $v := .Values.config }}
{{- $s := include "bot-generic.envString" $v }}
{{- if ne $s "" }}
{{ $k }}: {{ $s | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* data: of the Secret the chart creates (base64, sorted keys, unset values left out). */}}
{{- define "bot-generic.secretData" -}}
{{- range $k, $v := .Values.secrets.values }}
{{- $s := include "bot-generic.envString" $v }}
{{- if ne $s "" }}
{{ $k }}: {{ $s | b64enc | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* Pod annotations that roll the pods when configuration or secrets change. */}}
{{- define "bot-generic.checksumAnnotations" -}}
checksum/config: {{ include "bot-generic.configData" . | sha256sum }}
{{- if .Values.secrets.existingSecret }}
checksum/secret: {{ .Values.secrets.existingSecret | sha256sum }}
{{- else }}
checksum/secret: {{ include "bot-generic.secretData" . | sha256sum }}
{{- end }}
{{- end }}

{{/* One of the BG_* settings as a string (config first). Call with (list $ "BG_NAME"). */}}
{{- define "bot-generic.setting" -}}
{{- $ctx := index . 0 }}
{{- include "bot-generic.envString" (index $ctx.Values.config (index . 1)) }}
{{- end }}

{{/*
terminationGracePeriodSeconds: the explicit value, or ceil(BG_SHUTDOWN_GRACE_MS / 1000) + the preStop
sleep + the margin. Kubernetes counts the preStop hook inside the grace period, so the total must
exceed both together. Call with (dict "ctx" $ "preStop" N "explicit" V).
*/}}
{{- define "bot-generic.terminationGrace" -}}
{{- $ctx := .ctx }}
{{- $graceMs := include "bot-generic.setting" (list $ctx "BG_SHUTDOWN_GRACE_MS") | default "10000" | int64 }}
{{- $graceS := div (add $graceMs 999) 1000 }}
{{- $preStop := .preStop | default 0 | int64 }}
{{- $explicit := include "bot-generic.envString" .explicit }}
{{- if ne $explicit "" }}
{{- if le (int64 $explicit) (add $graceS $preStop) }}
{{- fail (printf "terminationGracePeriodSeconds=%s must exceed BG_SHUTDOWN_GRACE_MS (%d s, rounded up) plus the preStop sleep (%d s)" $explicit $graceS $preStop) }}
{{- end }}
{{- $explicit }}
{{- else }}
{{- add $graceS $preStop ($ctx.Values.terminationGraceMarginSeconds | default 10 | int64) }}
{{- end }}
{{- end }}

{{/* preStop lifecycle hook sleeping N seconds; nothing for 0. Call with (dict "ctx" $ "seconds" N). */}}
{{- define "bot-generic.lifecycle" -}}
{{- $s := .seconds | default 0 | int64 -}}
{{- if gt $s 0 -}}
lifecycle:
  preStop:
    {{- if .ctx.Values.preStopSleepAction }}
    sleep:
      seconds: {{ $s }}
    {{- else }}
    exec:
      command: ["sleep", "{{ $s }}"]
    {{- end }}
{{- end }}
{{- end }}

{{/* startup, liveness and readiness probes. Call with (dict "port" "http" "probes" .probes). */}}
{{- define "bot-generic.probes" -}}
{{- $port := .port -}}
{{- with .probes.startup -}}
startupProbe:
  httpGet:
    path: /healthz
    port: {{ $port }}
  {{- toYaml . | nindent 2 }}
{{ end -}}
livenessProbe:
  httpGet:
    path: /healthz
    port: {{ $port }}
  {{- with .probes.liveness }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
readinessProbe:
  httpGet:
    path: /readyz
    port: {{ $port }}
  {{- with .probes.readiness }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}

{{/* envFrom of every container: the ConfigMap and the Secret. Call with (dict "ctx" $ "configMap" NAME "secret" NAME). */}}
{{- define "bot-generic.envFrom" -}}
envFrom:
  - configMapRef:
      name: {{ .configMap }}
  - secretRef:
      name: {{ .secret }}
{{- end }}

{{/*
Fixed env of every container. BG_ENV_FILE points at /dev/null so that a stray .env in the image's
working directory can never add settings behind the ConfigMap's back.
*/}}
{{- define "bot-generic.baseEnv" -}}
- name: BG_ENV_FILE
  value: /dev/null
{{- end }}

{{/* /tmp on a read-only root filesystem. */}}
{{- define "bot-generic.tmpVolume" -}}
- name: tmp
  emptyDir:
    {{- with .Values.tmpVolume.medium }}
    medium: {{ . }}
    {{- end }}
    {{- with .Values.tmpVolume.sizeLimit }}
    sizeLimit: {{ . }}
    {{- end }}
{{- end }}

{{/*
topologySpreadConstraints: the component's own, or the default spread over hosts and zones.
Call with (dict "ctx" $ "own" LIST "selector" (include … selector labels)).
*/}}
{{- define "bot-generic.topologySpread" -}}
{{- if .own -}}
topologySpreadConstraints:
  {{- toYaml .own | nindent 2 }}
{{- else if .ctx.Values.defaultTopologySpread.enabled -}}
{{- $d := .ctx.Values.defaultTopologySpread -}}
{{- $selector := .selector -}}
topologySpreadConstraints:
  {{- range $d.topologyKeys }}
  - maxSkew: {{ $d.maxSkew }}
    topologyKey: {{ . }}
    whenUnsatisfiable: {{ $d.whenUnsatisfiable }}
    labelSelector:
      matchLabels:
        {{- $selector | nindent 8 }}
  {{- end }}
{{- end }}
{{- end }}

{{/* HorizontalPodAutoscaler spec body. Call with (dict "name" DEPLOYMENT "hpa" .autoscaling). */}}
{{- define "bot-generic.hpaSpec" -}}
scaleTargetRef:
  apiVersion: apps/v1
  kind: Deployment
  name: {{ .name }}
minReplicas: {{ .hpa.minReplicas }}
maxReplicas: {{ .hpa.maxReplicas }}
metrics:
  {{- with .hpa.targetCPUUtilizationPercentage }}
  - type: Resource
    resource:
      name: cpu
      target:
        type: Utilization
        averageUtilization: {{ . }}
  {{- end }}
  {{- with .hpa.targetMemoryUtilizationPercentage }}
  - type: Resource
    resource:
      name: memory
      target:
        type: Utilization
        averageUtilization: {{ . }}
  {{- end }}
{{- with .hpa.behavior }}
behavior:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* PodDisruptionBudget budget: minAvailable when set, else maxUnavailable (default 1). */}}
{{- define "bot-generic.pdbBudget" -}}
{{- $min := include "bot-generic.envString" .minAvailable -}}
{{- if ne $min "" -}}
minAvailable: {{ if regexMatch "^[0-9]+$" $min }}{{ $min }}{{ else }}{{ $min | quote }}{{ end }}
{{- else -}}
{{- $max := include "bot-generic.envString" .maxUnavailable | default "1" -}}
maxUnavailable: {{ if regexMatch "^[0-9]+$" $max }}{{ $max }}{{ else }}{{ $max | quote }}{{ end }}
{{- end }}
{{- end }}

{{/*
BG_EDGE_THREADS for the edge when BG_EDGE_THREADS is "0" and threadsFromCPULimit is on: the CPU limit
rounded up ("1500m" -> 2, "2" -> 2). Empty when it does not apply.
*/}}
{{- define "bot-generic.edgeThreads" -}}
{{- $threads := include "bot-generic.setting" (list . "BG_EDGE_THREADS") | default "0" }}
{{- $limits := (.Values.edge.resources | default dict).limits | default dict }}
{{- $cpu := include "bot-generic.envString" $limits.cpu }}
{{- if and .Values.edge.threadsFromCPULimit (eq $threads "0") (ne $cpu "") }}
{{- $cores := 0.0 }}
{{- if hasSuffix "m" $cpu }}
{{- $cores = divf (trimSuffix "m" $cpu | float64) 1000 }}
{{- else }}
{{- $cores = float64 $cpu }}
{{- end }}
{{- max 1 (ceil $cores | int64) }}
{{- end }}
{{- end }}

{{/* Checks that values fit the binaries and the platform; fails the render with a clear message. */}}
{{- define "bot-generic.validate" -}}
{{- $secretNames := splitList " " (include "bot-generic.secretVarNames" .) }}
{{- range $k, $v := .Values.config }}
{{- if not (hasPrefix "BG_" $k) }}
{{- fail (printf "config.%s: only BG_* variables belong under config" $k) }}
{{- end }}
{{- if has $k $secretNames }}
{{- fail (printf "config.%s is a secret: put it under secrets.values (or in secrets.existingSecret)" $k) }}
{{- end }}
{{- end }}
{{- range $k, $v := .Values.secrets.values }}
{{- if not (has $k $secretNames) }}
{{- fail (printf "secrets.values.%s is not a secret variable of config.c: put it under config" $k) }}
{{- end }}
{{- end }}
{{- $https := include "bot-generic.setting" (list . "BG_HTTPS_PORT") }}
{{- if ne $https "0" }}
{{- fail "config.BG_HTTPS_PORT must be \"0\": in Kubernetes TLS is terminated at the ingress" }}
{{- end }}
{{- if has (include "bot-generic.setting" (list . "BG_BIND_ADDRESS")) (list "" "127.0.0.1" "localhost") }}
{{- fail "config.BG_BIND_ADDRESS must be set to an address probes and Services reach (0.0.0.0 or ::), not the loopback default" }}
{{- end }}
{{- if not .Values.secrets.existingSecret }}
{{- $jwt := include "bot-generic.envString" .Values.secrets.values.BG_JWT_SECRET }}
{{- $keys := include "bot-generic.envString" .Values.secrets.values.BG_JWT_KEYS }}
{{- if and (ne $jwt "") (eq $keys "") (lt (len $jwt) 32) }}
{{- fail "secrets.values.BG_JWT_SECRET must be at least 32 bytes" }}
{{- end }}
{{- end }}
{{- $anyWorker := false }}
{{- range $role, $r := .Values.workers.roles }}
{{- if and $r $r.enabled }}
{{- $anyWorker = true }}
{{- if not (regexMatch "^[a-z][a-z0-9-]{0,12}$" $role) }}
{{- fail (printf "workers.roles.%s: a role key must be a short DNS label (lower case, at most 13 characters)" $role) }}
{{- end }}
{{- end }}
{{- end }}
{{- $wport := include "bot-generic.setting" (list . "BG_WORKER_PORT") }}
{{- if and $anyWorker (or (eq $wport "") (eq $wport "0")) }}
{{- fail "config.BG_WORKER_PORT must not be 0: worker probes use /healthz and /readyz on it" }}
{{- end }}
{{- end }}
