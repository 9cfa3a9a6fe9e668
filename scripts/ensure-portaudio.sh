#!/usr/bin/env bash
# The microphone source (extra `audio`: sounddevice) loads PortAudio's shared library
# when it is imported; with it, tests/test_keyword.py runs the real PortAudio path (a
# machine with no sound card gets "cannot open microphone ...", not "not installed").
# Debian's libportaudio2, installed when missing and apt-get can.
set -euo pipefail
if ldconfig -p 2>/dev/null | grep -q 'libportaudio\.so\.2'; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "libportaudio2 not found: installing Debian's libportaudio2 package"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends libportaudio2
    exit 0
fi
echo "error: the microphone source needs PortAudio (libportaudio.so.2); install it (Debian/Ubuntu: sudo apt-get install libportaudio2; macOS: brew install portaudio) and run make again" >&2
exit 1
