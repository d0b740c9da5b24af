#!/usr/bin/env bash
# deploy.sh: install or upgrade d3-api on this host, from the source tree this script is in.
# Run as root. Idempotent: running it again with the same source changes nothing and restarts
# nothing; with a new source it upgrades (next month's `git pull && sudo ./deploy.sh`).
#
#   sudo ./check_deployment.sh && sudo ./deploy.sh --domain d3.example.org
#
# Layout (APP_DIR=/opt/d3-api):
#   releases/<id>/   the code of one version (id = hash of the source), read-only for the service
#   current          -> releases/<id>, switched atomically when everything else succeeded
#   .venv/ .env instance/ logs/ .cache/ bin/d3   shared by all releases
#
# A failed step stops the deploy with what failed and how to retry. Nothing the running
# service uses is changed before the "activate" step; if the new version then fails its health
# check, the previous release (and unit file) are put back and restarted.
set -Eeuo pipefail

usage() {
    cat <<'EOF'
Usage: deploy.sh [options]

Options:
  --domain NAME     public host name for nginx and its certificate (remembered for later runs)
  --skip-weights    do not run `d3 fetch-weights` (weights copied in by hand, or a test setup)
  --with-text-weights
                    fetch the text detector's two language models too (about 20 GB); by
                    default only image (D3, also video) and audio (AASIST) weights are fetched
  --no-nginx        do not install or configure nginx (TLS ends elsewhere)
  --prefix DIR      install under DIR (DIR/opt/d3-api, DIR/etc/...), paths rewritten to match;
                    steps that need root, systemd or the real system (user, packages,
                    systemctl, nginx reload, health check) are skipped and listed
  --dry-run         print every step and what it would do; change nothing
  --no-preflight    do not run check_deployment.sh first
  -h, --help        this help

Environment: D3_SMOKE_TIMEOUT (seconds to wait for /health, default 600), D3_KEEP_RELEASES
(default 3), D3_TORCH_INDEX_URL (extra pip index for torch, e.g. a CPU-only build), D3_PYTHON
(interpreter for a new virtualenv, default python3).
EOF
}

SRC_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
# shellcheck source=/dev/null
. "$SRC_DIR/scripts/lib.sh"  # dotenv_get: the one .env reader, shared with check_deployment.sh
ORIG_ARGS=("$@")
SERVICE=d3-api
WORKER_SERVICE=d3-worker  # the video worker tier, installed when a job queue broker is configured
SERVICE_USER=d3
DOMAIN=""
PREFIX=""
DRY_RUN=0
SKIP_WEIGHTS=0
TEXT_WEIGHTS=0
NO_NGINX=0
PREFLIGHT=1
SMOKE_TIMEOUT="${D3_SMOKE_TIMEOUT:-600}"
KEEP_RELEASES="${D3_KEEP_RELEASES:-3}"
PYTHON="${D3_PYTHON:-python3}"

while [ $# -gt 0 ]; do
    case "$1" in
        --domain) DOMAIN="${2:?--domain needs a name}"; shift 2 ;;
        --domain=*) DOMAIN="${1#*=}"; shift ;;
        --prefix) PREFIX="${2:?--prefix needs a directory}"; shift 2 ;;
        --prefix=*) PREFIX="${1#*=}"; shift ;;
        --skip-weights) SKIP_WEIGHTS=1; shift ;;
        --with-text-weights) TEXT_WEIGHTS=1; shift ;;
        --no-nginx) NO_NGINX=1; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        --no-preflight) PREFLIGHT=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "deploy.sh: unknown option: $1 (see --help)" >&2; exit 2 ;;
    esac
done

if [ -n "$DOMAIN" ] && ! [[ "$DOMAIN" =~ ^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$ ]]; then
    echo "deploy.sh: --domain $DOMAIN is not a host name" >&2
    exit 2
fi
if [ -n "$PREFIX" ]; then
    PREFIX="$(realpath -m -- "$PREFIX")"
    PREFIX="${PREFIX%/}"
    [ "$PREFIX" != "" ] || { echo "deploy.sh: --prefix / is the real system: leave --prefix out" >&2; exit 2; }
fi
if [ -z "$PREFIX" ] && [ "$DRY_RUN" -eq 0 ] && [ "$(id -u)" -ne 0 ]; then
    echo "deploy.sh: run as root (sudo $0 ${ORIG_ARGS[*]}), or use --dry-run / --prefix DIR" >&2
    exit 2
fi

APP_DIR="$PREFIX/opt/d3-api"
VENV="$APP_DIR/.venv"
SYSTEMD_DIR="$PREFIX/etc/systemd/system"
UNIT_PATH="$SYSTEMD_DIR/$SERVICE.service"
WORKER_UNIT_PATH="$SYSTEMD_DIR/$WORKER_SERVICE.service"
TIER_SERVICE=d3-inference
TIER_UNIT_PATH="$SYSTEMD_DIR/$TIER_SERVICE.service"
NGINX_DIR="$PREFIX/etc/nginx"
ACME_ROOT="$PREFIX/var/www/letsencrypt"
LE_DIR="$PREFIX/etc/letsencrypt/live"
TLS_DIR="$PREFIX/etc/d3-api/tls"
STATE_FILE="$APP_DIR/.deploy-state"

