"""The ECS task definition: valid input for RegisterTaskDefinition (botocore's own ECS service
model and ParamValidator, offline), and the sidecar wired as the image and the app expect."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import botocore.session
from botocore.validate import ParamValidator
from dockerfile import parse_dockerfile

from proxy.config import Config

ROOT = Path(__file__).resolve().parent.parent
TASK = ROOT / "deploy" / "ecs" / "task-definition.json"
SECRET_ARN = re.compile(r"^arn:aws:secretsmanager:[a-z0-9-]+:\d{12}:secret:[\w/+=.@-]+(:[\w-]*:[\w-]*:[\w-]*)?$")


def task() -> dict[str, Any]:
    """deploy/ecs/task-definition.json."""
    data: dict[str, Any] = json.loads(TASK.read_text())
    return data


def problems(params: dict[str, Any]) -> str:
    """What botocore's validator finds wrong with ``params`` as RegisterTaskDefinition input,
    and the values outside the model's enums (which the validator leaves to the service)."""
    model = botocore.session.get_session().get_service_model("ecs")
    shape = model.operation_model("RegisterTaskDefinition").input_shape
    report = ParamValidator().validate(params, shape)
    found = [report.generate_report()] if report.has_errors() else []
    return "\n".join(found + _enum_problems(params, shape, "task"))


def _enum_problems(value: Any, shape: Any, where: str) -> list[str]:
    kind = shape.type_name
    if kind == "structure" and isinstance(value, dict):
        return [
            p
            for name, item in value.items()
            if name in shape.members
            for p in _enum_problems(item, shape.members[name], f"{where}.{name}")
        ]
    if kind == "list" and isinstance(value, list):
        return [p for i, item in enumerate(value) for p in _enum_problems(item, shape.member, f"{where}[{i}]")]
    if kind == "map" and isinstance(value, dict):
        return [p for k, item in value.items() for p in _enum_problems(item, shape.value, f"{where}.{k}")]
    if kind == "string" and shape.enum and value not in shape.enum:
        return [f"{where}: {value!r} is not one of {shape.enum}"]
    return []


def test_task_definition_is_valid_register_task_definition_input() -> None:
    """The task definition passes botocore's validation of RegisterTaskDefinition; a misspelt
    key or a wrong type would not."""
    assert problems(task()) == ""
    bad = task()
    bad["containerDefinitions"][0]["healthcheck"] = bad["containerDefinitions"][0].pop("healthCheck")
    assert "Unknown parameter in containerDefinitions[0]: \"healthcheck\"" in problems(bad)
    bad = task()
    bad["containerDefinitions"][1]["dependsOn"][0]["condition"] = "READY"
    assert "condition" in problems(bad)
    bad = task()
    bad["containerDefinitions"][0]["stopTimeout"] = "30"
    assert "stopTimeout" in problems(bad)


def test_sidecar_and_app_are_wired_together() -> None:
    """The app waits for the sidecar's HEALTHY, reaches it on localhost:8080 and outlives it on
    neither end; the sidecar's health check, user, port and volume are the image's; keys come
    from Secrets Manager, never the environment; every container logs to CloudWatch."""
    containers = {c["name"]: c for c in task()["containerDefinitions"]}
    sidecar, app = containers["stripe-sidecar"], containers["app"]
    assert app["dependsOn"] == [{"containerName": "stripe-sidecar", "condition": "HEALTHY"}]
    assert {"name": "STRIPE_API_BASE", "value": "http://localhost:8080"} in app["environment"]
    image = parse_dockerfile(ROOT / "Dockerfile")[-1]
    assert sidecar["healthCheck"]["command"] == ["CMD", *image.exec_form("HEALTHCHECK")]
    options = dict(re.findall(r"--([\w-]+)=(\d+)s?", image.last("HEALTHCHECK")))
    check = sidecar["healthCheck"]
    assert (check["interval"], check["timeout"], check["retries"], check["startPeriod"]) == tuple(
        int(options[k]) for k in ("interval", "timeout", "retries", "start-period")
    )
    assert sidecar["user"] == image.last("USER")
    assert sidecar["portMappings"][0]["containerPort"] == int(image.last("EXPOSE"))
    assert sidecar["readonlyRootFilesystem"] is True
    (volume,) = json.loads(image.last("VOLUME"))
    assert sidecar["mountPoints"] == [{"sourceVolume": "stripe-sidecar-state", "containerPath": volume, "readOnly": False}]
    assert {"name": "stripe-sidecar-state"} in task()["volumes"]
    # ECS stops the app first (it depends on the sidecar); the sidecar's grace must fit.
    assert sidecar["stopTimeout"] > Config().server.shutdown_grace
    names = {s["name"] for s in sidecar["secrets"]}
    assert names == {"STRIPE_SIDECAR_SECRET_KEYS", "STRIPE_SIDECAR_CLIENT_TOKEN"}
    # Holding keys beyond loopback: the app's API key is the client token.
    token = next(s["valueFrom"] for s in sidecar["secrets"] if s["name"] == "STRIPE_SIDECAR_CLIENT_TOKEN")
    assert {"name": "STRIPE_API_KEY", "valueFrom": token} in app["secrets"]
    for container in containers.values():
        for secret in container.get("secrets", []):
            assert SECRET_ARN.match(secret["valueFrom"]), secret
        for env in container.get("environment", []):
            assert not re.match(r"^(sk|rk)_", env["value"]), f"a key in plain environment: {env['name']}"
        assert container["logConfiguration"]["logDriver"] == "awslogs"
        assert {"awslogs-group", "awslogs-region", "awslogs-stream-prefix"} <= set(container["logConfiguration"]["options"])
