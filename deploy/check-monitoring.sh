#!/usr/bin/env bash
# Tests the optional monitoring component (deploy/components/monitoring; offline, ~15 s with
# the self-test). Stages, in order; the first that fails stops the run:
#
#   1. yamllint (deploy/.yamllint.yaml), when yamllint is installed (deploy/validate.sh needs it);
#   2. layout: a kustomize Component that lists every manifest, one namespace on every object, a
#      PrometheusRule, a ServiceMonitor, a grafana_dashboard ConfigMap with one JSON dashboard
#      whose queries use the `datasource` variable and only defined variables; every alert has a
#      severity label, summary and description annotations, and a promtool case where it fires
#      and one where it must not. This stage writes the rules files the next ones read;
#   3. `promtool check rules` on the PrometheusRule's spec.groups, extracted to a plain rules
#      file (tests/*.test.yaml name it vpn-router.rules.yaml);
#   4. `promtool check rules` on every dashboard query (panels, rows' panels, templating
#      queries, annotations) written as a recording rule `dashboard:panel_<id>_<refId>` (or
#      `dashboard:variable_<name>`, `dashboard:annotation_<n>`), Grafana's variables replaced by
#      PromQL ($__rate_interval: 5m, other variables: .*), so Prometheus' parser reads each;
#   5. names: every metric name in an alert or a dashboard query (vpn_router_*; _bucket, _sum,
#      _count of a histogram mapped back) has a row | `name` | in docs/metrics.md, and every label
#      in a selector or in by/without/on/ignoring (...) is one of that metric's documented labels
#      or a target label. The ServiceMonitor sets no honorLabels, so a metric's own `instance`
#      (VRRP) and `service` (IPVS) labels are stored as exported_instance and exported_service:
#      the plain names are refused there. Values of enumerated labels (state, result, kind, ...)
#      must be among the values the metric's row lists;
#   6. `promtool test rules` on every file in components/monitoring/tests/, next to the
#      extracted rules;
#   7. a kustomize build (kustomize or kubectl kustomize, when installed) of a kustomization with
#      `components: [monitoring]` gives exactly the component's objects;
#   8. a self-test: copies of the component (and of docs/metrics.md) with one defect each must
#      fail, with the expected message (skip with --no-selftest).
#
# Usage: check-monitoring.sh [--no-selftest] [DEPLOY_DIR]   (default: the directory of this
# script). docs/metrics.md is read from DEPLOY_DIR/../docs (METRICS_DOC overrides it).
# Needs promtool (Debian package prometheus; no Prometheus server runs) and the venv of
# scripts/install-deps.sh (DEPLOY_VENV, default .cache/deploy-venv) for PyYAML.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
venv=${DEPLOY_VENV:-$repo/.cache/deploy-venv}
python=$venv/bin/python

usage() { echo "usage: $0 [--no-selftest] [DEPLOY_DIR]"; }
fail() { echo "monitoring: $*" >&2; exit 1; }

selftest=1
deploy=$here
while [ $# -gt 0 ]; do
  case "$1" in
    --no-selftest) selftest=0 ;;
    -h | --help) usage; exit 0 ;;
    -*) usage >&2; exit 2 ;;
    *) [ -d "$1" ] || fail "$1 is not a directory"; deploy=$(cd "$1" && pwd) ;;
  esac
  shift
done
metrics_doc=${METRICS_DOC:-$(dirname "$deploy")/docs/metrics.md}
lint_config=$deploy/.yamllint.yaml
[ -f "$lint_config" ] || lint_config=$here/.yamllint.yaml

command -v promtool >/dev/null ||
  fail "promtool is missing: install prometheus (apt-get install -y --no-install-recommends prometheus; its service need not run)"
[ -x "$python" ] || fail "$python is missing: run scripts/install-deps.sh (make deps), or set DEPLOY_VENV"
"$python" -c 'import yaml' 2>/dev/null || fail "PyYAML is missing in $venv: run scripts/install-deps.sh (make deps)"
[ -d "$deploy/components/monitoring" ] || fail "$deploy/components/monitoring does not exist"
[ -f "$metrics_doc" ] || fail "$metrics_doc does not exist (set METRICS_DOC)"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The Python half: reads the component, writes the rules files for promtool, checks names.
cat >"$work/monitoring.py" <<'PY'
"""monitoring.py MODE COMPONENT_DIR METRICS_MD OUT_DIR (see deploy/check-monitoring.sh).

MODE layout: stage 2, and writes the files stages 3, 4 and 6 run promtool on (OUT_DIR/tests/:
the extracted rules and the test files; OUT_DIR/dashboard.rules.yaml). MODE names: stage 5.
Both read everything; each prints its own kind of problem, one line each, and exits 1 if there
is one."""