# --- output and step bookkeeping --------------------------------------------------------------
STEPS=(preflight packages user directories release venv env settings weights database unit nginx activate smoke cleanup)
STEP=""
STEP_N=0
SKIPPED=()
WARNINGS=()
ACTIVATED=0
RELEASE_ID=""
PREVIOUS_RELEASE=""
RESTART_NEEDED=0

step() {
    STEP=$1
    STEP_N=$((STEP_N + 1))
    printf '\n==> [%d/%d] %s: %s\n' "$STEP_N" "${#STEPS[@]}" "$1" "$2"
}
say() { printf '    %s\n' "$*"; }
warn() {
    printf '    WARN: %s\n' "$*"
    WARNINGS+=("$STEP: $*")
}
skip() {
    printf '    skipped: %s\n' "$*"
    SKIPPED+=("$STEP: $*")
}
quote() {
    local out="" arg
    for arg in "$@"; do
        if [[ "$arg" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
            out+=" $arg"
        else
            out+=" $(printf '%q' "$arg")"
        fi
    done
    printf '%s' "${out# }"
}
# run CMD...: execute and echo, or only print under --dry-run.
run() {
    if [ "$DRY_RUN" -eq 1 ]; then
        [ "$1" != quietly ] || shift
        printf '    would run: %s\n' "$(quote "$@")"
    else
        if [ "$1" = quietly ]; then
            printf '    + %s\n' "$(quote "${@:2}")"
        else
            printf '    + %s\n' "$(quote "$@")"
        fi
        "$@"
    fi
}
dry() { [ "$DRY_RUN" -eq 1 ]; }
quietly() { # run a chatty command; show its output only when it fails
    local out
    if ! out="$("$@" 2>&1)"; then
        printf '%s\n' "$out" | tail -n 20 | sed 's/^/    /' >&2
        return 1
    fi
}
prefixed() { [ -n "$PREFIX" ]; }

on_error() {
    local rc=$?
    trap - ERR
    {
        printf '\ndeploy.sh: FAILED at step "%s" (exit %d).\n' "$STEP" "$rc"
        if [ "$ACTIVATED" -eq 0 ]; then
            printf '  Nothing the running service uses was changed: the current version keeps serving.\n'
        fi
        printf '  Fix the cause shown above, then re-run: %s\n' "$(quote "$0" "${ORIG_ARGS[@]}")"
        printf '  Re-running is safe: finished steps are recognised and not repeated.\n'
    } >&2
    exit "$rc"
}
trap on_error ERR
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

fail() { # fail MESSAGE: stop this step with a message (goes through on_error)
    printf '    ERROR: %s\n' "$*" >&2
    return 1
}

# install_file SRC DEST MODE: copy when the content differs; prints whether it changed.
install_file() {
    local src=$1 dest=$2 mode=$3
    if [ -f "$dest" ] && cmp -s "$src" "$dest"; then
        say "unchanged: $dest"
        return 1
    fi
    if dry; then
        say "would install: $dest (mode $mode)"
        return 0
    fi
    mkdir -p "$(dirname "$dest")"
    install -m "$mode" "$src" "$dest"
    say "installed: $dest"
    return 0
}

# install_unit STAGED DEST BACKUP: keep the installed unit as BACKUP (for a rollback), then
# install_file; returns 0 when the unit changed. Called as an `if` condition, where errexit and
# the ERR trap are off: a failed copy calls on_error itself.
install_unit() {
    local staged=$1 dest=$2 backup=$3
    if [ -f "$dest" ] && ! dry; then
        cp "$dest" "$backup" || on_error
    fi
    install_file "$staged" "$dest" 0644
}

as_service_user() { # run a command as the service user with the service's HOME and caches
    local envs=(HOME="$APP_DIR" XDG_CACHE_HOME="$APP_DIR/.cache" D3_CODE_DIR="$(release_dir)")
    if prefixed || [ "$(id -u)" -ne 0 ]; then
        run env "${envs[@]}" "$@"
    else
        run runuser -u "$SERVICE_USER" -- env "${envs[@]}" "$@"
    fi
}

state_get() { dotenv_get "$STATE_FILE" "$1"; }

release_dir() { # the code of the release being deployed (the source tree itself in a dry run)
    if dry && [ ! -d "$APP_DIR/releases/$RELEASE_ID" ]; then
        printf '%s' "$SRC_DIR"
    else
        printf '%s' "$APP_DIR/releases/$RELEASE_ID"
    fi
}

source_files() { # NUL-separated list of the files that make a release, relative to SRC_DIR
    if git -C "$SRC_DIR" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        git -C "$SRC_DIR" ls-files -z --cached --others --exclude-standard |
            while IFS= read -r -d '' f; do [ -f "$SRC_DIR/$f" ] && printf '%s\0' "$f"; done
        # The built web front end is ignored by git but ships with the code (the app serves it at /ui/).
        if [ -d "$SRC_DIR/web/dist" ]; then (cd "$SRC_DIR" && find web/dist -type f -print0); fi
    else
        (cd "$SRC_DIR" && find . -type f \
            -not -path './.git/*' -not -path './.venv/*' -not -path './instance/*' -not -path './logs/*' \
            -not -name '.env' -not -name '*.pyc' -not -path '*/__pycache__/*' -not -path './.pytest_cache/*' \
            -not -path './.ruff_cache/*' -not -path './.d3-cache/*' -print0 | sed -z 's|^\./||')
    fi | sort -z
}

release_hash() {
    (cd "$SRC_DIR" && source_files | xargs -0 -r sha256sum -- | sha256sum | cut -c1-12)
}

# --- steps ------------------------------------------------------------------------------------
do_preflight() {
    step preflight "check_deployment.sh against $APP_DIR"
    if [ "$PREFLIGHT" -eq 0 ]; then
        skip "--no-preflight"
        return
    fi
    local args=(--app-dir "$APP_DIR")
    local skip_list=""
    [ "$SKIP_WEIGHTS" -eq 0 ] || skip_list+="weights,"
    if [ "$NO_NGINX" -eq 1 ] || prefixed; then skip_list+="nginx,"; fi
    if prefixed; then
        skip_list+="port,"
        args+=(--unit "$SRC_DIR/$SERVICE.service")
    fi
    [ -z "$skip_list" ] || args+=(--skip "${skip_list%,}")
    if dry; then
        run "$SRC_DIR/check_deployment.sh" "${args[@]}"
        return
    fi
    if ! "$SRC_DIR/check_deployment.sh" "${args[@]}"; then
        fail "preflight checks FAILed (lines above); fix them, or re-run with --no-preflight if you know better"
    fi
}

do_packages() {
    local nginx_pkg=", nginx"
    [ "$NO_NGINX" -eq 0 ] || nginx_pkg=""
    step packages "system packages (python3, python3-venv, python3-pip, curl, openssl$nginx_pkg)"
    if prefixed; then
        skip "--prefix: system packages are not installed"
        return
    fi
    local want=(python3 python3-venv python3-pip curl openssl) missing=() pkg
    [ "$NO_NGINX" -eq 1 ] || want+=(nginx)
    if ! command -v apt-get >/dev/null 2>&1; then
        for pkg in "$PYTHON" curl openssl; do
            command -v "$pkg" >/dev/null 2>&1 || fail "$pkg is missing and this is not a Debian/Ubuntu host: install it"
        done
        skip "no apt-get: install python3-venv and nginx yourself"
        return
    fi
    for pkg in "${want[@]}"; do
        [ "$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)" = installed ] || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        say "all present: ${want[*]}"
        return
    fi
    run env DEBIAN_FRONTEND=noninteractive apt-get -q update
    run env DEBIAN_FRONTEND=noninteractive apt-get -q -y install --no-install-recommends "${missing[@]}"
}

do_user() {
    step user "system user $SERVICE_USER"
    if prefixed; then
        skip "--prefix: would create the system user $SERVICE_USER (home $APP_DIR, no login shell)"
        return
    fi
    if id -u "$SERVICE_USER" >/dev/null 2>&1; then
        say "exists: $(id "$SERVICE_USER")"
    else
        run useradd --system --user-group --home-dir "$APP_DIR" --no-create-home --shell /usr/sbin/nologin \
            --comment "d3-api service" "$SERVICE_USER"
    fi
    # NVIDIA device nodes are group video/render on some distributions.
    local group
    for group in video render; do
        if getent group "$group" >/dev/null && ! id -nG "$SERVICE_USER" 2>/dev/null | tr ' ' '\n' | grep -qx "$group"; then
            run usermod -a -G "$group" "$SERVICE_USER"
        fi
    done
}

do_directories() {
    step directories "$APP_DIR and its shared folders"
    run mkdir -p "$APP_DIR/releases" "$APP_DIR/bin" "$APP_DIR/instance" "$APP_DIR/logs" "$APP_DIR/.cache"
    if prefixed; then
        skip "--prefix: ownership left as is (would be root:$SERVICE_USER, instance/logs/.cache owned by $SERVICE_USER)"
        return
    fi
    run chown root:"$SERVICE_USER" "$APP_DIR"
    run chmod 0755 "$APP_DIR"
    run chown -R "$SERVICE_USER:$SERVICE_USER" "$APP_DIR/instance" "$APP_DIR/logs" "$APP_DIR/.cache"
    run chmod 0750 "$APP_DIR/instance" "$APP_DIR/logs" "$APP_DIR/.cache"
}

do_release() {
    RELEASE_ID="$(release_hash)"
    step release "code from $SRC_DIR as release $RELEASE_ID"
    PREVIOUS_RELEASE="$(basename "$(readlink "$APP_DIR/current" 2>/dev/null || true)")"
    local dest="$APP_DIR/releases/$RELEASE_ID"
    if [ -f "$dest/.release-complete" ]; then
        say "unchanged: $dest exists (same source)"
        return
    fi
    if [ ! -f "$SRC_DIR/web/dist/index.html" ]; then
        warn "web/dist is not built (make setup with Node.js builds it): /ui/ will answer that it is not built"
    fi
    if dry; then
        say "would copy $(cd "$SRC_DIR" && source_files | tr -cd '\0' | wc -c) files to $dest, link .env/instance/logs, byte-compile"
        return
    fi
    local tmp="$dest.partial"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    (cd "$SRC_DIR" && source_files | tar --null -T - -cf -) | tar -C "$tmp" -xf -
    rm -rf "$tmp/.env" "$tmp/instance" "$tmp/logs" "$tmp/.venv"
    ln -s ../../.env "$tmp/.env"
    ln -s ../../instance "$tmp/instance"
    ln -s ../../logs "$tmp/logs"
    if [ -x "$VENV/bin/python" ]; then
        "$VENV/bin/python" -m compileall -q "$tmp/api" "$tmp/gunicorn_config.py" >/dev/null || true
    fi
    printf 'release=%s\nsource=%s\ncreated=%s\n' "$RELEASE_ID" "$SRC_DIR" "$(date -u +%FT%TZ)" >"$tmp/.release-complete"
    chmod -R go-w "$tmp"
    mv "$tmp" "$dest"
    say "created: $dest"
}

do_venv() {
    step venv "virtualenv $VENV and requirements"
    local req
    req="$(release_dir)/requirements.txt"
    if [ ! -x "$VENV/bin/python" ]; then
        run "$PYTHON" -m venv "$VENV"
    else
        say "exists: $VENV ($("$VENV/bin/python" -V 2>&1))"
    fi
    local pip=("$VENV/bin/python" -m pip --disable-pip-version-check --no-input)
    local index=()
    [ -z "${D3_TORCH_INDEX_URL:-}" ] || index=(--extra-index-url "$D3_TORCH_INDEX_URL")
    # PyPI's Linux x86_64 torch wheels are the CUDA builds: the same pins serve GPU hosts.
    run "${pip[@]}" install -q "${index[@]}" -r "$req"
    if ! dry && command -v nvidia-smi >/dev/null 2>&1; then
        if ! "$VENV/bin/python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
            warn "this host has an NVIDIA driver but torch cannot use CUDA: update the driver for torch's CUDA build"
        fi
    fi
    local wrapper
    wrapper="$WORK/d3"
    cat >"$wrapper" <<EOF
#!/bin/sh
# The d3 command of the deployed release (written by deploy.sh). Run it as the service user:
#   sudo -u $SERVICE_USER $APP_DIR/bin/d3 info
# D3_CODE_DIR (deploy.sh sets it) runs another release's code, e.g. the one being installed.
exec "$VENV/bin/python" -c 'import sys; sys.argv[0] = "d3"; sys.path.insert(0, sys.argv.pop(1)); from api.cli import main; main()' "\${D3_CODE_DIR:-$APP_DIR/current}" "\$@"
EOF
    install_file "$wrapper" "$APP_DIR/bin/d3" 0755 || true
}

do_env() {
    local env_file="$APP_DIR/.env"
    step env "settings file $env_file"
    if [ -f "$env_file" ]; then
        say "exists, not modified: $env_file"
        local example="$SRC_DIR/.env.example" missing
        if [ -f "$example" ]; then
            missing="$(dotenv_missing "$env_file" "$example" | tr '\n' ' ')"
            [ -z "$missing" ] || say "new settings in .env.example (defaults apply): ${missing% }"
        fi
        return
    fi
    if dry; then
        say "would create $env_file from .env.example with a generated SECRET_KEY, INSTANCE_DIR and D3_CACHE_DIR (mode 640)"
        return
    fi
    local tmp secret
    tmp="$(mktemp "$APP_DIR/.env.XXXXXX")"
    if [ -f "$SRC_DIR/.env.example" ]; then
        cp "$SRC_DIR/.env.example" "$tmp"
    else
        printf '# d3-api settings (see .env.example in the source tree)\n' >"$tmp"
    fi
    secret="$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')"
    set_env_value "$tmp" SECRET_KEY "$secret" always
    set_env_value "$tmp" INSTANCE_DIR "$APP_DIR/instance" if-empty
    set_env_value "$tmp" D3_CACHE_DIR "$APP_DIR/.cache/d3" if-empty
    chmod 0640 "$tmp"
    prefixed || chown root:"$SERVICE_USER" "$tmp"
    mv "$tmp" "$env_file"
    say "created: $env_file (SECRET_KEY generated; edit DATABASE_URL and MINIO_* for PostgreSQL and MinIO)"
}

set_env_value() { # set_env_value FILE KEY VALUE always|if-empty
    local file=$1 key=$2 value=$3 mode=$4 current
    if grep -Eq "^${key}=" "$file"; then
        current="$(dotenv_get "$file" "$key")"
        if [ "$mode" = always ] || [ -z "$current" ]; then
            awk -v k="$key" -v v="$value" 'BEGIN { FS = OFS = "=" } $1 == k { print k "=" v; next } { print }' \
                "$file" >"$file.new"
            mv "$file.new" "$file"
        fi
    else
        printf '%s=%s\n' "$key" "$value" >>"$file"
    fi
}

do_settings() {
    step settings "the settings reach their services (check_deployment.sh env, settings, database, objectstore)"
    if dry; then
        run "$SRC_DIR/check_deployment.sh" --app-dir "$APP_DIR" --code-dir "$(release_dir)" --only env,settings,database,objectstore
        return
    fi
    if ! "$SRC_DIR/check_deployment.sh" --app-dir "$APP_DIR" --code-dir "$(release_dir)" --only env,settings,database,objectstore; then
        fail "edit $APP_DIR/.env (lines above say what is wrong), then re-run deploy.sh"
    fi
}

do_weights() {
    step weights "model weights (d3 fetch-weights --if-missing)"
    if [ "$SKIP_WEIGHTS" -eq 1 ]; then
        skip "--skip-weights"
        return
    fi
    # Image and audio by default, as `make run` does: the text pair is about 20 GB of disk and
    # 17 GB of GPU memory, so it is fetched only when asked for.
    local modalities=(--modality image --modality audio)
    if [ "$TEXT_WEIGHTS" -eq 1 ]; then
        modalities+=(--modality text)
    else
        say "the text detector's language models are not fetched (about 20 GB): --with-text-weights fetches them"
    fi
    as_service_user "$APP_DIR/bin/d3" fetch-weights --if-missing "${modalities[@]}"
}

do_database() {
    step database "schema migrations (d3 db upgrade)"
    say "migrations must keep the running version working (they run before the switch); back up first: DEPLOYMENT.md"
    as_service_user "$APP_DIR/bin/d3" db upgrade
}

# True when video jobs go to the Celery worker tier: a broker in .env, unless VIDEO_EXECUTOR=threads.
worker_wanted() {
    local executor broker
    executor="$(dotenv_get "$APP_DIR/.env" VIDEO_EXECUTOR)"
    broker="$(dotenv_get "$APP_DIR/.env" CELERY_BROKER_URL)"
    [ -n "$broker" ] || broker="$(dotenv_get "$APP_DIR/.env" REDIS_URL)"
    case "$executor" in
        threads) return 1 ;;
        celery) return 0 ;;
    esac
    [ -n "$broker" ]
}

