"""The deployment files validate offline: compose against the Compose Specification schema,
Kubernetes manifests against the Kubernetes schemas (strict), the replicas' config with the
gateway's own ``check-config``, and the files agree with each other (scripts/validate_deploy.py).
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from types import ModuleType

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "validate_deploy", ROOT / "scripts/validate_deploy.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


vd = _load()


def test_compose_file_matches_the_compose_spec_and_has_every_service() -> None:
    assert vd.validate_compose() == []
    services = yaml.safe_load((ROOT / "deploy/compose.yaml").read_text())["services"]
    assert {"gateway-1", "gateway-2", "redis", "chroma", "postgres", "prometheus",
            "grafana"} <= set(services)  # fmt: skip


def test_compose_validator_catches_mistakes(tmp_path: Path) -> None:
    data = yaml.safe_load((ROOT / "deploy/compose.yaml").read_text())
    data["services"]["redis"]["restart_policy"] = "always"  # not a compose key
    data["services"]["postgres"]["ports"] = {"5432": "5432"}  # wrong type
    del data["services"]["chroma"]
    bad = tmp_path / "compose.yaml"
    bad.write_text(yaml.safe_dump(data))
    problems = "\n".join(vd.validate_compose(bad))
    assert "restart_policy" in problems
    assert "services/postgres/ports" in problems
    assert "service 'chroma' is missing" in problems


def test_kubernetes_manifests_are_valid_and_complete() -> None:
    assert vd.validate_k8s() == []


def test_kubernetes_validator_is_strict() -> None:
    deployment = next(d for _, d in vd.k8s_documents() if d["kind"] == "Deployment")
    bad = copy.deepcopy(deployment)
    bad["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["paht"] = "/x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, vd.K8S_VERSION, strict=True)
    bad = copy.deepcopy(deployment)
    bad["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, vd.K8S_VERSION, strict=True)


def test_files_agree_probes_prestop_grace_configmap_and_scrape_targets() -> None:
    assert vd.validate_consistency() == []
    config = yaml.safe_load((ROOT / "deploy/config.replicas.yaml").read_text())
    deployment = next(d for _, d in vd.k8s_documents() if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert (
        container["lifecycle"]["preStop"]["sleep"]["seconds"] == config["server"]["drain_delay_s"]
    )
    assert vd.configmap_text() == (ROOT / "deploy/config.replicas.yaml").read_text()
    names = [p["name"] for p in config["pipeline"]]
    assert names.index("cache") < names.index("guard")  # the cache plugin refuses otherwise
    for plugin in ("limit", "cache"):
        cfg = next(p["config"] for p in config["pipeline"] if p["name"] == plugin)
        assert cfg["store"] == "${REDIS_URL}"
    auth = next(p["config"] for p in config["pipeline"] if p["name"] == "auth")
    assert auth["store"]["type"] == "redis"


def test_replicas_config_passes_gateway_check_config() -> None:
    rc, out = vd.check_config()
    assert rc == 0, out
    assert "pipeline: auth -> limit -> cache -> guard -> rag -> route" in out


def test_replicas_config_fails_check_config_without_its_secrets() -> None:
    # A required ``${NAME}`` that is not in the environment fails the check, naming it.
    env_missing = {k: v for k, v in vd.CHECK_ENV.items() if k != "OPENAI_API_KEY"}
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in vd.CHECK_ENV} | env_missing
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check-config", "--config",
         str(ROOT / "deploy/config.replicas.yaml")],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "OPENAI_API_KEY is not set" in proc.stderr


def test_both_images_install_what_the_project_defines_and_run_alike() -> None:
    """deploy/Dockerfile installed '.[all]', an extra pyproject.toml does not define: pip
    installs the project without it, so the image lacked torch, Chroma and the classifier and
    the replicas config (with rag) crashed at startup."""
    import re
    import tomllib

    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"])  # fmt: skip
    for name in ("Containerfile", "deploy/Dockerfile"):
        text = (ROOT / name).read_text()
        asked = re.findall(r'pip install[^\n]*"\.\[([a-z,]+)\]"', text)
        assert asked and all(set(a.split(",")) <= extras for a in asked), (name, asked)
        assert "||" not in text, name  # no fallback that hides a failed install
        assert '"torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu' in text, name
        assert "HEALTHCHECK" in text and "USER 10001" in text, name
    deployment = yaml.safe_load_all((ROOT / "deploy/k8s/deployment.yaml").read_text())
    container = next(d for d in deployment if d and d.get("kind") == "Deployment")[
        "spec"]["template"]["spec"]["containers"][0]  # fmt: skip
    assert container["command"] == ["gateway", "serve"]  # whichever image it runs
