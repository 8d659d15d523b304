#!/usr/bin/env bash
# Snapshot interop: independent tools check what `cnsmctl snapshot export` writes.
#   - @sigstore/verify 3.1.1 (npm, Node 20) through ../shared/tools/verify_bundle.js must
#     VERIFY the bundle against the public key, and must reject a flipped payload byte, a
#     truncated payload, a bundle from another key and a changed signature;
#   - Python cbor2 must read the payload and ../shared/tools/det_cbor.py must find it RFC 8949
#     §4.2.1 core deterministic (byte-level check of heads, lengths and map-key order).
# The npm packages and the Python venv are installed under target/snapshot-interop/ (reused).
# Missing node, npm or python3 is an error, never a skip.
#
#   ci/snapshot-interop.sh            # from the repository root or anywhere
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
tools="$repo/../shared/tools"
work="$repo/target/snapshot-interop"
PYTHON="${PYTHON:-python3}"

fail() { echo "snapshot-interop: FAILED: $*" >&2; exit 1; }
for tool in node npm "$PYTHON"; do
  command -v "$tool" >/dev/null || fail "$tool is not installed (needed for the interop checks)"
done
[ -f "$tools/verify_bundle.js" ] && [ -f "$tools/det_cbor.py" ] || fail "$tools/verify_bundle.js or det_cbor.py missing"
node_major="$(node -p 'process.versions.node.split(".")[0]')"
[ "$node_major" -ge 20 ] || fail "Node $node_major is too old (@sigstore/verify 3.1.x needs Node 20)"

mkdir -p "$work"
# 1. @sigstore/verify 3.1.1 (+ @sigstore/bundle) under target/.
if ! [ -f "$work/node/node_modules/@sigstore/verify/package.json" ] ||
   ! grep -q '"version": "3.1.1"' "$work/node/node_modules/@sigstore/verify/package.json"; then
  echo "== snapshot-interop: installing @sigstore/verify@3.1.1 into $work/node"
  mkdir -p "$work/node"
  (cd "$work/node" && [ -f package.json ] || echo '{"private": true}' > package.json)
  npm install --prefix "$work/node" --no-audit --no-fund --silent @sigstore/verify@3.1.1 @sigstore/bundle
fi
export NODE_PATH="$work/node/node_modules"
# 2. cbor2 in a venv under target/.
if ! "$work/venv/bin/python" -c 'import cbor2' 2>/dev/null; then
  echo "== snapshot-interop: installing cbor2 into $work/venv"
  "$PYTHON" -m venv "$work/venv"
  "$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check cbor2
fi

# 3. A store with instances, exported as payload + detached bundle, and as one file.
cargo build --quiet -p cnsmctl
cnsmctl="$repo/target/debug/cnsmctl"
run="$work/run"
rm -rf "$run" && mkdir -p "$run" && cd "$run"
"$cnsmctl" keys generate --out key.pem >/dev/null
"$cnsmctl" keys generate --out other.pem >/dev/null
"$cnsmctl" --data-dir store -n shop apply -f "$repo/../shared/examples/order-processing.yaml" >/dev/null
for i in 1 2 3; do
  "$cnsmctl" --data-dir store -n shop create instance order-processing --id "o-$i" \
    --data "{\"total\": $((i * 10)), \"note\": \"n$i\"}" -l tier=gold >/dev/null
done
"$cnsmctl" --data-dir store -n shop send o-1 complete --idempotency-key k-1 >/dev/null
"$cnsmctl" --data-dir store -n shop send o-1 pay --payload '{"amount": 10.5}' >/dev/null
"$cnsmctl" --data-dir store -n shop snapshot export --all --key key.pem -o shop.cbor --bundle shop.sigstore.json
"$cnsmctl" --data-dir store -n shop snapshot export --all --key other.pem -o other.cbor --bundle other.sigstore.json >/dev/null
"$cnsmctl" --data-dir store -n shop snapshot export --all --key key.pem -o shop.snapshot >/dev/null

verify() { node "$tools/verify_bundle.js" "$1" "$2" key.pub.pem 2>&1; }
expect_verified() {
  local out; out="$(verify "$1" "$2")" || fail "@sigstore/verify rejected $1: $out"
  case "$out" in VERIFIED*) echo "ok: $out";; *) fail "@sigstore/verify: $out";; esac
}
expect_rejected() {
  local what="$1" out; shift
  if out="$(verify "$@")"; then fail "@sigstore/verify accepted $what: $out"; fi
  echo "ok: rejected $what ($(echo "$out" | grep -m1 -oE 'FAILED.*|Error: .*' | cut -c1-80))"
}

echo "== @sigstore/verify 3.1.1"
expect_verified shop.sigstore.json shop.cbor
# The one-file layout: line 1 magic, line 2 bundle JSON, then the payload.
head -n 2 shop.snapshot | tail -n 1 > one.sigstore.json
tail -c +"$(( $(head -n 2 shop.snapshot | wc -c) + 1 ))" shop.snapshot > one.cbor
expect_verified one.sigstore.json one.cbor
cp shop.cbor flipped.cbor
printf '\xff' | dd of=flipped.cbor bs=1 seek=100 conv=notrunc 2>/dev/null
expect_rejected "a flipped payload byte" shop.sigstore.json flipped.cbor
head -c -5 shop.cbor > truncated.cbor
expect_rejected "a truncated payload" shop.sigstore.json truncated.cbor
expect_rejected "another key's bundle" other.sigstore.json other.cbor
"$run/../venv/bin/python" - <<'EOF'
import json
b = json.load(open("shop.sigstore.json"))
o = json.load(open("other.sigstore.json"))
b["messageSignature"]["signature"] = o["messageSignature"]["signature"]
b["messageSignature"]["messageDigest"] = o["messageSignature"]["messageDigest"]
json.dump(b, open("forged.sigstore.json", "w"))
EOF
expect_rejected "another key's signature under this key's hint" forged.sigstore.json other.cbor
# cnsmctl agrees on all of them.
for bad in flipped truncated; do
  if "$cnsmctl" snapshot verify "$bad.cbor" --bundle shop.sigstore.json --public-key key.pub.pem 2>/dev/null; then
    fail "cnsmctl accepted $bad.cbor"
  fi
done

echo "== cbor2 + det_cbor.py"
"$run/../venv/bin/python" - "$tools" <<'EOF'
import sys, cbor2
sys.path.insert(0, sys.argv[1])
import det_cbor
payload = open("shop.cbor", "rb").read()
det_cbor.check_deterministic(payload)
doc = cbor2.loads(payload)
assert list(doc) == ["asOf", "defs", "kind", "format", "instances"], list(doc)
assert doc["kind"] == "cnsm.snapshot" and doc["format"] == 1, doc["kind"]
assert len(doc["instances"]) == 3 and len(doc["defs"]) == 1
for entry in doc["instances"]:
    state, records = entry["state"], entry["records"]
    assert len(records) == state["version"] + 1, state["id"]
    for record in records:
        assert isinstance(record, bytes)
        det_cbor.check_deterministic(record)
        assert cbor2.loads(record)["instance"] == state["id"]
keys = [k["key"] for e in doc["instances"] for k in e["idempotency"]]
assert keys == ["k-1"], keys
assert det_cbor.det(doc) == payload, "re-encoding with the reference encoder differs"
bad = bytearray(payload); bad[0] = 0xb8; bad[1:1] = b"\x05"
assert not det_cbor.is_deterministic(bytes(bad))
print(f"ok: {len(payload)} bytes, {len(doc['instances'])} instances, deterministic (RFC 8949 §4.2.1)")
EOF
echo "snapshot-interop: OK"
