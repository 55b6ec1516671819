"""The host network service (HNS): networks, endpoints and policies on netlink/nftables.

Not built yet: the documents (HNSNetwork, HNSEndpoint, policies) exist in ``_schema``; the
service that realizes them arrives with its own issue.
"""

__all__: list[str] = []
