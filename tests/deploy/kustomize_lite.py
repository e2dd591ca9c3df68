"""A small kustomize renderer for the features deploy/kubernetes uses, so the tests render the
overlays without kubectl (tests/deploy/test_kubernetes.py compares it with `kubectl kustomize`
where kubectl is installed).

Supported kustomization fields: `resources` (files and folders), `namespace`, `images`
(name -> newName / newTag / digest), `patches` (`path` or `patch`: a strategic-merge patch
naming its object, or a JSON 6902 list with a `target`). Anything else raises, so a new
kustomize feature in the manifests fails loudly here rather than rendering differently.

The strategic merge follows Kubernetes' patch strategies for the fields we patch: lists of
containers, initContainers, volumes, env, imagePullSecrets merge by `name`, volumeMounts by
`mountPath`, container ports by `containerPort`; other lists (args, command, tolerations)
are replaced; `null` deletes a key; `$patch: delete` in a list item deletes that item.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import List

import yaml

KUSTOMIZATION_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume",
                  "StorageClass", "CustomResourceDefinition", "PriorityClass",
                  "APIService", "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"}
MERGE_KEYS = {"containers": "name", "initContainers": "name", "ephemeralContainers": "name",
              "volumes": "name", "env": "name", "imagePullSecrets": "name",
              "volumeMounts": "mountPath", "ports": "containerPort"}
POD_TEMPLATE_PATHS = {"Deployment": ("spec", "template", "spec"), "DaemonSet": ("spec", "template", "spec"),
                      "StatefulSet": ("spec", "template", "spec"), "Job": ("spec", "template", "spec"),
                      "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"), "Pod": ("spec",)}


class KustomizeError(Exception):
    pass


def load_docs(path: Path) -> List[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kustomization_file(folder: Path) -> Path:
    for name in KUSTOMIZATION_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise KustomizeError(f"{folder}: no kustomization.yaml")


def render(folder) -> List[dict]:
    """The objects `kustomize build folder` would output (order not guaranteed)."""
    folder = Path(folder)
    spec = yaml.safe_load(kustomization_file(folder).read_text()) or {}
    unknown = set(spec) - SUPPORTED
    if unknown:
        raise KustomizeError(f"{folder}: kustomization fields not supported here: {sorted(unknown)}")
    objects: List[dict] = []
    for entry in spec.get("resources", []):
        path = (folder / entry).resolve()
        objects.extend(render(path) if path.is_dir() else load_docs(path))
    for patch in spec.get("patches", []):
        apply_patch(objects, patch, folder)
    if "namespace" in spec:
        for obj in objects:
            if obj.get("kind") not in CLUSTER_SCOPED:
                obj.setdefault("metadata", {})["namespace"] = spec["namespace"]
    for image in spec.get("images", []):
        for obj in objects:
            set_image(obj, image)
    keys = [(o.get("kind"), o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objects]
    duplicates = {k for k in keys if keys.count(k) > 1}
    if duplicates:
        raise KustomizeError(f"{folder}: objects defined twice: {sorted(map(str, duplicates))}")
    return objects


def find(objects: List[dict], kind: str, name: str) -> dict:
    matches = [o for o in objects if o.get("kind") == kind and o["metadata"]["name"] == name]
    if len(matches) != 1:
        raise KustomizeError(f"patch target {kind}/{name}: {len(matches)} objects match")
    return matches[0]


def apply_patch(objects: List[dict], entry: dict, folder: Path) -> None:
    extra = set(entry) - {"path", "patch", "target"}
    if extra:
        raise KustomizeError(f"patch fields not supported here: {sorted(extra)}")
    text = (folder / entry["path"]).read_text() if "path" in entry else entry["patch"]
    body = yaml.safe_load(text)
    if isinstance(body, list):  # JSON 6902
        target = entry.get("target") or {}
        obj = find(objects, target["kind"], target["name"])
        for op in body:
            json6902(obj, op)
        return
    target = entry.get("target") or {"kind": body["kind"], "name": body["metadata"]["name"]}
    obj = find(objects, target["kind"], target["name"])
    merged = strategic_merge(obj, body)
    obj.clear()
    obj.update(merged)


def strategic_merge(base, patch, field: str = ""):
    if isinstance(patch, dict) and isinstance(base, dict):
        if patch.get("$patch") == "replace":
            return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
        out = copy.deepcopy(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = strategic_merge(out[key], value, key)
            else:
                out[key] = copy.deepcopy(value)
        return out
    if isinstance(patch, list) and isinstance(base, list) and field in MERGE_KEYS:
        key = MERGE_KEYS[field]
        out = copy.deepcopy(base)
        for item in patch:
            index = next((i for i, b in enumerate(out) if b.get(key) == item.get(key)), None)
            if item.get("$patch") == "delete":
                if index is not None:
                    out.pop(index)
            elif index is None:
                out.append(copy.deepcopy(item))
            else:
                out[index] = strategic_merge(out[index], item)
        return out
    return copy.deepcopy(patch)


def json6902(obj: dict, op: dict) -> None:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
    parent = obj
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    last = parts[-1]
    kind = op["op"]
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        if kind == "add":
            parent.insert(index, copy.deepcopy(op["value"]))
        elif kind == "replace":
            parent[index] = copy.deepcopy(op["value"])
        elif kind == "remove":
            parent.pop(index)
        else:
            raise KustomizeError(f"JSON patch op {kind!r} not supported here")
    else:
        if kind in ("add", "replace"):
            if kind == "replace" and last not in parent:
                raise KustomizeError(f"JSON patch replace: {op['path']} does not exist")
            parent[last] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del parent[last]
        else:
            raise KustomizeError(f"JSON patch op {kind!r} not supported here")


def pod_spec(obj: dict):
    path = POD_TEMPLATE_PATHS.get(obj.get("kind"))
    if path is None:
        return None
    node = obj
    for part in path:
        node = node.get(part, {})
    return node


def set_image(obj: dict, image: dict) -> None:
    spec = pod_spec(obj)
    if not spec:
        return
    for container in spec.get("initContainers", []) + spec.get("containers", []):
        ref = container.get("image", "")
        name, tag = ref, None
        if "@" in ref:
            name = ref.split("@", 1)[0]
        elif ":" in ref.rsplit("/", 1)[-1]:
            name, tag = ref.rsplit(":", 1)
        if name != image["name"]:
            continue
        new = image.get("newName", name)
        if "digest" in image:
            container["image"] = f"{new}@{image['digest']}"
        else:
            tag = image.get("newTag", tag)
            container["image"] = f"{new}:{tag}" if tag else new
