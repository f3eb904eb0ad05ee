"""Renders each Kubernetes overlay under deploy/kubernetes/overlays (and the trainer job templates under
deploy/trainer-job/launch) and
validates every object offline: against the Kubernetes OpenAPI schemas
bundled with `kubernetes-validate` (strict: unknown fields are errors), the
Prometheus Operator's ServiceMonitor by the fields it requires, and the
references between objects (ConfigMaps, Secrets, Services, the HPA target,
NetworkPolicy and PodDisruptionBudget selectors, the trainer as a single writer).

Rendering: `kubectl kustomize` when kubectl is installed; otherwise the small
renderer below, which implements exactly the kustomize features these
manifests use (resources, components, namespace, labels, images,
configMapGenerator, strategic-merge patches). With kubectl present both run
and must produce the same objects. Run by tests/deploy_manifests.rs;
standalone: python deploy/validate_manifests.py
"""

import copy
import hashlib
import os
import shutil
import subprocess
import sys

import kubernetes_validate
import yaml

ROOT = os.path.dirname(os.path.abspath(__file__))
OVERLAYS = os.path.join(ROOT, "kubernetes", "overlays")
JOB_LAUNCH = os.path.join(ROOT, "trainer-job", "launch")
K8S_VERSION = "1.30.0"
failures = []


def fail(message):
    failures.append(message)
    print(f"FAIL {message}")


# ---- the small renderer -------------------------------------------------------------------------------------

