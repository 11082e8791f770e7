#!/usr/bin/env python3
"""The checks of deploy/validate.sh that kubernetes-validate cannot do.

kubernetes-validate knows only core Kubernetes kinds. This script:

1. checks the CRD kinds we ship (NetworkAttachmentDefinition, ServiceMonitor) against reduced
   schemas written here: only the fields these manifests use, unknown fields refused. They are
   not the upstream CRD schemas (those are not shipped with any package we install);
2. parses each NetworkAttachmentDefinition's CNI config (bridge + whereabouts) and checks its
   addresses;
3. checks the kustomize layout (every listed resource exists, every manifest is listed);
4. checks references between objects (Multus annotations, selectors, volumes, ports);
5. checks the router Deployment against the router config: interfaces, sysctls
   (router/src/sysctl.rs), ports, gateway addresses, and the issue's requirements
   (capabilities, probes, rolling update, anti-affinity, PDB), and that every attachment's
   range holds its workloads' replicas plus their rolling update's surge;
6. checks the DNS path of a `local_route` virtual server (the cluster DNS service IP served by
   resolver pods): the client attachments' /32 route to it, the resolver attachment's routes
   and the CoreDNS Corefile (docs/operations.md#dns-through-the-vpn-resolver-pods);
7. writes the router config, its secrets and the embedded shell scripts to OUT_DIR so that
   validate.sh can run `vpn-router check-config` and shellcheck on them.

It also reads the image recipe (deploy/Dockerfile): entrypoint, nft, exposed port, and with
CARGO_METADATA (`cargo metadata --locked` output) that RUST_VERSION is new enough.

Usage: validate.py DEPLOY_DIR OUT_DIR [CARGO_METADATA]. Exit 1 with one line per problem.
"""

import base64
import ipaddress
import json
import os
import re
import shlex
import subprocess
import sys

import jsonschema
import yaml

ERRORS = []


def err(where, msg):
    ERRORS.append(f"{where}: {msg}")


# ---------------------------------------------------------------------------------------------
# loading

MANIFEST_SKIP = {"kustomization.yaml", ".yamllint.yaml"}
CLUSTER_SCOPED = {"Namespace"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}


class Obj:
    def __init__(self, path, doc):
        self.path = path
        self.doc = doc
        self.kind = doc.get("kind", "")
        meta = doc.get("metadata") or {}
        self.name = meta.get("name", "")
        self.ns = meta.get("namespace", "")
        self.labels = meta.get("labels") or {}

    def where(self):
        return f"{self.path}: {self.kind}/{self.name}"


def load(root):
    objs, kustomizations = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        # promtool unit tests of a component (check-monitoring.sh), not manifests
        dirnames[:] = sorted(d for d in dirnames if d != "tests")
        for fn in sorted(filenames):
            if not fn.endswith(".yaml"):
                continue
            path = os.path.join(dirpath, fn)
            with open(path, encoding="utf-8") as f:
                try:
                    docs = [d for d in yaml.safe_load_all(f) if d is not None]
                except yaml.YAMLError as e:
                    err(path, f"invalid YAML: {e}")
                    continue
            if fn == "kustomization.yaml":
                kustomizations.append((path, docs[0] if docs else {}))
            elif fn not in MANIFEST_SKIP:
                for d in docs:
                    if not isinstance(d, dict):
                        err(path, "a document is not a mapping")
                        continue
                    objs.append(Obj(path, d))
    return objs, kustomizations


# ---------------------------------------------------------------------------------------------
# reduced schemas of the CRD kinds (only what these manifests use; unknown fields refused)

METADATA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "namespace"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 253},
        "namespace": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}

NAD_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "k8s.cni.cncf.io/v1"},
        "kind": {"const": "NetworkAttachmentDefinition"},
        "metadata": METADATA,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["config"],
            "properties": {"config": {"type": "string", "minLength": 2}},
        },
    },
}

# Prometheus Operator's Duration pattern.
DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["key", "operator"],
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": METADATA,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": LABEL_SELECTOR,
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "jobLabel": {"type": "string"},
                "targetLabels": {"type": "array", "items": {"type": "string"}},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": DURATION,
                            "scrapeTimeout": DURATION,
                            "honorLabels": {"type": "boolean"},
                        },
                    },
                },
            },
        },
    },
}

