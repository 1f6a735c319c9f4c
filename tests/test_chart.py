"""The Helm chart, checked by Helm itself (its Go SDK, offline: lint, render, values.schema.json),
every rendered manifest validated against the Kubernetes 1.29 schemas (kubernetes-validate) or
prometheus-operator's CRD schemas (npm @kubernetes-models/prometheus-operator); and an app chart gets the sidecar by one include."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import helm_python as helm  # make test installs it (pip extra `test`)
import kubernetes_validate
import pytest
import yaml
from test_sdk_node import NODE_DIR, require_node

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "stripe-sidecar"
APP_CHART = ROOT / "charts" / "examples" / "payments-app"
KUBERNETES = "1.29.0"  # the first release with native sidecars on by default

FULL: dict[str, Any] = {
    "image": {"repository": "registry.example.com/stripe-sidecar", "tag": "0.1.0", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "registry"}],
    "fullnameOverride": "payments-stripe",
    "mode": "container",
    "port": 8081,
    "upstream": "http://stripe-simulator:12111",
    "config": {
        "server": {"max_body_bytes": 67108864, "drain_period": 5.0},
        "retry": {"max_attempts": 5},
        "operations": {"POST /v1/payment_intents": {"breaker": {"open_duration": 10.0}}},
    },
    "keys": {"existingSecret": "stripe-keys", "secretKey": "secret-keys"},
    "clientToken": {"existingSecret": "stripe-keys", "secretKey": "client-token"},
    "extraEnv": [{"name": "TZ", "value": "UTC"}],
    "resources": {"requests": {"cpu": "100m", "memory": "96Mi"}, "limits": {"cpu": "1", "memory": "192Mi"}},
    "livenessProbe": {"httpGet": {"path": "/health", "port": "stripe-sidecar"}, "periodSeconds": 20},
    "storeVolume": {"persistentVolumeClaim": {"claimName": "stripe-outbox"}},
    "standalone": {
        "enabled": True,
        "replicas": 2,
        "podAnnotations": {"example.com/team": "payments"},
        "podLabels": {"tier": "payments"},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "payments", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {"tier": "payments"}}}}
        ]}},
        "terminationGracePeriodSeconds": 40,
        "service": {"type": "NodePort", "port": 80},
    },
    "serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "kube-prometheus"}},
    "podMonitor": {"enabled": True, "interval": "20s", "labels": {"release": "kube-prometheus"}, "selector": {"tier": "payments"}},
    "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus"}},
}


def render(chart: Path, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every object ``helm template`` would print for ``values``."""
    manifests = helm.Chart.load(str(chart)).render(values, name="shop", namespace="payments")
    docs: list[dict[str, Any]] = []
    for path, text in sorted(manifests.items()):
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """The one object of ``kind``."""
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, [d["kind"] for d in docs]
    return found[0]


def validate(docs: list[dict[str, Any]]) -> None:
    """Validate each object against Kubernetes' own schemas (kubernetes-validate, strict: no
    unknown field), or prometheus-operator's CRD schemas (@kubernetes-models, from npm)."""
    crds = [d for d in docs if d["apiVersion"].startswith("monitoring.coreos.com/")]
    for doc in docs:
        if doc not in crds:
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    if crds:
        run = subprocess.run(
            [require_node(), str(NODE_DIR / "validate_crds.mjs")],
            input=json.dumps(crds), capture_output=True, text=True, timeout=60, cwd=NODE_DIR,
        )
        assert run.returncode == 0, run.stderr
        results = [json.loads(line) for line in run.stdout.splitlines()]
        assert len(results) == len(crds), run.stdout
        assert [r for r in results if r["error"] is not None] == []


