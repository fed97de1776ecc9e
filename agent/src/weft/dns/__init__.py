"""weaveDNS for Weft: a replicated table of container names, gossiped on the ``dns`` channel (docs/dns.md).

``names`` normalises and checks names, ``table`` is the table and its merge, ``wire`` the channel's messages,
``service`` puts them on the mesh. Nothing is persisted: a restarted agent registers its attached containers again.
"""

from weft.footprint import dnspython_plain

dnspython_plain()  # dnspython's optional features off before it looks for them (see weft.footprint)
