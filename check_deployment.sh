#!/usr/bin/env bash
# check_deployment.sh: pre-deployment checker of d3-api. Read-only, safe to run at any time,
# as root or as the service user. One line per check, PASS / WARN / FAIL, with a hint on what to
# do; the exit status is 1 when any check FAILs, 0 otherwise (2 on a usage error).
#
#   ./check_deployment.sh                       # checks the deployment this script belongs to
#   ./check_deployment.sh --app-dir /opt/d3-api # or another one
#   ./check_deployment.sh --json                # machine-readable
#
# Checks: gpu python venv env settings weights inference database objectstore broker port nginx unit disk.
# The host checks are here; the application's own (settings weights inference database objectstore
# broker) are `d3 check` (api/checks.py), run in the app's virtualenv with the app's code, so they
# judge the settings exactly as the service will.
# WARN means "works, but look at it" or "deploy.sh will take care of it" (a missing .env,
# virtualenv, weights download or schema migration); FAIL means deploying now would not work.
# The only thing it writes is one small probe object into the object store, deleted again.
set -uo pipefail

usage() {
    cat <<'EOF'
Usage: check_deployment.sh [options]

Options:
  --app-dir DIR    the deployment to check (default: the one this script is in;
                   /opt/d3-api when run from /opt/d3-api/current)
  --env-file FILE  settings file (default: APP_DIR/.env)
  --code-dir DIR   the code to judge (default: APP_DIR/current, a checkout's APP_DIR, else this script's)
  --unit FILE      systemd unit to verify (default: the installed one, else the shipped one)
  --only LIST      run only these checks (comma-separated)
  --skip LIST      skip these checks (comma-separated)
  --json           print one JSON document instead of text lines
  -h, --help       this help

Checks: gpu python venv env settings weights inference database objectstore broker port nginx unit disk
        (settings ... broker are `d3 check`, the app's own checks)
Environment: D3_CHECK_MIN_FREE_GB (default 10: FAIL below), D3_CHECK_WARN_FREE_GB (default 30: WARN
below), D3_CHECK_TIMEOUT (seconds for each Python probe, default 600).
EOF
}

ALL_CHECKS="gpu python venv env settings weights inference database objectstore broker port nginx unit disk"
APP_CHECKS="settings weights inference database objectstore broker"  # d3 check (api/checks.py)
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
# shellcheck source=/dev/null
. "$SCRIPT_DIR/scripts/lib.sh"

APP_DIR=""
CODE_DIR=""
ENV_FILE=""
UNIT_FILE=""
ONLY=""
SKIP=""
JSON=0
while [ $# -gt 0 ]; do
    case "$1" in
        --app-dir) APP_DIR="${2:?--app-dir needs a directory}"; shift 2 ;;
        --app-dir=*) APP_DIR="${1#*=}"; shift ;;
        --code-dir) CODE_DIR="${2:?--code-dir needs a directory}"; shift 2 ;;
        --code-dir=*) CODE_DIR="${1#*=}"; shift ;;
        --env-file) ENV_FILE="${2:?--env-file needs a file}"; shift 2 ;;
        --env-file=*) ENV_FILE="${1#*=}"; shift ;;
        --unit) UNIT_FILE="${2:?--unit needs a file}"; shift 2 ;;
        --unit=*) UNIT_FILE="${1#*=}"; shift ;;
        --only) ONLY="${2:?--only needs a list}"; shift 2 ;;
        --only=*) ONLY="${1#*=}"; shift ;;
        --skip) SKIP="${2:?--skip needs a list}"; shift 2 ;;
        --skip=*) SKIP="${1#*=}"; shift ;;
        --json) JSON=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "check_deployment.sh: unknown option: $1 (see --help)" >&2; exit 2 ;;
    esac
done

for name in ${ONLY//,/ } ${SKIP//,/ }; do
    case " $ALL_CHECKS " in
        *" $name "*) ;;
        *) echo "check_deployment.sh: unknown check: $name (checks: $ALL_CHECKS)" >&2; exit 2 ;;
    esac
done

# --- where things are -------------------------------------------------------------------------
if [ -z "$APP_DIR" ]; then
    APP_DIR="${D3_APP_DIR:-}"