# True when .env sends the API to an inference tier on this host (D3_INFERENCE_URL at a loopback
# address or this host's name): then d3-inference.service is installed and started before d3-api.
tier_on_this_host() {
    local url host
    url="$(dotenv_get "$APP_DIR/.env" D3_INFERENCE_URL)"
    [ -n "$url" ] || return 1
    host="${url#*://}"
    host="${host%%/*}"
    host="${host%:*}"
    host="${host#[}"
    host="${host%]}"
    case "$host" in
        localhost|127.*|::1|"$(hostname 2>/dev/null)"|"$(hostname -f 2>/dev/null)") return 0 ;;
    esac
    return 1
}

UNIT_STAGED=""
TIER_UNIT_STAGED=""
TIER_HERE=0
WORKER_STAGED=""
do_unit() {
    step unit "systemd unit $UNIT_PATH"
    UNIT_STAGED="$WORK/$SERVICE.service"
    sed -e "s#/opt/d3-api#$APP_DIR#g" -e "s/^User=d3\$/User=$SERVICE_USER/" -e "s/^Group=d3\$/Group=$SERVICE_USER/" \
        "$SRC_DIR/$SERVICE.service" >"$UNIT_STAGED"
    if tier_on_this_host; then
        TIER_HERE=1
        TIER_UNIT_STAGED="$WORK/$TIER_SERVICE.service"
        sed -e "s#/opt/d3-api#$APP_DIR#g" -e "s/^User=d3\$/User=$SERVICE_USER/" -e "s/^Group=d3\$/Group=$SERVICE_USER/" \
            "$SRC_DIR/$TIER_SERVICE.service" >"$TIER_UNIT_STAGED"
        say "D3_INFERENCE_URL is on this host: $TIER_SERVICE.service goes in too ($TIER_UNIT_PATH)"
    else
        say "D3_INFERENCE_URL is not on this host: no $TIER_SERVICE.service (the model runs in each API worker, or on another host)"
    fi
    if worker_wanted; then
        WORKER_STAGED="$WORK/$WORKER_SERVICE.service"
        sed -e "s#/opt/d3-api#$APP_DIR#g" -e "s/^User=d3\$/User=$SERVICE_USER/" -e "s/^Group=d3\$/Group=$SERVICE_USER/" \
            "$SRC_DIR/$WORKER_SERVICE.service" >"$WORKER_STAGED"
        say "a job queue broker is configured: video jobs run in $WORKER_SERVICE ($WORKER_UNIT_PATH)"
    fi
    if ! command -v systemd-analyze >/dev/null 2>&1; then
        skip "systemd-analyze not installed: unit not verified"
        return
    fi
    if dry && [ ! -x "$VENV/bin/gunicorn" ]; then
        say "would verify the unit with systemd-analyze verify once the virtualenv exists"
        return
    fi
    local out unit
    for unit in "$UNIT_STAGED" ${TIER_UNIT_STAGED:+"$TIER_UNIT_STAGED"} ${WORKER_STAGED:+"$WORKER_STAGED"}; do
        out="$(systemd-analyze verify "$unit" 2>&1)" || true
        if [ -n "$out" ]; then
            printf '%s\n' "$out" | sed 's/^/    /'
            fail "systemd-analyze verify complains about $(basename "$unit")"
        fi
    done
    say "verified: systemd-analyze verify passes"
}

