"""Validates the ServiceMonitor in each YAML file given against prometheus-operator's CRD
schema, rejecting unknown fields (as `kubectl apply --validate=strict` does).

The schema comes from cloudcoil.models.prometheus_operator (pydantic models generated from
the operator's CRDs, v0.80): its JSON schema, with `additionalProperties: false` added to
every object that lists its properties, so a misspelled field fails instead of being
pruned silently. Exit status 1 on any error, 2 when a file has no ServiceMonitor.
"""

import sys

import jsonschema
import yaml
from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

API_VERSION = "monitoring.coreos.com/v1"


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


def main(paths):
    schema = strict(ServiceMonitor.model_json_schema(by_alias=True, mode="validation"))
    validator = jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    failed = False
    for path in paths:
        with open(path, encoding="utf-8") as file:
            docs = [doc for doc in yaml.safe_load_all(file) if doc is not None]
        monitors = [doc for doc in docs if doc.get("kind") == "ServiceMonitor"]
        if not monitors:
            print(f"ERROR {path}: no ServiceMonitor in it")
            return 2
        for doc in monitors:
            name = (doc.get("metadata") or {}).get("name", "?")
            errors = []
            if doc.get("apiVersion") != API_VERSION:
                errors.append(f"apiVersion is {doc.get('apiVersion')!r}, not {API_VERSION!r}")
            for error in sorted(validator.iter_errors(doc), key=lambda e: list(e.path)):
                where = ".".join(str(p) for p in error.absolute_path) or "(root)"
                errors.append(f"{where}: {error.message}")
            if not errors:
                try:
                    ServiceMonitor.model_validate(doc)
                except Exception as error:  # pydantic's own checks, e.g. types
                    errors.append(str(error))
            if errors:
                failed = True
                for error in errors:
                    print(f"ERROR {path}: servicemonitor/{name}: {error}")
            else:
                print(f"INFO {path} passed for resource servicemonitor/{name} (prometheus-operator v0.80 CRD, strict)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