fi
if [ -z "$APP_DIR" ]; then
    if [ "$(basename "$(dirname "$SCRIPT_DIR")")" = "releases" ]; then
        APP_DIR="$(dirname "$(dirname "$SCRIPT_DIR")")"   # run from APP_DIR/releases/<id>
    else
        APP_DIR="$SCRIPT_DIR"
    fi
fi
APP_DIR="${APP_DIR%/}"
if [ -n "$CODE_DIR" ]; then
    CODE_DIR="${CODE_DIR%/}"
elif [ -d "$APP_DIR/current" ]; then
    CODE_DIR="$APP_DIR/current"          # a deploy.sh layout
elif [ -d "$APP_DIR/api" ]; then
    CODE_DIR="$APP_DIR"                  # a source checkout
else
    CODE_DIR="$SCRIPT_DIR"               # not deployed yet: judge the code beside this script
fi
VENV="${D3_VENV:-$APP_DIR/.venv}"
PY="$VENV/bin/python"
ENV_FILE="${ENV_FILE:-$APP_DIR/.env}"
PROBE_TIMEOUT="${D3_CHECK_TIMEOUT:-600}"

# --- results ----------------------------------------------------------------------------------
R_NAME=()
R_STATUS=()
R_MSG=()
R_HINT=()
N_PASS=0
N_WARN=0
N_FAIL=0

record() { # record NAME STATUS MESSAGE [HINT]
    local name=$1 status=$2 msg=$3 hint=${4:-}
    R_NAME+=("$name")
    R_STATUS+=("$status")
    R_MSG+=("$msg")
    R_HINT+=("$hint")
    case "$status" in
        PASS) N_PASS=$((N_PASS + 1)) ;;
        WARN) N_WARN=$((N_WARN + 1)) ;;
        FAIL) N_FAIL=$((N_FAIL + 1)) ;;
    esac
    if [ "$JSON" -eq 0 ]; then
        if [ -n "$hint" ]; then
            printf '%-4s  %-11s %s | hint: %s\n' "$status" "$name" "$msg" "$hint"
        else
            printf '%-4s  %-11s %s\n' "$status" "$name" "$msg"
        fi
    fi
}

json_escape() {
    local s=$1
    s=${s//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//$'\n'/\\n}
    s=${s//$'\r'/\\r}
    s=${s//$'\t'/\\t}
    printf '%s' "$s" | tr -d '\000-\010\013\014\016-\037'
}

print_json() {
    local i sep=""
    printf '{"ok": %s, "app_dir": "%s", "summary": {"pass": %d, "warn": %d, "fail": %d}, "checks": [' \
        "$([ "$N_FAIL" -eq 0 ] && echo true || echo false)" "$(json_escape "$APP_DIR")" "$N_PASS" "$N_WARN" "$N_FAIL"
    for i in "${!R_NAME[@]}"; do
        printf '%s\n  {"name": "%s", "status": "%s", "message": "%s", "hint": "%s"}' "$sep" \
            "$(json_escape "${R_NAME[$i]}")" "${R_STATUS[$i]}" "$(json_escape "${R_MSG[$i]}")" \
            "$(json_escape "${R_HINT[$i]}")"
        sep=","
    done
    printf '\n]}\n'
}

wanted() {
    local name=$1
    if [ -n "$ONLY" ]; then
        case ",$ONLY," in *",$name,"*) ;; *) return 1 ;; esac
    fi
    case ",$SKIP," in *",$name,"*) return 1 ;; esac
    return 0
}

first_line() { printf '%s' "$1" | grep -v '^[[:space:]]*$' | tail -n 1 | cut -c1-400; }

# --- settings ---------------------------------------------------------------------------------
# The file is read like systemd's EnvironmentFile= does (scripts/lib.sh) and its values win over
# the caller's environment, as they do in the service.
HAVE_ENV=0
if [ -f "$ENV_FILE" ] && [ -r "$ENV_FILE" ]; then
    dotenv_export "$ENV_FILE"
    HAVE_ENV=1
fi
HAVE_VENV=0
[ -x "$PY" ] && HAVE_VENV=1