NGINX_STAGED=""
NGINX_SITE=""
do_nginx() {
    step nginx "nginx site (HTTPS, rate limits, upstream from BIND)"
    if [ "$NO_NGINX" -eq 1 ]; then
        skip "--no-nginx"
        return
    fi
    local domain="${DOMAIN:-$(state_get domain)}"
    if [ -z "$domain" ]; then
        if dry; then
            domain="d3.example.com"
            say "no --domain given: showing the plan for $domain"
        else
            fail "the first deploy with nginx needs --domain NAME (or --no-nginx)"
        fi
    fi
    DOMAIN="$domain"
    local bind upstream max_bytes body_mb cert key
    bind="$(dotenv_get "$APP_DIR/.env" BIND)"
    bind="${bind:-127.0.0.1:6000}"
    upstream="$bind"
    case "$upstream" in 0.0.0.0:*) upstream="127.0.0.1:${bind##*:}" ;; '[::]':*) upstream="[::1]:${bind##*:}" ;; esac
    max_bytes="$(dotenv_get "$APP_DIR/.env" MAX_VIDEO_BYTES)"
    max_bytes="${max_bytes:-524288000}"
    body_mb=$(((max_bytes + 1048575) / 1048576 + 1))
    cert="$LE_DIR/$domain/fullchain.pem"
    key="$LE_DIR/$domain/privkey.pem"
    if [ ! -f "$cert" ] || [ ! -f "$key" ]; then
        cert="$TLS_DIR/$domain.crt"
        key="$TLS_DIR/$domain.key"
        warn "no Let's Encrypt certificate for $domain yet: using a self-signed one ($cert); run certbot (DEPLOYMENT.md, 'TLS') and re-run deploy.sh"
        if [ ! -f "$cert" ]; then
            run mkdir -p "$TLS_DIR"
            run quietly openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=$domain" \
                -addext "subjectAltName=DNS:$domain" -keyout "$key" -out "$cert"
            dry || chmod 0600 "$key"
        fi
    fi
    NGINX_STAGED="$WORK/$SERVICE-nginx.conf"
    sed -e "s#/etc/letsencrypt/live/d3.example.com/fullchain.pem#$cert#" \
        -e "s#/etc/letsencrypt/live/d3.example.com/privkey.pem#$key#" \
        -e "s#d3.example.com#$domain#g" \
        -e "s#server 127.0.0.1:6000 #server $upstream #" \
        -e "s#client_max_body_size [0-9]*[kmg]*;#client_max_body_size ${body_mb}m;#" \
        -e "s#/var/www/letsencrypt#$ACME_ROOT#g" \
        -e "s#/var/log/nginx/#$PREFIX/var/log/nginx/#g" \
        "$SRC_DIR/d3-api-nginx.conf" >"$NGINX_STAGED"
    say "domain $domain, upstream $upstream, client_max_body_size ${body_mb}m, certificate $cert"
    if [ -d "$NGINX_DIR/sites-available" ] || [ ! -d "$NGINX_DIR/conf.d" ]; then
        NGINX_SITE="$NGINX_DIR/sites-available/$SERVICE.conf"
    else
        NGINX_SITE="$NGINX_DIR/conf.d/$SERVICE.conf"
    fi
    run mkdir -p "$ACME_ROOT" "$PREFIX/var/log/nginx"
    nginx_test
}

