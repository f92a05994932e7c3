#!/usr/bin/env bash
# Proves a board build on this x86 machine, under qemu-user:
#   cross/test.sh TARGET [--no-lib-tests]
# 1. the library's unit tests, built for TARGET and run by qemu (.cargo/config.toml's
#    runner), unless --no-lib-tests;
# 2. `marquee classify` on the example poster and three val-split posters of
#    ../shared/data/posters-v1, each with and without its overview: every genre score
#    equals the x86 build's within 1e-4, and the predicted sets are the same;
# 3. the .deb: its control files and contents, and the binary and models it installs
#    classifying the example poster from a scratch root (dpkg -x).
# Run cross/build.sh TARGET first. Needs qemu-user (apt-get install qemu-user).
set -euo pipefail
cd "$(dirname "$0")/.."

target="${1:-}"
case "$target" in
  aarch64-unknown-linux-gnu) qemu=(qemu-aarch64 -L /usr/aarch64-linux-gnu); arch=arm64; elf_machine=183 ;;
  armv7-unknown-linux-gnueabihf) qemu=(qemu-arm -L /usr/arm-linux-gnueabihf); arch=armhf; elf_machine=40 ;;
  *) echo "usage: cross/test.sh aarch64-unknown-linux-gnu|armv7-unknown-linux-gnueabihf [--no-lib-tests]" >&2; exit 2 ;;
esac
lib_tests=1
[ "${2:-}" = "--no-lib-tests" ] && lib_tests=0

step() { echo "cross/test.sh: $*" >&2; }
fail() { echo "cross/test.sh: FAIL: $*" >&2; exit 1; }

if ! command -v "${qemu[0]}" >/dev/null; then
  step "installing qemu-user"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends qemu-user
fi
board_bin="target/$target/release/marquee"
[ -x "$board_bin" ] || fail "$board_bin is missing: run cross/build.sh $target first"
deb=$(ls "target/$target/debian/"marquee_*_"$arch".deb 2>/dev/null | head -n1)
[ -n "$deb" ] || fail "no marquee_*_$arch.deb in target/$target/debian: run cross/build.sh $target first"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

# 1. Library unit tests on the board's architecture.
if [ "$lib_tests" = 1 ]; then
  step "library unit tests under ${qemu[0]}"
  cargo test --release --target "$target" --lib
fi

# 2. Scores under qemu against the x86 build, the same inputs.
step "x86 reference build"
cargo build --release --quiet
host_bin="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/marquee"
cases="$scratch/cases.jsonl"
python3 - "$cases" <<'PY'
import json, sys
# The example poster, and the first three val-split posters that have an overview
# (posters-v1 holds its test split back).
root = "../shared/data/posters-v1/"
rows = [json.loads(l) for l in open(root + "movies.jsonl")]
rows = [r for r in rows if r["split"] == "val" and r["overview"].strip()][:3]
with open(sys.argv[1], "w") as out:
    out.write(json.dumps({"poster": "examples/poster.png", "overview": None}) + "\n")
    for r in rows:
        for ov in (None, r["overview"]):
            out.write(json.dumps({"poster": root + r["poster"], "overview": ov}) + "\n")
PY
n=0
while IFS= read -r case; do
  poster=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["poster"])' "$case")
  overview=$(python3 -c 'import json,sys; o=json.loads(sys.argv[1])["overview"]; print(o or "")' "$case")
  args=(classify "$poster" --json)
  [ -n "$overview" ] && args+=(--overview "$overview")
  "$host_bin" "${args[@]}" < /dev/null > "$scratch/x86.$n.json"
  "${qemu[@]}" "$board_bin" "${args[@]}" < /dev/null > "$scratch/board.$n.json"
  n=$((n + 1))
done < "$cases"
python3 - "$scratch" "$n" "$target" <<'PY'
import json, sys
scratch, n, target = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cases = [json.loads(l) for l in open(f"{scratch}/cases.jsonl")]
worst = 0.0
for i in range(n):
    x86 = json.load(open(f"{scratch}/x86.{i}.json"))
    board = json.load(open(f"{scratch}/board.{i}.json"))
    a = {g["label"]: g["score"] for g in x86["genres"]}
    b = {g["label"]: g["score"] for g in board["genres"]}
    assert len(a) == 18 and a.keys() == b.keys(), f"case {i}: labels differ"
    diff = max(abs(a[k] - b[k]) for k in a)
    worst = max(worst, diff)
    name = cases[i]["poster"].rsplit("/", 1)[-1]
    ov = "with overview" if cases[i]["overview"] else "poster only"
    print(f"{name:32} {ov:14} max |x86 - {target}| = {diff:.2e}  predicted {board['predicted']}")
    assert diff <= 1e-4, f"case {i}: scores differ by {diff}"
    assert x86["predicted"] == board["predicted"], f"case {i}: predicted sets differ"
