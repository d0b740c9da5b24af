#!/usr/bin/env bash
# check_deployment.sh: pre-deployment checker of d3-api. Read-only, safe to run at any time,
# as root or as the service user. One line per check, PASS / WARN / FAIL, with a hint on what to
# do; the exit status is 1 when any check FAILs, 0 otherwise (2 on a usage error).
#
#   ./check_deployment.sh                       # checks the deployment this script belongs to
#   ./check_deployment.sh --app-dir /opt/d3-api # or another one
#   ./check_deployment.sh --json                # machine-readable
#
# Checks: gpu python venv env weights inference database objectstore broker port nginx unit disk.
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

Checks: gpu python venv env weights inference database objectstore broker port nginx unit disk
Environment: D3_CHECK_MIN_FREE_GB (default 10: FAIL below), D3_CHECK_WARN_FREE_GB (default 30: WARN
below), D3_CHECK_TIMEOUT (seconds for each Python probe, default 600).
EOF
}

ALL_CHECKS="gpu python venv env weights inference database objectstore broker port nginx unit disk"
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"

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
# The file is read like systemd's EnvironmentFile= does (KEY=VALUE lines, optional quotes) and its
# values win over the caller's environment, as they do in the service.
ENV_KEYS=()
load_env_file() {
    local line key value
    while IFS= read -r line || [ -n "$line" ]; do
        line="${line#"${line%%[![:space:]]*}"}"
        case "$line" in ''|'#'*|';'*) continue ;; esac
        line="${line#export }"
        case "$line" in *=*) ;; *) continue ;; esac
        key="${line%%=*}"
        key="${key%"${key##*[![:space:]]}"}"
        value="${line#*=}"
        value="${value#"${value%%[![:space:]]*}"}"
        value="${value%"${value##*[![:space:]]}"}"
        if [ "${#value}" -ge 2 ]; then
            case "$value" in
                \"*\") value="${value:1:${#value}-2}" ;;
                \'*\') value="${value:1:${#value}-2}" ;;
            esac
        fi
        [[ "$key" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || continue
        export "$key=$value"
        ENV_KEYS+=("$key")
    done <"$1"
}

HAVE_ENV=0
if [ -f "$ENV_FILE" ] && [ -r "$ENV_FILE" ]; then
    load_env_file "$ENV_FILE"
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

# Each Python probe prints "STATUS<TAB>message<TAB>hint" lines; they become records.
record_probe() { # record_probe NAME OUTPUT RC
    local name=$1 out=$2 rc=$3 line status msg hint n=0
    while IFS=$'\t' read -r status msg hint; do
        case "$status" in
            PASS|WARN|FAIL) record "$name" "$status" "$msg" "$hint"; n=$((n + 1)) ;;
        esac
    done <<<"$out"
    if [ "$n" -eq 0 ]; then
        line="$(first_line "$out")"
        if [ "$rc" -eq 124 ]; then
            record "$name" FAIL "probe timed out after ${PROBE_TIMEOUT}s" "raise D3_CHECK_TIMEOUT or look at what hangs"
        else
            record "$name" FAIL "probe crashed (exit $rc): ${line:-no output}" "run it by hand: $PY -c 'import api.config'"
        fi
    fi
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

is_placeholder() {
    case "$(printf '%s' "$1" | tr '[:upper:]' '[:lower:]')" in
        ''|change-me|changeme|change_me|minioadmin|secret|password|example|xxx*|todo|placeholder|your-*|\<*\>) return 0 ;;
    esac
    return 1
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
    local problems=() warnings=() key value example mode DEFAULTED=""
    value="$(setting SECRET_KEY '')"
    # The app's own secret policy (api/config.py SECRET_MIN_LENGTH); 16 if the app cannot be run.
    local min_length=16
    if [ "$HAVE_VENV" -eq 1 ]; then
        min_length="$(app_python -c 'from api.config import SECRET_MIN_LENGTH; print(SECRET_MIN_LENGTH)' 2>/dev/null)" \
            || min_length=16
    fi
    if is_placeholder "$value"; then
        problems+=("SECRET_KEY is ${value:+the placeholder }'${value:-empty}'")
    elif [ "${#value}" -lt "$min_length" ]; then
        problems+=("SECRET_KEY is only ${#value} characters (at least $min_length)")
    fi
    if [ -n "$(setting MINIO_ENDPOINT '')" ]; then
        for key in MINIO_ACCESS_KEY MINIO_SECRET_KEY; do
            value="$(setting "$key" '')"
            if is_placeholder "$value"; then
                problems+=("$key is ${value:+the placeholder }'${value:-empty}'")
            fi
        done
    fi
    value="$(setting DATABASE_URL '')"
    if [[ "$value" =~ ://[^:/@]+:([^@]*)@ ]] && is_placeholder "${BASH_REMATCH[1]}"; then
        problems+=("DATABASE_URL has a placeholder password")
    fi
    example="$CODE_DIR/.env.example"
    if [ -f "$example" ]; then
        local missing=()
        while IFS= read -r key; do
            grep -Eq "^[[:space:]]*(export[[:space:]]+)?${key}[[:space:]]*=" "$ENV_FILE" || missing+=("$key")
        done < <(sed -nE 's/^[[:space:]]*([A-Z][A-Z0-9_]*)=.*/\1/p' "$example")
        [ "${#missing[@]}" -eq 0 ] || DEFAULTED="${#missing[@]}"
    fi
    mode="$(stat -c %a "$ENV_FILE" 2>/dev/null || echo 600)"
    case "$mode" in *[1-7]) warnings+=("readable by every user (mode $mode)") ;; esac
    if [ "${#problems[@]}" -eq 0 ] && [ "$HAVE_VENV" -eq 1 ]; then
        local out
        if ! out="$(app_python -c 'from api.config import load_settings; load_settings()' 2>&1)"; then
            problems+=("the app refuses it: $(first_line "$out")")
        fi
    fi
    if [ "${#problems[@]}" -gt 0 ]; then
        local joined
        joined="$(printf '%s; ' "${problems[@]}")"
        record env FAIL "$ENV_FILE: ${joined%; }" \
            "edit $ENV_FILE: a secret from 'openssl rand -hex 32' for SECRET_KEY, the real MinIO/PostgreSQL credentials"
    elif [ "${#warnings[@]}" -gt 0 ]; then
        local joined
        joined="$(printf '%s; ' "${warnings[@]}")"
        record env WARN "$ENV_FILE is usable, but ${joined%; }" "chmod 640 $ENV_FILE (owner root, group d3)"
    else
        record env PASS "$ENV_FILE has no placeholder secrets and the app accepts it${DEFAULTED:+ ($DEFAULTED settings of .env.example left at their defaults)}"
    fi
}

check_weights() {
    need_env_and_venv weights || return
    local info out rc
    info="$(d3 info --json 2>&1)"
    rc=$?
    if [ "$rc" -ne 0 ]; then
        record weights FAIL "'d3 info' failed (exit $rc): $(first_line "$info")" "run it by hand: $APP_DIR/bin/d3 info"
        return
    fi
    out="$(D3_INFO_JSON="$info" app_python - <<'PYEOF' 2>&1
import json
import os

text = os.environ["D3_INFO_JSON"]
data = json.loads(text[text.index("{"):])


def say(status, message, hint=""):
    print(f"{status}\t{message}\t{hint}")


where = f"device {data.get('device')}, {data.get('precision')}"
if data.get("weights_ok"):
    note = "" if data.get("trained") else " (random, untrained: for tests only)"
    say("PASS", f"{data.get('model_version')} present and loadable ({where}){note}")
    raise SystemExit(0)
fatal, later = [], []
for part, entry in data.get("weights", {}).items():
    if entry.get("loadable"):
        continue
    setting, path = entry.get("setting"), entry.get("path")
    if not entry.get("present") and not (entry.get("kind") == "file" and entry.get("value")):
        later.append(f"{part} ({setting}={entry.get('value') or 'default'})")  # d3 fetch-weights gets it
    elif not entry.get("present"):
        fatal.append((f"{part} weights file not found: {path} ({setting})",
                      f"copy the checkpoint to {path} or correct {setting}"))
    else:
        fatal.append((f"{part} weights present but not loadable: {entry.get('error') or 'unknown error'}",
                      "damaged or of another model: run d3 fetch-weights again, or check the D3_* settings"))
if fatal:
    say("FAIL", "; ".join(message for message, _ in fatal), fatal[0][1])
elif later:
    say("WARN", f"not downloaded yet: {', '.join(later)} (cache {data.get('cache_dir')})",
        "deploy.sh runs d3 fetch-weights --if-missing; offline, copy the files into the cache by hand")
else:
    say("FAIL", "weights not usable: " + json.dumps(data.get("weights"))[:300], "run d3 info")
PYEOF
)"
    rc=$?
    record_probe weights "$out" "$rc"
}

# With D3_INFERENCE_URL set: the tier answers, and serves the model version the settings describe
# (same weights, seed and precision), so the API records the version it was configured for.
check_inference() {
    local url
    url="$(setting D3_INFERENCE_URL "")"
    if [ -z "$url" ]; then
        record inference PASS "D3_INFERENCE_URL not set: the model runs in each API worker"
        return
    fi
    need_env_and_venv inference || return
    local out rc
    out="$(app_python - <<'PYEOF' 2>&1
from api.config import load_settings
from api.detector.config import DetectorConfig
from api.detector.remote_engine import RemoteConfig, RemoteEngine
from api.detector.weights import resolve_weights

settings = load_settings()
url = settings.d3_inference_url
host = url.split("://", 1)[1].rsplit(":", 1)[0].strip("[]")
local = host in ("localhost", "::1") or host.startswith("127.")
engine = RemoteEngine(RemoteConfig.from_settings(settings))
try:
    engine.connect(settings.d3_inference_timeout_s)
except Exception as exc:  # noqa: BLE001
    status = "WARN" if local else "FAIL"
    hint = ("deploy.sh installs and starts d3-inference.service; then: journalctl -u d3-inference" if local
            else "start the tier on its host (d3-inference.service) and check the firewall")
    print(f"{status}\tthe inference tier at {url} does not answer: {type(exc).__name__}: {exc}\t{hint}")
    raise SystemExit(0)
tier = engine.tier_model
precision = settings.d3_precision if settings.d3_precision != "auto" else tier.precision
try:
    expected = resolve_weights(DetectorConfig.from_settings(settings), download=False).model_version(precision)
except Exception as exc:  # noqa: BLE001
    print(f"FAIL\tthe tier answers, but the expected model version cannot be computed: {exc}\tsee the weights check")
    raise SystemExit(0)
if tier.model_version != expected:
    print(f"FAIL\tthe tier at {url} serves {tier.model_version}, the settings describe {expected}\t"
          "give the tier the same D3_* model settings (restart d3-inference), or point D3_INFERENCE_URL at the right tier")
else:
    kind = "trained" if tier.trained else "random, untrained: for tests only"
    print(f"PASS\tthe tier at {url} answers and serves {expected} ({kind}) on {tier.device or '?'}\t")
PYEOF
)"
    rc=$?
    record_probe inference "$out" "$rc"
}

check_database() {
    need_env_and_venv database || return
    local out rc current
    out="$(app_python - <<'PYEOF' 2>&1
import os

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from api.config import load_settings

url = load_settings().resolved_database_url
parsed = make_url(url)
shown = parsed.render_as_string(hide_password=True)
args = {"connect_timeout": 5} if url.startswith("postgres") else {}
if parsed.get_backend_name() == "sqlite" and parsed.database and not os.path.exists(parsed.database):
    print(f"WARN\t{shown} does not exist yet\tdeploy.sh creates it with 'd3 db upgrade' (PostgreSQL is "
          "recommended in production: DATABASE_URL)")
    raise SystemExit(0)
try:
    with create_engine(url, connect_args=args).connect() as conn:
        conn.execute(text("SELECT 1"))
except Exception as exc:  # noqa: BLE001
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
    print(f"FAIL\tcannot connect to {shown}: {reason}\tstart PostgreSQL (systemctl start postgresql) and check "
          "DATABASE_URL: host, port, user, password, database")
else:
    print(f"REACHABLE\t{shown}")
PYEOF
)"
    rc=$?
    case "$out" in
        REACHABLE*) ;;
        *) record_probe database "$out" "$rc"; return ;;
    esac
    local shown="${out#REACHABLE$'\t'}"
    current="$(d3 db current 2>&1)"
    rc=$?
    current="$(first_line "$current")"
    if [ "$rc" -eq 0 ]; then
        record database PASS "$shown reachable, schema migrated ($current)"
    elif [ "$rc" -eq 1 ]; then
        record database WARN "$shown reachable, schema not at the newest revision ($current)" \
            "deploy.sh runs 'd3 db upgrade' (back up first: DEPLOYMENT.md)"
    else
        record database FAIL "$shown reachable, but 'd3 db current' failed (exit $rc): $current" "run it by hand: $APP_DIR/bin/d3 db current"
    fi
}

