"""Validate the deployment files offline (no container engine, no cluster, no network).

* deploy/compose.yaml against the Compose Specification JSON schema (vendored, with its licence,
  by the ``check-jsonschema`` package: ``builtin_schemas/vendor/compose-spec.json``);
* deploy/k8s/*.yaml against the Kubernetes OpenAPI schemas shipped by ``kubernetes-validate``
  (strict: unknown fields are errors);
* deploy/prometheus.yml: targets are the compose replicas, the token file is mounted;
* deploy/config.replicas.yaml with the gateway's own validator (``gateway check-config``), and
  the ConfigMap's copy is identical to it; the preStop sleep equals ``server.drain_delay_s``.

    python scripts/validate_deploy.py                 # exits 1 listing every problem
    python scripts/validate_deploy.py --sync-configmap   # rewrite the ConfigMap from the file
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.30.0"

#: What ``gateway check-config`` needs in the environment to resolve ``${...}`` in the file.
CHECK_ENV = {
    "METRICS_TOKEN": "check-token",
    "LEDGER_URL": "postgresql://gateway:pw@postgres:5432/gateway",
    "OPENAI_API_KEY": "sk-check",
    "GATEWAY_KEY_SECRET": "check-secret-0123456789abcdef",
    "REDIS_URL": "redis://redis:6379/0",
}


def compose_schema() -> dict[str, Any]:
    files = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return dict(json.loads(files.joinpath("compose-spec.json").read_text()))


def validate_compose(path: Path = DEPLOY / "compose.yaml") -> list[str]:
    import jsonschema

    data = yaml.safe_load(path.read_text())
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    problems = [
        f"{path.name}: {'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
        for e in validator.iter_errors(data)
    ]
    services = data.get("services", {})
    for needed in ("redis", "chroma", "postgres", "prometheus", "grafana"):
        if needed not in services:
            problems.append(f"{path.name}: service {needed!r} is missing")
    gateways = [n for n in services if n.startswith("gateway-")]
    if len(gateways) < 2:
        problems.append(f"{path.name}: expected at least two gateway replicas, got {gateways}")
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0] if isinstance(volume, str) else ""
            if source.startswith("./") and "secrets/" not in source:
                if not (DEPLOY / source).exists() and "grafana/" not in source:
                    problems.append(f"{path.name}: {name} mounts missing {source}")
    return problems


def k8s_documents() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path, doc))
    return docs


def validate_k8s() -> list[str]:
    import kubernetes_validate

    problems = []
    kinds = set()
    for path, doc in k8s_documents():
        kinds.add(doc.get("kind"))
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = "/".join(map(str, e.path))
            problems.append(f"k8s/{path.name}: {doc.get('kind')}: {where}: {e.message}")
    wanted = {"Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget",
              "HorizontalPodAutoscaler"}  # fmt: skip
    if missing := wanted - kinds:
        problems.append(f"k8s: missing kinds {sorted(missing)}")
    return problems


def configmap_text() -> str:
    for _, doc in k8s_documents():
        if doc.get("kind") == "ConfigMap":
            return str(doc["data"]["config.yaml"])
    return ""


def validate_consistency() -> list[str]:
    problems = []
    source = (DEPLOY / "config.replicas.yaml").read_text()
    config = yaml.safe_load(source)
    if configmap_text() != source:
        problems.append("k8s/configmap.yaml: config.yaml differs from deploy/config.replicas.yaml "
                        "(run scripts/validate_deploy.py --sync-configmap)")  # fmt: skip
    server = config.get("server", {})
    drain_delay = server.get("drain_delay_s", 2)
    drain_timeout = server.get("drain_timeout_s", 10)
    for _, doc in k8s_documents():
        if doc.get("kind") != "Deployment":
            continue
        pod = doc["spec"]["template"]["spec"]
        container = pod["containers"][0]
        sleep = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        if sleep != drain_delay:
            problems.append(f"deployment: preStop sleep {sleep} != drain_delay_s {drain_delay}")
        grace = pod.get("terminationGracePeriodSeconds", 30)
        if grace <= sleep + drain_delay + drain_timeout:
            problems.append(f"deployment: terminationGracePeriodSeconds {grace} must exceed "
                            f"{sleep + drain_delay + drain_timeout}")  # fmt: skip
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            if container.get(probe, {}).get("httpGet", {}).get("path") != path:
                problems.append(f"deployment: {probe} must GET {path}")
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    replicas = {f"{n}:8080" for n in compose["services"] if n.startswith("gateway-")}
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"]
               for t in sc["targets"]}  # fmt: skip
    if replicas - targets:
        problems.append(f"prometheus.yml: replicas not scraped: {sorted(replicas - targets)}")
    return problems


def check_config(env: dict[str, str] | None = None) -> tuple[int, str]:
    import os
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check-config", "--config",
         str(DEPLOY / "config.replicas.yaml")],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, **CHECK_ENV, **(env or {})},
        timeout=120,
    )  # fmt: skip
    return proc.returncode, proc.stdout + proc.stderr


def sync_configmap() -> None:
    src = (DEPLOY / "config.replicas.yaml").read_text()
    path = DEPLOY / "k8s" / "configmap.yaml"
    head, _, _ = path.read_text().partition("  config.yaml: |\n")
    body = "".join("    " + line if line.strip() else "\n" for line in src.splitlines(True))
    path.write_text(head + "  config.yaml: |\n" + body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sync-configmap", action="store_true")
    args = parser.parse_args(argv)
    if args.sync_configmap:
        sync_configmap()
    problems = validate_compose() + validate_k8s() + validate_consistency()
    rc, out = check_config()
    if rc != 0:
        problems.append(f"gateway check-config failed:\n{out}")
    for p in problems:
        print(p, file=sys.stderr)
    print("deploy: OK" if not problems else f"deploy: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
