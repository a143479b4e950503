{{/* Chart name, truncated to the 63 characters of a label value. */}}
{{- define "cistern.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Fully qualified release name. */}}
{{- define "cistern.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "cistern.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "cistern.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: include with (dict "ctx" . "component" "operator"). */}}
{{- define "cistern.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cistern.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The Cistern image. */}}
{{- define "cistern.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* A sidecar image from its values block. */}}
{{- define "cistern.sidecarImage" -}}
{{- printf "%s:%s" .repository .tag -}}
{{- end -}}

{{/* The CSI driver name (fixed: StorageClasses and PVs refer to it). */}}
{{- define "cistern.driverName" -}}csi.cistern.dev{{- end -}}

{{/* The kubelet's plugin directory of this driver. */}}
{{- define "cistern.pluginDir" -}}
{{- printf "%s/plugins/%s" (trimSuffix "/" .Values.kubeletDir) (include "cistern.driverName" .) -}}
{{- end -}}

{{/* Image pull secrets block. */}}
{{- define "cistern.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}


{{/* The provisioner mode, checked: "distributed" (sidecar of the node plugin) or "central". */}}
{{- define "cistern.provisionerMode" -}}
{{- $mode := .Values.csi.provisioner.mode -}}
{{- if not (has $mode (list "distributed" "central")) -}}
{{- fail (printf "csi.provisioner.mode: expected distributed or central, got %q" $mode) -}}
{{- end -}}
{{- $mode -}}
{{- end -}}

{{/* The service account the external-provisioner runs as. */}}
{{- define "cistern.provisionerServiceAccount" -}}
{{- if eq (include "cistern.provisionerMode" .) "distributed" -}}
{{- include "cistern.fullname" . }}-csi-node
{{- else -}}
{{- include "cistern.fullname" . }}-csi-controller
{{- end -}}
{{- end -}}