def merge(base, patch):
    """Strategic merge as kustomize does it for these manifests: maps merge, lists of named maps merge by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(x, dict) and "name" in x for x in base + patch):
        out = [copy.deepcopy(x) for x in base]
        for item in patch:
            match = next((i for i, x in enumerate(out) if x["name"] == item["name"]), None)
            if match is None:
                out.append(copy.deepcopy(item))
            else:
                out[match] = merge(out[match], item)
        return out
    return copy.deepcopy(patch)


def load_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def pod_spec(obj):
    return obj.get("spec", {}).get("template", {}).get("spec")


def render(directory):
    with open(os.path.join(directory, "kustomization.yaml")) as f:
        k = yaml.safe_load(f)
    objects = []
    for entry in k.get("resources", []) + k.get("components", []):
        path = os.path.normpath(os.path.join(directory, entry))
        if os.path.isdir(path):
            objects += render(path)
        elif os.path.isfile(path):
            objects += load_docs(path)
        else:
            fail(f"{directory}/kustomization.yaml: {entry} does not exist")
    for generator in k.get("configMapGenerator", []):
        data = {}
        for name in generator.get("files", []):
            path = os.path.join(directory, name)
            if not os.path.isfile(path):
                fail(f"{directory}/kustomization.yaml: {name} does not exist")
                continue
            with open(path) as f:
                data[os.path.basename(name)] = f.read()
        objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]}, "data": data,
                        "_generated": True})
    for patch in k.get("patches", []):
        path = os.path.join(directory, patch["path"])
        for p in load_docs(path):
            targets = [o for o in objects if o["kind"] == p["kind"] and o["metadata"]["name"] == p["metadata"]["name"]]
            if not targets:
                fail(f"{path}: patches a {p['kind']} {p['metadata']['name']} the overlay does not have")
            for target in targets:
                objects[objects.index(target)] = merge(target, p)
    for image in k.get("images", []):
        for obj in objects:
            spec = pod_spec(obj)
            for container in (spec or {}).get("containers", []):
                name, _, _ = container["image"].partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image['newTag']}"
    for group in k.get("labels", []):
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update(group["pairs"])
    if "namespace" in k:
        for obj in objects:
            if obj["kind"] != "Namespace":
                obj["metadata"]["namespace"] = k["namespace"]
    return objects


def finish(objects):
    """Name suffixes for generated ConfigMaps, and the references to them, as kustomize does."""
    renames = {}
    for obj in objects:
        if obj.pop("_generated", False):
            digest = hashlib.sha256(yaml.safe_dump(obj["data"]).encode()).hexdigest()[:10]
            new = f"{obj['metadata']['name']}-{digest}"
            renames[obj["metadata"]["name"]] = new
            obj["metadata"]["name"] = new
    for obj in objects:
        for volume in (pod_spec(obj) or {}).get("volumes", []):
            if "configMap" in volume and volume["configMap"]["name"] in renames:
                volume["configMap"]["name"] = renames[volume["configMap"]["name"]]
    return objects


def kubectl_render(overlay):
    out = subprocess.run(["kubectl", "kustomize", overlay], capture_output=True, text=True)
    if out.returncode != 0:
        fail(f"kubectl kustomize {overlay}: {out.stderr.strip()}")
        return []
    return [d for d in yaml.safe_load_all(out.stdout) if d]


# ---- checks -------------------------------------------------------------------------------------------------

def check_service_monitor(obj, where):
    spec = obj.get("spec", {})
    unknown = set(spec) - {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    if unknown:
        fail(f"{where}: unknown ServiceMonitor fields {sorted(unknown)}")
    if not spec.get("selector", {}).get("matchLabels"):
        fail(f"{where}: a ServiceMonitor needs spec.selector.matchLabels")
    for endpoint in spec.get("endpoints", []) or [None]:
        if not endpoint or not endpoint.get("port"):
            fail(f"{where}: every ServiceMonitor endpoint needs a port name")


def selects(selector, labels):
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def check_references(objects, where):
    by_kind = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], {})[obj["metadata"]["name"]] = obj
    workloads = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
    pods = {o["metadata"]["name"]: o["spec"]["template"]["metadata"].get("labels", {}) for o in workloads}
    ports = {o["metadata"]["name"]: {p.get("name") for c in pod_spec(o)["containers"] for p in c.get("ports", [])}
             for o in workloads}
    for w in workloads:
        name = w["metadata"]["name"]
        if not selects(w["spec"]["selector"]["matchLabels"], pods[name]):
            fail(f"{where}: {name}'s selector does not match its own pods")
        spec = pod_spec(w)
        for volume in spec.get("volumes", []):
            if "configMap" in volume and volume["configMap"]["name"] not in by_kind.get("ConfigMap", {}):
                fail(f"{where}: {name} mounts a missing ConfigMap {volume['configMap']['name']}")
        for container in spec["containers"]:
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    secret = by_kind.get("Secret", {}).get(ref["name"])
                    if not secret or ref["key"] not in secret.get("stringData", secret.get("data", {})):
                        fail(f"{where}: {name} reads a missing secret key {ref['name']}/{ref['key']}")
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                port = container.get(probe, {}).get("httpGet", {}).get("port")
                if isinstance(port, str) and port not in ports[name]:
                    fail(f"{where}: {name}'s {probe} names an unknown port {port}")
    for w in workloads:
        governing = w["spec"].get("serviceName")
        if w["kind"] == "StatefulSet" and governing not in by_kind.get("Service", {}):
            fail(f"{where}: StatefulSet {w['metadata']['name']} names a missing Service {governing}")
    for svc in by_kind.get("Service", {}).values():
        backing = [n for n, labels in pods.items() if selects(svc["spec"]["selector"], labels)]
        if len(backing) != 1:
            fail(f"{where}: Service {svc['metadata']['name']} selects {backing}")
        for p in svc["spec"]["ports"]:
            if isinstance(p.get("targetPort"), str) and backing and p["targetPort"] not in ports[backing[0]]:
                fail(f"{where}: Service {svc['metadata']['name']} targets an unknown port {p['targetPort']}")
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        for obj in by_kind.get(kind, {}).values():
            selector = obj["spec"].get("selector", obj["spec"].get("podSelector", {})).get("matchLabels")
            if not any(selects(selector, labels) for labels in pods.values()):
                fail(f"{where}: {kind} {obj['metadata']['name']} selects no pods")
    redis_clients = [n for n, labels in pods.items() if labels.get("instructd.dev/redis-client") == "true"]
    if sorted(redis_clients) != ["instructd-gateway", "instructd-trainer"]:
        fail(f"{where}: the pods allowed to reach Redis are {redis_clients}")
    for hpa in by_kind.get("HorizontalPodAutoscaler", {}).values():
        target = hpa["spec"]["scaleTargetRef"]
        if target["name"] not in by_kind.get(target["kind"], {}):
            fail(f"{where}: the HPA scales a missing {target['kind']} {target['name']}")
        if target["name"] == "instructd-trainer":
            fail(f"{where}: the trainer is a single writer and must not be autoscaled")
    trainer = by_kind.get("StatefulSet", {}).get("instructd-trainer")
    if not trainer or trainer["spec"].get("replicas") != 1:
        fail(f"{where}: the trainer must be a StatefulSet of exactly one replica")
    redis = by_kind.get("StatefulSet", {}).get("instructd-redis")
    args = " ".join(redis["spec"]["template"]["spec"]["containers"][0]["args"]) if redis else ""
    for setting in ("--appendonly yes", "--appendfsync everysec", "--requirepass"):
        if setting not in args:
            fail(f"{where}: Redis runs without {setting}")
    gateway = by_kind.get("StatefulSet", {}).get("instructd-gateway")
    if not gateway:
        fail(f"{where}: the gateway must be a StatefulSet (its feedback spill lives on a claim per replica)")
    else:
        container = pod_spec(gateway)["containers"][0]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        if env.get("INSTRUCTD_LOG_FORMAT") != "json" or env.get("INSTRUCTD__GATEWAY__ROLLOUT__FETCH") != "http":
            fail(f"{where}: the gateway must log JSON and fetch checkpoints over HTTP")
        grace = int(env.get("INSTRUCTD__GATEWAY__SHUTDOWN_GRACE_SECS", "30"))
        if grace + 10 >= pod_spec(gateway)["terminationGracePeriodSeconds"]:
            fail(f"{where}: terminationGracePeriodSeconds must exceed preStop + shutdown_grace_secs")
        spill = env.get("INSTRUCTD__GATEWAY__PLAYGROUND__SPILL_DIR")
        claims = {c["metadata"]["name"] for c in gateway["spec"].get("volumeClaimTemplates", [])}
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        if not spill or mounts.get(spill) not in claims:
            fail(f"{where}: the gateway's feedback spill ({spill}) must be on a persistent volume claim, not emptyDir")
        if gateway["spec"]["replicas"] < 2:
            fail(f"{where}: the gateway needs two replicas or more")


def check_overlay(overlay):
    name = os.path.relpath(overlay, ROOT)
    objects = finish(render(overlay))
    if shutil.which("kubectl") and not os.environ.get("INSTRUCTD_NO_KUBECTL"):
        rendered = kubectl_render(overlay)
        ours = sorted((o["kind"], o["metadata"]["name"].rsplit("-", 1)[0] if o["kind"] == "ConfigMap" else
                       o["metadata"]["name"]) for o in objects)
        theirs = sorted((o["kind"], o["metadata"]["name"].rsplit("-", 1)[0] if o["kind"] == "ConfigMap" else
                         o["metadata"]["name"]) for o in rendered)
        if ours != theirs:
            fail(f"{name}: this renderer and kubectl kustomize disagree: {ours} vs {theirs}")
        objects = rendered
        print(f"{name}: rendered with kubectl kustomize")
    else:
        print(f"{name}: rendered with the built-in renderer (no kubectl)")
    for obj in objects:
        where = f"{name}: {obj['kind']}/{obj['metadata']['name']}"
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            check_service_monitor(obj, where)
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError,
                kubernetes_validate.InvalidSchemaError) as e:
            fail(f"{where}: {getattr(e, 'message', e)}")
    check_references(objects, name)
    print(f"{name}: {len(objects)} objects checked")
    return len(objects)


def check_trainer_job_templates():
    """deploy/trainer-job/launch: the cluster objects as they are, and each Job template with its placeholders
    filled in as kubernetes.sh fills them (by text, before kubectl apply)."""
    name = "trainer-job/launch"
    values = {"RUN": "instructd-sft-1765000000-42", "IMAGE": "registry.example/instructd-trainer-job:1",
              "NODES": "2", "GPUS": "8", "ACCELERATE_CONFIG": "/job/accelerate/fsdp.yaml"}
    objects = load_docs(os.path.join(JOB_LAUNCH, "cluster.yaml"))
    for template in ("job.yaml", "indexed-job.yaml"):
        with open(os.path.join(JOB_LAUNCH, template)) as f:
            text = f.read()
        for key, value in values.items():
            text = text.replace("${" + key + "}", value)
        if "${" in text:
            fail(f"{name}/{template}: a placeholder kubernetes.sh does not fill")
        objects += [d for d in yaml.safe_load_all(text) if d]
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError,
                kubernetes_validate.InvalidSchemaError) as e:
            fail(f"{name}: {obj['kind']}/{obj['metadata']['name']}: {getattr(e, 'message', e)}")
    claims = {o["metadata"]["name"] for o in objects if o["kind"] == "PersistentVolumeClaim"}
    services = {o["metadata"]["name"] for o in objects if o["kind"] == "Service"}
    for job in (o for o in objects if o["kind"] == "Job"):
        spec = pod_spec(job)
        for volume in spec.get("volumes", []):
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            if claim and claim not in claims:
                fail(f"{name}: Job mounts a claim {claim} that cluster.yaml does not create")
        if "subdomain" in spec and spec["subdomain"] not in services:
            fail(f"{name}: the indexed Job's pods name a missing headless Service {spec['subdomain']}")
    print(f"{name}: {len(objects)} objects checked")
    return len(objects)


def main():
    overlays = sorted(os.path.join(OVERLAYS, d) for d in os.listdir(OVERLAYS))
    total = sum(check_overlay(o) for o in overlays) + check_trainer_job_templates()
    if failures:
        print(f"{len(failures)} problems")
        sys.exit(1)
    print(f"all {total} objects of {len(overlays)} overlays and the trainer job's templates valid against "
          f"Kubernetes {K8S_VERSION}")


if __name__ == "__main__":
    main()
