"""Parsing of `conntrack -L -o extended,id` lines (the lab's yardstick)."""

from otelflow.netlab.ctcli import parse_line


def test_tcp_with_counters_and_nat() -> None:
    r = parse_line(
        "ipv4     2 tcp      6 119 TIME_WAIT src=10.244.1.2 dst=10.96.0.10 sport=20003 dport=80 packets=80 "
        "bytes=104168 src=10.244.1.4 dst=10.244.1.2 sport=8080 dport=20003 packets=94 bytes=104896 [ASSURED] "
        "mark=0 use=1 id=2702627222"
    )
    assert r is not None
    assert (r.family, r.proto, r.state, r.timeout) == ("ipv4", "tcp", "TIME_WAIT", 119)
    assert r.orig["dst"] == "10.96.0.10" and r.reply["src"] == "10.244.1.4"
    assert r.count("orig", "bytes") == 104168 and r.count("reply", "packets") == 94
    assert r.flags == {"ASSURED"} and r.extra == {"mark": "0", "use": "1", "id": "2702627222"}


def test_udp_unreplied_ipv6_without_state() -> None:
    r = parse_line(
        "ipv6     10 udp      17 29 src=fd00::1 dst=fd00::2 sport=1 dport=2 packets=1 bytes=60 [UNREPLIED] "
        "src=fd00::2 dst=fd00::1 sport=2 dport=1 packets=0 bytes=0 mark=0 zone=3 use=1 id=7"
    )
    assert r is not None
    assert r.state == "" and r.flags == {"UNREPLIED"}
    assert r.reply["sport"] == "2" and r.extra["zone"] == "3" and r.extra["id"] == "7"


def test_icmp_echo_id_is_kept_apart_from_the_conntrack_id() -> None:
    r = parse_line(
        "ipv4     2 icmp     1 29 src=10.0.0.1 dst=10.0.0.2 type=8 code=0 id=4715 packets=1 bytes=84 "
        "src=10.0.0.2 dst=10.0.0.1 type=0 code=0 id=4715 packets=1 bytes=84 mark=0 use=1 id=99"
    )
    assert r is not None
    assert r.orig["id"] == "4715" and r.reply["id"] == "4715" and r.extra["id"] == "99"


def test_accounting_off_has_no_counters_and_garbage_is_ignored() -> None:
    r = parse_line(
        "ipv4 2 tcp 6 431999 ESTABLISHED src=1.1.1.1 dst=2.2.2.2 sport=1 dport=2 "
        "src=2.2.2.2 dst=1.1.1.1 sport=2 dport=1"
    )
    assert r is not None and r.count("orig", "bytes") == 0 and r.reply["dst"] == "1.1.1.1"
    assert parse_line("conntrack v1.4.7 (conntrack-tools): 3 flow entries have been shown.") is None
    assert parse_line("") is None
