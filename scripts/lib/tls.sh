# shellcheck shell=bash
# A TLS listener on the local broker, for the TLS tests (scripts/test). Source
# this file after scripts/lib/broker.sh (it needs `log`, `amqp_host`,
# `with_broker_lock`), then:
#
#   tls_setup     generates the test PKI into $tls_dir when it is missing or
#                 about to expire, and makes the broker serve it on port 5671
#                 with client certificates verified and EXTERNAL authentication
#                 on (advanced.config, written only when no other one exists;
#                 the rabbitmq_auth_mechanism_ssl plugin in enabled_plugins; the
#                 user rebound-tls-client, without a password); restarts the
#                 broker only when it does not serve that already (10-20 s).
#                 Takes the broker lock exclusively. Exports AMQPS_URL and
#                 REBOUND_TLS_DIR. Returns 1 when it cannot.
#   tls_restore   puts the broker's configuration files (advanced.config,
#                 enabled_plugins) back as they were; call it from an EXIT trap.
#                 The running broker keeps its TLS listener, and the plugin, until
#                 its next restart: another restart would cost 10-20 s more, and
#                 another test run may be using them; the next tls_setup finds
#                 the broker serving and does not restart it again.
#
# The PKI, all of it test material with no secret worth keeping (keys are left
# readable so the broker, running as another user, can read its own):
#   ca.pem, ca.key                  the test CA
#   server.pem, server.key          the broker: localhost, 127.0.0.1, ::1
#   expired.pem, expired.key        the broker for SNI name expired.rebound.test,
#                                   valid only in January 2020
#   client.pem, client.key          a client certificate, CN rebound-tls-client
#                                   (the broker user EXTERNAL logs in as)
#   rogue-ca.pem, rogue-client.pem, rogue-client.key
#                                   a client certificate from a CA the broker
#                                   does not trust
# It lives in one place for every run (REBOUND_TLS_DIR, default
# $TMPDIR/amqp-rebound-tls), so that two runs side by side use the same
# certificates as the one broker.

tls_dir="${REBOUND_TLS_DIR:-${TMPDIR:-/tmp}/amqp-rebound-tls}"
tls_port=5671
tls_user=rebound-tls-client
tls_advanced="${RABBITMQ_ADVANCED_CONFIG_FILE:-/etc/rabbitmq/advanced.config}"
tls_plugins="${RABBITMQ_ENABLED_PLUGINS_FILE:-/etc/rabbitmq/enabled_plugins}"
# first line of the files this script writes, so that it never takes someone
# else's file for its own
tls_marker="%% written by amqp-rebound scripts/lib/tls.sh"
tls_saved_plugins=

