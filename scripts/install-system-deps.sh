#!/usr/bin/env bash
# System libraries nvf's Python wheels need but do not ship: Open3D's wheel links libusb-1.0 and
# libgomp. Installs them with apt-get when missing and we may (root or passwordless sudo); otherwise
# says what to install and fails.
set -euo pipefail
missing=()
ldconfig -p | grep -q 'libusb-1.0.so.0' || missing+=(libusb-1.0-0)
ldconfig -p | grep -q 'libgomp.so.1' || missing+=(libgomp1)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else
  echo "nvf needs system libraries: ${missing[*]}. Install them (Debian/Ubuntu: sudo apt-get install ${missing[*]}) and rerun." >&2
  exit 1
fi
echo "installing system libraries: ${missing[*]}" >&2
$sudo apt-get update -qq >/dev/null || true
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