import json
import os
import re
import sys

import yaml

RULES_NAME = "vpn-router.rules.yaml"  # what the test files' rule_files must say
SEVERITIES = {"critical", "warning", "info"}
# Labels the Prometheus Operator puts on every series of a ServiceMonitor target (endpoints
# role): they win over a scraped label of the same name unless honorLabels is set.
TARGET_LABELS = {"namespace", "pod", "job", "instance", "service", "endpoint", "container"}
# Labels whose values docs/metrics.md enumerates in the metric's row: a literal value must be
# one of the row's `code` words.
ENUM_LABELS = {"state", "result", "reason", "object", "kind", "op", "direction", "check", "record_type"}
# Grafana's own variables and the PromQL that stands in for them.
GRAFANA_BUILTINS = {
    "__rate_interval": "5m", "__interval": "1m", "__range": "1h",
    "__interval_ms": "60000", "__range_ms": "3600000", "__range_s": "3600",
}

PROBLEMS = {"layout": [], "names": []}


def problem(msg, kind="layout"):
    PROBLEMS[kind].append(msg)


def name_problem(msg):
    problem(msg, "names")


# --- docs/metrics.md ------------------------------------------------------------------------

ROW = re.compile(r"^\|\s*`(vpn_router_[a-z0-9_]+)`\s*\|\s*([a-z]+)\s*\|([^|]*)\|(.*)\|\s*$")


def read_docs(path):
    """{name: (type, [labels], meaning)} from the tables' rows."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            m = ROW.match(line.rstrip("\n"))
            if m:
                out[m.group(1)] = (m.group(2), re.findall(r"`([a-z_]+)`", m.group(3)), m.group(4))
    if not out:
        name_problem(f"{path}: no metric table rows (| `vpn_router_...` | type | labels | meaning |) found")
    return out


# --- PromQL, shallowly: metric names, selectors, label lists --------------------------------

NAME = re.compile(r"(?<![A-Za-z0-9_:])(vpn_router_[A-Za-z0-9_]+)")
SELECTOR = re.compile(r"(?<![A-Za-z0-9_:])(vpn_router_[A-Za-z0-9_]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
LABEL_LIST = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*\s*(,\s*[A-Za-z_][A-Za-z0-9_]*\s*)*,?\s*)?")


class Checker:
    def __init__(self, docs, honor_labels):
        self.docs = docs
        self.honor = honor_labels
        self.unknown = {}  # name -> [where]
        self.names = set()

    def family(self, token):
        """The documented family of a series name, or None."""
        if token in self.docs:
            return token
        for suffix in ("_bucket", "_sum", "_count"):
            base = token[: -len(suffix)]
            if token.endswith(suffix) and self.docs.get(base, ("",))[0] == "histogram":
                return base
        return None

    def stored(self, label):
        """The name a metric's own label has in Prometheus with the shipped ServiceMonitor."""
        return label if self.honor or label not in TARGET_LABELS else "exported_" + label

    def labels_of(self, fam, token):
        own = {self.stored(x): x for x in self.docs[fam][1]}
        if token.endswith("_bucket"):
            own["le"] = "le"
        return own

    def check_label(self, label, fams, where, what):
        """`label` used with the documented families `fams` (list of (family, token))."""
        if not fams or label == "__name__":
            return None
        own = {}
        for fam, token in fams:
            own.update(self.labels_of(fam, token))
        if label in own:
            return own[label]
        clashing = [f for f, _ in fams if label in self.docs[f][1] and label in TARGET_LABELS]
        if clashing and not self.honor:
            name_problem(f"{where}: {what} `{label}`: {clashing[0]}'s own `{label}` label is stored as "
                    f"`exported_{label}` (the ServiceMonitor does not set honorLabels); `{label}` is the target's")
            return None
        if label in TARGET_LABELS:
            return None
        if label.startswith("exported_") and self.honor:
            name_problem(f"{where}: {what} `{label}`: the ServiceMonitor sets honorLabels, so the label is `{label[9:]}`")
            return None
        names = sorted({t for _, t in fams})
        name_problem(f"{where}: {what} `{label}` is no label of {', '.join(names)} "
                f"(docs/metrics.md: {', '.join(sorted(own)) or 'none'}; target labels: {', '.join(sorted(TARGET_LABELS))})")
        return None

    def check(self, expr, where, extra_labels=()):
        """Metric names, selector labels and values, grouping labels of one expression."""
        fams = []
        for token in NAME.findall(expr):
            fam = self.family(token)
            if fam is None:
                self.unknown.setdefault(token, []).append(where)
            else:
                self.names.add(fam)
                fams.append((fam, token))
        for token, body in SELECTOR.findall(expr):
            fam = self.family(token)
            if fam is None:
                continue
            for label, op, value in MATCHER.findall(body):
                doc_label = self.check_label(label, [(fam, token)], where, f"selector of {token}: label")
                if doc_label in ENUM_LABELS and "$" not in value:
                    meaning = self.docs[fam][2]
                    values = value.split("|") if op in ("=~", "!~") else [value]
                    for v in values:
                        if re.fullmatch(r"[A-Za-z0-9_]+", v) and f"`{v}`" not in meaning:
                            name_problem(f"{where}: {token}{{{label}{op}\"{value}\"}}: `{v}` is not a documented "
                                    f"value of `{doc_label}` (docs/metrics.md row of {fam})")
        for _, body in GROUPING.findall(expr):
            if not LABEL_LIST.fullmatch(body):
                continue  # not a label list: a syntax error, promtool's to report
            for label in (x.strip() for x in body.split(",")):
                if label:
                    self.check_label(label, fams, where, "grouping label")
        for label in extra_labels:
            self.check_label(label, fams, where, "label")