PROMETHEUS_RULE_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": METADATA,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["groups"],
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name", "rules"],
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "rules": {
                                "type": "array",
                                "minItems": 1,
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["alert", "expr", "labels", "annotations"],
                                    "properties": {
                                        "alert": {"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_]*$"},
                                        "expr": {"type": "string", "minLength": 1},
                                        "for": DURATION,
                                        "labels": {
                                            "type": "object",
                                            "required": ["severity"],
                                            "properties": {"severity": {"enum": ["critical", "warning", "info"]}},
                                            "additionalProperties": {"type": "string"},
                                        },
                                        "annotations": {
                                            "type": "object",
                                            "required": ["summary", "description"],
                                            "additionalProperties": {"type": "string"},
                                        },
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}

# What each kind's check covers; validate.sh lets kubernetes-validate's "no schema" warning pass
# only for these (apiVersion, kind) pairs.
REDUCED = {
    ("k8s.cni.cncf.io/v1", "NetworkAttachmentDefinition"): NAD_SCHEMA,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR_SCHEMA,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE_SCHEMA,
}

BRIDGE_KEYS = {
    "cniVersion", "name", "type", "bridge", "mtu", "ipam", "isGateway", "isDefaultGateway",
    "forceAddress", "ipMasq", "hairpinMode", "promiscMode", "vlan", "preserveDefaultVlan",
    "vlanTrunk", "enabledad", "macspoofchk", "disableContainerInterface", "portIsolation",
}
WHEREABOUTS_KEYS = {
    "type", "range", "range_start", "range_end", "exclude", "gateway", "routes",
    "enable_overlapping_ranges", "network_name", "log_file", "log_level",
}
CNI_VERSIONS = {"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"}


class Nad:
    """A parsed bridge + whereabouts attachment, with the tuning plugin's sysctls."""

    def __init__(self, obj, bridge, tuning):
        self.obj = obj
        self.cfg = bridge
        ipam = bridge["ipam"]
        self.network = ipaddress.ip_network(ipam["range"], strict=False)
        hosts = (self.network.network_address + 1, self.network.broadcast_address - 1)
        self.start = ipaddress.ip_address(ipam.get("range_start", str(hosts[0])))
        self.end = ipaddress.ip_address(ipam.get("range_end", str(hosts[1])))
        self.gateway = ipaddress.ip_address(ipam["gateway"]) if "gateway" in ipam else None
        self.bridge = bridge["bridge"]
        # "net.ipv4.conf.IFNAME.arp_ignore" -> "1" (IFNAME: the attachment's interface)
        self.tuning = tuning

    def pool(self):
        return [ipaddress.ip_address(a) for a in range(int(self.start), int(self.end) + 1)]

    def ipam_routes(self):
        """[(destination, next hop)] of the ipam routes, as the bridge plugin installs them: via
        the route's own `gw`, else the ipam `gateway`, else on-link (None). Routes check_nad
        refused are left out."""
        out = []
        for r in self.cfg["ipam"].get("routes") or []:
            try:
                gw = ipaddress.ip_address(r["gw"]) if "gw" in r else self.gateway
                out.append((ipaddress.ip_network(r["dst"]), gw))
            except (KeyError, TypeError, ValueError):
                continue
        return out

    def next_hop(self, addr):
        """Where a pod of this attachment sends `addr`: the next hop of the longest matching
        ipam route; None when that is the attachment's own subnet (on-link, which wins a tie) or
        when nothing matches (the pod's primary network)."""
        best, hop = (self.network.prefixlen, None) if addr in self.network else (-1, None)
        for net, gw in self.ipam_routes():
            if addr in net and net.prefixlen > best:
                best, hop = net.prefixlen, gw
        return hop


TUNING_KEYS = {"type", "name", "cniVersion", "sysctl"}


def check_nad(obj):
    where = obj.where()
    try:
        cfg = json.loads(obj.doc["spec"]["config"])
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        err(where, f"spec.config is not a JSON CNI config: {e}")
        return None
    if cfg.get("cniVersion") not in CNI_VERSIONS:
        err(where, f"cniVersion {cfg.get('cniVersion')!r}; expected one of {sorted(CNI_VERSIONS)}")
    if cfg.get("name") != obj.name:
        err(where, f"CNI name {cfg.get('name')!r} differs from metadata.name {obj.name!r}")
    if "plugins" in cfg:
        for k in sorted(set(cfg) - {"cniVersion", "name", "plugins", "disableCheck"}):
            err(where, f"conflist: unknown key {k!r}")
        plugins = cfg["plugins"] if isinstance(cfg["plugins"], list) else []
    else:
        plugins = [cfg]
    types = [p.get("type") for p in plugins if isinstance(p, dict)]
    if not types or types[0] != "bridge" or any(t not in ("bridge", "tuning") for t in types) or types.count("bridge") != 1:
        err(where, f"CNI plugins {types}: only a bridge attachment, optionally followed by tuning, is checked here; extend validate.py")
        return None
    b = plugins[0]
    for k in sorted(set(b) - BRIDGE_KEYS):
        err(where, f"bridge config: unknown key {k!r}")
    tuning = {}
    for t in plugins[1:]:
        for k in sorted(set(t) - TUNING_KEYS):
            err(where, f"tuning config: unknown key {k!r}")
        for k, v in (t.get("sysctl") or {}).items():
            if not isinstance(v, str):
                err(where, f"tuning sysctl {k}: the value must be a string (CNI), got {v!r}")
            if not k.startswith("net."):
                err(where, f"tuning sysctl {k}: only net.* sysctls belong to the pod's network namespace")
            tuning[k] = str(v)
    bridge = b.get("bridge", "")
    if not 1 <= len(bridge) <= 15:
        err(where, f"bridge name {bridge!r} must be 1-15 characters (a Linux interface name)")
    mtu = b.get("mtu")
    if not isinstance(mtu, int) or not 68 <= mtu <= 65535:
        err(where, f"mtu {mtu!r} is not an MTU")
    ipam = b.get("ipam")
    if not isinstance(ipam, dict) or ipam.get("type") != "whereabouts":
        err(where, "ipam must be whereabouts")
        return None
    for k in sorted(set(ipam) - WHEREABOUTS_KEYS):
        err(where, f"whereabouts config: unknown key {k!r}")
    try:
        nad = Nad(obj, b, tuning)
    except (KeyError, ValueError) as e:
        err(where, f"whereabouts addresses: {e}")
        return None
    for label, addr in (("range_start", nad.start), ("range_end", nad.end), ("gateway", nad.gateway)):
        if addr is not None and addr not in nad.network:
            err(where, f"{label} {addr} is outside range {nad.network}")
    if nad.start > nad.end:
        err(where, f"range_start {nad.start} is after range_end {nad.end}")
    if nad.gateway is not None and nad.start <= nad.gateway <= nad.end:
        err(where, f"gateway {nad.gateway} is inside the allocation range: a pod could get it")
    for r in ipam.get("routes", []):
        try:
            ipaddress.ip_network(r["dst"])
            if "gw" in r and ipaddress.ip_address(r["gw"]) not in nad.network:
                err(where, f"route {r} has a gateway outside {nad.network}")
        except (KeyError, ValueError) as e:
            err(where, f"route {r}: {e}")
    return nad


# ---------------------------------------------------------------------------------------------
# kustomize layout

KUSTOMIZATION_KEYS = {
    "apiVersion", "kind", "namespace", "resources", "images", "labels", "patches",
    "configMapGenerator", "secretGenerator", "generatorOptions", "components",
}
KINDS = {
    "Kustomization": "kustomize.config.k8s.io/v1beta1",
    "Component": "kustomize.config.k8s.io/v1alpha1",
}


def check_kustomizations(kustomizations, objs):
    listed = set()
    kinds = {os.path.dirname(p): k.get("kind") for p, k in kustomizations}
    for path, k in kustomizations:
        d = os.path.dirname(path)
        kind = k.get("kind")
        if KINDS.get(kind) != k.get("apiVersion"):
            err(path, "expected apiVersion kustomize.config.k8s.io/v1beta1 with kind Kustomization, or v1alpha1 with kind Component")
        in_components = os.path.basename(os.path.dirname(d)) == "components"
        if in_components != (kind == "Component"):
            err(path, f"kind {kind} in {d}: components/ holds Components, nothing else does")
        for key in sorted(set(k) - KUSTOMIZATION_KEYS):
            err(path, f"unknown or deprecated key {key!r}")
        for r in k.get("resources", []):
            target = os.path.normpath(os.path.join(d, r))
            if os.path.isdir(target):
                if not os.path.isfile(os.path.join(target, "kustomization.yaml")):
                    err(path, f"resource {r}: directory without kustomization.yaml")
                elif kinds.get(target) != "Kustomization":
                    err(path, f"resource {r} is a {kinds.get(target)}: list it under components")
            elif os.path.isfile(target):
                if os.path.dirname(target) != d:
                    err(path, f"resource {r}: kustomize refuses files outside the kustomization's directory")
                listed.add(target)
            else:
                err(path, f"resource {r} does not exist")
        for c in k.get("components", []):
            target = os.path.normpath(os.path.join(d, c))
            if kinds.get(target) != "Component":
                err(path, f"component {c}: no Component there")
        for patch in k.get("patches", []):
            t = patch.get("target") or {}
            if not any(o.kind == t.get("kind") and o.name == t.get("name") for o in objs):
                err(path, f"patch target {t.get('kind')}/{t.get('name')} matches no object")
            try:
                ops = yaml.safe_load(patch.get("patch") or "") or []
            except yaml.YAMLError as e:
                err(path, f"patch for {t.get('kind')}/{t.get('name')} is not YAML: {e}")
                ops = []
            for op in ops if isinstance(ops, list) else []:
                if op.get("op") not in ("add", "remove", "replace") or not str(op.get("path", "")).startswith("/"):
                    err(path, f"patch op {op}: expected a JSON6902 add/remove/replace with a path")
        ns = k.get("namespace")
        if ns:
            for o in objs:
                if os.path.dirname(o.path) == d and o.kind not in CLUSTER_SCOPED and o.ns != ns:
                    err(o.where(), f"namespace {o.ns!r}, but {path} sets {ns!r}")
        images = {c.get("image", "").rsplit(":", 1)[0] for o in objs for c in containers(o)}
        for im in k.get("images", []):
            if im.get("name") not in images:
                err(path, f"images: {im.get('name')!r} is no container's image")
    dirs = {os.path.dirname(p) for p, _ in kustomizations}
    for o in objs:
        if os.path.dirname(o.path) in dirs and os.path.normpath(o.path) not in listed:
            err(o.path, "not listed in its directory's kustomization.yaml")


# ---------------------------------------------------------------------------------------------
# helpers over workloads

def pod_template(o):
    if o.kind in WORKLOAD_KINDS:
        return (o.doc.get("spec") or {}).get("template") or {}
    if o.kind == "Pod":
        return o.doc
    return None


def pod_spec(o):
    t = pod_template(o)
    return (t or {}).get("spec") or {}


def containers(o, init=True):
    s = pod_spec(o)
    out = list(s.get("containers") or [])
    if init:
        out += list(s.get("initContainers") or [])
    return out


def template_labels(o):
    return ((pod_template(o) or {}).get("metadata") or {}).get("labels") or {}


def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def multus(o):
    """[(namespace, name, ifname)] from the pod template's Multus annotation."""
    ann = (((pod_template(o) or {}).get("metadata") or {}).get("annotations") or {})
    text = ann.get("k8s.v1.cni.cncf.io/networks")
    if text is None:
        return []
    out = []
    for item in text.split(","):
        item = item.strip()
        m = re.fullmatch(r"(?:([a-z0-9-]+)/)?([a-z0-9-]+)(?:@([A-Za-z0-9_.-]+))?", item)
        if not m:
            err(o.where(), f"Multus annotation item {item!r}: expected [namespace/]name[@interface]")
            continue
        out.append((m.group(1) or o.ns, m.group(2), m.group(3)))
    return out


def check_references(objs, nads):
    by = {}
    for o in objs:
        by.setdefault((o.kind, o.ns, o.name), o)
    for o in objs:
        if pod_template(o) is None:
            continue
        where = o.where()
        sel = ((o.doc.get("spec") or {}).get("selector") or {}).get("matchLabels")
        if o.kind != "Pod" and not matches(sel, template_labels(o)):
            err(where, "spec.selector.matchLabels does not select the pod template's labels")
        ifnames = []
        for ns, name, ifname in multus(o):
            if (ns, name) not in nads:
                err(where, f"Multus annotation names {ns}/{name}: no such NetworkAttachmentDefinition")
            if not ifname:
                err(where, f"Multus attachment {ns}/{name}: give the interface name (@ifname), the config refers to it")
            elif len(ifname) > 15:
                err(where, f"interface name {ifname!r} is longer than 15 characters")
            ifnames.append(ifname)
        if len(set(ifnames)) != len(ifnames):
            err(where, f"interface names repeat: {ifnames}")
        spec = pod_spec(o)
        for v in spec.get("volumes") or []:
            if "configMap" in v and ("ConfigMap", o.ns, v["configMap"].get("name")) not in by:
                err(where, f"volume {v['name']}: ConfigMap {v['configMap'].get('name')} does not exist")
            if "secret" in v and ("Secret", o.ns, v["secret"].get("secretName")) not in by:
                err(where, f"volume {v['name']}: Secret {v['secret'].get('secretName')} does not exist (not even as an example)")
        vols = {v["name"] for v in spec.get("volumes") or []}
        for c in containers(o):
            for m in c.get("volumeMounts") or []:
                if m["name"] not in vols:
                    err(where, f"container {c['name']} mounts unknown volume {m['name']}")
            for ef in c.get("envFrom") or []:
                ref = (ef.get("secretRef") or {}).get("name")
                if ref and ("Secret", o.ns, ref) not in by:
                    err(where, f"container {c['name']}: envFrom Secret {ref} does not exist")
            names = {p.get("name") for p in c.get("ports") or []}
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                p = c.get(probe) or {}
                port = (p.get("httpGet") or p.get("tcpSocket") or {}).get("port")
                if isinstance(port, str) and port not in names:
                    err(where, f"container {c['name']} {probe}: no port named {port}")
        if o.kind == "StatefulSet":
            svc = o.doc["spec"].get("serviceName")
            if ("Service", o.ns, svc) not in by:
                err(where, f"serviceName {svc}: no such Service")
    workloads = [o for o in objs if pod_template(o) is not None]
    services = [o for o in objs if o.kind == "Service"]
    for s in services:
        spec = s.doc.get("spec") or {}
        sel = spec.get("selector")
        targets = [w for w in workloads if w.ns == s.ns and matches(sel, template_labels(w))]
        if not targets:
            err(s.where(), "selector matches no workload")
        for p in spec.get("ports") or []:
            tp = p.get("targetPort")
            if isinstance(tp, str):
                for w in targets:
                    if tp not in {cp.get("name") for c in containers(w, init=False) for cp in c.get("ports") or []}:
                        err(s.where(), f"targetPort {tp}: {w.kind}/{w.name} has no such port")
    for sm in (o for o in objs if o.kind == "ServiceMonitor"):
        spec = sm.doc.get("spec") or {}
        nss = (spec.get("namespaceSelector") or {}).get("matchNames") or [sm.ns]
        sel = (spec.get("selector") or {}).get("matchLabels")
        svcs = [s for s in services if s.ns in nss and matches(sel, s.labels)]
        if not svcs:
            err(sm.where(), "selects no Service")
        for ep in spec.get("endpoints") or []:
            for s in svcs:
                if ep.get("port") not in {p.get("name") for p in (s.doc.get("spec") or {}).get("ports") or []}:
                    err(sm.where(), f"endpoint port {ep.get('port')!r} is not a port name of Service {s.name}")
    for pdb in (o for o in objs if o.kind == "PodDisruptionBudget"):
        sel = ((pdb.doc.get("spec") or {}).get("selector") or {}).get("matchLabels")
        ws = [w for w in workloads if w.ns == pdb.ns and matches(sel, template_labels(w))]
        if not ws:
            err(pdb.where(), "selector matches no workload")
        for w in ws:
            if pdb.doc["spec"].get("minAvailable", 0) >= (w.doc.get("spec") or {}).get("replicas", 1):
                err(pdb.where(), f"minAvailable leaves no voluntary disruption for {w.kind}/{w.name}")


# ---------------------------------------------------------------------------------------------
# PodSecurity: a namespace's enforce level must admit its pods (the parts of the Pod Security
# Standards these manifests touch: capabilities, sysctls, and restricted's user/escalation rules)

BASELINE_CAPS = {
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
    "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes", "net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem",
}


def check_pod_security(objs):
    levels = {o.name: o.labels.get("pod-security.kubernetes.io/enforce", "privileged")
              for o in objs if o.kind == "Namespace"}
    for o in objs:
        if pod_template(o) is None:
            continue
        level = levels.get(o.ns)
        if level is None:
            err(o.where(), f"namespace {o.ns} is not among the manifests")
            continue
        if level == "privileged":
            continue
        spec = pod_spec(o)
        psc = spec.get("securityContext") or {}
        for sc in psc.get("sysctls") or []:
            if sc["name"] not in SAFE_SYSCTLS:
                err(o.where(), f"sysctl {sc['name']} is not allowed by PodSecurity {level} of namespace {o.ns}")
        for c in containers(o):
            csc = c.get("securityContext") or {}
            added = set((csc.get("capabilities") or {}).get("add") or [])
            allowed = BASELINE_CAPS if level == "baseline" else {"NET_BIND_SERVICE"}
            for cap in sorted(added - allowed):
                err(o.where(), f"container {c['name']} adds {cap}, refused by PodSecurity {level} of namespace {o.ns}")
            if level == "restricted":
                if (csc.get("capabilities") or {}).get("drop") != ["ALL"]:
                    err(o.where(), f"container {c['name']} must drop ALL capabilities (PodSecurity restricted)")
                if csc.get("allowPrivilegeEscalation") is not False:
                    err(o.where(), f"container {c['name']} needs allowPrivilegeEscalation: false (PodSecurity restricted)")
                if not (csc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
                    err(o.where(), f"container {c['name']} needs runAsNonRoot (PodSecurity restricted)")
                seccomp = (csc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
                if seccomp not in ("RuntimeDefault", "Localhost"):
                    err(o.where(), f"container {c['name']} needs a RuntimeDefault seccomp profile (PodSecurity restricted)")


# ---------------------------------------------------------------------------------------------
# the router: its Deployment against its config

def vpn_router_binary():
    return os.environ.get("VPN_ROUTER_BIN") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "debug", "vpn-router")


def config_presets(config_path, env):
    """What `vpn-router check-config --sysctls` says a pod must preset for the config: the
    daemon's own list (router/src/sysctl.rs, vrrp/src/vip.rs), never a copy kept here."""
    binary = vpn_router_binary()
    try:
        out = subprocess.run([binary, "check-config", "--sysctls", config_path], capture_output=True,
                             text=True, env={**os.environ, **env}, check=False, timeout=30)
    except OSError as e:
        err("deploy", f"cannot run {binary} check-config --sysctls: {e} (cargo build --bin vpn-router)")
        return None
    if out.returncode != 0:
        err("deploy", f"vpn-router check-config --sysctls failed: {out.stderr.strip()}")
        return None
    return json.loads(out.stdout)["sysctls"]


def egress_route_args(where, gw):
    """The `vpn-router nad-routes` arguments for what the router config's gateways.egress keeps
    off the VPN, or None (with the error) when client routes cannot be derived from it."""
    egress = gw.get("egress") or {}
    dests = [str(d) for d in egress.get("destinations", ["0.0.0.0/0"])]
    if dests != ["0.0.0.0/0"]:
        err(where, f"gateways.egress.destinations {dests}: the client attachments' routes (vpn-router nad-routes) cover 0.0.0.0/0 minus the excludes, so the router would get traffic outside destinations; keep the default [0.0.0.0/0] or extend nad-routes")
        return None
    args = []
    exclude = [str(e) for e in egress.get("exclude") or []]
    if exclude:
        args += ["--exclude", ",".join(exclude)]
    # exclude_reserved defaults to true (docs/configuration.md#gatewaysegress)
    if egress.get("exclude_reserved", True) is not False:
        args.append("--exclude-reserved")
    if not args:
        err(where, "gateways.egress excludes nothing: the clients would send the cluster's own addresses (DNS, services) to the VPN; set gateways.egress.exclude")
        return None
    return args


def nad_routes(where, args):
    """(`vpn-router nad-routes ARGS` as text, the routes it prints), or None (error reported)."""
    binary = vpn_router_binary()
    cmd = "vpn-router nad-routes " + " ".join(args)
    try:
        out = subprocess.run([binary, "nad-routes", *args], capture_output=True, text=True, check=False, timeout=30)
    except OSError as e:
        err("deploy", f"cannot run {binary} nad-routes: {e} (cargo build --bin vpn-router)")
        return None
    if out.returncode != 0:
        err(where, f"`{cmd}` failed: {out.stderr.strip()}")
        return None
    return cmd, json.loads(out.stdout)["routes"]


def check_nad_routes(where, gw, nads, vips, local_addrs):
    """Every attachment whose ipam gateway is a VIP of the routers carries exactly the routes
    `vpn-router nad-routes` prints for the router config's exclusions (the daemon's own
    reserved list, never a copy kept here), plus a /32 for each address a `local_route` virtual
    server serves (--extra: the cluster DNS service IP, which the clients must send to the
    router although it is in the intranet). What the router keeps off the VPN must not reach
    it: it would route that by its main table, out of the router pod's own network. The
    clients' primary network carries it instead; their own subnet stays on-link."""
    args = egress_route_args(where, gw)
    if args is None:
        return
    if local_addrs:
        args += ["--extra", ",".join(f"{a}/32" for a in local_addrs)]
    res = nad_routes(where, args)
    if res is None:
        return
    cmd, want = res
    source = "the router config's gateways.egress exclusions" + (" and its local_route addresses" if local_addrs else "")
    for n in sorted(nads.values(), key=lambda n: n.obj.name):
        if n.gateway is None or n.gateway not in vips:
            continue
        got = n.cfg["ipam"].get("routes") or []
        if got == want:
            continue
        have = [json.dumps(r, sort_keys=True) for r in got]
        need = [json.dumps(r, sort_keys=True) for r in want]
        missing = [r for r in need if r not in have]
        extra = [r for r in have if r not in need]
        why = "; ".join(part for part in (
            f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}" if missing else "",
            f"not expected {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}" if extra else "",
            "same routes in another order" if not missing and not extra else "",
        ) if part)
        err(n.obj.where(), f"ipam routes differ from `{cmd}` ({source}; {len(got)} routes, expected {len(want)}: {why}); regenerate them with `{cmd}` (docs/operations.md#client-routes-for-your-intranet)")


# ---------------------------------------------------------------------------------------------
# DNS through the VPN: a `local_route` virtual server (the cluster DNS service IP, taken as local
# by every router) whose real servers are resolver pods on the VPN network

CLUSTER_DOMAIN = "cluster.local"
DNS_DOC = "docs/operations.md#dns-through-the-vpn-resolver-pods"


def local_route_servers(cfg):
    """The ingress virtual servers with `local_route: true`, with their addresses and real
    servers parsed."""
    out = []
    for vs in (cfg.get("ingress") or {}).get("virtual_servers") or []:
        if vs.get("local_route") is not True or not isinstance(vs.get("addresses"), list):
            continue
        try:
            addrs = [ipaddress.ip_address(str(a)) for a in vs["addresses"]]
            nets = [ipaddress.ip_network(str(r), strict=False) for r in vs.get("real_servers") or []]
        except ValueError:
            continue  # check-config names it
        out.append((vs, addrs, nets))
    return out


def address_runs(addrs):
    """'a-b, c' for a sorted list of addresses: the contiguous runs."""
    runs = []
    for a in addrs:
        if runs and int(a) == int(runs[-1][1]) + 1:
            runs[-1][1] = a
        else:
            runs.append([a, a])
    return ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in runs)


