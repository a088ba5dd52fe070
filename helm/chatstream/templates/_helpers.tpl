{{/* vim: set filetype=mustache: */}}

{{/* The chart name, or nameOverride. */}}
{{- define "chatstream.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The prefix of every object name: fullnameOverride, else "<release>-<name>", else the release
name alone when it already contains the chart name. Truncated to 63 characters (DNS label).
*/}}
{{- define "chatstream.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* "<chart>-<version>" for the helm.sh/chart label. */}}
{{- define "chatstream.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that select the operator pod; never change them after the first release. */}}
{{- define "chatstream.selectorLabels" -}}
app.kubernetes.io/name: {{ include "chatstream.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* Labels on every object of the chart (the operator's add its component, see above). */}}
{{- define "chatstream.labels" -}}
app.kubernetes.io/name: {{ include "chatstream.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
helm.sh/chart: {{ include "chatstream.chart" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: chatstream
{{- with .Values.labels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
The name of the cluster-scoped objects (ClusterRole, ClusterRoleBinding): the namespace is part
of it, so that the same release name can be installed in several namespaces.
*/}}
{{- define "chatstream.clusterObjectName" -}}
{{- printf "%s-%s" (include "chatstream.fullname" .) .Release.Namespace -}}
{{- end -}}

{{/* The operator's ServiceAccount name. */}}
{{- define "chatstream.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "chatstream.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
An image reference from (dict "image" {repository, tag, digest} "appVersion" ...):
repository:tag, the tag defaulting to the chart's appVersion, and @digest when one is pinned.
*/}}
{{- define "chatstream.imageRef" -}}
{{- $ref := printf "%s:%s" .image.repository (default .appVersion .image.tag) -}}
{{- if .image.digest }}{{ $ref = printf "%s@%s" $ref .image.digest }}{{ end -}}
{{- $ref -}}
{{- end -}}

{{/* The operator image reference. */}}
{{- define "chatstream.operatorImage" -}}
{{- include "chatstream.imageRef" (dict "image" .Values.image "appVersion" .Chart.AppVersion) -}}
{{- end -}}

{{/* The serve image reference of the sample ChatStream: the vLLM image for engine vllm. */}}
{{- define "chatstream.serveImage" -}}
{{- $engine := get (.Values.sample.spec | default dict) "engine" -}}
{{- $image := eq (toString $engine) "vllm" | ternary .Values.vllmImage .Values.serveImage -}}
{{- include "chatstream.imageRef" (dict "image" $image "appVersion" .Chart.AppVersion) -}}
{{- end -}}

{{/*
The namespaces the operator watches, as a list: empty when cluster-wide, else watchNamespaces
or the release namespace.
*/}}
{{- define "chatstream.watchNamespaces" -}}
{{- if not .Values.clusterWide -}}
{{- toYaml (default (list .Release.Namespace) .Values.watchNamespaces) -}}
{{- else -}}
[]
{{- end -}}
{{- end -}}

{{/*
The namespace of the example ChatStream (the chart's sample, NOTES.txt, `helm test`):
tests.namespace, else the first watched namespace, else the release namespace.
*/}}
{{- define "chatstream.exampleNamespace" -}}
{{- if .Values.tests.namespace -}}
{{- .Values.tests.namespace -}}
{{- else -}}
{{- $watched := include "chatstream.watchNamespaces" . | fromYamlArray -}}
{{- if $watched -}}
{{- first $watched -}}
{{- else -}}
{{- .Release.Namespace -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Refuse value combinations the schema cannot express. */}}
{{- define "chatstream.validateValues" -}}
{{- if and (gt (int .Values.replicas) 1) (not .Values.peering.enabled) -}}
{{- fail "replicas > 1 needs peering.enabled=true: without peering every operator pod would handle every ChatStream" -}}
{{- end -}}
{{- if and .Values.clusterWide .Values.watchNamespaces -}}
{{- fail "watchNamespaces is only used with clusterWide=false: set clusterWide=false to watch only those namespaces" -}}
{{- end -}}
{{- end -}}

{{/*
RBAC: exactly the API calls the operator makes, no more (tests/helm/test_rbac.py runs the real
operator against an emulated API server and compares its calls with these rules, both ways).
Rules on namespaced resources: granted by a Role in each watched namespace, or by the
ClusterRole when cluster-wide.
*/}}
{{- define "chatstream.rbac.namespacedRules" -}}
# ChatStreams: kopf watches them and keeps its bookkeeping in annotations (patch); the operator
# reads one back (get) and writes its status.
- apiGroups: ["chatstream.dev"]
  resources: ["chatstreams"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["chatstream.dev"]
  resources: ["chatstreams/status"]
  verbs: ["patch"]
# The owner references the operator sets (kopf.adopt) have blockOwnerDeletion; where the API
# server enforces OwnerReferencesPermissionEnforcement (OpenShift's default), that needs this.
- apiGroups: ["chatstream.dev"]
  resources: ["chatstreams/finalizers"]
  verbs: ["update"]
# The RayService each ChatStream owns: watched for its status, created, kept in line.
- apiGroups: ["ray.io"]
  resources: ["rayservices"]
  verbs: ["get", "list", "watch", "create", "patch"]
# The Secret with each ChatStream's generated signing key and admin token: created once, never
# read (no get, list or watch: the operator cannot see any Secret's contents).
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["create"]
{{- if .Values.networkPolicy.enabled }}
# The NetworkPolicy of each ChatStream's Ray pods: created, kept in line.
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "create", "patch"]
{{- end }}
# The PodDisruptionBudget of each ChatStream's model pods: created, kept in line.
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "create", "patch"]
# Events on the ChatStreams about what the operator did.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- if and .Values.peering.enabled (not .Values.clusterWide) }}
# kopf's peering object in each watched namespace: watched, and patched with heartbeats.
- apiGroups: ["kopf.dev"]
  resources: ["kopfpeerings"]
  verbs: ["list", "watch", "patch"]
{{- end }}
{{- end -}}

{{/*
RBAC rules on cluster-scoped resources, granted by the ClusterRole. A namespaced operator needs
none: given exact namespace names, it scans neither namespaces nor CRDs.
*/}}
{{- define "chatstream.rbac.clusterRules" -}}
{{- if .Values.clusterWide }}
# kopf watches CRDs to learn which of its resources the cluster serves.
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- if .Values.peering.enabled }}
# kopf's cluster-wide peering object: watched, and patched with heartbeats.
- apiGroups: ["kopf.dev"]
  resources: ["clusterkopfpeerings"]
  verbs: ["list", "watch", "patch"]
{{- end }}
{{- end }}
{{- end -}}

{{/* The chart's Redis: its objects' name (StatefulSet, Service, Secret, NetworkPolicy). */}}
{{- define "chatstream.redis.name" -}}
{{- printf "%s-redis" (include "chatstream.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that select the chart's Redis pod. */}}
{{- define "chatstream.redis.selectorLabels" -}}
app.kubernetes.io/name: {{ include "chatstream.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: redis
{{- end -}}

{{/* host:port of the chart's Redis, from any namespace. */}}
{{- define "chatstream.redis.address" -}}
{{- printf "%s.%s.svc:6379" (include "chatstream.redis.name" .) .Release.Namespace -}}
{{- end -}}

{{/*
The namespaces that get the Secret ChatStreams reference for the chart's Redis (a secretKeyRef
reads only its own namespace): redis.clientNamespaces, else the namespace of the example
ChatStream and the watched namespaces.
*/}}
{{- define "chatstream.redis.clientNamespaces" -}}
{{- if .Values.redis.clientNamespaces -}}
{{- toYaml .Values.redis.clientNamespaces -}}
{{- else -}}
{{- $namespaces := include "chatstream.watchNamespaces" . | fromYamlArray -}}
{{- toYaml (prepend $namespaces (include "chatstream.exampleNamespace" .) | uniq) -}}
{{- end -}}
{{- end -}}

{{/* The spec fields that point a ChatStream at the chart's Redis (for the sample). */}}
{{- define "chatstream.redis.chatStreamSpec" -}}
{{- if .Values.redis.enabled -}}
session:
  store: redis
  redisUrlSecretRef:
    name: {{ include "chatstream.redis.name" . }}
    key: url
{{- if .Values.redis.gcsFaultTolerance }}
gcsFaultTolerance:
  redisAddress: {{ include "chatstream.redis.address" . }}
  redisPasswordSecretRef:
    name: {{ include "chatstream.redis.name" . }}
    key: password
{{- end }}
{{- end -}}
{{- end -}}
