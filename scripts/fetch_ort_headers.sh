#!/usr/bin/env bash
# Fetch ONNX Runtime's C/C++ headers (Debian trixie's libonnxruntime-dev) into a build folder.
# The onnxruntime wheels ship no headers. This uses a private apt state directory, so the
# machine's apt configuration is left untouched. Prints the ONNXRUNTIME_ROOT to use.
set -euo pipefail
dest="${1:-$(cd "$(dirname "$0")/.." && pwd)/build/onnxruntime-headers}"
if [ -f "$dest/include/onnxruntime_cxx_api.h" ]; then
  echo "$dest"
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/etc/preferences.d"
cat > "$work/sources.list" <<SRC
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main
SRC
apt_opts=(
  -o "APT::Sandbox::User=root"
  -o "Dir::Etc::SourceList=$work/sources.list"
  -o "Dir::Etc::SourceParts=$work/none"
  -o "Dir::Etc::Preferences=$work/etc/preferences"
  -o "Dir::Etc::PreferencesParts=$work/etc/preferences.d"
  -o "Dir::State::Lists=$work/lists"
  -o "Dir::State::Status=$work/status"
  -o "Dir::Cache=$work/cache"
  -o "APT::Architecture=amd64"
  -o "Debug::NoLocking=1"
)
touch "$work/status"
apt-get "${apt_opts[@]}" -qq update >&2
(cd "$work" && apt-get "${apt_opts[@]}" -qq download libonnxruntime-dev >&2)
deb="$(ls "$work"/libonnxruntime-dev_*.deb)"
dpkg-deb -x "$deb" "$work/x"
mkdir -p "$dest/include"
cp -r "$work/x/usr/include/onnxruntime/." "$dest/include/"
echo "$dest"
