{{/* Names and labels shared by every template. */}}

{{- define "tessera.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Prefix of every object name: the release name, plus "-tessera" unless it already says so. */}}
{{- define "tessera.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tessera.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "tessera.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tessera
{{- end -}}

{{/* Selector labels of one component: include with (dict "ctx" $ "component" "node"). */}}
{{- define "tessera.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tessera.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "tessera.componentLabels" -}}
{{ include "tessera.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "tessera.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "tessera.operatorName" -}}{{ include "tessera.fullname" . }}-operator{{- end -}}
{{- define "tessera.controllerName" -}}{{ include "tessera.fullname" . }}-csi-controller{{- end -}}
{{- define "tessera.nodeName" -}}{{ include "tessera.fullname" . }}-csi-node{{- end -}}

{{- define "tessera.tokenSecretName" -}}
{{- default (printf "%s-token" (include "tessera.fullname" .)) .Values.token.existingSecret -}}
{{- end -}}

{{/* The plugin directory of the driver under the kubelet directory (holds csi.sock). */}}
{{- define "tessera.pluginDir" -}}
{{- printf "%s/plugins/%s" (.Values.kubeletDir | trimSuffix "/") .Values.driverName -}}
{{- end -}}

{{/* Environment every tessera container gets from the downward API. */}}
{{- define "tessera.podEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: RUST_LOG
  value: {{ .Values.logLevel | quote }}
{{- end -}}