# --- the component --------------------------------------------------------------------------

def load_component(comp):
    objs, kust = [], None
    files = sorted(f for f in os.listdir(comp) if f.endswith((".yaml", ".yml")))
    for fn in files:
        path = os.path.join(comp, fn)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if not text.startswith("#"):
            problem(f"{path}: start the file with a comment saying what it is (house style)")
        try:
            docs = [d for d in yaml.safe_load_all(text) if d is not None]
        except yaml.YAMLError as e:
            problem(f"{path}: invalid YAML: {e}")
            continue
        if fn == "kustomization.yaml":
            kust = (path, docs[0] if docs else {})
        else:
            objs += [(fn, d) for d in docs]
    if kust is None:
        problem(f"{comp}: no kustomization.yaml")
        return objs
    path, k = kust
    if k.get("apiVersion") != "kustomize.config.k8s.io/v1alpha1" or k.get("kind") != "Component":
        problem(f"{path}: must be apiVersion kustomize.config.k8s.io/v1alpha1, kind Component "
                "(overlays opt in with `components:`)")
    if "namespace" in k:
        problem(f"{path}: a Component's `namespace:` would move the overlay's other objects too; "
                "set metadata.namespace in the manifests")
    listed = list(k.get("resources") or [])
    for r in listed:
        if not os.path.isfile(os.path.join(comp, r)):
            problem(f"{path}: resource {r} does not exist")
    for fn in files:
        if fn != "kustomization.yaml" and fn not in listed:
            problem(f"{os.path.join(comp, fn)}: not listed in kustomization.yaml")
    namespaces = {(d.get("metadata") or {}).get("namespace") for _, d in objs}
    if len(namespaces) != 1 or None in namespaces:
        problem(f"{comp}: every object needs metadata.namespace, the same one (found {sorted(map(str, namespaces))})")
    return objs


def one(objs, kind, where, pred=lambda d: True):
    found = [(fn, d) for fn, d in objs if d.get("kind") == kind and pred(d)]
    if len(found) != 1:
        problem(f"{where}: expected exactly one {kind}, found {len(found)}")
        return None, None
    return found[0]


class LiteralDumper(yaml.SafeDumper):
    """Writes multi-line strings (the expressions) as | blocks, so promtool's errors are readable."""


