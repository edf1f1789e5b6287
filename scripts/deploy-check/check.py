#!/usr/bin/env python3
"""The checks of scripts/check-deploy.sh that no off-the-shelf tool makes.

    check.py k8s DIR            cross-references and budgets between the manifests in DIR, and
                                a strict field check of the custom resources
    check.py crd-docs DIR       the custom resources of DIR as JSON lines (for crds.mjs)
    check.py compose FILE       references inside docker-compose.yml and to the repository
    check.py names              every metric name in the alert rules and the dashboard is one
                                the worker exports (src/metrics.rs); the alerts' annotations;
                                README's Alerts table names every alert
    check.py dashboard FILE     the Grafana dashboard's structure
    check.py live URL JOB N     against a real Prometheus that scraped a worker of job JOB which
                                consumed N records: the series exist, every scraped name is
                                declared, every alert and dashboard query evaluates, every rule
                                is healthy

Run from the repository root. Prints what it checks; exits 1 on the first failing group.
"""

import json
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import jsonschema
import yaml

ROOT = Path.cwd()
FAILURES = []


def say(message):
    print(f"  {message}", flush=True)


def check(condition, message):
    """Records a failure (and goes on, so one run lists every problem)."""
    if not condition:
        FAILURES.append(message)
        print(f"  FAIL: {message}", flush=True)
    return condition


def finish(what):
    if FAILURES:
        print(f"check.py {what}: {len(FAILURES)} problem(s)", flush=True)
        sys.exit(1)
    print(f"check.py {what}: ok", flush=True)


def load_docs(path):
    return [doc for doc in yaml.safe_load_all(Path(path).read_text()) if doc]


def manifests(directory):
    """(file, doc) for every document of every .yaml/.yml/.json file in directory."""
    out = []
    for path in sorted(Path(directory).iterdir()):
        if path.suffix in (".yaml", ".yml", ".json"):
            out.extend((path.name, doc) for doc in load_docs(path))
    return out


# ------------------------------------------------------------------ quantities -----------

BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
DECIMAL = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def quantity_bytes(text):
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?", str(text))
    if not match:
        raise ValueError(f"cannot read the quantity {text!r}")
    number, unit = int(match.group(1)), match.group(2)
    return number * (BINARY.get(unit) or DECIMAL.get(unit) or 1)


MIB = 2**20


# ------------------------------------------------------------ known variables -----------


def known_variables():
    """Every SYNC_* variable the worker reads: the names in src/ and in deploy/env.example."""
    names = set()
    for path in (ROOT / "src").rglob("*.rs"):
        names.update(re.findall(r'"(SYNC_[A-Z0-9_]*[A-Z0-9])"', path.read_text()))
    names.update(re.findall(r"^#?\s*(SYNC_[A-Z0-9_]*[A-Z0-9])=", (ROOT / "deploy/env.example").read_text(), re.M))
    return names


def check_variables(names, where, known):
    for name in sorted(names):
        if name.startswith("SYNC_KAFKA_OPT_"):
            continue  # any librdkafka property
        check(name in known, f"{where}: {name} is not a variable the worker reads (src/, deploy/env.example)")


# ------------------------------------------------ custom resources: strict fields --------
# kubernetes-validate has no schema for custom resources. crds.mjs validates them against the
# schemas generated from the real CRDs (npm @kubernetes-models/*: types, required fields,
# enums, patterns), which allow unknown fields, as the API server does (it prunes them
# silently). This schema adds the missing half for the fields we use: any other field, e.g. a
# misspelt one that would be dropped without a word, fails here.


def closed(properties, required=()):
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


