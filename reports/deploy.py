"""From verdict to deployment: a kit per promoted variant under runs/<slug>/deploy/<variant>/.

- deployment.yaml: a Kubernetes Deployment + Service serving the checkpoint with the flags that were measured
  (tensor parallel, context, KV-cache dtype, prefix caching, --max-num-seqs from the measured capacity,
  --gpu-memory-utilization), checked offline against Kubernetes' own schemas (kubernetes-validate).
- scaledobject.yaml: a KEDA ScaledObject on the Prometheus scaler, triggered by vLLM's queue
  (vllm:num_requests_waiting) and KV-cache occupancy, with thresholds derived from the bench's knee: the
  values the same PromQL returned at the capacity level (KV) and at the first load past it (queue), less the
  stated headroom. Checked against KEDA's documented fields (a strict schema of keda.sh's ScaledObject and
  Prometheus-trigger specification).
- alerts.yaml + alerts.test.yaml: Prometheus alerting rules with the playbook's paging thresholds (TTFT p95 >
  3 s; ITL p95 > 50 ms chat / 100 ms batch; KV occupancy > 90% sustained), and a promtool unit test on the
  raw series the bench's Prometheus recorded (one recorded second per test minute), whose expected alerts are
  computed here independently of Prometheus (histogram_quantile re-implemented). `promtool check rules` and
  `promtool test rules` run when the kit is written.
- README.md: where every number came from.
"""

from __future__ import annotations

import json
import math
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qgcore.errors import ArtifactError, QuantgateError

HEADROOM = 0.2  # scale out at 80% of the knee's value: time for a new replica to load before the SLO breaks
PLAYBOOK = {"ttft_p95_s": 3.0, "itl_p95_chat_s": 0.050, "itl_p95_batch_s": 0.100, "kv_usage": 0.90}
IMAGE = "vllm/vllm-openai:v0.32.0"
K8S_VERSION = "1.33"


# ---- KEDA's documented fields (https://keda.sh/docs/latest/reference/scaledobject-spec/ and
# https://keda.sh/docs/latest/scalers/prometheus/): unknown keys fail, required ones must be there ----

class _K(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class _TargetRef(_K):
    apiVersion: str = "apps/v1"
    kind: str = "Deployment"
    name: str
    envSourceContainerName: str | None = None


class _PromMetadata(_K):
    serverAddress: str
    query: str
    threshold: str = Field(pattern=r"^\d+(\.\d+)?$")
    activationThreshold: str | None = Field(default=None, pattern=r"^\d+(\.\d+)?$")
    namespace: str | None = None
    customHeaders: str | None = None
    ignoreNullValues: str | None = Field(default=None, pattern="^(true|false)$")
    queryParameters: str | None = None
    unsafeSsl: str | None = Field(default=None, pattern="^(true|false)$")
    timeout: str | None = None


class _Trigger(_K):
    type: Literal["prometheus"]
    name: str | None = None
    metricType: Literal["AverageValue", "Value", "Utilization"] | None = None
    useCachedMetrics: bool | None = None
    metadata: _PromMetadata


class _Fallback(_K):
    failureThreshold: int = Field(ge=1)
    replicas: int = Field(ge=0)


class _SOSpec(_K):
    scaleTargetRef: _TargetRef
    pollingInterval: int | None = Field(default=None, ge=1)
    cooldownPeriod: int | None = Field(default=None, ge=0)
    initialCooldownPeriod: int | None = Field(default=None, ge=0)
    idleReplicaCount: int | None = Field(default=None, ge=0)
    minReplicaCount: int | None = Field(default=None, ge=0)
    maxReplicaCount: int | None = Field(default=None, ge=1)
    fallback: _Fallback | None = None
    advanced: dict[str, Any] | None = None
    triggers: list[_Trigger] = Field(min_length=1)


class _ScaledObject(_K):
    apiVersion: Literal["keda.sh/v1alpha1"]
    kind: Literal["ScaledObject"]
    metadata: dict[str, Any]
    spec: _SOSpec


def validate_scaled_object(obj: dict[str, Any]) -> str | None:
    """None if the ScaledObject uses only KEDA's documented fields correctly, else the first problem."""
    try:
        so = _ScaledObject.model_validate(obj)
    except ValidationError as err:
        e = err.errors()[0]
        return f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}"
    if so.spec.minReplicaCount is not None and so.spec.maxReplicaCount is not None and \
            so.spec.minReplicaCount > so.spec.maxReplicaCount:
        return "spec.minReplicaCount is greater than spec.maxReplicaCount"
    return None


