"""The multi-region test bed: the real system on a small simulated internet.

Scenario files (format: ../shared/scenarios/README.md) describe regions of agents,
targets, a timeline of faults and what the verdicts must do. For each file the runner
builds network namespaces joined by veth pairs (agents behind region routers behind a
core, targets and the coordinator beside it), serves the targets with nginx, a TCP
listener and dnsmasq, gives every region its own dnsmasq resolver, starts the real
``vantage coordinator`` and one ``vantage agent`` per agent in their namespaces, injects
faults with nftables in the region routers, watches the verdicts through the query
service, judges the expectations and tears everything down.

Modules: ``scenario`` (the file format), ``topology`` (names and addresses),
``network`` (namespaces, links, nftables faults), ``services`` (nginx, dnsmasq,
certificates), ``servers`` (the TCP target and a SERVFAIL upstream), ``processes``,
``observer`` (the query client), ``judge`` (expectations and the verdict history),
``hoststate`` (slots, cleanup, leftovers), ``run`` (playing scenarios). Entry point:
``python -m tests.testbed FILE...`` (``make scenario S="FILE..."``).
"""
