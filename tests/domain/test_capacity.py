from __future__ import annotations

import pytest

from moldd.domain.capacity import HostLoad, check_cluster_room, check_host_room, choose_host, cluster_capacity
from moldd.domain.errors import CapacityError


def hosts(*loads: tuple[str, int, int], cluster: str = "c1", up: bool = True) -> list[HostLoad]:
    return [HostLoad(name, cluster, max_vms, vms, up) for name, max_vms, vms in loads]


@pytest.mark.parametrize(
    ("n", "per_host", "k", "limit"),
    [(1, 10, 1, 0), (2, 10, 1, 10), (3, 10, 1, 20), (4, 5, 2, 10), (3, 4, 0, 12)],
)
def test_limit_is_n_minus_k_times_per_host(n: int, per_host: int, k: int, limit: int) -> None:
    cap = cluster_capacity("c1", hosts(*[(f"h{i}", per_host, 0) for i in range(n)]), k)
    assert cap.limit == limit and cap.headroom == limit


def test_mixed_limits_assume_the_biggest_hosts_fail() -> None:
    cap = cluster_capacity("c1", hosts(("a", 10, 0), ("b", 4, 0), ("c", 6, 0)), 1)
    assert cap.limit == 10  # 4 + 6: losing the 10-VM host must still fit everything


def test_room_check_refuses_past_the_limit_naming_the_rule() -> None:
    cap = cluster_capacity("c1", hosts(("a", 2, 1), ("b", 2, 1)), 1)
    with pytest.raises(CapacityError) as refused:
        check_cluster_room(cap)
    assert "host failure" in refused.value.message and refused.value.field == "hostid"
    check_cluster_room(cluster_capacity("c1", hosts(("a", 2, 1), ("b", 2, 0)), 1))


def test_choose_host_prefers_free_up_hosts_and_respects_exclusions() -> None:
    loads = hosts(("a", 4, 3), ("b", 4, 1), ("c", 4, 0)) + hosts(("d", 4, 0), up=False)
    assert choose_host(loads).name == "c"
    assert choose_host(loads, exclude={"c"}).name == "b"
    assert choose_host(loads, prefer="a").name == "a"
    with pytest.raises(CapacityError):
        choose_host(hosts(("a", 1, 1)) + hosts(("b", 4, 0), up=False))
    with pytest.raises(CapacityError):
        check_host_room(HostLoad("x", "c1", 2, 2))
