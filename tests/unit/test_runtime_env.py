"""The runtime environment pixelmill gives Ray workers never carries storage credentials.

Ray shows a job's runtime environment in its dashboard and logs it
(``runtime_env_agent.log``); workers read credentials from their node instead.
"""

from __future__ import annotations

PLANTED = {"AWS_ACCESS_KEY_ID": "pmplantedkeyid", "AWS_SECRET_ACCESS_KEY": "pmPLANTEDsecret-7Qz9xKc2Lw"}


def test_runtime_env_carries_no_storage_credentials(monkeypatch):
    from pixelmill.runtime import Runtime

    for k, v in {**PLANTED, "AWS_SESSION_TOKEN": "tok", "AWS_ENDPOINT_URL_S3": "http://x"}.items():
        monkeypatch.setenv(k, v)
    env = Runtime(prefect_api_url="http://127.0.0.1:1/api").worker_env()
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:1/api"
    assert not [k for k in env if k.startswith("AWS_")]
    assert not any(PLANTED["AWS_SECRET_ACCESS_KEY"] in v for v in env.values())
