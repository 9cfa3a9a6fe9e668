#!/bin/sh
# Install (or remove) edge-agent as a systemd service on a Raspberry Pi, a Jetson or
# any systemd Linux. Idempotent: running it again changes only what differs, and never
# overwrites an operator's /etc/edge-agent/agent.yaml. See docs/operations.md.
#
#   sudo systemd/install.sh                  install from this checkout and enable
#   sudo systemd/install.sh --from X.whl     install from a wheel instead
#   sudo systemd/install.sh --start          ... and (re)start the service
#   sudo systemd/install.sh --uninstall      remove the service and /opt/edge-agent
#   sudo systemd/install.sh --uninstall --purge   also config, state, logs and the user
#
# Options:
#   --root DIR      write everything under DIR (an image, a test's scratch dir). Host
#                   changes (useradd, groupadd, chown, systemctl start/daemon-reload)
#                   are printed as "would run: ..." instead; enable/disable use
#                   `systemctl --root=DIR`, which only writes symlinks under DIR.
#   --from PATH     a wheel (.whl) or a source directory; default: this script's repo
#   --extra LIST    pip extras, comma-separated; default: the runtime for this Python
#                   and machine (litert on 3.10-3.13 x86_64/aarch64, tflite on armv7l
#                   <= 3.11) plus camera (OpenCV)
#   --python PY     interpreter for the venv (default python3)
#   --constraints F pip constraints (default: the target's file in constraints/ of --from,
#                   or of this repo, chosen from the OS and the Python: Jetson
#                   (/etc/nv_tegra_release) jetpack6.txt, VERSION_CODENAME trixie
#                   trixie.txt, bookworm bookworm-tflite.txt; when that file is not for
#                   the Python, or the OS is another, by Python: 3.10 jetpack6.txt,
#                   3.11 bookworm-tflite.txt, 3.12-3.13 trixie.txt)
#   --system-site-packages   let the venv see apt's packages (python3-picamera2 on a Pi)
#   --no-venv       skip creating the venv and pip; check the config with
#                   `PY -m agent` instead (the agent must already import there)
#   --no-systemctl  touch no systemd state at all (print what would run)
#   --start         (re)start the service after installing
#   --show-extras   print the extras chosen for --python and exit
#   --show-constraints   print the constraints file chosen (and why) and exit
# pip honours PIP_INDEX_URL, PIP_FIND_LINKS, PIP_NO_INDEX ... for offline installs.
set -eu

NAME=edge-agent
SCRIPT_DIR=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$SCRIPT_DIR/.." && pwd)
GROUPS_WANTED="video dialout plugdev"   # the unit's SupplementaryGroups=

ROOT=/
FROM=$REPO
EXTRAS=
PY=python3
CONSTRAINTS=
SITE=
NO_VENV=0
NO_SYSTEMCTL=0
START=0
UNINSTALL=0
PURGE=0
SHOW_EXTRAS=0
SHOW_CONSTRAINTS=0

die() { echo "install.sh: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
    case $1 in
        --root) ROOT=${2:?--root needs a directory}; shift ;;
        --from) FROM=${2:?--from needs a path}; shift ;;
        --extra) EXTRAS=${2:?--extra needs a list}; shift ;;
        --python) PY=${2:?--python needs an interpreter}; shift ;;
        --constraints) CONSTRAINTS=${2:?--constraints needs a file}; shift ;;
        --system-site-packages) SITE=--system-site-packages ;;
        --no-venv) NO_VENV=1 ;;
        --no-systemctl) NO_SYSTEMCTL=1 ;;
        --start) START=1 ;;
        --uninstall) UNINSTALL=1 ;;
        --purge) PURGE=1 ;;
        --show-extras) SHOW_EXTRAS=1 ;;
        --show-constraints) SHOW_CONSTRAINTS=1 ;;
        -h|--help) sed -n '2,/^set -eu/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
    shift
done

[ "$PURGE" = 0 ] || [ "$UNINSTALL" = 1 ] || die "--purge goes with --uninstall"

# ------------------------------------------------------------------------ helpers

ROOT=$(cd "$ROOT" 2>/dev/null && pwd) || die "--root: no such directory"
R=${ROOT%/}                       # prefix for every path written; empty for /
HOST=1                            # change the running system?
[ -z "$R" ] || HOST=0

