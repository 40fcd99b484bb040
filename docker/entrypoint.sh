#!/bin/sh
# fedmqtt container entrypoint (the image's ENTRYPOINT): ROLE [more flags for that role].
#
#   broker       create the broker accounts that are missing (coordinator, watcher and every id in
#                $FEDMQTT_DEVICES), each password in $FEDMQTT_SECRETS_DIR/NAME, then run
#                `fedmqtt broker --mosquitto --auth` on $FEDMQTT_BROKER_DIR (Mosquitto with the generated ACL)
#   accounts     only the account step of `broker`
#   coordinator  `fedmqtt coordinator`: every setting comes from its FEDMQTT_* variables (docs/configuration.md)
#   device       `fedmqtt device`, its flags from the FEDMQTT_* variables below
#   other        `fedmqtt ARGS...` (e.g. `watch`, `--help`)
#
# Variables (besides the coordinator's own): FEDMQTT_BROKER_DIR, FEDMQTT_SECRETS_DIR, FEDMQTT_STATE_DIR,
# FEDMQTT_DEVICES (ids, separated by spaces or commas), FEDMQTT_LISTEN_HOST (0.0.0.0), FEDMQTT_LISTEN_PORT (1883),
# FEDMQTT_MAX_PACKET_MB, FEDMQTT_PREFIX; for a device FEDMQTT_BROKER, FEDMQTT_JOB, FEDMQTT_DEVICE_ID (also its
# account), FEDMQTT_PASSWORD_FILE (default $FEDMQTT_SECRETS_DIR/ID), FEDMQTT_DATA (the data directory),
# FEDMQTT_DATASET, FEDMQTT_PARTITION, FEDMQTT_NUM_PARTS, FEDMQTT_PART, FEDMQTT_SEED, FEDMQTT_THREADS,
# FEDMQTT_PRIVACY_BUDGET, FEDMQTT_TLS_CA, FEDMQTT_MQTT_VERSION. A device keeps its state in $FEDMQTT_STATE_DIR/ID.
#
# Each role ends in `exec`, so fedmqtt itself receives the container's SIGTERM.
set -eu

die() {
    echo "fedmqtt-entrypoint: $*" >&2
    exit 2
}

need() { # need NAME: the variable must be set and not empty
    eval "value=\${$1:-}"
    [ -n "$value" ] || die "set $1 (see docker/entrypoint.sh and the README's Containers section)"
}

accounts() {
    need FEDMQTT_BROKER_DIR
    need FEDMQTT_SECRETS_DIR
    umask 077
    mkdir -p "$FEDMQTT_BROKER_DIR" "$FEDMQTT_SECRETS_DIR"
    passwd="$FEDMQTT_BROKER_DIR/passwd"
    for name in coordinator watcher $(printf '%s' "${FEDMQTT_DEVICES:-}" | tr ',' ' '); do
        secret="$FEDMQTT_SECRETS_DIR/$name"
        known=0
        if [ -s "$secret" ] && [ -f "$passwd" ] && cut -d: -f1 "$passwd" | grep -qxF "$name"; then
            known=1
        fi
        [ "$known" = 1 ] && continue
        if [ ! -s "$secret" ]; then
            python -c 'import secrets; print(secrets.token_urlsafe(18))' >"$secret.tmp"
            mv "$secret.tmp" "$secret"
        fi
        case "$name" in
            coordinator | watcher) set -- "add-$name" ;;
            *) set -- add-device "$name" ;;
        esac
        fedmqtt broker "$@" --config-dir "$FEDMQTT_BROKER_DIR" --password-file "$secret" >/dev/null \
            || die "could not create the account $name"
        echo "fedmqtt-entrypoint: account $name created (password in $secret)"
    done
}

role="${1:-}"
[ $# -gt 0 ] && shift

case "$role" in
    accounts)
        accounts
        ;;
    broker)
        accounts
        set -- broker --mosquitto --auth --config-dir "$FEDMQTT_BROKER_DIR" \
            --host "${FEDMQTT_LISTEN_HOST:-0.0.0.0}" --port "${FEDMQTT_LISTEN_PORT:-1883}" \
            --prefix "${FEDMQTT_PREFIX:-fedmqtt}" ${FEDMQTT_MAX_PACKET_MB:+--max-packet-mb "$FEDMQTT_MAX_PACKET_MB"} "$@"
        exec fedmqtt "$@"
        ;;
    coordinator)
        exec fedmqtt coordinator "$@"
        ;;
    device)
        need FEDMQTT_BROKER
        need FEDMQTT_JOB
        need FEDMQTT_DEVICE_ID
        id="$FEDMQTT_DEVICE_ID"
        password_file="${FEDMQTT_PASSWORD_FILE:-${FEDMQTT_SECRETS_DIR:-}/$id}"
        extra=$# # the command's own flags go last, so they can add to these
        set -- "$@" device --broker "$FEDMQTT_BROKER" --job "$FEDMQTT_JOB" --id "$id" --username "$id" \
            --prefix "${FEDMQTT_PREFIX:-fedmqtt}"
        [ -f "$password_file" ] && set -- "$@" --password-file "$password_file"
        if [ -n "${FEDMQTT_STATE_DIR:-}" ]; then
            mkdir -p "$FEDMQTT_STATE_DIR/$id"
            set -- "$@" --state-dir "$FEDMQTT_STATE_DIR/$id"
        fi
        [ -n "${FEDMQTT_DATASET:-}" ] && set -- "$@" --dataset "$FEDMQTT_DATASET"
        [ -n "${FEDMQTT_PARTITION:-}" ] && set -- "$@" --partition "$FEDMQTT_PARTITION"
        [ -n "${FEDMQTT_NUM_PARTS:-}" ] && set -- "$@" --num-parts "$FEDMQTT_NUM_PARTS"
        [ -n "${FEDMQTT_PART:-}" ] && set -- "$@" --part "$FEDMQTT_PART"
        [ -n "${FEDMQTT_SEED:-}" ] && set -- "$@" --seed "$FEDMQTT_SEED"
        [ -n "${FEDMQTT_THREADS:-}" ] && set -- "$@" --threads "$FEDMQTT_THREADS"
        [ -n "${FEDMQTT_PRIVACY_BUDGET:-}" ] && set -- "$@" --privacy-budget "$FEDMQTT_PRIVACY_BUDGET"
        [ -n "${FEDMQTT_TLS_CA:-}" ] && set -- "$@" --tls-ca "$FEDMQTT_TLS_CA"
        [ -n "${FEDMQTT_MQTT_VERSION:-}" ] && set -- "$@" --mqtt-version "$FEDMQTT_MQTT_VERSION"
        while [ "$extra" -gt 0 ]; do # move the command's flags behind the generated ones
            set -- "$@" "$1"
            shift
            extra=$((extra - 1))
        done
        exec fedmqtt "$@"
        ;;
    "")
        exec fedmqtt --help
        ;;
    *)
        exec fedmqtt "$role" "$@"
        ;;
esac
