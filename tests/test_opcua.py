"""The OPC UA server against an asyncua client, as a PLC would use it: Basic256Sha256 with certificates and a
password, a subscription that sees every verdict, triggers and threshold writes, and who gets refused."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from pathlib import Path

import pytest
from asyncua import Client, ua
from asyncua.crypto.cert_gen import setup_self_signed_certificate
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.conftest import free_port
from tests.test_runtime import start_runtime, write_config

PASSWORD = "plc-pass-4711"


async def _client_certificate(folder: Path, name: str) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / f"{name}.der", folder / f"{name}.pem"
    await setup_self_signed_certificate(key, cert, f"urn:test:{name}", "localhost", [ExtendedKeyUsageOID.CLIENT_AUTH],
                                        {"organizationName": "plant"})
    return cert, key


async def _connect(url: str, cert: Path, key: Path, user: str, password: str) -> Client:
    client = Client(url, timeout=10)
    client.application_uri = f"urn:test:{cert.stem}"
    await client.set_security(SecurityPolicyBasic256Sha256, str(cert), str(key), mode=ua.MessageSecurityMode.SignAndEncrypt)
    client.set_user(user)
    client.set_password(password)
    await client.connect()
    return client


class Collector:
    def __init__(self):
        self.values: list = []

    def datachange_notification(self, node, value, data):
        if value:
            self.values.append(json.loads(value))


async def _as_a_plc(url: str, certs: dict, parts: int) -> dict:
    client = await _connect(url, *certs["plc"], "plc", PASSWORD)
    try:
        index = await client.get_namespace_index("urn:coft:l1")
        line = await client.nodes.objects.get_child(f"{index}:l1")
        camera = await line.get_child(f"{index}:cam1")
        collector = Collector()
        subscription = await client.create_subscription(20, collector)
        await subscription.subscribe_data_change(await camera.get_child([f"{index}:Verdict", f"{index}:Json"]),
                                                 queuesize=1000)
        heartbeat = await line.get_child(f"{index}:Heartbeat")
        beat = await heartbeat.read_value()
        trigger = await camera.get_child(f"{index}:Trigger")
        for i in range(parts):  # a part every 100 ms, its id written to the Trigger node
            await trigger.write_value(ua.Variant(f"part-{i:03d}", ua.VariantType.String))
            await asyncio.sleep(0.1)
        deadline = time.monotonic() + 10
        while len(collector.values) < parts and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        threshold = await camera.get_child(f"{index}:Threshold")
        old = await threshold.read_value()
        await threshold.write_value(ua.Variant(old * 1.5, ua.VariantType.Double))
        raised = await threshold.read_value()
        refused = None
        try:
            await threshold.write_value(ua.Variant(old * 100, ua.VariantType.Double))
        except ua.UaStatusCodeError as exc:
            refused = type(exc).__name__
        after = await threshold.read_value()
        # one Write, two nodes, one value bad: a Good response, a status per node, exactly the Good node changed
        both = await client.write_values(
            [threshold, trigger], [ua.DataValue(ua.Variant(float("nan"), ua.VariantType.Double)),
                                   ua.DataValue(ua.Variant("part-two-node", ua.VariantType.String))],
            raise_on_partial_error=False)
        too_long = await client.write_values([trigger], [ua.DataValue(ua.Variant("x" * 300, ua.VariantType.String))],
                                             raise_on_partial_error=False)
        deadline = time.monotonic() + 10
        while not any(v["part_id"] == "part-two-node" for v in collector.values) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        after_both = await threshold.read_value()
        later_beat = await heartbeat.read_value()
        await subscription.delete()
        return {"verdicts": collector.values, "old": old, "raised": raised, "refused": refused, "after": after,
                "beats": (beat, later_beat), "both": [c.name for c in both], "too_long": too_long[0].name,
                "after_both": after_both}
    finally:
        await client.disconnect()


async def _refused(url: str, cert: Path, key: Path, user: str, password: str) -> str:
    try:
        client = await _connect(url, cert, key, user, password)
    except Exception as exc:  # asyncua raises the server's status, or a closed connection
        return type(exc).__name__
    await client.disconnect()
    return "connected"


async def _unsecured(url: str, user: str, password: str) -> str:
    """A client that opens a SecurityPolicy None channel itself (no certificate) and sends the password in clear."""
    client = Client(url, timeout=10)
    client.set_user(user)
    client.set_password(password)
    try:  # step by step, as Client.connect does, but without its check that the server offers a None endpoint
        await client.connect_socket()
        await client.send_hello()
        await client.open_secure_channel()
        await client.create_session()
        await client.activate_session(user, password)
        value = await client.nodes.server_state.read_value()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    await client.disconnect()
    return f"connected, read {value}"


def test_a_plc_reads_every_verdict_over_opc_ua_and_strangers_are_refused(tmp_path, exported_bundle, mosquitto, parts):
    certs = {name: asyncio.run(_client_certificate(tmp_path / "clients", name)) for name in ("plc", "stranger")}
    (tmp_path / "password").write_text(PASSWORD)
    port = free_port()
    config = write_config(tmp_path, exported_bundle, mosquitto.port, [
        {"name": "cam1", "source": str(parts / "test/good"), "loop": True, "fps": 20, "trigger": True}],
        opcua={"port": port, "bind": "127.0.0.1", "username": "plc", "password_file": str(tmp_path / "password"),
               "certificate": str(tmp_path / "server.der"), "private_key": str(tmp_path / "server.pem"),
               "trusted_clients": [str(certs["plc"][0])]}, heartbeat_s=0.2)
    log = tmp_path / "runtime.log"
    runtime = start_runtime(config, log)
    url = f"opc.tcp://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 60
        while "opcua: serving" not in log.read_text() and time.monotonic() < deadline:
            assert runtime.poll() is None, log.read_text()[-2000:]
            time.sleep(0.2)
        seen = asyncio.run(_as_a_plc(url, certs, 30))
        wrong_password = asyncio.run(_refused(url, *certs["plc"], "plc", "guess"))
        stranger = asyncio.run(_refused(url, *certs["stranger"], "plc", PASSWORD))
        unsecured = asyncio.run(_unsecured(url, "plc", PASSWORD))  # the right password, over a None channel
        asyncio.run(_refused(url, *certs["stranger"], "plc", PASSWORD))  # again: logged once
    finally:
        runtime.send_signal(signal.SIGTERM)
        code = runtime.wait(timeout=30)
    text = log.read_text()
    assert code == 0, text[-3000:]
    seqs = [v["seq"] for v in seen["verdicts"]]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))) and len(seqs) >= 31  # every verdict, in order, no gap
    assert [v["part_id"] for v in seen["verdicts"]][:30] == [f"part-{i:03d}" for i in range(30)]
    assert seen["both"] == ["BadOutOfRange", "Good"] and seen["after_both"] == seen["raised"]
    assert seen["verdicts"][-1]["part_id"] == "part-two-node"  # the Good node of the two took effect
    assert seen["too_long"] == "BadInvalidArgument"
    assert seen["raised"] == pytest.approx(seen["old"] * 1.5) and seen["after"] == seen["raised"]
    assert seen["refused"] == "BadOutOfRange"
    assert seen["beats"][1] > seen["beats"][0]
    assert wrong_password != "connected" and stranger != "connected"
    assert not unsecured.startswith("connected"), unsecured  # trusted_clients refuses it, with no certificate
    assert text.count("opcua: refused user 'plc'") == 1
    assert text.count("its certificate is not in opcua.trusted_clients") == 1
    assert "AUDIT threshold camera=cam1" in text and "via=opcua" in text
    assert PASSWORD not in text and "Traceback" not in text and "ERROR asyncua" not in text



def test_a_session_on_a_none_channel_is_refused_even_with_the_password(caplog):
    """asyncua's own client will not open a None channel to a server that offers none, so the user manager is
    asked directly, as asyncua asks it at ActivateSession: the channel's client certificate is None there."""
    from coft.runtime.logs import Throttled
    from coft.runtime.opcua import Passwords

    secured_only = Passwords("plc", PASSWORD, anonymous=True, unsecured=False, throttled=Throttled(logging.getLogger("t")))
    with caplog.at_level(logging.WARNING):
        assert secured_only.get_user(None, "plc", PASSWORD, certificate=None) is None
        assert secured_only.get_user(None, None, None, certificate=None) is None  # anonymous, too
    assert secured_only.get_user(None, "plc", PASSWORD, certificate=b"der").name == "plc"
    assert secured_only.get_user(None, None, None, certificate=b"der") is not None  # anonymous allowed, secured
    assert "refused a session for user 'plc' on an unsecured channel (SecurityPolicy None)" in caplog.text
    with_none = Passwords("plc", PASSWORD, anonymous=False, unsecured=True, throttled=Throttled(logging.getLogger("t")))
    assert with_none.get_user(None, "plc", PASSWORD, certificate=None).name == "plc"  # None configured on purpose
    assert with_none.get_user(None, None, None, certificate=b"der") is None
