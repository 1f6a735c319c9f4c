{{/*
The sidecar's values: this chart's own, or, in a chart that depends on this one, the parent's
`stripe-sidecar:` section (which Helm has already merged with this chart's defaults).
*/}}
{{- define "stripe-sidecar.valuesOf" -}}
{{- if hasKey .Values "stripe-sidecar" -}}
{{- index .Values "stripe-sidecar" | toYaml -}}
{{- else -}}
{{- .Values | toYaml -}}
{{- end -}}
{{- end -}}

{{/* The resources' base name, from the release (same in this chart and in a parent chart). */}}
{{- define "stripe-sidecar.fullname" -}}
{{- $v := .values -}}
{{- if $v.fullnameOverride -}}
{{- $v.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default "stripe-sidecar" $v.nameOverride -}}
{{- if contains $name .root.Release.Name -}}
{{- .root.Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .root.Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "stripe-sidecar.selectorLabels" -}}
app.kubernetes.io/name: {{ default "stripe-sidecar" .values.nameOverride | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end -}}

{{- define "stripe-sidecar.labels" -}}
{{ include "stripe-sidecar.selectorLabels" . }}
app.kubernetes.io/version: {{ .values.image.tag | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: stripe-sidecar-{{ .root.Chart.Version | replace "+" "_" }}
{{- end -}}

{{/*
The sidecar container. Arguments: root (the chart's context), values (the sidecar's values),
mode ("native": an init container with restartPolicy Always; "container": a plain one).
*/}}
{{- define "stripe-sidecar.container" -}}
{{- $v := .values -}}
{{- $fullname := include "stripe-sidecar.fullname" . -}}
{{- if and $v.keys.existingSecret (not $v.clientToken.existingSecret) -}}
{{- fail "stripe-sidecar: keys.existingSecret needs clientToken.existingSecret (the sidecar listens beyond loopback, so holding keys requires a client token)" -}}
{{- end -}}
name: stripe-sidecar
image: "{{ $v.image.repository }}:{{ $v.image.tag }}"
imagePullPolicy: {{ $v.image.pullPolicy }}
{{- if eq .mode "native" }}
restartPolicy: Always
{{- end }}
ports:
  - name: stripe-sidecar
    containerPort: {{ $v.port }}
    protocol: TCP
env:
  - name: STRIPE_SIDECAR_LISTEN
    value: "0.0.0.0:{{ $v.port }}"
  {{- if $v.config }}
  - name: STRIPE_SIDECAR_CONFIG
    value: /etc/stripe-sidecar/sidecar.yaml
  {{- end }}
  {{- if $v.upstream }}
  - name: STRIPE_SIDECAR_UPSTREAM
    value: {{ $v.upstream | quote }}
  {{- end }}
  {{- if $v.keys.existingSecret }}
  - name: STRIPE_SIDECAR_SECRET_KEYS
    valueFrom:
      secretKeyRef:
        name: {{ $v.keys.existingSecret }}
        key: {{ $v.keys.secretKey }}
  {{- end }}
  {{- if $v.clientToken.existingSecret }}
  - name: STRIPE_SIDECAR_CLIENT_TOKEN
    valueFrom:
      secretKeyRef:
        name: {{ $v.clientToken.existingSecret }}
        key: {{ $v.clientToken.secretKey }}
  {{- end }}
  {{- with $v.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with $v.startupProbe }}
startupProbe:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.livenessProbe }}
livenessProbe:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.readinessProbe }}
readinessProbe:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.resources }}
resources:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.securityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
volumeMounts:
  - name: stripe-sidecar-store
    mountPath: /var/lib/stripe-sidecar
  {{- if $v.config }}
  - name: stripe-sidecar-config
    mountPath: /etc/stripe-sidecar
    readOnly: true
  {{- end }}
{{- end -}}

{{/*
A checksum of the sidecar's config, for a pod template annotation: pods roll when it changes
(the sidecar reads its config at start).
  annotations:
    checksum/stripe-sidecar: {{ include "stripe-sidecar.configChecksum" . }}
*/}}
{{- define "stripe-sidecar.configChecksum" -}}
{{- $v := include "stripe-sidecar.valuesOf" . | fromYaml -}}
{{- toYaml $v.config | sha256sum -}}
{{- end -}}

{{/*
Add the sidecar to a pod spec: THE include for charts that depend on this one.

  spec:
    template:
      spec:
        {{- include "stripe-sidecar.podSpec" (dict "root" . "spec" (include "my-app.podSpec" .)) | nindent 8 }}

"spec" is the app's own pod spec, a YAML string (e.g. its own named template) or a dict. The
result is that pod spec with the sidecar added: first of the initContainers (mode native, so it
is ready before any other container starts) or last of the containers (mode container), and
its volumes (the outbox store, and the config when there is one). Optional "mode" overrides the
values' mode.
*/}}
{{- define "stripe-sidecar.podSpec" -}}
{{- $root := .root -}}
{{- $v := include "stripe-sidecar.valuesOf" $root | fromYaml -}}
{{- $spec := dict -}}
{{- if kindIs "string" .spec -}}
{{- $spec = fromYaml .spec -}}
{{- if hasKey $spec "Error" -}}
{{- fail (printf "stripe-sidecar.podSpec: the pod spec is not YAML: %s" $spec.Error) -}}
{{- end -}}
{{- else if .spec -}}
{{- $spec = deepCopy .spec -}}
{{- end -}}
{{- $mode := default $v.mode .mode -}}
{{- $args := dict "root" $root "values" $v "mode" $mode -}}
{{- $container := include "stripe-sidecar.container" $args | fromYaml -}}
{{- if eq $mode "native" -}}
{{- $_ := set $spec "initContainers" (prepend (default list $spec.initContainers) $container) -}}
{{- else -}}
{{- $_ := set $spec "containers" (append (default list $spec.containers) $container) -}}
{{- end -}}
{{- $volumes := default list $spec.volumes -}}
{{- $store := $v.storeVolume | default (dict "emptyDir" (dict)) -}}
{{- $volumes = append $volumes (merge (dict "name" "stripe-sidecar-store") (deepCopy $store)) -}}
{{- if $v.config -}}
{{- $cm := dict "name" (printf "%s-config" (include "stripe-sidecar.fullname" $args)) -}}
{{- $volumes = append $volumes (dict "name" "stripe-sidecar-config" "configMap" $cm) -}}
{{- end -}}
{{- $_ := set $spec "volumes" $volumes -}}
{{- toYaml $spec -}}
{{- end -}}