# nginx -t with the new site in place; the old file is put back when the test fails.
nginx_test() {
    local backup="" had_site=0
    [ ! -f "$NGINX_SITE" ] || had_site=1
    if [ -f "$NGINX_SITE" ]; then
        backup="$WORK/nginx-site.previous"
        cp "$NGINX_SITE" "$backup"
    fi
    if ! install_file "$NGINX_STAGED" "$NGINX_SITE" 0644; then
        backup=""
    fi
    if [[ "$NGINX_SITE" == */sites-available/* ]]; then
        local link="$NGINX_DIR/sites-enabled/$SERVICE.conf"
        if [ "$(readlink "$link" 2>/dev/null)" != "$NGINX_SITE" ]; then
            run mkdir -p "$NGINX_DIR/sites-enabled"
            run ln -sfn "$NGINX_SITE" "$link"
        fi
    fi
    dry && { say "would run: nginx -t"; return; }
    local nginx
    nginx="$(command -v nginx || echo /usr/sbin/nginx)"
    if [ ! -x "$nginx" ]; then
        skip "nginx is not installed here: configuration not tested"
        return
    fi
    local out conf=()
    if prefixed; then
        # A stand-alone nginx.conf around the site, so the test does not touch the real one.
        local wrapper="$NGINX_DIR/nginx-d3-test.conf"
        printf 'pid %s/nginx-test.pid;\nevents {}\nhttp {\n    include %s;\n}\n' "$NGINX_DIR" "$NGINX_SITE" >"$wrapper"
        conf=(-c "$wrapper" -e "$PREFIX/var/log/nginx/error.log")
    fi
    if ! out="$("$nginx" "${conf[@]}" -t 2>&1)"; then
        printf '%s\n' "$out" | sed 's/^/    /'
        if [ -n "$backup" ]; then
            cp "$backup" "$NGINX_SITE"
            say "restored the previous $NGINX_SITE"
        elif [ "$had_site" -eq 0 ]; then
            rm -f "$NGINX_SITE" "$NGINX_DIR/sites-enabled/$SERVICE.conf"
            say "removed the new $NGINX_SITE again, so the next nginx reload is not broken"
        fi
        fail "nginx -t fails with the new site"
    fi
    say "nginx -t passes"
}

do_activate() {
    step activate "switch to release $RELEASE_ID, install the unit, (re)start, reload nginx"
    local unit_changed=0 env_hash have_systemd=1
    local by_hand="start it by hand: $VENV/bin/gunicorn --config $APP_DIR/current/gunicorn_config.py api.app:app"
    if ! prefixed && { ! command -v systemctl >/dev/null 2>&1 || [ ! -d /run/systemd/system ]; }; then
        have_systemd=0
        dry || fail "systemd is not running on this host (nothing was switched); $by_hand"
        say "note: systemd is not running on this host, so a real run stops here ($by_hand)"
    fi
    env_hash="$( (cat "$APP_DIR/.env" 2>/dev/null || true) | sha256sum | cut -c1-16)"
    if [ "$PREVIOUS_RELEASE" = "$RELEASE_ID" ]; then
        say "current is already release $RELEASE_ID"
    else
        run ln -sfn "releases/$RELEASE_ID" "$APP_DIR/current.new"
        run mv -T "$APP_DIR/current.new" "$APP_DIR/current"
        ACTIVATED=1
        RESTART_NEEDED=1
    fi
    if install_unit "$UNIT_STAGED" "$UNIT_PATH" "$APP_DIR/.unit-previous"; then
        unit_changed=1
        ACTIVATED=1
        RESTART_NEEDED=1
    fi
    if [ "$TIER_HERE" -eq 1 ]; then
        if install_unit "$TIER_UNIT_STAGED" "$TIER_UNIT_PATH" "$APP_DIR/.tier-unit-previous"; then
            unit_changed=1
            ACTIVATED=1
            RESTART_NEEDED=1
        fi
    fi
    local worker_changed=0 worker_removed=0
    if [ -n "$WORKER_STAGED" ]; then
        if install_unit "$WORKER_STAGED" "$WORKER_UNIT_PATH" "$APP_DIR/.worker-unit-previous"; then
            worker_changed=1
            unit_changed=1
            ACTIVATED=1
        fi
    elif [ -f "$WORKER_UNIT_PATH" ]; then
        say "no job queue broker configured any more: $WORKER_SERVICE is removed (the API runs video jobs itself)"
        worker_removed=1
    fi
    [ "$env_hash" = "$(state_get env_hash)" ] || RESTART_NEEDED=1
    if prefixed; then
        [ "$worker_removed" -eq 0 ] || run rm -f "$WORKER_UNIT_PATH"
        skip "--prefix: would run systemctl daemon-reload, enable and restart $SERVICE${TIER_UNIT_STAGED:+ (after $TIER_SERVICE)}${WORKER_STAGED:+ and $WORKER_SERVICE}, reload nginx"
        write_state "$env_hash"
        return
    fi
    if [ "$worker_removed" -eq 1 ]; then
        run systemctl disable --now "$WORKER_SERVICE"
        run rm -f "$WORKER_UNIT_PATH"
        unit_changed=1
    fi
    [ "$unit_changed" -eq 0 ] || run systemctl daemon-reload
    if [ "$TIER_HERE" -eq 1 ]; then
        # Started first; Type=notify: restart returns once the model is loaded, warmed and ready.
        run systemctl enable "$TIER_SERVICE"
        if [ "$RESTART_NEEDED" -eq 1 ] || [ "$have_systemd" -eq 0 ] || ! systemctl is-active --quiet "$TIER_SERVICE"; then
            run systemctl restart "$TIER_SERVICE"
        fi
    fi
    run systemctl enable "$SERVICE"
    if [ "$RESTART_NEEDED" -eq 1 ] || [ "$have_systemd" -eq 0 ] || ! systemctl is-active --quiet "$SERVICE"; then
        run systemctl restart "$SERVICE"
    else
        say "release, unit and settings unchanged and $SERVICE is running: not restarted"
    fi
    if [ -n "$WORKER_STAGED" ]; then
        run systemctl enable "$WORKER_SERVICE"
        # A restart is a warm shutdown: running jobs finish, or are run again by the new worker.
        if [ "$RESTART_NEEDED" -eq 1 ] || [ "$worker_changed" -eq 1 ] || [ "$have_systemd" -eq 0 ] ||
            ! systemctl is-active --quiet "$WORKER_SERVICE"; then
            run systemctl restart "$WORKER_SERVICE"
        else
            say "$WORKER_SERVICE unchanged and running: not restarted"
        fi
    fi
    if [ "$NO_NGINX" -eq 0 ]; then
        if [ "$have_systemd" -eq 1 ] && systemctl is-active --quiet nginx; then
            run systemctl reload nginx
        else
            run systemctl enable --now nginx
        fi
    fi
    dry || write_state "$env_hash"
}

write_state() {
    dry && return
    printf 'release=%s\nprevious=%s\ndomain=%s\nenv_hash=%s\ndeployed=%s\n' "$RELEASE_ID" "$PREVIOUS_RELEASE" \
        "${DOMAIN:-$(state_get domain)}" "$1" "$(date -u +%FT%TZ)" >"$STATE_FILE"
}

rollback() {
    printf '\n    ROLLBACK: the new version is not healthy\n' >&2
    if [ -n "$PREVIOUS_RELEASE" ] && [ "$PREVIOUS_RELEASE" != "$RELEASE_ID" ] && [ -d "$APP_DIR/releases/$PREVIOUS_RELEASE" ]; then
        ln -sfn "releases/$PREVIOUS_RELEASE" "$APP_DIR/current.new"
        mv -T "$APP_DIR/current.new" "$APP_DIR/current"
        [ ! -f "$APP_DIR/.unit-previous" ] || cp "$APP_DIR/.unit-previous" "$UNIT_PATH"
        [ ! -f "$APP_DIR/.tier-unit-previous" ] || cp "$APP_DIR/.tier-unit-previous" "$TIER_UNIT_PATH"
        [ ! -f "$APP_DIR/.worker-unit-previous" ] || [ ! -f "$WORKER_UNIT_PATH" ] ||
            cp "$APP_DIR/.worker-unit-previous" "$WORKER_UNIT_PATH"
        systemctl daemon-reload || true
        [ "$TIER_HERE" -eq 0 ] || systemctl restart "$TIER_SERVICE" || true
        systemctl restart "$SERVICE" || true
        if [ -f "$WORKER_UNIT_PATH" ]; then
            systemctl restart "$WORKER_SERVICE" || true
        fi
        printf '    switched back to release %s and restarted %s\n' "$PREVIOUS_RELEASE" "$SERVICE" >&2
        write_state "$(state_get env_hash)"
        sed -i "s/^release=.*/release=$PREVIOUS_RELEASE/" "$STATE_FILE"
    else
        printf '    no previous release to go back to\n' >&2
    fi
    printf '    logs: journalctl -u %s -n 100 --no-pager\n' "$SERVICE" >&2
}

do_smoke() {
    step smoke "GET /health answers 200 within ${SMOKE_TIMEOUT}s"
    if prefixed; then
        skip "--prefix: no service was started"
        return
    fi
    local bind url deadline code body
    bind="$(dotenv_get "$APP_DIR/.env" BIND)"
    bind="${bind:-127.0.0.1:6000}"
    case "$bind" in 0.0.0.0:*) bind="127.0.0.1:${bind##*:}" ;; esac
    url="http://$bind/health"
    if dry; then
        say "would poll $url until it answers 200 (at most ${SMOKE_TIMEOUT}s)"
        [ "$NO_NGINX" -eq 1 ] || say "would check https://${DOMAIN:-<domain>}/health through nginx"
        return
    fi
    deadline=$((SECONDS + SMOKE_TIMEOUT))
    code=000
    while [ "$SECONDS" -lt "$deadline" ]; do
        code="$(curl -s -o /dev/null -w '%{http_code}' -m 10 "$url" || true)"
        [ "$code" != 200 ] || break
        # Restart=on-failure retries a crash; give up early only once systemd has given up too.
        [ "$(systemctl show -p ActiveState --value "$SERVICE" 2>/dev/null || true)" != failed ] || break
        sleep 3
    done
    if [ "$code" != 200 ]; then
        body="$(curl -s -m 10 "$url" || true)"
        say "last answer from $url: HTTP $code ${body:0:300}"
        rollback
        fail "$SERVICE did not become healthy (HTTP $code from $url)"
    fi
    say "healthy: $url answers 200"
    if [ "$NO_NGINX" -eq 0 ]; then
        code="$(curl -sk -o /dev/null -w '%{http_code}' -m 10 --resolve "$DOMAIN:443:127.0.0.1" "https://$DOMAIN/health" || true)"
        if [ "$code" = 200 ]; then
            say "healthy through nginx: https://$DOMAIN/health answers 200"
        else
            fail "the service is healthy but https://$DOMAIN/health through nginx answers HTTP $code: see /var/log/nginx/d3-api.error.log"
        fi
    fi
}

do_cleanup() {
    step cleanup "keep the newest $KEEP_RELEASES releases"
    local keep_current keep_previous old
    keep_current="$(basename "$(readlink "$APP_DIR/current" 2>/dev/null || true)")"
    keep_previous="$PREVIOUS_RELEASE"
    [ -d "$APP_DIR/releases" ] || { say "no releases yet"; return; }
    # newest first, by the time the release was created
    mapfile -t old < <(find "$APP_DIR/releases" -mindepth 2 -maxdepth 2 -name .release-complete -printf '%T@ %h\n' |
        sort -rn | cut -d' ' -f2- | xargs -r -n1 basename | tail -n +"$((KEEP_RELEASES + 1))")
    local r removed=0
    for r in "${old[@]}"; do
        if [ "$r" = "$keep_current" ] || [ "$r" = "$keep_previous" ]; then
            continue
        fi
        run rm -rf "${APP_DIR:?}/releases/$r"
        removed=$((removed + 1))
    done
    say "releases kept: $(find "$APP_DIR/releases" -mindepth 1 -maxdepth 1 -printf '%f ')(removed $removed)"
}

# --- main ---------------------------------------------------------------------------------------
printf 'deploy.sh: %s from %s to %s%s\n' "$SERVICE" "$SRC_DIR" "$APP_DIR" "$(dry && echo ' (dry run: nothing is changed)')"
if ! dry && command -v flock >/dev/null 2>&1; then
    mkdir -p "$APP_DIR"
    exec 9>"$APP_DIR/.deploy.lock"
    flock -n 9 || { echo "deploy.sh: another deploy is running (lock $APP_DIR/.deploy.lock)" >&2; exit 1; }
fi

do_preflight
do_packages
do_user
do_directories
do_release
do_venv
do_env
do_settings
do_weights
do_database
do_unit
do_nginx
do_activate
do_smoke
do_cleanup

printf '\ndeploy.sh: %s release %s %s.\n' "$SERVICE" "$RELEASE_ID" "$(dry && echo 'planned (dry run: nothing was changed)' || echo 'deployed')"
if [ "${#SKIPPED[@]}" -gt 0 ]; then
    printf 'skipped steps:\n'
    printf '  - %s\n' "${SKIPPED[@]}"
fi
if [ "${#WARNINGS[@]}" -gt 0 ]; then
    printf 'warnings:\n'
    printf '  - %s\n' "${WARNINGS[@]}"
fi