# Generates the PKI into a fresh directory and moves it into place.
tls_generate() {
  local d; d="$(mktemp -d "${tls_dir}.new.XXXXXX")" || return 1
  (
    set -e
    cd "$d"
    key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
    # sign NAME CA SUBJECT EXTENSIONS: NAME.pem from NAME.key, valid 30 days
    sign() {
      openssl req -new -key "$1.key" -subj "$3" -out "$1.csr" 2>/dev/null
      openssl x509 -req -in "$1.csr" -CA "$2.pem" -CAkey "$2.key" -CAcreateserial \
        -days 30 -out "$1.pem" -extfile <(printf '%b' "$4") 2>/dev/null
    }
    ca() {
      key "$1.key"
      openssl req -x509 -new -key "$1.key" -days 30 -subj "$2" -out "$1.pem" \
        -addext 'basicConstraints=critical,CA:TRUE' \
        -addext 'keyUsage=critical,keyCertSign,cRLSign' 2>/dev/null
    }
    ca ca '/CN=amqp-rebound test CA'
    ca rogue-ca '/CN=amqp-rebound rogue CA'
    key server.key
    sign server ca '/CN=localhost' \
      'subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n'
    key client.key
    sign client ca "/CN=$tls_user" 'extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n'
    key rogue-client.key
    sign rogue-client rogue-ca "/CN=$tls_user" 'extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n'
    # An expired certificate needs explicit dates, which only `openssl ca` takes
    # in OpenSSL 3.0.
    key expired.key
    openssl req -new -key expired.key -subj '/CN=expired.rebound.test' \
      -addext 'subjectAltName=DNS:expired.rebound.test' -out expired.csr 2>/dev/null
    mkdir db && touch db/index.txt && echo 01 >db/serial
    printf '%s\n' '[ca]' 'default_ca = test' '[test]' 'dir = ./db' \
      'database = $dir/index.txt' 'serial = $dir/serial' 'new_certs_dir = $dir' \
      'default_md = sha256' 'policy = any' 'copy_extensions = copy' 'unique_subject = no' \
      '[any]' 'commonName = supplied' >db/ca.cnf
    openssl ca -batch -config db/ca.cnf -cert ca.pem -keyfile ca.key -in expired.csr \
      -out expired.pem -startdate 20200101000000Z -enddate 20200201000000Z -notext 2>/dev/null
    rm -rf db ./*.csr ./*.srl
    chmod 0755 .
    chmod 0644 ./*
  ) || { rm -rf "$d"; return 1; }
  rm -rf "$tls_dir"
  mv "$d" "$tls_dir"
}

# The PKI is there and none of it expires within two days.
tls_pki_fresh() {
  local f
  for f in ca server client rogue-client; do
    [ -s "$tls_dir/$f.pem" ] && [ -s "$tls_dir/$f.key" ] || return 1
    openssl x509 -checkend 172800 -noout -in "$tls_dir/$f.pem" >/dev/null 2>&1 || return 1
  done
  [ -s "$tls_dir/expired.pem" ] && [ -s "$tls_dir/rogue-ca.pem" ]
}

# The broker serves this PKI's server certificate on the TLS port.
tls_serving() {
  local served ours
  served="$(openssl s_client -connect "127.0.0.1:$tls_port" -servername localhost \
    </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256 2>/dev/null)" || return 1
  ours="$(openssl x509 -noout -fingerprint -sha256 -in "$tls_dir/server.pem")"
  [ -n "$served" ] && [ "$served" = "$ours" ]
}

# The broker offers EXTERNAL: the mechanism is configured and its plugin runs.
# (`rabbitmqctl start_app`, which the broker-restart tests use, keeps the
# listeners and mechanisms the node booted with, but starts only the plugins
# the enabled plugins file lists then.)
tls_external_on() {
  [ "$(rabbitmqctl -q eval "lists:member('EXTERNAL', element(2, application:get_env(rabbit, auth_mechanisms))) andalso lists:keymember(rabbitmq_auth_mechanism_ssl, 1, application:which_applications())." 2>/dev/null)" = true ]
}

tls_write_config() {
  cat >"$tls_advanced" <<EOF
$tls_marker (for the TLS tests; tls_restore removes it)
[{rabbit, [
  {ssl_listeners, [$tls_port]},
  {ssl_options, [
    {cacertfile, "$tls_dir/ca.pem"},
    {certfile, "$tls_dir/server.pem"},
    {keyfile, "$tls_dir/server.key"},
    {verify, verify_peer},
    {fail_if_no_peer_cert, false},
    {sni_hosts, [{"expired.rebound.test", [
      {certfile, "$tls_dir/expired.pem"},
      {keyfile, "$tls_dir/expired.key"}]}]}
  ]},
  {auth_mechanisms, ['PLAIN', 'AMQPLAIN', 'EXTERNAL']},
  {ssl_cert_login_from, common_name}
]}].
EOF
}

# Enables the EXTERNAL plugin in the enabled plugins file (with `online`, on
# the running node too), keeping the file as it was for tls_restore.
tls_enable_plugin() {
  if [ -z "$tls_saved_plugins" ]; then
    tls_saved_plugins=absent
    if [ -e "$tls_plugins" ]; then
      tls_saved_plugins="$(mktemp)" && cp -p "$tls_plugins" "$tls_saved_plugins" || return 1
    fi
  fi
  if [ "${1:-}" = online ]; then
    rabbitmq-plugins -q enable rabbitmq_auth_mechanism_ssl >/dev/null
  else
    rabbitmq-plugins -q --offline enable rabbitmq_auth_mechanism_ssl >/dev/null
  fi
}

tls_restart_broker() {
  log "restarting the broker with a TLS listener on $tls_port"
  rabbitmqctl -q stop >/dev/null 2>&1 || true
  without_lock_fds rabbitmq-server -detached || true
  # await_startup fails at once while the new node has not registered yet
  local _
  for _ in $(seq 1 60); do
    rabbitmqctl -q await_startup --timeout 5 >/dev/null 2>&1 && return 0
    sleep 1
  done
  return 1
}

tls_setup_locked() {
  if ! is_local; then
    log "the broker is not local: no TLS listener can be set up"; return 1
  fi
  command -v openssl >/dev/null 2>&1 || { log "openssl is not installed"; return 1; }
  if ! tls_pki_fresh; then
    log "generating the test PKI in $tls_dir"
    tls_generate || { log "could not generate the test PKI"; return 1; }
  fi
  if ! tls_serving; then
    if [ -e "$tls_advanced" ] && ! head -n1 "$tls_advanced" | grep -qF "$tls_marker"; then
      log "$tls_advanced exists and is not ours: not replacing it"; return 1
    fi
    { tls_write_config && tls_enable_plugin; } ||
      { log "could not write the broker's TLS configuration"; return 1; }
    tls_restart_broker || { log "the broker did not come back"; return 1; }
    tls_serving || { log "the broker does not serve TLS on $tls_port"; return 1; }
  fi
  # The plugin must be in the file for as long as the tests run, running or not:
  # the broker-restart cases' start_app drops a plugin the file does not list.
  if ! grep -qs rabbitmq_auth_mechanism_ssl "$tls_plugins"; then
    tls_enable_plugin || { log "could not enable rabbitmq_auth_mechanism_ssl"; return 1; }
  fi
  if ! tls_external_on; then
    log "enabling the EXTERNAL authentication plugin"
    tls_enable_plugin online || { log "could not enable rabbitmq_auth_mechanism_ssl"; return 1; }
  fi
  tls_external_on || { log "the broker does not offer EXTERNAL"; return 1; }
  # the user EXTERNAL logs in as (its certificate's CN), without a password
  if ! rabbitmqctl -q list_users 2>/dev/null | grep -q "^$tls_user[[:space:]]"; then
    rabbitmqctl -q add_user "$tls_user" "$(openssl rand -hex 16)" >/dev/null &&
      rabbitmqctl -q clear_password "$tls_user" >/dev/null || return 1
  fi
  rabbitmqctl -q set_permissions -p / "$tls_user" '.*' '.*' '.*' >/dev/null
}

tls_setup() {
  with_broker_lock tls_setup_locked || return 1
  export REBOUND_TLS_DIR="$tls_dir"
  export AMQPS_URL="amqps://guest:guest@localhost:$tls_port/%2f"
}

tls_restore() {
  if [ -e "$tls_advanced" ] && head -n1 "$tls_advanced" | grep -qF "$tls_marker"; then
    rm -f "$tls_advanced"
  fi
  case "$tls_saved_plugins" in
    '') ;;
    absent) rm -f "$tls_plugins" ;;
    *) cp -p "$tls_saved_plugins" "$tls_plugins" && rm -f "$tls_saved_plugins" ;;
  esac
  tls_saved_plugins=
}