OPT=$R/opt/$NAME
VENV=$OPT/venv
ETC=$R/etc/$NAME
UNIT_DIR=$R/etc/systemd/system
STATE=$R/var/lib/$NAME
LOGS=$R/var/log/$NAME

say() { echo "$*"; }

# A command that changes the host: run it for real only when installing into /.
host() {
    if [ "$HOST" = 1 ]; then "$@"; else say "would run: $*"; fi
}

# Whether systemctl may act for this call: on the host, or under --root for the
# commands that only write symlinks there (enable, disable, is-enabled).
systemctl_usable() {
    [ "$NO_SYSTEMCTL" = 0 ] && command -v systemctl >/dev/null 2>&1 || return 1
    [ "$HOST" = 1 ] && return 0
    case $1 in enable|disable|is-enabled) return 0 ;; *) return 1 ;; esac
}

systemd_cmd() {
    if ! systemctl_usable "$1"; then
        say "would run: systemctl $*"
    elif [ "$HOST" = 1 ]; then
        systemctl "$@"
    else
        systemctl --root="$ROOT" "$@"
    fi
}

# install FILE to DEST with MODE only when DEST is missing or differs.
put() {
    src=$1 dest=$2 mode=$3
    if [ -f "$dest" ] && cmp -s "$src" "$dest"; then
        [ "$(stat -c %a "$dest")" = "$mode" ] || { chmod "$mode" "$dest"; say "mode $mode: $dest"; }
        return 0
    fi
    verb=updated
    [ -e "$dest" ] || verb=installed
    install -m "$mode" "$src" "$dest"
    say "$verb: $dest"
}

# install FILE to DEST only when DEST does not exist (an operator's file stays).
put_once() {
    if [ -e "$2" ]; then
        say "kept: $2"
    else
        install -m "$3" "$1" "$2"
        say "installed: $2"
    fi
}

mkdir_mode() {
    if [ ! -d "$1" ]; then
        install -d -m "$2" "$1"
        say "created: $1"
    fi
}

# Sets ver ("3.11"), minor (11) and machine from the target interpreter, not this shell's.
probe_python() {
    probe=$("$PY" -c 'import platform, sys; print("%d.%d %s" % (sys.version_info[:2] + (platform.machine(),)))') \
        || die "cannot run $PY"
    set -- $probe
    ver=$1 machine=$2
    minor=${ver#3.}
    [ "${ver%%.*}" = 3 ] && [ "$minor" -ge 10 ] || die "Python $ver: edge-agent needs Python >= 3.10"
}

choose_extras() {
    probe_python
    case $machine in
        x86_64|amd64|aarch64|arm64)
            # ai-edge-litert (LiteRT) has wheels for 3.10-3.13 here and is the fastest runtime.
            [ "$minor" -le 13 ] && { echo "litert,camera"; return; } ;;
        armv7l|armv6l)
            # 32-bit Pi OS: only tflite-runtime 2.14 has wheels, up to Python 3.11.
            [ "$minor" -le 11 ] && { echo "tflite,camera"; return; } ;;
    esac
    die "no TFLite runtime wheels known for Python $ver on $machine: pass --python with another interpreter, or --extra"
}

# Whether a target's constraints are for this Python (its pins have wheels for it).
target_fits() {
    case $1:$minor in
        jetpack6:10|bookworm-tflite:11|trixie:12|trixie:13) return 0 ;;
    esac
    return 1
}

# stdout: "TARGET WHY", TARGET naming constraints/TARGET.txt. The OS is the one being
# installed into: under --root, the image's own /etc.
choose_target() {
    probe_python
    codename=$(sed -n 's/^VERSION_CODENAME=//p' "$R/etc/os-release" 2>/dev/null | tr -d '"' | head -n 1)
    if [ -e "$R/etc/nv_tegra_release" ]; then
        target=jetpack6 os="Jetson"
    else
        case $codename in
            trixie) target=trixie os="Debian trixie" ;;
            bookworm) target=bookworm-tflite os="Debian bookworm" ;;
            *) target= os=${codename:-an unknown OS} ;;
        esac
    fi
    if [ -n "$target" ] && target_fits "$target"; then
        echo "$target $os, Python $ver"
        return
    fi
    for t in jetpack6 bookworm-tflite trixie; do
        if target_fits "$t"; then
            echo "$t Python $ver (on $os)"
            return
        fi
    done
    die "no constraints for Python $ver (constraints/ has files for 3.10 to 3.13): pass --constraints"
}