def check_resolver_nads(router_where, gw, nads, vips, servers):
    """The attachment of a local_route virtual server's real servers (the resolver pods):
    inside the real servers; the Internet and every client range via an egress VIP, so that
    upstream queries leave through the gateways and answers go back through the router's IPVS
    (NAT mode) to get the virtual address as their source again; never the virtual address or
    the intranet via a VIP (the resolver reaches the cluster DNS on its own network: via the
    router it would come back into the virtual server, a loop), nor any pod that is no client;
    and no ICMP redirects, which would send the answers on-link again."""
    if not vips:
        return  # no egress VIP: nothing routes through the router (check-config warns)
    clients = sorted((n for n in nads.values() if n.gateway in vips), key=lambda n: n.obj.name)
    exclude = []
    for e in (gw.get("egress") or {}).get("exclude") or []:
        try:
            exclude.append(ipaddress.ip_network(str(e)))
        except ValueError:
            pass  # check-config names it
    internet = None
    for vs, addrs, nets in servers:
        name = vs.get("name")
        for r in sorted(nads.values(), key=lambda n: n.obj.name):
            pool = r.pool()
            if not any(a in net for a in pool for net in nets):
                continue
            where = r.obj.where()
            outside = [a for a in pool if not any(a in net for net in nets)]
            if outside:
                err(where, f"allocates {address_runs(outside)}, outside the real_servers of virtual server {name}: a resolver there gets no query")
            for c in clients:
                uncovered = [a for a in c.pool() if r.next_hop(a) not in vips]
                if uncovered:
                    err(where, f"does not route {address_runs(uncovered)} ({c.obj.name}) via the egress VIP: virtual server {name} is IPVS NAT, so a resolver must answer those clients through the router (which gives the answer {', '.join(map(str, addrs))} as its source again); on-link it answers from its own address and the client drops it. Add a route for that range with \"gw\": \"{vips[0]}\" ({DNS_DOC})")
            for a in addrs:
                if r.next_hop(a) in vips:
                    err(where, f"routes {a} via the egress VIP: the resolvers' own queries to it would come back into the router's virtual server {name} (local_route), a loop; leave it to the pod's own network ({DNS_DOC})")
            for net, hop in r.ipam_routes():
                for e in exclude:
                    if hop in vips and net.overlaps(e):
                        err(where, f"routes {net} via the egress VIP, inside {e} that the router keeps off the VPN (gateways.egress.exclude): the resolvers reach the cluster DNS and the intranet on the pod's own network")
            for n in sorted(nads.values(), key=lambda n: n.obj.name):
                if n.network != r.network or n.gateway in vips:
                    continue
                hit = next((a for a in n.pool() if r.next_hop(a) in vips), None)
                if hit is not None:
                    err(where, f"routes {hit} ({n.obj.name}) via the egress VIP: only client ranges belong there; the routers' checks, the gateways and the resolvers are answered on-link")
            if internet is None:
                args = egress_route_args(router_where, gw)  # its errors are check_nad_routes' too
                internet = nad_routes(router_where, args) if args is not None else None
                internet = internet or ("", [])
            cmd, routes = internet
            have = {(str(net), hop) for net, hop in r.ipam_routes() if hop in vips}
            missing = [x["dst"] for x in routes if not any((x["dst"], v) in have for v in vips)]
            if missing:
                err(where, f"does not route {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} via the egress VIP: the resolvers' queries to public resolvers there would leave through the pod's own network, outside the VPN; its routes must hold `{cmd} --via {vips[0]}` ({DNS_DOC})")
            redirects = {k: r.tuning.get(k) for k in ("net.ipv4.conf.all.accept_redirects", "net.ipv4.conf.IFNAME.accept_redirects")}
            if any(v != "0" for v in redirects.values()):
                have = ", ".join(f"{k}={v or '(unset)'}" for k, v in redirects.items())
                err(where, f"accepts ICMP redirects (tuning plugin: {have}; set both to \"0\"): a router's redirect would make a resolver answer clients on-link, from its own address")