METADATA = {"type": "object", "required": ["name"]}
STRICT_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): closed({
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": METADATA,
        "spec": closed({
            "selector": closed({"matchLabels": {"type": "object"}}, ["matchLabels"]),
            "namespaceSelector": {"type": "object"},
            "jobLabel": {"type": "string"},
            "endpoints": {"type": "array", "minItems": 1, "items": closed({
                "port": {"type": "string"},
                "path": {"type": "string"},
                "interval": {"type": "string"},
                "scrapeTimeout": {"type": "string"},
                "honorLabels": {"type": "boolean"},
                "relabelings": {"type": "array"},
                "metricRelabelings": {"type": "array"},
            }, ["port"])},
        }, ["selector", "endpoints"]),
    }, ["apiVersion", "kind", "metadata", "spec"]),
    ("keda.sh/v1alpha1", "ScaledObject"): closed({
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": METADATA,
        "spec": closed({
            "scaleTargetRef": closed({
                "apiVersion": {"type": "string"}, "kind": {"type": "string"}, "name": {"type": "string"},
            }, ["apiVersion", "kind", "name"]),
            "pollingInterval": {"type": "integer", "minimum": 1},
            "cooldownPeriod": {"type": "integer", "minimum": 0},
            "minReplicaCount": {"type": "integer", "minimum": 1},
            "maxReplicaCount": {"type": "integer", "minimum": 1},
            "advanced": closed({
                "horizontalPodAutoscalerConfig": closed({
                    "name": {"type": "string"},
                    "behavior": closed({
                        "scaleDown": {"type": "object"}, "scaleUp": {"type": "object"},
                    }),
                }),
                "restoreToOriginalReplicaCount": {"type": "boolean"},
            }),
            "triggers": {"type": "array", "minItems": 1, "items": closed({
                "type": {"const": "prometheus"},
                "name": {"type": "string"},
                "metricType": {"enum": ["AverageValue", "Value"]},
                "metadata": closed({
                    "serverAddress": {"type": "string", "pattern": "^https?://"},
                    "query": {"type": "string"},
                    "threshold": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"},
                    "activationThreshold": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"},
                    "ignoreNullValues": {"type": "string", "enum": ["true", "false"]},
                    "namespace": {"type": "string"},
                }, ["serverAddress", "query", "threshold"]),
                "authenticationRef": {"type": "object"},
            }, ["type", "metadata"])},
        }, ["scaleTargetRef", "minReplicaCount", "maxReplicaCount", "triggers"]),
    }, ["apiVersion", "kind", "metadata", "spec"]),
}
CORE_GROUPS = {"v1", "apps/v1", "policy/v1"}  # what kubernetes-validate knows of our kinds


def cmd_crd_docs(directory):
    for name, doc in manifests(directory):
        if (doc.get("apiVersion"), doc.get("kind")) in STRICT_SCHEMAS:
            print(json.dumps({"file": name, "doc": doc}))