setting() { # setting NAME DEFAULT: the value the service will see
    local value="${!1:-}"
    printf '%s' "${value:-$2}"
}

# Run Python in the app's environment: the venv, the code on the path, nothing downloaded. Run as
# root against a deployment, the probes run as the service user (the owner of instance/), so they
# see the permissions the service has and never leave root-owned files behind.
RUN_AS=""
if [ "$(id -u)" -eq 0 ] && [ -d "$APP_DIR/instance" ]; then
    RUN_AS="$(stat -c %U "$APP_DIR/instance" 2>/dev/null || true)"
    [ "$RUN_AS" != root ] && [ "$RUN_AS" != UNKNOWN ] || RUN_AS=""
fi
app_python() {
    local envs=(PYTHONPATH="$CODE_DIR${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1)
    if [ -L "$APP_DIR/current" ]; then  # a deploy.sh layout: the service's HOME and caches
        envs+=(HOME="$APP_DIR" XDG_CACHE_HOME="$APP_DIR/.cache" MPLCONFIGDIR="$APP_DIR/.cache/matplotlib")
    fi
    if [ -n "$RUN_AS" ]; then
        (cd "$CODE_DIR" && runuser -u "$RUN_AS" -- env "${envs[@]}" timeout "$PROBE_TIMEOUT" "$PY" "$@")
    else
        (cd "$CODE_DIR" && env "${envs[@]}" timeout "$PROBE_TIMEOUT" "$PY" "$@")
    fi
}

# The d3 command of this deployment (deploy.sh installs APP_DIR/bin/d3; a checkout has .venv/bin/d3).
d3() {
    app_python -m api.cli "$@"
}

need_env_and_venv() { # need_env_and_venv NAME: WARN and return 1 when the prerequisites are missing
    if [ "$HAVE_VENV" -eq 0 ]; then
        record "$1" WARN "not checked: no virtualenv at $VENV" "deploy.sh creates it; then re-run this check"
        return 1
    fi
    if [ "$HAVE_ENV" -eq 0 ]; then
        record "$1" WARN "not checked: no settings file at $ENV_FILE" "deploy.sh creates it from .env.example; then re-run this check"
        return 1
    fi
    return 0
}

# --- checks -----------------------------------------------------------------------------------
check_gpu() {
    local device smi out rc
    device="$(setting D3_DEVICE auto)"
    smi="$(command -v nvidia-smi || true)"
    if [ -z "$smi" ]; then
        if [[ "$device" == cuda* ]]; then
            record gpu FAIL "D3_DEVICE=$device but no NVIDIA driver on this host (nvidia-smi not found)" \
                "install the NVIDIA driver (apt install nvidia-driver / ubuntu-drivers install) and reboot, or set D3_DEVICE=cpu"
        else
            record gpu WARN "no NVIDIA driver or GPU found (nvidia-smi not found): the model runs on the CPU, slowly (D3_DEVICE=$device)" \
                "for GPU inference install the NVIDIA driver and reboot; CPU-only is fine for testing"
        fi
        return
    fi
    out="$(timeout 30 "$smi" --query-gpu=index,name,memory.total,driver_version --format=csv,noheader 2>&1)"
    rc=$?
    if [ "$rc" -ne 0 ] || [ -z "$out" ]; then
        record gpu "$([[ "$device" == cuda* ]] && echo FAIL || echo WARN)" \
            "nvidia-smi found but it sees no GPU: $(first_line "$out")" \
            "driver/kernel module mismatch after an upgrade? reboot, or reinstall the driver"
        return
    fi
    local gpus
    gpus="$(printf '%s' "$out" | tr '\n' ';' | sed 's/;$//')"
    if [ "$HAVE_VENV" -eq 0 ]; then
        record gpu WARN "GPU(s): $gpus; torch not checked (no virtualenv at $VENV)" "deploy.sh installs the CUDA build of torch"
        return
    fi
    out="$(app_python -c 'import torch
ok = torch.cuda.is_available()
print(ok, torch.__version__, torch.version.cuda, torch.cuda.device_count() if ok else 0)' 2>&1)"
    rc=$?
    if [ "$rc" -ne 0 ]; then
        record gpu FAIL "GPU(s): $gpus; importing torch failed: $(first_line "$out")" "reinstall the requirements: deploy.sh does"
    elif [ "${out%% *}" = "True" ]; then
        if [ "$device" = "cpu" ]; then
            record gpu WARN "GPU(s): $gpus usable by torch, but D3_DEVICE=cpu" "set D3_DEVICE=auto or cuda in $ENV_FILE"
        else
            record gpu PASS "GPU(s): $gpus; torch $(echo "$out" | awk '{print $2 " (CUDA " $3 ") sees " $4}') device(s)"
        fi
    else
        record gpu FAIL "GPU(s): $gpus, but torch cannot use them (torch $(echo "$out" | awk '{print $2 ", CUDA build " $3}'))" \
            "a CPU-only torch, or a driver older than the CUDA build needs: update the driver, or reinstall torch from PyPI (deploy.sh)"
    fi
}

check_python() {
    local py="$PY" out
    [ "$HAVE_VENV" -eq 1 ] || py="$(command -v python3 || true)"
    if [ -z "$py" ]; then
        record python FAIL "python3 not found" "apt install python3 python3-venv"
        return
    fi
    if out="$("$py" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3]); sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>&1)"; then
        record python PASS "Python $out ($py)"
    else
        record python FAIL "Python $out at $py is too old: d3-api needs 3.10 or newer" "install python3.11 (or newer) and re-run deploy.sh"
    fi
}

check_venv() {
    local out rc
    if [ "$HAVE_VENV" -eq 0 ]; then
        record venv WARN "no virtualenv at $VENV" "deploy.sh creates it and installs requirements.txt"
        return
    fi
    out="$(app_python -c '
import importlib, sys
missing = []
for name in ("flask", "gunicorn", "torch", "torchvision", "open_clip", "PIL", "cv2", "numpy", "sqlalchemy",
             "alembic", "psycopg2", "minio", "dotenv", "api.config", "api.detector"):
    try:
        importlib.import_module(name)
    except Exception as exc:
        missing.append(f"{name} ({exc.__class__.__name__}: {exc})")
import torch
print("FAIL" if missing else "OK", "; ".join(missing) or torch.__version__)' 2>&1)"
    rc=$?
    case "$out" in
        OK*) record venv PASS "$VENV imports the app and its requirements (torch ${out#OK })" ;;
        FAIL*) record venv FAIL "cannot import: ${out#FAIL }" "reinstall: $VENV/bin/pip install -r $CODE_DIR/requirements.txt (deploy.sh does)" ;;
        *) record venv FAIL "the virtualenv's Python does not run (exit $rc): $(first_line "$out")" "remove $VENV and re-run deploy.sh" ;;
    esac
}

