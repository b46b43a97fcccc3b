"""The README's run command: the shipped config.yaml serves the demo model from the built-in
fake upstream, with auth on and the documented demo key, with no provider keys and no internet."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import openai

from tests.helpers import ROOT, free_port, wait_http_ok

DEMO_KEY = "sk-demo-LocalOnlyNeverDeployThisKey"


def test_shipped_config_answers_the_sdk_with_the_demo_key() -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env.pop("GATEWAY_KEY_SECRET", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", "config.yaml", "--port",
         str(port)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        try:
            wait_http_ok(f"{url}/readyz", proc, "gateway")
        except RuntimeError as e:
            proc.kill()
            output = proc.stdout.read().decode() if proc.stdout else ""
            raise AssertionError(f"{e}: {output[-3000:]}") from None
        with openai.OpenAI(base_url=f"{url}/v1", api_key=DEMO_KEY, max_retries=0) as client:
            reply = client.chat.completions.create(
                model="demo", messages=[{"role": "user", "content": "Hello!"}]
            )
            assert reply.choices[0].message.content
            text = "".join(
                c.choices[0].delta.content or ""
                for c in client.chat.completions.create(
                    model="gpt-4o-mini",
                    stream=True,
                    messages=[{"role": "user", "content": "Stream it"}],
                )
                if c.choices
            )
            assert text
        with openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0) as client:
            try:
                client.models.list()
                raise AssertionError("a wrong key was accepted")
            except openai.AuthenticationError:
                pass
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        if proc.stdout:
            proc.stdout.close()
