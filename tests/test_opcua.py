"""The OPC UA server against an asyncua client, as a PLC would use it: Basic256Sha256 with certificates and a
password, a subscription that sees every verdict, triggers and threshold writes, and who gets refused."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import time
import urllib.request
from importlib.metadata import version
from pathlib import Path

import pytest
from asyncua import Client, ua
from asyncua.crypto.cert_gen import setup_self_signed_certificate
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.support.broker import free_port, metric
from tests.support.clients import node_client
from tests.support.runtime import start_runtime, write_config
from tests.support.wait import wait_for_log

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
        wait_for_log(log, "opcua: serving", runtime=runtime)
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



def test_node_opcua_as_the_plc_string_node_ids_units_float_writes_and_no_none_channel(tmp_path, exported_bundle,
                                                                                       mosquitto, parts):
    """node-opcua, a client we did not write: a None channel with the right password is refused; on
    Basic256Sha256 SignAndEncrypt it finds nodes by string NodeId in a config that lists cam2 before cam1, reads
    units, ranges, our BuildInfo and BadWaitingForInitialData before a camera's first verdict, and writes a Float."""
    (tmp_path / "password").write_text(PASSWORD)
    port = free_port()
    config = write_config(tmp_path, exported_bundle, mosquitto.port, [
        {"name": "cam2", "source": str(parts / "test/good"), "loop": True, "fps": 20, "trigger": True},
        {"name": "cam1", "source": str(parts / "test/good"), "loop": True, "fps": 20, "trigger": True}],
        opcua={"port": port, "bind": "0.0.0.0", "username": "plc", "password_file": str(tmp_path / "password"),
               "certificate": str(tmp_path / "server.der"), "private_key": str(tmp_path / "server.pem")},
        metrics_port=(metrics_port := free_port()))
    log = tmp_path / "runtime.log"
    runtime = start_runtime(config, log)
    try:
        wait_for_log(log, "opcua: serving", runtime=runtime)
        seen = node_client("opcua_plc.js", {"url": f"opc.tcp://127.0.0.1:{port}/", "user": "plc",
                                            "password": PASSWORD, "pki": str(tmp_path / "pki"), "parts": 10})
        days_left = (metric(metrics_port, "coft_opcua_certificate_expiry_timestamp_seconds") - time.time()) / 86400
        exposition = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
    finally:
        runtime.send_signal(signal.SIGTERM)
        code = runtime.wait(timeout=30)
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert seen["unsecured"].startswith("refused"), seen["unsecured"]
    assert "refused a session from 127.0.0.1 on an unsecured channel (SecurityPolicy None)" in text
    assert seen["endpoints"] and not any("0.0.0.0" in url for url in seen["endpoints"])
    assert seen["build"]["productUri"] == "urn:coft:runtime" and seen["build"]["manufacturer"] == "coft"
    assert seen["build"]["version"] == version("coft")
    assert seen["waiting"] == "BadWaitingForInitialData"  # cam2 was never triggered: no Good zeros
    assert seen["browsed"] == seen["threshold_id"]  # s=l1.cam2.Threshold is cam2's, whatever the order
    assert seen["latency"]["units"] == "ms" and seen["latency"]["unitId"] == int.from_bytes(b"C26", "big")
    assert seen["latency"]["low"] == 0 and seen["latency"]["high"] == 500  # control.trigger_deadline_ms
    assert [v["part_id"] for v in seen["verdicts"]] == [f"node-{i}" for i in range(10)] + ["node-two-node"]
    assert seen["both"] == ["BadOutOfRange", "Good"] and seen["after_both"] == seen["old"]
    assert seen["float_write"] == "Good"
    assert seen["float_after"] == pytest.approx(seen["old"] * 1.25, rel=1e-6)  # a REAL's precision
    assert "AUDIT threshold camera=cam2" in text and "via=opcua" in text
    assert PASSWORD not in text and "Traceback" not in text
    assert 3640 < days_left <= 3650  # the certificate's lifetime, in the metrics a monitoring system alerts on
    linted = subprocess.run(["promtool", "check", "metrics"], input=exposition, capture_output=True)
    assert linted.returncode == 0, linted.stderr.decode()  # Prometheus' own linter, with the OPC UA series


def test_the_server_certificate_is_one_identity_for_years_renewed_only_by_the_operator(tmp_path, monkeypatch, caplog):
    """asyncua's helper would make a new certificate at expiry or on a new host name: every PLC would have to trust
    the box again. Ours is made once, kept as it is (warned about before it expires), renewed with the same key."""
    from cryptography import x509

    from coft.runtime.comms import opcua_identity
    from coft.runtime.model.errors import CoftError

    cert, key = tmp_path / "server.der", tmp_path / "server.pem"
    first = opcua_identity.ensure(cert, key, "urn:coft:l1", "coft l1")
    names = first.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:coft:l1"]
    assert set(opcua_identity.host_names()) <= set(names.get_values_for_type(x509.DNSName))
    assert set(opcua_identity.box_addresses()) == set(names.get_values_for_type(x509.IPAddress))
    assert opcua_identity.days_left(first) > 9 * 365
    monkeypatch.setattr(opcua_identity, "host_names", lambda: ["renamed-box"])  # the host was renamed
    assert opcua_identity.ensure(cert, key, "urn:coft:l1", "coft l1") == first  # the same identity, untouched

    monkeypatch.setattr(opcua_identity, "VALID_DAYS", 20)  # a certificate about to expire
    cert.unlink()
    expiring = opcua_identity.ensure(cert, key, "urn:coft:l1", "coft l1")  # issued for the key that is there
    with caplog.at_level(logging.WARNING):
        assert opcua_identity.ensure(cert, key, "urn:coft:l1", "coft l1") == expiring
    assert "expires on" in caplog.text and "coft opcua-certificate --config LINE.yaml --renew" in caplog.text
    monkeypatch.setattr(opcua_identity, "VALID_DAYS", 3650)
    renewed = opcua_identity.renew(cert, key, "urn:coft:l1", "coft l1")
    assert renewed.public_key().public_numbers() == first.public_key().public_numbers()  # same key
    assert renewed != expiring and opcua_identity.days_left(renewed) > 9 * 365
    assert "renamed-box" in renewed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
        .get_values_for_type(x509.DNSName)

    other = tmp_path / "other"
    opcua_identity.ensure(other / "server.der", other / "server.pem", "urn:coft:l1", "coft l1")
    with pytest.raises(CoftError, match="does not belong to the private key"):
        opcua_identity.verify(other / "server.der", key)
