"""Client certificates on a real Mosquitto (``fedmqtt broker --tls --client-certs``).

The broker requires a certificate from its CA and makes its common name the user name, so the generated ACL
(``%u``) keys on it. A device without a certificate, or with one from another CA, is refused with one clear line;
with its own certificate a real ``fedmqtt device`` completes a round of a real ``fedmqtt coordinator`` (which
logs in with its own certificate), and the device still cannot publish as another device.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import require_mosquitto
from fedmqtt.broker.certs import ClientCertificate, generate_test_certificates, issue_client_certificate
from fedmqtt.broker.errors import CertificateError
from fedmqtt.broker.mosquitto import MosquittoBroker, MosquittoConfig
from fedmqtt.broker.net import find_free_port
from fedmqtt.mqtt import BrokerSettings, MqttConnection, PublishRefused, TlsError
from fedmqtt.schema import DeviceStatus, to_json
from fedmqtt.topics import Topics

pytestmark = [pytest.mark.mosquitto]

PREFIX = "certs"
CLI = [sys.executable, "-m", "fedmqtt.cli"]


class CertBroker:
    def __init__(self, broker: MosquittoBroker, foreign: ClientCertificate) -> None:
        self.broker = broker
        self.foreign = foreign  # "dev-1", but from another CA

    @property
    def url(self) -> str:
        return self.broker.url

    @property
    def ca(self) -> Path:
        return self.broker.ca_file

    def cert(self, kind: str, device_id: str | None = None) -> ClientCertificate:
        return self.broker.issue_client_certificate(kind, device_id)  # type: ignore[arg-type]

    def settings(self, cert: ClientCertificate | None) -> BrokerSettings:
        fields: dict[str, object] = {"broker": self.url, "tls_ca": self.ca, "mqtt_version": "5"}
        if cert is not None:
            fields |= {"tls_cert": cert.cert, "tls_key": cert.key}
        return BrokerSettings.model_validate(fields, context={"env": {}})

    def cert_flags(self, cert: ClientCertificate | None) -> list[str]:
        flags = ["--broker", self.url, "--tls-ca", str(self.ca)]
        return flags + (["--tls-cert", str(cert.cert), "--tls-key", str(cert.key)] if cert else [])


@pytest.fixture(scope="module")
def cert_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CertBroker]:
    require_mosquitto()
    other = tmp_path_factory.mktemp("other-ca")
    generate_test_certificates(other)
    foreign = issue_client_certificate(other, "dev-1")
    with MosquittoBroker(tmp_path_factory.mktemp("cert-broker"), tls=True, client_certs=True, prefix=PREFIX) as b:
        yield CertBroker(b, foreign)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedmqtt.data import write_idx_dataset

    return write_idx_dataset(tmp_path_factory.mktemp("tiny"), num_train=200, num_test=10, seed=3)


# --- the configuration and the certificates ---------------------------------------------------------------


def test_the_generated_config_requires_certificates_and_names_users_by_them(tmp_path: Path) -> None:
    text = MosquittoConfig(tmp_path, tls=True, client_certs=True, run_as_root=False).render()
    for line in (
        f"cafile {tmp_path.absolute() / 'tls' / 'ca.crt'}",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        "allow_anonymous false",
        f"acl_file {tmp_path.absolute() / 'acl'}",
    ):
        assert line in text.splitlines()
    assert "password_file" not in text  # identities come from certificates only


def test_gen_certs_device_issues_a_certificate_named_by_the_device(tmp_path: Path) -> None:
    run = [*CLI, "broker", "gen-certs", "--config-dir", str(tmp_path)]
    early = subprocess.run([*run, "--device", "cam-7"], capture_output=True, text=True, timeout=60)
    assert early.returncode == 1 and "gen-certs" in early.stderr and "Traceback" not in early.stderr, early.stderr
    assert subprocess.run(run, capture_output=True, timeout=60).returncode == 0  # the CA first
    done = subprocess.run([*run, "--device", "cam-7", "--coordinator"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    crt, key = tmp_path / "tls" / "clients" / "cam-7.crt", tmp_path / "tls" / "clients" / "cam-7.key"
    subject = subprocess.run(["openssl", "x509", "-in", str(crt), "-noout", "-subject", "-ext", "extendedKeyUsage"],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "CN = cam-7" in subject or "CN=cam-7" in subject, subject
    assert "TLS Web Client Authentication" in subject
    assert key.stat().st_mode & 0o777 == 0o600
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "tls" / "ca.crt"), str(crt)],
                            capture_output=True, text=True)  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert (tmp_path / "tls" / "clients" / "coordinator.crt").exists()
    again = subprocess.run([*run, "--device", "cam-7"], capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "--force" in again.stderr  # never overwritten silently
    reserved = subprocess.run([*run, "--device", "watcher"], capture_output=True, text=True, timeout=60)
    assert reserved.returncode == 1 and reserved.stderr.startswith("fedmqtt broker: error: --device"), reserved.stderr


def test_issuing_without_the_ca_key_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match="gen-certs"):
        issue_client_certificate(tmp_path / "tls", "dev-1")


# --- refused clients ------------------------------------------------------------------------------------


# A refused certificate never connects: connect() tries until its timeout, then asks the broker why (a TLS probe
# with its own timeout), so the refusal says the same with a 1-second timeout as with a longer one.


def test_a_client_without_a_certificate_is_refused_clearly(cert_broker: CertBroker) -> None:
    with pytest.raises(TlsError, match=r"requires a client certificate: .*--tls-cert"):
        MqttConnection(cert_broker.settings(None).client_settings("no-cert")).connect(timeout=1)


def test_a_certificate_from_another_ca_is_refused_clearly(cert_broker: CertBroker) -> None:
    with pytest.raises(TlsError, match=r"refused the client certificate --tls-cert .*dev-1\.crt .*UNKNOWN_CA"):
        MqttConnection(cert_broker.settings(cert_broker.foreign).client_settings("foreign")).connect(timeout=1)


@pytest.mark.e2e
@pytest.mark.parametrize("which", ["none", "foreign"])
def test_the_device_command_is_refused_in_one_line(cert_broker: CertBroker, tiny_data: Path, which: str) -> None:
    cert = None if which == "none" else cert_broker.foreign
    argv = [*CLI, "device", *cert_broker.cert_flags(cert), "--job", "refused", "--prefix", PREFIX, "--id", "dev-1",
            "--data-dir", str(tiny_data), "--connect-timeout", "1"]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    expected = "requires a client certificate" if which == "none" else "refused the client certificate"
    assert lines[0].startswith("fedmqtt device: error: ") and expected in lines[0], lines[0]


# --- a device with its own certificate ---------------------------------------------------------------------


def test_with_its_own_certificate_a_device_publishes_only_as_itself(cert_broker: CertBroker) -> None:
    topics = Topics(job="spoof", prefix=PREFIX)
    dev1, dev2 = cert_broker.cert("device", "dev-1"), cert_broker.cert("device", "dev-2")
    with MqttConnection(cert_broker.settings(dev2).client_settings("dev-2")) as victim:
        # dev-1's certificate, sending dev-2's client id: the broker makes the client id the certificate's name,
        # so dev-2's connection is not taken over.
        with MqttConnection(cert_broker.settings(dev1).client_settings("fedmqtt-spoof-dev-2")) as conn:
            assert conn.protocol == "5"
            status = DeviceStatus(device="dev-1", state="online")
            conn.publish(topics.device_status("dev-1"), to_json(status), qos=1, retain=True, timeout=10)
            conn.publish(topics.update("dev-1"), b"frame", qos=1, timeout=10)
            with pytest.raises(PublishRefused):
                conn.publish(topics.update("dev-2"), b"forged", qos=1, timeout=10)
            with pytest.raises(PublishRefused):
                forged = DeviceStatus(device="dev-2", state="offline")
                conn.publish(topics.device_status("dev-2"), to_json(forged), qos=1, retain=True, timeout=10)
            with pytest.raises(PublishRefused):
                conn.publish(topics.plan, b"{}", qos=1, timeout=10)  # only the coordinator writes plans
        assert victim.is_connected and victim.reconnects == 0
        victim.publish(topics.update("dev-2"), b"frame", qos=1, timeout=10)


@pytest.mark.e2e
def test_a_device_and_a_coordinator_with_certificates_complete_a_round(
    cert_broker: CertBroker, tiny_data: Path, tmp_path: Path
) -> None:
    coordinator = cert_broker.cert("coordinator")
    device = cert_broker.cert("device", "cam-1")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("FEDMQTT_PASSWORD", None)
    coordinator_argv = [*CLI, "coordinator", *cert_broker.cert_flags(coordinator), "--job", "round",
                        "--prefix", PREFIX, "--rounds", "1", "--min-updates", "1", "--round-timeout", "90",
                        "--model", "mlp", "--batch-size", "20", "--quiet"]  # fmt: skip
    device_argv = [*CLI, "-v", "device", *cert_broker.cert_flags(device), "--job", "round", "--prefix", PREFIX,
                   "--id", "cam-1", "--data-dir", str(tiny_data), "--threads", "1", "--exit-on-finish",
                   "--state-dir", str(tmp_path / "state")]  # fmt: skip
    logs = {name: open(tmp_path / f"{name}.log", "wb") for name in ("coordinator", "device")}  # noqa: SIM115
    procs = {
        "coordinator": subprocess.Popen(coordinator_argv, stdout=logs["coordinator"], stderr=subprocess.STDOUT,
                                        env=env, start_new_session=True),
        "device": subprocess.Popen(device_argv, stdout=logs["device"], stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True),
    }  # fmt: skip

    def text(name: str) -> str:
        return (tmp_path / f"{name}.log").read_text(errors="replace")

    try:
        for name in ("coordinator", "device"):
            try:
                code = procs[name].wait(180)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name} did not finish:\n" + "\n".join(f"--- {n}:\n{text(n)[-3000:]}" for n in procs))
            assert code == 0, f"{name} exited {code}:\n{text(name)[-3000:]}"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for handle in logs.values():
            handle.close()
    assert "cam-1: round 1 sent" in text("device"), text("device")
    assert "Traceback" not in text("coordinator") + text("device")


def test_the_broker_command_serves_client_certificates(tmp_path: Path) -> None:
    require_mosquitto()
    config_dir = tmp_path / "broker"
    assert subprocess.run([*CLI, "broker", "gen-certs", "--config-dir", str(config_dir)], capture_output=True,
                          timeout=60).returncode == 0  # fmt: skip
    assert subprocess.run([*CLI, "broker", "gen-certs", "--config-dir", str(config_dir), "--device", "d1"],
                          capture_output=True, timeout=60).returncode == 0  # fmt: skip
    port = find_free_port()
    proc = subprocess.Popen(
        [*CLI, "broker", "--mosquitto", "--tls", "--client-certs", "--config-dir", str(config_dir), "--port",
         str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once the broker serves (the probe saw it ask for a certificate)
        assert "listening on mqtts://127.0.0.1:" in line, line + (proc.stderr.read() if proc.poll() else "")
        tls = config_dir / "tls"
        settings = BrokerSettings.model_validate(
            {"broker": f"mqtts://127.0.0.1:{port}", "tls_ca": tls / "ca.crt",
             "tls_cert": tls / "clients" / "d1.crt", "tls_key": tls / "clients" / "d1.key"},
            context={"env": {}},
        )  # fmt: skip
        with MqttConnection(settings.client_settings("d1")) as conn:
            conn.publish(Topics(job="j").update("d1"), b"x", qos=1, timeout=10)
        context = ssl.create_default_context(cafile=str(tls / "ca.crt"))
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises(ssl.SSLError), socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            context.wrap_socket(sock, server_hostname="127.0.0.1")  # no certificate: the handshake fails
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0


def test_a_key_without_a_certificate_and_a_certificate_on_plain_mqtt_are_refused(cert_broker: CertBroker) -> None:
    dev = cert_broker.cert("device", "dev-3")
    with pytest.raises(ValueError, match="tls_key"):
        BrokerSettings.model_validate({"broker": cert_broker.url, "tls_key": dev.key})
    with pytest.raises(ValueError, match="not a TLS URL"):
        BrokerSettings.model_validate({"broker": "mqtt://127.0.0.1:1883", "tls_cert": dev.cert, "tls_key": dev.key})
    with pytest.raises(ValueError, match="not a PEM certificate and its unencrypted private key"):
        other = cert_broker.cert("device", "dev-4")
        BrokerSettings.model_validate({"broker": cert_broker.url, "tls_cert": dev.cert, "tls_key": other.key})
    # The pair travels to child processes as flags (paths, never the key itself).
    args = cert_broker.settings(dev).child_args()
    assert args[args.index("--tls-cert") + 1] == str(dev.cert) and args[args.index("--tls-key") + 1] == str(dev.key)
