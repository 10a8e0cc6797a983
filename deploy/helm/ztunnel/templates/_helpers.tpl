{{/* Labels every object of the chart carries. */}}
{{- define "ztunnel.labels" -}}
app.kubernetes.io/name: ztunnel
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{/* Selector labels of one component: (dict "ctx" $ "component" "node-proxy"). */}}
{{- define "ztunnel.selectorLabels" -}}
app.kubernetes.io/name: ztunnel
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "ztunnel.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* The CA service the node proxies call. */}}
{{- define "ztunnel.caAddress" -}}
{{- if .Values.nodeProxy.caAddress -}}
{{ .Values.nodeProxy.caAddress }}
{{- else if .Values.ca.enabled -}}
ztunnel-ca.{{ .Release.Namespace }}.svc:{{ .Values.ca.service.port }}
{{- else -}}
{{ fail "ca.enabled is false: set nodeProxy.caAddress to the CA the node proxies use (e.g. istiod.istio-system.svc:15012)" }}
{{- end }}
{{- end }}

{{/* The SPIFFE id the CA must present; empty: verified by host name. */}}
{{- define "ztunnel.caIdentity" -}}
{{- if .Values.nodeProxy.caIdentity -}}
{{ .Values.nodeProxy.caIdentity }}
{{- else if and .Values.ca.enabled (not .Values.nodeProxy.caAddress) -}}
spiffe://{{ .Values.trustDomain }}/ns/{{ .Release.Namespace }}/sa/ztunnel-ca
{{- end }}
{{- end }}

{{/* The part of a node path before its first $(VAR) component: what a hostPath can mount. */}}
{{- define "ztunnel.mountable" -}}
{{- regexReplaceAll "/[^/]*\\$\\(.*$" . "" | default "/" -}}
{{- end }}

{{/* The CNI directories' mounts, one per distinct mountable prefix, as a dict: prefix ->
     propagation ("HostToContainer" where the netns directory is below it). */}}
{{- define "ztunnel.cniMounts" -}}
{{- $cni := .Values.nodeProxy.cni }}
{{- $mounts := dict }}
{{- range (list $cni.binDir $cni.confDir $cni.runDir) }}
{{- $_ := set $mounts (include "ztunnel.mountable" .) "None" }}
{{- end }}
{{- $_ := set $mounts (include "ztunnel.mountable" $cni.netnsDir) "HostToContainer" }}
{{- toYaml $mounts }}
{{- end }}
