"""Validates every resource in the Kubernetes manifests given, offline, rejecting unknown
fields (as `kubectl apply --validate=strict` does). Exit status 1 on any error.

- Built-in kinds: kubernetes-validate's bundled JSON schemas (strict), against each
  Kubernetes version named in KUBERNETES_VERSIONS (the oldest and newest it bundles).
- ServiceMonitor (a CRD, monitoring.coreos.com/v1): cloudcoil.models.prometheus_operator's
  models, generated from prometheus-operator's CRDs (v0.80). Their JSON schema gets
  `additionalProperties: false` on every object that lists its properties, so a misspelled
  field fails here instead of being pruned silently by the API server.
- Any other kind is an error: nothing would check it.
"""

import sys

import jsonschema
import kubernetes_validate
import yaml
from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

KUBERNETES_VERSIONS = ["1.25.0", "1.37.0"]
SERVICE_MONITOR_API = "monitoring.coreos.com/v1"


def strict(node):
    if isinstance(node, dict):
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for value in node.values():
            strict(value)
    elif isinstance(node, list):
        for value in node:
            strict(value)
    return node


def service_monitor_errors(validator, doc):
    errors = []
    if doc.get("apiVersion") != SERVICE_MONITOR_API:
        errors.append(f"apiVersion is {doc.get('apiVersion')!r}, not {SERVICE_MONITOR_API!r}")
    for error in sorted(validator.iter_errors(doc), key=lambda e: list(e.path)):
        where = ".".join(str(p) for p in error.absolute_path) or "(root)"
        errors.append(f"{where}: {error.message}")
    if not errors:
        try:
            ServiceMonitor.model_validate(doc)
        except Exception as error:  # pydantic's own checks
            errors.append(str(error))
    return errors


def builtin_errors(doc):
    errors = []
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(f"no schema for {doc.get('apiVersion')} {doc.get('kind')} in Kubernetes {version}")
        except kubernetes_validate.ValidationError as error:
            where = ".".join(str(p) for p in error.path) or "(root)"
            errors.append(f"Kubernetes {version}: {where}: {error.message}")
    return errors


def main(paths):
    monitor_schema = strict(ServiceMonitor.model_json_schema(by_alias=True, mode="validation"))
    monitor_validator = jsonschema.Draft202012Validator(
        monitor_schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    failed = False
    checked = 0
    for path in paths:
        with open(path, encoding="utf-8") as file:
            docs = [doc for doc in yaml.safe_load_all(file) if doc is not None]
        if not docs:
            print(f"ERROR {path}: no resource in it")
            failed = True
        for doc in docs:
            if not isinstance(doc, dict) or "kind" not in doc:
                print(f"ERROR {path}: a document that is not a Kubernetes resource")
                failed = True
                continue
            kind = doc["kind"]
            name = (doc.get("metadata") or {}).get("name", "?")
            if kind == "ServiceMonitor":
                errors = service_monitor_errors(monitor_validator, doc)
                against = "prometheus-operator v0.80 CRD"
            else:
                errors = builtin_errors(doc)
                against = "Kubernetes " + " and ".join(KUBERNETES_VERSIONS)
            checked += 1
            if errors:
                failed = True
                for error in errors:
                    print(f"ERROR {path}: {kind.lower()}/{name}: {error}")
            else:
                print(f"  {path}: {kind.lower()}/{name} valid ({against}, strict)")
    if checked == 0:
        print("ERROR no resources checked")
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
