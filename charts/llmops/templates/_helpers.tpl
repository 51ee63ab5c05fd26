{{/* Names, labels and the checks values.schema.json cannot express. */}}

{{- define "llmops.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's full name; objects are called <fullname>[-<part>]. */}}
{{- define "llmops.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "llmops.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llmops.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "llmops.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "llmops.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: llmops
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "llmops.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "llmops.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false: name the ServiceAccount the operator runs as" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "llmops.leaderElect" -}}
{{- if gt (int .Values.replicas) 1 -}}true{{- end -}}
{{- end -}}

{{- define "llmops.leaseName" -}}
{{- default (include "llmops.fullname" .) .Values.leaderElection.leaseName -}}
{{- end -}}

{{- define "llmops.gatewayService" -}}
{{- printf "%s-gateway" (include "llmops.fullname" .) -}}
{{- end -}}

{{- define "llmops.gatewayAddress" -}}
{{- if .Values.gateway.advertisedAddress -}}
{{- .Values.gateway.advertisedAddress -}}
{{- else -}}
{{- printf "%s.%s.svc:%d" (include "llmops.gatewayService" .) .Release.Namespace (int .Values.gateway.port) -}}
{{- end -}}
{{- end -}}

{{/* repository:tag, the tag defaulting to the appVersion plus a suffix. */}}
{{- define "llmops.imageRef" -}}
{{- $tag := default (printf "%s%s" .root.Chart.AppVersion .suffix) .image.tag -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}

{{- define "llmops.operatorImage" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- include "llmops.imageRef" (dict "root" . "image" .Values.image "suffix" "") -}}
{{- end -}}
{{- end -}}

{{/* Namespaces that get worker NetworkPolicies. */}}
{{- define "llmops.networkPolicyNamespaces" -}}
{{- $ns := .Values.networkPolicy.namespaces | default .Values.watchNamespaces -}}
{{- toJson $ns -}}
{{- end -}}

{{/*
Rules across values that the schema cannot state with a message a person understands.
Included by the Deployment, so every install and template runs them.
*/}}
{{- define "llmops.validate" -}}
{{- $store := .Values.store -}}
{{- if and (eq $store.type "pvc") (not $store.pvc.claimName) -}}
{{- fail "store.type is pvc but store.pvc.claimName is empty: name the ReadWriteMany PersistentVolumeClaim that holds the store in each workload namespace" -}}
{{- end -}}
{{- if and (eq $store.type "hostPath") (not $store.hostPath.path) -}}
{{- fail "store.type is hostPath but store.hostPath.path is empty: give the node directory that holds the store" -}}
{{- end -}}
{{- if and (eq $store.type "s3") (not $store.s3.bucket) -}}
{{- fail "store.type is s3 but store.s3.bucket is empty: name the bucket that holds the store" -}}
{{- end -}}
{{- if eq (int .Values.gateway.port) (int .Values.metrics.port) -}}
{{- fail (printf "gateway.port and metrics.port are both %d: the gateway and the metrics server need ports of their own" (int .Values.gateway.port)) -}}
{{- end -}}
{{- if and .Values.networkPolicy.enabled (eq (len (fromJsonArray (include "llmops.networkPolicyNamespaces" .))) 0) -}}
{{- fail "networkPolicy.enabled needs networkPolicy.namespaces (or watchNamespaces): NetworkPolicies are namespaced, and with every namespace watched the chart cannot know which ones run workers" -}}
{{- end -}}
{{- if and .Values.networkPolicy.enabled (eq $store.type "s3") (eq (len .Values.networkPolicy.store.cidrs) 0) -}}
{{- fail "networkPolicy.enabled with store.type s3 needs networkPolicy.store.cidrs: the CIDRs of the S3 endpoint, or workers cannot reach the store" -}}
{{- end -}}
{{- if and .Values.podDisruptionBudget (gt (int .Values.replicas) 1) (ge (int .Values.podDisruptionBudget.maxUnavailable) (int .Values.replicas)) -}}
{{- fail (printf "podDisruptionBudget.maxUnavailable (%d) must be below replicas (%d), or the budget allows evicting every replica" (int .Values.podDisruptionBudget.maxUnavailable) (int .Values.replicas)) -}}
{{- end -}}
{{- end -}}
