"""Configuration: every mistake fails at startup naming the file, the key and what is allowed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, load_settings, parse_settings

ROOT = Path(__file__).resolve().parent.parent
MODEL = {"name": "m", "deployments": [{"model": "x", "base_url": "http://127.0.0.1:1/v1"}]}


def fails(raw: Any, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as exc:
        parse_settings(raw, "cfg.yaml", env or {})
    return str(exc.value)


def test_shipped_config_is_valid() -> None:
    settings = load_settings(ROOT / "config.yaml", env={})
    assert settings.models[0].name == "demo"
    assert settings.demo_upstream.enabled


def test_unknown_top_level_key_names_allowed_keys() -> None:
    msg = fails({"models": [MODEL], "sever": {}})
    assert msg.startswith("cfg.yaml: (top level): unknown key 'sever'; allowed keys: ")
    assert "server" in msg and "pipeline" in msg
    assert "source" not in msg  # the gateway's own field, refused in a file


def test_an_error_inside_a_deployment_is_reported_once() -> None:
    """pydantic also reports the emptied lists around a bad item ("at least 1 item after
    validation, not 0"): only the item's own error is shown."""
    bad = {"name": "m", "deployments": [{"model": "x", "base_url": "http://h",
                                         "context_window": "big"}]}  # fmt: skip
    msg = fails({"models": [bad]})
    assert msg.splitlines() == [
        "cfg.yaml: models[0].deployments[0].context_window: Input should be a valid integer, "
        "unable to parse string as an integer (got 'big')"
    ]
    # An empty list is still its own error.
    assert "models[0].deployments: Tuple should have at least 1 item" in fails(
        {"models": [{"name": "m", "deployments": []}]}
    )


def test_wrong_type_names_the_path_and_value() -> None:
    msg = fails({"models": [MODEL], "server": {"port": "eighty"}})
    assert "cfg.yaml: server.port: Input should be a valid integer" in msg
    assert "'eighty'" in msg


def test_nested_list_paths() -> None:
    bad = {"name": "m", "deployments": [{"model": "x", "base_url": "ftp://h"}]}
    msg = fails({"models": [bad]})
    assert "cfg.yaml: models[0].deployments[0].base_url: must start with http:// or https://" in msg


def test_unknown_provider_lists_providers() -> None:
    bad = {"name": "m", "deployments": [{"provider": "bard", "model": "x", "base_url": "http://h"}]}
    msg = fails({"models": [bad]})
    assert (
        "models[0].deployments[0].provider: unknown provider 'bard'; allowed: anthropic, openai"
        in msg
    )


def test_literal_errors_list_allowed_values() -> None:
    msg = fails({"models": [MODEL], "logging": {"level": "loud"}})
    assert "logging.level" in msg and "'debug'" in msg and "'error'" in msg


def test_missing_env_var_is_named() -> None:
    raw = {"models": [{"name": "m", "deployments": [
        {"model": "x", "base_url": "http://h", "api_key": "${OPENAI_API_KEY}"}]}]}  # fmt: skip
    msg = fails(raw)
    assert msg.startswith(
        "cfg.yaml: models[0].deployments[0].api_key: environment variable OPENAI_API_KEY is not set"
    )


def test_env_vars_and_defaults_are_substituted() -> None:
    raw = {
        "models": [
            {
                "name": "m",
                "deployments": [
                    {
                        "model": "x",
                        "base_url": "${BASE:-http://127.0.0.1:9}/v1",
                        "api_key": "${KEY}",
                    }
                ],
            }
        ]
    }
    s = parse_settings(raw, "cfg.yaml", {"KEY": "sk-123"})
    dep = s.models[0].deployments[0]
    assert dep.api_key == "sk-123" and dep.base_url == "http://127.0.0.1:9/v1"
    assert "sk-123" not in repr(dep)  # secrets stay out of reprs and logs


def test_duplicate_model_names_and_unknown_fallbacks() -> None:
    assert "already used" in fails({"models": [MODEL, MODEL]})
    bad = {**MODEL, "fallbacks": ["ghost"]}
    assert "models[0].fallbacks: unknown model 'ghost'" in fails({"models": [bad]})


def test_models_are_required() -> None:
    assert "models" in fails({})


def test_check_config_command(tmp_path: Path) -> None:
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "check-config",
            "--config",
            str(ROOT / "config.yaml"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - name: m\n    deployments: []\npipeline:\n  - name: nope\n")
    r = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check-config", "--config", str(bad)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 2
    assert f"{bad}: models[0].deployments" in r.stderr
    assert "Traceback" not in r.stderr
    missing = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "check-config",
            "--config",
            str(tmp_path / "no.yaml"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert missing.returncode == 2 and "cannot read config file" in missing.stderr


def test_a_key_given_twice_fails_instead_of_the_last_one_winning(tmp_path: Path) -> None:
    """YAML keeps the last of two equal keys: a second ``pipeline:`` would drop auth."""
    cfg = tmp_path / "twice.yaml"
    cfg.write_text(
        "models:\n  - name: m\n    deployments: [{model: x, base_url: 'http://127.0.0.1:1/v1'}]\n"
        "pipeline:\n  - name: auth\npipeline:\n  - name: headers\n"
    )
    with pytest.raises(ConfigError, match=r"twice.yaml: line 6: key 'pipeline' appears twice "
                                          r"in one mapping \(first on line 4\)"):  # fmt: skip
        load_settings(cfg, env={})
    nested = tmp_path / "nested.yaml"
    nested.write_text("server: {port: 1, port: 2}\nmodels: []\n")
    with pytest.raises(ConfigError, match="key 'port' appears twice"):
        load_settings(nested, env={})
    # Merge keys and anchors still work.
    merged = tmp_path / "merged.yaml"
    merged.write_text(
        "x-dep: &dep {model: x, base_url: 'http://127.0.0.1:1/v1'}\n"
        "models:\n  - name: m\n    deployments: [{<<: *dep, id: a}]\n"
    )
    with pytest.raises(ConfigError, match="unknown key 'x-dep'"):  # (the anchor's own key)
        load_settings(merged, env={})


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    cfg = tmp_path / "latin1.yaml"
    cfg.write_bytes(b"models: []\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1.yaml: line 2: the file is not valid UTF-8"):
        load_settings(cfg, env={})


def test_two_deployments_with_one_id_fail() -> None:
    """Providers and breakers are keyed by id: the second would take the first's traffic."""

    def dep(url: str, **extra: Any) -> dict[str, Any]:
        return {"model": "x", "base_url": url, **extra}

    a = {"name": "a", "deployments": [dep("http://127.0.0.1:1/v1", id="d")]}
    b = {"name": "b", "deployments": [dep("http://127.0.0.1:2/v1", id="d")]}
    msg = fails({"models": [a, b]})
    assert msg == (
        "cfg.yaml: models[1].deployments[0].id: 'd' is already the id of models[0].deployments[0]"
    )
    # An explicit id equal to another deployment's default one ("<model>/<index>") too.
    c = {"name": "c", "deployments": [dep("http://127.0.0.1:3/v1", id="a/0")]}
    a2 = {"name": "a", "deployments": [dep("http://127.0.0.1:1/v1")]}
    assert "'a/0' is already the id of models[0].deployments[0]" in fails({"models": [a2, c]})
    parse_settings({"models": [a2, {**c, "deployments": [dep("http://127.0.0.1:3/v1")]}]}, "x", {})


def test_a_fallback_may_name_a_later_model_by_alias() -> None:
    first = {**MODEL, "fallbacks": ["backup-alias"]}
    later = {"name": "backup", "aliases": ["backup-alias"], "deployments": MODEL["deployments"]}
    settings = parse_settings({"models": [first, later]}, "cfg.yaml", {})
    assert settings.models[0].fallbacks == ("backup-alias",)


@pytest.mark.parametrize("ref", ["${OPENAI_API_KEY", "${1BAD}", "${}", "key-${A B}"])
def test_a_malformed_env_reference_fails_rather_than_being_sent_as_the_key(ref: str) -> None:
    model = {"name": "m", "deployments": [{**MODEL["deployments"][0], "api_key": ref}]}  # type: ignore[index]
    msg = fails({"models": [model]}, env={"OPENAI_API_KEY": "sk-x", "A": "1"})
    assert msg.startswith("cfg.yaml: models[0].deployments[0].api_key: malformed environment ref")


@pytest.mark.parametrize(
    ("url", "why"),
    [("http://", "needs a host name"), ("http://exa mple.com/v1", "needs a host name and no"),
     ("http://example.com:99999/v1", "Port out of range"), ("http://h:port/v1", "not a valid URL")],
)  # fmt: skip
def test_base_url_must_be_a_usable_url(url: str, why: str) -> None:
    model = {"name": "m", "deployments": [{"model": "x", "base_url": url}]}
    assert why in fails({"models": [model]})


def test_source_and_forbidden_extra_params_are_refused() -> None:
    assert "source: unknown key" in fails({"models": [MODEL], "source": "elsewhere.yaml"})
    msg = fails({"models": [MODEL], "requests": {"extra_params": ["top_k", "api_key"]}})
    assert "requests.extra_params: 'api_key' is never accepted from clients" in msg
    parse_settings({"models": [MODEL], "requests": {"extra_params": ["top_k"]}}, "cfg.yaml", {})


def test_check_config_runs_the_checks_that_serve_would_fail_on(tmp_path: Path) -> None:
    """Pipeline order and routing rules are checked by check-config, not only at serve time."""
    head = (
        "models:\n  - name: m\n    deployments: [{model: x, base_url: 'http://127.0.0.1:1/v1'}]\n"
    )
    cases = {
        "order": ("pipeline:\n  - name: guard\n    config: {semantic: {enabled: false}}\n"
                  "  - name: cache\n", "pipeline: 'cache' must come before 'guard'"),
        "rule": ("pipeline:\n  - name: route\n"
                 "    config: {rules: [{when: {models: [zz]}, model: m}]}\n",
                 "pipeline[0].config.rules[0]: unknown model 'zz'; known: m"),
    }  # fmt: skip
    for name, (pipeline, expected) in cases.items():
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(head + pipeline)
        r = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "check-config", "--config", str(cfg)],
            capture_output=True, text=True, cwd=ROOT,
        )  # fmt: skip
        assert r.returncode == 2, r.stdout
        assert f"{cfg}: {expected}" in r.stderr and "Traceback" not in r.stderr


def test_a_phase_timeout_above_the_total_timeout_fails() -> None:
    msg = fails({"models": [MODEL], "upstream": {"connect_timeout_s": 30, "total_timeout_s": 10}})
    assert "cfg.yaml: upstream: connect_timeout_s (30) is above total_timeout_s (10)" in msg
    msg = fails({"models": [MODEL], "upstream": {"read_timeout_s": 700}})
    assert "read_timeout_s (700) is above total_timeout_s (600)" in msg
    msg = fails({"models": [MODEL], "upstream": {"response_timeout_s": 601}})
    assert "cfg.yaml: upstream: response_timeout_s (601) is above total_timeout_s (600)" in msg
    msg = fails({"models": [MODEL], "upstream": {"response_timeout_s": 0}})
    assert "response_timeout_s" in msg
    # Only timeouts set in the file are compared: lowering the total alone is fine.
    settings = parse_settings({"models": [MODEL], "upstream": {"total_timeout_s": 30}}, "c", {})
    assert settings.upstream.first_byte_timeout_s == 60.0
    assert settings.upstream.response_timeout_s == 600.0
