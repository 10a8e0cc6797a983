"""Schema validation of Kubernetes manifests, for `cargo xtask check-deploy`.

Every object must validate, or the run fails:
- Kubernetes' own kinds against the JSON schemas kubernetes-validate bundles (generated from
  Kubernetes' OpenAPI documents), in strict mode (an unknown field is an error, as with
  `kubectl apply --validate=strict`, kubectl's default), for each --kube-version;
- instances of the CRDs given with --crds (Istio's security kinds) against those CRDs'
  openAPIV3Schema, as the API server applies it with strict field validation;
- CustomResourceDefinitions also must be structural (every node typed), which the API server
  requires of apiextensions.k8s.io/v1 CRDs.
A kind with no schema is an error too: nothing passes unchecked.

With --expect-invalid every file holds one object that must be rejected, with an error that
contains the text of the file's `# expect: ...` line: this keeps the check honest.
"""

import argparse
import copy
import functools
import json
import re
import sys

import jsonschema
import kubernetes_validate
import kubernetes_validate.utils as kv_utils
import yaml

# kubernetes-validate reads the (large) shared definitions file again for every object; the
# files never change during a run, so each is read once.
kv_utils.schema_contents = functools.lru_cache(maxsize=None)(kv_utils.schema_contents)


def load_documents(path):
    with open(path, encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    # What the API server receives is JSON: YAML's integer map keys (portLevelMtls) become
    # strings on the way.
    return json.loads(json.dumps(docs))


def kind_key(obj):
    group = obj.get("apiVersion", "").rsplit("/", 1)
    group = group[0] if len(group) == 2 else ""
    return group, obj.get("kind")


# ---- CRDs -----------------------------------------------------------------------------------

FORBIDDEN_IN_STRUCTURAL = (
    "$ref", "definitions", "dependencies", "additionalItems", "patternProperties",
)
# Keywords that describe or default a value without constraining it.
NOT_CONSTRAINTS = ("description", "default", "example", "format", "nullable")


def structural_errors(schema, path="openAPIV3Schema"):
    """Ways a CRD schema breaks the API server's structural-schema rules."""
    errors = []
    preserve = schema.get("x-kubernetes-preserve-unknown-fields") is True
    int_or_string = schema.get("x-kubernetes-int-or-string") is True
    if "type" not in schema and not (preserve or int_or_string):
        errors.append(f"{path}: no type")
    for keyword in FORBIDDEN_IN_STRUCTURAL:
        if keyword in schema:
            errors.append(f"{path}: {keyword} is not allowed")
    if "properties" in schema and isinstance(schema.get("additionalProperties"), dict):
        errors.append(f"{path}: properties and additionalProperties together")
    if schema.get("type") == "array" and "items" not in schema:
        errors.append(f"{path}: array without items")
    for name, sub in schema.get("properties", {}).items():
        errors += structural_errors(sub, f"{path}.{name}")
    if isinstance(schema.get("additionalProperties"), dict):
        errors += structural_errors(schema["additionalProperties"], f"{path}.*")
    if isinstance(schema.get("items"), dict):
        errors += structural_errors(schema["items"], f"{path}[]")
    return errors


def to_json_schema(node):
    """A CRD's OpenAPI v3 schema as JSON Schema, with the API server's strictness: objects
    take only the fields they declare unless they preserve unknown fields."""
    out = {}
    for key, value in node.items():
        if key in NOT_CONSTRAINTS or key.startswith("x-kubernetes-"):
            continue
        if key == "properties":
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = to_json_schema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [to_json_schema(sub) for sub in value]
        else:
            out[key] = copy.deepcopy(value)
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("type") == "object" and "additionalProperties" not in node:
        if not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


class CrdSchemas:
    def __init__(self):
        self.by_kind = {}  # (group, version, kind) -> JSON schema of the whole object

    def add(self, crd, source):
        spec = crd["spec"]
        for version in spec["versions"]:
            schema = version["schema"]["openAPIV3Schema"]
            errors = structural_errors(schema)
            if errors:
                where = f"{source}: " if source else ""
                name = f"{crd['metadata']['name']} {version['name']}"
                raise ValueError(f"{where}CRD {name} is not structural: " + "; ".join(errors))
            full = to_json_schema(schema)
            # apiVersion, kind and metadata are the API server's to check (ObjectMeta).
            full.setdefault("properties", {})
            full["properties"].update(
                apiVersion={"type": "string"},
                kind={"type": "string"},
                metadata={"type": "object", "required": ["name"]},
            )
            required = set(full.get("required", [])) | {"apiVersion", "kind", "metadata"}
            full["required"] = sorted(required)
            jsonschema.Draft202012Validator.check_schema(full)
            self.by_kind[(spec["group"], version["name"], spec["names"]["kind"])] = full

    def schema_for(self, obj):
        group, kind = kind_key(obj)
        version = obj.get("apiVersion", "").rsplit("/", 1)[-1]
        return self.by_kind.get((group, version, kind))


# ---- validation -----------------------------------------------------------------------------


def describe(obj):
    name = (obj.get("metadata") or {}).get("name", "?")
    return f"{obj.get('kind', '?')}/{name}"


def best_error(validator, obj):
    errors = sorted(validator.iter_errors(obj), key=jsonschema.exceptions.relevance)
    if not errors:
        return None
    e = errors[0]
    path = ".".join(str(p) for p in e.absolute_path) or "(root)"
    return f"{path}: {e.message}"


def validate_object(obj, crds, kube_versions):
    """Errors of one object (empty: valid)."""
    if not isinstance(obj, dict) or "apiVersion" not in obj or "kind" not in obj:
        return ["not a Kubernetes object (apiVersion and kind are required)"]
    errors = []
    schema = crds.schema_for(obj)
    if schema is not None:
        err = best_error(jsonschema.Draft202012Validator(schema), obj)
        if err:
            errors.append(f"against its CRD: {err}")
        return errors
    if kind_key(obj)[0] in {g for g, _, _ in crds.by_kind}:
        return [f"no {obj['kind']} in {obj['apiVersion']} among the CRDs given"]
    for version in kube_versions:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path) or "(root)"
            errors.append(f"Kubernetes {version}: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(f"Kubernetes {version}: {e.message}")
    if obj["kind"] == "CustomResourceDefinition" and not errors:
        try:
            CrdSchemas().add(obj, "")
        except (ValueError, jsonschema.SchemaError) as e:
            errors.append(str(e))
    return errors


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--crds", action="append", default=[], help="file of CRDs whose instances to check"
    )
    parser.add_argument("--kube-version", action="append", required=True)
    parser.add_argument("--expect-invalid", action="store_true")
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()

    crds = CrdSchemas()
    for path in args.crds:
        for obj in load_documents(path):
            crds.add(obj, path)

    failures = 0
    objects = 0
    for path in args.files:
        docs = load_documents(path)
        if args.expect_invalid:
            expect = re.search(r"^# expect: (.+)$", open(path, encoding="utf-8").read(), re.M)
            if len(docs) != 1 or not expect:
                print(f"FAIL {path}: a broken fixture holds one object and an '# expect: ' line")
                failures += 1
                continue
            errors = validate_object(docs[0], crds, args.kube_version)
            objects += 1
            if not any(expect.group(1) in e for e in errors):
                got = "; ".join(errors) or "it passed"
                print(f"FAIL {path}: expected an error containing {expect.group(1)!r}, got: {got}")
                failures += 1
            continue
        for obj in docs:
            objects += 1
            for err in validate_object(obj, crds, args.kube_version):
                print(f"FAIL {path}: {describe(obj)}: {err}")
                failures += 1
    what = "broken objects rejected" if args.expect_invalid else "objects valid"
    versions = ", ".join(args.kube_version)
    if failures:
        print(f"{failures} failures among {objects} objects in {len(args.files)} files")
        return 1
    print(
        f"{objects} {what} in {len(args.files)} files "
        f"(Kubernetes {versions}; {len(crds.by_kind)} CRD versions)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