check_objectstore() {
    need_env_and_venv objectstore || return
    local out rc
    out="$(app_python - <<'PYEOF' 2>&1
import uuid

from api.config import load_settings
from api.storage import make_object_store

settings = load_settings()
store = make_object_store(settings, b"check-deployment")
buckets = (settings.bucket_results, settings.bucket_videos, settings.bucket_frames)
where = f"MinIO at {settings.minio_endpoint}" if settings.uses_minio else f"local folder {settings.resolved_object_store_dir}"
hint = ("start MinIO and check MINIO_ENDPOINT / MINIO_SECURE and the keys; the keys need read/write on the buckets"
        if settings.uses_minio else "create the folder and make it writable by the service user")
try:
    store.ensure_buckets()
    key = f"check-deployment-{uuid.uuid4().hex}.txt"
    for bucket in buckets:
        store.put_bytes(bucket, key, b"probe", "text/plain")
        if store.get_bytes(bucket, key) != b"probe":
            raise RuntimeError(f"read back a different object from {bucket}")
        store.delete(bucket, key)
except Exception as exc:  # noqa: BLE001
    print(f"FAIL\t{where}: {exc.__class__.__name__}: {exc}\t{hint}")
else:
    print(f"PASS\t{where} reachable, buckets {', '.join(buckets)} writable\t")
PYEOF
)"
    rc=$?
    record_probe objectstore "$out" "$rc"
}