# --------------------------------------------------------------------- uninstall

uninstall() {
    if [ -e "$UNIT_DIR/$NAME.service" ]; then
        if [ "$HOST" = 1 ]; then
            systemd_cmd disable --now "$NAME.service" || true
        else
            systemd_cmd disable "$NAME.service" 2>/dev/null || true
        fi
        rm -f "$UNIT_DIR/$NAME.service"
        say "removed: $UNIT_DIR/$NAME.service"
        systemd_cmd daemon-reload
    fi
    if [ -d "$OPT" ]; then
        rm -rf "$OPT"
        say "removed: $OPT"
    fi
    if [ "$PURGE" = 1 ]; then
        for d in "$ETC" "$STATE" "$LOGS"; do
            if [ -e "$d" ]; then rm -rf "$d"; say "removed: $d"; fi
        done
        if [ "$HOST" = 0 ] || getent passwd "$NAME" >/dev/null; then host userdel "$NAME"; fi
    else
        for d in "$ETC" "$STATE"; do
            if [ -e "$d" ]; then say "kept: $d (--purge removes it)"; fi
        done
    fi
    say "edge-agent uninstalled"
}

# ----------------------------------------------------------------------- install

ensure_user() {
    for g in $GROUPS_WANTED; do
        if [ "$HOST" = 0 ]; then
            say "would run: groupadd --system $g  # when missing"
        elif ! getent group "$g" >/dev/null; then
            groupadd --system "$g"
            say "created group: $g"
        fi
    done
    if [ "$HOST" = 0 ]; then
        say "would run: useradd --system --user-group --home-dir /var/lib/$NAME --no-create-home --shell /usr/sbin/nologin $NAME  # when missing"
    elif ! getent passwd "$NAME" >/dev/null; then
        useradd --system --user-group --home-dir "/var/lib/$NAME" --no-create-home \
            --shell /usr/sbin/nologin "$NAME"
        say "created user: $NAME"
    fi
    for g in $GROUPS_WANTED; do
        if [ "$HOST" = 0 ]; then
            say "would run: usermod -aG $g $NAME  # when not a member"
        elif ! id -nG "$NAME" | tr ' ' '\n' | grep -qx "$g"; then
            usermod -aG "$g" "$NAME"
            say "added $NAME to group $g"
        fi
    done
}

install_venv() {
    if [ -z "$CONSTRAINTS" ]; then
        chosen=$(choose_target) || exit 2
        set -- $chosen
        target=$1
        shift
        if [ -d "$FROM" ] && [ -f "$FROM/constraints/$target.txt" ]; then
            CONSTRAINTS=$FROM/constraints/$target.txt
        else
            CONSTRAINTS=$REPO/constraints/$target.txt
        fi
        say "constraints: $CONSTRAINTS (for $*)"
    fi
    [ -f "$CONSTRAINTS" ] || die "constraints file not found: $CONSTRAINTS"
    case $FROM in
        *.whl) [ -f "$FROM" ] || die "--from: no such wheel $FROM" ;;
        *) [ -f "$FROM/pyproject.toml" ] || die "--from: $FROM is neither a wheel nor a source directory" ;;
    esac
    spec="$FROM[$EXTRAS]"
    put "$CONSTRAINTS" "$OPT/constraints.txt" 644
    if [ "$NO_VENV" = 1 ]; then
        say "skipped (--no-venv): $PY -m venv${SITE:+ $SITE} $VENV; $VENV/bin/pip install -c $OPT/constraints.txt '$spec'"
        return 0
    fi
    # Without pip the venv is one `python3 -m venv` left half-made (Debian and Pi OS create
    # bin/python, then fail when python3-venv is missing): made again, not used as it is.
    if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
        "$PY" -m venv --clear $SITE "$VENV" \
            || die "$PY -m venv failed: install its venv module (Debian, Ubuntu, Pi OS: apt install python3-venv), then run this again"
        say "created: $VENV ($($VENV/bin/python -V))"
    fi
    # pip leaves satisfied requirements alone, so a re-run only upgrades what changed.
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        -c "$OPT/constraints.txt" "$spec"
    "$VENV/bin/python" -m pip check --disable-pip-version-check >/dev/null \
        || die "pip check failed in $VENV: run $VENV/bin/pip check"
    say "venv ready: $VENV [$EXTRAS]"
}

