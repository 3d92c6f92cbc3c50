{{/*
Chart name, truncated to 63 characters (the DNS label limit of object names and label values).
*/}}
{{- define "dreambooth-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: the prefix of every object. The release name alone when it already contains the chart
name, so `helm install dreambooth-operator ...` does not give "dreambooth-operator-dreambooth-operator".
*/}}
{{- define "dreambooth-operator.fullname" -}}
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

{{/*
Chart label value: name-version (a "+" is not allowed in label values).
*/}}
{{- define "dreambooth-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels: immutable on a Deployment, so only name and instance (never the version).
*/}}
{{- define "dreambooth-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dreambooth-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Common labels of every object the chart creates (component: operator).
*/}}
{{- define "dreambooth-operator.labels" -}}
{{ include "dreambooth-operator.componentLabels" (dict "ctx" . "component" "operator") }}
{{- end }}

{{/*
The common labels with a given app.kubernetes.io/component.
Usage: include "dreambooth-operator.componentLabels" (dict "ctx" $ "component" "release-finalizers")
*/}}
{{- define "dreambooth-operator.componentLabels" -}}
helm.sh/chart: {{ include "dreambooth-operator.chart" .ctx }}
{{ include "dreambooth-operator.selectorLabels" .ctx }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/part-of: dreambooth-operator
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Labels of the monitoring objects: the common ones plus monitoring.labels (which a Prometheus'
selectors usually match on) plus the object's own labels (passed as .extra).
Usage: include "dreambooth-operator.monitoringLabels" (dict "ctx" $ "extra" .Values.monitoring.podMonitor.labels)
*/}}
{{- define "dreambooth-operator.monitoringLabels" -}}
{{ include "dreambooth-operator.labels" .ctx }}
{{- with .ctx.Values.monitoring.labels }}
{{ toYaml . }}
{{- end }}
{{- with .extra }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The operator's ServiceAccount name.
*/}}
{{- define "dreambooth-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "dreambooth-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The operator image: repository:tag, plus @digest when a digest pins it (the runtime then pulls
by digest; the tag only tells a reader which release it is).
*/}}
{{- define "dreambooth-operator.image" -}}
{{- $ref := printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- if .Values.image.digest }}
{{- $ref = printf "%s@%s" $ref .Values.image.digest }}
{{- end }}
{{- $ref }}
{{- end }}

{{/*
True (non-empty) when the operator watches only rbac.namespaces; fails early on an empty list,
which would otherwise start an operator that watches nothing it may read.
*/}}
{{- define "dreambooth-operator.namespaced" -}}
{{- if eq .Values.rbac.scope "namespaced" }}
{{- if not .Values.rbac.namespaces }}
{{- fail "rbac.scope=namespaced needs at least one namespace in rbac.namespaces" }}
{{- end }}
{{- true }}
{{- end }}
{{- end }}

{{/*
Name of the metrics Service; it is also the `job` label Prometheus gives the operator's series
when the ServiceMonitor scrapes it (the alerts match on it).
*/}}
{{- define "dreambooth-operator.metricsServiceName" -}}
{{- printf "%s-metrics" (include "dreambooth-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Annotations of the uninstall hook's objects (templates/release-finalizers-hook.yaml), given the
hook weight: its ServiceAccount and RBAC before its Job. Deleted when the hook succeeds; a
failed Job stays for `kubectl logs` until the next hook replaces it.
*/}}
{{- define "dreambooth-operator.releaseFinalizersHook" -}}
helm.sh/hook: post-delete
helm.sh/hook-weight: {{ . | quote }}
helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded
{{- end }}