check_broker() {
    need_env_and_venv broker || return
    local out rc
    out="$(app_python - <<'PYEOF' 2>&1
from urllib.parse import urlsplit

import redis

from api.config import load_settings

settings = load_settings()
if not settings.uses_celery:
    print("PASS\tno job queue configured: video jobs run in the API process (d3-worker not needed)\t")
    raise SystemExit(0)
url = settings.broker_url
parts = urlsplit(url)
shown = f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"  # no password in the output
try:
    redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3).ping()
except Exception as exc:  # noqa: BLE001
    print(f"FAIL\tthe job queue broker at {shown} does not answer: {exc.__class__.__name__}: {exc}\t"
          "start Redis (systemctl start redis-server) and check CELERY_BROKER_URL / REDIS_URL")
else:
    print(f"PASS\tjob queue broker at {shown} answers; video jobs go to d3-worker\t")
PYEOF
)"
    rc=$?
    record_probe broker "$out" "$rc"
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

for name in $ALL_CHECKS; do
    if wanted "$name"; then
        "check_$name"
    fi
done

if [ "$JSON" -eq 1 ]; then
    print_json
else
    printf 'summary: %d pass, %d warn, %d fail (%s)\n' "$N_PASS" "$N_WARN" "$N_FAIL" "$APP_DIR"
fi
[ "$N_FAIL" -eq 0 ]