@pytest.mark.parametrize("values", [None, FULL], ids=["default", "full"])
def test_helm_lint(values: dict[str, Any] | None) -> None:
    """`helm lint --strict` finds no warning or error, for default and full values."""
    report = helm.lint(str(CHART), values, strict=True, kube_version=f"v{KUBERNETES}")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_default_render_is_a_valid_standalone_example() -> None:
    """Default values render a valid Deployment and Service: the sidecar on 0.0.0.0:8080 with the
    probes on /health and /ready, non-root on a read-only root, the store on an emptyDir."""
    docs = render(CHART)
    validate(docs)
    assert sorted(d["kind"] for d in docs) == ["Deployment", "Service"]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert "restartPolicy" not in container  # alone in its pod: a plain container
    assert container["image"] == "stripe-sidecar:0.1.0"
    assert {"name": "STRIPE_SIDECAR_LISTEN", "value": "0.0.0.0:8080"} in container["env"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    security = container["securityContext"]
    assert security["runAsNonRoot"] and security["readOnlyRootFilesystem"] and security["runAsUser"] != 0
    assert {"name": "stripe-sidecar-store", "emptyDir": {}} in pod["volumes"]
    assert pod["terminationGracePeriodSeconds"] > 25  # the sidecar's shutdown_grace
    service = one(docs, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "stripe-sidecar"


def test_full_render_validates_and_carries_every_value(tmp_path: Path) -> None:
    """Full values render valid objects, ServiceMonitor and PrometheusRule included; keys come
    from the existing Secret; the ConfigMap is a config the sidecar itself accepts."""
    from proxy.config import load_config

    docs = render(CHART, FULL)
    validate(docs)
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "Deployment", "PodMonitor", "PrometheusRule", "Service", "ServiceMonitor"]
    config = tmp_path / "sidecar.yaml"
    config.write_text(one(docs, "ConfigMap")["data"]["sidecar.yaml"])
    loaded = load_config(str(config))
    assert loaded.retry.max_attempts == 5 and loaded.server.max_body_bytes == 67108864
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["STRIPE_SIDECAR_LISTEN"]["value"] == "0.0.0.0:8081"
    assert env["STRIPE_SIDECAR_CONFIG"]["value"] == "/etc/stripe-sidecar/sidecar.yaml"
    assert env["STRIPE_SIDECAR_UPSTREAM"]["value"] == "http://stripe-simulator:12111"
    assert env["STRIPE_SIDECAR_SECRET_KEYS"]["valueFrom"] == {"secretKeyRef": {"name": "stripe-keys", "key": "secret-keys"}}
    assert env["STRIPE_SIDECAR_CLIENT_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "stripe-keys", "key": "client-token"}}
    assert {"name": "stripe-sidecar-config", "configMap": {"name": "payments-stripe-config"}} in pod["volumes"]
    assert {"name": "stripe-sidecar-store", "persistentVolumeClaim": {"claimName": "stripe-outbox"}} in pod["volumes"]
    assert one(docs, "ServiceMonitor")["spec"]["endpoints"][0]["interval"] == "15s"
    monitor = one(docs, "PodMonitor")["spec"]
    assert monitor["selector"] == {"matchLabels": {"tier": "payments"}}
    assert monitor["podMetricsEndpoints"] == [{"port": "stripe-sidecar", "path": "/metrics", "interval": "20s"}]
    # The port it scrapes is the sidecar container's.
    assert container["ports"][0]["name"] == "stripe-sidecar"


def test_prometheus_rule_is_config_alert_rules() -> None:
    """The chart's PrometheusRule carries exactly config/prometheus-alerts.yaml's groups."""
    source = (ROOT / "config" / "prometheus-alerts.yaml").read_text()
    assert (CHART / "files" / "prometheus-alerts.yaml").read_text() == source
    rule = one(render(CHART, {"prometheusRule": {"enabled": True}}), "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(source)


def test_image_tag_is_the_app_version() -> None:
    """The default image tag is the chart's appVersion and the project's version."""
    import proxy

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["image"]["tag"] == chart["appVersion"] == proxy.__version__


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"mode": "sidecar"}, "/mode"),
        ({"port": "8080"}, "/port"),
        ({"port": 70000}, "/port"),
        ({"imgae": {"tag": "1"}}, "imgae"),
        ({"image": {"tag": ""}}, "/image/tag"),
        ({"upstream": "stripe-simulator:12111"}, "/upstream"),
        ({"keys": {"existingSecret": "s", "secretKey": ""}}, "/keys/secretKey"),
        ({"storeVolume": {"emptyDir": {}, "hostPath": {"path": "/x"}}}, "/storeVolume"),
        ({"serviceMonitor": {"enabled": True, "interval": "30 seconds"}}, "/serviceMonitor/interval"),
        ({"standalone": {"replicas": -1}}, "/standalone/replicas"),
        ({"config": ["retry"]}, "/config"),
    ],
)
def test_bad_values_are_refused_by_the_schema(values: dict[str, Any], message: str) -> None:
    """values.schema.json refuses bad values at render (so at install), naming the key."""
    with pytest.raises(helm.HelmValuesError, match=message):
        render(CHART, values)


def test_keys_without_client_token_fail_to_render() -> None:
    """Held keys without a client token fail at render: the sidecar would refuse to start."""
    with pytest.raises(helm.HelmError, match=r"clientToken\.existingSecret"):
        render(CHART, {"keys": {"existingSecret": "stripe-keys", "secretKey": "k"}})


def _app_chart(tmp_path: Path) -> Path:
    """The example app chart with its dependency in charts/ (what `helm dependency build` does)."""
    app = tmp_path / "payments-app"
    shutil.copytree(APP_CHART, app)
    shutil.copytree(CHART, app / "charts" / "stripe-sidecar")
    return app