assert n == len(cases) == 7, f"{n} of {len(cases)} cases ran"
print(f"{n} cases: worst score difference {worst:.2e} (limit 1e-4)")
PY

# 3. The package.
step "checking $deb"
dpkg-deb --info "$deb" > "$scratch/info"
dpkg-deb --contents "$deb" > "$scratch/contents"
grep -q "^ Package: marquee$" "$scratch/info" || fail "Package is not marquee"
grep -q "^ Architecture: $arch$" "$scratch/info" || fail "Architecture is not $arch"
dpkg-deb -x "$deb" "$scratch/root"
dpkg-deb -e "$deb" "$scratch/control"
expect_file() { # path mode
  [ -f "$scratch/root/$1" ] || fail "/$1 is not in the package"
  [ "$(stat -c %a "$scratch/root/$1")" = "$2" ] || fail "/$1 has mode $(stat -c %a "$scratch/root/$1"), not $2"
}
expect_file usr/bin/marquee 755
# Every file of the shipped model, however many fusion members it has.
for f in $(ls models); do
  expect_file "usr/share/marquee/models/$f" 644
  cmp -s "models/$f" "$scratch/root/usr/share/marquee/models/$f" || fail "models/$f differs in the package"
done
expect_file usr/share/marquee/examples/poster.png 644
expect_file etc/marquee/marquee.toml 640
expect_file usr/share/doc/marquee/README.md 644
units=$(find "$scratch/root" -name 'marquee*.service' | sed "s#^$scratch/root/##" | sort | tr '\n' ' ')
[ "$units" = "usr/lib/systemd/system/marquee-captions.service usr/lib/systemd/system/marquee.service " ] \
  || fail "systemd units: $units"
grep -qx "ExecStart=/usr/bin/marquee run --config /etc/marquee/marquee.toml" \
  "$scratch/root/usr/lib/systemd/system/marquee.service" \
  || fail "marquee.service does not start /usr/bin/marquee with /etc/marquee/marquee.toml"
grep -qx "/etc/marquee/marquee.toml" "$scratch/control/conffiles" || fail "/etc/marquee/marquee.toml is not a conffile"
grep -q "useradd --system" "$scratch/control/postinst" || fail "postinst does not create the system user"
grep -q "usermod --append --groups video marquee" "$scratch/control/postinst" || fail "postinst does not add the user to video"
grep -q "deb-systemd-invoke .*start.*marquee.service\|_dh_action=.*start" "$scratch/control/postinst" || fail "postinst does not start marquee.service"
grep -q "deb-systemd-invoke stop .*marquee.service" "$scratch/control/prerm" || fail "prerm does not stop the services"
if grep -v '^[[:space:]]*#' "$scratch/control/postrm" "$scratch/control/prerm" | grep -q "rm \|/var/lib/marquee\|userdel\|deluser"; then
  fail "prerm/postrm touch the user's state"
fi
for s in postinst prerm postrm; do sh -n "$scratch/control/$s" || fail "$s is not valid sh"; done
# The ELF header's machine field (offset 18): the package carries the board's binary.
machine=$(od -An -tu2 -j18 -N2 "$scratch/root/usr/bin/marquee" | tr -d ' ')
[ "$machine" = "$elf_machine" ] || fail "usr/bin/marquee is ELF machine $machine, not $elf_machine"
# What the package installs works as installed: its binary, its models, its example.
MARQUEE_MODEL="$scratch/root/usr/share/marquee/models" "${qemu[@]}" "$scratch/root/usr/bin/marquee" \
  classify "$scratch/root/usr/share/marquee/examples/poster.png" --json > "$scratch/installed.json"
python3 - "$scratch/installed.json" "$scratch/x86.0.json" <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:])
d = max(abs(x["score"] - y["score"]) for x, y in zip(sorted(a["genres"], key=lambda g: g["label"]), sorted(b["genres"], key=lambda g: g["label"])))
assert d <= 1e-4, d
print(f"installed layout classifies the example poster: max difference to x86 {d:.2e}")
PY
step "$deb: layout as documented"
sed -n 's/^ \(Package\|Version\|Architecture\|Depends\|Installed-Size\):/  \1:/p' "$scratch/info"
step "all checks passed for $target"
