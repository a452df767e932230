"""Names, addresses and fault rules of a run, before anything is built."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from testbed.network import fault_table
from testbed.scenario import NetworkFault, Scenario, Selector, Target
from testbed.topology import SUPERNET, plan


def scenario(regions: dict[str, int], targets: int = 3) -> Scenario:
    return Scenario(
        name="sizes",
        about="",
        path=Path("sizes.yaml"),
        regions=regions,
        targets={f"t{i}": Target(f"t{i}", "http") for i in range(targets)},
        checks=(),
        timeline=(),
        expect=(),
        never=(),
        end=10.0,
    )


def test_every_name_carries_the_prefix_and_fits_an_interface_name() -> None:
    big = scenario({f"r{i}": 200 for i in range(8)}, targets=60)
    topology = plan(big, "vt31zz", 31)
    assert all(ns.startswith("vt31zz-") for ns in topology.namespaces)
    for veth in topology.veths:
        for name in (veth.a, veth.b):
            assert name.startswith("vt31zz")
            assert len(name) <= 15


def test_addresses_are_distinct_and_inside_the_slots_block() -> None:
    topology = plan(scenario({"eu": 3, "us": 2, "ap": 1}), "vt05ab", 5)
    assert topology.block.subnet_of(SUPERNET)
    addresses = [
        *(r.uplink for r in topology.routers.values()),
        *(r.core_side for r in topology.routers.values()),
        *(r.lan for r in topology.routers.values()),
        *(a.address for a in topology.agents.values()),
        *(t.address for t in topology.targets.values()),
        *(t.core_side for t in topology.targets.values()),
        topology.coordinator.address,
        topology.coordinator.core_side,
        topology.host_address,
        topology.coordinator_management,
    ]
    assert all(ipaddress.ip_address(a.ip) in topology.block for a in addresses)
    assert len({a.ip for a in addresses}) == len(addresses)
    for agent in topology.agents.values():
        assert agent.address.network == topology.routers[agent.region].lan.network
    other = plan(scenario({"eu": 3}), "vt06ab", 6)
    assert not other.block.overlaps(topology.block)


def test_faults_become_one_table_replaced_in_one_transaction() -> None:
    topology = plan(scenario({"eu": 2, "us": 2}), "vt01ab", 1)
    eu = topology.routers["eu"]
    web = str(topology.targets["t0"].address.ip)
    script = fault_table(
        topology,
        [
            NetworkFault("drop", Selector("region", "eu"), Selector("target", "t0")),
            NetworkFault("reject", Selector("agent", "us-1"), Selector("coordinator")),
            NetworkFault("loss", Selector("all"), Selector("target", "t1"), 20),
        ],
    )
    lines = script.splitlines()
    assert lines[:2] == ["table inet vt01abfaults", "delete table inet vt01abfaults"]
    assert f"ip saddr {{ {eu.lan.network}, {eu.uplink.ip} }} ip daddr {{ {web} }} drop" in script
    assert "meta l4proto tcp reject with tcp reset" in script
    assert "reject with icmpx type host-unreachable" in script
    loss = [line.strip() for line in lines if "numgen random mod 100 < 20 drop" in line]
    assert len(loss) == 2 * 3  # both ways, in forward, input and output
    assert not any(f"{topology.coordinator.address.ip}" in line for line in loss)


def test_clearing_faults_deletes_the_table() -> None:
    topology = plan(scenario({"eu": 1}), "vt01ab", 1)
    assert fault_table(topology, []) == "table inet vt01abfaults\ndelete table inet vt01abfaults\n"