# ---- the kit ----------------------------------------------------------------------------------------------

def _knee(bench: dict[str, Any]) -> dict[str, Any]:
    """The capacity level of the primary workload and the first load past it, with their PromQL values."""
    cap = (bench.get("capacity") or {}).get("load")
    wl = bench["settings"]["workloads"][0]["name"]
    sweep = [lv for lv in bench.get("levels", []) if lv.get("workload") == wl and lv.get("phase") == "sweep"]
    at = next((lv for lv in reversed(sweep) if lv["load"] == cap), None)
    past = min((lv for lv in sweep if cap is not None and lv["load"] > cap), key=lambda lv: lv["load"], default=None)
    return {"capacity": cap, "at": at, "past": past}


def _threshold(value: float | None, floor: float) -> float:
    return round(max((value or 0.0) * (1 - HEADROOM), floor), 4)


def build_kit(variant: str, deploy_command: str, bench: dict[str, Any], serving: dict[str, Any],
              prometheus_url: str = "http://prometheus.monitoring.svc:9090") -> dict[str, Any]:
    """Every object of the kit, as data (rendered to YAML by write_kit)."""
    knee = _knee(bench)
    at, past = knee["at"] or {}, knee["past"] or {}
    kv_at = (at.get("promql") or {}).get("kv_cache_usage")
    wait_past = (past.get("promql") or {}).get("waiting")
    # the very queries the bench's Prometheus ran during the sweep (recorded beside their values): one home
    recorded = (bench.get("prometheus") or {}).get("queries") or {}
    if "waiting" not in recorded or "kv_cache_usage" not in recorded:
        raise ArtifactError(f"{variant}/bench.json has no Prometheus queries: rerun `make bench` with prometheus on")
    q = {"waiting": recorded["waiting"], "kv": recorded["kv_cache_usage"]}
    kv_threshold = _threshold(kv_at, 0.05)
    wait_threshold = _threshold(wait_past, 1.0)
    args = shlex.split(deploy_command)[2:]  # after "vllm serve": the checkpoint path, then the flags
    tp = int(serving.get("tensor_parallel") or 1)
    flags = args[1:]
    labels = {"app.kubernetes.io/name": "vllm", "app.kubernetes.io/instance": variant}
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": f"vllm-{variant}", "labels": labels},
        "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
            "metadata": {"labels": labels, "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "8000",
                                                           "prometheus.io/path": "/metrics"}},
            "spec": {"containers": [{
                "name": "vllm", "image": IMAGE, "command": ["vllm", "serve"],
                "args": [f"/models/{variant}", *flags, "--port", "8000"],
                "ports": [{"name": "http", "containerPort": 8000}],
                "resources": {"limits": {"nvidia.com/gpu": tp}, "requests": {"nvidia.com/gpu": tp}},
                "readinessProbe": {"httpGet": {"path": "/health", "port": 8000}, "periodSeconds": 10},
                "livenessProbe": {"httpGet": {"path": "/health", "port": 8000}, "initialDelaySeconds": 600,
                                  "periodSeconds": 30},
                "volumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True},
                                 {"name": "shm", "mountPath": "/dev/shm"}]}],
                "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": "quantgate-models"}},
                            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}}]}}}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"vllm-{variant}", "labels": labels},
               "spec": {"selector": labels, "ports": [{"name": "http", "port": 8000, "targetPort": 8000}]}}
    scaled = {
        "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": f"vllm-{variant}"},
        "spec": {"scaleTargetRef": {"name": f"vllm-{variant}"}, "pollingInterval": 15, "cooldownPeriod": 300,
                 "minReplicaCount": 1, "maxReplicaCount": 8,
                 "triggers": [
                     {"type": "prometheus", "name": "queue", "metricType": "AverageValue",
                      "metadata": {"serverAddress": prometheus_url, "query": q["waiting"],
                                   "threshold": f"{wait_threshold:g}", "ignoreNullValues": "false"}},
                     {"type": "prometheus", "name": "kv-cache", "metricType": "Value",
                      "metadata": {"serverAddress": prometheus_url, "query": q["kv"], "threshold": f"{kv_threshold:g}",
                                   "ignoreNullValues": "false"}}]}}
    rules = {"groups": [{"name": f"vllm-{variant}", "rules": alert_rules(variant)}]}
    derivation = {
        "headroom": HEADROOM, "capacity_concurrency": knee["capacity"],
        "kv": {"query": q["kv"], "value_at_knee": kv_at, "threshold": kv_threshold,
               "at": "the capacity level (the last load that met the SLO without a growing queue)"},
        "waiting": {"query": q["waiting"], "value_past_knee": wait_past, "threshold": wait_threshold,
                    "at": "the first load past capacity (where queue time starts to grow)"},
        "max_num_seqs": knee["capacity"],
    }
    return {"deployment": deployment, "service": service, "scaledobject": scaled, "rules": rules,
            "derivation": derivation}


