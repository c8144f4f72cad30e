{{/* Chart name, overridable. */}}
{{- define "peerfill.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Prefix of every resource name. Kept to 46 characters so that the longest
suffix ("-operator-metrics", 17) still fits the 63-character limit.
*/}}
{{- define "peerfill.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 46 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 46 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 46 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "peerfill.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels shared by every object. */}}
{{- define "peerfill.labels" -}}
helm.sh/chart: {{ include "peerfill.chart" . }}
app.kubernetes.io/name: {{ include "peerfill.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: peerfill
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component ("operator" or "agent"); pass (list . "agent"). */}}
{{- define "peerfill.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "peerfill.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* All labels of one component's objects; pass (list . "agent"). */}}
{{- define "peerfill.componentLabels" -}}
{{ include "peerfill.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "peerfill.operator.fullname" -}}
{{- printf "%s-operator" (include "peerfill.fullname" .) }}
{{- end }}

{{- define "peerfill.agent.fullname" -}}
{{- printf "%s-agent" (include "peerfill.fullname" .) }}
{{- end }}

{{- define "peerfill.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "peerfill.operator.fullname" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "peerfill.agent.serviceAccountName" -}}
{{- if .Values.agent.serviceAccount.create }}
{{- default (include "peerfill.agent.fullname" .) .Values.agent.serviceAccount.name }}
{{- else }}
{{- required "agent.serviceAccount.name is required when agent.serviceAccount.create is false" .Values.agent.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "peerfill.agent.priorityClassName" -}}
{{- if .Values.agent.priorityClass.create }}
{{- default (include "peerfill.agent.fullname" .) .Values.agent.priorityClass.name }}
{{- else }}
{{- .Values.agent.priorityClass.name }}
{{- end }}
{{- end }}

{{/* Image reference; pass (list . .Values.agent.image). Digest wins over tag. */}}
{{- define "peerfill.image" -}}
{{- $root := index . 0 }}
{{- $image := index . 1 }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}
