"""boto3 sessions and clients, configured in one place: region, profile, endpoint URL, timeouts and retries.

Nothing is hard-coded: the region comes from `--region`, the profile, or the AWS_DEFAULT_REGION / AWS_REGION
variables; `--endpoint-url` (or AWS_ENDPOINT_URL, which boto3 reads itself) points every client at another
endpoint, such as a moto server in the tests. boto3 is imported here, lazily, so `import client` stays light.
"""

from __future__ import annotations

from typing import Any


class AwsConfigError(Exception):
    """No usable AWS configuration (no region, unknown profile); raised before any request is sent."""


def make_session(region: str | None = None, profile: str | None = None) -> Any:
    import boto3
    import botocore.exceptions

    try:
        session = boto3.session.Session(profile_name=profile, region_name=region)
    except botocore.exceptions.ProfileNotFound as e:
        raise AwsConfigError(f"AWS profile {profile!r} not found in ~/.aws/config or ~/.aws/credentials") from e
    if not session.region_name:
        raise AwsConfigError(
            "no AWS region: pass --region, set AWS_DEFAULT_REGION, or give the profile a region (aws configure)"
        )
    return session


def make_client(
    service: str,
    *,
    region: str | None = None,
    profile: str | None = None,
    endpoint_url: str | None = None,
    read_timeout: float = 60.0,
    max_attempts: int = 5,
    session: Any = None,
) -> Any:
    """A boto3 client with adaptive retries (throttling is common on the control plane) and explicit timeouts."""
    from botocore.config import Config

    session = session or make_session(region, profile)
    config = Config(
        connect_timeout=10,
        read_timeout=read_timeout,
        retries={"max_attempts": max_attempts, "mode": "adaptive"},
        user_agent_extra="llava-sagemaker",
    )
    return session.client(service, endpoint_url=endpoint_url or None, config=config)


class Clients:
    """The clients one command needs, created on first use from the same session."""

    def __init__(self, region: str | None = None, profile: str | None = None, endpoint_url: str | None = None):
        self._session = make_session(region, profile)
        self._endpoint_url = endpoint_url
        self._clients: dict[str, Any] = {}
        self.region = self._session.region_name

    def __getattr__(self, service: str) -> Any:
        # clients.sagemaker, clients.s3, clients.logs, clients.application_autoscaling
        if service.startswith("_"):
            raise AttributeError(service)
        if service not in self._clients:
            self._clients[service] = make_client(
                service.replace("_", "-"), session=self._session, endpoint_url=self._endpoint_url
            )
        return self._clients[service]