def labels_match(selector, labels):
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def cmd_k8s(directory):
    docs = manifests(directory)
    known = known_variables()
    by_kind = {}
    for name, doc in docs:
        api, kind = doc.get("apiVersion"), doc.get("kind")
        meta = doc.get("metadata") or {}
        check(api and kind and meta.get("name"), f"{name}: a document without apiVersion, kind or metadata.name")
        key = (api, kind)
        if key in STRICT_SCHEMAS:
            errors = sorted(jsonschema.Draft202012Validator(STRICT_SCHEMAS[key]).iter_errors(doc), key=str)
            for error in errors:
                path = ".".join(str(p) for p in error.absolute_path) or "(top)"
                check(False, f"{name}: {kind} {path}: {error.message}")
            if not errors:
                say(f"{name}: {kind} has only the fields this project's strict schema knows")
        else:
            check(api in CORE_GROUPS, f"{name}: {api} {kind} is neither a core kind nor a custom resource this check knows: it would go unvalidated")
        by_kind.setdefault(kind, []).append((name, doc))

    def one(kind):
        found = by_kind.get(kind, [])
        check(len(found) >= 1, f"no {kind} in {directory}")
        return found[0][1] if found else {}

    sts, config = one("StatefulSet"), one("ConfigMap")
    service, pdb = one("Service"), one("PodDisruptionBudget")
    monitor, scaled = one("ServiceMonitor"), one("ScaledObject")
    secret = one("Secret")
    data = config.get("data", {})
    pod = sts["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    container = pod["spec"]["containers"][0]
    container_ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    env = {e["name"]: e for e in container.get("env", [])}

    # Names: every variable the ConfigMap, the Secret and the container set is one the worker reads.
    check_variables(set(data) | set(secret.get("stringData", {})) | {n for n in env if n.startswith("SYNC_")},
                    "deploy/k8s", known)
    say(f"{len(data)} ConfigMap variables, the Secret's and the container's are all known to the worker")
    for var in ("SYNC_KAFKA_TOPICS", "SYNC_METRICS_ADDR", "SYNC_WAL_DIR", "SYNC_MEMORY_BUDGET_BYTES",
                "SYNC_L1_MAX_BYTES", "SYNC_SHUTDOWN_GRACE_MS"):
        check(var in data, f"configmap: {var} missing")
    check("SYNC_SQL_URL" in secret.get("stringData", {}), "secret.example.yaml: SYNC_SQL_URL missing")
    refs = {r.get("configMapRef", {}).get("name") for r in container.get("envFrom", [])} - {None}
    srefs = {r.get("secretRef", {}).get("name") for r in container.get("envFrom", [])} - {None}
    check(refs == {config["metadata"]["name"]}, f"statefulset: envFrom configMapRef {refs} is not the ConfigMap")
    check(srefs == {secret["metadata"]["name"]}, f"statefulset: envFrom secretRef {srefs} is not the Secret")

    # Static membership: the instance id is the pod name.
    instance = env.get("SYNC_KAFKA_INSTANCE_ID", {})
    pod_name_vars = {n for n, e in env.items()
                     if e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name"}
    check(instance.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name"
          or any(instance.get("value") == f"$({v})" for v in pod_name_vars),
          "statefulset: SYNC_KAFKA_INSTANCE_ID must come from metadata.name")
    session = int(data.get("SYNC_KAFKA_OPT_SESSION_TIMEOUT_MS", 45000))
    heartbeat = int(data.get("SYNC_KAFKA_OPT_HEARTBEAT_INTERVAL_MS", 3000))
    revoke = int(data.get("SYNC_REVOKE_DEADLINE_MS", 5000))
    check(heartbeat * 3 <= session, f"configmap: heartbeat {heartbeat} ms must be at most a third of the session timeout {session} ms")
    check(revoke < session, f"configmap: SYNC_REVOKE_DEADLINE_MS {revoke} must be below the session timeout {session}")
    say(f"static membership: SYNC_KAFKA_INSTANCE_ID from the pod name; session {session} ms, heartbeat {heartbeat} ms, revoke deadline {revoke} ms")

    # Shutdown budget: grace period > preStop sleep + SYNC_SHUTDOWN_GRACE_MS + margin.
    grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
    command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    sleep = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds")
    if sleep is None and len(command) == 2 and command[0] == "sleep":
        sleep = int(command[1])
    check(sleep is not None, "statefulset: no preStop sleep")
    shutdown = int(data.get("SYNC_SHUTDOWN_GRACE_MS", 30000)) / 1000
    margin = grace - (sleep or 0) - shutdown
    check(margin >= 5, f"statefulset: terminationGracePeriodSeconds {grace} leaves {margin:g} s after preStop {sleep} s + shutdown grace {shutdown:g} s (need >= 5)")
    say(f"shutdown: terminationGracePeriodSeconds {grace} = preStop {sleep} s + SYNC_SHUTDOWN_GRACE_MS {shutdown:g} s + {margin:g} s margin")

    # Memory: limit >= (budget + L1 + 64 MiB overhead) x 1.25.
    budget, l1 = int(data["SYNC_MEMORY_BUDGET_BYTES"]), int(data["SYNC_L1_MAX_BYTES"])
    resources = container.get("resources", {})
    limit = quantity_bytes(resources.get("limits", {}).get("memory", "0"))
    request = quantity_bytes(resources.get("requests", {}).get("memory", "0"))
    floor = (budget + l1 + 64 * MIB) * 1.25
    check(limit >= floor, f"statefulset: memory limit {limit / MIB:g} MiB is below (budget {budget / MIB:g} + L1 {l1 / MIB:g} + 64 MiB) x 1.25 = {floor / MIB:g} MiB")
    check(0 < request <= limit, "statefulset: memory request must be set and at most the limit")
    say(f"memory: limit {limit / MIB:g} MiB >= (budget {budget / MIB:g} + L1 {l1 / MIB:g} + 64) x 1.25 = {floor / MIB:g} MiB")

    # The WAL: mounted at SYNC_WAL_DIR from the claim template, smaller than the volume.
    mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
    templates = {t["metadata"]["name"]: t for t in sts["spec"].get("volumeClaimTemplates", [])}
    wal_mounts = [n for n, p in mounts.items() if p == data.get("SYNC_WAL_DIR")]
    check(wal_mounts and wal_mounts[0] in templates, f"statefulset: SYNC_WAL_DIR {data.get('SYNC_WAL_DIR')} is not a volumeClaimTemplate mount")
    if wal_mounts and wal_mounts[0] in templates:
        size = quantity_bytes(templates[wal_mounts[0]]["spec"]["resources"]["requests"]["storage"])
        wal_max = int(data.get("SYNC_WAL_MAX_BYTES", 2**30))
        check(wal_max < size, f"configmap: SYNC_WAL_MAX_BYTES {wal_max} is not below the WAL volume ({size})")
        say(f"WAL: {data['SYNC_WAL_DIR']} on the claim template '{wal_mounts[0]}' ({size // MIB} MiB), SYNC_WAL_MAX_BYTES {wal_max // MIB} MiB")

    # Ports and probes.
    metrics_port = int(data.get("SYNC_METRICS_ADDR", ":9090").rsplit(":", 1)[1])
    check(metrics_port in container_ports.values(), f"statefulset: no containerPort {metrics_port} (SYNC_METRICS_ADDR)")
    for probe, path in (("livenessProbe", "/health/live"), ("readinessProbe", "/health/ready")):
        get = container.get(probe, {}).get("httpGet", {})
        check(get.get("path") == path, f"statefulset: {probe} must GET {path}")
        check(get.get("port") in container_ports or get.get("port") == metrics_port, f"statefulset: {probe} port {get.get('port')} is not a container port")
    say("probes: /health/live and /health/ready on the metrics port")

    # Selectors: Service, PDB, ServiceMonitor, ScaledObject all point at the StatefulSet.
    check(labels_match(sts["spec"]["selector"]["matchLabels"], pod_labels), "statefulset: selector does not match its pod labels")
    check(sts["spec"].get("serviceName") == service["metadata"]["name"], "statefulset: serviceName is not the Service")
    check(labels_match(service["spec"]["selector"], pod_labels), "service: selector does not match the pods")
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    for port in service_ports.values():
        check(port.get("targetPort") in container_ports or port.get("targetPort") in container_ports.values(),
              f"service: targetPort {port.get('targetPort')} is not a container port")
    check(labels_match(pdb["spec"]["selector"]["matchLabels"], pod_labels), "pdb: selector does not match the pods")
    check(labels_match(monitor["spec"]["selector"]["matchLabels"], service["metadata"].get("labels", {})),
          "servicemonitor: selector does not match the Service's labels")
    for endpoint in monitor["spec"]["endpoints"]:
        check(endpoint["port"] in service_ports, f"servicemonitor: port {endpoint['port']} is not a Service port name")
        check(endpoint.get("path", "/metrics") == "/metrics", "servicemonitor: path must be /metrics")
    say("Service, PodDisruptionBudget and ServiceMonitor select the StatefulSet's pods / Service and port")

    target = scaled["spec"]["scaleTargetRef"]
    check((target.get("apiVersion"), target.get("kind"), target.get("name")) == ("apps/v1", "StatefulSet", sts["metadata"]["name"]),
          f"scaledobject: scaleTargetRef {target} is not the StatefulSet")
    low, high = scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]
    check(low == 1 and high >= low, f"scaledobject: replicas {low}..{high} (min must be 1: a worker reports the lag)")
    for trigger in scaled["spec"]["triggers"]:
        query = trigger["metadata"]["query"]
        check("sync_consumer_lag_seconds" in query, f"scaledobject: the query {query!r} does not use sync_consumer_lag_seconds")
        job = monitor["metadata"]["name"] if not monitor["spec"].get("jobLabel") else None
        check(job is None or f'job="{job}"' in query, f"scaledobject: the query should select job=\"{job}\" (the ServiceMonitor's Service)")
    behavior = scaled["spec"].get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior", {})
    check(behavior.get("scaleDown", {}).get("stabilizationWindowSeconds", 0) >= 60, "scaledobject: scale-down needs a stabilization window (the cooldown that acts with minReplicaCount >= 1)")
    say(f"ScaledObject: the StatefulSet, {low}..{high} replicas on sync_consumer_lag_seconds, scale-down window {behavior.get('scaleDown', {}).get('stabilizationWindowSeconds')} s")
    finish("k8s")


# -------------------------------------------------------------------- compose ------------


def cmd_compose(path):
    compose = yaml.safe_load(Path(path).read_text())  # PyYAML resolves the << merge keys
    services = compose.get("services", {})
    volumes = set((compose.get("volumes") or {}).keys())
    known = known_variables()
    for name, service in services.items():
        for dep in service.get("depends_on", []) if isinstance(service.get("depends_on"), list) else (service.get("depends_on") or {}):
            check(dep in services, f"compose: {name} depends on an unknown service {dep}")
            condition = (service["depends_on"][dep] or {}).get("condition") if isinstance(service["depends_on"], dict) else None
            if condition == "service_healthy":
                check("healthcheck" in services.get(dep, {}), f"compose: {name} waits for {dep} to be healthy but it has no healthcheck")
        image = service.get("image", "")
        if "build" in service:
            build = service["build"]
            context = ROOT / build.get("context", ".")
            check((context / build.get("dockerfile", "Dockerfile")).is_file(), f"compose: {name}'s Dockerfile {build.get('dockerfile')} does not exist")
        else:
            check(re.fullmatch(r"[\w./-]+:[\w.-]+", image or "") and not image.endswith(":latest"),
                  f"compose: {name}'s image {image!r} is not pinned to a tag")
        for mount in service.get("volumes", []):
            source = mount.split(":")[0] if isinstance(mount, str) else mount.get("source")
            if source.startswith(("./", "/", "../")):
                check((ROOT / source).exists(), f"compose: {name} mounts {source}, which does not exist")
            else:
                check(source in volumes, f"compose: {name} uses the volume {source}, not declared under volumes:")
        env = service.get("environment") or {}
        if isinstance(env, list):
            env = dict(item.split("=", 1) for item in env)
        sync_vars = {k for k in env if k.startswith("SYNC_")}
        if sync_vars:
            check_variables(sync_vars, f"compose {name}", known)
            grace = service.get("stop_grace_period", "10s")
            seconds = int(re.fullmatch(r"(\d+)s", grace).group(1)) if re.fullmatch(r"(\d+)s", grace) else 0
            shutdown = int(env.get("SYNC_SHUTDOWN_GRACE_MS", 30000)) / 1000
            check(seconds > shutdown, f"compose: {name} stop_grace_period {grace} must exceed SYNC_SHUTDOWN_GRACE_MS ({shutdown:g} s)")
            check(env.get("SYNC_KAFKA_INSTANCE_ID"), f"compose: {name} needs its own SYNC_KAFKA_INSTANCE_ID (HOSTNAME changes per container)")
    workers = {n: s for n, s in services.items() if "SYNC_KAFKA_GROUP_ID" in (s.get("environment") or {})}
    check(len(workers) >= 2 and len({s["environment"]["SYNC_KAFKA_GROUP_ID"] for s in workers.values()}) == 1,
          "compose: two workers sharing one group expected")
    check(len({s["environment"].get("SYNC_KAFKA_INSTANCE_ID") for s in workers.values()}) == len(workers),
          "compose: the workers' SYNC_KAFKA_INSTANCE_ID must differ")
    say(f"{len(services)} services; depends_on, volumes, bind mounts, Dockerfile, pinned images and SYNC_* names resolve")

    # Prometheus scrapes the workers' metrics ports and loads the alert rules; Grafana's
    # provisioning points at the mounted dashboard.
    prom = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]}
    wanted = {f"{n}:{s['environment']['SYNC_METRICS_ADDR'].rsplit(':', 1)[1]}" for n, s in workers.items()}
    check(targets == wanted, f"deploy/prometheus/prometheus.yml scrapes {sorted(targets)}, the workers are {sorted(wanted)}")
    check("alerts.yml" in prom.get("rule_files", []), "deploy/prometheus/prometheus.yml does not load alerts.yml")
    prom_mounts = " ".join(services.get("prometheus", {}).get("volumes", []))
    check("deploy/prometheus/alerts.yml:/etc/prometheus/alerts.yml" in prom_mounts, "compose: prometheus does not mount alerts.yml beside its config")
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/sync-engine.yml").read_text())
    dash_dir = provider["providers"][0]["options"]["path"]
    graf_mounts = services.get("grafana", {}).get("volumes", [])
    check(any(m.startswith("./deploy/grafana/sync-engine.json:" + dash_dir + "/") for m in graf_mounts),
          f"compose: grafana does not mount the dashboard into {dash_dir}")
    check(any(m.startswith("./deploy/grafana/provisioning:/etc/grafana/provisioning") for m in graf_mounts),
          "compose: grafana does not mount deploy/grafana/provisioning")
    say("Prometheus scrapes both workers and loads alerts.yml; Grafana provisions the dashboard")
    finish("compose")


