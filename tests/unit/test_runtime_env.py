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


def test_rays_token_auth_default_notice_is_dropped_and_its_disabled_warning_kept(caplog):
    """pixelmill's local Rays always use token auth: Ray's "enabled by default, opt out" notice says nothing to do."""
    import logging

    from pixelmill.runtime import apply_quiet_defaults

    apply_quiet_defaults()
    apply_quiet_defaults()  # idempotent: one filter
    log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    assert len(log.filters) == 1
    with caplog.at_level(logging.WARNING, logger=log.name):
        log.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.")
        log.warning("Token authentication is disabled for this Ray cluster. Anyone with network access ...")
    assert [r.getMessage()[:40] for r in caplog.records] == ["Token authentication is disabled for thi"]
