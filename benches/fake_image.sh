# Sourced by the benches: build the fake-`claude` test image.
#
#   build_fake_image IMAGE    (uses $BIN and $ROOT; CMM_BUSYBOX: a static busybox)
build_fake_image() {
    _ctx="$(mktemp -d)"
    cp -L "$ROOT"/tests/fixtures/fake-claude/* "$_ctx"/
    cp "${CMM_BUSYBOX:-/bin/busybox}" "$_ctx"/busybox
    _rc=0
    "$BIN" -q docker build --context "$_ctx" --tag "$1" >/dev/null || _rc=$?
    rm -rf "$_ctx"
    return "$_rc"
}
