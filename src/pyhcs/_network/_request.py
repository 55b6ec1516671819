"""hcsshim's HNS request API: ``method`` + ``path`` + JSON ``request`` over the service.

hcsshim's ``HNSNetworkRequest(method, path, request)`` sends ``method`` to
``"/networks/" + path``; pyhcs accepts that relative *path* (``""``, ``"<id>"``) and the
full form (``"/networks/<id>"``) alike. Supported:

===========  =========================  =============================================
method       path                       does
===========  =========================  =============================================
GET          /networks/                 list networks
GET          /networks/<id>             one network (``<id>`` may also be its name)
POST         /networks/                 create a network from the request JSON
DELETE       /networks/<id>             delete a network
GET          /endpoints/                list endpoints
GET          /endpoints/<id>            one endpoint
POST         /endpoints/                create an endpoint (``VirtualNetwork`` names it)
POST         /endpoints/<id>            update an endpoint's policies and DNS fields
DELETE       /endpoints/<id>            delete an endpoint
GET          /policylists/[<id>]        list policy lists / one policy list
POST         /policylists/              store a policy list
DELETE       /policylists/<id>          delete a policy list
===========  =========================  =============================================

Anything else raises :class:`InvalidNetworkRequestError` and changes nothing.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

import msgspec

from pyhcs._errors import InvalidConfigError
from pyhcs._network import _policy
from pyhcs._network import _service as svc
from pyhcs._network._errors import InvalidNetworkRequestError, NetworkError
from pyhcs._paths import Roots
from pyhcs._schema import HNSEndpoint, HNSNetwork, from_dict, from_json, to_dict
from pyhcs._schema._codec import Document

__all__ = [
    "PolicyList",
    "hns_call",
    "hns_network_request",
    "hns_list_network_request",
    "hns_endpoint_request",
    "hns_list_endpoint_request",
    "hns_policy_list_request",
]

_POLICY_LIST_NAMES = {
    "id": "ID",
    "endpoint_references": "References",  # hcsshim's wire name (Go field EndpointReferences)
    "policies": "Policies",
}


class PolicyList(Document, rename=_POLICY_LIST_NAMES):
    """An HNS policy list: policies (``ELB``, ``ROUTE``) over a set of endpoints.

    ``endpoint_references`` are ``"/endpoints/<id>"`` paths. A list is checked (the
    endpoints exist, the policies are valid) and its ``ELB`` policies are enforced from
    the moment it is stored until it is deleted: traffic to a VIP is DNATed round robin
    to the referenced endpoints' addresses (as they were when the list was stored).
    ``ROUTE`` policies are stored only.
    """

    id: str = ""
    endpoint_references: list[str] = msgspec.field(default_factory=list)
    policies: list[dict[str, Any]] = msgspec.field(default_factory=list)


_POLICY_LIST_TYPES = frozenset({"ELB", "ROUTE"})


def _split(method: str, path: str, collection: str, op: str) -> tuple[str, str]:
    m = method.upper()
    if m not in ("GET", "POST", "DELETE"):
        raise InvalidNetworkRequestError(path, op, message=f"unsupported method {method!r}")
    p = path.strip()
    prefix = f"/{collection}/"
    if p.startswith(prefix):
        p = p[len(prefix):]
    elif p in (f"/{collection}", prefix.rstrip("/")):
        p = ""
    elif p.startswith("/"):
        raise InvalidNetworkRequestError(path, op, message=f"unknown path {path!r}")
    p = p.strip("/")
    if "/" in p or "?" in p:
        raise InvalidNetworkRequestError(path, op, message=f"unknown path {path!r}")
    return m, p


def _body(cls: type[Any], request: str, op: str) -> Any:
    if not request or not request.strip():
        raise InvalidNetworkRequestError("", op, message="the request needs a JSON body")
    try:
        return from_json(cls, request)
    except InvalidConfigError as e:
        raise InvalidNetworkRequestError("", op, message=e._message or str(e)) from e


def hns_call(method: str, path: str, request: str = "", *,
             roots: Roots | None = None) -> Any:
    """Send one HNS request; return its output in JSON shape (a dict, a list, or None).

    *path* is absolute here (``/networks/...``, ``/endpoints/...``, ``/policylists/...``).
    """
    op = "HNSCall"
    for collection in ("networks", "endpoints", "policylists"):
        if path.strip().startswith(f"/{collection}"):
            break
    else:
        raise InvalidNetworkRequestError(path, op, message=f"unknown path {path!r}")
    if collection == "networks":
        return _networks(method, path, request, roots)
    if collection == "endpoints":
        return _endpoints(method, path, request, roots)
    return _policy_lists(method, path, request, roots)


def _networks(method: str, path: str, request: str, roots: Roots | None) -> Any:
    op = "HNSNetworkRequest"
    m, ref = _split(method, path, "networks", op)
    if m == "GET":
        if ref:
            return to_dict(svc.get_network(ref, roots=roots))
        return to_dict(svc.list_networks(roots=roots))
    if m == "POST":
        if ref:
            raise InvalidNetworkRequestError(ref, op, message="networks cannot be updated")
        return to_dict(svc.create_network(_body(HNSNetwork, request, op), roots=roots))
    if not ref:
        raise InvalidNetworkRequestError(path, op, message="DELETE needs a network id")
    return to_dict(svc.delete_network(ref, roots=roots))


def _endpoints(method: str, path: str, request: str, roots: Roots | None) -> Any:
    op = "HNSEndpointRequest"
    m, ref = _split(method, path, "endpoints", op)
    if m == "GET":
        if ref:
            return to_dict(svc.get_endpoint(ref, roots=roots))
        return to_dict(svc.list_endpoints(roots=roots))
    if m == "POST":
        body = _body(HNSEndpoint, request, op)
        if ref:
            return to_dict(svc.update_endpoint(ref, body, roots=roots))
        return to_dict(svc.create_endpoint(body, roots=roots))
    if not ref:
        raise InvalidNetworkRequestError(path, op, message="DELETE needs an endpoint id")
    return to_dict(svc.delete_endpoint(ref, roots=roots))


def _policy_lists(method: str, path: str, request: str, roots: Roots | None) -> Any:
    op = "HNSPolicyListRequest"
    m, ref = _split(method, path, "policylists", op)
    reg = svc.registry(roots)
    if m == "GET":
        if ref:
            row = reg.query_one("SELECT doc FROM policy_lists WHERE id=?", (ref.upper(),))
            if row is None:
                raise svc._not_found("policy list", ref, op)
            return json.loads(row["doc"])
        return [json.loads(r["doc"]) for r in
                reg.query("SELECT doc FROM policy_lists ORDER BY created")]
    if m == "DELETE":
        if not ref:
            raise InvalidNetworkRequestError(path, op, message="DELETE needs a policy list id")
        row = reg.query_one("SELECT doc FROM policy_lists WHERE id=?", (ref.upper(),))
        if row is None:
            raise svc._not_found("policy list", ref, op)
        try:  # ELB enforcement (policy helper)
            _policy.remove_policy_list(ref.upper())
        except OSError as e:
            raise NetworkError(ref, op, message=f"{e.strerror or e}") from e
        reg.execute("DELETE FROM policy_lists WHERE id=?", (ref.upper(),))
        return json.loads(row["doc"])
    if ref:
        raise InvalidNetworkRequestError(ref, op, message="policy lists cannot be updated")
    pl: PolicyList = _body(PolicyList, request, op)
    for entry in pl.policies:
        t = {str(k).lower(): v for k, v in entry.items()}.get("type")
        if not isinstance(t, str) or t.upper() not in _POLICY_LIST_TYPES:
            raise InvalidNetworkRequestError("", op, message=f"unknown policy type {t!r}")
    backends = []
    for reference in pl.endpoint_references:
        eid = reference.rsplit("/", 1)[-1]
        try:
            backends.append(svc.get_endpoint(eid, roots=roots).ip_address)
        except NetworkError as e:
            raise InvalidNetworkRequestError(reference, op, message=f"unknown endpoint "
                                             f"{reference!r}") from e
    lbs = _policy.load_balancers(pl.policies, backends, "", op)  # ELB enforcement (policy)
    pl.id = svc._new_id()
    doc = to_dict(pl)
    reg.execute("INSERT INTO policy_lists (id, doc, created) VALUES (?,?,?)",
                (pl.id, json.dumps(doc), reg.now()))
    try:  # ELB enforcement (policy helper)
        _policy.apply_policy_list(pl.id, lbs)
    except OSError as e:
        reg.execute("DELETE FROM policy_lists WHERE id=?", (pl.id,))
        raise NetworkError(pl.id, op, message=f"{e.strerror or e}") from e
    return doc


def hns_network_request(method: str, path: str, request: str = "", *,
                        roots: Roots | None = None) -> HNSNetwork:
    """hcsshim's ``HNSNetworkRequest``: one network (GET, POST create, DELETE by id).

    *path* is relative to ``/networks/`` as in hcsshim (``""`` or an id) or absolute.
    DELETE returns the deleted network. Errors: :class:`InvalidNetworkRequestError`
    (bad method, path, JSON or request), :class:`NetworkError` (``ERR_ELEMENT_NOT_FOUND``,
    ``ERR_ALREADY_EXISTS``...).
    """
    out = _networks(method, _abs("networks", path), request, roots)
    return _one(HNSNetwork, out, path, "HNSNetworkRequest", "hns_list_network_request")


def hns_list_network_request(method: str, path: str, request: str = "", *,
                             roots: Roots | None = None) -> list[HNSNetwork]:
    """hcsshim's ``HNSListNetworkRequest``: ``GET`` of ``""`` lists every network."""
    return _many(HNSNetwork, _networks(method, _abs("networks", path), request, roots))