def alert_rules(variant: str) -> list[dict[str, Any]]:
    sel = f'model_name="{variant}"'

    def p95(metric: str) -> str:
        return f"histogram_quantile(0.95, sum by (le) (rate({metric}_bucket{{{sel}}}[5m])))"

    return [
        {"alert": "VLLMTimeToFirstTokenHigh", "expr": f"{p95('vllm:time_to_first_token_seconds')} > "
         f"{PLAYBOOK['ttft_p95_s']}", "for": "5m", "labels": {"severity": "page"},
         "annotations": {"summary": f"{variant}: TTFT p95 above {PLAYBOOK['ttft_p95_s']} s for 5 minutes"}},
        {"alert": "VLLMInterTokenLatencyHighChat", "expr": f"{p95('vllm:inter_token_latency_seconds')} > "
         f"{PLAYBOOK['itl_p95_chat_s']}", "for": "5m", "labels": {"severity": "page", "profile": "chat"},
         "annotations": {"summary": f"{variant}: ITL p95 above 50 ms for 5 minutes (chat)"}},
        {"alert": "VLLMInterTokenLatencyHighBatch", "expr": f"{p95('vllm:inter_token_latency_seconds')} > "
         f"{PLAYBOOK['itl_p95_batch_s']}", "for": "5m", "labels": {"severity": "page", "profile": "batch"},
         "annotations": {"summary": f"{variant}: ITL p95 above 100 ms for 5 minutes (batch)"}},
        {"alert": "VLLMKVCacheSaturated", "expr": f"max(vllm:kv_cache_usage_perc{{{sel}}}) > {PLAYBOOK['kv_usage']}",
         "for": "10m", "labels": {"severity": "warning"},
         "annotations": {"summary": f"{variant}: KV cache above 90% for 10 minutes: requests are queueing"}},
    ]


# ---- the promtool test: recorded series, expectations computed here ---------------------------------------

