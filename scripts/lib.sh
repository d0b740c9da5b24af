# shellcheck shell=bash
# scripts/lib.sh: what deploy.sh and check_deployment.sh share. Sourced, never run.
#
# The .env reader. A settings file is read the way systemd's EnvironmentFile= reads it, which is
# how the service will see it: KEY=VALUE lines, an optional `export `, blanks around the key and
# the value ignored, one pair of matching quotes around the value removed, lines starting with #
# or ; skipped, keys that are not shell names skipped; the last line for a key wins.

# dotenv_read FILE: every setting of FILE as normalised KEY=VALUE lines, in file order.
dotenv_read() {
    local line key value
    [ -f "$1" ] || return 0
    while IFS= read -r line || [ -n "$line" ]; do
        line="${line%$'\r'}"
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
        printf '%s=%s\n' "$key" "$value"
    done <"$1"
}

# dotenv_get FILE KEY: the value of KEY in FILE (empty when absent or no file).
dotenv_get() {
    local line value=""
    while IFS= read -r line; do
        [ "${line%%=*}" = "$2" ] && value="${line#*=}"
    done < <(dotenv_read "$1")
    printf '%s' "$value"
}

# dotenv_export FILE: export every setting of FILE (its values win over the environment, as in the
# service); the names go to the array DOTENV_KEYS.
DOTENV_KEYS=()
dotenv_export() {
    local line
    while IFS= read -r line; do
        export "${line?}"
        DOTENV_KEYS+=("${line%%=*}")
    done < <(dotenv_read "$1")
}

# dotenv_missing FILE EXAMPLE: the keys EXAMPLE sets that FILE does not (one per line), e.g. the
# settings a newer .env.example added since FILE was made.
dotenv_missing() {
    local present key
    present="$(dotenv_read "$1" | cut -d= -f1)"
    while IFS= read -r key; do
        grep -qxF "$key" <<<"$present" || printf '%s\n' "$key"
    done < <(dotenv_read "$2" | cut -d= -f1 | awk '!seen[$0]++')
}
