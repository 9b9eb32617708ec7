#!/usr/bin/env bash
# `make compose-smoke`: builds the CPU image, runs `docker compose up` as written with the denoiser
# scaled to SMOKE_DENOISERS (default 3) replicas, generates images through the gateway, checks that
# the gateway's dns:///denoiser target spread them over every replica and that Prometheus scrapes
# every ditserve container (all up, rules healthy), and takes everything down again (volumes included).
#
# compose.yaml's variables pass through (BASE_IMAGE, TORCH_SPEC, PROMETHEUS_IMAGE, ...);
# SMOKE_SERVICES limits what starts (default: everything, Grafana included).
set -euo pipefail
cd "$(dirname "$0")/.."
if docker compose version >/dev/null 2>&1; then compose=(docker compose); else compose=(docker-compose); fi
compose+=(--project-name ditserve-smoke)
read -r -a services <<< "${SMOKE_SERVICES:-}"
denoisers=${SMOKE_DENOISERS:-3}

finish() {
    status=$?
    if [ "$status" -ne 0 ]; then "${compose[@]}" logs --tail=40 || true; fi
    "${compose[@]}" down --volumes --remove-orphans
    exit "$status"
}
trap finish EXIT

# Every ditserve service runs the same image: build it once.
"${compose[@]}" build gateway
"${compose[@]}" up -d --no-build --scale "denoiser=$denoisers" "${services[@]}"
for seed in $(seq 1 $((denoisers * 2))); do
    "${compose[@]}" exec -T gateway ditserve generate "a red circle on a blue background" --seed "$seed" \
        --steps 4 --target 127.0.0.1:50050 --wait-ready 300 -o "/tmp/smoke-$seed.png"
done

# From inside the compose network: Prometheus' targets, once its DNS discovery found them all.
"${compose[@]}" exec -T -e DENOISERS="$denoisers" gateway python3 - <<'PY'
import json, os, time, urllib.parse, urllib.request

def api(path, **params):
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"http://prometheus:9090/api/v1/{path}{query}", timeout=10) as response:
        return json.load(response)["data"]

denoisers = int(os.environ["DENOISERS"])
expected = {"gateway": 1, "encoder": 1, "denoiser": denoisers, "vae": 1}
deadline = time.monotonic() + 120
while True:
    targets = api("targets")["activeTargets"]
    up = {}
    for target in targets:
        if target["health"] == "up" and target["labels"]["compose_service"] == target["labels"]["job"]:
            up[target["labels"]["job"]] = up.get(target["labels"]["job"], 0) + 1
    if (up == expected and len(targets) == sum(expected.values())) or time.monotonic() > deadline:
        break
    time.sleep(2)
for target in targets:
    print(f'{target["labels"]["job"]:9} {target["scrapeUrl"]:32} {target["health"]}')
assert up == expected and len(targets) == sum(expected.values()), f"expected {expected} up, got {up}"
rules = [rule for group in api("rules")["groups"] for rule in group["rules"]]
assert rules and all(rule["health"] == "ok" for rule in rules), rules

# Every replica served some of the requests (round_robin over the A records of `denoiser`).
query = 'sum by (instance) (ditserve_requests_total{job="denoiser", method="Denoise", code="OK"})'
deadline = time.monotonic() + 60
while True:
    served = {r["metric"]["instance"]: float(r["value"][1]) for r in api("query", query=query)["result"]}
    if (len(served) == denoisers and all(served.values())) or time.monotonic() > deadline:
        break
    time.sleep(3)
print("Denoise calls per replica:", served)
assert len(served) == denoisers and all(served.values()), f"not every denoiser replica was used: {served}"
print(f"prometheus: {len(targets)} targets up, {len(rules)} rules ok")
PY
echo "compose smoke: OK"