def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus's histogram_quantile on one set of cumulative bucket counts {le: count} (linear within the
    bucket holding the rank; the highest finite bound when the rank falls in +Inf)."""
    les = sorted(buckets)
    if not les or les[-1] != math.inf:
        return None
    total = buckets[math.inf]
    if total <= 0:
        return None
    rank = q * total
    prev_le, prev_c = 0.0, 0.0
    for le in les:
        c = buckets[le]
        if c >= rank:
            if le == math.inf:
                return les[-2] if len(les) > 1 else None
            if c == prev_c:
                return le
            return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
        prev_le, prev_c = le, c
    return None


def _series_by_metric(raw: list[dict[str, Any]], name: str) -> dict[float, list[float | None]]:
    out = {}
    for s in raw:
        if s["metric"].get("__name__") == name:
            out[float(s["metric"].get("le", "nan").replace("+Inf", "inf"))] = s["values"]
    return out


def _condition(raw: list[dict[str, Any]], metric: str, threshold: float, window: int) -> list[bool | None]:
    """Per recorded sample (one test minute each): is p95 over the last `window` samples above threshold?"""
    buckets = _series_by_metric(raw, f"{metric}_bucket")
    if not buckets:
        return []
    n = min(len(v) for v in buckets.values())
    out: list[bool | None] = []
    for t in range(n):
        if t < window - 1:
            out.append(None)
            continue
        inc = {}
        for le, vals in buckets.items():
            a, b = vals[t - window + 1], vals[t]
            if a is None or b is None:
                break
            inc[le] = b - a
        else:
            p = histogram_quantile(0.95, inc)
            out.append(None if p is None else p > threshold)
            continue
        out.append(None)
    return out


def promtool_test(variant: str, raw: list[dict[str, Any]]) -> dict[str, Any] | None:
    """A promtool unit test over the recorded series: for each latency alert, one time where the condition
    held throughout the `for` window (it must fire) and one where it never did (it must stay silent)."""
    if not raw:
        return None
    series = []
    for s in raw:
        labels = {k: v for k, v in s["metric"].items() if k in ("__name__", "le", "model_name")}
        name = labels.pop("__name__")
        sel = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        vals = " ".join("_" if v is None else f"{v:g}" for v in s["values"])
        series.append({"series": f"{name}{{{sel}}}", "values": vals})
    alerts = []
    for rule in alert_rules(variant)[:3]:  # the latency alerts: windows of 5 test minutes
        metric = "vllm:time_to_first_token_seconds" if "TimeToFirst" in rule["alert"] else \
            "vllm:inter_token_latency_seconds"
        threshold = float(rule["expr"].rsplit(">", 1)[1])
        cond = _condition(raw, metric, threshold, 5)
        fire = _stable_time(cond, True, 7)
        quiet = _stable_time(cond, False, 7)
        labels = rule["labels"]
        if fire is not None:
            alerts.append({"eval_time": f"{fire}m", "alertname": rule["alert"],
                           "exp_alerts": [{"exp_labels": labels, "exp_annotations": rule["annotations"]}]})
        if quiet is not None:
            alerts.append({"eval_time": f"{quiet}m", "alertname": rule["alert"], "exp_alerts": []})
    if not alerts:
        return None
    return {"rule_files": ["alerts.yaml"], "evaluation_interval": "1m",
            "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": alerts}]}


def _stable_time(cond: list[bool | None], want: bool, run: int) -> int | None:
    """The last sample ending `run` consecutive samples with condition == want (None: no such stretch)."""
    streak, best = 0, None
    for t, c in enumerate(cond):
        streak = streak + 1 if c is want else 0
        if streak >= run:
            best = t
    return best


# ---- writing and checking -----------------------------------------------------------------------------------

def _dump(objs: list[dict[str, Any]]) -> str:
    return "---\n".join(yaml.safe_dump(o, sort_keys=False) for o in objs)


def write_kit(out: Path, variant: str, deploy_command: str, bench: dict[str, Any], serving: dict[str, Any],
              verdict: str) -> dict[str, Any]:
    kit = build_kit(variant, deploy_command, bench, serving)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "deployment.yaml").write_text(_dump([kit["deployment"], kit["service"]]))
    (out / "scaledobject.yaml").write_text(_dump([kit["scaledobject"]]))
    (out / "alerts.yaml").write_text(yaml.safe_dump(kit["rules"], sort_keys=False))
    test = promtool_test(variant, (bench.get("prometheus") or {}).get("raw") or [])
    if test is not None:
        (out / "alerts.test.yaml").write_text(yaml.safe_dump(test, sort_keys=False, width=1 << 20))
    d = kit["derivation"]
    (out / "README.md").write_text(
        f"# Deploy kit: {variant} ({verdict})\n\n"
        f"Served as measured: `{deploy_command}`\n\n"
        f"- `--max-num-seqs {d['max_num_seqs']}`: the capacity the bench measured (the highest concurrency that met "
        "the SLO without a growing queue).\n"
        f"- KEDA trigger `kv-cache`: `{d['kv']['query']}` was {d['kv']['value_at_knee']} at {d['kv']['at']}; "
        f"threshold {d['kv']['threshold']} = that less {HEADROOM:.0%} headroom.\n"
        f"- KEDA trigger `queue`: `{d['waiting']['query']}` was {d['waiting']['value_past_knee']} at "
        f"{d['waiting']['at']}; threshold {d['waiting']['threshold']} (that less {HEADROOM:.0%}, at least 1).\n"
        "- Alerts: the playbook's paging thresholds (TTFT p95 > 3 s; ITL p95 > 50 ms chat / 100 ms batch; KV cache "
        "> 90% for 10 minutes). `alerts.test.yaml` replays the bench's recorded series, one recorded second per "
        "test minute.\n"
        "- The PVC `quantgate-models` must hold the checkpoint folder at `/models/" + variant + "`; prices, "
        "namespace and the Prometheus address are yours to set.\n")
    (out / "derivation.json").write_text(json.dumps(d, indent=1) + "\n")
    return kit


def check_kit(out: Path) -> list[str]:
    """Validate a written kit with the real tools: kubernetes-validate (Deployment, Service), KEDA's documented
    fields (ScaledObject), promtool check rules and promtool test rules. Returns the problems (empty: valid)."""
    import kubernetes_validate

    problems = []
    for obj in yaml.safe_load_all((out / "deployment.yaml").read_text()):
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            problems.append(f"{obj['kind']}: {str(err).splitlines()[0]}")
        except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError):
            problems.append(f"{obj.get('kind')}: no Kubernetes {K8S_VERSION} schema for apiVersion "
                            f"{obj.get('apiVersion')}")
    for obj in yaml.safe_load_all((out / "scaledobject.yaml").read_text()):
        if (why := validate_scaled_object(obj)) is not None:
            problems.append(f"ScaledObject: {why}")
    promtool = shutil.which("promtool")
    if promtool is None:
        problems.append("promtool not installed (Debian `prometheus`): rules not checked")
        return problems
    for cmd in (["check", "rules", "alerts.yaml"], ["test", "rules", "alerts.test.yaml"]):
        if cmd[0] == "test" and not (out / "alerts.test.yaml").is_file():
            continue
        r = subprocess.run([promtool, *cmd], cwd=out, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            problems.append(f"promtool {' '.join(cmd)}: {(r.stdout + r.stderr).strip().splitlines()[-1]}")
    return problems


def write_kits(run_dir: Path, verdict: dict[str, Any], every: bool, deploy_lines: dict[str, str],
               benches: dict[str, dict[str, Any]], serving: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """A kit for each promoted variant (every served one with `every`); their validation problems."""
    out = {}
    for name, dec in verdict["variants"].items():
        bench = benches.get(name) or {}
        if not (dec["verdict"] == "promote" or (every and bench.get("status") == "served")):
            continue
        if bench.get("status") != "served":
            raise ArtifactError(f"{name}: no served bench.json to size a deployment from: run `make bench`")
        kit_dir = run_dir / "deploy" / name
        write_kit(kit_dir, name, deploy_lines[name], bench, serving.get(name, {}), dec["verdict"])
        out[name] = check_kit(kit_dir)
        if out[name]:
            raise QuantgateError(f"deploy kit {kit_dir} failed validation: {out[name][0]}")
    return out