def hns_endpoint_request(method: str, path: str, request: str = "", *,
                         roots: Roots | None = None) -> HNSEndpoint:
    """hcsshim's ``HNSEndpointRequest``: one endpoint (GET, POST create or update, DELETE).

    ``POST ""`` creates from the request, ``POST "<id>"`` updates that endpoint's policies
    and DNS fields. Errors as :func:`hns_network_request`.
    """
    out = _endpoints(method, _abs("endpoints", path), request, roots)
    return _one(HNSEndpoint, out, path, "HNSEndpointRequest", "hns_list_endpoint_request")


def hns_list_endpoint_request(method: str, path: str, request: str = "", *,
                              roots: Roots | None = None) -> list[HNSEndpoint]:
    """hcsshim's ``HNSListEndpointRequest``: ``GET`` of ``""`` lists every endpoint."""
    return _many(HNSEndpoint, _endpoints(method, _abs("endpoints", path), request, roots))


_D = TypeVar("_D", HNSNetwork, HNSEndpoint)


def _one(kind: type[_D], out: Any, path: str, op: str, lister: str) -> _D:
    """The single document a request answered; a list is refused (the lister gives it)."""
    if isinstance(out, list):
        raise InvalidNetworkRequestError(
            path, op, message=f"this request returns a list: use {lister}")
    return from_dict(kind, out)


def _many(kind: type[_D], out: Any) -> list[_D]:
    """The documents a request answered, one or a list of them, as a list."""
    return [from_dict(kind, d) for d in (out if isinstance(out, list) else [out])]


def hns_policy_list_request(method: str, path: str, request: str = "", *,
                            roots: Roots | None = None) -> Any:
    """hcsshim's ``PolicyListRequest`` on ``/policylists/``: a dict, or a list for GET of all."""
    return _policy_lists(method, _abs("policylists", path), request, roots)


def _abs(collection: str, path: str) -> str:
    p = path.strip()
    return p if p.startswith("/") else f"/{collection}/{p}"
