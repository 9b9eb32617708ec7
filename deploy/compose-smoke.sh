#!/usr/bin/env bash
# `make compose-smoke`: builds the CPU image, starts compose.yaml's cpu profile, generates one image
# through the gateway, checks that Prometheus scrapes every ditserve service (all up, alert rules
# loaded), and takes everything down again (volumes included).
#
# compose.yaml's variables pass through (BASE_IMAGE, TORCH_SPEC, PROMETHEUS_IMAGE, ...);
# SMOKE_SERVICES limits what starts (default: the whole profile, Grafana included).
set -euo pipefail
cd "$(dirname "$0")/.."
if docker compose version >/dev/null 2>&1; then compose=(docker compose); else compose=(docker-compose); fi
compose+=(--project-name ditserve-smoke --profile cpu)
read -r -a services <<< "${SMOKE_SERVICES:-}"

finish() {
    status=$?
    if [ "$status" -ne 0 ]; then "${compose[@]}" logs --tail=40 || true; fi
    "${compose[@]}" down --volumes --remove-orphans
    exit "$status"
}
trap finish EXIT

# Every ditserve service runs the same image: build it once.
"${compose[@]}" build gateway
"${compose[@]}" up -d --no-build "${services[@]}"
"${compose[@]}" exec -T gateway ditserve generate "a red circle on a blue background" --seed 1 \
    --target 127.0.0.1:50050 --wait-ready 300 -o /tmp/smoke.png

# From inside the compose network: Prometheus' targets, once its DNS discovery found them all.
"${compose[@]}" exec -T gateway python3 - <<'PY'
import json, time, urllib.request

def api(path):
    with urllib.request.urlopen(f"http://prometheus:9090/api/v1/{path}", timeout=10) as response:
        return json.load(response)["data"]

expected = {("gateway", "gateway"), ("encoder", "encoder"), ("denoiser", "denoiser"),
            ("denoiser", "denoiser-2"), ("vae", "vae")}
deadline = time.monotonic() + 120
while True:
    targets = api("targets")["activeTargets"]
    up = {(t["labels"]["job"], t["labels"]["compose_service"]) for t in targets if t["health"] == "up"}
    if up == expected and len(targets) == len(expected) or time.monotonic() > deadline:
        break
    time.sleep(2)
for target in targets:
    print(f'{target["labels"]["job"]:9} {target["labels"]["compose_service"]:11} {target["scrapeUrl"]:32} {target["health"]}')
assert up == expected and len(targets) == len(expected), f"expected {sorted(expected)} up"
rules = [rule for group in api("rules")["groups"] for rule in group["rules"]]
assert rules and all(rule["health"] == "ok" for rule in rules), rules
print(f"prometheus: {len(targets)} targets up, {len(rules)} alert rules ok")
PY
echo "compose smoke: OK"