check_env() {
    if [ ! -e "$ENV_FILE" ]; then
        record env WARN "no settings file at $ENV_FILE" "deploy.sh creates it from .env.example with a generated SECRET_KEY"
        return
    fi
    if [ ! -r "$ENV_FILE" ]; then
        record env FAIL "$ENV_FILE is not readable by $(id -un)" "run this check as root or as the service user"
        return
    fi
    local example mode DEFAULTED=""
    example="$CODE_DIR/.env.example"
    if [ -f "$example" ]; then
        DEFAULTED="$(dotenv_missing "$ENV_FILE" "$example" | wc -l)"
        [ "$DEFAULTED" -gt 0 ] || DEFAULTED=""
    fi
    mode="$(stat -c %a "$ENV_FILE" 2>/dev/null || echo 600)"
    case "$mode" in
        *[1-7]) record env WARN "$ENV_FILE is readable by every user (mode $mode)" "chmod 640 $ENV_FILE (owner root, group d3)" ;;
        *) record env PASS "$ENV_FILE is in place, readable by the service only${DEFAULTED:+ ($DEFAULTED settings of .env.example left at their defaults)}" ;;
    esac
}

# The application's checks, all in one `d3 check` run (one Python start): its JSON lines become records.
run_app_checks() { # run_app_checks NAME...: the wanted ones among APP_CHECKS
    local names=("$@") name out rc
    if [ "$HAVE_VENV" -eq 0 ] || [ "$HAVE_ENV" -eq 0 ]; then
        for name in "${names[@]}"; do
            need_env_and_venv "$name"
        done
        return
    fi
    local errors
    errors="$(mktemp)"
    out="$(d3 check --json --only "$(IFS=,; printf '%s' "${names[*]}")" 2>"$errors")"
    rc=$?  # 0: all pass, 1: some check failed (the JSON says which), anything else: d3 check itself broke
    [ "$rc" -le 1 ] || out="$out$(cat "$errors")"
    rm -f "$errors"
    if [ "$rc" -le 1 ]; then
        out="$(printf '%s' "$out" | app_python -c '
import json, sys
text = sys.stdin.read()
try:
    report = json.loads(text)
except ValueError:
    print(text.strip().splitlines()[-1] if text.strip() else "no output")
    raise SystemExit(3)
for check in report["checks"]:
    fields = (check["name"], check["status"], check["message"], check["hint"])
    print("\t".join(" ".join(str(field).split()) for field in fields))
' 2>&1)"
        rc=$?
    fi
    if [ "$rc" -ne 0 ]; then
        for name in "${names[@]}"; do
            if [ "$rc" -eq 124 ]; then
                record "$name" FAIL "d3 check timed out after ${PROBE_TIMEOUT}s" "raise D3_CHECK_TIMEOUT or look at what hangs"
            else
                record "$name" FAIL "d3 check crashed (exit $rc): $(first_line "$out")" "run it by hand: $PY -m api.cli check"
            fi
        done
        return
    fi
    local status msg hint
    while IFS=$'\t' read -r name status msg hint; do
        case "$status" in
            PASS|WARN|FAIL) record "$name" "$status" "$msg" "$hint" ;;
        esac
    done <<<"$out"
}

