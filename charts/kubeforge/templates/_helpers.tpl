{{- define "kubeforge.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kubeforge.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kubeforge.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kubeforge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kubeforge.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kubeforge.leaseName" -}}
{{- default (include "kubeforge.fullname" .) .Values.leaderElection.leaseName -}}
{{- end -}}

{{- /* The operator's image: registry (imageRegistry, a mirror, wins) / repository, then @digest or :tag. */ -}}
{{- define "kubeforge.image" -}}
{{- $registry := .Values.imageRegistry | default .Values.image.registry -}}
{{- $name := .Values.image.repository -}}
{{- if $registry -}}{{- $name = printf "%s/%s" $registry $name -}}{{- end -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" $name .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" $name (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{- /* The workload images, as the operator reads them (kubeforge.render.images.from_env): the global
registry and each image's non-empty fields; the operator fills the rest with its pinned defaults. */ -}}
{{- define "kubeforge.imageEnv" -}}
{{- with .Values.imageRegistry }}
- name: KUBEFORGE_IMAGE_REGISTRY
  value: {{ . | quote }}
{{- end }}
{{- range $name, $image := .Values.images }}
{{- range $field := list "registry" "repository" "tag" "digest" }}
{{- with get $image $field }}
- name: {{ printf "KUBEFORGE_IMAGE_%s_%s" (upper $name) (upper $field) }}
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{- /* Labels of the trainer pods the operator renders, and their progress port: they must match
operator/kubeforge/render/labels.py (MANAGED_BY, OWNER_KIND, COMPONENT as render/finetune.py sets
them) and PROGRESS_PORT in runtime/kubeforge/runtime/contract.py; tests/chart/test_network_policy.py
renders a FineTuneJob and fails when they do not. */ -}}
{{- define "kubeforge.trainerSelector" -}}
app.kubernetes.io/managed-by: kubeforge
app.kubernetes.io/component: trainer
kubeforge.io/owner-kind: FineTuneJob
{{- end -}}

{{- define "kubeforge.progressPort" -}}8642{{- end -}}
