{{/*
The labels of every object and the selector of the pods: the same as deploy/, and no
Helm-specific ones, so the default render equals `kubectl kustomize deploy/`.
*/}}
{{- define "egress-gateway-agent.labels" -}}
app.kubernetes.io/name: egress-gateway-agent
{{- end }}

{{/* The agent image: repository and tag, the tag defaulting to the chart's appVersion. */}}
{{- define "egress-gateway-agent.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}