check_port() {
    local bind host port body owner
    bind="$(setting BIND 127.0.0.1:6000)"
    host="${bind%:*}"
    port="${bind##*:}"
    host="${host#[}"
    host="${host%]}"
    case "$host" in ''|0.0.0.0|'*') host=127.0.0.1 ;; ::) host=::1 ;; esac
    if ! [[ "$port" =~ ^[0-9]+$ ]]; then
        record port FAIL "BIND=$bind has no port number" "BIND=127.0.0.1:6000"
        return
    fi
    if ! (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then
        record port PASS "$bind is free"
        return
    fi
    body="$(curl -s -m 5 "http://$bind/health" 2>/dev/null || true)"
    if [[ "$body" == *'"status"'* && "$body" == *'"model"'* ]]; then
        record port PASS "$bind is in use by d3-api itself (running; deploy.sh restarts it)"
        return
    fi
    owner="$(ss -Hltnp "sport = :$port" 2>/dev/null | sed -nE 's/.*users:\(\("([^"]+)".*/\1/p' | head -n 1)"
    record port FAIL "$bind is in use by another program${owner:+ ($owner)}" \
        "stop that program, or set BIND to a free port in $ENV_FILE (and re-run deploy.sh for nginx's upstream)"
}

check_nginx() {
    local nginx out
    nginx="$(command -v nginx || { [ -x /usr/sbin/nginx ] && echo /usr/sbin/nginx; } || true)"
    if [ -z "$nginx" ]; then
        record nginx WARN "nginx is not installed" "deploy.sh installs it (apt); --no-nginx if TLS ends elsewhere"
        return
    fi
    if [ "$(id -u)" -ne 0 ]; then
        record nginx WARN "nginx -t not run: it needs root to read the certificates" "run this check as root"
        return
    fi
    if out="$("$nginx" -t 2>&1)"; then
        local site="not installed yet"
        for f in /etc/nginx/sites-enabled/d3-api.conf /etc/nginx/conf.d/d3-api.conf; do
            [ -e "$f" ] && site="$f"
        done
        record nginx PASS "nginx -t passes (d3-api site: $site)"
    else
        record nginx FAIL "nginx -t fails: $(printf '%s' "$out" | grep -m1 -E 'emerg|alert|crit|error' || first_line "$out")" \
            "fix the file it names; certificates missing? see 'TLS' in DEPLOYMENT.md"
    fi
}

# True when every complaint of systemd-analyze is a command file that does not exist (yet).
not_deployed_only() {
    local line path n=0
    while IFS= read -r line; do
        [ -n "$line" ] || continue
        [[ "$line" =~ Command\ (/[^ ]+)\ is\ not\ executable:\ No\ such\ file ]] || return 1
        path="${BASH_REMATCH[1]}"
        [ ! -e "$path" ] || return 1
        n=$((n + 1))
    done <<<"$1"
    [ "$n" -gt 0 ]
}

check_unit() {
    local unit="$UNIT_FILE" out rc
    if ! command -v systemd-analyze >/dev/null 2>&1; then
        record unit WARN "systemd-analyze not found, unit not verified" "apt install systemd"
        return
    fi
    if [ -z "$unit" ]; then
        unit=/etc/systemd/system/d3-api.service
        [ -f "$unit" ] || unit="$CODE_DIR/d3-api.service"
    fi
    if [ ! -f "$unit" ]; then
        record unit FAIL "unit file $unit not found" "deploy.sh installs it from the source tree"
        return
    fi
    out="$(systemd-analyze verify "$unit" 2>&1)"
    rc=$?
    if [ "$rc" -eq 0 ] && [ -z "$out" ]; then
        record unit PASS "$unit verifies"
    elif not_deployed_only "$out"; then
        record unit WARN "$unit verifies, except that what it runs is not installed yet: $(first_line "$out")" \
            "run deploy.sh, then check again"
    else
        record unit FAIL "systemd-analyze verify $unit: $(first_line "$out")" "fix the unit (or its drop-ins: systemctl cat d3-api)"
    fi
}

check_disk() {
    local min="${D3_CHECK_MIN_FREE_GB:-10}" warn="${D3_CHECK_WARN_FREE_GB:-30}" dir path free worst="" worst_free=-1 seen=""
    for path in "$APP_DIR" "$(setting INSTANCE_DIR "$APP_DIR/instance")" "${TMPDIR:-/tmp}"; do
        dir="$path"
        while [ ! -d "$dir" ] && [ "$dir" != "/" ]; do dir="$(dirname "$dir")"; done
        free="$(df -Pk "$dir" 2>/dev/null | awk 'NR == 2 {print int($4 / 1048576)}')"
        [ -n "$free" ] || continue
        case " $seen " in *" $free:$dir "*) continue ;; esac
        seen="$seen $free:$dir"
        if [ "$worst_free" -lt 0 ] || [ "$free" -lt "$worst_free" ]; then
            worst_free=$free
            worst=$path
        fi
    done
    if [ "$worst_free" -lt 0 ]; then
        record disk WARN "could not read free space (df)" ""
    elif [ "$worst_free" -lt "$min" ]; then
        record disk FAIL "only ${worst_free} GB free for $worst (need ${min} GB: torch ~6 GB, weights ~1 GB, uploads)" \
            "free space or move the app/instance folder to a larger disk"
    elif [ "$worst_free" -lt "$warn" ]; then
        record disk WARN "${worst_free} GB free for $worst: enough to install, little room for stored videos" \
            "plan for KEEP_VIDEOS storage or set KEEP_VIDEOS=false; see 'Backups' in DEPLOYMENT.md"
    else
        record disk PASS "${worst_free} GB free or more for the app, instance data and uploads"
    fi
}

APP_WANTED=()
for name in $APP_CHECKS; do
    wanted "$name" && APP_WANTED+=("$name")
done
for name in $ALL_CHECKS; do
    case " $APP_CHECKS " in
        *" $name "*)  # the app's checks run together, where the first of them stands
            if [ "$name" = "${APP_WANTED[0]:-}" ]; then
                run_app_checks "${APP_WANTED[@]}"
            fi
            ;;
        *) if wanted "$name"; then "check_$name"; fi ;;
    esac
done

if [ "$JSON" -eq 1 ]; then
    print_json
else
    printf 'summary: %d pass, %d warn, %d fail (%s)\n' "$N_PASS" "$N_WARN" "$N_FAIL" "$APP_DIR"
fi
[ "$N_FAIL" -eq 0 ]
