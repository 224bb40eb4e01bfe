"""Secrets never reach a log line: what keystoneauth's -v output looks like, redacted."""

import base64
import json
import logging

from rollout import redact
from rollout.seed import Credentials, SeedParams, render_user_data


def _seed() -> tuple[Credentials, str]:
    creds = Credentials.generate()
    params = SeedParams(role="front", colour="blue", release="r1", deploy_id="d1", env="dev",
                        credentials=creds)
    return creds, base64.b64encode(render_user_data(params).encode()).decode()


def test_user_data_fields_are_redacted_in_request_and_response_bodies():
    creds, user_data = _seed()
    request = "REQ: curl -g -i -X POST http://nova/v2.1/servers -d " + json.dumps(
        {"server": {"name": "x", "user_data": user_data, "imageRef": "i"}})
    response = "RESP BODY: " + json.dumps(
        {"server": {"OS-EXT-SRV-ATTR:user_data": user_data, "status": "ACTIVE"}})
    as_repr = repr({"user_data": user_data})
    for line in (request, response, as_repr):
        clean = redact.redact(line)
        assert user_data not in clean and redact.REDACTED in clean
    assert '"status": "ACTIVE"' in redact.redact(response)  # the rest is kept


def test_generated_passwords_are_masked_anywhere():
    creds, _ = _seed()
    line = f"amqp://{creds.broker_user}:{creds.broker_password}@10.0.0.5:5672/modelserve " \
           f"redis={creds.redis_password}"
    clean = redact.redact(line)
    assert creds.broker_password not in clean and creds.redis_password not in clean
    assert creds.broker_user in clean  # a user name is not a secret


def test_the_filter_rewrites_records_with_args(caplog):
    creds, user_data = _seed()
    logger = logging.getLogger("keystoneauth.session")
    handler = logging.StreamHandler()
    handler.addFilter(redact.RedactFilter())
    records = []
    handler.emit = records.append  # capture what the handler would write
    logger.addHandler(handler)
    try:
        logger.warning("RESP BODY: %s", json.dumps({"user_data": user_data}))
        logger.warning("password %s", creds.redis_password)
    finally:
        logger.removeHandler(handler)
    messages = [r.getMessage() for r in records]
    assert len(messages) == 2
    assert all(user_data not in m and creds.redis_password not in m for m in messages)