def corefile_blocks(text):
    """The server blocks of a Corefile: [(keys, [[plugin, args...], ...])]. Only each block's
    top-level plugins; a plugin's own `{ ... }` options are skipped."""
    blocks, keys, depth = [], [], 0
    for line in text.splitlines():
        directive = None
        for w in line.split("#", 1)[0].replace("{", " { ").replace("}", " } ").split():
            if w == "{":
                if depth == 0:
                    blocks.append((keys, []))
                    keys = []
                depth += 1
            elif w == "}":
                depth -= 1
            elif depth == 0:
                keys += [k for k in w.split(",") if k]
            elif depth == 1:
                if directive is None:
                    directive = [w]
                    blocks[-1][1].append(directive)
                else:
                    directive.append(w)
    return blocks


def zone_port(key):
    """`dns://zone:port` of a server block key, as (zone, port); port 53 when not given."""
    key = key.split("://", 1)[-1]
    zone, sep, port = key.rpartition(":")
    if not sep or not port.isdigit():
        zone, port = key, "53"
    zone = zone.lower().rstrip(".") or "."
    return zone, int(port)


def upstream_address(to):
    """The address of a forward TO (`1.1.1.1`, `dns://1.1.1.1:53`, `tls://[2606::1]`), or None."""
    host = to.split("://", 1)[-1]
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def check_resolver_pods(objs, nads, vips, servers):
    """CoreDNS pods serving a local_route virtual server: their Corefile listens on its
    real_port, forwards cluster.local (and the other internal zones) to the cluster DNS the
    virtual server stands for, on an address the pod's attachment does not send to the VIP (the
    loop again), and everything else to upstreams it does send to the VIP (through the VPN)."""
    for o in objs:
        for c in containers(o, init=False):
            if "/coredns:" not in str(c.get("image", "")):
                continue
            where = o.where()
            attached = [nads[(ns, name)] for ns, name, _ in multus(o) if (ns, name) in nads]
            served = [(vs, addrs) for vs, addrs, nets in servers
                      if any(a in net for n in attached for a in n.pool() for net in nets)]
            if not served:
                continue
            args = list(c.get("args") or [])
            path = args[args.index("-conf") + 1] if "-conf" in args[:-1] else "/Corefile"
            text = mounted_file(objs, o, c, path)
            if text is None:
                err(where, f"{c['name']}: the Corefile {path} comes from no ConfigMap volume (validate.py checks it)")
                continue
            blocks = corefile_blocks(text)
            zones = {}
            for keys, plugins in blocks:
                for key in keys:
                    zone, port = zone_port(key)
                    zones.setdefault(zone, []).append(plugins)
                    for vs, _ in served:
                        want = vs.get("real_port", vs.get("port"))
                        if port != want:
                            err(where, f"Corefile: server block {key} listens on port {port}, but virtual server {vs.get('name')} sends the queries to port {want} (real_port)")
            if CLUSTER_DOMAIN not in zones:
                err(where, f"Corefile: no server block for {CLUSTER_DOMAIN}: the clients' cluster names would go to the public resolvers")
            local = sorted({a for _, addrs in served for a in addrs})
            for zone, lists in sorted(zones.items()):
                internal = zone == CLUSTER_DOMAIN or zone.endswith(".arpa") or "/" in zone
                for plugins in lists:
                    for p in plugins:
                        if p[0] != "forward" or len(p) < 3:
                            continue
                        for to in p[2:]:
                            a = upstream_address(to)
                            if a is None:
                                err(where, f"Corefile: {zone} forwards to {to}, not an address: validate.py cannot tell where its queries go (a resolv.conf is the node's resolvers, outside the VPN)")
                                continue
                            via = [n.obj.name for n in attached if n.next_hop(a) in vips]
                            if internal and via and a in local:
                                err(where, f"Corefile: {zone} forwards to {a}, which {', '.join(via)} sends to the egress VIP: the router's virtual server would send the resolver's own query back to a resolver, a loop; the cluster DNS must be reached on the pod's own network ({DNS_DOC})")
                            elif internal and via:
                                err(where, f"Corefile: {zone} forwards to {a}, which {', '.join(via)} sends to the egress VIP: the cluster's names would go out through the VPN instead of to the cluster DNS on the pod's own network ({DNS_DOC})")
                            elif not internal and not via:
                                err(where, f"Corefile: {zone} forwards to {a}, which no attachment of the pod routes via the egress VIP: the clients' queries would leave through the pod's own network, outside the VPN")
                            if zone == CLUSTER_DOMAIN and a not in local:
                                err(where, f"Corefile: {CLUSTER_DOMAIN} forwards to {a}, but the router's local_route virtual server serves {', '.join(map(str, local))}: both are the cluster's DNS service IP (the clients' nameserver), set them together ({DNS_DOC})")