install_files() {
    mkdir_mode "$OPT" 755
    mkdir_mode "$OPT/docs" 755
    install_venv
    if [ -f "$REPO/docs/operations.md" ]; then
        put "$REPO/docs/operations.md" "$OPT/docs/operations.md" 644
    fi

    mkdir_mode "$UNIT_DIR" 755
    put "$REPO/systemd/$NAME.service" "$UNIT_DIR/$NAME.service" 644

    # /etc/edge-agent: root-owned, readable by the agent's group (it may hold a password).
    mkdir_mode "$ETC" 750
    mkdir_mode "$ETC/keys" 750
    mkdir_mode "$ETC/samples" 750
    put_once "$REPO/configs/agent.example.yaml" "$ETC/agent.yaml" 640
    # What the example config names, so that it checks clean as installed.
    put_once "$REPO/configs/keys/example.pub" "$ETC/keys/example.pub" 644
    put_once "$REPO/configs/samples/vibration.csv" "$ETC/samples/vibration.csv" 644
    host chgrp -R "$NAME" "/etc/$NAME"

    # systemd creates these too (StateDirectory=, LogsDirectory=); made here so that
    # `edge-agent check` as the agent's user works before the first start.
    mkdir_mode "$STATE" 750
    mkdir_mode "$LOGS" 750
    host chown "$NAME:$NAME" "/var/lib/$NAME" "/var/log/$NAME"
}

check_config() {
    config=$ETC/agent.yaml
    if [ "$NO_VENV" = 1 ]; then
        set -- "$PY" -m agent
    else
        set -- "$VENV/bin/edge-agent"
    fi
    if [ "$HOST" = 1 ] && command -v runuser >/dev/null 2>&1; then
        # As the agent's user: a file it cannot read fails here, not at start-up.
        set -- runuser -u "$NAME" -- "$@"
    fi
    if "$@" check --offline "$config"; then
        return 0
    fi
    echo "install.sh: $config does not check clean: fix it, then run" >&2
    echo "  edge-agent check --offline /etc/$NAME/agent.yaml && systemctl restart $NAME" >&2
    return 1
}

enable_service() {
    systemd_cmd daemon-reload
    if ! systemctl_usable enable; then
        say "would run: systemctl enable $NAME.service"
    elif [ "$(systemd_cmd is-enabled "$NAME.service" 2>/dev/null)" = enabled ]; then
        say "unchanged: $NAME.service enabled"
    else
        systemd_cmd enable "$NAME.service" 2>/dev/null
        say "enabled: $NAME.service"
    fi
}

# --------------------------------------------------------------------------- main

if [ "$SHOW_EXTRAS" = 1 ]; then
    choose_extras
    exit 0
fi
if [ "$SHOW_CONSTRAINTS" = 1 ]; then
    chosen=$(choose_target) || exit 2
    set -- $chosen
    echo "constraints/$1.txt"
    shift
    echo "for $*"
    exit 0
fi
if [ "$HOST" = 1 ] && [ "$(id -u)" != 0 ]; then
    die "run as root (sudo), or give --root DIR to install into a directory"
fi
if [ "$UNINSTALL" = 1 ]; then
    uninstall
    exit 0
fi

[ -n "$EXTRAS" ] || EXTRAS=$(choose_extras)
ensure_user
install_files
checked=0
check_config || checked=1
enable_service
if [ "$START" = 1 ]; then
    if [ "$checked" = 0 ]; then
        systemd_cmd restart "$NAME.service"
        say "started: $NAME.service (journalctl -u $NAME -f to follow it)"
    else
        say "not started: the config does not check clean"
    fi
fi
[ "$checked" = 0 ] && say "edge-agent installed" || exit 1