# ------------------------------------------------------------------ metric names ---------


def declared_metrics():
    """{name: type} from src/metrics.rs: the constants, typed by their describe_*! call."""
    text = (ROOT / "src/metrics.rs").read_text()
    constants = dict(re.findall(r'pub const ([A-Z0-9_]+): &str = "(sync_[a-z0-9_]+)";', text))
    kinds = {}
    for kind, const in re.findall(r"describe_(counter|gauge|histogram)!\(\s*([A-Z0-9_]+)", text):
        kinds[constants.get(const, const)] = kind
    return {name: kinds.get(name, "untyped") for name in constants.values()}


def exported_series(declared):
    """The series names Prometheus sees: histograms as _bucket/_sum/_count."""
    names = set()
    for name, kind in declared.items():
        if kind == "histogram":
            names.update({f"{name}_bucket", f"{name}_sum", f"{name}_count"})
        else:
            names.add(name)
    return names


def metric_names(expr):
    """sync_* metric names in a PromQL expression, string literals left out."""
    bare = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    return set(re.findall(r"(?<![A-Za-z0-9_:])sync_[a-z0-9_]+(?![A-Za-z0-9_:])", bare))


def alert_rules():
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    return [rule for group in rules["groups"] for rule in group["rules"]]


def dashboard_targets(path="deploy/grafana/sync-engine.json"):
    dashboard = json.loads((ROOT / path).read_text())
    out = []
    for panel in dashboard["panels"]:
        for sub in [panel] + panel.get("panels", []):
            out.extend((sub["title"], t["expr"]) for t in sub.get("targets", []) if "expr" in t)
    return out