def check_address_pools(objs, nads):
    """Every pod takes an address of each attachment it names, surge pods of a rolling update
    too: whereabouts hands out no more than the range holds, and a pod without one never
    starts."""
    users = {}
    for o in objs:
        if o.kind not in ("Deployment", "StatefulSet"):
            continue
        spec = o.doc.get("spec") or {}
        replicas = spec.get("replicas", 1)
        surge = 0
        strategy = spec.get("strategy") or {}
        if o.kind == "Deployment" and strategy.get("type", "RollingUpdate") == "RollingUpdate":
            s = (strategy.get("rollingUpdate") or {}).get("maxSurge", "25%")
            surge = -(-replicas * int(s[:-1]) // 100) if isinstance(s, str) and s.endswith("%") else int(s)
        for ns, name, _ in multus(o):
            users.setdefault((ns, name), []).append((o, replicas, surge))
    for key, ws in sorted(users.items()):
        n = nads.get(key)
        total = sum(r + s for _, r, s in ws)
        if n is not None and total > len(n.pool()):
            who = ", ".join(f"{o.kind}/{o.name} (replicas {r} + maxSurge {s})" for o, r, s in ws)
            err(n.obj.where(), f"allocates {len(n.pool())} addresses ({n.start}-{n.end}), but {who} can run {total} pods at once: the last one gets no address and never starts")


def gateway_addresses(spec):
    items = spec if isinstance(spec, list) else [spec]
    out = []
    for item in items:
        a, _, b = str(item).partition("-")
        lo = ipaddress.ip_address(a.strip())
        hi = ipaddress.ip_address(b.strip()) if b else lo
        out += [ipaddress.ip_address(x) for x in range(int(lo), int(hi) + 1)]
    return out


def find_router(objs):
    for o in objs:
        if o.kind != "Deployment":
            continue
        for c in containers(o, init=False):
            args = list(c.get("command") or []) + list(c.get("args") or [])
            if "run" in args and "--config" in args:
                return o, c, args[args.index("--config") + 1]
    return None, None, None


def mount_of(o, c, volume_pred):
    vols = {v["name"]: v for v in pod_spec(o).get("volumes") or []}
    for m in c.get("volumeMounts") or []:
        v = vols.get(m["name"], {})
        if volume_pred(v):
            return m["mountPath"], v
    return None, None


def secret_data(obj):
    out = dict((obj.doc.get("stringData") or {}))
    for k, v in (obj.doc.get("data") or {}).items():
        out[k] = base64.b64decode(v).decode()
    return out


def check_router(objs, nads, out_dir):
    router, c, config_path = find_router(objs)
    if router is None:
        err("deploy", "no Deployment runs `vpn-router run --config FILE`")
        return
    where = router.where()
    by = {(o.kind, o.ns, o.name): o for o in objs}
    cdir, cvol = mount_of(router, c, lambda v: "configMap" in v)
    if cdir is None or os.path.dirname(config_path) != cdir.rstrip("/"):
        err(where, f"--config {config_path} is not in a mounted ConfigMap")
        return
    cm = by.get(("ConfigMap", router.ns, cvol["configMap"]["name"]))
    key = os.path.basename(config_path)
    text = ((cm.doc.get("data") or {}).get(key)) if cm else None
    if text is None:
        err(where, f"ConfigMap {cvol['configMap']['name']} has no key {key}")
        return
    cfg = yaml.safe_load(text) or {}

    # secrets: every file under the secret mount must be a key of the Secret
    sdir, svol = mount_of(router, c, lambda v: "secret" in v)
    secret_dir = os.path.join(out_dir, "secrets")
    os.makedirs(secret_dir, exist_ok=True)
    if sdir is not None:
        sobj = by.get(("Secret", router.ns, svol["secret"]["secretName"]))
        data = secret_data(sobj) if sobj else {}
        for k, v in data.items():
            with open(os.path.join(secret_dir, k), "w", encoding="utf-8") as f:
                f.write(v)
        for ref in re.findall(re.escape(sdir.rstrip("/")) + r"/([A-Za-z0-9._-]+)", text):
            if ref not in data:
                err(where, f"the config reads {sdir}/{ref}, but Secret {svol['secret']['secretName']} has no key {ref}")
        text = text.replace(sdir.rstrip("/") + "/", secret_dir + "/")
    with open(os.path.join(out_dir, "config.yaml"), "w", encoding="utf-8") as f:
        f.write(text)

    # interfaces the config names must be attached
    attached = {ifname: nads.get((ns, name)) for ns, name, ifname in multus(router)}
    names = set()
    for v in cfg.get("vrrp") or []:
        names.add(v.get("interface"))
        for vip in v.get("virtual_ips") or []:
            if isinstance(vip, dict) and vip.get("interface"):
                names.add(vip["interface"])
    gw = cfg.get("gateways")
    if gw:
        names.add(gw.get("interface"))
    for n in sorted(x for x in names if x):
        if n not in attached:
            err(where, f"the config uses interface {n}, but the Multus annotation attaches only {sorted(attached)}")

    # environment references of the config (api.listen: ${POD_IP}:9090) come from the
    # container's env; the downward API gives status.podIP
    env_of = {e["name"]: e for e in c.get("env") or []}
    env = {}
    for name in sorted(set(re.findall(r"\$\{([A-Za-z0-9_]+)\}", text))):
        e = env_of.get(name)
        if e is None:
            err(where, f"the config reads ${{{name}}}, but the container sets no env {name}")
            continue
        ref = ((e.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
        env[name] = "10.42.1.10" if ref == "status.podIP" else str(e.get("value", ""))
    with open(os.path.join(out_dir, "config.env"), "w", encoding="utf-8") as f:
        f.writelines(f"{k}={v}\n" for k, v in env.items())

    # sysctls: the pod's presets against what the daemon says this config needs
    have = {s["name"]: str(s["value"]) for s in (pod_spec(router).get("securityContext") or {}).get("sysctls") or []}
    presets = config_presets(os.path.join(out_dir, "config.yaml"), env)
    if presets is not None:
        pod = {p["key"]: p for p in presets if p["scope"] == "pod"}
        for key, p in pod.items():
            if p["required"] and have.get(key) != p["value"]:
                err(where, f"securityContext.sysctls: {key}={have.get(key, '(unset)')}, the config needs {p['value']}: {p['why']} (vpn-router check-config --sysctls)")
        for key in sorted(set(have) - set(pod)):
            err(where, f"securityContext.sysctls sets {key}, which the config does not need (vpn-router check-config --sysctls)")
        for key in sorted(set(have) & set(pod)):
            if have[key] != pod[key]["value"]:
                err(where, f"securityContext.sysctls: {key}={have[key]}, the config needs {pod[key]['value']}")
        for p in (p for p in presets if p["scope"] == "interface"):
            nad = attached.get(p["interface"])
            tmpl = p["key"].replace(f".{p['interface']}.", ".IFNAME.")
            got = (nad.tuning if nad else {}).get(tmpl)
            if got != p["value"]:
                name = nad.obj.name if nad else "(no attachment)"
                err(where, f"{p['key']}={p['value']} ({p['why']}): set it with the tuning plugin of {name} (\"{tmpl}\": \"{p['value']}\"); it has {got!r}")

    # prepared nodes only: a selector, and the toleration for the taint that may keep others off
    ps = pod_spec(router)
    if not ps.get("nodeSelector"):
        err(where, "no nodeSelector: a router on a node without the sysctl allowlist or ip_vs fails with SysctlForbidden and is recreated there forever (docs/operations.md#deploying-in-kubernetes)")
    else:
        for key in ps["nodeSelector"]:
            if not any(t.get("key") == key for t in ps.get("tolerations") or []):
                err(where, f"nodeSelector {key} without a toleration of the same key (prepared nodes may be tainted with it)")

    # api port, probes
    listen = (cfg.get("api") or {}).get("listen", "0.0.0.0:9090")
    port = int(listen.rsplit(":", 1)[1])
    if not listen.startswith("${"):
        err(where, f"api.listen {listen}: bind the api to the pod's own address (\"${{POD_IP}}:{port}\"), so client pods cannot reach it on the VIPs")
    ports = {p.get("name"): p.get("containerPort") for p in c.get("ports") or []}
    if ports.get("api") != port:
        err(where, f"container port `api` is {ports.get('api')}, the config listens on {port}")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        g = (c.get(probe) or {}).get("httpGet") or {}
        if g.get("path") != path or g.get("port") not in ("api", port):
            err(where, f"{probe} must GET {path} on the api port")

    # the requirements for the router pod
    spec = router.doc["spec"]
    sc = c.get("securityContext") or {}
    caps = sc.get("capabilities") or {}
    if caps.get("drop") != ["ALL"] or sorted(caps.get("add") or []) != ["NET_ADMIN", "NET_RAW"]:
        err(where, "capabilities must be drop [ALL], add [NET_ADMIN, NET_RAW]")
    if sc.get("readOnlyRootFilesystem") is not True or sc.get("privileged"):
        err(where, "the container must have readOnlyRootFilesystem and not be privileged")
    if spec.get("replicas", 1) < 2:
        err(where, "fewer than 2 replicas: no failover")
    ru = (spec.get("strategy") or {}).get("rollingUpdate") or {}
    if ru.get("maxUnavailable") != 0 or ru.get("maxSurge", 0) in (0, "0%"):
        err(where, "rolling update must be maxUnavailable 0 with a surge (docs/operations.md#upgrading-without-dropping-mastership)")
    anti = (pod_spec(router).get("affinity") or {}).get("podAntiAffinity") or {}
    if not anti.get("requiredDuringSchedulingIgnoredDuringExecution"):
        err(where, "routers need required pod anti-affinity (one per node)")
    # The daemon takes up to SHUTDOWN_GRACE (10 s, router/src/supervisor.rs) to stop after
    # SIGTERM; the kubelet's SIGKILL must not come first.
    if pod_spec(router).get("terminationGracePeriodSeconds", 30) < 15:
        err(where, "terminationGracePeriodSeconds below 15 s may SIGKILL the daemon during its SIGTERM handoff and shutdown (up to 10 s)")
    if not any(o.kind == "PodDisruptionBudget" and o.ns == router.ns
               and matches((o.doc["spec"].get("selector") or {}).get("matchLabels"), template_labels(router))
               for o in objs):
        err(where, "no PodDisruptionBudget covers the routers")

    # addresses: the gateway attachment's pool is exactly gateways.addresses; the VIPs sit in
    # the routers' network but outside every allocation pool; clients route via the egress VIP.
    if gw:
        addrs = gateway_addresses(gw.get("addresses"))
        pools = {k: n for k, n in nads.items() if n.pool() == addrs}
        if not pools:
            err(where, f"no NetworkAttachmentDefinition allocates exactly gateways.addresses {addrs[0]}-{addrs[-1]}")
        gw_nad = attached.get(gw.get("interface"))
        start = ipaddress.ip_address(gw.get("ingress_vip_start", "192.168.26.128"))
        vips = [start + i for i in range(len(addrs))]
        egress_vips = []
        for v in cfg.get("vrrp") or []:
            for vip in v.get("virtual_ips") or []:
                a = vip["address"] if isinstance(vip, dict) else vip
                egress_vips.append(ipaddress.ip_interface(a))
        for vip in egress_vips:
            if gw_nad and vip.network != gw_nad.network:
                err(where, f"VIP {vip} is not in the routers' network {gw_nad.network}")
        for n in nads.values():
            for a in vips + [v.ip for v in egress_vips]:
                if n.start <= a <= n.end:
                    err(n.obj.where(), f"allocates {a}, a VIP of the routers")
        for n in nads.values():
            if n.gateway is not None and n.gateway not in [v.ip for v in egress_vips]:
                err(n.obj.where(), f"clients' gateway {n.gateway} is not a VRRP VIP")
        servers = local_route_servers(cfg)
        check_nad_routes(where, gw, nads, [v.ip for v in egress_vips], sorted({a for _, addrs, _ in servers for a in addrs}))
        check_resolver_nads(where, gw, nads, [v.ip for v in egress_vips], servers)
        check_resolver_pods(objs, nads, [v.ip for v in egress_vips], servers)
        with open(os.path.join(out_dir, "gateways.tsv"), "w", encoding="utf-8") as f:
            for a, v in zip(addrs, vips):
                f.write(f"{a}\t{v}\n")
        # gateway pods: they DNAT to their own ingress VIP, computed from these two values
        vs_ports = {vs.get("port") for vs in (cfg.get("ingress") or {}).get("virtual_servers") or []
                    if vs.get("addresses", "gateway_ingress_vips") == "gateway_ingress_vips"}
        for o in objs:
            for ic in pod_spec(o).get("initContainers") or []:
                env = {e["name"]: e.get("value") for e in ic.get("env") or []}
                if "FIRST_GATEWAY" not in env:
                    continue
                if env["FIRST_GATEWAY"] != str(addrs[0]) or env.get("INGRESS_VIP_START") != str(start):
                    err(o.where(), f"{ic['name']}: FIRST_GATEWAY/INGRESS_VIP_START {env['FIRST_GATEWAY']}/{env.get('INGRESS_VIP_START')} differ from the router config {addrs[0]}/{start}")
                for m in (env.get("PORT_MAPPINGS") or "").split():
                    if int(m.split(":")[1]) not in vs_ports:
                        err(o.where(), f"{ic['name']}: PORT_MAPPINGS {m} targets no virtual server on the ingress VIPs")
                if (o.doc.get("spec") or {}).get("replicas", 1) > len(addrs):
                    err(o.where(), f"more replicas than gateways.addresses ({len(addrs)})")
            for c in containers(o, init=False):
                if "gluetun" in str(c.get("image", "")):
                    # the routers clamp MSS to their tunnel_mtu: larger than the gateways'
                    # tunnel and full-size segments depend on PMTU discovery again
                    tunnel = {**GLUETUN_DEFAULTS, **container_env(c)}["WIREGUARD_MTU"]
                    mtu = gw.get("tunnel_mtu", 1320)
                    if gw.get("clamp_mss", True) and tunnel.isdigit() and int(tunnel) and mtu > int(tunnel):
                        err(where, f"gateways.tunnel_mtu {mtu} is larger than the gateways' WIREGUARD_MTU {tunnel} ({o.name}): the routers' MSS clamp lets through segments the tunnel cannot carry")
                fwd = container_env(c).get("FORWARD_TO_PORT")
                if fwd is not None and (not fwd.isdigit() or int(fwd) not in vs_ports):
                    err(o.where(), f"{c['name']}: FORWARD_TO_PORT {fwd} is no virtual server port on the ingress VIPs {sorted(p for p in vs_ports if p)}")
        for vs in (cfg.get("ingress") or {}).get("virtual_servers") or []:
            nets = [ipaddress.ip_network(r, strict=False) for r in vs.get("real_servers") or []]
            if not any(all(any(a in net for net in nets) for a in n.pool()) for n in nads.values()):
                err(where, f"virtual server {vs.get('name')}: no attachment allocates inside its real_servers")


# ---------------------------------------------------------------------------------------------
# the image recipe against the Deployment and the locked dependencies (make image builds it;
# this reads it)

def check_image(root, objs, metadata_path):
    path = os.path.join(root, "Dockerfile")
    try:
        with open(path, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    except OSError as e:
        err(path, f"cannot read: {e}")
        return
    m = next((re.fullmatch(r"ARG RUST_VERSION=(\d+)\.(\d+)", ln) for ln in lines if ln.startswith("ARG RUST_VERSION=")), None)
    if m is None:
        err(path, "no `ARG RUST_VERSION=X.Y`")
    elif metadata_path:
        with open(metadata_path, encoding="utf-8") as f:
            meta = json.load(f)
        used = {n["id"] for n in meta["resolve"]["nodes"]}
        needs = [(tuple(int(x) for x in p["rust_version"].split(".")[:2]), p["name"])
                 for p in meta["packages"] if p.get("rust_version") and p["id"] in used]
        have = (int(m.group(1)), int(m.group(2)))
        if needs and max(needs)[0] > have:
            (need, name) = max(needs)
            err(path, f"RUST_VERSION {have[0]}.{have[1]} is older than {name} needs ({need[0]}.{need[1]})")
    # scripts/image.sh builds the same recipe offline through these two arguments
    for arg in ("ARG BINARY=build", "ARG DEBIAN_IMAGE="):
        if not any(ln.startswith(arg) for ln in lines):
            err(path, f"no `{arg}...`: make image (scripts/image.sh) sets it")
    stages = {}
    current = None
    for ln in lines:
        mm = re.fullmatch(r"FROM (\S+) AS (\S+)", ln)
        if mm:
            current = mm.group(2)
            stages[current] = {"from": mm.group(1), "lines": []}
        elif current:
            stages[current]["lines"].append(ln)
    for need in ("build", "prebuilt", "rootfs", "binary", "runtime"):
        if need not in stages:
            err(path, f"no stage `{need}`")
    if not stages or list(stages)[-1] != "runtime":
        err(path, "the last stage must be `runtime` (what `docker build` without --target gives)")
        return
    # The runtime's files: the chain of stages it is built FROM, and what they COPY in.
    text = ""
    seen = set()
    todo = ["runtime"]
    while todo:
        name = todo.pop()
        if name in seen or name not in stages:
            continue
        seen.add(name)
        st = stages[name]
        text += "\n".join(st["lines"]) + "\n"
        todo.append(st["from"])
        todo += re.findall(r"COPY --from=(\S+)", "\n".join(st["lines"]))
    if not re.search(r"\bnftables\b", text):
        err(path, "the runtime's root filesystem does not get nftables (`nft` is run by the daemon)")
    final = stages["runtime"]["lines"]
    copied = re.search(r"COPY --from=\S+ \S+ (\S+)", "\n".join(final))
    entry = next((json.loads(ln[len("ENTRYPOINT "):]) for ln in final if ln.startswith("ENTRYPOINT [")), None)
    if not copied or not entry or entry[0] != copied.group(1):
        err(path, f"ENTRYPOINT {entry} is not the binary copied into the runtime stage")
    exposed = {int(x) for ln in final if ln.startswith("EXPOSE ") for x in ln.split()[1:]}
    router, c, _ = find_router(objs)
    if router is not None:
        if c.get("command"):
            err(router.where(), "sets `command`: the image's ENTRYPOINT is the daemon; give only `args`")
        ports = {p.get("containerPort") for p in c.get("ports") or []}
        if not ports <= exposed:
            err(path, f"EXPOSE {sorted(exposed)} does not list the Deployment's container ports {sorted(ports)}")


# ---------------------------------------------------------------------------------------------
# shell scripts embedded in containers or mounted from ConfigMaps, and the gluetun pod's setup

SHELLS = ("/bin/sh", "sh", "/bin/ash", "ash")
# gluetun's image defaults the example relies on (its Dockerfile's ENV)
GLUETUN_DEFAULTS = {"VPN_INTERFACE": "tun0", "WIREGUARD_MTU": "1320"}
GLUETUN_POST_RULES = "/iptables/post-rules.txt"
POST_RULE_PREFIXES = ("iptables ", "iptables-nft ", "iptables-legacy ", "ip6tables ", "ip6tables-nft ", "ip6tables-legacy ")


def mounted_file(objs, o, c, path):
    """The content of `path` as container `c` of workload `o` sees it, if it comes from a
    ConfigMap volume (None otherwise)."""
    vols = {v["name"]: v for v in pod_spec(o).get("volumes") or []}
    best = None
    for m in c.get("volumeMounts") or []:
        mp = m["mountPath"].rstrip("/")
        if path == mp or path.startswith(mp + "/"):
            if best is None or len(mp) > len(best[0]):
                best = (mp, vols.get(m["name"]) or {})
    if best is None or "configMap" not in best[1]:
        return None
    rel = path[len(best[0]) + 1:]
    cm_name = best[1]["configMap"].get("name")
    items = best[1]["configMap"].get("items")
    key = rel
    if items is not None:
        key = next((it["key"] for it in items if it.get("path") == rel), None)
    cm = next((x for x in objs if x.kind == "ConfigMap" and x.name == cm_name and x.ns == o.ns), None)
    if cm is None or key is None:
        return None
    return (cm.doc.get("data") or {}).get(key)


def container_env(c):
    return {e["name"]: e["value"] for e in c.get("env") or [] if "value" in e}


def write_script(sdir, base, text, env):
    with open(os.path.join(sdir, base + ".sh"), "w", encoding="utf-8") as f:
        f.write(text if text.startswith("#!") else "#!/bin/sh\n" + text + "\n")
    with open(os.path.join(sdir, base + ".env"), "w", encoding="utf-8") as f:
        for k, v in env.items():
            f.write(f"{k}={v}\n")


def extract_scripts(objs, out_dir):
    """Every shell script a container runs: `sh -c` commands and postStart hooks, scripts
    mounted from ConfigMaps that a container's command or gluetun's port-forwarding commands
    run, each with the container's env (gluetun's with its image defaults). Also writes
    commands.tsv: role, workload, container, script, arguments (for validate.sh)."""
    sdir = os.path.join(out_dir, "scripts")
    os.makedirs(sdir, exist_ok=True)
    rows = []
    for o in objs:
        for c in containers(o):
            env = container_env(c)
            if c.get("name") == "gluetun":
                env = {**GLUETUN_DEFAULTS, **env}
            base = f"{o.kind.lower()}-{o.name}-{c['name']}"
            cmds = [("command", list(c.get("command") or []) + list(c.get("args") or []))]
            post = (((c.get("lifecycle") or {}).get("postStart") or {}).get("exec") or {}).get("command")
            if post:
                cmds.append(("poststart", list(post)))
            for key, role in (("VPN_PORT_FORWARDING_UP_COMMAND", "pf-up"), ("VPN_PORT_FORWARDING_DOWN_COMMAND", "pf-down")):
                if env.get(key):
                    try:
                        cmds.append((role, shlex.split(env[key])))
                    except ValueError as e:
                        err(o.where(), f"{c['name']}: {key} {env[key]!r}: {e}")
            for role, cmd in cmds:
                if len(cmd) < 2 or cmd[0] not in SHELLS:
                    continue
                name = base + ("" if role == "command" else f"-{role}")
                if cmd[1] == "-c" and len(cmd) >= 3:
                    write_script(sdir, name, cmd[2], env)
                    rows.append((role, o.name, c["name"], name + ".sh", cmd[3:]))
                elif not cmd[1].startswith("-"):
                    text = mounted_file(objs, o, c, cmd[1])
                    if text is None:
                        err(o.where(), f"{c['name']}: {role} runs {cmd[1]}, which no ConfigMap volume of the pod provides")
                        continue
                    write_script(sdir, name, text, env)
                    rows.append((role, o.name, c["name"], name + ".sh", cmd[2:]))
    with open(os.path.join(out_dir, "commands.tsv"), "w", encoding="utf-8") as f:
        for role, wl, cname, script, args in rows:
            f.write("\t".join([role, wl, cname, script, " ".join(args)]) + "\n")


def check_gateway_pods(objs):
    """A gluetun pod that is a gateway for other pods (tests/src/gluetun_pod.rs runs it in the
    lab): gluetun forwards nothing without ip_forward and the post-rules, and runs the
    post-rules without a shell, skipping silently every line that does not start with an
    iptables binary's name."""
    for o in objs:
        if o.kind not in WORKLOAD_KINDS:
            continue
        cs = [c for c in containers(o, init=False) if "gluetun" in str(c.get("image", ""))]
        if not cs:
            continue
        c = cs[0]
        env = {**GLUETUN_DEFAULTS, **container_env(c)}
        attachments = [ifname for (_, _, ifname) in multus(o)]
        sysctls = {x.get("name"): x.get("value") for x in (pod_spec(o).get("securityContext") or {}).get("sysctls") or []}
        if sysctls.get("net.ipv4.ip_forward") != "1":
            err(o.where(), "gluetun never sets net.ipv4.ip_forward: the pod's securityContext.sysctls must (a gateway forwards)")
        for ic in pod_spec(o).get("initContainers") or []:
            ienv = container_env(ic)
            if "GATEWAY_INTERFACE" in ienv and ienv["GATEWAY_INTERFACE"] not in attachments:
                err(o.where(), f"{ic['name']}: GATEWAY_INTERFACE {ienv['GATEWAY_INTERFACE']} is none of the pod's Multus interfaces {attachments}")
            if "VPN_INTERFACE" in ienv and ienv["VPN_INTERFACE"] != env["VPN_INTERFACE"]:
                err(o.where(), f"{ic['name']}: VPN_INTERFACE {ienv['VPN_INTERFACE']} is not gluetun's ({env['VPN_INTERFACE']})")
        text = mounted_file(objs, o, c, GLUETUN_POST_RULES)
        if text is None:
            err(o.where(), f"gluetun: no {GLUETUN_POST_RULES} from a ConfigMap: gluetun drops every forwarded packet (FORWARD policy DROP)")
            continue
        known = set(attachments) | {env["VPN_INTERFACE"], "eth0", "lo"}
        forward = 0
        mss_lines = 0
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if not line.startswith(POST_RULE_PREFIXES):
                err(o.where(), f"post-rules.txt line {n} {line!r}: gluetun skips it silently (a rule line must start with \"iptables \" or \"ip6tables \", no indentation)")
                continue
            if any(q in line for q in "\"'$`\\"):
                err(o.where(), f"post-rules.txt line {n} {line!r}: gluetun runs it without a shell (no quotes, no variables)")
            words = line.split()
            for flag in ("-i", "-o", "--in-interface", "--out-interface"):
                for i, w in enumerate(words[:-1]):
                    if w == flag and words[i + 1] not in known:
                        err(o.where(), f"post-rules.txt line {n}: interface {words[i + 1]} is none of the pod's ({', '.join(sorted(known))})")
            if "FORWARD" in words and "ACCEPT" in words:
                forward += 1
            if "TCPMSS" in words:
                mss_lines += 1
                mtu = env["WIREGUARD_MTU"]
                if "--set-mss" in words[:-1] and mtu.isdigit() and int(mtu):
                    mss = words[words.index("--set-mss") + 1]
                    if not mss.isdigit() or int(mss) + 40 > int(mtu):
                        err(o.where(), f"post-rules.txt line {n}: --set-mss {mss} does not fit the tunnel: WIREGUARD_MTU {mtu} carries an MSS of at most {int(mtu) - 40}")
        if forward == 0:
            err(o.where(), "post-rules.txt accepts nothing in FORWARD: gluetun's policy drops every client packet")
        if mss_lines == 0:
            err(o.where(), f"post-rules.txt clamps no TCP MSS: the SYN-ACKs that servers send clients through {env['VPN_INTERFACE']} promise segments larger than the tunnel carries back (the routers never see them)")


def main():
    if len(sys.argv) not in (3, 4):
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    root, out_dir = sys.argv[1], sys.argv[2]
    metadata_path = sys.argv[3] if len(sys.argv) == 4 else None
    objs, kustomizations = load(root)
    nads = {}
    for o in objs:
        schema = REDUCED.get((o.doc.get("apiVersion"), o.kind))
        if schema is not None:
            for e in jsonschema.Draft202012Validator(schema).iter_errors(o.doc):
                path = ".".join(str(p) for p in e.absolute_path)
                err(o.where(), f"reduced {o.kind} schema: {path}: {e.message}")
        if o.kind != "Namespace" and not o.ns:
            err(o.where(), "metadata.namespace is not set (the manifests must also work with kubectl apply -f)")
        if o.kind == "NetworkAttachmentDefinition":
            nad = check_nad(o)
            if nad is not None:
                nads[(o.ns, o.name)] = nad
    check_kustomizations(kustomizations, objs)
    check_references(objs, nads)
    check_pod_security(objs)
    check_router(objs, nads, out_dir)
    check_image(root, objs, metadata_path)
    check_gateway_pods(objs)
    check_address_pools(objs, nads)
    extract_scripts(objs, out_dir)
    problems = list(dict.fromkeys(ERRORS))  # a check shared by two callers reports once
    for e in problems:
        print(e)
    print(f"validate.py: {len(objs)} objects, {len(nads)} attachments, {len(kustomizations)} kustomizations, {len(problems)} problem(s)")
    return 1 if ERRORS else 0


if __name__ == "__main__":
    sys.exit(main())
