"""Writes tests/python/openapi.json: OpenAI's official OpenAPI description
(`../shared/openai/openapi.json`) trimmed to the paths tunegate serves, with every component
those paths reference (transitively) and the server pointed at a local gateway.

    python3 scripts/trim_openapi.py [path/to/openapi.json]
"""

import json
import sys
from pathlib import Path

PATHS = [
    "/chat/completions",
    "/chat/completions/{completion_id}",
    "/chat/completions/{completion_id}/messages",
    "/completions",
    "/embeddings",
    "/files",
    "/files/{file_id}",
    "/files/{file_id}/content",
    "/fine_tuning/jobs",
    "/fine_tuning/jobs/{fine_tuning_job_id}",
    "/fine_tuning/jobs/{fine_tuning_job_id}/cancel",
    "/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints",
    "/fine_tuning/jobs/{fine_tuning_job_id}/events",
    "/models",
    "/models/{model}",  # GET only: deleting fine-tuned models is not served
    "/responses",
    "/responses/{response_id}",
    "/responses/{response_id}/input_items",
]


def refs(node, out):
    if isinstance(node, dict):
        r = node.get("$ref")
        if isinstance(r, str) and r.startswith("#/components/"):
            out.add(tuple(r[len("#/components/"):].split("/", 1)))
        for v in node.values():
            refs(v, out)
    elif isinstance(node, list):
        for v in node:
            refs(v, out)


def main():
    root = Path(__file__).resolve().parent.parent
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else root.parent / "shared" / "openai" / "openapi.json"
    spec = json.loads(src.read_text())
    # Operations tunegate does not serve, by path.
    dropped = {"/models/{model}": {"delete"}}
    paths = {p: {m: op for m, op in spec["paths"][p].items() if m not in dropped.get(p, ())} for p in PATHS}
    # Patched where the description contradicts the API it describes: `DELETE
    # /responses/{id}` documents its 404 body as a bare `Error`, while the API (and every SDK's
    # error parsing) wraps errors as `{"error": Error}`, as on every other route.
    delete = paths["/responses/{response_id}"]["delete"]
    for status, resp in delete.get("responses", {}).items():
        for media in resp.get("content", {}).values():
            if media.get("schema") == {"$ref": "#/components/schemas/Error"}:
                media["schema"] = {"$ref": "#/components/schemas/ErrorResponse"}
    keep, todo = set(), set()
    refs(paths, todo)
    while todo:
        item = todo.pop()
        if item in keep:
            continue
        keep.add(item)
        kind, name = item
        refs(spec["components"][kind][name], todo)
    components = {}
    for kind, name in sorted(keep):
        components.setdefault(kind, {})[name] = spec["components"][kind][name]
    if "securitySchemes" in spec.get("components", {}):
        components["securitySchemes"] = spec["components"]["securitySchemes"]
    out = {
        "openapi": spec["openapi"],
        "info": spec["info"],
        "servers": [{"url": "http://127.0.0.1:8080/v1"}],
        "security": spec.get("security", []),
        "tags": spec.get("tags", []),
        "paths": paths,
        "components": components,
    }
    dest = root / "tests" / "python" / "openapi.json"
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(f"{dest}: {len(paths)} paths, {sum(len(v) for v in components.values())} components")


if __name__ == "__main__":
    main()
