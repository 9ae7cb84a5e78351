#!/usr/bin/env bash
# One command for the walkthrough (docs/azure-walkthrough.md): builds and
# starts the Azure IoT Hub emulator and para-host wired to it, then prints
# the commands to try. Ctrl-C stops both.
#
#   bash examples/emulator-demo.sh           # the emulator over plain HTTP (loopback)
#   bash examples/emulator-demo.sh --tls     # over HTTPS, trusting the emulator's CA
#
# PARA_DEMO_PORT sets the host's port (default 8080). Everything the demo
# writes (config, database, logs, env.sh) lives in one temporary directory
# that is removed on exit.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

tls=false
case "${1:-}" in
    "") ;;
    --tls) tls=true ;;
    *) echo "usage: $0 [--tls]" >&2; exit 2 ;;
esac
port="${PARA_DEMO_PORT:-8080}"

for tool in cargo curl openssl; do
    command -v "$tool" >/dev/null || { echo "emulator-demo: '$tool' is required" >&2; exit 2; }
done

work="$(mktemp -d "${TMPDIR:-/tmp}/para-demo.XXXXXX")"
emu_pid=""
host_pid=""
cleanup() {
    [[ -n "$host_pid" ]] && kill "$host_pid" 2>/dev/null || true
    [[ -n "$emu_pid" ]] && kill "$emu_pid" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "Building the emulator and the host (the first build compiles wasmtime: several minutes)..." >&2
cargo build -q -p azure-iot-hub-emulator -p para-host
target="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
bin="$target/debug"
emulator="$bin/azure-iot-hub-emulator"

# Waits until FILE holds a complete JSON line, or PID exits.
wait_ready() {
    local file="$1" pid="$2" what="$3" log="$4"
    for _ in $(seq 1 1200); do
        if grep -q '}' "$file" 2>/dev/null; then
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "emulator-demo: $what exited before it was ready; its log:" >&2
            cat "$log" >&2
            exit 1
        fi
        sleep 0.1
    done
    echo "emulator-demo: $what did not become ready; see $log" >&2
    exit 1
}

# A string field of the one-line JSON in FILE (empty if null or absent).
field() {
    sed -n "s/.*\"$2\":\"\([^\"]*\)\".*/\1/p" "$1" | head -n 1
}

# 1. The emulator, on an OS-assigned loopback port.
emu_args=(serve --listen 127.0.0.1:0)
if $tls; then
    emu_args+=(--tls --cert-dir "$work/certs")
fi
"$emulator" "${emu_args[@]}" >"$work/emulator.json" 2>"$work/emulator.log" &
emu_pid=$!
wait_ready "$work/emulator.json" "$emu_pid" "the emulator" "$work/emulator.log"
endpoint="$(field "$work/emulator.json" endpoint)"
hostname="$(field "$work/emulator.json" hostname)"
owner_key="$(field "$work/emulator.json" ownerKey)"
ca_file="$(field "$work/emulator.json" caFile)"
eh_cs="$(field "$work/emulator.json" eventHubConnectionString)"
eh_name="$(field "$work/emulator.json" eventHubName)"

# 2. The host's config, from the template; the root app gets a fresh secret.
secret="$(openssl rand -hex 24)"
sed -e "s|@APP_SECRET@|$secret|g" -e "s|@HOSTNAME@|$hostname|g" \
    -e "s|@OWNER_KEY@|$owner_key|g" -e "s|@ENDPOINT@|$endpoint|g" \
    -e "s|@EH_CONNECTION_STRING@|$eh_cs|g" -e "s|@EH_NAME@|$eh_name|g" \
    -e "s|@CA_FILE@|$ca_file|g" \
    examples/emulator.toml >"$work/para.toml"

# 3. The host (cargo run -p para-host -- serve, minus the rebuild check).
"$bin/para-host" serve --config "$work/para.toml" --listen "127.0.0.1:$port" \
    --db "$work/para.db" >"$work/host.json" 2>"$work/host.log" &
host_pid=$!
wait_ready "$work/host.json" "$host_pid" "para-host" "$work/host.log"
api="$(field "$work/host.json" listening)"

# A JWT for the root app (app:para), valid for 24 hours, as Para's clients
# send them: HS256 over the app's secret.
b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }
now="$(date +%s)"
jwt_header="$(printf '%s' '{"alg":"HS256","typ":"JWT"}' | b64url)"
jwt_claims="$(printf '{"appid":"app:para","iat":%d,"nbf":%d,"exp":%d}' "$now" "$((now - 5))" "$((now + 86400))" | b64url)"
jwt_sig="$(printf '%s' "$jwt_header.$jwt_claims" | openssl dgst -sha256 -hmac "$secret" -binary | b64url)"
token="$jwt_header.$jwt_claims.$jwt_sig"

device_flags="--endpoint $endpoint"
if [[ -n "$ca_file" ]]; then
    device_flags="--ca-file $ca_file"
fi

cat >"$work/env.sh" <<EOF
export PARA="$api"
export AUTH="Authorization: Bearer $token"
export EMULATOR="$endpoint"
export DEVICE_FLAGS="$device_flags"
emulator() { "$emulator" "\$@"; }
EOF

cat <<EOF

  Azure IoT Hub emulator: $endpoint (hub '$hostname')
  para-host:              $api  (broker "Azure" -> the emulator)
  logs:                   $work/host.log, $work/emulator.log

In another terminal, load the demo's settings:

  source $work/env.sh

Create a thing; the answer's deviceDetails carry the device's keys, once:

  curl -s -X POST "\$PARA/v1/things" -H "\$AUTH" -H 'Content-Type: application/json' \\
       -d '{"name":"MyThing","serviceBroker":"Azure"}'

Copy deviceDetails.connectionString and the thing's id from the answer, then
play the device and report its state:

  CS='<deviceDetails.connectionString>'
  emulator device --connection-string "\$CS" \$DEVICE_FLAGS report '{"temp":21}'

Within a second or so the thing's deviceState shows the report:

  curl -s "\$PARA/v1/things/<id>" -H "\$AUTH"

Send state the other way (it lands in the device twin's desired properties):

  curl -s -X PATCH "\$PARA/v1/things/<id>" -H "\$AUTH" -H 'Content-Type: application/json' \\
       -d '{"deviceState":{"temp":19,"mode":"eco"}}'
  curl -s "\$EMULATOR/_emulator/devices"${ca_file:+ --cacert $ca_file}

Delete it (the device goes too):

  curl -s -X DELETE "\$PARA/v1/things/<id>" -H "\$AUTH"

Ctrl-C stops the host and the emulator.
EOF

wait "$host_pid"