LiteralDumper.add_representer(
    str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def write_yaml(path, doc):
    with open(path, "w", encoding="utf-8") as f:
        yaml.dump(doc, f, Dumper=LiteralDumper, sort_keys=False, width=1000)


# --- alerts and their tests -----------------------------------------------------------------

def prepare_alerts(comp, rule, checker, out):
    fn, pr = rule
    groups = ((pr or {}).get("spec") or {}).get("groups")
    if not isinstance(groups, list) or not groups:
        problem(f"{fn}: spec.groups is empty")
        return 0, 0, 0
    tests_dir = os.path.join(out, "tests")
    os.makedirs(tests_dir, exist_ok=True)
    write_yaml(os.path.join(tests_dir, RULES_NAME), {"groups": groups})
    alerts, n_rules = set(), 0
    for g in groups:
        for r in g.get("rules") or []:
            name = r.get("alert") or r.get("record")
            where = f"{fn}: {'alert' if 'alert' in r else 'record'} {name}"
            checker.check(str(r.get("expr", "")), where)
            if "alert" not in r:
                continue
            n_rules += 1
            alerts.add(r["alert"])
            if (r.get("labels") or {}).get("severity") not in SEVERITIES:
                problem(f"{where}: no severity label ({', '.join(sorted(SEVERITIES))})")
            for a in ("summary", "description"):
                if not str((r.get("annotations") or {}).get(a, "")).strip():
                    problem(f"{where}: no {a} annotation")
    # the tests
    src = os.path.join(comp, "tests")
    files = sorted(os.listdir(src)) if os.path.isdir(src) else []
    for f in files:
        if not f.endswith(".test.yaml"):
            problem(f"{os.path.join(src, f)}: name promtool test files *.test.yaml (nothing else belongs in tests/)")
    files = [f for f in files if f.endswith(".test.yaml")]
    if not files:
        problem(f"{src}: no promtool test files")
    fires, quiet, cases = set(), set(), 0
    for f in files:
        path = os.path.join(src, f)
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        try:
            t = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            problem(f"{path}: invalid YAML: {e}")
            continue
        if t.get("rule_files") != [RULES_NAME]:
            problem(f"{path}: rule_files must be [{RULES_NAME}], the file this script extracts the "
                    f"PrometheusRule's groups to (found {t.get('rule_files')})")
        for group in t.get("tests") or []:
            for c in group.get("alert_rule_test") or []:
                cases += 1
                (fires if c.get("exp_alerts") else quiet).add(c.get("alertname"))
            cases += len(group.get("promql_expr_test") or [])
        with open(os.path.join(tests_dir, f), "w", encoding="utf-8") as fh:
            fh.write(text)
    for a in sorted(alerts):
        if a not in fires:
            problem(f"{fn}: alert {a}: no test case in {src} where it fires")
        if a not in quiet:
            problem(f"{fn}: alert {a}: no test case in {src} where it must not fire (a near miss)")
    for a in sorted((fires | quiet) - alerts):
        problem(f"{src}: tests alert {a}, which {fn} does not have")
    return len(alerts), n_rules, cases


# --- the dashboard --------------------------------------------------------------------------

VAR = re.compile(r"\$\{([A-Za-z0-9_]+)(?::[^}]*)?\}|\$([A-Za-z_][A-Za-z0-9_]*)|\[\[([A-Za-z0-9_]+)(?::[^\]]*)?\]\]")


def promql_of_variable(v):
    """The PromQL inside a templating query, and the label it reads (or None)."""
    q = v.get("query")
    if isinstance(q, dict):
        q = q.get("query", "")
    q = (q or v.get("definition") or "").strip()
    m = re.fullmatch(r"label_values\((.*),\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)", q, re.S)
    if m:
        return m.group(1), m.group(2)
    m = re.fullmatch(r"query_result\((.*)\)", q, re.S)
    if m:
        return m.group(1), None
    return None, None  # label_values(label), label_names(), metrics(...): no PromQL


def prepare_dashboard(cm, checker, out):
    fn, doc = cm
    data = (doc or {}).get("data") or {}
    keys = [k for k in data if k.endswith(".json")]
    if len(keys) != 1:
        problem(f"{fn}: the ConfigMap must hold one *.json dashboard, found {keys}")
        return 0
    where0 = f"{fn}: {keys[0]}"
    try:
        dash = json.loads(data[keys[0]])
    except json.JSONDecodeError as e:
        problem(f"{where0}: invalid JSON: {e}")
        return 0
    variables = {v.get("name"): v for v in (dash.get("templating") or {}).get("list") or []}
    if (variables.get("datasource") or {}).get("type") != "datasource":
        problem(f"{where0}: no `datasource` variable of type datasource")

    queries = []  # (record, where, expr, extra labels)

    def datasource_ok(ds, where):
        uid = ds.get("uid") if isinstance(ds, dict) else ds
        if uid not in ("${datasource}", "$datasource"):
            problem(f"{where}: datasource {ds!r}: use the `datasource` variable (uid ${{datasource}})")

    def walk(panels):
        for p in panels or []:
            title = f"{where0}: panel {p.get('title')!r} (id {p.get('id')})"
            if p.get("type") != "row":
                datasource_ok(p.get("datasource"), title)
            for t in p.get("targets") or []:
                if "expr" in t:
                    datasource_ok(t.get("datasource", p.get("datasource")), f"{title} target {t.get('refId')}")
                    queries.append((f"dashboard:panel_{p.get('id')}_{t.get('refId')}", f"{title} target {t.get('refId')}", t["expr"], ()))
            walk(p.get("panels"))

    walk(dash.get("panels"))
    for name, v in variables.items():
        if v.get("type") == "query":
            datasource_ok(v.get("datasource"), f"{where0}: variable {name}")
            expr, label = promql_of_variable(v)
            if expr:
                queries.append((f"dashboard:variable_{name}", f"{where0}: variable {name}", expr, (label,) if label else ()))
    for i, a in enumerate((dash.get("annotations") or {}).get("list") or []):
        if a.get("expr"):
            datasource_ok(a.get("datasource"), f"{where0}: annotation {a.get('name')!r}")
            queries.append((f"dashboard:annotation_{i}", f"{where0}: annotation {a.get('name')!r}", a["expr"], ()))

    def substitute(expr, where):
        def repl(m):
            name = m.group(1) or m.group(2) or m.group(3)
            if name in GRAFANA_BUILTINS:
                return GRAFANA_BUILTINS[name]
            if name in variables:
                return ".*"
            problem(f"{where}: ${name} is no variable of the dashboard")
            return ".*"
        return VAR.sub(repl, expr)

    rules = []
    for record, where, expr, extra in queries:
        checker.check(expr, where, extra)
        rules.append({"record": record, "expr": substitute(expr, where)})
    write_yaml(os.path.join(out, "dashboard.rules.yaml"), {"groups": [{"name": "dashboard", "rules": rules}]})
    with open(os.path.join(out, "dashboard.where.tsv"), "w", encoding="utf-8") as f:
        f.writelines(f"{r}\t{w}\n" for r, w, _, _ in queries)
    if not queries:
        problem(f"{where0}: no PromQL queries found")
    return len(queries)


def main():
    mode, comp, metrics_md, out = sys.argv[1:5]
    docs = read_docs(metrics_md)
    objs = load_component(comp)
    sm_fn, sm = one(objs, "ServiceMonitor", comp)
    honor = any(e.get("honorLabels") for e in ((sm or {}).get("spec") or {}).get("endpoints") or [])
    checker = Checker(docs, honor)
    rule = one(objs, "PrometheusRule", comp)
    cm = one(objs, "ConfigMap", comp, lambda d: ((d.get("metadata") or {}).get("labels") or {}).get("grafana_dashboard") == "1")
    n_alerts = n_rules = n_cases = n_queries = 0
    if rule[1] is not None:
        n_alerts, n_rules, n_cases = prepare_alerts(comp, rule, checker, out)
    if cm[1] is not None:
        n_queries = prepare_dashboard(cm, checker, out)
    for token, places in sorted(checker.unknown.items()):
        shown = "; ".join(sorted(set(places))[:3]) + (f"; and {len(set(places)) - 3} more" if len(set(places)) > 3 else "")
        name_problem(f"{token} is not in {metrics_md} (no row | `{token}` |): used in {shown}")
    with open(os.path.join(out, "counts"), "w", encoding="utf-8") as f:
        f.write(f"{n_alerts} {n_rules} {n_cases} {n_queries} {len(checker.names)}\n")
    for p in PROBLEMS[mode]:
        print(p)
    return 1 if PROBLEMS[mode] else 0


if __name__ == "__main__":
    sys.exit(main())
PY

# check_tree COMPONENT_DIR METRICS_MD OUT: every check; prints what failed and returns non-zero
# at the first failing stage.
check_tree() {
  local comp=$1 doc=$2 out=$3 output rc=0 build
  mkdir -p "$out"
  if command -v yamllint >/dev/null && [ -f "$lint_config" ]; then
    yamllint -s -c "$lint_config" "$comp" || { echo "FAILED: yamllint"; return 1; }
  fi
  "$python" "$work/monitoring.py" layout "$comp" "$doc" "$out" || { echo "FAILED: component layout"; return 1; }

  promtool check rules "$out/tests/vpn-router.rules.yaml" >"$out/check-alerts.out" 2>&1 ||
    { cat "$out/check-alerts.out"; echo "FAILED: promtool check rules on the PrometheusRule's groups"; return 1; }
  output=$(promtool check rules "$out/dashboard.rules.yaml" 2>&1) || rc=$?
  if [ "$rc" != 0 ]; then
    echo "$output"
    # Say which panel each failing record is.
    grep -oE 'dashboard:[A-Za-z0-9_]+' <<<"$output" | sort -u | while read -r rec; do
      grep -F "$rec"$'\t' "$out/dashboard.where.tsv" | cut -f2 | sed "s/^/  $rec is /"
    done
    echo "FAILED: promtool check rules on the dashboard's queries"
    return 1
  fi
  "$python" "$work/monitoring.py" names "$comp" "$doc" "$out" ||
    { echo "FAILED: metric names or labels not in docs/metrics.md"; return 1; }
  (cd "$out/tests" && promtool test rules ./*.test.yaml) >"$out/test.out" 2>&1 ||
    { cat "$out/test.out"; echo "FAILED: promtool test rules"; return 1; }

  # kustomize: the component builds, alone, into exactly its manifests.
  build=()
  if command -v kustomize >/dev/null; then build=(kustomize build); elif command -v kubectl >/dev/null; then build=(kubectl kustomize); fi
  if [ "${#build[@]}" -gt 0 ]; then
    mkdir -p "$out/kbuild"
    printf 'apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\ncomponents:\n  - %s\n' \
      "$(realpath --relative-to="$out/kbuild" "$comp")" >"$out/kbuild/kustomization.yaml"
    "${build[@]}" "$out/kbuild" >"$out/kbuild.out" 2>&1 ||
      { cat "$out/kbuild.out"; echo "FAILED: ${build[*]} of a kustomization with components: [monitoring]"; return 1; }
    "$python" - "$out/kbuild.out" "$comp" <<'PY' || { echo "FAILED: the kustomize build differs from the component's manifests"; return 1; }
import os, sys, yaml
def ids(docs):
    return sorted((d["kind"], d["metadata"]["name"], d["metadata"].get("namespace", "")) for d in docs if d)
built = ids(yaml.safe_load_all(open(sys.argv[1])))
want = []
for fn in sorted(os.listdir(sys.argv[2])):
    if fn.endswith(".yaml") and fn != "kustomization.yaml":
        want += ids(yaml.safe_load_all(open(os.path.join(sys.argv[2], fn))))
if built != sorted(want):
    print(f"built {built}, manifests {sorted(want)}")
    sys.exit(1)
PY
  fi
}

echo "monitoring: checking $deploy/components/monitoring"
command -v yamllint >/dev/null || echo "monitoring: note: yamllint is not installed, stage 1 is skipped"
command -v kustomize >/dev/null || command -v kubectl >/dev/null ||
  echo "monitoring: note: neither kustomize nor kubectl is installed, stage 7 is skipped"
if ! check_tree "$deploy/components/monitoring" "$metrics_doc" "$work/main"; then
  fail "check failed (above)"
fi
read -r n_alerts n_rules n_cases n_queries n_names <"$work/main/counts"

if [ "$selftest" = 1 ]; then
  # mutate FILE SED_EXPR EXPECTED_TEXT: a copy of the component (and of docs/metrics.md) with one
  # defect must fail with a message containing EXPECTED_TEXT. FILE is relative to the component,
  # or docs/metrics.md.
  n=0
  mutate() {
    local file=$1 expr=$2 expect=$3 what=$4 copy orig target out
    n=$((n + 1))
    copy=$work/m$n
    mkdir -p "$copy/docs"
    cp -r "$deploy/components/monitoring" "$copy/monitoring"
    cp "$metrics_doc" "$copy/docs/metrics.md"
    case "$file" in
      docs/metrics.md) orig=$metrics_doc target=$copy/docs/metrics.md ;;
      *) orig=$deploy/components/monitoring/$file target=$copy/monitoring/$file ;;
    esac
    sed -i -e "$expr" "$target"
    if cmp -s "$orig" "$target"; then
      fail "self-test $n: '$expr' changed nothing in $file (update the self-test)"
    fi
    if out=$(check_tree "$copy/monitoring" "$copy/docs/metrics.md" "$copy/out" 2>&1); then
      echo "$out" >&2
      fail "self-test $n: a defect in $file ('$expr') was not caught"
    fi
    grep -qF -- "$expect" <<<"$out" ||
      { echo "$out" >&2; fail "self-test $n: $file ('$expr') failed, but without '$expect'"; }
    echo "monitoring: self-test $n caught: $what"
    grep -F -m 1 -- "$expect" <<<"$out" | cut -c1-200 | sed 's/^/    > /'
  }
  mutate prometheusrule.yaml 's/(vpn_router_gateways_healthy) == 0$/(vpn_router_gateways_healthy) == == 0/' \
    '"VpnRouterNoHealthyGateway": could not parse expression' "an alert expression with a syntax error"
  mutate grafana-dashboard.yaml 's/vpn_router_gateway_probe_rtt_seconds{/vpn_router_gateway_probe_rtt_secs{/' \
    "vpn_router_gateway_probe_rtt_secs is not in" "a dashboard query with a metric name that does not exist"
  mutate prometheusrule.yaml 's/^            ) > 1$/            ) > 2/' \
    "alertname: VpnRouterVrrpSplitBrain, time: 1m30s" "split brain at > 2 instead of > 1: its promtool test fails"
  mutate prometheusrule.yaml '0,/^          for: 1m$/s//          for: 30s/' \
    "name: handovers, two masters for one scrape and for 45 s, are no split brain" \
    "split brain with for: 30s: the handover near miss fires it"
  mutate grafana-dashboard.yaml 's/sum by (pod, check, le) (rate(/sum by (pod, check, le (rate(/' \
    "panel 'Gateway check duration (p95)'" "a dashboard query with a syntax error"
  mutate prometheusrule.yaml 's/vpn_router_ddns_writer == 1)/vpn_router_ddns_writers == 1)/' \
    "vpn_router_ddns_writers is not in" "an alert with a metric name that does not exist"
  # shellcheck disable=SC2016 # backticks and $ are the files' text, not expansions
  mutate docs/metrics.md '/^| `vpn_router_ingress_real_servers_up` |/d' \
    "vpn_router_ingress_real_servers_up is not in" "a metric the alerts use, removed from docs/metrics.md"
  mutate prometheusrule.yaml '0,/sum by (namespace, exported_instance)/s//sum by (namespace, instance)/' \
    "is stored as \`exported_instance\`" "an alert grouping VRRP series by the target's instance label"
  mutate grafana-dashboard.yaml 's/(pod, virtual_server, exported_service)/(pod, virtual_server, service)/' \
    "is stored as \`exported_service\`" "a dashboard query grouping IPVS series by the target's service label"
  mutate servicemonitor.yaml 's/^      scrapeTimeout: 5s$/      scrapeTimeout: 5s\n      honorLabels: true/' \
    "the ServiceMonitor sets honorLabels" "honorLabels set, so exported_instance no longer exists"
  mutate prometheusrule.yaml 's/state="master"}/state="leader"}/' \
    "is not a documented value of \`state\`" "a label value docs/metrics.md does not list"
  # shellcheck disable=SC2016
  mutate grafana-dashboard.yaml 's/pod=~\\"$pod\\"}\[\$__interval\]/pod=~\\"$pods\\"}[$__interval]/' \
    "\$pods is no variable of the dashboard" "a dashboard query using an undefined variable"
  mutate tests/alerts.test.yaml 's/alertname: VpnRouterIngressRealServersDown/alertname: VpnRouterMetricsDown/' \
    "alert VpnRouterIngressRealServersDown: no test case" "an alert left without test cases"
  mutate prometheusrule.yaml '0,/            severity: warning/{/            severity: warning/d}' \
    "no severity label" "an alert without a severity label"
  mutate kustomization.yaml '/  - grafana-dashboard.yaml/d' \
    "not listed in kustomization.yaml" "a manifest the Component does not list"
  if command -v yamllint >/dev/null; then
    mutate servicemonitor.yaml 's/^kind: ServiceMonitor$/kind: ServiceMonitor  /' \
      "trailing spaces" "trailing spaces (yamllint)"
  fi
  echo "monitoring: self-test ok ($n defects caught)"
fi

echo "monitoring: ok ($n_alerts alerts in $n_rules rules, $n_cases test cases, $n_queries dashboard queries, all $n_names metric names documented)"
