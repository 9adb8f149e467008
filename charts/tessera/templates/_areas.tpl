{{/*
The areas of every node as --areas-file YAML (a list of {name, path, sizeBytes, mediaType,
poolName, domain}). Key default.yaml holds .Values.node.areas.default with names prefixed by the
placeholder __NODE_NAME__-; key node-<name>.yaml holds a node's byNode list as written. The
init container of the DaemonSet picks the node's file and substitutes the placeholder.
*/}}
{{- define "tessera.areaList" -}}
{{- $list := .list -}}
{{- if not $list }}[]{{ else }}
{{- range $i, $a := $list }}
{{- if not $a.name }}{{ fail (printf "%s[%d]: name is required" $.where $i) }}{{ end }}
{{- if not $a.path }}{{ fail (printf "%s[%d] (%s): path is required" $.where $i $a.name) }}{{ end }}
- name: {{ printf "%s%s" $.prefix $a.name | quote }}
  path: {{ $a.path | quote }}
  {{- if $a.sizeBytes }}
  sizeBytes: {{ $a.sizeBytes | int64 }}
  {{- end }}
  {{- if $a.mediaType }}
  mediaType: {{ $a.mediaType | quote }}
  {{- end }}
  poolName: {{ default $.defaultPool $a.poolName | quote }}
  {{- if $a.domain }}
  domain: {{ $a.domain | quote }}
  {{- end }}
{{- end }}
{{- end }}
{{- end }}
