"""Small network helpers shared by both brokers: free ports and a readiness probe that really speaks MQTT."""

from __future__ import annotations

import socket
import ssl
import threading
import time
import uuid

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it). Another process could take it before the
    broker binds it; the runners retry with a new port when that happens."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def probe_host(host: str) -> str:
    """Where to connect to reach a broker bound to ``host`` (a wildcard bind is reached on loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def mqtt_probe(host: str, port: int, *, tls: bool = False, timeout: float = 2.0, client_certs: bool = False) -> bool:
    """True if an MQTT broker answers a CONNECT on ``host:port`` with any CONNACK, even a refusal: that proves
    it is serving. With ``tls`` the certificate is not verified (this only asks "is it up?").

    ``client_certs``: the broker requires a client certificate, which the probe has not got; a TLS server that
    asks for one during the handshake (TLS 1.2, where the request is part of the handshake) counts as up."""
    if tls and client_certs:
        return _demands_client_certificate(host, port, timeout)
    answered = threading.Event()
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"fedmqtt-probe-{uuid.uuid4().hex[:12]}", protocol=paho.MQTTv311
    )
    client.on_connect = lambda *_args: answered.set()
    if tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        client.tls_set_context(context)
    client.connect_timeout = timeout
    deadline = time.monotonic() + timeout
    try:
        client.connect(host, port, keepalive=10)
        while not answered.is_set() and time.monotonic() < deadline:
            if client.loop(timeout=0.05) != paho.MQTT_ERR_SUCCESS:
                break
        return answered.is_set()
    except (OSError, ValueError):
        return False
    finally:
        client.disconnect()
        sock = client.socket()
        if sock is not None:
            sock.close()


def _demands_client_certificate(host: str, port: int, timeout: float) -> bool:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.maximum_version = ssl.TLSVersion.TLSv1_2  # TLS 1.3 would finish the handshake and close afterwards
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock, context.wrap_socket(sock):
            return False  # a server that let us in without a certificate is not the one we wait for
    except ssl.SSLError as exc:
        return exc.reason in ("SSLV3_ALERT_HANDSHAKE_FAILURE", "TLSV13_ALERT_CERTIFICATE_REQUIRED")
    except (OSError, ValueError):
        return False