def cmd_names():
    declared = declared_metrics()
    series = exported_series(declared)
    say(f"src/metrics.rs declares {len(declared)} metrics ({sum(k == 'histogram' for k in declared.values())} histograms): {len(series)} series names")
    for name, kind in declared.items():
        check(kind != "counter" or name.endswith("_total"), f"src/metrics.rs: counter {name} does not end in _total")
    used = {}
    for rule in alert_rules():
        for name in metric_names(rule["expr"]):
            used.setdefault(name, []).append(f"alert {rule['alert']}")
        annotations = rule.get("annotations", {})
        for key in ("summary", "description", "runbook"):
            check(annotations.get(key), f"alerts.yml: {rule['alert']} has no {key} annotation")
        check(rule.get("labels", {}).get("severity") in ("critical", "warning"), f"alerts.yml: {rule['alert']} has no severity critical|warning")
        check('job="sync-engine"' in rule["expr"], f"alerts.yml: {rule['alert']} does not select job=\"sync-engine\"")
    for title, expr in dashboard_targets():
        for name in metric_names(expr):
            used.setdefault(name, []).append(f"dashboard panel {title!r}")
    for name, where in sorted(used.items()):
        check(name in series, f"{name} (in {', '.join(sorted(set(where)))}) is not a metric src/metrics.rs exports")
    say(f"{len(used)} metric names used by {len(alert_rules())} alerts and {len(dashboard_targets())} dashboard queries, all exported")
    unused = sorted(n for n in declared if not ({n, f"{n}_bucket", f"{n}_sum", f"{n}_count"} & set(used)))
    say(f"declared, on no dashboard panel or alert: {', '.join(unused) or 'none'}")

    # README's Alerts table names every alert of alerts.yml, and only those.
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"^### Alerts\n(.*?)(?=^##)", readme, re.M | re.S)
    if check(section, "README.md has no '### Alerts' section"):
        table = set(re.findall(r"^\| `(SyncEngine\w+)` \|", section.group(1), re.M))
        rules = {rule["alert"] for rule in alert_rules()}
        check(table == rules, f"README Alerts table vs alerts.yml: missing {sorted(rules - table)}, extra {sorted(table - rules)}")
        say(f"README's Alerts table lists the {len(rules)} alerts of alerts.yml")
    finish("names")