@pytest.mark.parametrize("mode", ["native", "container"])
def test_one_include_adds_the_sidecar_to_an_app_deployment(tmp_path: Path, mode: str) -> None:
    """The app chart's Deployment, with one include, keeps its own containers and gains the
    sidecar: the first init container with restartPolicy Always (native), or a last plain
    container; its store and config volumes; and it stays valid for Kubernetes."""
    template = (APP_CHART / "templates" / "deployment.yaml").read_text()
    assert template.count('include "stripe-sidecar.') == 1 and 'include "stripe-sidecar.podSpec"' in template
    app = _app_chart(tmp_path)
    values = yaml.safe_load((APP_CHART / "values.yaml").read_text())
    values["stripe-sidecar"]["mode"] = mode
    docs = render(app, values)
    validate(docs)
    # The sidecar chart's own objects: the ConfigMap the include mounts, the PodMonitor.
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "Deployment", "PodMonitor"]
    assert one(docs, "PodMonitor")["spec"]["selector"] == {"matchLabels": {"app.kubernetes.io/name": "payments-app"}}
    deployment = one(docs, "Deployment")
    assert deployment["metadata"]["name"] == "shop-payments-app"
    pod = deployment["spec"]["template"]["spec"]
    own = yaml.safe_load(template.split("{{- define \"payments-app.podSpec\" -}}")[1].split("{{- end }}")[0].replace("{{ .Values.image }}", values["image"]))
    if mode == "native":
        assert pod["containers"] == own["containers"]
        (sidecar,) = pod["initContainers"]
        assert sidecar["restartPolicy"] == "Always"
    else:
        assert "initContainers" not in pod
        assert pod["containers"][:-1] == own["containers"]
        sidecar = pod["containers"][-1]
        assert "restartPolicy" not in sidecar
    assert sidecar["name"] == "stripe-sidecar"
    assert {v["name"] for v in pod["volumes"]} == {"stripe-sidecar-store", "stripe-sidecar-config"}
    configmap = one(docs, "ConfigMap")
    assert {"name": "stripe-sidecar-config", "configMap": {"name": configmap["metadata"]["name"]}} in pod["volumes"]
    assert yaml.safe_load(configmap["data"]["sidecar.yaml"]) == {"retry": {"max_attempts": 5}}
    app_env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert app_env["STRIPE_API_BASE"] == "http://localhost:8080"
    # The plain container is for clusters before native sidecars: valid on the oldest schemas
    # here; the native sidecar's restartPolicy is a field they do not know.
    old = "1.25.0"
    if mode == "container":
        kubernetes_validate.validate(deployment, old, strict=True)
    else:
        with pytest.raises(kubernetes_validate.ValidationError, match="restartPolicy"):
            kubernetes_validate.validate(deployment, old, strict=True)


def test_config_checksum_rolls_the_pods_on_a_config_change(tmp_path: Path) -> None:
    """The optional checksum include changes with the sidecar's config and only with it."""
    app = _app_chart(tmp_path)
    deployment = app / "templates" / "deployment.yaml"
    deployment.write_text(deployment.read_text().replace(
        "    spec:\n      {{- include",
        "      annotations:\n        checksum/stripe-sidecar: {{ include \"stripe-sidecar.configChecksum\" . }}\n    spec:\n      {{- include",
    ))
    values = yaml.safe_load((APP_CHART / "values.yaml").read_text())

    def checksum(values: dict[str, Any]) -> str:
        pod = one(render(app, values), "Deployment")["spec"]["template"]
        return str(pod["metadata"]["annotations"]["checksum/stripe-sidecar"])

    first = checksum(values)
    assert re.fullmatch(r"[0-9a-f]{64}", first)
    assert checksum(copy.deepcopy(values)) == first
    changed = copy.deepcopy(values)
    changed["stripe-sidecar"]["config"]["retry"]["max_attempts"] = 6
    assert checksum(changed) != first
    changed = copy.deepcopy(values)
    changed["stripe-sidecar"]["resources"] = {"requests": {"cpu": "1"}}
    assert checksum(changed) == first


def test_include_keeps_the_apps_own_init_containers_and_volumes(tmp_path: Path) -> None:
    """An app pod spec with init containers and volumes of its own keeps them all; the native
    sidecar goes first, so it is up before the app's own init containers run."""
    app = _app_chart(tmp_path)
    deployment = app / "templates" / "deployment.yaml"
    text = deployment.read_text()
    extra = (
        "initContainers:\n  - name: migrate\n    image: registry.example.com/payments-app:1.0.0\n"
        "volumes:\n  - name: cache\n    emptyDir: {}\n"
    )
    deployment.write_text(text.replace("containers:\n  - name: app", extra + "containers:\n  - name: app", 1))
    values = copy.deepcopy(yaml.safe_load((APP_CHART / "values.yaml").read_text()))
    pod = one(render(app, values), "Deployment")["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["stripe-sidecar", "migrate"]
    assert [v["name"] for v in pod["volumes"]] == ["cache", "stripe-sidecar-store", "stripe-sidecar-config"]
