{{/*
What the operator does in the namespaces it watches, read off operator/src: every
Api<...> it builds and the calls it makes on it. A Controller's watch of its own kind,
of the objects it owns (.owns) and of what it references (.watches) is list + watch;
get_opt/get is get; server-side apply (Patch::Apply) is patch, plus create because an
apply that creates the object is also authorised as a create; merge patches are patch;
status is written by server-side apply on the status subresource. Nothing is
cluster-scoped: the same rules go into one ClusterRole (every namespace) or into a Role
per watched namespace. docs/install.md has this list as a table; keep the two together.
*/}}
{{- define "llmops.workloadRules" -}}
# All five controllers watch their own kind; FineTuneJob, EvalRun and ModelDeployment
# also watch the kinds they reference (Dataset, FineTuneJob, PromptVersion,
# ModelDeployment), and every dereference step reads references by name (get).
- apiGroups: ["llmops.dev"]
  resources: ["datasets", "finetunejobs", "evalruns", "modeldeployments", "promptversions"]
  verbs: ["get", "list", "watch"]
# Every controller writes status by server-side apply (field manager llmops-operator).
- apiGroups: ["llmops.dev"]
  resources: ["datasets/status", "finetunejobs/status", "evalruns/status", "modeldeployments/status", "promptversions/status"]
  verbs: ["patch"]
# FineTuneJob controller: adds and removes its llmops.dev/checkpoint finalizer (merge patch).
- apiGroups: ["llmops.dev"]
  resources: ["finetunejobs"]
  verbs: ["patch"]
# ModelDeployment controller: applies the gate EvalRun of each candidate revision and
# deletes those of revisions that neither serve nor wait.
- apiGroups: ["llmops.dev"]
  resources: ["evalruns"]
  verbs: ["create", "patch", "delete"]
# Dataset, FineTuneJob and EvalRun controllers: the worker Job (applied once, suspended
# and resumed by merge patch, watched as an owned object).
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch"]
# Dataset, FineTuneJob, EvalRun and ModelDeployment controllers: worker pods, for failure
# reasons (unschedulable, image pull, OOMKilled), readiness and pod IPs.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
# Dataset, FineTuneJob and EvalRun controllers: the Secret <job>-token with the pinned
# Assignment and token (read, else created). ModelDeployment controller: the pods' token
# Secret and the operator-managed API key (read, else created), and a check that the
# apiKeys Secret exists. Never listed or watched.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "create"]
# PromptVersion controller: applies <name>-prompt and watches it as owned.
# ModelDeployment controller: applies, reads, lists and deletes the ConfigMap of each revision.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# ModelDeployment controller: applies the Service in front of the serving pods.
- apiGroups: [""]
  resources: ["services"]
  verbs: ["create", "patch"]
# ModelDeployment controller: applies, reads and watches the Deployment of serving pods.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch"]
# ModelDeployment controller: applies the HorizontalPodAutoscaler for spec.autoscaling,
# and deletes it when autoscaling is removed.
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["get", "create", "patch", "delete"]
# ModelDeployment controller: watches its Service's EndpointSlices and lists them for a
# ready address (--address-by-pod-ip).
- apiGroups: ["discovery.k8s.io"]
  resources: ["endpointslices"]
  verbs: ["list", "watch"]
# Every controller: events about its objects (reconcile errors, reason changes); the
# recorder creates an event and patches it when it repeats.
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end -}}

{{/*
The operator's own namespace (the release namespace): the model resolver of
operator/src/models.rs keeps its records, resolver Jobs and their token Secrets there,
where tenants cannot write; with replicas > 1 the leader Lease lives there too.
*/}}
{{- define "llmops.ownNamespaceRules" -}}
# Model resolver: the record of each resolution (llmops-model-<hash>): read, created,
# merge-patched with the outcome, deleted to retry a failed one.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "create", "patch", "delete"]
# Model resolver: the token Secret of each resolver Job (read, else created once); the
# operator's state key Secret (llmops-operator-state-key) and the gateway's generated
# certificate (llmops-gateway-tls), made on first use; a TLS Secret given by name, read.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "create"]
# The gateway's generated certificate, replaced when the advertised address changes.
- apiGroups: [""]
  resources: ["secrets"]
  resourceNames: ["llmops-gateway-tls"]
  verbs: ["patch"]
# Model resolver: the resolver Job (read, else applied).
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "create", "patch"]
{{- if include "llmops.leaderElect" . }}
# Leader election (operator/src/leader.rs): the first replica creates the Lease (create
# cannot be limited by name).
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["create"]
# Leader election: read, take, renew and release the Lease (a replace with the
# resourceVersion read, so update).
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  resourceNames: [{{ include "llmops.leaseName" . | quote }}]
  verbs: ["get", "update"]
{{- end }}
{{- end -}}