# ------------------------------------------------------------------ dashboard ------------


def cmd_dashboard(path):
    dashboard = json.loads(Path(path).read_text())
    check(dashboard.get("uid") and dashboard.get("title"), "dashboard: uid and title required")
    check(isinstance(dashboard.get("schemaVersion"), int), "dashboard: schemaVersion required")
    variables = {v["name"] for v in dashboard.get("templating", {}).get("list", [])}
    check("datasource" in variables, "dashboard: a 'datasource' variable is needed (provisioning and import both resolve it)")
    ids = set()
    panel_types = {"row", "timeseries", "stat", "state-timeline", "gauge", "bargauge", "table", "text", "heatmap"}
    boxes = []
    for panel in dashboard["panels"]:
        check(panel.get("id") not in ids, f"dashboard: panel id {panel.get('id')} twice")
        ids.add(panel.get("id"))
        check(panel.get("type") in panel_types, f"dashboard: panel {panel.get('title')!r} has type {panel.get('type')!r}")
        grid = panel.get("gridPos", {})
        check(all(isinstance(grid.get(k), int) for k in "hwxy") and grid["x"] + grid["w"] <= 24,
              f"dashboard: panel {panel.get('title')!r} gridPos {grid}")
        for other in boxes:
            overlap = (grid["x"] < other["x"] + other["w"] and other["x"] < grid["x"] + grid["w"]
                       and grid["y"] < other["y"] + other["h"] and other["y"] < grid["y"] + grid["h"])
            check(not overlap, f"dashboard: panel {panel.get('title')!r} overlaps another")
        boxes.append(grid)
        if panel.get("type") == "row":
            continue
        check(panel.get("datasource", {}).get("uid") == "${datasource}", f"dashboard: panel {panel['title']!r} must use ${{datasource}}")
        targets = panel.get("targets", [])
        check(targets, f"dashboard: panel {panel['title']!r} has no query")
        for target in targets:
            check(target.get("refId") and target.get("expr"), f"dashboard: panel {panel['title']!r} has a target without refId/expr")
            for var in re.findall(r"\$(\w+)", target.get("expr", "")):
                check(var in variables or var.startswith("__"), f"dashboard: panel {panel['title']!r} uses ${var}, which is not defined")
    say(f"{len(dashboard['panels'])} panels: unique ids, known types, no overlaps, every query on ${{datasource}} with defined variables")
    finish("dashboard")


