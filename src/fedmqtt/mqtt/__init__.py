"""fedmqtt's MQTT layer (paho-mqtt 2.x). Import from here: ``from fedmqtt.mqtt import MqttConnection``.

* :mod:`fedmqtt.mqtt.errors`: the error types (all :class:`MqttError`);
* :mod:`fedmqtt.mqtt.url`: broker URLs, parsed once into :class:`BrokerURL`;
* :mod:`fedmqtt.mqtt.topic_names`: valid topic names and filters, and matching;
* :mod:`fedmqtt.mqtt.settings`: the broker flags (:class:`BrokerSettings`, :func:`add_broker_flags`) and the
  settings of one connection (:class:`ClientSettings`, :class:`Will`);
* :mod:`fedmqtt.mqtt.connection`: :class:`MqttConnection`, the process-wide connection budget and the cache of
  the protocol each broker speaks;
* :mod:`fedmqtt.mqtt.netloop`: :class:`NetworkLoop`, one network thread for many connections (epoll).
"""

from fedmqtt.mqtt.connection import (
    CONNECTION_BUDGET,
    DEFAULT_MAX_PACKET_SIZE,
    MAX_CLIENTS_PER_PROCESS,
    PROTOCOLS,
    SELECT_FD_LIMIT,
    ConnectionBudget,
    MessageCallback,
    MqttConnection,
    ProtocolCache,
)
from fedmqtt.mqtt.errors import (
    AuthenticationRefused,
    BrokerUnreachable,
    ConnectionRefused,
    InvalidBrokerURL,
    InvalidTopic,
    MqttError,
    NotConnected,
    PayloadTooLarge,
    ProtocolUnsupported,
    PublishRefused,
    PublishTimeout,
    SubscriptionRefused,
    TlsError,
    TooManyClients,
    mask_password,
)
from fedmqtt.mqtt.netloop import NetworkLoop, max_clients_per_process, raise_fd_limit
from fedmqtt.mqtt.settings import (
    BROKER_FLAGS,
    DEFAULT_BROKER,
    PASSWORD_ENV,
    BrokerSettings,
    BrokerUrlField,
    ClientSettings,
    MqttVersionField,
    PasswordField,
    PasswordFileField,
    ProtocolName,
    TlsCaField,
    UsernameField,
    Will,
    add_broker_flags,
    broker_settings_from_args,
    check_tls_ca,
    read_password_file,
    tls_ca_problem,
    tls_cert_problem,
)
from fedmqtt.mqtt.topic_names import topic_matches, validate_topic_filter, validate_topic_name
from fedmqtt.mqtt.url import DEFAULT_PORT, DEFAULT_TLS_PORT, BrokerURL, parse_broker_url

__all__ = [
    "BROKER_FLAGS",
    "CONNECTION_BUDGET",
    "DEFAULT_BROKER",
    "DEFAULT_MAX_PACKET_SIZE",
    "DEFAULT_PORT",
    "DEFAULT_TLS_PORT",
    "MAX_CLIENTS_PER_PROCESS",
    "PASSWORD_ENV",
    "PROTOCOLS",
    "SELECT_FD_LIMIT",
    "AuthenticationRefused",
    "BrokerSettings",
    "BrokerURL",
    "BrokerUnreachable",
    "BrokerUrlField",
    "ClientSettings",
    "ConnectionBudget",
    "ConnectionRefused",
    "InvalidBrokerURL",
    "InvalidTopic",
    "MessageCallback",
    "MqttConnection",
    "MqttError",
    "MqttVersionField",
    "NetworkLoop",
    "NotConnected",
    "PasswordField",
    "PasswordFileField",
    "PayloadTooLarge",
    "ProtocolCache",
    "ProtocolName",
    "ProtocolUnsupported",
    "PublishRefused",
    "PublishTimeout",
    "SubscriptionRefused",
    "TlsCaField",
    "TlsError",
    "TooManyClients",
    "UsernameField",
    "Will",
    "add_broker_flags",
    "broker_settings_from_args",
    "check_tls_ca",
    "mask_password",
    "max_clients_per_process",
    "parse_broker_url",
    "raise_fd_limit",
    "read_password_file",
    "tls_ca_problem",
    "tls_cert_problem",
    "topic_matches",
    "validate_topic_filter",
    "validate_topic_name",
]
