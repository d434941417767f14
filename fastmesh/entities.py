"""Entity edits on the declarative config document (the admin API's CRUD), as pure functions.

Every function takes the current document (a parsed YAML/JSON mapping), and returns a NEW document
(the input is never changed); the caller validates the whole new document and applies it, or refuses
it, atomically. Routes may be nested under their service or top-level with a `service` field; an edit
keeps a route where it was declared, except that a nested route given a different `service` moves to
the top level. PATCH is a JSON merge patch (RFC 7396): `null` removes a field.
"""
from __future__ import annotations

import copy

KINDS = ("services", "routes", "upstreams")
TOP_LEVEL = ("services", "upstreams")        # named lists at the top of the document


class EntityError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _doc(document: object) -> dict:
    doc = copy.deepcopy(document) if isinstance(document, dict) else {}
    for kind in KINDS:
        if doc.get(kind) is None:
            doc.pop(kind, None)
        elif not isinstance(doc[kind], list):
            raise EntityError(409, f"the active config's '{kind}' is not a list")
    return doc


def _named(items: list, name: str) -> int | None:
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == name:
            return i
    return None


def _route_slots(doc: dict):
    """(container list, parent service name or None) for every place routes are declared."""
    for svc in doc.get("services") or ():
        if isinstance(svc, dict) and isinstance(svc.get("routes"), list):
            yield svc["routes"], svc.get("name")
    if isinstance(doc.get("routes"), list):
        yield doc["routes"], None


def _find_route(doc: dict, name: str) -> tuple[list, int, str | None] | None:
    for container, parent in _route_slots(doc):
        index = _named(container, name)
        if index is not None:
            return container, index, parent
    return None


def list_entities(document: object, kind: str) -> list:
    doc = _doc(document)
    if kind in TOP_LEVEL:
        return list(doc.get(kind) or ())
    out = []
    for container, parent in _route_slots(doc):
        for route in container:
            out.append(_with_service(route, parent))
    return out


def _with_service(route: object, parent: str | None) -> object:
    if parent is not None and isinstance(route, dict) and "service" not in route:
        return {**route, "service": parent}
    return route


def get_entity(document: object, kind: str, name: str) -> dict:
    doc = _doc(document)
    if kind in TOP_LEVEL:
        index = _named(doc.get(kind) or [], name)
        if index is None:
            raise EntityError(404, f"no {kind[:-1]} named '{name}'")
        return doc[kind][index]
    found = _find_route(doc, name)
    if found is None:
        raise EntityError(404, f"no route named '{name}'")
    container, index, parent = found
    return _with_service(container[index], parent)


def _check_body(body: object, name: str, kind: str) -> dict:
    if not isinstance(body, dict):
        raise EntityError(400, f"expected a JSON object describing the {kind[:-1]}")
    if "name" in body and body["name"] != name:
        raise EntityError(400, f"the body names '{body['name']}' but the URL names '{name}'")
    return {"name": name, **{k: v for k, v in body.items() if k != "name"}}


def merge_patch(target: object, patch: object) -> object:
    """RFC 7396 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def put_entity(document: object, kind: str, name: str, body: object) -> tuple[dict, bool]:
    """Create or replace; returns (new document, created)."""
    entity = _check_body(body, name, kind)
    doc = _doc(document)
    if kind in TOP_LEVEL:
        items = doc.setdefault(kind, [])
        index = _named(items, name)
        if index is None:
            items.append(entity)
            return doc, True
        items[index] = entity
        return doc, False
    found = _find_route(doc, name)
    if found is None:
        doc.setdefault("routes", []).append(entity)
        return doc, True
    container, index, parent = found
    if parent is not None and entity.get("service") not in (None, parent):
        del container[index]                       # moves to another service: top level
        doc.setdefault("routes", []).append(entity)
    else:
        if parent is not None:
            entity.pop("service", None)
        container[index] = entity
    return doc, False


def patch_entity(document: object, kind: str, name: str, patch: object) -> dict:
    if not isinstance(patch, dict):
        raise EntityError(400, "expected a JSON object (a merge patch)")
    if "name" in patch and patch["name"] != name:
        raise EntityError(400, "an entity cannot be renamed by PATCH: DELETE it and PUT the new one")
    current = get_entity(document, kind, name)
    doc, _ = put_entity(document, kind, name, merge_patch(current, patch))
    return doc


def delete_entity(document: object, kind: str, name: str) -> dict:
    doc = _doc(document)
    if kind in TOP_LEVEL:
        index = _named(doc.get(kind) or [], name)
        if index is None:
            raise EntityError(404, f"no {kind[:-1]} named '{name}'")
        del doc[kind][index]
        return doc
    found = _find_route(doc, name)
    if found is None:
        raise EntityError(404, f"no route named '{name}'")
    container, index, _ = found
    del container[index]
    return doc