# ---------------------------------------------------------------------- live -------------


def prom_get(base, path, **params):
    url = f"{base}{path}?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.load(response)
    except urllib.error.HTTPError as error:
        return json.load(error)


def instant(base, query):
    answer = prom_get(base, "/api/v1/query", query=query)
    return answer.get("status") == "success", answer


def cmd_live(base, job, produced):
    produced = int(produced)
    declared = declared_metrics()
    series = exported_series(declared)

    # Wait (bounded) until the worker is up, has consumed everything and a rule round ran.
    deadline = time.time() + 60
    consumed = 0
    while time.time() < deadline:
        ok, up = instant(base, f'up{{job="{job}"}} == 1')
        ok2, total = instant(base, f'sum(sync_records_consumed_total{{job="{job}"}})')
        results = total.get("data", {}).get("result", []) if ok2 else []
        consumed = float(results[0]["value"][1]) if results else 0
        if ok and up["data"]["result"] and consumed >= produced:
            break
        time.sleep(0.5)
    check(consumed >= produced, f"Prometheus saw sync_records_consumed_total {consumed:g}, the worker was given {produced}")
    say(f'up{{job="{job}"}} == 1 and sum(sync_records_consumed_total) = {consumed:g} (>= {produced} produced)')

    answer = prom_get(base, "/api/v1/label/__name__/values")
    scraped = set(answer.get("data", []))
    sync_scraped = {n for n in scraped if n.startswith("sync_")}
    for name in sorted(sync_scraped - series):
        check(False, f"the worker exports {name}, which src/metrics.rs does not declare (or the suffix rule is wrong)")
    required = {"sync_records_consumed_total", "sync_items_settled_total", "sync_settle_latency_seconds_bucket",
                "sync_flush_duration_seconds_count", "sync_offsets_committed_total", "sync_circuit_state",
                "sync_wal_bytes", "sync_memory_budget_bytes", "sync_dead_lettered_total",
                "sync_consumer_lag_records", "sync_consumer_lag_seconds"}
    for name in sorted(required - scraped):
        check(False, f"Prometheus has no {name} series after the run")
    say(f"scraped {len(sync_scraped)} sync_* names, all declared in src/metrics.rs; the {len(required)} expected after a run are there")

    used = set()
    for rule in alert_rules():
        used |= metric_names(rule["expr"])
    for _, expr in dashboard_targets():
        used |= metric_names(expr)
    unseen = sorted(used - scraped)
    say(f"names used by alerts/dashboard and not scraped in this short run (they appear on their first event): {', '.join(unseen) or 'none'}")

    # Every query of the dashboard and every alert expression evaluates without error.
    for title, expr in dashboard_targets():
        query = (expr.replace("$__rate_interval", "1m").replace('"$job"', f'"{job}"')
                 .replace('"$instance"', '".*"').replace("$__range", "5m"))
        ok, answer = instant(base, query)
        check(ok, f"dashboard panel {title!r}: Prometheus refused {query!r}: {answer.get('error')}")
    for rule in alert_rules():
        ok, answer = instant(base, rule["expr"])
        check(ok, f"alert {rule['alert']}: Prometheus refused its expression: {answer.get('error')}")
    say(f"all {len(dashboard_targets())} dashboard queries and {len(alert_rules())} alert expressions evaluate")

    # The KEDA trigger's query, as written, answers one number (the replica count derives from it).
    for _, doc in manifests("deploy/k8s"):
        if doc.get("kind") == "ScaledObject":
            for trigger in doc["spec"]["triggers"]:
                query = trigger["metadata"]["query"]
                ok, answer = instant(base, query)
                result = answer.get("data", {}).get("result", []) if ok else []
                check(ok and len(result) == 1, f"scaledobject: {query!r} should give one sample, got {answer.get('error') or result}")
                if ok and len(result) == 1:
                    say(f"the ScaledObject's query {query!r} answers {float(result[0]['value'][1]):g}")

    deadline = time.time() + 20
    while time.time() < deadline:
        groups = prom_get(base, "/api/v1/rules").get("data", {}).get("groups", [])
        rules = [r for g in groups for r in g["rules"]]
        if rules and all(r.get("lastEvaluation", "").startswith("20") and not r["lastEvaluation"].startswith("0001") for r in rules):
            break
        time.sleep(0.5)
    check(len(rules) == len(alert_rules()), f"Prometheus loaded {len(rules)} rules, alerts.yml has {len(alert_rules())}")
    for rule in rules:
        check(rule.get("health") == "ok", f"rule {rule.get('name')}: health {rule.get('health')} {rule.get('lastError', '')}")
    firing = sorted({r["name"] for r in rules if r.get("state") == "firing"})
    say(f"Prometheus loaded and evaluated all {len(rules)} rules, every one healthy (firing now: {', '.join(firing) or 'none'})")
    finish("live")


def main(argv):
    commands = {"k8s": cmd_k8s, "crd-docs": cmd_crd_docs, "compose": cmd_compose, "names": cmd_names,
                "dashboard": cmd_dashboard, "live": cmd_live}
    if len(argv) < 2 or argv[1] not in commands:
        sys.exit(__doc__)
    commands[argv[1]](*argv[2:])


if __name__ == "__main__":
    main(sys.argv)
